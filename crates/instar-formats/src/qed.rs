//! QED: header parsing, qemu's open checks, `info`.

use crate::block::single_child;
use crate::bytes::{c_string, le32, le64, read_vec};
use crate::limits::*;
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use instar_wire::{FileId, ImageError, ImageInfo};

/// `QED\0`, little-endian.
pub const MAGIC: u32 = 0x0044_4551;
/// Header size on disk.
pub const HEADER_SIZE: usize = 64;
/// Feature: the image has a backing file.
pub const F_BACKING_FILE: u64 = 1 << 0;
/// Feature: the image was not closed cleanly.
pub const F_NEED_CHECK: u64 = 1 << 1;
/// Feature: the backing file is raw, do not probe it.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 1 << 2;
/// Every feature qemu knows.
pub const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

/// The QED header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QedHeader {
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Table size in clusters.
    pub table_size: u32,
    /// Header size in clusters.
    pub header_size: u32,
    /// Feature bits.
    pub features: u64,
    /// Compatible feature bits.
    pub compat_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Virtual size.
    pub image_size: u64,
    /// Backing file name offset.
    pub backing_filename_offset: u32,
    /// Backing file name length.
    pub backing_filename_size: u32,
}

impl QedHeader {
    /// Decode without checks.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        }
    }

    /// Encode (tests, later writers).
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    /// qemu's largest image for these cluster and table sizes (its 64-bit
    /// arithmetic wraps for the largest combinations; mirrored).
    fn max_image_size(&self) -> u64 {
        let entries = (self.table_size.wrapping_mul(self.cluster_size) / 8) as u64;
        let l2 = entries.wrapping_mul(self.cluster_size as u64);
        entries.wrapping_mul(l2)
    }

    fn cluster_offset_ok(&self, offset: u64, file_size: u64) -> bool {
        let header_bytes = self.header_size as u64 * self.cluster_size as u64;
        offset & (self.cluster_size as u64 - 1) == 0 && offset >= header_bytes && offset < file_size
    }

    fn table_offset_ok(&self, offset: u64, file_size: u64) -> bool {
        // qemu computes the span in 32 bits and wants the end strictly
        // after the start, so a one-cluster table never passes.
        let span = (self.table_size.wrapping_sub(1)).wrapping_mul(self.cluster_size) as u64;
        let end = offset.wrapping_add(span);
        end > offset
            && self.cluster_offset_ok(offset, file_size)
            && self.cluster_offset_ok(end, file_size)
    }
}

/// A QED image opened as `qemu-img info` opens it.
#[derive(Debug, Clone)]
pub struct QedImage {
    /// The header.
    pub header: QedHeader,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
}

impl QedImage {
    /// Parse and validate with qemu's checks and messages.
    pub fn open(files: &mut dyn Files, file: FileId) -> Result<Self> {
        let mut raw = [0u8; HEADER_SIZE];
        files.read_at(file, 0, &mut raw)?;
        let h = QedHeader::decode(&raw);
        if le32(&raw, 0) != MAGIC {
            return Err(ImageError::open("Image not in QED format"));
        }
        if h.features & !FEATURE_MASK != 0 {
            return Err(ImageError::open(format!(
                "Unsupported QED features: {:x}",
                h.features & !FEATURE_MASK
            )));
        }
        let cs = h.cluster_size;
        if !cs.is_power_of_two() || !(QED_MIN_CLUSTER_SIZE..=QED_MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(ImageError::open("QED cluster size is invalid"));
        }
        // The file layer reports whole sectors; qemu rounds that down to a
        // cluster.
        let file_size = files.len(file)?.div_ceil(512).saturating_mul(512) & !(cs as u64 - 1);
        if !h.table_size.is_power_of_two() || h.table_size > QED_MAX_TABLE_SIZE {
            return Err(ImageError::open("QED table size is invalid"));
        }
        if h.image_size > h.max_image_size() || !h.image_size.is_multiple_of(512) {
            return Err(ImageError::open("QED image size is invalid"));
        }
        if !h.table_offset_ok(h.l1_table_offset, file_size) {
            return Err(ImageError::open("QED table offset is invalid"));
        }
        if h.header_size > u32::MAX / cs {
            return Err(ImageError::open("QED header size is too large"));
        }
        let mut backing_file = None;
        if h.features & F_BACKING_FILE != 0 {
            let end = h.backing_filename_offset as u64 + h.backing_filename_size as u64;
            if end > (cs * h.header_size) as u64 {
                return Err(ImageError::open("QED backing filename offset is invalid"));
            }
            if h.backing_filename_size >= QED_MAX_BACKING_NAME {
                return Err(ImageError::open("Failed to read backing filename"));
            }
            let name = read_vec(
                files,
                file,
                h.backing_filename_offset as u64,
                h.backing_filename_size as u64,
                QED_MAX_BACKING_NAME as u64,
                "backing file name",
            )?;
            // qemu treats an empty name as no backing file.
            backing_file = Some(c_string(&name)).filter(|n| !n.is_empty());
        }
        Ok(Self {
            header: h,
            backing_file,
        })
    }
}

/// qemu's QED probe: the magic.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= HEADER_SIZE && le32(buf, 0) == MAGIC {
        100
    } else {
        0
    }
}

/// `info` of a QED image.
pub fn info(files: &mut dyn Files, file: FileId, _filename: &str) -> Result<ImageInfo> {
    let img = QedImage::open(files, file)?;
    let h = &img.header;
    let raw_backing = img.backing_file.is_some() && h.features & F_BACKING_FORMAT_NO_PROBE != 0;
    Ok(ImageInfo {
        format: "qed".into(),
        virtual_size: h.image_size,
        cluster_size: Some(h.cluster_size as u64),
        // qemu-img 10.0.2 reports `dirty-flag: false` even with the
        // need-check bit set (verified on a hand-set bit).
        dirty_flag: Some(false),
        backing_filename: img.backing_file,
        backing_filename_format: raw_backing.then(|| "raw".into()),
        children: single_child(file),
        ..Default::default()
    })
}

/// A QED image opened for block status: qemu's `qed_find_cluster` and
/// `bdrv_qed_co_block_status` over the L1 and L2 tables. Tables are read
/// entry by entry through a window rather than whole (a table can be 1 GiB).
pub struct QedMap {
    image: QedImage,
    file: FileId,
    /// qemu's `file_size`: the file's sector-rounded length, cluster-aligned.
    file_size: u64,
    l2_shift: u32,
    l1_shift: u32,
    table_nelems: u64,
    l1: crate::sectored::TableWindow,
    l2: crate::sectored::TableWindow,
}

impl QedMap {
    /// Open as qemu-img map does.
    pub fn open(files: &mut dyn Files, file: FileId) -> Result<Self> {
        let image = QedImage::open(files, file)?;
        let h = &image.header;
        let cs = h.cluster_size as u64;
        let file_size = files.len(file)?.div_ceil(512).saturating_mul(512) & !(cs - 1);
        // Both powers of two (checked at open): cs <= 2^26, tables <= 16.
        let table_nelems = cs * h.table_size as u64 / 8;
        let l2_shift = cs.trailing_zeros();
        Ok(Self {
            file,
            file_size,
            l2_shift,
            l1_shift: l2_shift + table_nelems.trailing_zeros(),
            table_nelems,
            image,
            l1: crate::sectored::TableWindow::new(),
            l2: crate::sectored::TableWindow::new(),
        })
    }

    fn entry(
        window: &mut crate::sectored::TableWindow,
        files: &mut dyn Files,
        file: FileId,
        table: u64,
        index: u64,
    ) -> Result<u64> {
        // table < file size and index < 2^27: no overflow.
        Ok(le64(window.get(files, file, table + index * 8, 8)?, 0))
    }

    /// qed_find_cluster + the block-status switch, on an aligned query.
    fn find(&mut self, files: &mut dyn Files, pos: u64, len: u64) -> Result<crate::map::Extent> {
        use crate::map::{Extent, HostRef, Mapping};
        use crate::sectored::metadata_error;
        let h = &self.image.header;
        let cs = h.cluster_size as u64;
        // Requests stop at the end of one L2 table's span.
        let span_end = ((pos >> self.l1_shift) + 1)
            .checked_shl(self.l1_shift)
            .unwrap_or(u64::MAX);
        let len = len.min(span_end - pos);
        let l1_index = pos >> self.l1_shift;
        let l2_offset = Self::entry(&mut self.l1, files, self.file, h.l1_table_offset, l1_index)?;
        if l2_offset == 0 {
            return Ok(Extent::new(len, Mapping::Unallocated { at: None }));
        }
        if !h.table_offset_ok(l2_offset, self.file_size) {
            return Err(metadata_error(crate::block::EINVAL));
        }
        let index = (pos >> self.l2_shift) & (self.table_nelems - 1);
        let into = pos & (cs - 1);
        let n = (into + len).div_ceil(cs);
        let end = (index + n).min(self.table_nelems);
        let first = Self::entry(&mut self.l2, files, self.file, l2_offset, index)?;
        let mut last = first;
        let mut i = index + 1;
        while i < end {
            let e = Self::entry(&mut self.l2, files, self.file, l2_offset, i)?;
            let same = match last {
                0 => e == 0,
                1 => e == 1,
                _ => e == last.wrapping_add(cs),
            };
            if !same {
                break;
            }
            if last > 1 {
                last = e;
            }
            i += 1;
        }
        let len = len.min((i - index) * cs - into);
        let mapping = match first {
            0 => Mapping::Unallocated { at: None },
            1 => Mapping::Zero { at: None },
            c if h.cluster_offset_ok(c, self.file_size) => Mapping::Data {
                at: HostRef {
                    file: self.file,
                    offset: c | into,
                },
            },
            _ => return Err(metadata_error(crate::block::EINVAL)),
        };
        Ok(Extent::new(len, mapping))
    }
}

impl crate::map::MapImage for QedMap {
    fn format(&self) -> &'static str {
        "qed"
    }
    fn virtual_size(&self) -> u64 {
        self.image.header.image_size
    }
    fn backing(&self) -> Option<(&str, Option<&str>)> {
        let raw = self.image.header.features & F_BACKING_FORMAT_NO_PROBE != 0;
        self.image
            .backing_file
            .as_deref()
            .map(|b| (b, raw.then_some("raw")))
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn block_status(
        &mut self,
        files: &mut dyn Files,
        offset: u64,
        len: u64,
    ) -> Result<crate::map::Extent> {
        // QED's read path is sector-based: request_alignment 512.
        crate::sectored::aligned(offset, len, 512, |o, l| self.find(files, o, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use alloc::vec::Vec;

    fn hdr() -> QedHeader {
        QedHeader {
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 65536,
            image_size: 64 << 20,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    fn run(h: &QedHeader, tail: &[u8], len: usize) -> Result<ImageInfo> {
        let mut img: Vec<u8> = h.encode().to_vec();
        img.extend_from_slice(tail);
        img.resize(len.max(img.len()), 0);
        info(&mut MemFiles::new(img), 0, "x")
    }

    #[test]
    fn round_trip() {
        let h = hdr();
        assert_eq!(QedHeader::decode(&h.encode()), h);
        let i = run(&h, &[], 5 * 65536).unwrap();
        assert_eq!(i.virtual_size, 64 << 20);
        assert_eq!(i.cluster_size, Some(65536));
        assert_eq!(i.dirty_flag, Some(false));
        let h = QedHeader {
            features: F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE | F_NEED_CHECK,
            backing_filename_offset: 64,
            backing_filename_size: 8,
            ..hdr()
        };
        let i = run(&h, b"base.raw", 5 * 65536).unwrap();
        assert_eq!(i.backing_filename.as_deref(), Some("base.raw"));
        assert_eq!(i.backing_filename_format.as_deref(), Some("raw"));
        assert_eq!(i.dirty_flag, Some(false));
    }

    // Expected messages: qemu-img 10.0.2 on the same headers.
    #[test]
    fn hostile_headers() {
        let e = |h: QedHeader, len: usize| run(&h, &[], len).unwrap_err().message;
        let ok = 5 * 65536;
        assert_eq!(
            info(&mut MemFiles::new(Vec::new()), 0, "x")
                .unwrap_err()
                .message,
            "Image not in QED format"
        );
        assert_eq!(
            e(
                QedHeader {
                    features: 0x18,
                    ..hdr()
                },
                ok
            ),
            "Unsupported QED features: 18"
        );
        assert_eq!(
            e(
                QedHeader {
                    cluster_size: 65535,
                    ..hdr()
                },
                ok
            ),
            "QED cluster size is invalid"
        );
        assert_eq!(
            e(
                QedHeader {
                    cluster_size: 1 << 30,
                    ..hdr()
                },
                ok
            ),
            "QED cluster size is invalid"
        );
        assert_eq!(
            e(
                QedHeader {
                    table_size: 32,
                    ..hdr()
                },
                ok
            ),
            "QED table size is invalid"
        );
        assert_eq!(
            e(
                QedHeader {
                    table_size: 0,
                    ..hdr()
                },
                ok
            ),
            "QED table size is invalid"
        );
        assert_eq!(
            e(
                QedHeader {
                    image_size: 1 << 60,
                    ..hdr()
                },
                ok
            ),
            "QED image size is invalid"
        );
        assert_eq!(
            e(
                QedHeader {
                    image_size: 1000,
                    ..hdr()
                },
                ok
            ),
            "QED image size is invalid"
        );
        assert_eq!(e(hdr(), 65536), "QED table offset is invalid");
        assert_eq!(
            e(
                QedHeader {
                    table_size: 1,
                    ..hdr()
                },
                ok
            ),
            "QED table offset is invalid"
        );
        assert_eq!(
            e(
                QedHeader {
                    l1_table_offset: 4096,
                    ..hdr()
                },
                ok
            ),
            "QED table offset is invalid"
        );
        // A 64 GiB file that is all zeros past the header, without
        // allocating it.
        struct Sparse(Vec<u8>);
        impl Files for Sparse {
            fn len(&mut self, _: FileId) -> Result<u64> {
                Ok(1 << 36)
            }
            fn read_at(&mut self, f: FileId, off: u64, buf: &mut [u8]) -> Result<()> {
                MemFiles::new(self.0.clone()).read_at(f, off, buf)
            }
            fn open(&mut self, _: FileId, _: &str) -> Result<FileId> {
                Err(ImageError::open("no"))
            }
        }
        let h = QedHeader {
            header_size: 0x10000,
            l1_table_offset: 1 << 32,
            ..hdr()
        };
        let mut f = Sparse(h.encode().to_vec());
        assert_eq!(
            info(&mut f, 0, "x").unwrap_err().message,
            "QED header size is too large"
        );
        assert_eq!(
            e(
                QedHeader {
                    features: F_BACKING_FILE,
                    backing_filename_offset: 65530,
                    backing_filename_size: 10,
                    ..hdr()
                },
                ok
            ),
            "QED backing filename offset is invalid"
        );
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on a qemu-img-created QED image cut short: the
        // first field missing (read as zero) decides the message.
        let cut = |n: usize| {
            info(&mut MemFiles::new(hdr().encode()[..n].to_vec()), 0, "x")
                .unwrap_err()
                .message
        };
        assert_eq!(cut(1), "Image not in QED format");
        assert_eq!(cut(4), "QED cluster size is invalid");
        assert_eq!(cut(8), "QED table size is invalid");
        for n in [16, 32, 48, 63] {
            assert_eq!(cut(n), "QED table offset is invalid");
        }
        let mut img = hdr().encode().to_vec();
        img.resize(5 * 65536, 0);
        crate::hostile::truncations(info, &img, "x", HEADER_SIZE + 8);
        crate::hostile::absurd_fields(info, &img, "x", 0..HEADER_SIZE, &crate::hostile::no_fix);
    }

    #[test]
    fn block_status_follows_qemu() {
        use crate::map::{HostRef, MapImage, Mapping};
        // 4 KiB clusters, 4-cluster tables: 2048 entries, 8 MiB per L2.
        let h = QedHeader {
            cluster_size: 4096,
            table_size: 4,
            l1_table_offset: 4096,
            image_size: 16 << 20,
            ..hdr()
        };
        let mut img = h.encode().to_vec();
        img.resize(64 * 1024, 0);
        let put = |img: &mut Vec<u8>, at: usize, v: u64| {
            img[at..at + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(&mut img, 4096, 20480); // L1[0] -> L2 at 20480
        for (i, v) in [(0, 36864u64), (1, 40960), (2, 1), (3, 1), (10, 12345)] {
            put(&mut img, 20480 + 8 * i, v);
        }
        let orig = img.clone();
        let mut f = MemFiles::new(img);
        let mut m = QedMap::open(&mut f, 0).unwrap();
        let at = |offset| Mapping::Data {
            at: HostRef { file: 0, offset },
        };
        let e = m.block_status(&mut f, 0, 16 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (8192, at(36864)));
        let e = m.block_status(&mut f, 8192, 16 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (8192, Mapping::Zero { at: None }));
        let e = m.block_status(&mut f, 16384, 1 << 20).unwrap();
        assert_eq!(
            (e.length, e.mapping),
            (24576, Mapping::Unallocated { at: None })
        );
        // An unaligned cluster offset: qemu's EINVAL.
        let e = m.block_status(&mut f, 40960, 4096).unwrap_err();
        assert_eq!(e.message, "Could not read file metadata: Invalid argument");
        // No L2 table: the whole span at once.
        let e = m.block_status(&mut f, 8 << 20, 8 << 20).unwrap();
        assert_eq!(
            (e.length, e.mapping),
            (8 << 20, Mapping::Unallocated { at: None })
        );
        // Unaligned queries are rounded out and cut back, as qemu does.
        let e = m.block_status(&mut f, 100, 50).unwrap();
        assert_eq!((e.length, e.mapping), (50, at(36964)));
        assert!(m.supports_backing() && m.backing().is_none());
        // Map and reads of the image cut short or with absurd fields:
        // answers or errors, never a panic.
        fn walk(f: &mut dyn Files, file: FileId, _: &str) -> Result<ImageInfo> {
            crate::sectored::walk_map(f, file, "qed")
        }
        crate::hostile::truncations(walk, &orig, "x", 128);
        for fields in [0..HEADER_SIZE, 4096..4112, 20480..20560] {
            crate::hostile::absurd_fields(walk, &orig, "x", fields, &crate::hostile::no_fix);
        }
    }
}
