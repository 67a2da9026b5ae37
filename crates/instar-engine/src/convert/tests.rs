//! Engine-level convert of hand-built qcow2 images to raw in memory.

use super::*;
use instar_formats::qcow2::header::Qcow2Header;
use instar_formats::qcow2::tables::{OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use instar_formats::write::MemSink;
use instar_formats::MemFiles;
use instar_wire::convert::{Preallocation, TargetOptions};

const CS: usize = 64 << 10;
const SIZE: usize = 1 << 20;
const L2: usize = 0x40000;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// A 1 MiB qcow2 (64 KiB clusters) and the raw content it stands for:
/// cluster 0 data, 1 unallocated, 2 a zero cluster, 3 data whose last
/// 60 KiB are zeros, 4 zlib-compressed, 6 sharing cluster 0's host
/// cluster, 7-8 host-contiguous data, the rest unallocated.
fn image() -> (Vec<u8>, Vec<u8>) {
    let h = Qcow2Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: SIZE as u64,
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
    };
    let mut img = vec![0u8; 0xa0000];
    let hb = h.encode();
    img[..hb.len()].copy_from_slice(&hb);
    img[0x30000..0x30008].copy_from_slice(&(L2 as u64 | OFLAG_COPIED).to_be_bytes());
    let mut raw = vec![0u8; SIZE];
    let a = pattern(1, CS);
    img[0x50000..0x60000].copy_from_slice(&a);
    raw[0..CS].copy_from_slice(&a);
    raw[6 * CS..7 * CS].copy_from_slice(&a);
    let mut b = vec![0u8; CS];
    b[..4096].copy_from_slice(&pattern(2, 4096));
    img[0x60000..0x70000].copy_from_slice(&b);
    raw[3 * CS..4 * CS].copy_from_slice(&b);
    let c = pattern(3, CS);
    let packed = miniz_oxide::deflate::compress_to_vec(&c, 6);
    assert!(packed.len() < CS);
    img[0x70000..0x70000 + packed.len()].copy_from_slice(&packed);
    raw[4 * CS..5 * CS].copy_from_slice(&c);
    let d = pattern(4, 2 * CS);
    img[0x80000..0xa0000].copy_from_slice(&d);
    raw[7 * CS..9 * CS].copy_from_slice(&d);
    let sectors = (packed.len() as u64).div_ceil(512);
    let entries = [
        (0, 0x50000 | OFLAG_COPIED),
        (2, OFLAG_ZERO),
        (3, 0x60000 | OFLAG_COPIED),
        (4, OFLAG_COMPRESSED | ((sectors - 1) << 54) | 0x70000),
        (6, 0x50000 | OFLAG_COPIED),
        (7, 0x80000 | OFLAG_COPIED),
        (8, 0x90000 | OFLAG_COPIED),
    ];
    for (i, e) in entries {
        img[L2 + 8 * i..L2 + 8 * i + 8].copy_from_slice(&e.to_be_bytes());
    }
    (img, raw)
}

fn raw_target() -> ConvertTarget {
    ConvertTarget {
        options: TargetOptions::Raw {
            preallocation: Preallocation::Off,
        },
        compress: false,
        size: None,
    }
}

fn source(name: &str, format: &str) -> ConvertSource {
    ConvertSource {
        format: Some(format.into()),
        filename: name.into(),
    }
}

fn run(
    files: &mut MemFiles,
    sources: &[ConvertSource],
    sparse_size: u64,
) -> Result<(ConvertResult, Vec<u8>)> {
    let target = raw_target();
    let mut sink = MemSink::new(&["out.raw"]);
    let r = convert(
        files,
        &mut sink,
        &ConvertParams {
            sources,
            target: &target,
            sparse_size,
            snapshot: None,
            target_has_backing: false,
            max_chain_depth: 8,
            progress: true,
        },
    )?;
    Ok((r, sink.files.swap_remove(0)))
}

#[test]
fn qcow2_to_raw_is_content_exact() {
    let (img, raw) = image();
    let mut files = MemFiles::new(img);
    let (r, out) = run(&mut files, &[source("a.qcow2", "qcow2")], 4096).unwrap();
    assert_eq!(r.virtual_size, SIZE as u64);
    assert!(out == raw, "content differs");
    // Written: clusters 0, 4, 6, 7, 8 whole and the first 4 KiB of 3;
    // the 60 KiB of zeros in cluster 3 are left a hole (-S 4k).
    assert_eq!(r.bytes_written, (5 * CS + 4096) as u64);
}

#[test]
fn sparse_detection_off_writes_all_data() {
    let (img, raw) = image();
    let mut files = MemFiles::new(img);
    let (r, out) = run(&mut files, &[source("a.qcow2", "qcow2")], 0).unwrap();
    assert!(out == raw);
    assert_eq!(r.bytes_written, (6 * CS) as u64);
}

#[test]
fn sources_are_concatenated() {
    let (img, raw) = image();
    let second = pattern(9, 3000);
    let mut files = MemFiles::new(img);
    files.files.push(second.clone());
    let (r, out) = run(
        &mut files,
        &[source("a.qcow2", "qcow2"), source("b.raw", "raw")],
        4096,
    )
    .unwrap();
    // The raw source counts whole sectors: 3000 bytes are 3072.
    assert_eq!(r.virtual_size, (SIZE + 3072) as u64);
    let mut want = raw;
    want.extend_from_slice(&second);
    want.resize(SIZE + 3072, 0);
    assert!(out == want);
}

#[test]
fn corrupt_compressed_cluster_is_a_read_error() {
    let (mut img, _) = image();
    for b in &mut img[0x70000 + 8..0x70000 + 200] {
        *b ^= 0xa5;
    }
    let mut files = MemFiles::new(img);
    let e = run(&mut files, &[source("a.qcow2", "qcow2")], 4096).unwrap_err();
    assert_eq!(
        e.message,
        format!("error while reading at byte {}: Input/output error", 4 * CS)
    );
}

#[test]
fn snapshot_of_a_raw_image_is_refused() {
    let mut files = MemFiles::new(vec![1u8; 4096]);
    let target = raw_target();
    let mut sink = MemSink::new(&["out.raw"]);
    let e = convert(
        &mut files,
        &mut sink,
        &ConvertParams {
            sources: &[source("a.raw", "raw")],
            target: &target,
            sparse_size: 4096,
            snapshot: Some("s1"),
            target_has_backing: false,
            max_chain_depth: 8,
            progress: false,
        },
    )
    .unwrap_err();
    assert_eq!(e.message, "Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots");
}

#[test]
fn zero_detection_matches_qemu() {
    // 24 sectors: 2 data, 18 zero, 4 data; alignment 8.
    let mut buf = vec![0u8; 24 * 512];
    buf[..1024].fill(1);
    buf[20 * 512..].fill(1);
    // The data's end is aligned up to 8 sectors.
    assert_eq!(allocated_sectors(&buf, 24, 0, 8), (true, 8));
    // Zeros from 8 to 20: aligned down to 8 sectors; with -S of 8
    // sectors they end the data run.
    assert_eq!(allocated_sectors(&buf[8 * 512..], 16, 8, 8), (false, 8));
    assert_eq!(allocated_sectors_min(&buf, 24, 8, 0, 8), (true, 8));
    // With -S of 16 sectors they are too short: all data.
    assert_eq!(allocated_sectors_min(&buf, 24, 16, 0, 8), (true, 24));
    // A zero stretch that is only an unaligned tail counts as data.
    assert_eq!(allocated_sectors(&buf[16 * 512..], 8, 16, 8), (true, 8));
    assert!(is_zero(&[0u8; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
}
