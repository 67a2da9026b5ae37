//! cloop compressed loop images (qemu's `cloop` driver, V2.0 format): a
//! shell-script preamble, at byte 128 the big-endian block size and block
//! count, then `n_blocks + 1` big-endian 64-bit offsets of zlib-compressed
//! blocks.
//!
//! qemu validates the whole offsets table at open (monotonic, no block
//! larger than 128 MiB), so `info` walks it too, streaming: no table is
//! held in memory. Entries past the end of the file read as zeros, which
//! the walk uses to stop early.

use crate::block;
use crate::bytes::{be32, be64};
use crate::limits::TABLE_CHUNK;
use crate::{Files, Result};
use alloc::format;
use alloc::vec;
use instar_wire::{FileId, ImageError, ImageInfo};

/// Largest block qemu accepts (its MAX_BLOCK_SIZE, 64 MiB: it allocates one
/// decompressed block).
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024 * 1024;

/// Largest compressed block qemu accepts: twice MAX_BLOCK_SIZE.
pub const MAX_COMPRESSED_BLOCK: u64 = 2 * MAX_BLOCK_SIZE as u64;

/// Largest offsets table qemu accepts (512 MiB: "image requires too many
/// offsets").
pub const MAX_OFFSETS_BYTES: u32 = 512 * 1024 * 1024;

const MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
const HEADER_AT: u64 = 128;
const TABLE_AT: u64 = 136;

/// The two header words at byte 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Uncompressed block size in bytes.
    pub block_size: u32,
    /// Number of blocks.
    pub n_blocks: u32,
}

impl Header {
    /// Decode the 8 bytes at offset 128.
    pub fn parse(b: &[u8; 8]) -> Self {
        Header {
            block_size: be32(b, 0),
            n_blocks: be32(b, 4),
        }
    }

    /// Encode, for tests and tools.
    pub fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.block_size.to_be_bytes());
        b[4..].copy_from_slice(&self.n_blocks.to_be_bytes());
        b
    }
}

/// qemu's probe: the V2.0 preamble (as much of it as the buffer holds)
/// scores 2.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    let n = MAGIC.len().min(buf.len());
    if buf[..n] == MAGIC[..n] {
        2
    } else {
        0
    }
}

fn err(msg: impl Into<alloc::string::String>) -> ImageError {
    ImageError::open(msg)
}

/// Open the image as qemu does and describe it.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    let mut b = [0u8; 8];
    files.read_at(file, HEADER_AT, &mut b)?;
    let h = Header::parse(&b);
    let bs = h.block_size;
    if !bs.is_multiple_of(512) {
        return Err(err(format!("block_size {bs} must be a multiple of 512")));
    }
    if bs == 0 {
        return Err(err("block_size cannot be zero"));
    }
    if bs > MAX_BLOCK_SIZE {
        return Err(err(format!(
            "block_size {bs} must be {} MB or less",
            MAX_BLOCK_SIZE / (1024 * 1024)
        )));
    }
    let n = h.n_blocks;
    let max_n = (u32::MAX - 1) / 8;
    if n > max_n {
        return Err(err(format!("n_blocks {n} must be {max_n} or less")));
    }
    // qemu computes the table size in 32 bits: n = max_n wraps it to 0, and
    // its allocation of 0 bytes fails.
    let offsets_size = n.wrapping_add(1).wrapping_mul(8);
    if offsets_size > MAX_OFFSETS_BYTES {
        return Err(err(
            "image requires too many offsets, try increasing block size",
        ));
    }
    if offsets_size == 0 {
        return Err(err("Could not allocate offsets table"));
    }

    walk_offsets(files, file, n)?;

    // qemu multiplies in 32 bits too, so huge images wrap.
    let total_sectors = n.wrapping_mul(bs / 512);
    let virtual_size = block::virtual_size(i64::from(total_sectors), filename)?;
    Ok(ImageInfo {
        format: "cloop".into(),
        virtual_size,
        children: block::single_child(file),
        ..ImageInfo::default()
    })
}

/// qemu's checks on the offsets table: non-decreasing, and no compressed
/// block over MAX_COMPRESSED_BLOCK.
fn walk_offsets(files: &mut dyn Files, file: FileId, n_blocks: u32) -> Result<()> {
    let len = files.len(file)?;
    let entries = u64::from(n_blocks) + 1;
    let mut chunk = vec![0u8; TABLE_CHUNK];
    let mut prev = 0u64;
    let mut i = 0u64;
    while i < entries {
        let at = TABLE_AT + i * 8;
        if at >= len {
            // Everything from here reads as zero: fine after a zero, and
            // "not monotonic" right here after anything else.
            if i > 0 && prev > 0 {
                return Err(not_monotonic(i));
            }
            return Ok(());
        }
        let count = (entries - i).min((TABLE_CHUNK / 8) as u64) as usize;
        files.read_at(file, at, &mut chunk[..count * 8])?;
        for e in chunk[..count * 8].chunks_exact(8) {
            let off = be64(e, 0);
            if i > 0 {
                if off < prev {
                    return Err(not_monotonic(i));
                }
                if off - prev > MAX_COMPRESSED_BLOCK {
                    return Err(err(format!(
                        "invalid compressed block size at index {i}, image file is corrupt"
                    )));
                }
            }
            prev = off;
            i += 1;
        }
    }
    Ok(())
}

fn not_monotonic(i: u64) -> ImageError {
    err(format!(
        "offsets not monotonically increasing at index {i}, image file is corrupt"
    ))
}

/// A cloop image opened for reads. qemu's driver has no block status, so
/// the block layer calls every byte data without an offset
/// ([`crate::map::Mapping::Opaque`]); reads inflate whole blocks as
/// `cloop_read_block` does, the last one kept.
pub struct CloopMap {
    file: FileId,
    size: u64,
    header: Header,
    offsets: crate::sectored::TableWindow,
    inflater: crate::sectored::Inflater,
    /// One inflated block (at most [`MAX_BLOCK_SIZE`]), allocated on the
    /// first read.
    block: alloc::vec::Vec<u8>,
    current: Option<u32>,
}

impl CloopMap {
    /// Open as qemu does (the same checks as `info`).
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let info = info(files, file, filename)?;
        let mut b = [0u8; 8];
        files.read_at(file, HEADER_AT, &mut b)?;
        Ok(Self {
            file,
            size: info.virtual_size,
            header: Header::parse(&b),
            offsets: crate::sectored::TableWindow::new(),
            inflater: crate::sectored::Inflater::new(),
            block: alloc::vec::Vec::new(),
            current: None,
        })
    }

    fn offset(&mut self, files: &mut dyn Files, i: u64) -> Result<u64> {
        Ok(be64(
            self.offsets.get(files, self.file, TABLE_AT + i * 8, 8)?,
            0,
        ))
    }

    /// cloop_read_block.
    fn load(&mut self, files: &mut dyn Files, block: u32) -> Result<()> {
        use crate::block::{check_read, EIO};
        if self.current == Some(block) {
            return Ok(());
        }
        let start = self.offset(files, u64::from(block))?;
        let end = self.offset(files, u64::from(block) + 1)?;
        // qemu holds the size in 32 bits; open checked end >= start.
        let bytes = u64::from(end.wrapping_sub(start) as u32);
        if check_read(start as i64, bytes).is_err() {
            return Err(crate::sectored::read_error(EIO));
        }
        if self.block.is_empty() {
            self.block = alloc::vec![0u8; self.header.block_size as usize];
        }
        self.current = None;
        if !self.inflater.inflate_file(
            files,
            self.file,
            start,
            bytes,
            crate::sectored::Inflate::ZlibExact,
            &mut self.block,
        )? {
            return Err(crate::sectored::read_error(EIO));
        }
        self.current = Some(block);
        Ok(())
    }
}

impl crate::map::MapImage for CloopMap {
    fn format(&self) -> &'static str {
        "cloop"
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_status(
        &mut self,
        _files: &mut dyn Files,
        _offset: u64,
        len: u64,
    ) -> Result<crate::map::Extent> {
        Ok(crate::map::Extent::new(len, crate::map::Mapping::Opaque))
    }
    fn read(&mut self, files: &mut dyn Files, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = u64::from(self.header.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            // Below the virtual size, which counts at most n_blocks blocks.
            let block = (pos / bs) as u32;
            let into = (pos % bs) as usize;
            let n = (bs as usize - into).min(buf.len() - done);
            self.load(files, block)?;
            buf[done..done + n].copy_from_slice(&self.block[into..into + n]);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use alloc::string::String;
    use alloc::vec::Vec;
    use instar_wire::ErrorKind;

    /// An image shaped like the real-world `simple-pattern.cloop`: 16
    /// blocks of 64 KiB, offsets from 0x110 growing by 0x54 or 0x59.
    fn sample() -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(b"exit $?\n");
        v.resize(128, 0);
        v.extend_from_slice(
            &Header {
                block_size: 65536,
                n_blocks: 16,
            }
            .to_bytes(),
        );
        let mut off = 0x110u64;
        for i in 0..17u64 {
            v.extend_from_slice(&off.to_be_bytes());
            off += if i % 2 == 0 { 0x54 } else { 0x59 };
        }
        // Compressed data: a zlib header and then anything non-zero.
        v.extend_from_slice(&[0x78, 0xda, 0xed, 0xc1, 0x01, 0x01]);
        v.resize(1690, 0xaa);
        v
    }

    fn with(mut v: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
        if v.len() < at + bytes.len() {
            v.resize(at + bytes.len(), 0);
        }
        v[at..at + bytes.len()].copy_from_slice(bytes);
        v
    }

    fn run(data: Vec<u8>) -> Result<ImageInfo> {
        info(&mut MemFiles::new(data), 0, "c")
    }

    fn open_err(data: Vec<u8>) -> String {
        let e = run(data).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Open);
        e.message
    }

    fn header_only(block_size: u32, n_blocks: u32) -> Vec<u8> {
        with(
            sample(),
            128,
            &Header {
                block_size,
                n_blocks,
            }
            .to_bytes(),
        )[..136]
            .to_vec()
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            block_size: 65536,
            n_blocks: 16,
        };
        assert_eq!(Header::parse(&h.to_bytes()), h);
        assert_eq!(h.to_bytes(), [0, 1, 0, 0, 0, 0, 0, 0x10]);
    }

    #[test]
    fn probe_scores() {
        assert_eq!(probe(&sample(), "x"), 2);
        assert_eq!(probe(&MAGIC[..10], "x"), 2);
        assert_eq!(probe(b"#!/bin/sh\n#V3.0", "x"), 0);
    }

    #[test]
    fn sample_info() {
        // qemu-img info simple-pattern.cloop: 1048576 bytes.
        let i = run(sample()).unwrap();
        assert_eq!(
            (i.format.as_str(), i.virtual_size, i.cluster_size),
            ("cloop", 1048576, None)
        );
        assert_eq!(i.children, block::single_child(0));
    }

    #[test]
    fn header_refusals() {
        // Messages recorded from qemu-img 10.0.2 -f cloop.
        assert_eq!(open_err(vec![]), "block_size cannot be zero");
        assert_eq!(
            open_err(header_only(1000, 1)),
            "block_size 1000 must be a multiple of 512"
        );
        assert_eq!(
            open_err(header_only(67109376, 1)),
            "block_size 67109376 must be 64 MB or less"
        );
        assert_eq!(
            open_err(header_only(512, 536870912)),
            "n_blocks 536870912 must be 536870911 or less"
        );
        assert_eq!(
            open_err(header_only(512, 536870911)),
            "Could not allocate offsets table"
        );
        assert_eq!(
            open_err(header_only(512, 67108864)),
            "image requires too many offsets, try increasing block size"
        );
    }

    #[test]
    fn table_refusals() {
        assert_eq!(
            open_err(with(sample(), 144, &1u64.to_be_bytes())),
            "offsets not monotonically increasing at index 1, image file is corrupt"
        );
        assert_eq!(
            open_err(with(sample(), 144, &0x800_0110u64.to_be_bytes())),
            "offsets not monotonically increasing at index 2, image file is corrupt"
        );
        // One past the 128 MiB bound: qemu-img says index 1.
        assert_eq!(
            open_err(with(sample(), 144, &0x800_0111u64.to_be_bytes())),
            "invalid compressed block size at index 1, image file is corrupt"
        );
        // A table longer than the one written runs into compressed data.
        assert_eq!(
            open_err(with(sample(), 132, &100u32.to_be_bytes())),
            "invalid compressed block size at index 17, image file is corrupt"
        );
        // Truncated inside the table: zeros after non-zero offsets.
        assert_eq!(
            open_err(sample()[..200].to_vec()),
            "offsets not monotonically increasing at index 8, image file is corrupt"
        );
    }

    #[test]
    fn tables_past_eof() {
        // Header only: the whole table reads as zeros, which qemu accepts.
        assert_eq!(
            run(header_only(67108864, 67108863)).unwrap().virtual_size,
            2198956146688
        );
        // The 32-bit sector count wraps: 32768 blocks of 64 MiB are 0 bytes.
        assert_eq!(run(header_only(67108864, 32768)).unwrap().virtual_size, 0);
        assert_eq!(
            run(header_only(67108864, 32769)).unwrap().virtual_size,
            67108864
        );
        assert_eq!(run(header_only(512, 0)).unwrap().virtual_size, 0);
        // The sample cut at 130 bytes: block size 0x0001 then zeros is
        // 65536, no blocks; qemu-img reports 0 bytes.
        assert_eq!(run(sample()[..130].to_vec()).unwrap().virtual_size, 0);
        let e = [0u8, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(
            open_err(with(header_only(512, 5), 136, &e)),
            "offsets not monotonically increasing at index 1, image file is corrupt"
        );
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on simple-pattern.cloop cut short: without the
        // header words block_size reads as zero; cut inside the offsets
        // table, the first missing offset reads as zero.
        for n in [0, 1, 8, 64, 100, 128] {
            assert_eq!(
                open_err(sample()[..n].to_vec()),
                "block_size cannot be zero"
            );
        }
        assert_eq!(
            open_err(sample()[..200].to_vec()),
            "offsets not monotonically increasing at index 8, image file is corrupt"
        );
        let img = sample();
        crate::hostile::truncations(info, &img, "c", 400);
        crate::hostile::absurd_fields(info, &img, "c", 128..img.len(), &crate::hostile::no_fix);
    }

    /// A cloop image of the given zlib-compressed blocks.
    fn built(block_size: u32, blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.resize(128, 0);
        v.extend_from_slice(
            &Header {
                block_size,
                n_blocks: blocks.len() as u32,
            }
            .to_bytes(),
        );
        let mut off = TABLE_AT + 8 * (blocks.len() as u64 + 1);
        for b in blocks {
            v.extend_from_slice(&off.to_be_bytes());
            off += b.len() as u64;
        }
        v.extend_from_slice(&off.to_be_bytes());
        for b in blocks {
            v.extend_from_slice(b);
        }
        v
    }

    #[test]
    fn reads_inflate_whole_blocks() {
        use crate::map::{MapImage, Mapping};
        let a: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        let b = vec![0x42u8; 1024];
        let z = |d: &[u8]| miniz_oxide::deflate::compress_to_vec_zlib(d, 6);
        let img = built(1024, &[z(&a), z(&b)]);
        let orig = img.clone();
        let mut f = MemFiles::new(img);
        let mut m = CloopMap::open(&mut f, 0, "x").unwrap();
        assert_eq!(m.virtual_size(), 2048);
        let e = m.block_status(&mut f, 0, 2048).unwrap();
        assert_eq!((e.length, e.mapping), (2048, Mapping::Opaque));
        let mut buf = vec![0u8; 1024];
        m.read(&mut f, 512, &mut buf).unwrap();
        assert_eq!(buf[..512], a[512..]);
        assert_eq!(buf[512..], b[..512]);
        // A block inflating past block_size (a bomb) or short of it is
        // qemu's EIO, after at most block_size bytes of output.
        for bad in [vec![0u8; 64 * 1024], vec![0u8; 1000]] {
            let mut f = MemFiles::new(built(1024, &[z(&bad)]));
            let mut m = CloopMap::open(&mut f, 0, "x").unwrap();
            let e = m.read(&mut f, 0, &mut buf).unwrap_err();
            assert_eq!(e.message, "Input/output error");
        }
        // Map and reads of the image cut short or with absurd fields:
        // answers or errors, never a panic.
        fn walk(f: &mut dyn Files, file: FileId, _: &str) -> Result<ImageInfo> {
            crate::sectored::walk_map(f, file, "cloop")
        }
        crate::hostile::truncations(walk, &orig, "x", 200);
        crate::hostile::absurd_fields(walk, &orig, "x", 128..160, &crate::hostile::no_fix);
    }
}
