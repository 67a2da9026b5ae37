//! The writer's output read back: with this crate's vmdk `info`, and with
//! a small decoder of the grain tables written here (the reader does not
//! map vmdk grains). Expected descriptors are qemu-img 10.0.2's
//! `create -f vmdk` output with the CID left out.

use super::*;
use crate::vmdk;
use crate::Files;
use alloc::collections::BTreeMap;
use alloc::string::ToString;
use instar_wire::FileId;

/// A sink and file set that stores only what was written, so extents of
/// several GiB cost nothing.
#[derive(Default)]
struct Store {
    names: Vec<String>,
    lens: Vec<u64>,
    chunks: Vec<BTreeMap<u64, Vec<u8>>>,
    /// Open files for [`Files`]: indexes into the outputs.
    open: Vec<usize>,
    writes: usize,
}

impl Store {
    fn new(names: &[String]) -> Self {
        Self {
            names: names.to_vec(),
            lens: vec![0; names.len()],
            chunks: names.iter().map(|_| BTreeMap::new()).collect(),
            open: vec![0],
            writes: 0,
        }
    }
    fn read(&self, out: usize, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        // Chunks never overlap: walk back from the end until before offset.
        for (&at, data) in self.chunks[out].range(..end).rev() {
            let dend = at + data.len() as u64;
            if dend <= offset {
                break;
            }
            let s = at.max(offset);
            let e = dend.min(end).min(self.lens[out]);
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&data[(s - at) as usize..(e - at) as usize]);
            }
        }
    }
    fn bytes(&self, out: usize) -> Vec<u8> {
        let mut b = vec![0; self.lens[out] as usize];
        self.read(out, 0, &mut b);
        b
    }
}

impl Sink for Store {
    fn write_at(&mut self, file: OutId, offset: u64, data: &[u8]) -> Result<()> {
        let f = file as usize;
        self.writes += 1;
        // Later writes win: drop what they cover, keeping edges.
        let end = offset + data.len() as u64;
        let olds: Vec<u64> = self.chunks[f]
            .range(..end)
            .rev()
            .take_while(|(&a, d)| a + d.len() as u64 > offset)
            .map(|(&a, _)| a)
            .collect();
        for at in olds {
            let oend = at + self.chunks[f][&at].len() as u64;
            let old = self.chunks[f].remove(&at).unwrap();
            if at < offset {
                self.chunks[f].insert(at, old[..(offset - at) as usize].to_vec());
            }
            if oend > end {
                self.chunks[f].insert(end, old[(end - at) as usize..].to_vec());
            }
        }
        self.chunks[f].insert(offset, data.to_vec());
        self.lens[f] = self.lens[f].max(end);
        Ok(())
    }
    fn set_len(&mut self, file: OutId, length: u64) -> Result<()> {
        self.lens[file as usize] = length;
        Ok(())
    }
    fn output_name(&self, file: OutId) -> Option<&str> {
        self.names.get(file as usize).map(String::as_str)
    }
}

impl Files for Store {
    fn len(&mut self, file: FileId) -> Result<u64> {
        Ok(self.lens[self.open[file as usize]])
    }
    fn read_at(&mut self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(self.open[file as usize], offset, buf);
        Ok(())
    }
    fn open(&mut self, _relative_to: FileId, path: &str) -> Result<FileId> {
        let i = self
            .names
            .iter()
            .position(|n| n.rsplit('/').next() == Some(path))
            .ok_or_else(|| ImageError::open(format!("Could not open '{path}'")))?;
        self.open.push(i);
        Ok((self.open.len() - 1) as FileId)
    }
}

fn opts(subformat: VmdkSubformat) -> VmdkOptions {
    VmdkOptions {
        subformat,
        adapter: VmdkAdapter::Ide,
        compat6: false,
        hwversion: None,
        toolsversion: None,
        zeroed_grain: false,
        backing_file: None,
    }
}

const ALL: [VmdkSubformat; 5] = ALL_SUBFORMATS;

/// Data and zero runs in ascending order, as the engine hands them over.
enum Op {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn write_image(
    o: &VmdkOptions,
    dst: &str,
    size: u64,
    ops: &[Op],
    parent: Option<u32>,
) -> Result<Store> {
    let target = ConvertTarget {
        options: instar_wire::convert::TargetOptions::Vmdk(o.clone()),
        compress: false,
        size: None,
    };
    let names = super::super::output_files(&target, dst, size);
    let mut s = Store::new(&names);
    let mut w: Box<dyn ImageWriter> = Box::new(VmdkWriter::create(&mut s, o, false, size, parent)?);
    for op in ops {
        match op {
            Op::Data(at, d) => w.write(&mut s, *at, d)?,
            Op::Zero(at, n) => w.zero(&mut s, *at, *n)?,
        }
    }
    w.finish(&mut s)?;
    Ok(s)
}
use instar_wire::ConvertTarget;

/// What a grain table entry says about one grain.
#[derive(Debug, PartialEq)]
enum Grain {
    Unallocated,
    Zeroed,
    Data(Vec<u8>),
}

/// Decode one sparse extent written here: every grain of it.
fn grains(s: &Store, out: usize) -> Vec<Grain> {
    let f = s.bytes_head(out);
    assert_eq!(&f[0..4], b"KDMV");
    let flags = le32(&f, 8);
    let capacity = le64(&f, 12);
    let rgd = le64(&f, 48);
    let gd = le64(&f, 56);
    let grain_off = le64(&f, 64);
    let compressed = flags & VMDK4_FLAG_COMPRESS != 0;
    let grains = capacity.div_ceil(128);
    let gt_count = grains.div_ceil(512);
    let mut r = Vec::new();
    let mut rgd_buf = vec![0u8; (gt_count * 4) as usize];
    let mut gd_buf = vec![0u8; (gt_count * 4) as usize];
    s.read(out, rgd * 512, &mut rgd_buf);
    s.read(out, gd * 512, &mut gd_buf);
    for g in 0..grains {
        let gt = g / 512;
        let mut e = [0u8; 4];
        s.read(
            out,
            u64::from(le32(&gd_buf, (gt * 4) as usize)) * 512 + (g % 512) * 4,
            &mut e,
        );
        let mut e2 = [0u8; 4];
        s.read(
            out,
            u64::from(le32(&rgd_buf, (gt * 4) as usize)) * 512 + (g % 512) * 4,
            &mut e2,
        );
        assert_eq!(e, e2, "redundant grain table differs at grain {g}");
        let v = u64::from(u32::from_le_bytes(e));
        r.push(match v {
            0 => Grain::Unallocated,
            1 => Grain::Zeroed,
            _ => {
                assert!(v >= grain_off, "grain {g} inside metadata");
                assert!(v * 512 < s.lens[out], "grain {g} after EOF");
                if compressed {
                    let mut m = [0u8; 12];
                    s.read(out, v * 512, &mut m);
                    assert_eq!(le64(&m, 0), g * 128, "marker lba");
                    let mut c = vec![0u8; le32(&m, 8) as usize];
                    s.read(out, v * 512 + 12, &mut c);
                    let mut d = miniz_oxide::inflate::decompress_to_vec_zlib(&c).unwrap();
                    let want = ((capacity - g * 128) * 512).min(GRAIN) as usize;
                    assert_eq!(d.len(), want, "compressed grain {g} length");
                    d.resize(GRAIN as usize, 0);
                    Grain::Data(d)
                } else {
                    let mut d = vec![0u8; GRAIN as usize];
                    s.read(out, v * 512, &mut d);
                    Grain::Data(d)
                }
            }
        });
    }
    r
}

impl Store {
    fn bytes_head(&self, out: usize) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        self.read(out, 0, &mut b);
        b
    }
}

use crate::bytes::{le32, le64};

/// The whole guest content (no backing file).
fn content(s: &Store, o: &VmdkOptions, size: u64) -> Vec<u8> {
    let size = size.next_multiple_of(512);
    let mut v = Vec::new();
    let sizes = extent_sizes(o.subformat, size);
    for (i, es) in sizes.iter().enumerate() {
        let out = if is_flat(o.subformat) || is_split(o.subformat) {
            i + 1
        } else {
            0
        };
        if is_flat(o.subformat) {
            assert_eq!(s.lens[out], *es, "flat extent length");
            let mut b = vec![0u8; *es as usize];
            s.read(out, 0, &mut b);
            v.extend_from_slice(&b);
        } else {
            let start = v.len();
            for g in grains(s, out) {
                match g {
                    Grain::Data(d) => v.extend_from_slice(&d),
                    _ => v.resize(v.len() + GRAIN as usize, 0),
                }
            }
            v.truncate(start + *es as usize);
        }
    }
    v
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Half the bytes repeat so deflate has something to do.
            if x & 0x100 != 0 {
                b'a'
            } else {
                x as u8
            }
        })
        .collect()
}

/// Write `data` in chunks of odd sizes, skipping zero runs of 4 KiB.
fn ops_of(data: &[u8], chunk: usize) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = chunk.min(data.len() - at);
        let piece = &data[at..at + n];
        if piece.iter().all(|&b| b == 0) {
            ops.push(Op::Zero(at as u64, n as u64));
        } else {
            ops.push(Op::Data(at as u64, piece.to_vec()));
        }
        at += n;
    }
    ops
}

fn desc_text(s: &Store, o: &VmdkOptions) -> String {
    let raw = if is_flat(o.subformat) || is_split(o.subformat) {
        s.bytes(0)
    } else {
        let mut b = vec![0u8; 20 * 512];
        s.read(0, 512, &mut b);
        crate::bytes::until_nul(&b).to_vec()
    };
    let t = String::from_utf8(raw).unwrap();
    // Drop the CID line (qemu's is random).
    t.lines()
        .filter(|l| !l.starts_with("CID="))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn names_as_qemu_derives_them() {
    let o = opts(VmdkSubformat::TwoGbMaxExtentSparse);
    assert_eq!(
        output_files(&o, "dir.x/a.b.vmdk", 5 * SPLIT_SIZE / 2),
        [
            "dir.x/a.b.vmdk",
            "dir.x/a.b-s001.vmdk",
            "dir.x/a.b-s002.vmdk",
            "dir.x/a.b-s003.vmdk"
        ]
    );
    let o = opts(VmdkSubformat::TwoGbMaxExtentFlat);
    assert_eq!(
        output_files(&o, "noext", SPLIT_SIZE),
        ["noext", "noext-f001"]
    );
    assert_eq!(
        output_files(&o, "c:x.vmdk", 1),
        ["c:x.vmdk", "c:x-f001.vmdk"]
    );
    let o = opts(VmdkSubformat::MonolithicFlat);
    assert_eq!(
        output_files(&o, "/t/d.img", 1 << 30),
        ["/t/d.img", "/t/d-flat.img"]
    );
    assert_eq!(output_files(&o, "/t/d.img", 0), ["/t/d.img"]);
    for s in [
        VmdkSubformat::MonolithicSparse,
        VmdkSubformat::StreamOptimized,
    ] {
        assert_eq!(output_files(&opts(s), "a.vmdk", 1 << 40), ["a.vmdk"]);
    }
    // More extents than the reader accepts: no extent files at all, and
    // create refuses.
    let o = opts(VmdkSubformat::TwoGbMaxExtentSparse);
    let huge = SPLIT_SIZE * (VMDK_MAX_EXTENTS as u64 + 1);
    assert_eq!(output_files(&o, "a.vmdk", huge).len(), 1);
    let mut s = Store::new(&["a.vmdk".to_string()]);
    assert!(VmdkWriter::create(&mut s, &o, false, huge, None).is_err());
}

#[test]
fn header_and_tables_as_qemu_lays_them_out() {
    // qemu-img 10.0.2: monolithicSparse of 5000000 bytes has capacity 9766,
    // rgd 21, gd 26, grains from sector 128; 2 TiB has gd 262677 and
    // grains from 525440.
    let l = Layout::new(5_000_192).unwrap();
    assert_eq!(
        (l.capacity, l.rgd_offset, l.gd_offset, l.grain_offset),
        (9766, 21, 26, 128)
    );
    let l = Layout::new(2 << 40).unwrap();
    assert_eq!(
        (l.capacity, l.gd_offset, l.grain_offset),
        (1 << 32, 262_677, 525_440)
    );
    let h = Layout::new(1_000_448).unwrap().header(false, true);
    assert_eq!((le32(&h, 4), le32(&h, 8)), (2, 7));
    let h = Layout::new(1_000_448).unwrap().header(true, false);
    assert_eq!(
        (le32(&h, 4), le32(&h, 8), crate::bytes::le16(&h, 77)),
        (3, 0x30003, 1)
    );
    assert_eq!(&h[72..77], b"\0\n \r\n");
    assert!(Layout::new(1 << 50).is_ok());
    assert!(Layout::new((1 << 50) + 512).is_err());
}

#[test]
fn descriptors_match_qemu() {
    let mut o = opts(VmdkSubformat::TwoGbMaxExtentFlat);
    o.adapter = VmdkAdapter::Lsilogic;
    o.hwversion = Some("7".into());
    o.toolsversion = Some("10240".into());
    let s = write_image(&o, "/tmp/d1.vmdk", 5_000_000_000, &[], None).unwrap();
    assert_eq!(
        desc_text(&s, &o),
        "# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\n\
         # Extent description\nRW 4194304 FLAT \"d1-f001.vmdk\" 0\nRW 4194304 FLAT \"d1-f002.vmdk\" 0\n\
         RW 1377017 FLAT \"d1-f003.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"7\"\nddb.geometry.cylinders = \"607\"\nddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"lsilogic\"\nddb.toolsVersion = \"10240\"\n"
    );
    assert_eq!(s.lens[1..], [SPLIT_SIZE, SPLIT_SIZE, 1_377_017 * 512]);
    // Nothing written: the descriptor file is just the text (qemu-img
    // create makes it 344 bytes here).
    assert_eq!(
        s.lens[0],
        s.bytes(0)
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(s.lens[0] as usize) as u64
    );
    assert_ne!(s.lens[0] % 512, 0);

    let mut o = opts(VmdkSubformat::MonolithicSparse);
    o.compat6 = true;
    o.adapter = VmdkAdapter::LegacyEsx;
    o.zeroed_grain = true;
    let s = write_image(&o, "d2.vmdk", 1_000_000, &[], None).unwrap();
    assert_eq!(
        desc_text(&s, &o),
        "# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n\
         # Extent description\nRW 1954 SPARSE \"d2.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"6\"\nddb.geometry.cylinders = \"0\"\nddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"legacyESX\"\nddb.toolsVersion = \"2147483647\"\n"
    );
    assert_eq!(s.lens[0], 128 * 512);
    let h = s.bytes_head(0);
    assert_eq!((le32(&h, 4), le32(&h, 8), le64(&h, 12)), (2, 7, 1954));

    let mut o = opts(VmdkSubformat::StreamOptimized);
    o.adapter = VmdkAdapter::Buslogic;
    o.backing_file = Some("d2.vmdk".into());
    let s = write_image(&o, "d3.vmdk", 1_000_000, &[], Some(0x6e14_1f02)).unwrap();
    assert_eq!(
        desc_text(&s, &o),
        "# Disk DescriptorFile\nversion=1\nparentCID=6e141f02\ncreateType=\"streamOptimized\"\n\
         parentFileNameHint=\"d2.vmdk\"\n# Extent description\nRW 1954 SPARSE \"d3.vmdk\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"0\"\n\
         ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"buslogic\"\n\
         ddb.toolsVersion = \"2147483647\"\n"
    );
}

#[test]
fn every_subformat_round_trips_at_odd_sizes_and_alignments() {
    // Sizes: below a grain, not a sector multiple, several grain tables
    // (512 grains = 32 MiB per table) with a partial last grain.
    for size in [1_000u64, 200_000, 33 * 1024 * 1024 + 4_000] {
        let mut data = pattern(size as usize, size as u32);
        // Zero holes: a whole grain, and a run across a grain boundary.
        if size > 200_000 {
            data[65536..131072].fill(0);
            data[190_000..200_000].fill(0);
        }
        for sub in ALL {
            // Debug-build deflate is slow: the large size once, unaligned.
            let chunks: &[usize] = if size > 1 << 20 {
                &[65536 + 7]
            } else {
                &[4096, 65536 + 7, 1 << 20]
            };
            for &chunk in chunks {
                let o = opts(sub);
                let s = write_image(&o, "dir/img.vmdk", size, &ops_of(&data, chunk), None)
                    .unwrap_or_else(|e| panic!("{sub:?} {size} {chunk}: {}", e.message));
                let mut got = content(&s, &o, size);
                assert_eq!(got.len() as u64, size.next_multiple_of(512));
                assert!(got[size as usize..].iter().all(|&b| b == 0));
                got.truncate(size as usize);
                assert!(
                    got == data,
                    "{sub:?} size {size} chunk {chunk}: content differs"
                );

                let mut files = s;
                let i = vmdk::info(&mut files, 0, "dir/img.vmdk").unwrap();
                assert_eq!(i.virtual_size, size.next_multiple_of(512), "{sub:?}");
                let Some(FormatSpecific::Vmdk(v)) = &i.format_specific else {
                    panic!()
                };
                assert_eq!(v.create_type, subformat_name(sub));
                assert_eq!(v.parent_cid, 0xffff_ffff);
                assert_eq!(v.extents.len(), 1);
                assert_eq!(
                    v.extents[0].compressed,
                    (sub == VmdkSubformat::StreamOptimized).then_some(true)
                );
            }
        }
    }
}

#[test]
fn grains_are_allocated_in_write_order_like_qemu() {
    // Two full grains, one grain left out, a partial one: grains sit
    // contiguously from sector 128, each 128 sectors, and the file ends
    // with a whole last grain.
    let o = opts(VmdkSubformat::MonolithicSparse);
    let ops = [
        Op::Data(0, vec![1; 131072]),
        Op::Data(3 * 65536 + 100, vec![2; 10]),
    ];
    let s = write_image(&o, "a.vmdk", 5_000_000, &ops, None).unwrap();
    let g = grains(&s, 0);
    assert_eq!(g[2], Grain::Unallocated);
    assert!(matches!(&g[3], Grain::Data(d) if d[100] == 2 && d[99] == 0 && d[110] == 0));
    let mut e = [0u8; 12];
    s.read(0, 26 * 512 + 512, &mut e);
    assert_eq!([le32(&e, 0), le32(&e, 4), le32(&e, 8)], [128, 256, 0]);
    assert_eq!(s.lens[0], (128 + 3 * 128) * 512);

    // streamOptimized: markers back to back at sector boundaries, the
    // last grain compressed only up to the end of the disk.
    let o = opts(VmdkSubformat::StreamOptimized);
    let data = pattern(5_000_000, 7);
    let s = write_image(&o, "a.vmdk", 5_000_000, &ops_of(&data, 1 << 20), None).unwrap();
    let mut e = [0u8; 8];
    s.read(0, 27 * 512, &mut e);
    assert_eq!(le32(&e, 0), 128);
    assert!(le32(&e, 4) > 128 && le32(&e, 4) < 256);
    // The file ends a whole grain after the last compressed grain starts
    // (qemu zero-fills each allocated grain first).
    let mut last = [0u8; 4];
    s.read(0, 27 * 512 + 76 * 4, &mut last);
    assert_eq!(s.lens[0], (u64::from(le32(&last, 0)) + 128) * 512);
}

#[test]
fn split_sparse_beyond_2_gib() {
    let size = 5 * SPLIT_SIZE / 2 + 1000;
    let o = opts(VmdkSubformat::TwoGbMaxExtentSparse);
    let a = pattern(100_000, 1);
    let b = pattern(70_000, 2);
    // Across the first extent boundary, and at the very end.
    let at_a = SPLIT_SIZE - 50_000;
    let at_b = size - 70_000;
    let ops = [Op::Data(at_a, a.clone()), Op::Data(at_b, b.clone())];
    let mut s = write_image(&o, "big.vmdk", size, &ops, None).unwrap();
    assert_eq!(s.names.len(), 4);
    let g1 = grains(&s, 1);
    let g2 = grains(&s, 2);
    let g3 = grains(&s, 3);
    assert_eq!(g1.len(), 32768);
    assert!(matches!(&g1[32767], Grain::Data(d) if d[65536 - 50_000..] == a[..50_000]));
    assert!(matches!(&g2[0], Grain::Data(d) if d[..50_000] == a[50_000..]));
    assert!(g2[1..].iter().all(|g| *g == Grain::Unallocated));
    let rel = at_b - 2 * SPLIT_SIZE;
    let last = g3.len() - 1;
    let mut tail = Vec::new();
    for g in &g3[(rel / GRAIN) as usize..] {
        let Grain::Data(d) = g else {
            panic!("tail grain unallocated")
        };
        tail.extend_from_slice(d);
    }
    let off = (rel % GRAIN) as usize;
    assert_eq!(tail[off..off + 70_000], b[..]);
    assert_eq!(
        last as u64,
        (size.next_multiple_of(512) - 2 * SPLIT_SIZE - 1) / GRAIN
    );
    let i = vmdk::info(&mut s, 0, "big.vmdk").unwrap();
    assert_eq!(i.virtual_size, size.next_multiple_of(512));
    let Some(FormatSpecific::Vmdk(v)) = &i.format_specific else {
        panic!()
    };
    assert_eq!(v.extents.len(), 3);
    assert_eq!(
        v.extents[2].virtual_size,
        size.next_multiple_of(512) - 2 * SPLIT_SIZE
    );
}

#[test]
fn split_flat_beyond_2_gib() {
    let size = 2 * SPLIT_SIZE + 4096;
    let o = opts(VmdkSubformat::TwoGbMaxExtentFlat);
    let a = pattern(8192, 3);
    let ops = [
        Op::Data(SPLIT_SIZE - 4096, a.clone()),
        Op::Data(2 * SPLIT_SIZE, a[..4096].to_vec()),
    ];
    let mut s = write_image(&o, "big.vmdk", size, &ops, None).unwrap();
    assert_eq!(
        s.lens,
        [512, SPLIT_SIZE, SPLIT_SIZE, 4096],
        "qemu pads the descriptor after writes"
    );
    let mut b = vec![0u8; 4096];
    s.read(1, SPLIT_SIZE - 4096, &mut b);
    assert_eq!(b, a[..4096]);
    s.read(2, 0, &mut b);
    assert_eq!(b, a[4096..]);
    s.read(3, 0, &mut b);
    assert_eq!(b, a[..4096]);
    let i = vmdk::info(&mut s, 0, "big.vmdk").unwrap();
    assert_eq!(i.virtual_size, size);
}

#[test]
fn zeros_over_a_backing_file() {
    // With a backing file, zero runs must hide it: zeroed grains with
    // zeroed_grain (whole grains only), explicit zero grains otherwise.
    for zeroed in [false, true] {
        let mut o = opts(VmdkSubformat::MonolithicSparse);
        o.backing_file = Some("base.vmdk".into());
        o.zeroed_grain = zeroed;
        let ops = [
            Op::Data(0, vec![9; 1000]),
            Op::Zero(1000, 3 * 65536 - 1000),
            Op::Data(3 * 65536, vec![8; 65536]),
        ];
        let s = write_image(&o, "a.vmdk", 1 << 20, &ops, Some(0x1234)).unwrap();
        let g = grains(&s, 0);
        assert!(
            matches!(&g[0], Grain::Data(d) if d[..1000] == [9; 1000][..] && d[1000..].iter().all(|&b| b == 0))
        );
        for grain in &g[1..3] {
            if zeroed {
                assert_eq!(*grain, Grain::Zeroed);
            } else {
                assert!(matches!(grain, Grain::Data(d) if d.iter().all(|&b| b == 0)));
            }
        }
        assert!(matches!(&g[3], Grain::Data(d) if d[..] == [8; 65536][..]));
        assert_eq!(g[4], Grain::Unallocated);
        let mut files = s;
        let i = vmdk::info(&mut files, 0, "a.vmdk").unwrap();
        assert_eq!(i.backing_filename.as_deref(), Some("base.vmdk"));
        let Some(FormatSpecific::Vmdk(v)) = &i.format_specific else {
            panic!()
        };
        assert_eq!(v.parent_cid, 0x1234);
    }
}

#[test]
fn refusals() {
    let mut s = Store::new(&["a.vmdk".to_string(), "a-flat.vmdk".to_string()]);
    let mut o = opts(VmdkSubformat::MonolithicFlat);
    let e = |r: Result<VmdkWriter>| r.err().map(|e| e.message).unwrap_or_default();
    o.zeroed_grain = true;
    assert_eq!(
        e(VmdkWriter::create(&mut s, &o, false, 1 << 20, None)),
        "Flat image can't enable zeroed grain"
    );
    o.zeroed_grain = false;
    o.backing_file = Some("b".into());
    assert_eq!(
        e(VmdkWriter::create(&mut s, &o, false, 1 << 20, Some(1))),
        "Flat image can't have backing file"
    );
    o.backing_file = None;
    // qemu-img creates the files, then refuses -c for flat extents.
    assert_eq!(
        e(VmdkWriter::create(&mut s, &o, true, 1 << 20, None)),
        "invalid cluster size"
    );
    assert!(s.lens[0] > 0 && s.lens[1] == 1 << 20);
    let mut o = opts(VmdkSubformat::MonolithicSparse);
    o.compat6 = true;
    o.hwversion = Some("7".into());
    assert_eq!(
        e(VmdkWriter::create(&mut s, &o, false, 1, None)),
        "compat6 cannot be enabled with hwversion set"
    );
    o.compat6 = false;
    o.backing_file = Some("b".into());
    assert!(e(VmdkWriter::create(&mut s, &o, false, 1, None)).contains("not implemented yet"));
    // Empty disks: qemu-img makes the files and then fails.
    let o = opts(VmdkSubformat::StreamOptimized);
    let mut s = Store::new(&["z.vmdk".to_string()]);
    assert_eq!(
        e(VmdkWriter::create(&mut s, &o, false, 0, None)),
        "Could not open 'z.vmdk': Unsupported image type 'streamOptimized'"
    );
    assert_eq!(s.lens[0], 65536);
    assert!(desc_text(&s, &o).contains("RW 0 SPARSE \"z.vmdk\"\n"));
    // -c with a sparse subformat writes plain grains, as qemu does.
    let o = opts(VmdkSubformat::MonolithicSparse);
    let mut s = Store::new(&["c.vmdk".to_string()]);
    let mut w = VmdkWriter::create(&mut s, &o, true, 1 << 20, None).unwrap();
    w.write(&mut s, 0, &[5; 65536]).unwrap();
    Box::new(w).finish(&mut s).unwrap();
    assert!(matches!(&grains(&s, 0)[0], Grain::Data(d) if d[..] == [5; 65536][..]));
}

#[test]
fn backing_cid_comes_from_a_vmdk_backing_file() {
    let mut s = write_image(
        &opts(VmdkSubformat::MonolithicSparse),
        "b.vmdk",
        65536,
        &[],
        None,
    )
    .unwrap();
    let i = vmdk::info(&mut s, 0, "b.vmdk").unwrap();
    let Some(FormatSpecific::Vmdk(v)) = &i.format_specific else {
        panic!()
    };
    assert_eq!(u64::from(parent_cid(&i).unwrap()), v.cid);
    let raw = ImageInfo {
        format: "raw".into(),
        ..Default::default()
    };
    assert_eq!(
        parent_cid(&raw).unwrap_err().message,
        "Invalid backing file format: raw. Must be vmdk"
    );
}

#[test]
fn cid_follows_the_content() {
    let o = opts(VmdkSubformat::MonolithicSparse);
    let cid = |d: u8| {
        let s = write_image(&o, "a.vmdk", 1 << 20, &[Op::Data(0, vec![d; 4096])], None).unwrap();
        let mut files = s;
        let i = vmdk::info(&mut files, 0, "a.vmdk").unwrap();
        let Some(FormatSpecific::Vmdk(v)) = &i.format_specific else {
            panic!()
        };
        v.cid
    };
    assert_eq!(cid(1), cid(1));
    assert_ne!(cid(1), cid(2));
}

#[test]
fn memory_stays_bounded_and_writes_are_batched() {
    // 1 GiB of data in 1 MiB calls: whole grains go out in one sink write
    // per call plus one per finished grain table (two copies).
    let o = opts(VmdkSubformat::MonolithicSparse);
    let mut s = Store::new(&["a.vmdk".to_string()]);
    let mut w = VmdkWriter::create(&mut s, &o, false, 64 << 20, None).unwrap();
    let before = s.writes;
    let chunk = vec![3u8; 1 << 20];
    for i in 0..64u64 {
        w.write(&mut s, i << 20, &chunk).unwrap();
    }
    Box::new(w).finish(&mut s).unwrap();
    // 64 data writes, 2 tables x 2 copies, the descriptor.
    assert_eq!(s.writes - before, 64 + 4 + 1);
}
