//! qcow2 unit tests. Every expected message below is what qemu-img 10.0.2
//! printed for an image with the same edit (generated with qemu-img create
//! and patched by hand, then `qemu-img info -f qcow2`).

use super::extensions::*;
use super::header::*;
use super::*;
use crate::MemFiles;
use alloc::string::ToString;

const MIB: u64 = 1 << 20;

/// A v3 image like `qemu-img create -f qcow2 x 64M` makes: 64 KiB
/// clusters, refcount table at 0x10000, L1 at 0x30000.
fn v3() -> Qcow2Header {
    Qcow2Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 64 * MIB,
        crypt_method: 0,
        l1_size: 1,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
    }
}

struct Img {
    h: Qcow2Header,
    exts: Vec<(u32, Vec<u8>)>,
    blobs: Vec<(u64, Vec<u8>)>,
}

impl Img {
    fn new(h: Qcow2Header) -> Self {
        Self {
            h,
            exts: Vec::new(),
            blobs: Vec::new(),
        }
    }
    fn ext(mut self, magic: u32, data: &[u8]) -> Self {
        self.exts.push((magic, data.to_vec()));
        self
    }
    fn blob(mut self, at: u64, data: &[u8]) -> Self {
        self.blobs.push((at, data.to_vec()));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 0x40000];
        b[..HEADER_SIZE].copy_from_slice(&self.h.encode());
        let mut off = self.h.header_length as usize;
        for (m, d) in &self.exts {
            b[off..off + 4].copy_from_slice(&m.to_be_bytes());
            b[off + 4..off + 8].copy_from_slice(&(d.len() as u32).to_be_bytes());
            b[off + 8..off + 8 + d.len()].copy_from_slice(d);
            off += 8 + d.len().next_multiple_of(8);
        }
        for (at, d) in &self.blobs {
            let end = *at as usize + d.len();
            if b.len() < end {
                b.resize(end, 0);
            }
            b[*at as usize..end].copy_from_slice(d);
        }
        b
    }
    fn open(&self) -> Result<Qcow2Image> {
        Qcow2Image::open(&mut MemFiles::new(self.bytes()), 0)
    }
    fn err(&self) -> String {
        self.open().unwrap_err().message
    }
}

fn with(f: impl FnOnce(&mut Qcow2Header)) -> Img {
    let mut h = v3();
    f(&mut h);
    Img::new(h)
}

fn raw_err(bytes: Vec<u8>) -> String {
    Qcow2Image::open(&mut MemFiles::new(bytes), 0)
        .unwrap_err()
        .message
}

#[test]
fn header_round_trip() {
    let h = v3();
    assert_eq!(Qcow2Header::decode(&h.encode()), h);
    let v2 = Qcow2Header {
        version: 2,
        header_length: 72,
        ..v3()
    };
    let d = Qcow2Header::decode(&v2.encode());
    assert_eq!(d.refcount_order, 4);
    assert_eq!(d.header_length, 72);
    assert_eq!(probe(&h.encode(), "x"), 100);
    assert_eq!(probe(&h.encode()[..50], "x"), 0);
}

#[test]
fn plain_v3_info() {
    let info = Img::new(v3()).open().unwrap().info();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 64 * MIB);
    assert_eq!(info.cluster_size, Some(65536));
    assert_eq!(info.children.len(), 1);
    assert_eq!(info.children[0].name, "file");
    let Some(FormatSpecific::Qcow2(q)) = info.format_specific else {
        panic!()
    };
    assert_eq!(q.compat, "1.1");
    assert_eq!(q.lazy_refcounts, Some(false));
    assert_eq!(q.corrupt, Some(false));
    assert_eq!(q.extended_l2, Some(false));
    assert_eq!(q.refcount_bits, 16);
    assert_eq!(q.compression_type, "zlib");
    assert_eq!(q.bitmaps, None);
    assert_eq!(q.data_file_raw, None);
}

#[test]
fn v2_info_has_no_v3_fields() {
    let img = Img::new(Qcow2Header {
        version: 2,
        header_length: 72,
        ..v3()
    });
    let Some(FormatSpecific::Qcow2(q)) = img.open().unwrap().info().format_specific else {
        panic!()
    };
    assert_eq!(q.compat, "0.10");
    assert_eq!(q.lazy_refcounts, None);
    assert_eq!(q.corrupt, None);
    assert_eq!(q.extended_l2, None);
}

#[test]
fn feature_bits() {
    let img = with(|h| {
        h.incompatible_features =
            INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_EXTL2;
        h.compatible_features = COMPAT_LAZY_REFCOUNTS;
        h.autoclear_features = AUTOCLEAR_DATA_FILE_RAW;
    })
    .ext(EXT_DATA_FILE, b"some/where.raw");
    let info = img.open().unwrap().info();
    assert_eq!(info.dirty_flag, Some(true));
    let Some(FormatSpecific::Qcow2(q)) = info.format_specific else {
        panic!()
    };
    assert_eq!(q.corrupt, Some(true));
    assert_eq!(q.lazy_refcounts, Some(true));
    assert_eq!(q.extended_l2, Some(true));
    assert_eq!(q.data_file.as_deref(), Some("some/where.raw"));
    assert_eq!(q.data_file_raw, Some(true));
    // Only the data-file child would be extra, and qemu 10 does not open it.
    assert_eq!(info.children.len(), 1);
}

#[test]
fn data_file_without_bit_or_name() {
    // qemu-img info opens neither; both are accepted.
    let q = |img: Img| match img.open().unwrap().info().format_specific {
        Some(FormatSpecific::Qcow2(q)) => q,
        _ => panic!(),
    };
    let a = q(with(|h| h.incompatible_features = INCOMPAT_DATA_FILE));
    assert_eq!((a.data_file, a.data_file_raw), (None, Some(false)));
    let b = q(with(|h| h.autoclear_features = AUTOCLEAR_DATA_FILE_RAW));
    assert_eq!((b.data_file, b.data_file_raw), (None, None));
    let c = q(Img::new(v3()).ext(EXT_DATA_FILE, b"data.img"));
    assert_eq!(
        (c.data_file.as_deref(), c.data_file_raw),
        (Some("data.img"), None)
    );
}

#[test]
fn backing_file_and_format() {
    let img = with(|h| {
        h.backing_file_offset = 4096;
        h.backing_file_size = 8;
    })
    .ext(EXT_BACKING_FORMAT, b"raw")
    .blob(4096, b"base.img");
    let info = img.open().unwrap().info();
    assert_eq!(info.backing_filename.as_deref(), Some("base.img"));
    assert_eq!(info.backing_filename_format.as_deref(), Some("raw"));
    // A format without a backing file is not reported.
    let info = Img::new(v3())
        .ext(EXT_BACKING_FORMAT, b"qqqqqqqqqqqqqqq")
        .open()
        .unwrap()
        .info();
    assert_eq!(info.backing_filename_format, None);
    // Unknown extensions are skipped and kept.
    let img = Img::new(v3()).ext(0x1111_2222, b"hello").open().unwrap();
    assert_eq!(img.extensions.unknown.len(), 1);
}

#[test]
fn snapshots() {
    let s = |id: &str, name: &str, icount| Snapshot {
        l1_table_offset: 0,
        l1_size: 0,
        id: id.into(),
        name: name.into(),
        date_sec: 1_700_000_000,
        date_nsec: 5,
        vm_clock_nsec: 3_500_000_123,
        vm_state_size: 7,
        disk_size: 64 * MIB,
        icount,
        extra_data_size: 24,
    };
    let mut table = snapshot::encode_entry(&s("1", "a", None));
    table.extend(snapshot::encode_entry(&s("22", "bee", Some(77))));
    let img = with(|h| {
        h.nb_snapshots = 2;
        h.snapshots_offset = 0x40000;
    })
    .blob(0x40000, &table);
    let info = img.open().unwrap().info();
    assert_eq!(info.snapshots.len(), 2);
    assert_eq!(info.snapshots[0].icount, None);
    assert_eq!(info.snapshots[1].icount, Some(77));
    assert_eq!(info.snapshots[1].name, "bee");
    assert_eq!(info.snapshots[1].vm_clock_sec, 3);
    assert_eq!(info.snapshots[1].vm_clock_nsec, 500_000_123);
    // Entries past EOF read as zeros: qemu accepts them as empty snapshots.
    let img = with(|h| {
        h.nb_snapshots = 3;
        h.snapshots_offset = 1 << 30;
    });
    let info = img.open().unwrap().info();
    assert_eq!(info.snapshots.len(), 3);
    assert_eq!(info.snapshots[2].id, "");
}

#[test]
fn bitmaps() {
    let entry = |name: &[u8], flags: u32, gbits: u8| {
        let mut e = Vec::new();
        e.extend_from_slice(&0x30000u64.to_be_bytes());
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&flags.to_be_bytes());
        e.extend_from_slice(&[1, gbits]);
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.extend_from_slice(name);
        e.resize(e.len().next_multiple_of(8), 0);
        e
    };
    let mut dir = entry(b"one", 2, 16);
    dir.extend(entry(b"two", 1, 20));
    let mut ext = Vec::new();
    ext.extend_from_slice(&2u32.to_be_bytes());
    ext.extend_from_slice(&0u32.to_be_bytes());
    ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
    ext.extend_from_slice(&0x20000u64.to_be_bytes());
    let img = with(|h| h.autoclear_features = AUTOCLEAR_BITMAPS)
        .ext(EXT_BITMAPS, &ext)
        .blob(0x20000, &dir);
    let Some(FormatSpecific::Qcow2(q)) = img.open().unwrap().info().format_specific else {
        panic!()
    };
    let b = q.bitmaps.unwrap();
    assert_eq!(b[0].name, "one");
    assert_eq!(b[0].granularity, 65536);
    assert_eq!(b[0].flags, vec![instar_wire::BitmapFlag::Auto]);
    assert_eq!(b[1].flags, vec![instar_wire::BitmapFlag::InUse]);
    // Without the autoclear bit the extension is ignored (qemu warns).
    let img = Img::new(v3()).ext(EXT_BITMAPS, &ext).blob(0x20000, &dir);
    assert!(img.open().unwrap().bitmaps.is_empty());

    let one = |e: Vec<u8>, n: u32| {
        let mut x = Vec::new();
        x.extend_from_slice(&n.to_be_bytes());
        x.extend_from_slice(&0u32.to_be_bytes());
        x.extend_from_slice(&(e.len() as u64).to_be_bytes());
        x.extend_from_slice(&0x20000u64.to_be_bytes());
        with(|h| h.autoclear_features = AUTOCLEAR_BITMAPS)
            .ext(EXT_BITMAPS, &x)
            .blob(0x20000, &e)
            .err()
    };
    assert_eq!(
        one(entry(b"gg", 0, 8), 1),
        "Bitmap 'gg' doesn't satisfy the constraints"
    );
    assert_eq!(
        one(entry(b"ff", 4, 16), 1),
        "Bitmap 'ff' doesn't satisfy the constraints"
    );
    assert_eq!(
        one(dir.clone(), 1),
        "More bitmaps found than specified in header extension"
    );
    assert_eq!(
        one(entry(b"one", 2, 16), 2),
        "Less bitmaps found than specified in header extension"
    );
    let mut dup = entry(b"same", 2, 16);
    dup.extend(entry(b"same", 2, 16));
    assert_eq!(one(dup, 2), "Bitmap already exists: same");
    let mut dup_in_use = entry(b"same", 2, 16);
    dup_in_use.extend(entry(b"same", 1, 16));
    let mut x = Vec::new();
    x.extend_from_slice(&2u32.to_be_bytes());
    x.extend_from_slice(&0u32.to_be_bytes());
    x.extend_from_slice(&(dup_in_use.len() as u64).to_be_bytes());
    x.extend_from_slice(&0x20000u64.to_be_bytes());
    let img = with(|h| h.autoclear_features = AUTOCLEAR_BITMAPS)
        .ext(EXT_BITMAPS, &x)
        .blob(0x20000, &dup_in_use);
    assert!(img.open().is_ok());
    // Bad table entry (reserved bit) and table size not matching the disk.
    let bad = with(|h| h.autoclear_features = AUTOCLEAR_BITMAPS)
        .ext(EXT_BITMAPS, &{
            let e = entry(b"bad", 2, 16);
            let mut x = Vec::new();
            x.extend_from_slice(&1u32.to_be_bytes());
            x.extend_from_slice(&0u32.to_be_bytes());
            x.extend_from_slice(&(e.len() as u64).to_be_bytes());
            x.extend_from_slice(&0x20000u64.to_be_bytes());
            x
        })
        .blob(0x20000, &entry(b"bad", 2, 16))
        .blob(0x30000, &2u64.to_be_bytes());
    assert_eq!(
        bad.err(),
        "Could not read bitmap_table table from image for bitmap 'bad': Invalid argument"
    );
}

#[test]
fn hostile_headers() {
    let base = Img::new(v3()).bytes();
    assert_eq!(raw_err(Vec::new()), "Image is not in qcow2 format");
    assert_eq!(raw_err(base[..3].to_vec()), "Image is not in qcow2 format");
    assert_eq!(raw_err(base[..50].to_vec()), "qcow2 header too short");
    // Cut after the header length field: the rest reads as zeros, and qemu
    // opens it.
    assert!(Qcow2Image::open(&mut MemFiles::new(base[..104].to_vec()), 0).is_ok());
    assert_eq!(with(|h| h.version = 1).err(), "Unsupported qcow2 version 1");
    assert_eq!(with(|h| h.version = 4).err(), "Unsupported qcow2 version 4");
    assert_eq!(
        with(|h| h.version = u32::MAX).err(),
        "Unsupported qcow2 version 4294967295"
    );
    for cb in [0, 8, 22, 255] {
        assert_eq!(
            with(|h| h.cluster_bits = cb).err(),
            format!("Unsupported cluster size: 2^{cb}")
        );
    }
    assert_eq!(
        with(|h| h.header_length = 100).err(),
        "qcow2 header too short"
    );
    assert_eq!(
        with(|h| h.header_length = 65537).err(),
        "qcow2 header exceeds cluster size"
    );
    assert_eq!(
        with(|h| h.backing_file_offset = 65537).err(),
        "Invalid backing file offset"
    );
    assert_eq!(
        with(|h| h.compression_type = 2).err(),
        "qcow2: unknown compression type: 2"
    );
    assert_eq!(
        with(|h| h.incompatible_features = INCOMPAT_COMPRESSION).err(),
        "qcow2: Compression type incompatible feature bit must not be set"
    );
    assert_eq!(
        with(|h| h.compression_type = 1).err(),
        "qcow2: Compression type incompatible feature bit must be set"
    );
    assert_eq!(
        with(|h| h.incompatible_features = 1 << 5).err(),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"
    );
    assert_eq!(
        with(|h| h.incompatible_features = (1 << 63) | (1 << 40)).err(),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000010000000000"
    );
    let mut table = Vec::new();
    for (kind, bit, name) in [
        (0u8, 5u8, &b"shiny feature"[..]),
        (1, 5, b"compat five"),
        (0, 40, &[b'x'; 46]),
    ] {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name);
        table.extend_from_slice(&e);
    }
    let named = with(|h| h.incompatible_features = (1 << 5) | (1 << 40) | (1 << 41))
        .ext(EXT_FEATURE_TABLE, &table);
    assert_eq!(
        named.err(),
        "Unsupported qcow2 feature(s): shiny feature, xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx, Unknown incompatible feature: 20000000000"
    );
    assert_eq!(
        with(|h| {
            h.incompatible_features = INCOMPAT_EXTL2;
            h.cluster_bits = 13;
        })
        .err(),
        "Unsupported subcluster size: 256"
    );
    assert_eq!(
        with(|h| h.refcount_order = 7).err(),
        "Reference count entry width too large; may not exceed 64 bits"
    );
    assert_eq!(
        with(|h| h.refcount_table_clusters = 0).err(),
        "Image does not contain a reference count table"
    );
    assert_eq!(
        with(|h| h.refcount_table_clusters = u32::MAX).err(),
        "Reference count table too large"
    );
    assert_eq!(
        with(|h| h.refcount_table_offset = 196609).err(),
        "Reference count table offset invalid"
    );
    assert_eq!(
        with(|h| h.refcount_table_offset = (1 << 63) - 65536).err(),
        "Reference count table offset invalid"
    );
    assert_eq!(
        with(|h| h.nb_snapshots = 65537).err(),
        "Snapshot table too large"
    );
    assert_eq!(
        with(|h| {
            h.nb_snapshots = 1;
            h.snapshots_offset = 1000;
        })
        .err(),
        "Snapshot table offset invalid"
    );
    assert_eq!(
        with(|h| h.l1_size = 0x1000_0000).err(),
        "Active L1 table too large"
    );
    assert_eq!(
        with(|h| h.l1_table_offset = 196609).err(),
        "Active L1 table offset invalid"
    );
    assert_eq!(with(|h| h.l1_size = 0).err(), "L1 table is too small");
    assert_eq!(with(|h| h.size = 1 << 62).err(), "Image is too big");
    assert_eq!(
        with(|h| h.size = u64::MAX).err(),
        "Could not refresh total sector count: File too large"
    );
    assert_eq!(
        with(|h| h.crypt_method = 3).err(),
        "Unsupported encryption method 3"
    );
    assert_eq!(
        with(|h| h.crypt_method = 2).err(),
        "Missing CRYPTO header for crypt method 2"
    );
    assert!(
        with(|h| h.crypt_method = 1)
            .open()
            .unwrap()
            .info()
            .encrypted
    );
    assert_eq!(
        with(|h| {
            h.backing_file_offset = 1024;
            h.backing_file_size = 1024;
        })
        .err(),
        "Backing file name too long"
    );
    assert_eq!(
        with(|h| {
            h.backing_file_offset = 65536 - 10;
            h.backing_file_size = 11;
        })
        .err(),
        "Backing file name too long"
    );
}

#[test]
fn hostile_extensions() {
    let mut too_large = Img::new(v3()).ext(0x1234_5678, &[0; 10]).bytes();
    too_large[116..120].copy_from_slice(&70000u32.to_be_bytes());
    assert_eq!(raw_err(too_large), "Header extension too large");
    assert_eq!(
        Img::new(v3()).ext(EXT_BACKING_FORMAT, &[b'q'; 16]).err(),
        "ERROR: ext_backing_format: len=16 too large (>=16)"
    );
    assert_eq!(
        Img::new(v3()).ext(EXT_CRYPTO_HEADER, &[0; 16]).err(),
        "CRYPTO header extension only expected with LUKS encryption method"
    );
    let luks = |data: &[u8]| with(|h| h.crypt_method = 2).ext(EXT_CRYPTO_HEADER, data);
    assert_eq!(
        luks(&[0; 8]).err(),
        "CRYPTO header extension size 8, but expected size 16"
    );
    let loc = |off: u64, len: u64| {
        let mut d = off.to_be_bytes().to_vec();
        d.extend_from_slice(&len.to_be_bytes());
        d
    };
    assert_eq!(
        luks(&loc(100, 4096)).err(),
        "Encryption header offset '100' is not a multiple of cluster size '65536'"
    );
    assert_eq!(
        luks(&loc(0x80000, 100)).err(),
        "Request for data outside of extension header"
    );
    assert_eq!(
        luks(&loc(0x80000, 4096)).err(),
        "Volume is not in LUKS format"
    );
    let hdr = crate::luks::test_header();
    let ok = luks(&loc(0x80000, 2068480))
        .blob(0x80000, &hdr)
        .open()
        .unwrap()
        .info();
    let Some(FormatSpecific::Qcow2(q)) = ok.format_specific else {
        panic!()
    };
    let Some(Qcow2Encrypt::Luks(l)) = q.encrypt else {
        panic!()
    };
    assert_eq!(l.cipher_alg, "aes-256");
    let mut bad = hdr.clone();
    bad[6..8].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(
        luks(&loc(0x80000, 4096)).blob(0x80000, &bad).err(),
        "LUKS version 2 is not supported"
    );

    let bm = |n: u32, reserved: u32, size: u64, off: u64| {
        let mut x = n.to_be_bytes().to_vec();
        x.extend_from_slice(&reserved.to_be_bytes());
        x.extend_from_slice(&size.to_be_bytes());
        x.extend_from_slice(&off.to_be_bytes());
        with(|h| h.autoclear_features = AUTOCLEAR_BITMAPS).ext(EXT_BITMAPS, &x)
    };
    assert_eq!(
        with(|h| h.autoclear_features = AUTOCLEAR_BITMAPS)
            .ext(EXT_BITMAPS, &[0; 16])
            .err(),
        "bitmaps_ext: Invalid extension length"
    );
    assert_eq!(
        bm(1, 5, 32, 65536).err(),
        "bitmaps_ext: Reserved field is not zero"
    );
    assert_eq!(
        bm(65536, 0, 32, 65536).err(),
        "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"
    );
    assert_eq!(
        bm(0, 0, 32, 65536).err(),
        "found bitmaps extension with zero bitmaps"
    );
    assert_eq!(
        bm(1, 0, 32, 65537).err(),
        "bitmaps_ext: invalid bitmap directory offset"
    );
    assert_eq!(
        bm(1, 0, 1024 * 65535 + 1, 65536).err(),
        "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)"
    );
    assert_eq!(
        bm(1, 0, 0, 65536).err(),
        "Requested bitmap directory size is zero"
    );
    assert_eq!(bm(1, 0, 20, 65536).err(), "Broken bitmap directory");
}

#[test]
fn hostile_snapshot_tables() {
    let entry = |extra: u32, id_len: u16, name_len: u16| {
        let mut e = vec![0u8; 40];
        e[12..14].copy_from_slice(&id_len.to_be_bytes());
        e[14..16].copy_from_slice(&name_len.to_be_bytes());
        e[36..40].copy_from_slice(&extra.to_be_bytes());
        e
    };
    let img = with(|h| {
        h.nb_snapshots = 2;
        h.snapshots_offset = 0x40000;
    });
    let mut t = entry(0, 0, 0);
    t.extend(entry(1025, 0, 0));
    assert_eq!(
        img.blob(0x40000, &t).err(),
        "Too much extra metadata in snapshot table entry 1\n\
         You can force-remove this extra metadata with qemu-img check -r all"
    );
    // Every entry claims two 64 KiB names: qemu's 64 MiB cap trips after
    // about 512 entries, long before the 2000 the header claims. The table
    // is synthesized on read instead of held in memory.
    struct Table {
        image: Vec<u8>,
    }
    const START: u64 = 0x40000;
    const STRIDE: u64 = (40 + 0x1fffe_u64).next_multiple_of(8);
    impl Files for Table {
        fn len(&mut self, _: FileId) -> Result<u64> {
            Ok(START + 2000 * STRIDE)
        }
        fn read_at(&mut self, f: FileId, off: u64, buf: &mut [u8]) -> Result<()> {
            MemFiles::new(self.image.clone()).read_at(f, off, buf)?;
            let end = off + buf.len() as u64;
            let first = off.saturating_sub(START) / STRIDE;
            let mut i = first.saturating_sub(1);
            while START + i * STRIDE < end {
                let at = START + i * STRIDE;
                let mut e = [0u8; 40];
                e[12..16].copy_from_slice(&[0xff; 4]);
                for (k, byte) in e.iter().enumerate() {
                    let pos = at + k as u64;
                    if pos >= off && pos < end {
                        buf[(pos - off) as usize] = *byte;
                    }
                }
                i += 1;
            }
            Ok(())
        }
        fn open(&mut self, _: FileId, _: &str) -> Result<FileId> {
            Err(ImageError::open("no"))
        }
    }
    let image = with(|h| {
        h.nb_snapshots = 2000;
        h.snapshots_offset = START;
    })
    .bytes();
    let mut files = Table { image };
    assert_eq!(
        Qcow2Image::open(&mut files, 0).unwrap_err().message,
        "Snapshot table is too big\n\
         You can force-remove all 1489 overhanging snapshots with qemu-img check -r all"
    );
}

#[test]
fn limits_hold() {
    // A bitmap table qemu allows (512 MiB of bitmap data) is streamed, not
    // allocated: the chunk is the only buffer.
    assert_eq!(crate::limits::QCOW2_MAX_L1_BYTES / 8, 4 * 1024 * 1024);
    assert_eq!(
        unsupported_features_message(None, 1 << 7),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 80".to_string()
    );
}

#[test]
fn hostile_sweeps() {
    // qemu-img 10.0.2 on a qemu-img-created qcow2 image cut short.
    let cut = |n: usize| raw_err(Img::new(v3()).bytes()[..n].to_vec());
    assert_eq!(cut(1), "Image is not in qcow2 format");
    assert_eq!(cut(4), "Unsupported qcow2 version 0");
    for n in [8, 16] {
        assert_eq!(cut(n), "Unsupported cluster size: 2^0");
    }
    for n in [32, 64, 100] {
        assert_eq!(cut(n), "qcow2 header too short");
    }
    let img = Img::new(v3()).bytes();
    crate::hostile::truncations(info, &img, "x", HEADER_SIZE + 8);
    crate::hostile::absurd_fields(info, &img, "x", 0..HEADER_SIZE, &crate::hostile::no_fix);
}
