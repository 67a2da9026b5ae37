//! vhdx target, laid out as qemu-img 10.0 `convert -O vhdx` leaves it
//! (vhdx_co_create, then qemu's allocating writes):
//!
//! ```text
//! 0      file identifier ("vhdxfile", creator)
//! 64K    header 1, 128K header 2 (CRC-32C, sequence numbers)
//! 192K   region table 1, 256K region table 2 (BAT, metadata)
//! 1M     log (log_size, empty: the headers name no log GUID)
//! 1M+log BAT (payload entries, a sector bitmap entry after every
//!        chunk_ratio of them), rounded up to 1 MiB
//! then   metadata (1 MiB), then 4 MiB qemu keeps free
//! data   payload blocks
//! ```
//!
//! Dynamic images get a block at the end of the file (1 MiB aligned) when
//! data first lands in it, in guest order; other blocks stay ZERO
//! (`block_state_zero`, qemu's default) or NOT_PRESENT. Fixed images have
//! every block preallocated in place, unless `block_state_zero` is on:
//! then qemu marks every block ZERO (offset 0), leaves the preallocated
//! space a hole and appends blocks that receive data, exactly as a dynamic
//! image; this writer does the same so that sizes and maps match qemu's.
//! Sector bitmap entries are never allocated (no differencing images).
//!
//! GUIDs and sequence numbers are derived (see [`super::ident`]) where qemu
//! draws random ones.

use super::ident::Ident;
use super::table::{Entry, TableWriter};
use super::{is_zero, ImageWriter, Sink};
use crate::vhdx::{
    Crc32c, BAT_GUID, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, FILE_PARAM_GUID, HEADER1_OFFSET,
    HEADER2_OFFSET, HEADER_SIZE, LOGICAL_SECTOR_GUID, LOG_MIN_SIZE, MAX_SECTORS_PER_BLOCK,
    METADATA_GUID, META_FLAGS_IS_REQUIRED, PAGE83_GUID, PAYLOAD_BLOCK_FULLY_PRESENT,
    PHYS_SECTOR_GUID, REGION_TABLE_OFFSET, REGION_TABLE_SIZE, VIRTUAL_SIZE_GUID,
};
use crate::Result;
use alloc::boxed::Box;
use alloc::vec;
use instar_wire::convert::{VhdSubformat, VhdxOptions};
use instar_wire::ImageError;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const SECTOR: u64 = 512;
/// VHDX_MAX_IMAGE_SIZE.
const MAX_IMAGE_SIZE: u64 = 64 * TIB;
/// VHDX_HEADER_SECTION_END: the log starts here.
const HEADER_SECTION_END: u64 = MIB;
const REGION_TABLE2_OFFSET: u64 = 256 * 1024;
const METADATA_LENGTH: u64 = MIB;
/// The metadata items follow the 64 KiB table.
const METADATA_ITEMS: u64 = 64 * 1024;
/// Free space qemu leaves after the metadata before the first block.
const DATA_GAP: u64 = 5 * MIB;
const PAYLOAD_BLOCK_ZERO: u64 = 2;
const META_FLAGS_IS_VIRTUAL_DISK: u32 = 2;
const PARAMS_LEAVE_BLOCKS_ALLOCED: u32 = 1;
/// Bytes per write the engine is asked for when blocks are large.
const PREFERRED_WRITE: u64 = 2 * MIB;

fn err(msg: &str) -> ImageError {
    ImageError::operation(msg)
}

/// Where everything of a vhdx image goes, from its options and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Virtual size (the requested size rounded up to a sector).
    pub image_size: u64,
    /// Payload block size.
    pub block_size: u64,
    /// Log region length.
    pub log_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks covering the image.
    pub data_blocks: u64,
    /// BAT entries qemu counts (payload and sector bitmap).
    pub bat_entries: u64,
    /// BAT region offset.
    pub bat_offset: u64,
    /// BAT region length (whole MiBs).
    pub bat_length: u64,
    /// Metadata region offset.
    pub metadata_offset: u64,
    /// Where qemu's data area starts (fixed blocks, or the first dynamic
    /// block).
    pub data_offset: u64,
}

/// vhdx_co_create_opts and vhdx_co_create: the rounding and checks qemu
/// applies to the options, with its messages.
pub fn layout(opts: &VhdxOptions, size: u64) -> Result<Layout> {
    let image_size = size
        .checked_next_multiple_of(SECTOR)
        .filter(|&s| s <= MAX_IMAGE_SIZE)
        .ok_or_else(|| err("Image size too large; max of 64TB"))?;
    // qemu's ROUND_UP wraps; a log size that wraps to 0 is then refused.
    let log_size = opts.log_size.wrapping_add(MIB - 1) & !(MIB - 1);
    if log_size > u64::from(u32::MAX) {
        return Err(err("Log size must be smaller than 4 GB"));
    }
    if log_size < LOG_MIN_SIZE || !log_size.is_multiple_of(MIB) {
        return Err(err("Log size must be a multiple of 1 MB"));
    }
    let mut block_size = opts.block_size.wrapping_add(MIB - 1) & !(MIB - 1);
    block_size = block_size.min(u64::from(BLOCK_SIZE_MAX));
    if block_size == 0 {
        // "These are pretty arbitrary, and mainly designed to keep the BAT
        // size reasonable to load into RAM" (qemu).
        block_size = if image_size > 32 * TIB {
            64 * MIB
        } else if image_size > 100 * GIB {
            32 * MIB
        } else if image_size > GIB {
            16 * MIB
        } else {
            8 * MIB
        };
    }
    if block_size < u64::from(BLOCK_SIZE_MIN) || !block_size.is_multiple_of(MIB) {
        return Err(err("Block size must be a multiple of 1 MB"));
    }
    if !block_size.is_power_of_two() {
        return Err(err("Block size must be a power of two"));
    }
    let chunk_ratio = MAX_SECTORS_PER_BLOCK * SECTOR / block_size;
    // vhdx_calc_bat_entries in qemu's uint32_t: an empty image counts
    // (0 - 1) >> bits sector bitmap entries, and qemu writes them all.
    let data_blocks = image_size.div_ceil(block_size) as u32;
    let bitmaps = data_blocks.wrapping_sub(1) >> chunk_ratio.trailing_zeros();
    let bat_entries = u64::from(data_blocks.wrapping_add(bitmaps));
    let bat_offset = (HEADER_SECTION_END + log_size).next_multiple_of(MIB);
    let bat_length = (bat_entries * 8).next_multiple_of(MIB);
    let metadata_offset = bat_offset + bat_length;
    Ok(Layout {
        image_size,
        block_size,
        log_size,
        chunk_ratio,
        data_blocks: u64::from(data_blocks),
        bat_entries,
        bat_offset,
        bat_length,
        metadata_offset,
        data_offset: bat_offset + bat_length + DATA_GAP,
    })
}

/// The virtual size of a vhdx target created for `size` bytes.
pub fn target_size(opts: &VhdxOptions, size: u64) -> Result<u64> {
    Ok(layout(opts, size)?.image_size)
}

/// BAT index of payload block `p`: a sector bitmap entry follows every
/// `chunk_ratio` payload entries.
fn bat_index(l: &Layout, p: u64) -> u64 {
    p + p / l.chunk_ratio
}

/// A GUID stored the Microsoft way (first three fields little-endian).
fn ms_order(u: [u8; 16]) -> [u8; 16] {
    let mut g = u;
    g[..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    g
}

/// Store the CRC-32C of `buf` (checksum field at 4..8 taken as zero).
fn seal(buf: &mut [u8]) {
    buf[4..8].fill(0);
    let mut c = Crc32c::new();
    c.update(buf);
    let v = c.finish();
    buf[4..8].copy_from_slice(&v.to_le_bytes());
}

/// Writes a vhdx image.
pub struct VhdxWriter {
    l: Layout,
    fixed: bool,
    /// Fixed without block_state_zero: every block has its place already.
    preallocated: bool,
    bat: TableWriter,
    /// qemu's idea of the file length: new blocks go at its next MiB.
    file_len: u64,
    /// The payload block being written and its file offset.
    current: Option<(u64, u64)>,
    ident: Ident,
    /// End of the last write: writes must come in ascending order.
    next: u64,
}

impl VhdxWriter {
    /// Start a vhdx image for `virtual_size` bytes.
    pub fn create(sink: &mut dyn Sink, opts: &VhdxOptions, virtual_size: u64) -> Result<Self> {
        let l = layout(opts, virtual_size)?;
        let fixed = opts.subformat == VhdSubformat::Fixed;
        let zero = opts.block_state_zero;
        let preallocated = fixed && !zero;
        let ll = l;
        let default = move |i: u64| {
            let group = ll.chunk_ratio + 1;
            if i % group == ll.chunk_ratio {
                return 0; // sector bitmap block
            }
            let p = i - i / group;
            if p >= ll.data_blocks {
                0
            } else if zero {
                PAYLOAD_BLOCK_ZERO
            } else if preallocated {
                (ll.data_offset + p * ll.block_size) | PAYLOAD_BLOCK_FULLY_PRESENT
            } else {
                0
            }
        };
        // qemu writes the whole BAT region when it has anything but zeros
        // to say (fixed, or ZERO entries); otherwise the file stays a hole.
        let bat = TableWriter::new(
            0,
            l.bat_offset,
            l.bat_length / 8,
            Entry::Le64,
            Box::new(default),
            fixed || zero,
        );
        let mut ident = Ident::new("vhdx");
        ident.bytes(sink.output_name(0).unwrap_or("").as_bytes());
        for v in [
            l.image_size,
            l.block_size,
            l.log_size,
            u64::from(fixed),
            u64::from(zero),
        ] {
            ident.u64(v);
        }
        Ok(Self {
            l,
            fixed,
            preallocated,
            bat,
            file_len: if fixed {
                l.data_offset + l.image_size
            } else {
                l.data_offset
            },
            current: None,
            ident,
            next: 0,
        })
    }

    /// Where everything goes.
    pub fn layout(&self) -> &Layout {
        &self.l
    }

    fn block_base(&mut self, sink: &mut dyn Sink, p: u64) -> Result<u64> {
        if let Some((b, base)) = self.current {
            if b == p {
                return Ok(base);
            }
        }
        let base = if self.preallocated {
            self.l.data_offset + p * self.l.block_size
        } else {
            // vhdx_allocate_block: at the end of the file, MiB-aligned.
            let base = self.file_len.next_multiple_of(MIB);
            self.file_len = base + self.l.block_size;
            let index = bat_index(&self.l, p);
            self.bat
                .set(sink, index, base | PAYLOAD_BLOCK_FULLY_PRESENT)?;
            base
        };
        self.current = Some((p, base));
        Ok(base)
    }

    fn write_metadata(&self, sink: &mut dyn Sink) -> Result<()> {
        let mut t = vec![0u8; METADATA_ITEMS as usize];
        t[..8].copy_from_slice(b"metadata");
        t[10..12].copy_from_slice(&5u16.to_le_bytes());
        let both = META_FLAGS_IS_REQUIRED | META_FLAGS_IS_VIRTUAL_DISK;
        let items: [([u8; 16], u32, u32); 5] = [
            (FILE_PARAM_GUID, 8, META_FLAGS_IS_REQUIRED),
            (VIRTUAL_SIZE_GUID, 8, both),
            (PAGE83_GUID, 16, both),
            (LOGICAL_SECTOR_GUID, 4, both),
            (PHYS_SECTOR_GUID, 4, both),
        ];
        let mut at = METADATA_ITEMS as u32;
        for (k, (guid, len, bits)) in items.iter().enumerate() {
            let e = &mut t[32 + 32 * k..64 + 32 * k];
            e[..16].copy_from_slice(guid);
            e[16..20].copy_from_slice(&at.to_le_bytes());
            e[20..24].copy_from_slice(&len.to_le_bytes());
            e[24..28].copy_from_slice(&bits.to_le_bytes());
            at += len;
        }
        let mut d = [0u8; 40];
        d[..4].copy_from_slice(&(self.l.block_size as u32).to_le_bytes());
        let params = if self.fixed {
            PARAMS_LEAVE_BLOCKS_ALLOCED
        } else {
            0
        };
        d[4..8].copy_from_slice(&params.to_le_bytes());
        d[8..16].copy_from_slice(&self.l.image_size.to_le_bytes());
        d[16..32].copy_from_slice(&ms_order(self.ident.uuid(0)));
        d[32..36].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        d[36..40].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        sink.write_at(0, self.l.metadata_offset, &t)?;
        sink.write_at(0, self.l.metadata_offset + METADATA_ITEMS, &d)
    }

    fn write_regions(&self, sink: &mut dyn Sink) -> Result<()> {
        let mut r = vec![0u8; REGION_TABLE_SIZE];
        r[..4].copy_from_slice(b"regi");
        r[8..12].copy_from_slice(&2u32.to_le_bytes());
        let regions = [
            (BAT_GUID, self.l.bat_offset, self.l.bat_length),
            (METADATA_GUID, self.l.metadata_offset, METADATA_LENGTH),
        ];
        for (k, (guid, offset, length)) in regions.iter().enumerate() {
            let e = &mut r[16 + 32 * k..48 + 32 * k];
            e[..16].copy_from_slice(guid);
            e[16..24].copy_from_slice(&offset.to_le_bytes());
            // bat_length <= 512 MiB (64 TiB in 1 MiB blocks); qemu leaves
            // the "required" bit clear.
            e[24..28].copy_from_slice(&(*length as u32).to_le_bytes());
        }
        seal(&mut r);
        sink.write_at(0, REGION_TABLE_OFFSET, &r)?;
        sink.write_at(0, REGION_TABLE2_OFFSET, &r)
    }

    fn write_headers(&self, sink: &mut dyn Sink) -> Result<()> {
        let file_write = ms_order(self.ident.uuid(1));
        let data_write = ms_order(self.ident.uuid(2));
        for (seq, at) in [(1u64, HEADER1_OFFSET), (2, HEADER2_OFFSET)] {
            let mut h = vec![0u8; HEADER_SIZE];
            h[..4].copy_from_slice(b"head");
            h[8..16].copy_from_slice(&seq.to_le_bytes());
            h[16..32].copy_from_slice(&file_write);
            h[32..48].copy_from_slice(&data_write);
            // log_guid stays zero: no log entries to replay.
            h[66..68].copy_from_slice(&1u16.to_le_bytes());
            h[68..72].copy_from_slice(&(self.l.log_size as u32).to_le_bytes());
            h[72..80].copy_from_slice(&HEADER_SECTION_END.to_le_bytes());
            seal(&mut h);
            sink.write_at(0, at, &h)?;
        }
        let mut id = vec![0u8; 8];
        id.copy_from_slice(b"vhdxfile");
        let creator = concat!("instar v", env!("CARGO_PKG_VERSION"));
        for u in creator.encode_utf16() {
            id.extend_from_slice(&u.to_le_bytes());
        }
        sink.write_at(0, 0, &id)
    }
}

impl ImageWriter for VhdxWriter {
    fn granularity(&self) -> u64 {
        if self.preallocated {
            64 << 10
        } else {
            self.l.block_size.min(PREFERRED_WRITE)
        }
    }

    fn write(&mut self, sink: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| offset >= self.next && e <= self.l.image_size)
            .ok_or_else(|| err("internal error: vhdx write out of order or past the end"))?;
        self.next = end;
        self.ident.write(offset, data);
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let p = at / self.l.block_size;
            let within = at % self.l.block_size;
            let n = ((self.l.block_size - within) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            let fresh = !self.preallocated && self.current.is_none_or(|(b, _)| b != p);
            if fresh && is_zero(piece) {
                // A block that would only get zeros stays unallocated (it
                // reads as zeros), however the engine cut its writes.
                done += n;
                continue;
            }
            let base = self.block_base(sink, p)?;
            sink.write_at(0, base + within, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn zero(&mut self, _sink: &mut dyn Sink, offset: u64, len: u64) -> Result<()> {
        // Unallocated and ZERO blocks read as zeros; qemu-img convert
        // writes nothing for zeros to a vhdx target either.
        self.next = offset.saturating_add(len).max(self.next);
        Ok(())
    }

    fn finish(self: Box<Self>, sink: &mut dyn Sink) -> Result<()> {
        let this = *self;
        this.write_metadata(sink)?;
        this.write_regions(sink)?;
        this.write_headers(sink)?;
        let len = this.file_len;
        this.bat.finish(sink)?;
        sink.set_len(0, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::MemSink;
    use crate::MemFiles;
    use alloc::vec::Vec;

    fn opts(subformat: VhdSubformat, block_size: u64, log_size: u64, zero: bool) -> VhdxOptions {
        VhdxOptions {
            subformat,
            block_size,
            log_size,
            block_state_zero: zero,
        }
    }

    fn build(o: VhdxOptions, size: u64, chunks: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut sink = MemSink::new(&["t.vhdx"]);
        let mut w: Box<dyn ImageWriter> =
            Box::new(VhdxWriter::create(&mut sink, &o, size).unwrap());
        for (off, d) in chunks {
            w.write(&mut sink, *off, d).unwrap();
        }
        w.finish(&mut sink).unwrap();
        sink.files.remove(0)
    }

    fn le64(b: &[u8], at: u64) -> u64 {
        crate::bytes::le64(b, at as usize)
    }

    /// Guest bytes, read through the BAT the way qemu's vhdx driver does.
    fn read(img: &[u8], l: &Layout) -> Vec<u8> {
        let mut out = vec![0u8; l.image_size as usize];
        for p in 0..l.data_blocks {
            let e = le64(img, l.bat_offset + 8 * bat_index(l, p));
            if e & 7 != PAYLOAD_BLOCK_FULLY_PRESENT {
                continue;
            }
            let off = (e & !0xfffff) as usize;
            let start = (p * l.block_size) as usize;
            let n = (l.image_size as usize - start).min(l.block_size as usize);
            out[start..start + n].copy_from_slice(&img[off..off + n]);
        }
        out
    }

    #[test]
    fn layouts_match_qemu() {
        // qemu-img 10.0.2 create -f vhdx: region offsets and lengths.
        let d = |bs, log| opts(VhdSubformat::Dynamic, bs, log, true);
        let l = layout(&d(0, MIB), 10 << 20).unwrap();
        assert_eq!(
            (l.block_size, l.bat_offset, l.bat_length, l.metadata_offset),
            (8 * MIB, 2 * MIB, MIB, 3 * MIB)
        );
        assert_eq!(l.data_offset, 8 * MIB);
        let l = layout(&d(0, MIB), 0).unwrap();
        assert_eq!(
            (l.bat_entries, l.bat_length, l.metadata_offset),
            (0x7f_ffff, 64 * MIB, 66 * MIB)
        );
        assert_eq!(layout(&d(0, MIB), 2 * GIB).unwrap().block_size, 16 * MIB);
        assert_eq!(layout(&d(0, MIB), 200 * GIB).unwrap().block_size, 32 * MIB);
        assert_eq!(
            layout(&d(3 * MIB / 2, 1000), GIB).unwrap().block_size,
            2 * MIB
        );
        assert_eq!(
            layout(&d(3 * MIB, MIB), GIB).unwrap_err().message,
            "Block size must be a power of two"
        );
        let l = layout(&d(1 << 40, 1000), GIB).unwrap();
        assert_eq!((l.block_size, l.log_size), (256 * MIB, MIB));
        assert_eq!(
            layout(&d(0, 0), GIB).unwrap_err().message,
            "Log size must be a multiple of 1 MB"
        );
        assert_eq!(
            layout(&d(0, 4 * GIB), GIB).unwrap_err().message,
            "Log size must be smaller than 4 GB"
        );
        assert_eq!(
            layout(&d(0, MIB), 65 * TIB).unwrap_err().message,
            "Image size too large; max of 64TB"
        );
        assert_eq!(layout(&d(0, MIB), 12345).unwrap().image_size, 12800);
        let l = layout(&d(MIB, 3 * MIB), 64 * TIB).unwrap();
        assert_eq!(
            (l.bat_offset, l.bat_entries),
            (4 * MIB, (64 << 20) + (1 << 14) - 1)
        );
    }

    #[test]
    fn dynamic_roundtrip_and_info() {
        for zero in [true, false] {
            let o = opts(VhdSubformat::Dynamic, MIB, MIB, zero);
            let size = 5000 * 1024 + 512;
            let a: Vec<u8> = (0..70000u32).map(|i| (i % 253) as u8 + 1).collect();
            let b = vec![5u8; (2 * MIB + 1000) as usize];
            let img = build(o, size, &[(MIB - 100, a.clone()), (2 * MIB + 7, b.clone())]);
            let l = layout(&o, size).unwrap();
            let info = crate::vhdx::info(&mut MemFiles::new(img.clone()), 0, "t.vhdx").unwrap();
            assert_eq!((info.virtual_size, info.cluster_size), (size, Some(MIB)));
            let mut want = vec![0u8; size as usize];
            want[(MIB - 100) as usize..][..a.len()].copy_from_slice(&a);
            want[(2 * MIB + 7) as usize..][..b.len()].copy_from_slice(&b);
            assert!(read(&img, &l) == want);
            let (guest, _) = crate::write::vpc::tests::via_map(&img, "vhdx");
            assert!(guest == want);
            // Blocks 0..=4 allocated in order from data_offset; the file
            // ends with the last full block.
            for p in 0..5 {
                assert_eq!(
                    le64(&img, l.bat_offset + 8 * p),
                    (l.data_offset + p * MIB) | 6
                );
            }
            assert_eq!(img.len() as u64, l.data_offset + 5 * MIB);
        }
    }

    #[test]
    fn fixed_preallocated_and_zero() {
        let size = 3 * MIB + 512;
        let data = vec![3u8; 1000];
        let o = opts(VhdSubformat::Fixed, MIB, MIB, false);
        let img = build(o, size, &[(2 * MIB + 5, data.clone())]);
        let l = layout(&o, size).unwrap();
        assert_eq!(img.len() as u64, l.data_offset + size);
        for p in 0..4 {
            assert_eq!(
                le64(&img, l.bat_offset + 8 * p),
                (l.data_offset + p * MIB) | 6
            );
        }
        assert!(crate::vhdx::info(&mut MemFiles::new(img.clone()), 0, "t.vhdx").is_ok());
        assert_eq!(read(&img, &l)[(2 * MIB + 5) as usize..][..1000], data[..]);

        // block_state_zero: ZERO entries, data appended after the hole.
        let o = opts(VhdSubformat::Fixed, MIB, MIB, true);
        let img = build(o, size, &[(2 * MIB + 5, data.clone())]);
        let at = (l.data_offset + size).next_multiple_of(MIB);
        assert_eq!(le64(&img, l.bat_offset), 2);
        assert_eq!(le64(&img, l.bat_offset + 16), at | 6);
        assert_eq!(img.len() as u64, at + MIB);
        assert_eq!(read(&img, &l)[(2 * MIB + 5) as usize..][..1000], data[..]);
        let (guest, _) = crate::write::vpc::tests::via_map(&img, "vhdx");
        assert_eq!(guest[(2 * MIB + 5) as usize..][..1000], data[..]);
    }

    #[test]
    fn empty_and_checksums() {
        let o = opts(VhdSubformat::Dynamic, 0, MIB, true);
        let img = build(o, 0, &[]);
        let info = crate::vhdx::info(&mut MemFiles::new(img.clone()), 0, "t.vhdx").unwrap();
        assert_eq!(info.virtual_size, 0);
        assert_eq!(img.len() as u64, 71 * MIB);
        // Both headers valid (the reader takes either alone).
        for at in [HEADER1_OFFSET, HEADER2_OFFSET] {
            let mut b = img.clone();
            let other = if at == HEADER1_OFFSET {
                HEADER2_OFFSET
            } else {
                HEADER1_OFFSET
            };
            b[other as usize + 100] ^= 1;
            assert!(crate::vhdx::info(&mut MemFiles::new(b), 0, "t.vhdx").is_ok());
        }
    }

    #[test]
    fn zeros_do_not_allocate() {
        let o = opts(VhdSubformat::Dynamic, MIB, MIB, false);
        let mut d = vec![0u8; (3 * MIB / 2) as usize];
        d[(3 * MIB / 2) as usize - 1] = 1;
        let img = build(o, 2 * MIB, &[(0, d)]);
        let l = layout(&o, 2 * MIB).unwrap();
        assert_eq!(le64(&img, l.bat_offset), 0);
        assert_eq!(le64(&img, l.bat_offset + 8), l.data_offset | 6);
    }

    /// Keeps only what lands in the BAT: big images without the memory.
    struct BatSink {
        bat: Vec<u8>,
        at: u64,
        len: u64,
    }

    impl Sink for BatSink {
        fn write_at(&mut self, _f: instar_wire::OutId, offset: u64, data: &[u8]) -> Result<()> {
            for (k, &b) in data.iter().enumerate() {
                let o = offset + k as u64;
                if (self.at..self.at + self.bat.len() as u64).contains(&o) {
                    self.bat[(o - self.at) as usize] = b;
                }
            }
            self.len = self.len.max(offset + data.len() as u64);
            Ok(())
        }
        fn set_len(&mut self, _f: instar_wire::OutId, length: u64) -> Result<()> {
            self.len = length;
            Ok(())
        }
        fn output_name(&self, _f: instar_wire::OutId) -> Option<&str> {
            None
        }
    }

    #[test]
    fn chunk_ratio_interleave() {
        // A sector bitmap entry follows every chunk_ratio payload entries
        // (4096 for 1 MiB blocks, 16 for 256 MiB): the first block after
        // one lands one index further.
        for (bs, cr) in [(MIB, 4096u64), (256 * MIB, 16)] {
            let o = opts(VhdSubformat::Dynamic, bs, MIB, true);
            let size = (cr + 3) * bs;
            let l = layout(&o, size).unwrap();
            assert_eq!((l.chunk_ratio, l.bat_entries), (cr, cr + 4));
            let mut sink = BatSink {
                bat: vec![0; l.bat_length as usize],
                at: l.bat_offset,
                len: 0,
            };
            let mut w: Box<dyn ImageWriter> =
                Box::new(VhdxWriter::create(&mut sink, &o, size).unwrap());
            w.write(&mut sink, (cr - 1) * bs + 5, &[1; 10]).unwrap();
            w.write(&mut sink, cr * bs, &[1; 10]).unwrap();
            w.finish(&mut sink).unwrap();
            let e = |i: u64| le64(&sink.bat, 8 * i);
            assert_eq!(e(cr - 2), PAYLOAD_BLOCK_ZERO);
            assert_eq!(e(cr - 1), l.data_offset | 6);
            assert_eq!(e(cr), 0, "sector bitmap entry");
            assert_eq!(e(cr + 1), (l.data_offset + bs) | 6);
            assert_eq!(e(cr + 2), PAYLOAD_BLOCK_ZERO);
            assert_eq!(e(cr + 4), 0, "past the last entry");
            assert_eq!(sink.len, l.data_offset + 2 * bs);
        }
    }
}
