"""Small byte-level helpers shared by the safe and hostile recipes.

Offsets and field layouts come from the public format specifications
(qcow2.txt, the VMDK, VHD and VHDX specifications, the VDI and parallels
notes in qemu's docs). Everything here is written to be obviously
deterministic: no clocks, no random numbers.
"""

import struct
import zlib

QCOW2_MAGIC = b"QFI\xfb"

# qcow2 header extension types (qcow2.txt, "Header extensions").
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Offsets of qcow2 header fields (bytes, big-endian).
Q2_VERSION = 4
Q2_BACKING_OFFSET = 8
Q2_BACKING_SIZE = 16
Q2_CLUSTER_BITS = 20
Q2_SIZE = 24
Q2_CRYPT = 32
Q2_L1_SIZE = 36
Q2_L1_OFFSET = 40
Q2_RT_OFFSET = 48
Q2_RT_CLUSTERS = 56
Q2_NB_SNAPSHOTS = 60
Q2_SNAPSHOTS_OFFSET = 64
Q2_INCOMPAT = 72
Q2_COMPAT = 80
Q2_AUTOCLEAR = 88
Q2_REFCOUNT_ORDER = 96
Q2_HEADER_LENGTH = 100
Q2_COMPRESSION_TYPE = 104


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def patch(path, offset, fmt, *values):
    """Overwrite struct-packed values at `offset` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def patch_bytes(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def get(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))


def truncate(path, length):
    with open(path, "r+b") as f:
        f.truncate(length)


def append(path, data):
    with open(path, "ab") as f:
        pos = f.tell()
        f.write(data)
    return pos


def pad8(n):
    return (n + 7) & ~7


# ---------------------------------------------------------------- qcow2


class Qcow2:
    """A parsed view of a qcow2 header, for patching images qemu-img made."""

    def __init__(self, path):
        self.path = path
        d = read(path)
        (
            self.magic,
            self.version,
            self.backing_offset,
            self.backing_size,
            self.cluster_bits,
            self.size,
            self.crypt,
            self.l1_size,
            self.l1_offset,
            self.rt_offset,
            self.rt_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        ) = struct.unpack_from(">4sIQIIQIIQQIIQ", d, 0)
        if self.version >= 3:
            (
                self.incompat,
                self.compat,
                self.autoclear,
                self.refcount_order,
                self.header_length,
            ) = struct.unpack_from(">QQQII", d, 72)
        else:
            self.incompat = self.compat = self.autoclear = 0
            self.refcount_order = 4
            self.header_length = 72
        self.cluster_size = 1 << self.cluster_bits
        self.exts = []
        off = self.header_length
        while off + 8 <= self.cluster_size:
            t, n = struct.unpack_from(">II", d, off)
            if t == EXT_END:
                break
            self.exts.append((t, d[off + 8 : off + 8 + n]))
            off += 8 + pad8(n)
        self.backing = d[self.backing_offset : self.backing_offset + self.backing_size] if self.backing_offset else b""

    def l1(self, i):
        return get(self.path, self.l1_offset + 8 * i, ">Q")[0]

    def l2_entry_offset(self, guest_off):
        """File offset of the L2 entry mapping `guest_off` (standard L2)."""
        ext_l2 = self.version >= 3 and (self.incompat & 16)
        entry = 16 if ext_l2 else 8
        per_l2 = self.cluster_size // entry
        ci = guest_off >> self.cluster_bits
        l2 = self.l1(ci // per_l2) & 0x00FFFFFFFFFFFE00
        return l2 + (ci % per_l2) * entry

    def refblock0(self):
        return get(self.path, self.rt_offset, ">Q")[0]

    def set_refcount16(self, cluster_index, value):
        """Set a refcount in the first refcount block (refcount_bits=16)."""
        assert self.refcount_order == 4
        patch(self.path, self.refblock0() + 2 * cluster_index, ">H", value)

    def rewrite_exts(self, exts, backing=None):
        """Rewrite the extension area and backing name, keeping the layout
        qemu uses: extensions from header_length, backing name after them."""
        if backing is None:
            backing = self.backing
        blob = b""
        for t, data in exts:
            blob += struct.pack(">II", t, len(data)) + data + b"\0" * (pad8(len(data)) - len(data))
        blob += struct.pack(">II", EXT_END, 0)
        boff = self.header_length + len(blob)
        if not backing:
            boff = 0
        area = blob + backing
        if self.header_length + len(area) > self.cluster_size:
            raise ValueError("header extensions do not fit the first cluster")
        patch_bytes(self.path, self.header_length, area + b"\0" * (self.cluster_size - self.header_length - len(area)))
        patch(self.path, Q2_BACKING_OFFSET, ">QI", boff, len(backing))
        self.exts = list(exts)
        self.backing = backing
        self.backing_offset = boff
        self.backing_size = len(backing)


def qcow2_set_bits(path, field_offset, bits):
    v = get(path, field_offset, ">Q")[0]
    patch(path, field_offset, ">Q", v | bits)


# ---------------------------------------------------------------- VHD


def vhd_checksum(buf, csum_off):
    b = bytearray(buf)
    b[csum_off : csum_off + 4] = b"\0\0\0\0"
    return (~sum(b)) & 0xFFFFFFFF


def vhd_chs(total_sectors):
    """CHS geometry as the VHD specification's appendix computes it."""
    if total_sectors > 65535 * 16 * 255:
        total_sectors = 65535 * 16 * 255
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total_sectors // spt
    else:
        spt = 17
        cth = total_sectors // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total_sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total_sectors // spt
    return cth // heads, heads, spt


def vhd_footer(size, disk_type, data_offset, uuid=b"\x11" * 16, timestamp=0x2B000000, cyls=None):
    c, h, s = vhd_chs(size // 512)
    if cyls is not None:
        c = cyls
    f = bytearray(512)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBII16sB",
        f,
        0,
        b"conectix",
        2,
        0x00010000,
        data_offset,
        timestamp,
        b"qemu",
        0x00050003,
        b"Wi2k",
        size,
        size,
        c,
        h,
        s,
        disk_type,
        0,
        uuid,
        0,
    )
    struct.pack_into(">I", f, 64, vhd_checksum(f, 64))
    return bytes(f)


def vhd_dyn_header(table_offset, max_entries, block_size=0x200000, parent_uuid=b"\0" * 16, parent_name="", locators=()):
    h = bytearray(1024)
    struct.pack_into(">8sQQIIII16sI", h, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000, max_entries, block_size, 0, parent_uuid, 0)
    name = parent_name.encode("utf-16-be")[:512]
    h[64 : 64 + len(name)] = name
    for i, (code, space, length, off) in enumerate(locators[:8]):
        struct.pack_into(">4sIIIQ", h, 576 + 24 * i, code, space, length, 0, off)
    struct.pack_into(">I", h, 36, vhd_checksum(h, 36))
    return bytes(h)


# ---------------------------------------------------------------- CRC32C (VHDX)

_CRC32C_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data):
    crc = 0xFFFFFFFF
    t = _CRC32C_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def vhdx_fix_checksum(path, offset, length, csum_off=4):
    """Recompute the CRC-32C of a VHDX structure (header or region table)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        buf = bytearray(f.read(length))
        buf[csum_off : csum_off + 4] = b"\0\0\0\0"
        struct.pack_into("<I", buf, csum_off, crc32c(bytes(buf)))
        f.seek(offset)
        f.write(buf)


# ---------------------------------------------------------------- partition tables


def mbr(parts, disk_sig=0x1234ABCD):
    """parts: list of (type, lba_start, lba_count, bootable)."""
    m = bytearray(512)
    struct.pack_into("<I", m, 440, disk_sig)
    for i, (ptype, start, count, boot) in enumerate(parts[:4]):
        struct.pack_into("<B3sB3sII", m, 446 + 16 * i, 0x80 if boot else 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", start, count)
    m[510:512] = b"\x55\xaa"
    return bytes(m)


def _guid(n):
    return bytes([n] * 16)


def gpt(disk_sectors, parts):
    """Primary + backup GPT for a disk of `disk_sectors` 512-byte sectors.
    parts: list of (type_guid_bytes, first_lba, last_lba, name)."""
    entries = bytearray(128 * 128)
    for i, (tguid, first, last, name) in enumerate(parts):
        nm = name.encode("utf-16-le")[:72]
        struct.pack_into("<16s16sQQQ", entries, 128 * i, tguid, _guid(0x40 + i), first, last, 0)
        entries[128 * i + 56 : 128 * i + 56 + len(nm)] = nm
    ecrc = zlib.crc32(entries) & 0xFFFFFFFF
    last_lba = disk_sectors - 1

    def hdr(my, alt, entries_lba):
        h = bytearray(92)
        struct.pack_into(
            "<8sIIIIQQQQ16sQIII",
            h,
            0,
            b"EFI PART",
            0x00010000,
            92,
            0,
            0,
            my,
            alt,
            34,
            last_lba - 33,
            _guid(0x5A),
            entries_lba,
            128,
            128,
            ecrc,
        )
        struct.pack_into("<I", h, 16, zlib.crc32(h) & 0xFFFFFFFF)
        return bytes(h) + b"\0" * (512 - 92)

    protective = mbr([(0xEE, 1, min(disk_sectors - 1, 0xFFFFFFFF), False)], disk_sig=0)
    primary = protective + hdr(1, last_lba, 2) + bytes(entries)
    backup = bytes(entries) + hdr(last_lba, 1, last_lba - 32)
    return primary, backup, (last_lba - 32) * 512


GPT_LINUX = bytes.fromhex("af3dc60f838472478e793d69d8477de4")
GPT_ESP = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")


def write_sparse(path, size, chunks):
    """Create a sparse file of `size` bytes with `chunks` [(offset, bytes)]."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks:
            f.seek(off)
            f.write(data)


def pattern(byte, n):
    return bytes([byte]) * n
