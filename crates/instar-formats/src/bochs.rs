//! Bochs "growing" redolog images (qemu's `bochs` driver, read-only): a
//! 512-byte header naming the image type, a catalog of 32-bit extent
//! indices, then extents each preceded by a sector bitmap. Header versions
//! 1 (0x00010000: disk size right after the extent size) and 2
//! (0x00020000: a reserved word first).
//!
//! `info` needs only the header: qemu reads the catalog at open but nothing
//! in it can refuse the open (its size is checked before the read, and a
//! short file reads as zeros).

use crate::block;
use crate::bytes::{le32, le64};
use crate::{Files, Result};
use alloc::format;
use instar_wire::{FileId, ImageError, ImageInfo};

/// Largest catalog qemu accepts: 1M entries, qemu's bound for the largest
/// image bximage creates ("Catalog size is too large").
pub const MAX_CATALOG: u32 = 0x10_0000;

/// Largest extent qemu accepts ("Extent size %u is too large").
pub const MAX_EXTENT: u32 = 0x80_0000;

const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const TYPE_REDOLOG: &[u8] = b"Redolog";
const SUBTYPE_GROWING: &[u8] = b"Growing";
const VERSION_1: u32 = 0x0001_0000;
const VERSION_2: u32 = 0x0002_0000;
const HEADER_SIZE: usize = 512;

/// The fixed part of the 512-byte header, little-endian on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `Bochs Virtual HD Image`, NUL-padded.
    pub magic: [u8; 32],
    /// `Redolog`, NUL-padded.
    pub kind: [u8; 16],
    /// `Growing` (qemu reads no other subtype), NUL-padded.
    pub subtype: [u8; 16],
    /// 0x00010000 or 0x00020000.
    pub version: u32,
    /// Header size in bytes: where the catalog starts.
    pub header: u32,
    /// Catalog entries.
    pub catalog: u32,
    /// Bitmap size in bytes.
    pub bitmap: u32,
    /// Extent size in bytes.
    pub extent: u32,
    /// Disk size in bytes (at offset 84 in v1, 88 in v2).
    pub disk: u64,
}

/// A NUL-padded C string field equals `want` (qemu compares with strcmp,
/// so the field must hold a NUL right after the text).
fn cstr_eq(field: &[u8], want: &[u8]) -> bool {
    field.len() > want.len() && &field[..want.len()] == want && field[want.len()] == 0
}

impl Header {
    /// Decode the header from its first 512 bytes.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        let mut magic = [0u8; 32];
        magic.copy_from_slice(&b[..32]);
        let mut kind = [0u8; 16];
        kind.copy_from_slice(&b[32..48]);
        let mut subtype = [0u8; 16];
        subtype.copy_from_slice(&b[48..64]);
        let version = le32(b, 64);
        let disk = if version == VERSION_1 {
            le64(b, 84)
        } else {
            le64(b, 88)
        };
        Header {
            magic,
            kind,
            subtype,
            version,
            header: le32(b, 68),
            catalog: le32(b, 72),
            bitmap: le32(b, 76),
            extent: le32(b, 80),
            disk,
        }
    }

    /// Encode, for tests and tools.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..32].copy_from_slice(&self.magic);
        b[32..48].copy_from_slice(&self.kind);
        b[48..64].copy_from_slice(&self.subtype);
        for (at, v) in [
            (64, self.version),
            (68, self.header),
            (72, self.catalog),
            (76, self.bitmap),
            (80, self.extent),
        ] {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        let at = if self.version == VERSION_1 { 84 } else { 88 };
        b[at..at + 8].copy_from_slice(&self.disk.to_le_bytes());
        b
    }

    /// The identification qemu's probe and open both require.
    fn is_bochs(&self) -> bool {
        cstr_eq(&self.magic, MAGIC)
            && cstr_eq(&self.kind, TYPE_REDOLOG)
            && cstr_eq(&self.subtype, SUBTYPE_GROWING)
            && (self.version == VERSION_1 || self.version == VERSION_2)
    }
}

/// qemu's probe: a growing redolog of version 1 or 2 scores 100.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    let Ok(b) = <&[u8; HEADER_SIZE]>::try_from(buf.get(..HEADER_SIZE).unwrap_or(&[])) else {
        return 0;
    };
    if Header::parse(b).is_bochs() {
        100
    } else {
        0
    }
}

/// Open the image as qemu does and describe it.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    let mut b = [0u8; HEADER_SIZE];
    files.read_at(file, 0, &mut b)?;
    let h = Header::parse(&b);
    if !h.is_bochs() {
        return Err(ImageError::open("Image not in Bochs format"));
    }
    // disk / 512 < 2^55: fits i64.
    let total_sectors = (h.disk / 512) as i64;

    if h.catalog > MAX_CATALOG {
        return Err(ImageError::open("Catalog size is too large"));
    }
    let extent = h.extent;
    if extent < 512 {
        return Err(ImageError::open("Extent size must be at least 512"));
    }
    if !extent.is_power_of_two() {
        return Err(ImageError::open(format!(
            "Extent size {extent} is not a power of two"
        )));
    }
    if extent > MAX_EXTENT {
        return Err(ImageError::open(format!(
            "Extent size {extent} is too large"
        )));
    }
    let sectors_per_extent = i64::from(extent / 512);
    if i64::from(h.catalog) < (total_sectors + sectors_per_extent - 1) / sectors_per_extent {
        return Err(ImageError::open(
            "Catalog size is too small for this disk size",
        ));
    }

    let virtual_size = block::virtual_size(total_sectors, filename)?;
    Ok(ImageInfo {
        format: "bochs".into(),
        virtual_size,
        children: block::single_child(file),
        ..ImageInfo::default()
    })
}

/// A bochs image opened for reads. qemu's driver has no block status, so
/// the block layer calls every byte data without an offset
/// ([`crate::map::Mapping::Opaque`]); reads walk the catalog sector by
/// sector as `bochs_co_preadv` does.
pub struct BochsMap {
    file: FileId,
    size: u64,
    header: Header,
    catalog: crate::sectored::TableWindow,
}

impl BochsMap {
    /// Open as qemu does (the same checks as `info`).
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let info = info(files, file, filename)?;
        let mut b = [0u8; HEADER_SIZE];
        files.read_at(file, 0, &mut b)?;
        Ok(Self {
            file,
            size: info.virtual_size,
            header: Header::parse(&b),
            catalog: crate::sectored::TableWindow::new(),
        })
    }

    /// seek_to_sector: the file offset of `sector`'s data, or 0 when it
    /// reads as zeros. qemu's fields are 32-bit and wrap as mirrored here.
    fn seek(&mut self, files: &mut dyn Files, sector: u64) -> Result<u64> {
        use crate::block::{check_read, EIO};
        let h = &self.header;
        let offset = sector * 512;
        let extent_index = offset / u64::from(h.extent);
        let extent_offset = (offset % u64::from(h.extent)) / 512;
        // Inside the catalog: open checked it covers the disk.
        let at = u64::from(h.header) + extent_index * 4;
        let entry = le32(self.catalog.get(files, self.file, at, 4)?, 0);
        if entry == 0xffff_ffff {
            return Ok(0);
        }
        let data_offset = h.header.wrapping_add(h.catalog.wrapping_mul(4));
        let bitmap_blocks = 1 + h.bitmap.wrapping_sub(1) / 512;
        let extent_blocks = 1 + (h.extent - 1) / 512;
        let bitmap_offset = u64::from(data_offset).wrapping_add(
            512u64
                .wrapping_mul(u64::from(entry))
                .wrapping_mul(u64::from(extent_blocks + bitmap_blocks)),
        );
        let bit_at = bitmap_offset.wrapping_add(extent_offset / 8);
        if check_read(bit_at as i64, 1).is_err() {
            return Err(crate::sectored::read_error(EIO));
        }
        let mut bits = [0u8; 1];
        files.read_at(self.file, bit_at, &mut bits)?;
        if (bits[0] >> (extent_offset % 8)) & 1 == 0 {
            return Ok(0);
        }
        let block = bitmap_offset.wrapping_add(512 * (u64::from(bitmap_blocks) + extent_offset));
        if check_read(block as i64, 512).is_err() {
            return Err(crate::sectored::read_error(EIO));
        }
        Ok(block)
    }
}

impl crate::map::MapImage for BochsMap {
    fn format(&self) -> &'static str {
        "bochs"
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
        // The block layer reads whole sectors (request_alignment 512).
        let mut sector_buf = [0u8; 512];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let into = (pos % 512) as usize;
            let n = (512 - into).min(buf.len() - done);
            let block = self.seek(files, pos / 512)?;
            if block == 0 {
                buf[done..done + n].fill(0);
            } else {
                files.read_at(self.file, block, &mut sector_buf)?;
                buf[done..done + n].copy_from_slice(&sector_buf[into..into + n]);
            }
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
    use alloc::vec;
    use alloc::vec::Vec;
    use instar_wire::ErrorKind;

    fn field<const N: usize>(s: &[u8]) -> [u8; N] {
        let mut f = [0u8; N];
        f[..s.len()].copy_from_slice(s);
        f
    }

    /// The header of the real-world `empty.bochs` sample.
    fn sample() -> Header {
        Header {
            magic: field(MAGIC),
            kind: field(TYPE_REDOLOG),
            subtype: field(SUBTYPE_GROWING),
            version: VERSION_2,
            header: 512,
            catalog: 512,
            bitmap: 1,
            extent: 4096,
            disk: 1032192,
        }
    }

    fn image(h: &Header, len: usize) -> Vec<u8> {
        let mut v = vec![0xffu8; len.max(HEADER_SIZE)];
        v[..HEADER_SIZE].copy_from_slice(&h.to_bytes());
        v.truncate(len);
        v
    }

    fn run(data: Vec<u8>) -> Result<ImageInfo> {
        info(&mut MemFiles::new(data), 0, "b")
    }

    fn open_err(data: Vec<u8>) -> String {
        let e = run(data).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Open);
        e.message
    }

    #[test]
    fn header_round_trip() {
        for version in [VERSION_1, VERSION_2] {
            let mut h = sample();
            h.version = version;
            assert_eq!(Header::parse(&h.to_bytes()), h);
        }
        let b = sample().to_bytes();
        // As in empty.bochs: version, header, catalog, bitmap, extent, disk.
        assert_eq!(
            &b[64..96],
            &[
                0, 0, 2, 0, 0, 2, 0, 0, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0xc0,
                0x0f, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn probe_scores() {
        let mut b = image(&sample(), 2560);
        assert_eq!(probe(&b, "x"), 100);
        assert_eq!(probe(&b[..511], "x"), 0);
        b[22] = b'X';
        assert_eq!(probe(&b, "x"), 0);
        let mut h = sample();
        h.version = 0x30000;
        assert_eq!(probe(&image(&h, 2048), "x"), 0);
        h.subtype = field(b"Undoable");
        h.version = VERSION_2;
        assert_eq!(probe(&image(&h, 2048), "x"), 0);
    }

    #[test]
    fn sample_and_versions() {
        // qemu-img info empty.bochs: 1032192 bytes.
        let i = run(image(&sample(), 2560)).unwrap();
        assert_eq!(
            (i.format.as_str(), i.virtual_size, i.cluster_size),
            ("bochs", 1032192, None)
        );
        assert_eq!(i.children, block::single_child(0));
        // v1 header with disk 2048 at offset 84: 2048 bytes.
        let mut h = sample();
        h.version = VERSION_1;
        h.disk = 2048;
        assert_eq!(run(image(&h, 2560)).unwrap().virtual_size, 2048);
        // Disk sizes round down to sectors: 1023 -> 512.
        let mut h = sample();
        h.disk = 1023;
        assert_eq!(run(image(&h, 2560)).unwrap().virtual_size, 512);
        // A 100-byte copy keeps magic and fields; the rest reads as zeros.
        assert_eq!(run(image(&sample(), 100)).unwrap().virtual_size, 1032192);
    }

    #[test]
    fn refusals() {
        // Messages recorded from qemu-img 10.0.2 -f bochs.
        assert_eq!(open_err(vec![]), "Image not in Bochs format");
        let mut h = sample();
        h.version = 0x30000;
        assert_eq!(open_err(image(&h, 2560)), "Image not in Bochs format");
        let mut h = sample();
        h.catalog = MAX_CATALOG + 1;
        assert_eq!(open_err(image(&h, 2560)), "Catalog size is too large");
        h.catalog = MAX_CATALOG;
        assert!(run(image(&h, 2560)).is_ok());
        let mut h = sample();
        h.extent = 256;
        assert_eq!(
            open_err(image(&h, 2560)),
            "Extent size must be at least 512"
        );
        h.extent = 4097;
        assert_eq!(
            open_err(image(&h, 2560)),
            "Extent size 4097 is not a power of two"
        );
        h.extent = 0x100_0000;
        assert_eq!(
            open_err(image(&h, 2560)),
            "Extent size 16777216 is too large"
        );
        let mut h = sample();
        h.catalog = 251;
        assert_eq!(
            open_err(image(&h, 2560)),
            "Catalog size is too small for this disk size"
        );
        h.catalog = 252;
        assert!(run(image(&h, 2560)).is_ok());
    }

    #[test]
    fn absurd_disk_sizes() {
        let mut h = sample();
        h.catalog = MAX_CATALOG;
        h.extent = MAX_EXTENT;
        for disk in [u64::MAX, 1 << 63] {
            h.disk = disk;
            assert_eq!(
                open_err(image(&h, 2560)),
                "Catalog size is too small for this disk size"
            );
        }
        // The largest disk the limits allow: 8 TiB.
        h.disk = 1 << 43;
        assert_eq!(run(image(&h, 2560)).unwrap().virtual_size, 8796093022208);
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on empty.bochs cut to 1..64 bytes: the version
        // word is missing, so the header is not Bochs'.
        for n in [1, 4, 8, 16, 32, 47, 48, 63, 64] {
            assert_eq!(open_err(image(&sample(), n)), "Image not in Bochs format");
        }
        // Cut at 100 bytes and on, every field qemu reads is there; the
        // catalog reads as zeros.
        assert!(run(image(&sample(), 100)).is_ok());
        let img = image(&sample(), 2560);
        crate::hostile::truncations(info, &img, "b", 600);
        crate::hostile::absurd_fields(info, &img, "b", 0..HEADER_SIZE, &crate::hostile::no_fix);
    }

    #[test]
    fn reads_walk_catalog_and_bitmap() {
        use crate::map::{MapImage, Mapping};
        let h = sample();
        let mut img = image(&h, 8192);
        // Catalog at 512: extent 0 is the first stored extent, the rest
        // are absent.
        for i in 0..h.catalog as usize {
            let v = if i == 0 { 0 } else { u32::MAX };
            img[512 + 4 * i..516 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        // data_offset = 512 + 4 * 512; one bitmap sector, then the data.
        let base = 512 + 4 * h.catalog as usize;
        img[base..base + 512].fill(0);
        img[base] = 0b101;
        img[base + 512..base + 1024].fill(0xaa);
        img[base + 1024..base + 1536].fill(0x11);
        img[base + 1536..base + 2048].fill(0xbb);
        let orig = img.clone();
        let mut f = MemFiles::new(img);
        let mut m = BochsMap::open(&mut f, 0, "x").unwrap();
        // No block status in qemu's driver: all data, no offset.
        let e = m.block_status(&mut f, 0, 1 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (1 << 20, Mapping::Opaque));
        let mut buf = vec![0u8; 2048 - 100];
        m.read(&mut f, 100, &mut buf).unwrap();
        assert!(buf[..412].iter().all(|&b| b == 0xaa));
        // Sector 1's bit is clear: zeros, not the 0x11 stored there.
        assert!(buf[412..924].iter().all(|&b| b == 0));
        assert!(buf[924..1436].iter().all(|&b| b == 0xbb));
        assert!(buf[1436..].iter().all(|&b| b == 0));
        let mut far = [1u8; 512];
        m.read(&mut f, 8192, &mut far).unwrap();
        assert_eq!(far, [0u8; 512]);
        // Map and reads of the image cut short or with absurd fields:
        // answers or errors, never a panic.
        fn walk(f: &mut dyn Files, file: FileId, _: &str) -> Result<ImageInfo> {
            crate::sectored::walk_map(f, file, "bochs")
        }
        crate::hostile::truncations(walk, &orig, "x", 0);
        for fields in [0..HEADER_SIZE, 512..528] {
            crate::hostile::absurd_fields(walk, &orig, "x", fields, &crate::hostile::no_fix);
        }
    }
}
