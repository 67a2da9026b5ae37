"""Hostile images: hand-built or hand-patched files that attack a parser.

Each builder is a small recipe registered under a category. Where a valid
starting point is needed, qemu-img makes it and struct patches it; the
recipe string records both. Everything is deterministic unless `notes`
says otherwise.
"""

import base64
import bz2
import os
import struct
import uuid
import zlib

from . import binfmt as B

K = 1024
M = 1024 * K
G = 1024 * M

GROUPS = []

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")


def group(category):
    def deco(fn):
        GROUPS.append(("hostile/" + category, lambda g: fn(g, category)))
        return fn

    return deco


def H(g, cat, id, fname, chain=(), notes=""):
    return g.img(id, fname, cat, tier="hostile", chain=chain, notes=notes)


def qcow2_base(im, size=16 * M, opts="", fname=None, data=True):
    """A small, deterministic qcow2 made by qemu-img to patch from."""
    im.create("qcow2", size, opts, fname=fname)
    if data:
        im.io("qcow2", "write -P 0x5a 0 64k", fname=fname)


def drop_ext(path, t):
    q = B.Qcow2(path)
    q.rewrite_exts([e for e in q.exts if e[0] != t])


def set_ext(path, t, data, raw_len=None):
    """Replace (or add) extension `t`; raw_len overrides the length field."""
    q = B.Qcow2(path)
    exts = [e for e in q.exts if e[0] != t] + [(t, data)]
    q.rewrite_exts(exts)
    if raw_len is not None:
        off = q.header_length
        for et, ed in exts:
            if et == t:
                B.patch(path, off + 4, ">I", raw_len)
                break
            off += 8 + B.pad8(len(ed))


def set_backing(path, name, fmt=None):
    q = B.Qcow2(path)
    exts = [e for e in q.exts if e[0] != B.EXT_BACKING_FORMAT]
    if fmt is not None:
        exts.insert(0, (B.EXT_BACKING_FORMAT, fmt.encode()))
    q.rewrite_exts(exts, backing=name.encode() if isinstance(name, str) else name)


# ------------------------------------------------------------- text vmdk

VMDK_DDB = 'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\nddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n'


def vmdk_descriptor(extents, create_type="monolithicFlat", cid="fffffffe", parent_cid="ffffffff", parent_hint=None, extra=""):
    s = "# Disk DescriptorFile\nversion=1\n" f"CID={cid}\nparentCID={parent_cid}\ncreateType=\"{create_type}\"\n"
    if parent_hint is not None:
        s += f'parentFileNameHint="{parent_hint}"\n'
    s += "\n# Extent description\n"
    for e in extents:
        s += e + "\n"
    s += "\n# The Disk Data Base\n#DDB\n\n" + VMDK_DDB + extra
    return s.encode()


def vmdk_sparse_with_descriptor(im, size, desc):
    """qemu-img makes a monolithicSparse file; its embedded descriptor (the
    only random part: the CID) is then replaced by `desc`."""
    im.create("vmdk", size, "subformat=monolithicSparse")

    def fix():
        doff, dsize = B.get(im.path, 28, "<QQ")
        room = dsize * 512
        if len(desc) > room:
            raise ValueError("descriptor too long for the embedded area")
        B.patch_bytes(im.path, doff * 512, desc + b"\0" * (room - len(desc)))

    im.py("replace the embedded descriptor with a fixed text (CID fffffffe)", fix)


def flat_file(g, name, size=1 * M, byte=0x5A):
    B.write_sparse(g.p(name), size, [(0, B.pattern(byte, 4096))])


def shared_flat(g, cat, id, name):
    """A raw extent shared by several descriptors of one group."""
    with H(g, cat, id, name, notes="raw extent file shared by descriptors in this directory") as im:
        im.py(f"{name}: 1 MiB sparse file, 0x5a x4096 at offset 0", flat_file, g, name)


def link_shared(g, id, name):
    """List the shared extent in the chain of every image naming it."""
    needle = name.encode()
    for im in g.images:
        if im.id != id and os.path.isfile(im.path) and not os.path.islink(im.path):
            with open(im.path, "rb") as f:
                if needle in f.read(2 * M):
                    im.chain.append(id)


# ------------------------------------------------------------- VHD


def vhd_dynamic(size, disk_type=3, block_size=2 * M, parent_name="", locators=(), loc_data=(), bat_fill=0xFFFFFFFF, max_entries=None, table_offset=1536, parent_uuid=b"\0" * 16):
    """A complete dynamic/differencing VHD with an empty BAT."""
    n = max_entries if max_entries is not None else (size + block_size - 1) // block_size
    footer = B.vhd_footer(size, disk_type, 512, uuid=b"\x22" * 16)
    dyn = B.vhd_dyn_header(table_offset, n, block_size, parent_uuid=parent_uuid, parent_name=parent_name, locators=locators)
    nbat = min(n, 1 << 16)
    bat = struct.pack(">I", bat_fill) * nbat
    bat += b"\0" * ((-len(bat)) % 512)
    body = bytearray(footer + dyn)
    if table_offset == 1536:
        body += bat
    for off, data in loc_data:
        if len(body) < off + len(data):
            body += b"\0" * (off + len(data) - len(body))
        body[off : off + len(data)] = data
    body += b"\0" * ((-len(body)) % 512)
    return bytes(body) + footer


# ------------------------------------------------------------- cloop / dmg / bochs

CLOOP_MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n"


def cloop(blocks, block_size=64 * K, n_blocks=None, offsets=None):
    hdr = CLOOP_MAGIC + b"\0" * (128 - len(CLOOP_MAGIC))
    n = len(blocks) if n_blocks is None else n_blocks
    hdr += struct.pack(">II", block_size, n)
    base = 136 + 8 * (len(blocks) + 1)
    if offsets is None:
        offsets = [base]
        for b in blocks:
            offsets.append(offsets[-1] + len(b))
    return hdr + b"".join(struct.pack(">Q", o) for o in offsets) + b"".join(blocks)


def deflate(data, level=9):
    return zlib.compress(data, level)


def zero_bomb(n, level=9):
    """zlib stream that inflates to `n` zero bytes, built incrementally."""
    c = zlib.compressobj(level)
    chunk = bytes(1 << 20)
    out = []
    left = n
    while left:
        k = min(left, len(chunk))
        out.append(c.compress(chunk[:k]))
        left -= k
    out.append(c.flush())
    return b"".join(out)


UDZO, UDBZ, UDRW, UDZE, UDIG, UDLE = 0x80000005, 0x80000006, 1, 0, 2, 0xFFFFFFFF


def mish(chunks, first_sector=0, count_override=None):
    """A 'mish' block: chunks = [(type, sector, sector_count, offset, length)]."""
    m = bytearray(204)
    m[0:4] = b"mish"
    struct.pack_into(">I", m, 4, 1)
    struct.pack_into(">Q", m, 8, first_sector)
    struct.pack_into(">Q", m, 16, sum(c[2] for c in chunks))
    struct.pack_into(">Q", m, 0x18, 0)
    struct.pack_into(">I", m, 200, count_override if count_override is not None else len(chunks))
    for t, sec, cnt, off, ln in chunks:
        m += struct.pack(">IIQQQQ", t, 0, sec, cnt, off, ln)
    return bytes(m)


def dmg(data_fork, mishes, total_sectors, plist_override=None):
    """data fork, then an XML plist with one <data> per mish block, then koly."""
    items = "".join(f"<dict><key>Data</key><data>{base64.b64encode(m).decode()}</data></dict>" for m in mishes)
    plist = plist_override if plist_override is not None else (
        '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict><key>resource-fork</key><dict>'
        f"<key>blkx</key><array>{items}</array></dict></dict></plist>\n"
    ).encode()
    xml_off = len(data_fork)
    koly = bytearray(512)
    koly[0:4] = b"koly"
    struct.pack_into(">III", koly, 4, 4, 512, 1)
    struct.pack_into(">QQQ", koly, 0x10, 0, 0, len(data_fork))
    struct.pack_into(">QQ", koly, 0x28, 0, 0)
    struct.pack_into(">QQ", koly, 0xD8, xml_off, len(plist))
    struct.pack_into(">Q", koly, 0x1EC, total_sectors)
    return data_fork + plist + bytes(koly)


def bochs(disk_size=1032192, catalog=512, extent=4096, bitmap=256, header=512, entries=None):
    h = bytearray(512)
    h[0:22] = b"Bochs Virtual HD Image"
    h[32:39] = b"Redolog"
    h[48:55] = b"Growing"
    struct.pack_into("<IIIII", h, 64, 0x00020000, header, catalog, bitmap, extent)
    struct.pack_into("<Q", h, 88, disk_size)
    cat = struct.pack("<I", 0xFFFFFFFF) * (entries if entries is not None else catalog)
    return bytes(h) + cat


# ------------------------------------------------------------- VHDX

REGION_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
REGION_META = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
META_VDISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
META_FILE_PARAMS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VHDX_RT = (192 * K, 256 * K)


def vhdx_regions(path):
    d = B.read(path)
    rt = VHDX_RT[0]
    n = struct.unpack_from("<I", d, rt + 8)[0]
    out = {}
    for i in range(min(n, 2047)):
        e = rt + 16 + 32 * i
        gid, off, ln, req = struct.unpack_from("<16sQII", d, e)
        out[gid] = (e, off, ln)
    return out


def vhdx_patch_rt(path, fn):
    """Apply fn(table_offset) to both region tables and fix their CRCs."""
    for rt in VHDX_RT:
        fn(rt)
        B.vhdx_fix_checksum(path, rt, 64 * K)


def vhdx_meta_item(path, item):
    regs = vhdx_regions(path)
    _, moff, _ = regs[REGION_META]
    d = B.read(path)
    n = struct.unpack_from("<H", d, moff + 10)[0]
    for i in range(n):
        e = moff + 32 + 32 * i
        gid, off, ln = struct.unpack_from("<16sII", d, e)
        if gid == item:
            return moff + off, ln
    raise KeyError("metadata item")


# =================================================================== categories


@group("backing-outside-dir")
def g_backing_outside(g, cat):
    cases = [
        ("bod-abs-passwd", "/etc/passwd", "raw"),
        ("bod-abs-passwd-nofmt", "/etc/passwd", None),
        ("bod-abs-shadow-qcow2", "/etc/shadow", "qcow2"),
        ("bod-dotdot-passwd", "../../../../../../../../etc/passwd", "raw"),
        ("bod-dotdot-sibling", "../outside-the-corpus.raw", "raw"),
        ("bod-dotdot-mixed", "sub/../../../../../../../../etc/passwd", None),
        ("bod-json-file", 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}', None),
        ("bod-proc-environ", "/proc/self/environ", "raw"),
        ("bod-dev-zero", "/dev/zero", "raw"),
        ("bod-nbd-unix", "nbd+unix:///export?socket=/tmp/instar-corpus-nonexistent.sock", "raw"),
        ("bod-http", "http://127.0.0.1:9/disk.img", "raw"),
        ("bod-file-proto", "file:/etc/passwd", "raw"),
        ("bod-home-tilde", "~/secret.img", "raw"),
    ]
    for id, name, fmt in cases:
        with H(g, cat, id, id + ".qcow2", notes=f"backing file {name!r}") as im:
            qcow2_base(im, 1 * M, data=False)
            im.py(f"set backing file name to {name!r}" + (f", backing format {fmt}" if fmt else ", no backing format"), set_backing, im.path, name, fmt)
    os.symlink("/etc/passwd", g.p("link-to-passwd.raw"))
    with H(g, cat, "bod-symlink-file", "bod-symlink-file.qcow2", notes="backing link-to-passwd.raw is a symlink to /etc/passwd (not listed as an image)") as im:
        im.py("ln -s /etc/passwd link-to-passwd.raw")
        qcow2_base(im, 1 * M, data=False)
        im.py("set backing file name 'link-to-passwd.raw', format raw", set_backing, im.path, "link-to-passwd.raw", "raw")
    os.symlink("/", g.p("rootlink"))
    with H(g, cat, "bod-symlink-dir", "bod-symlink-dir.qcow2", notes="backing goes through rootlink -> / (symlink, not listed)") as im:
        im.py("ln -s / rootlink")
        qcow2_base(im, 1 * M, data=False)
        im.py("set backing file name 'rootlink/etc/passwd'", set_backing, im.path, "rootlink/etc/passwd", "raw")
    with H(g, cat, "bod-qed-abs", "bod-qed-abs.qed") as im:
        im.create("qed", 1 * M, None, extra=["-u", "-b", "/etc/passwd", "-F", "raw"])
    with H(g, cat, "bod-qed-dotdot", "bod-qed-dotdot.qed") as im:
        im.create("qed", 1 * M, None, extra=["-u", "-b", "../../../../../../etc/passwd", "-F", "raw"])
    with H(g, cat, "bod-qcow1-abs", "bod-qcow1-abs.qcow") as im:
        im.create("qcow", 1 * M, None, extra=["-u", "-b", "/etc/passwd", "-F", "raw"])
    with H(g, cat, "bod-vmdk-parent-abs", "bod-vmdk-parent-abs.vmdk", notes="monolithicSparse with parentFileNameHint /etc/passwd") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "bod-vmdk-parent-abs.vmdk"'], "monolithicSparse", parent_cid="12345678", parent_hint="/etc/passwd"))
    with H(g, cat, "bod-vmdk-parent-dotdot", "bod-vmdk-parent-dotdot.vmdk") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "bod-vmdk-parent-dotdot.vmdk"'], "monolithicSparse", parent_cid="12345678", parent_hint="../../../../../etc/passwd"))


@group("datafile-outside-dir")
def g_datafile_outside(g, cat):
    cases = [
        ("dfo-abs-passwd", "/etc/passwd"),
        ("dfo-dotdot", "../../../../../../../../etc/passwd"),
        ("dfo-dev-zero", "/dev/zero"),
        ("dfo-json", 'json:{"driver":"file","filename":"/etc/passwd"}'),
        ("dfo-proc", "/proc/self/mem"),
        ("dfo-sibling", "../outside-the-corpus.data"),
    ]
    for id, name in cases:
        with H(g, cat, id, id + ".qcow2", notes=f"external data file {name!r}") as im:
            im.create("qcow2", 1 * M, f"data_file={id}.tmpdata,data_file_raw=on")
            os.unlink(g.p(f"{id}.tmpdata"))
            im.py(f"rm {id}.tmpdata; set the data-file name extension to {name!r}", set_ext, im.path, B.EXT_DATA_FILE, name.encode())
    os.symlink("/etc/passwd", g.p("passwd.data"))
    with H(g, cat, "dfo-symlink", "dfo-symlink.qcow2", notes="data file passwd.data is a symlink to /etc/passwd (not listed)") as im:
        im.py("ln -s /etc/passwd passwd.data")
        im.create("qcow2", 1 * M, "data_file=x.tmpdata")
        os.unlink(g.p("x.tmpdata"))
        im.py("rm x.tmpdata; set the data-file name to 'passwd.data'", set_ext, im.path, B.EXT_DATA_FILE, b"passwd.data")
    with H(g, cat, "dfo-bit-without-name", "dfo-bit-without-name.qcow2", notes="incompatible data-file bit set, no name extension") as im:
        qcow2_base(im, 1 * M, data=False)
        im.py("set incompatible bit 2 (external data file); no data-file extension", B.qcow2_set_bits, im.path, B.Q2_INCOMPAT, 4)
    with H(g, cat, "dfo-name-without-bit", "dfo-name-without-bit.qcow2", notes="data-file extension naming /etc/passwd but the feature bit clear") as im:
        qcow2_base(im, 1 * M, data=False)
        im.py("add data-file extension '/etc/passwd' without the incompatible bit", set_ext, im.path, B.EXT_DATA_FILE, b"/etc/passwd")


@group("vmdk-extent-outside-dir")
def g_vmdk_extent_outside(g, cat):
    shared_flat(g, cat, "veo-local-flat", "local.flat")
    cases = [
        ("veo-flat-abs", ['RW 16 FLAT "/etc/passwd" 0']),
        ("veo-flat-dotdot", ['RW 2048 FLAT "../../x" 0']),
        ("veo-flat-dotdot-passwd", ['RW 16 FLAT "../../../../../../../../etc/passwd" 0']),
        ("veo-sparse-abs", ['RW 2048 SPARSE "/etc/passwd"']),
        ("veo-vmfs-shadow", ['RW 16 VMFS "/etc/shadow"']),
        ("veo-second-extent-abs", ['RW 2048 FLAT "local.flat" 0', 'RW 16 FLAT "/etc/passwd" 0']),
        ("veo-dev-zero", ['RW 2048 FLAT "/dev/zero" 0']),
        ("veo-proc", ['RW 16 FLAT "/proc/self/environ" 0']),
        ("veo-json", ['RW 16 FLAT "json:{\\"driver\\":\\"file\\",\\"filename\\":\\"/etc/passwd\\"}" 0']),
        ("veo-zero-extent-abs", ['RW 2048 ZERO "/etc/passwd"']),
    ]
    for id, ext in cases:
        with H(g, cat, id, id + ".vmdk", notes="descriptor: " + " | ".join(ext)) as im:
            im.py("text descriptor: " + " | ".join(ext), B.write, im.path, vmdk_descriptor(ext))
    os.symlink("/etc/passwd", g.p("passwd-link.flat"))
    with H(g, cat, "veo-symlink", "veo-symlink.vmdk", notes="extent passwd-link.flat is a symlink to /etc/passwd (not listed)") as im:
        im.py("ln -s /etc/passwd passwd-link.flat; descriptor with FLAT extent passwd-link.flat", B.write, im.path, vmdk_descriptor(['RW 16 FLAT "passwd-link.flat" 0']))
    with H(g, cat, "veo-embedded-abs", "veo-embedded-abs.vmdk", notes="sparse file whose embedded descriptor names /etc/passwd") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 FLAT "/etc/passwd" 0'], "monolithicSparse"))
    link_shared(g, "veo-local-flat", "local.flat")


def replace_bytes(path, old, new):
    d = B.read(path)
    i = d.index(old)
    B.patch_bytes(path, i, new)


def _qcow2_loop(im, name, fmt="qcow2"):
    qcow2_base(im, 1 * M, data=False)
    im.py(f"set backing file {name!r} format {fmt}", set_backing, im.path, name, fmt)


@group("backing-loop")
def g_loop(g, cat):
    with H(g, cat, "loop-self", "self.qcow2", chain=["loop-self"]) as im:
        _qcow2_loop(im, "self.qcow2")
    with H(g, cat, "loop-self-nofmt", "self-nofmt.qcow2", chain=["loop-self-nofmt"]) as im:
        _qcow2_loop(im, "self-nofmt.qcow2", None)
    with H(g, cat, "loop-ab-a", "a.qcow2", chain=["loop-ab-b"]) as im:
        _qcow2_loop(im, "b.qcow2")
    with H(g, cat, "loop-ab-b", "b.qcow2", chain=["loop-ab-a"]) as im:
        _qcow2_loop(im, "a.qcow2")
    for x, y in (("c1", "c2"), ("c2", "c3"), ("c3", "c1")):
        with H(g, cat, f"loop-3-{x}", f"{x}.qcow2", chain=[f"loop-3-{y}"]) as im:
            _qcow2_loop(im, f"{y}.qcow2")
    with H(g, cat, "loop-self-dotslash", "dotself.qcow2", chain=["loop-self-dotslash"]) as im:
        _qcow2_loop(im, "./././dotself.qcow2")
    with H(g, cat, "loop-self-abs", "absself.qcow2", chain=["loop-self-abs"], notes="absolute path to itself: depends on the corpus location") as im:
        _qcow2_loop(im, g.final("absself.qcow2"))
    # qemu-img refuses to create these directly: create with a same-length
    # name, then patch the name bytes.
    with H(g, cat, "loop-qed-self", "self.qed", chain=["loop-qed-self"]) as im:
        im.create("qed", 1 * M, None, extra=["-u", "-b", "selx.qed", "-F", "qed"])
        im.py("replace the backing name 'selx.qed' by 'self.qed'", replace_bytes, im.path, b"selx.qed", b"self.qed")
    with H(g, cat, "loop-qcow1-self", "self.qcow", chain=["loop-qcow1-self"]) as im:
        im.create("qcow", 1 * M, None, extra=["-u", "-b", "selx.qcow", "-F", "qcow"])
        im.py("replace the backing name 'selx.qcow' by 'self.qcow'", replace_bytes, im.path, b"selx.qcow", b"self.qcow")
    with H(g, cat, "loop-vmdk-self", "self.vmdk", chain=["loop-vmdk-self"]) as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "self.vmdk"'], "monolithicSparse", parent_cid="fffffffe", parent_hint="self.vmdk"))
    with H(g, cat, "loop-qcow2-vmdk", "mixed.qcow2", chain=["loop-vmdk-mixed"]) as im:
        _qcow2_loop(im, "mixed.vmdk", "vmdk")
    with H(g, cat, "loop-vmdk-mixed", "mixed.vmdk", chain=["loop-qcow2-vmdk"]) as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "mixed.vmdk"'], "monolithicSparse", parent_cid="fffffffe", parent_hint="mixed.qcow2"))


def _deep(g, cat, prefix, depth, cs):
    prev = None
    for i in range(depth):
        fname = f"{prefix}{i:02d}.qcow2"
        id = f"deep-{prefix}{i:02d}"
        with H(g, cat, id, fname, chain=[prev[0]] if prev else [], notes=f"level {i} of a {depth}-level chain (0 = base)") as im:
            if prev is None:
                im.create("qcow2", 1 * M, f"cluster_size={cs}")
                im.io("qcow2", "write -P 0x11 0 4k")
            else:
                im.create("qcow2", None, f"cluster_size={cs}", extra=["-u", "-b", prev[1], "-F", "qcow2", "-o", "size=1M"])
        prev = (id, fname)


@group("deep-chain")
def g_deep(g, cat):
    _deep(g, cat, "d17-", 18, 512)
    _deep(g, cat, "d40-", 41, 512)


def _truncate(g, cat, fmt, src, cuts, make, notes=""):
    """Build `src` once with `make(im)`, then cut copies at `cuts`; every
    entry records the full recipe of the source."""
    first = None
    for c in cuts:
        id = f"trunc-{fmt}-{c}"
        with H(g, cat, id, f"{id}.{fmt}", notes=notes) as im:
            if first is None:
                make(im, src)
                first = list(im.recipe)
            else:
                im.recipe = list(first)
            data = B.read(g.p(src))
            B.write(im.path, data[:c])
            im.py(f"keep the first {c} bytes of {src}")
    if os.path.exists(g.p(src)):
        os.unlink(g.p(src))


@group("truncated-header")
def g_truncated(g, cat):
    def mk_create(fmt, size, opts=None, io=None):
        def m(im, src):
            im.create(fmt, size, opts, fname=src)
            if io:
                im.io(fmt, io, fname=src, secret=(fmt == "luks"))

        return m

    def mk_bytes(data, desc):
        def m(im, src):
            im.py(desc, B.write, g.p(src), data)

        return m

    _truncate(g, cat, "qcow2", "t.qcow2", [3, 71, 103, 4096, 200000], mk_create("qcow2", 16 * M, None, "write -P 0x5a 0 64k"))
    _truncate(g, cat, "qcow2v2", "t.qcow2v2", [48, 71], mk_create("qcow2", 16 * M, "compat=0.10"))
    _truncate(g, cat, "qcow", "t.qcow", [20, 47], mk_create("qcow", 16 * M))
    _truncate(g, cat, "qed", "t.qed", [8, 63, 4096], mk_create("qed", 16 * M))
    _truncate(g, cat, "vmdk", "t.vmdk", [4, 76, 511], mk_create("vmdk", 16 * M))
    _truncate(g, cat, "vpc", "t.vpc", [100, 511, 1000, 1536], mk_bytes(vhd_dynamic(16 * M), "hand-built dynamic VHD of 16 MiB"))
    _truncate(g, cat, "vhdx", "t.vhdx", [8, 65536, 200000, 1048576], mk_create("vhdx", 16 * M), notes="source vhdx GUIDs vary")
    _truncate(g, cat, "vdi", "t.vdi", [64, 300, 399], mk_create("vdi", 16 * M), notes="source vdi UUIDs vary")
    _truncate(g, cat, "parallels", "t.hds", [16, 63], mk_create("parallels", 16 * M))
    _truncate(g, cat, "luks", "t.luks", [6, 200, 592, 4096], mk_create("luks", 1 * M, "key-secret=s0,iter-time=10"), notes="source LUKS salts vary")
    _truncate(g, cat, "cloop", "t.cloop", [100, 135, 140], mk_bytes(cloop([deflate(B.pattern(0x33, 64 * K))]), "hand-built cloop, one 64 KiB block"))
    _truncate(g, cat, "bochs", "t.bochs", [100, 600], mk_bytes(bochs(), "hand-built bochs redolog, 1032192 bytes"))
    d = dmg(deflate(B.pattern(0x44, 4096)), [mish([(UDZO, 0, 8, 0, len(deflate(B.pattern(0x44, 4096)))), (UDLE, 8, 0, 0, 0)])], 8)
    for c in (len(d) - 100, len(d) - 508, 400):
        id = f"trunc-dmg-{c}"
        with H(g, cat, id, f"{id}.dmg") as im:
            im.py(f"hand-built dmg (one zlib chunk), first {c} bytes", B.write, im.path, d[:c])


@group("absurd-virtual-size")
def g_absurd_size(g, cat):
    for label, v in (("2e63-512", (1 << 63) - 512), ("2e64-1", (1 << 64) - 1), ("2e63", 1 << 63), ("2e62", 1 << 62), ("odd", 1000001)):
        with H(g, cat, f"size-qcow2-{label}", f"size-qcow2-{label}.qcow2") as im:
            qcow2_base(im)
            im.py(f"set header size to {v:#x}", B.patch, im.path, B.Q2_SIZE, ">Q", v)
    with H(g, cat, "size-qcow2-v2-2e63", "size-qcow2-v2-2e63.qcow2") as im:
        qcow2_base(im, opts="compat=0.10")
        im.py("set header size to 2^63", B.patch, im.path, B.Q2_SIZE, ">Q", 1 << 63)
    with H(g, cat, "size-qcow1-2e63", "size-qcow1-2e63.qcow") as im:
        im.create("qcow", 16 * M)
        im.py("set header size (offset 24) to 2^63-512", B.patch, im.path, 24, ">Q", (1 << 63) - 512)
    with H(g, cat, "size-qed-huge", "size-qed-huge.qed") as im:
        im.create("qed", 16 * M)
        im.py("set image_size (offset 40) to 2^64-65536", B.patch, im.path, 40, "<Q", (1 << 64) - 65536)
    with H(g, cat, "size-vmdk-capacity", "size-vmdk-capacity.vmdk") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "size-vmdk-capacity.vmdk"'], "monolithicSparse"))
        im.py("set sparse header capacity (offset 12) to 2^62 sectors", B.patch, im.path, 12, "<Q", 1 << 62)
    with H(g, cat, "size-vmdk-flat-extent", "size-vmdk-flat-extent.vmdk") as im:
        im.py("descriptor with a FLAT extent of 2^62 sectors", B.write, im.path, vmdk_descriptor([f'RW {1 << 62} FLAT "/dev/null" 0', f'RW {1 << 62} FLAT "/dev/null" 0']))
    with H(g, cat, "size-vpc-huge", "size-vpc-huge.vhd") as im:
        im.py("hand-built dynamic VHD claiming 2^64-512 bytes (footer checksum valid)", B.write, im.path, vhd_dynamic((1 << 64) - 512, max_entries=4))
    with H(g, cat, "size-vpc-fixed-huge", "size-vpc-fixed-huge.vhd") as im:
        im.py("512 bytes of data + fixed VHD footer claiming 2^63 bytes", B.write, im.path, b"\0" * 512 + B.vhd_footer(1 << 63, 2, 0xFFFFFFFFFFFFFFFF))
    with H(g, cat, "size-vdi-huge", "size-vdi-huge.vdi", notes="UUIDs vary") as im:
        im.create("vdi", 4 * M)
        im.py("set disk_size (offset 368) to 2^63", B.patch, im.path, 368, "<Q", 1 << 63)
    with H(g, cat, "size-parallels-huge", "size-parallels-huge.hds") as im:
        im.create("parallels", 4 * M)
        im.py("set nb_sectors (offset 36) to 2^63-1", B.patch, im.path, 36, "<Q", (1 << 63) - 1)
    with H(g, cat, "size-vhdx-huge", "size-vhdx-huge.vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 16 * M)

        def fix():
            off, _ = vhdx_meta_item(im.path, META_VDISK_SIZE)
            B.patch(im.path, off, "<Q", (1 << 63) - 4096)

        im.py("set the Virtual Disk Size metadata item to 2^63-4096", fix)
    with H(g, cat, "size-bochs-huge", "size-bochs-huge.bochs") as im:
        im.py("bochs redolog with disk size 2^63", B.write, im.path, bochs(disk_size=1 << 63))
    with H(g, cat, "size-dmg-huge", "size-dmg-huge.dmg") as im:
        im.py("dmg with one zero chunk and total sectors 2^62", B.write, im.path, dmg(b"", [mish([(UDZE, 0, 1 << 62, 0, 0)])], 1 << 62))


@group("absurd-table-size")
def g_absurd_table(g, cat):
    for label, v in (("7fffffff", 0x7FFFFFFF), ("ffffffff", 0xFFFFFFFF), ("2e25", 1 << 25)):
        with H(g, cat, f"table-qcow2-l1-{label}", f"table-qcow2-l1-{label}.qcow2") as im:
            qcow2_base(im)
            im.py(f"set l1_size to {v:#x}", B.patch, im.path, B.Q2_L1_SIZE, ">I", v)
    with H(g, cat, "table-qcow2-l1-too-small", "table-qcow2-l1-too-small.qcow2") as im:
        qcow2_base(im, 4 * G)
        im.py("set l1_size to 0 for a 4 GiB image", B.patch, im.path, B.Q2_L1_SIZE, ">I", 0)
    for label, v in (("ffffffff", 0xFFFFFFFF), ("2e20", 1 << 20)):
        with H(g, cat, f"table-qcow2-rt-{label}", f"table-qcow2-rt-{label}.qcow2") as im:
            qcow2_base(im)
            im.py(f"set refcount_table_clusters to {v:#x}", B.patch, im.path, B.Q2_RT_CLUSTERS, ">I", v)
    with H(g, cat, "table-qed-table-size", "table-qed-table-size.qed") as im:
        im.create("qed", 16 * M)
        im.py("set table_size (offset 12) to 0x40000000", B.patch, im.path, 12, "<I", 0x40000000)
    with H(g, cat, "table-vdi-blocks", "table-vdi-blocks.vdi", notes="UUIDs vary") as im:
        im.create("vdi", 4 * M)
        im.py("set blocks_in_image (offset 384) to 0x7fffffff", B.patch, im.path, 384, "<I", 0x7FFFFFFF)
    with H(g, cat, "table-vpc-max-entries", "table-vpc-max-entries.vhd") as im:
        im.py("hand-built dynamic VHD of 16 MiB with max_table_entries 0xffffffff", B.write, im.path, vhd_dynamic(16 * M, max_entries=0xFFFFFFFF))
    with H(g, cat, "table-vhdx-region-count", "table-vhdx-region-count.vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 16 * M)
        im.py("set region table entry_count to 4096 in both tables (CRC-32C fixed)", vhdx_patch_rt, im.path, lambda rt: B.patch(im.path, rt + 8, "<I", 4096))
    with H(g, cat, "table-vhdx-bat-length", "table-vhdx-bat-length.vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 16 * M)

        def fix(rt):
            e, off, ln = vhdx_regions(im.path)[REGION_BAT]
            B.patch(im.path, e + 24, "<I", 0xFFF00000)

        im.py("set BAT region length to 0xfff00000 (CRC-32C fixed)", vhdx_patch_rt, im.path, fix)
    with H(g, cat, "table-parallels-bat", "table-parallels-bat.hds") as im:
        im.create("parallels", 4 * M)
        im.py("set bat_entries (offset 32) to 0xffffffff", B.patch, im.path, 32, "<I", 0xFFFFFFFF)
    with H(g, cat, "table-cloop-n-blocks", "table-cloop-n-blocks.cloop") as im:
        im.py("cloop with one real block but n_blocks 0x1fffffff", B.write, im.path, cloop([deflate(B.pattern(1, 64 * K))], n_blocks=0x1FFFFFFF))
    with H(g, cat, "table-cloop-n-blocks-max", "table-cloop-n-blocks-max.cloop") as im:
        im.py("cloop with n_blocks 0xffffffff", B.write, im.path, cloop([deflate(B.pattern(1, 64 * K))], n_blocks=0xFFFFFFFF))
    with H(g, cat, "table-dmg-chunks", "table-dmg-chunks.dmg") as im:
        chunks = [(UDZE, i, 1, 0, 0) for i in range(50000)]
        im.py("dmg whose mish block lists 50000 zero chunks", B.write, im.path, dmg(b"", [mish(chunks)], 50000))
    with H(g, cat, "table-dmg-chunk-count-lie", "table-dmg-chunk-count-lie.dmg") as im:
        im.py("dmg mish block with chunk count field 0xffffffff but one chunk", B.write, im.path, dmg(b"", [mish([(UDZE, 0, 8, 0, 0)], count_override=0xFFFFFFFF)], 8))
    with H(g, cat, "table-vmdk-gtes", "table-vmdk-gtes.vmdk") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "table-vmdk-gtes.vmdk"'], "monolithicSparse"))
        im.py("set numGTEsPerGT (offset 44) to 0x80000000", B.patch, im.path, 44, "<I", 0x80000000)
    with H(g, cat, "table-bochs-catalog", "table-bochs-catalog.bochs") as im:
        im.py("bochs header with catalog 0x7fffffff entries", B.write, im.path, bochs(catalog=0x7FFFFFFF, entries=512))


@group("cluster-bits-out-of-range")
def g_cluster_bits(g, cat):
    for v in (0, 8, 22, 31, 63, 0xFFFFFFFF):
        with H(g, cat, f"cbits-qcow2-{v}", f"cbits-qcow2-{v}.qcow2") as im:
            qcow2_base(im)
            im.py(f"set cluster_bits to {v}", B.patch, im.path, B.Q2_CLUSTER_BITS, ">I", v)
    for label, v in (("0", 0), ("3000", 3000), ("2e31", 1 << 31)):
        with H(g, cat, f"cbits-qed-{label}", f"cbits-qed-{label}.qed") as im:
            im.create("qed", 16 * M)
            im.py(f"set cluster_size (offset 8) to {v}", B.patch, im.path, 8, "<I", v)
    for label, v in (("0", 0), ("2e40", 1 << 40), ("3", 3)):
        with H(g, cat, f"cbits-vmdk-grain-{label}", f"cbits-vmdk-grain-{label}.vmdk") as im:
            vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor([f'RW 2048 SPARSE "cbits-vmdk-grain-{label}.vmdk"'], "monolithicSparse"))
            im.py(f"set grainSize (offset 20) to {v} sectors", B.patch, im.path, 20, "<Q", v)
    for label, v in (("0", 0), ("2e31", 1 << 31)):
        with H(g, cat, f"cbits-parallels-{label}", f"cbits-parallels-{label}.hds") as im:
            im.create("parallels", 4 * M)
            im.py(f"set tracks (cluster sectors, offset 28) to {v}", B.patch, im.path, 28, "<I", v)
    with H(g, cat, "cbits-vdi-block", "cbits-vdi-block.vdi", notes="UUIDs vary") as im:
        im.create("vdi", 4 * M)
        im.py("set block_size (offset 376) to 0x300000", B.patch, im.path, 376, "<I", 0x300000)
    with H(g, cat, "cbits-qcow1-8", "cbits-qcow1-8.qcow") as im:
        im.create("qcow", 4 * M)
        im.py("set cluster_bits (offset 32, u8) to 8", B.patch, im.path, 32, ">B", 8)
    with H(g, cat, "cbits-cloop-block", "cbits-cloop-block.cloop") as im:
        im.py("cloop with block_size 0x7ffffe00", B.write, im.path, cloop([deflate(B.pattern(1, 4096))], block_size=0x7FFFFE00))
    with H(g, cat, "cbits-bochs-extent0", "cbits-bochs-extent0.bochs") as im:
        im.py("bochs with extent size 0", B.write, im.path, bochs(extent=0))


@group("refcount-order-out-of-range")
def g_refcount_order(g, cat):
    for v in (7, 8, 64, 0xFFFFFFFF):
        with H(g, cat, f"rorder-{v}", f"rorder-{v}.qcow2") as im:
            qcow2_base(im)
            im.py(f"set refcount_order to {v}", B.patch, im.path, B.Q2_REFCOUNT_ORDER, ">I", v)
    with H(g, cat, "rorder-6-c512", "rorder-6-c512.qcow2", notes="refcount_order 6 is legal but 64-bit refcounts with 512-byte clusters") as im:
        qcow2_base(im, opts="cluster_size=512")
        im.py("set refcount_order to 6 without rewriting the refcount blocks", B.patch, im.path, B.Q2_REFCOUNT_ORDER, ">I", 6)


@group("tables-past-eof")
def g_past_eof(g, cat):
    T = 1 << 40
    patches = [
        ("eof-qcow2-l1", B.Q2_L1_OFFSET, ">Q", T, "l1_table_offset"),
        ("eof-qcow2-rt", B.Q2_RT_OFFSET, ">Q", T, "refcount_table_offset"),
        ("eof-qcow2-l1-unaligned", B.Q2_L1_OFFSET, ">Q", 0x10008, "l1_table_offset (unaligned)"),
        ("eof-qcow2-l1-2e63", B.Q2_L1_OFFSET, ">Q", 1 << 63, "l1_table_offset"),
    ]
    for id, off, fmt, v, what in patches:
        with H(g, cat, id, id + ".qcow2") as im:
            qcow2_base(im)
            im.py(f"set {what} to {v:#x}", B.patch, im.path, off, fmt, v)

    def l1_past(path):
        q = B.Qcow2(path)
        B.patch(path, q.l1_offset, ">Q", (1 << 63) | (T))

    with H(g, cat, "eof-qcow2-l1-entry", "eof-qcow2-l1-entry.qcow2") as im:
        qcow2_base(im)
        im.py("L1 entry 0 -> 1 TiB (past EOF)", l1_past, im.path)

    def l2_past(path):
        q = B.Qcow2(path)
        B.patch(path, q.l2_entry_offset(0), ">Q", (1 << 63) | T)

    with H(g, cat, "eof-qcow2-l2-entry", "eof-qcow2-l2-entry.qcow2") as im:
        qcow2_base(im)
        im.py("L2 entry of guest cluster 0 -> 1 TiB (past EOF)", l2_past, im.path)

    def rb_past(path):
        q = B.Qcow2(path)
        B.patch(path, q.rt_offset, ">Q", T)

    with H(g, cat, "eof-qcow2-refblock", "eof-qcow2-refblock.qcow2") as im:
        qcow2_base(im)
        im.py("refcount table entry 0 -> 1 TiB (past EOF)", rb_past, im.path)
    with H(g, cat, "eof-qcow2-snapshots", "eof-qcow2-snapshots.qcow2") as im:
        qcow2_base(im)
        im.py("nb_snapshots 1, snapshots_offset 1 TiB", B.patch, im.path, B.Q2_NB_SNAPSHOTS, ">IQ", 1, T)
    with H(g, cat, "eof-qed-l1", "eof-qed-l1.qed") as im:
        im.create("qed", 16 * M)
        im.py("set l1_table_offset (offset 32) to 1 TiB", B.patch, im.path, 32, "<Q", T)
    with H(g, cat, "eof-vmdk-gd", "eof-vmdk-gd.vmdk") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "eof-vmdk-gd.vmdk"'], "monolithicSparse"))
        im.py("set gdOffset and rgdOffset to 2^31 sectors", B.patch, im.path, 48, "<QQ", 1 << 31, 1 << 31)
    with H(g, cat, "eof-vpc-bat", "eof-vpc-bat.vhd") as im:
        im.py("hand-built dynamic VHD with BAT offset 1 TiB", B.write, im.path, vhd_dynamic(16 * M, table_offset=T))
    with H(g, cat, "eof-vdi-bmap", "eof-vdi-bmap.vdi", notes="UUIDs vary") as im:
        im.create("vdi", 4 * M)
        im.py("set offset_bmap (offset 340) to 0xfffff000", B.patch, im.path, 340, "<I", 0xFFFFF000)
    with H(g, cat, "eof-parallels-data", "eof-parallels-data.hds") as im:
        im.create("parallels", 4 * M)
        im.py("set data_off (offset 48) to 0xffffff00 sectors", B.patch, im.path, 48, "<I", 0xFFFFFF00)
    with H(g, cat, "eof-vhdx-bat", "eof-vhdx-bat.vhdx", notes="GUIDs vary") as im:
        im.create("vhdx", 16 * M)

        def fix(rt):
            e, off, ln = vhdx_regions(im.path)[REGION_BAT]
            B.patch(im.path, e + 16, "<Q", 1 << 40)

        im.py("move the BAT region to 1 TiB in both region tables (CRC-32C fixed)", vhdx_patch_rt, im.path, fix)
    with H(g, cat, "eof-cloop-offsets", "eof-cloop-offsets.cloop") as im:
        im.py("cloop whose block offsets point at 1 TiB", B.write, im.path, cloop([deflate(B.pattern(1, 64 * K))], offsets=[T, T + 100]))
    with H(g, cat, "eof-dmg-chunk", "eof-dmg-chunk.dmg") as im:
        im.py("dmg zlib chunk at data fork offset 1 TiB", B.write, im.path, dmg(b"", [mish([(UDZO, 0, 8, T, 100)])], 8))
    with H(g, cat, "eof-bochs-catalog", "eof-bochs-catalog.bochs") as im:
        im.py("bochs with header size 0x7fff0000 (catalog past EOF)", B.write, im.path, bochs(header=0x7FFF0000))


def _qcow2_compressed_bomb(path, bomb, claim_sectors=None):
    q = B.Qcow2(path)
    off = B.append(path, b"\0" * ((-os.path.getsize(path)) % 512))
    pos = B.append(path, bomb)
    x = 62 - (q.cluster_bits - 8)
    nsec = claim_sectors if claim_sectors is not None else (len(bomb) + 511) // 512 - 1
    nsec = min(nsec, (1 << (q.cluster_bits - 8)) - 1)
    desc = (1 << 62) | (nsec << x) | pos
    B.patch(path, q.l2_entry_offset(0), ">Q", desc)


@group("compression-bomb")
def g_bomb(g, cat):
    raw64m = zero_bomb(64 * M)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    rawdef = co.compress(bytes(64 * M)) + co.flush()
    with H(g, cat, "bomb-qcow2-deflate", "bomb-qcow2-deflate.qcow2", notes="compressed cluster inflates to 64 MiB in a 64 KiB cluster") as im:
        qcow2_base(im, data=False)
        im.io("qcow2", "write -c -P 0x5a 0 64k")
        im.py("append a raw-deflate stream of 64 MiB zeros and point guest cluster 0's compressed descriptor at it", _qcow2_compressed_bomb, im.path, rawdef)
    with H(g, cat, "bomb-qcow2-claim-max", "bomb-qcow2-claim-max.qcow2", notes="compressed descriptor claims the maximum sector count") as im:
        qcow2_base(im, data=False)
        im.io("qcow2", "write -c -P 0x5a 0 64k")
        im.py("compressed descriptor of guest cluster 0: max additional sectors, data at EOF", _qcow2_compressed_bomb, im.path, rawdef[:600], 255)
    with H(g, cat, "bomb-qcow2-c2M", "bomb-qcow2-c2M.qcow2", notes="2 MiB clusters: inflates to 64 MiB") as im:
        qcow2_base(im, opts="cluster_size=2M", data=False)
        im.io("qcow2", "write -c -P 0x5a 0 2M")
        im.py("point guest cluster 0 at a raw-deflate stream of 64 MiB zeros", _qcow2_compressed_bomb, im.path, rawdef)
    with H(g, cat, "bomb-qcow2-zstd-type-zlib-data", "bomb-qcow2-zstd-zlib.qcow2", notes="compression type zstd, payload is deflate") as im:
        qcow2_base(im, opts="compression_type=zstd", data=False)
        im.io("qcow2", "write -c -P 0x5a 0 64k")
        im.py("replace guest cluster 0's compressed payload by a raw-deflate bomb", _qcow2_compressed_bomb, im.path, rawdef)
    with H(g, cat, "bomb-cloop", "bomb-cloop.cloop", notes="64 KiB block size, block inflates to 64 MiB") as im:
        im.py("cloop, block_size 64 KiB, one block = zlib stream of 64 MiB zeros", B.write, im.path, cloop([raw64m]))
    with H(g, cat, "bomb-cloop-many", "bomb-cloop-many.cloop", notes="16 blocks, each the same 64 MiB bomb") as im:
        im.py("cloop with 16 blocks, each a zlib stream of 64 MiB zeros", B.write, im.path, cloop([raw64m] * 16))
    with H(g, cat, "bomb-dmg-zlib", "bomb-dmg-zlib.dmg", notes="zlib chunk claims 2048 sectors, inflates to 64 MiB") as im:
        im.py("dmg, one UDZO chunk of 2048 sectors whose data inflates to 64 MiB", B.write, im.path, dmg(raw64m, [mish([(UDZO, 0, 2048, 0, len(raw64m))])], 2048))
    for label, flags in (("marker", (1 << 16) | (1 << 17)), ("nomarker", 1 << 16)):
        id = f"bomb-vmdk-{label}"
        with H(g, cat, id, id + ".vmdk", notes="sparse vmdk flagged compressed; grain 0 inflates to 64 MiB in a 64 KiB grain") as im:
            im.create("vmdk", 1 * M, "subformat=monolithicSparse")
            im.io("vmdk", "write -P 0x5a 0 64k")
            desc = vmdk_descriptor([f'RW 2048 SPARSE "{id}.vmdk"'], "monolithicSparse")
            im.py(f"set header flags {flags:#x} and compressAlgorithm 1; put a zlib stream of 64 MiB zeros at grain 0", _vmdk_bomb, im.path, desc, flags, raw64m)
    bzb = bz2.compress(bytes(64 * M), 9)
    with H(g, cat, "bomb-dmg-bzip2", "bomb-dmg-bzip2.dmg", notes="bzip2 chunk inflates to 64 MiB") as im:
        im.py("dmg, one UDBZ chunk of 2048 sectors whose data expands to 64 MiB", B.write, im.path, dmg(bzb, [mish([(UDBZ, 0, 2048, 0, len(bzb))])], 2048))
    with H(g, cat, "bomb-dmg-sector-claim", "bomb-dmg-sector-claim.dmg", notes="zlib chunk claims 2^31 sectors") as im:
        d = deflate(bytes(4096))
        im.py("dmg, one UDZO chunk claiming 2^31 sectors", B.write, im.path, dmg(d, [mish([(UDZO, 0, 1 << 31, 0, len(d))])], 1 << 31))
    with H(g, cat, "bomb-dmg-length-claim", "bomb-dmg-length-claim.dmg", notes="chunk length 2^40") as im:
        d = deflate(bytes(4096))
        im.py("dmg, one UDZO chunk claiming 2^40 compressed bytes", B.write, im.path, dmg(d, [mish([(UDZO, 0, 8, 0, 1 << 40)])], 8))


def _vmdk_bomb(path, desc, flags, bomb):
    doff, dsize = B.get(path, 28, "<QQ")
    B.patch_bytes(path, doff * 512, desc + b"\0" * (dsize * 512 - len(desc)))
    B.patch(path, 8, "<I", flags)
    B.patch(path, 77, "<H", 1)
    gd = B.get(path, 56, "<Q")[0]
    gt = B.get(path, gd * 512, "<I")[0]
    grain = B.get(path, gt * 512, "<I")[0]
    head = struct.pack("<QI", 0, len(bomb)) if flags & (1 << 17) else b""
    B.patch_bytes(path, grain * 512, head + bomb)


def _vmdk_desc_file(im, text):
    B.write(im.path, text)


@group("polyglot")
def g_polyglot(g, cat):
    def qcow2_hdr_bytes(backing=b""):
        # A minimal v2 qcow2 header: 1 MiB, 64 KiB clusters, L1 at 0x10000,
        # refcount table at 0x20000. Only the header matters to probing.
        h = struct.pack(">4sIQIIQIIQQIIQ", B.QCOW2_MAGIC, 2, 72 if backing else 0, len(backing), 16, 1 * M, 0, 1, 0x10000, 0x20000, 1, 0, 0)
        return h + backing

    with H(g, cat, "poly-mbr-qcow2-at-512", "poly-mbr-qcow2-at-512.img", notes="raw disk with an MBR and a qcow2 header in sector 1") as im:
        im.py("1 MiB: MBR at 0, qcow2 header (backing /etc/passwd) at 512", B.write_sparse, im.path, 1 * M, [(0, B.mbr([(0x83, 1, 2047, True)])), (512, qcow2_hdr_bytes(b"/etc/passwd"))])
    with H(g, cat, "poly-raw-is-qcow2", "poly-raw-is-qcow2.img", notes="a 'raw' guest disk whose first sector is a qcow2 header with backing /etc/passwd") as im:
        im.py("1 MiB raw file starting with a qcow2 v2 header naming /etc/passwd", B.write_sparse, im.path, 1 * M, [(0, qcow2_hdr_bytes(b"/etc/passwd"))])
    with H(g, cat, "poly-qcow2-with-vmdk-descriptor", "poly-qcow2-vmdk.qcow2", notes="qcow2 whose unknown header extension holds a vmdk descriptor") as im:
        qcow2_base(im)
        im.py("add unknown header extension 0x12345678 holding a vmdk text descriptor", set_ext, im.path, 0x12345678, vmdk_descriptor(['RW 16 FLAT "/etc/passwd" 0']))
    with H(g, cat, "poly-qcow2-vhd-footer", "poly-qcow2-vhd-footer.qcow2", notes="qcow2 with a fixed-VHD footer appended") as im:
        qcow2_base(im)

        def add_footer():
            size = os.path.getsize(im.path)
            B.append(im.path, b"\0" * ((-size) % 512))
            B.append(im.path, B.vhd_footer(os.path.getsize(im.path), 2, 0xFFFFFFFFFFFFFFFF))

        im.py("append a fixed VHD footer covering the whole file", add_footer)
    with H(g, cat, "poly-vhd-fixed-holding-qcow2", "poly-vhd-fixed-qcow2.vhd", notes="fixed VHD whose data starts with a qcow2 header") as im:
        im.py("64 KiB: qcow2 header (backing /etc/passwd) + zeros + fixed VHD footer", B.write, im.path, (qcow2_hdr_bytes(b"/etc/passwd") + bytes(64 * K))[: 64 * K] + B.vhd_footer(64 * K, 2, 0xFFFFFFFFFFFFFFFF))
    with H(g, cat, "poly-vmdk-descriptor-qcow2-magic", "poly-vmdk-qcow2-magic.vmdk", notes="vmdk text descriptor preceded by qcow2 magic") as im:
        im.py("qcow2 header bytes followed by a vmdk descriptor text", B.write, im.path, qcow2_hdr_bytes() + b"\n" + vmdk_descriptor(['RW 16 FLAT "/etc/passwd" 0']))
    with H(g, cat, "poly-vdi-description-vmdk", "poly-vdi-description.vdi", notes="UUIDs vary") as im:
        im.create("vdi", 1 * M)
        im.py("put '# Disk DescriptorFile' text in the 256-byte VDI description", B.patch_bytes, im.path, 84, b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 16 FLAT \"/etc/passwd\" 0\n")
    with H(g, cat, "poly-gpt-partition-qcow2", "poly-gpt-partition-qcow2.img", notes="GPT disk whose first partition holds a qcow2 header naming /etc/passwd") as im:
        primary, backup, boff = B.gpt(4096, [(B.GPT_LINUX, 2048, 4061, "qcow2-inside")])
        im.py("2 MiB GPT disk; partition 1 @2048 starts with a qcow2 header", B.write_sparse, im.path, 4096 * 512, [(0, primary), (boff, backup), (2048 * 512, qcow2_hdr_bytes(b"/etc/passwd"))])
    with H(g, cat, "poly-luks-qcow2-payload", "poly-luks-qcow2-payload.luks", notes="LUKS salts vary") as im:
        im.create("luks", 1 * M, "key-secret=s0,iter-time=10")

        def put():
            B.patch_bytes(im.path, 4096, qcow2_hdr_bytes(b"/etc/passwd"))

        im.py("write a plaintext qcow2 header at offset 4096 (inside the LUKS key material)", put)
    with H(g, cat, "poly-vmdk-kdmv-and-conectix", "poly-kdmv-conectix.vmdk", notes="sparse vmdk with a VHD footer appended") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "poly-kdmv-conectix.vmdk"'], "monolithicSparse"))
        im.py("append a dynamic-VHD-typed footer", lambda: B.append(im.path, B.vhd_footer(1 * M, 3, 0)))


@group("vhd-parent-locator")
def g_vhd_locator(g, cat):
    def locs(entries):
        """entries: [(code, bytes)] placed from 0x1000 on, 512-aligned."""
        out, data, off = [], [], 4096
        for code, b in entries:
            space = max(512, (len(b) + 511) // 512 * 512)
            out.append((code, space, len(b), off))
            data.append((off, b))
            off += space
        return out, data

    cases = [
        ("vhdloc-w2ku-passwd", "/etc/passwd", [(b"W2ku", "/etc/passwd".encode("utf-16-le")), (b"W2ru", "..\\..\\..\\etc\\passwd".encode("utf-16-le"))]),
        ("vhdloc-macx-passwd", "passwd", [(b"MacX", b"file:///etc/passwd")]),
        ("vhdloc-w2ru-dotdot", "..\\..\\..\\..\\etc\\shadow", [(b"W2ru", "..\\..\\..\\..\\etc\\shadow".encode("utf-16-le"))]),
        ("vhdloc-self", "vhdloc-self.vhd", [(b"W2ru", "vhdloc-self.vhd".encode("utf-16-le"))]),
    ]
    for id, pname, ent in cases:
        L, D = locs(ent)
        with H(g, cat, id, id + ".vhd", notes=f"differencing VHD, parent name {pname!r}") as im:
            im.py(f"hand-built differencing VHD (16 MiB), parent name {pname!r}, locators {[c.decode() for c, _ in ent]}", B.write, im.path, vhd_dynamic(16 * M, disk_type=4, parent_name=pname, locators=L, loc_data=D, parent_uuid=b"\x33" * 16))
    with H(g, cat, "vhdloc-offset-past-eof", "vhdloc-offset-past-eof.vhd") as im:
        im.py("differencing VHD with a W2ku locator at offset 2^60, length 0xffffffff", B.write, im.path, vhd_dynamic(16 * M, disk_type=4, parent_name="/etc/passwd", locators=[(b"W2ku", 0xFFFFFFFF, 0xFFFFFFFF, 1 << 60)]))
    with H(g, cat, "vhdloc-overlap-header", "vhdloc-overlap-header.vhd") as im:
        im.py("differencing VHD with a locator pointing into its own dynamic header", B.write, im.path, vhd_dynamic(16 * M, disk_type=4, parent_name="x", locators=[(b"W2ku", 512, 1024, 512)] * 8))
    with H(g, cat, "vhdloc-dynamic-with-locators", "vhdloc-dynamic-with-locators.vhd", notes="disk type dynamic (3) but parent fields filled") as im:
        L, D = locs([(b"W2ku", "/etc/passwd".encode("utf-16-le"))])
        im.py("dynamic VHD (type 3) carrying a parent name and W2ku locator", B.write, im.path, vhd_dynamic(16 * M, disk_type=3, parent_name="/etc/passwd", locators=L, loc_data=D))


@group("vmdk-descriptor-attack")
def g_vmdk_desc(g, cat):
    shared_flat(g, cat, "vdesc-one-flat", "one.flat")
    with H(g, cat, "vdesc-huge-comments", "vdesc-huge-comments.vmdk", notes="11 MiB descriptor, mostly comments") as im:
        body = vmdk_descriptor(['RW 2048 FLAT "one.flat" 0'])
        pad = (b"# " + b"x" * 60 + b"\n") * (11 * M // 63)
        im.py("descriptor + 11 MiB of comment lines", B.write, im.path, body + pad)
    # qemu-img's extent handling is quadratic: 1000 extents take ~1 s,
    # 2000 ~8 s, 5000 time out; 1000 keeps the suite fast.
    with H(g, cat, "vdesc-thousands-extents", "vdesc-thousands-extents.vmdk", notes="1000 extents sharing one.flat; qemu-img time grows quadratically with the count") as im:
        im.py("descriptor listing 1000 FLAT extents of 1 sector each on one.flat", B.write, im.path, vmdk_descriptor([f'RW 1 FLAT "one.flat" {i % 2048}' for i in range(1000)]))
    with H(g, cat, "vdesc-nul-bytes", "vdesc-nul-bytes.vmdk") as im:
        im.py("descriptor with NUL bytes inside the extent line and createType", B.write, im.path, vmdk_descriptor(['RW 2048 FLAT "one\0.flat" 0'], "monolithic\0Flat"))
    with H(g, cat, "vdesc-long-line", "vdesc-long-line.vmdk", notes="1 MiB file name in an extent line") as im:
        im.py("extent whose file name is 1 MiB of 'a'", B.write, im.path, vmdk_descriptor(['RW 2048 FLAT "' + "a" * M + '" 0']))
    with H(g, cat, "vdesc-long-createtype", "vdesc-long-createtype.vmdk") as im:
        im.py("createType of 100000 characters", B.write, im.path, vmdk_descriptor(['RW 2048 FLAT "one.flat" 0'], "x" * 100000))
    for label, ct in (("streamOptimized", "streamOptimized"), ("monolithicSparse", "monolithicSparse"), ("vmfsRaw", "vmfsRaw"), ("unknown", "doesNotExist"), ("twoGbMaxExtentSparse", "twoGbMaxExtentSparse")):
        with H(g, cat, f"vdesc-createtype-lie-{label}", f"vdesc-createtype-lie-{label}.vmdk", notes=f"createType {ct} over a FLAT extent") as im:
            im.py(f"descriptor createType={ct} with one FLAT extent", B.write, im.path, vmdk_descriptor(['RW 2048 FLAT "one.flat" 0'], ct))
    with H(g, cat, "vdesc-no-extents", "vdesc-no-extents.vmdk") as im:
        im.py("descriptor without extent lines", B.write, im.path, vmdk_descriptor([]))
    with H(g, cat, "vdesc-zero-sectors", "vdesc-zero-sectors.vmdk") as im:
        im.py("extent of 0 sectors", B.write, im.path, vmdk_descriptor(['RW 0 FLAT "one.flat" 0']))
    with H(g, cat, "vdesc-negative", "vdesc-negative.vmdk") as im:
        im.py("extent with negative sectors and offset", B.write, im.path, vmdk_descriptor(['RW -2048 FLAT "one.flat" -1']))
    with H(g, cat, "vdesc-offset-past-eof", "vdesc-offset-past-eof.vmdk") as im:
        im.py("FLAT extent starting at sector 2^60", B.write, im.path, vmdk_descriptor([f'RW 2048 FLAT "one.flat" {1 << 60}']))
    with H(g, cat, "vdesc-bad-cid", "vdesc-bad-cid.vmdk") as im:
        im.py("CID=zzzz, parentCID=-1 (non-hex values)", B.write, im.path, vmdk_descriptor(['RW 2048 FLAT "one.flat" 0'], cid="zzzz", parent_cid="-1"))
    with H(g, cat, "vdesc-unterminated-quote", "vdesc-unterminated-quote.vmdk") as im:
        im.py("extent line with an unterminated quote", B.write, im.path, vmdk_descriptor(['RW 2048 FLAT "one.flat 0']))
    with H(g, cat, "vdesc-embedded-size-huge", "vdesc-embedded-size-huge.vmdk") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 SPARSE "vdesc-embedded-size-huge.vmdk"'], "monolithicSparse"))
        im.py("set descriptorSize (offset 36) to 2^40 sectors", B.patch, im.path, 36, "<Q", 1 << 40)
    with H(g, cat, "vdesc-embedded-self-flat", "vdesc-embedded-self-flat.vmdk") as im:
        vmdk_sparse_with_descriptor(im, 1 * M, vmdk_descriptor(['RW 2048 FLAT "vdesc-embedded-self-flat.vmdk" 0'], "monolithicFlat"))
    with H(g, cat, "vdesc-binary-junk", "vdesc-binary-junk.vmdk", notes="starts like a descriptor, then binary") as im:
        im.py("'# Disk DescriptorFile' followed by 64 KiB of 0xff..0x00 bytes", B.write, im.path, b"# Disk DescriptorFile\n" + bytes(range(256))[::-1] * 256)
    link_shared(g, "vdesc-one-flat", "one.flat")


def _snap_entry(l1_off, l1_size, id_str, name, extra=b"", vm_state=0, date=(0, 0), clock=0, id_size=None, name_size=None, extra_size=None):
    e = struct.pack(
        ">QIHHIIQII",
        l1_off,
        l1_size,
        len(id_str) if id_size is None else id_size,
        len(name) if name_size is None else name_size,
        date[0],
        date[1],
        clock,
        vm_state,
        len(extra) if extra_size is None else extra_size,
    )
    e += extra + id_str + name
    return e + b"\0" * ((-len(e)) % 8)


def _snap_table(path, entries, nb=None, offset_adjust=0):
    q = B.Qcow2(path)
    size = os.path.getsize(path)
    pad = (-size) % q.cluster_size
    B.append(path, b"\0" * pad)
    table = b"".join(entries(q))
    table += b"\0" * ((-len(table)) % q.cluster_size)
    pos = B.append(path, table)
    B.patch(path, B.Q2_NB_SNAPSHOTS, ">IQ", len(entries(q)) if nb is None else nb, pos + offset_adjust)


def _extra(q):
    return struct.pack(">QQ", 0, q.size)


@group("snapshot-table-attack")
def g_snap(g, cat):
    def one(q, **kw):
        return [_snap_entry(q.l1_offset, q.l1_size, b"1", b"snap", _extra(q), **kw)]

    cases = [
        ("snap-valid-handmade", "one well-formed snapshot entry (reference)", lambda q: one(q), {}),
        ("snap-count-ffffffff", "nb_snapshots 0xffffffff over one entry", lambda q: one(q), {"nb": 0xFFFFFFFF}),
        ("snap-count-65537", "nb_snapshots 65537 over one entry", lambda q: one(q), {"nb": 65537}),
        ("snap-offset-unaligned", "snapshots_offset not cluster aligned", lambda q: one(q), {"offset_adjust": 8}),
        ("snap-id-size-huge", "id_str_size 65535 (runs past the table)", lambda q: [_snap_entry(q.l1_offset, q.l1_size, b"1", b"s", _extra(q), id_size=65535)], {}),
        ("snap-name-size-huge", "name_size 65535", lambda q: [_snap_entry(q.l1_offset, q.l1_size, b"1", b"s", _extra(q), name_size=65535)], {}),
        ("snap-extra-size-huge", "extra_data_size 0xffffffff", lambda q: [_snap_entry(q.l1_offset, q.l1_size, b"1", b"s", _extra(q), extra_size=0xFFFFFFFF)], {}),
        ("snap-l1-size-huge", "snapshot l1_size 0x7fffffff", lambda q: [_snap_entry(q.l1_offset, 0x7FFFFFFF, b"1", b"s", _extra(q))], {}),
        ("snap-l1-past-eof", "snapshot l1_table_offset 1 TiB", lambda q: [_snap_entry(1 << 40, q.l1_size, b"1", b"s", _extra(q))], {}),
        ("snap-l1-unaligned", "snapshot l1_table_offset unaligned", lambda q: [_snap_entry(q.l1_offset + 8, q.l1_size, b"1", b"s", _extra(q))], {}),
        ("snap-duplicate-ids", "two snapshots with the same id and name", lambda q: one(q) * 2, {}),
        ("snap-many-1000", "1000 well-formed entries sharing the active L1", lambda q: [_snap_entry(q.l1_offset, q.l1_size, str(i).encode(), f"s{i}".encode(), _extra(q)) for i in range(1000)], {}),
        ("snap-fields-max", "vm_state_size, dates and vm clock at their maxima", lambda q: [_snap_entry(q.l1_offset, q.l1_size, b"1", b"max", struct.pack(">QQ", (1 << 64) - 1, (1 << 64) - 1), vm_state=0xFFFFFFFF, date=(0xFFFFFFFF, 0xFFFFFFFF), clock=(1 << 64) - 1)], {}),
        ("snap-no-extra-v3", "v3 entry with extra_data_size 0", lambda q: [_snap_entry(q.l1_offset, q.l1_size, b"1", b"s")], {}),
        ("snap-name-nonutf8", "snapshot name with invalid UTF-8 and control bytes", lambda q: [_snap_entry(q.l1_offset, q.l1_size, b"\xff\x01", b"\xc3\x28\x1b[31mred\x00x", _extra(q))], {}),
    ]
    for id, desc, fn, kw in cases:
        with H(g, cat, id, id + ".qcow2", notes=desc) as im:
            qcow2_base(im)
            im.py(f"append a snapshot table: {desc}", _snap_table, im.path, fn, kw.get("nb"), kw.get("offset_adjust", 0))
    with H(g, cat, "snap-table-size-limit", "snap-table-size-limit.qcow2", notes="nb_snapshots 65536 with a tiny table") as im:
        qcow2_base(im)
        im.py("nb_snapshots 65536, snapshots_offset 0x10000 (the L1/refcount area)", B.patch, im.path, B.Q2_NB_SNAPSHOTS, ">IQ", 65536, 0x10000)


def _bm_ext(path):
    q = B.Qcow2(path)
    for t, d in q.exts:
        if t == B.EXT_BITMAPS:
            return q, struct.unpack(">IIQQ", d[:24])
    raise KeyError("no bitmaps extension")


def _bm_patch_ext(path, nb=None, dir_size=None, dir_off=None):
    q, (n, r, sz, off) = _bm_ext(path)
    data = struct.pack(">IIQQ", n if nb is None else nb, r, sz if dir_size is None else dir_size, off if dir_off is None else dir_off)
    set_ext(path, B.EXT_BITMAPS, data)


def _bm_patch_entry(path, rel_off, fmt, value):
    q, (n, r, sz, off) = _bm_ext(path)
    B.patch(path, off + rel_off, fmt, value)


@group("bitmap-directory-attack")
def g_bitmaps(g, cat):
    def base(im):
        qcow2_base(im)
        im.run(QEMU_IMG, "bitmap", "--add", im.fname, "bm0")

    ext_cases = [
        ("bm-count-65536", "nb_bitmaps 65536", {"nb": 65536}),
        ("bm-count-ffffffff", "nb_bitmaps 0xffffffff", {"nb": 0xFFFFFFFF}),
        ("bm-count-0", "nb_bitmaps 0 with the extension present", {"nb": 0}),
        ("bm-dir-size-huge", "bitmap_directory_size 2^40", {"dir_size": 1 << 40}),
        ("bm-dir-size-small", "bitmap_directory_size 8 (shorter than one entry)", {"dir_size": 8}),
        ("bm-dir-past-eof", "bitmap_directory_offset 1 TiB", {"dir_off": 1 << 40}),
        ("bm-dir-unaligned", "bitmap_directory_offset unaligned", {"dir_off": 0x10008}),
    ]
    for id, desc, kw in ext_cases:
        with H(g, cat, id, id + ".qcow2", notes=desc) as im:
            base(im)
            im.py(f"bitmaps extension: {desc}", _bm_patch_ext, im.path, kw.get("nb"), kw.get("dir_size"), kw.get("dir_off"))
    entry_cases = [
        ("bm-name-size-0", "name_size 0", 18, ">H", 0),
        ("bm-name-size-huge", "name_size 65535", 18, ">H", 65535),
        ("bm-granularity-0", "granularity_bits 0", 17, ">B", 0),
        ("bm-granularity-63", "granularity_bits 63", 17, ">B", 63),
        ("bm-type-2", "bitmap type 2", 16, ">B", 2),
        ("bm-flags-unknown", "unknown flag bits 0xfffffffc", 12, ">I", 0xFFFFFFFC | 2),
        ("bm-flags-in-use", "in-use flag set (stale bitmap)", 12, ">I", 3),
        ("bm-table-size-huge", "bitmap_table_size 0x7fffffff", 8, ">I", 0x7FFFFFFF),
        ("bm-table-past-eof", "bitmap_table_offset 1 TiB", 0, ">Q", 1 << 40),
        ("bm-extra-size-huge", "extra_data_size 0xffffffff", 20, ">I", 0xFFFFFFFF),
    ]
    for id, desc, off, fmt, v in entry_cases:
        with H(g, cat, id, id + ".qcow2", notes=desc) as im:
            base(im)
            im.py(f"bitmap directory entry 0: {desc}", _bm_patch_entry, im.path, off, fmt, v)
    with H(g, cat, "bm-autoclear-clear", "bm-autoclear-clear.qcow2", notes="extension present, autoclear bit 0 clear: must be ignored") as im:
        base(im)
        im.py("clear autoclear_features", B.patch, im.path, B.Q2_AUTOCLEAR, ">Q", 0)
    with H(g, cat, "bm-v2-extension", "bm-v2-extension.qcow2", notes="bitmaps extension inside a v2 image") as im:
        qcow2_base(im, opts="compat=0.10")
        im.py("add a bitmaps extension (1 bitmap, directory at 0x10000) to a v2 image", set_ext, im.path, B.EXT_BITMAPS, struct.pack(">IIQQ", 1, 0, 32, 0x10000))


@group("header-extension-overflow")
def g_hdr_ext(g, cat):
    with H(g, cat, "hext-len-ffffffff", "hext-len-ffffffff.qcow2") as im:
        qcow2_base(im)
        im.py("unknown extension 0x12345678 with length field 0xffffffff", set_ext, im.path, 0x12345678, b"abcdefgh", 0xFFFFFFFF)
    with H(g, cat, "hext-len-past-cluster", "hext-len-past-cluster.qcow2") as im:
        qcow2_base(im)
        im.py("unknown extension with length 70000 (past the 64 KiB header cluster)", set_ext, im.path, 0x12345678, b"abcdefgh", 70000)
    with H(g, cat, "hext-many", "hext-many.qcow2", notes="7000 empty unknown extensions") as im:
        qcow2_base(im)

        def many():
            q = B.Qcow2(im.path)
            q.rewrite_exts([(0x10000000 + i, b"") for i in range(7000)])

        im.py("7000 zero-length unknown extensions", many)
    with H(g, cat, "hext-no-end", "hext-no-end.qcow2", notes="extensions fill the cluster without an end marker") as im:
        qcow2_base(im)

        def noend():
            q = B.Qcow2(im.path)
            room = q.cluster_size - q.header_length
            n = room // 8
            B.patch_bytes(im.path, q.header_length, struct.pack(">II", 0x77777777, 0) * n)

        im.py("fill the header cluster with 8-byte unknown extensions, no end marker", noend)
    with H(g, cat, "hext-backing-fmt-long", "hext-backing-fmt-long.qcow2") as im:
        qcow2_base(im, 1 * M, data=False)
        im.py("backing /etc/passwd with a 2000-byte backing-format extension", set_backing, im.path, "/etc/passwd", "r" * 2000)
    with H(g, cat, "hext-backing-fmt-len-lie", "hext-backing-fmt-len-lie.qcow2") as im:
        qcow2_base(im, 1 * M, data=False)

        def fix():
            set_backing(im.path, "base.raw", "raw")
            set_ext(im.path, B.EXT_BACKING_FORMAT, b"raw", 0xFFFFFF00)

        im.py("backing-format extension with length 0xffffff00", fix)
    with H(g, cat, "hext-feature-table-huge", "hext-feature-table-huge.qcow2") as im:
        qcow2_base(im)
        im.py("feature-name table extension with length 0xffff00", set_ext, im.path, B.EXT_FEATURE_TABLE, b"\0" * 48, 0xFFFF00)
    with H(g, cat, "hext-datafile-len-lie", "hext-datafile-len-lie.qcow2") as im:
        qcow2_base(im)
        im.py("data-file extension with length 0xffffffff", set_ext, im.path, B.EXT_DATA_FILE, b"/etc/passwd", 0xFFFFFFFF)
    with H(g, cat, "hext-crypto-huge", "hext-crypto-huge.qcow2", notes="crypt_method 2 (LUKS) with a header extension pointing at 1 TiB") as im:
        qcow2_base(im)

        def fix():
            B.patch(im.path, B.Q2_CRYPT, ">I", 2)
            set_ext(im.path, B.EXT_CRYPTO, struct.pack(">QQ", 1 << 40, 1 << 40))

        im.py("crypt_method=2; full-disk-encryption extension: offset 2^40, length 2^40", fix)
    with H(g, cat, "hext-crypto-missing", "hext-crypto-missing.qcow2", notes="crypt_method 2 without a crypto extension") as im:
        qcow2_base(im)
        im.py("crypt_method=2, no full-disk-encryption extension", B.patch, im.path, B.Q2_CRYPT, ">I", 2)
    for label, v in (("ffffffff", 0xFFFFFFFF), ("past-cluster", 0x10008), ("50", 50), ("105", 105)):
        with H(g, cat, f"hext-header-length-{label}", f"hext-header-length-{label}.qcow2") as im:
            qcow2_base(im)
            im.py(f"set header_length to {v:#x}", B.patch, im.path, B.Q2_HEADER_LENGTH, ">I", v)
    with H(g, cat, "hext-backing-size-huge", "hext-backing-size-huge.qcow2") as im:
        qcow2_base(im, 1 * M, data=False)
        im.py("backing_file_offset 0x100, backing_file_size 0xffffffff", B.patch, im.path, B.Q2_BACKING_OFFSET, ">QI", 0x100, 0xFFFFFFFF)
    with H(g, cat, "hext-backing-offset-past", "hext-backing-offset-past.qcow2") as im:
        qcow2_base(im, 1 * M, data=False)
        im.py("backing_file_offset 2^40, backing_file_size 16", B.patch, im.path, B.Q2_BACKING_OFFSET, ">QI", 1 << 40, 16)
    with H(g, cat, "hext-backing-name-1024", "hext-backing-name-1024.qcow2") as im:
        qcow2_base(im, 1 * M, data=False)
        im.py("backing file name of 1024 bytes", set_backing, im.path, "b" * 1024, "raw")
    with H(g, cat, "hext-backing-name-nul", "hext-backing-name-nul.qcow2") as im:
        qcow2_base(im, 1 * M, data=False)
        im.py("backing file name 'base.raw\\0/etc/passwd'", set_backing, im.path, b"base.raw\0/etc/passwd", "raw")
    with H(g, cat, "hext-unknown-incompat", "hext-unknown-incompat.qcow2") as im:
        qcow2_base(im)
        im.py("set unknown incompatible feature bits 0xffffffffffffffe0", B.qcow2_set_bits, im.path, B.Q2_INCOMPAT, 0xFFFFFFFFFFFFFFE0)
    with H(g, cat, "hext-version-4", "hext-version-4.qcow2") as im:
        qcow2_base(im)
        im.py("set version to 4", B.patch, im.path, B.Q2_VERSION, ">I", 4)
