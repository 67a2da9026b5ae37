//! qcow (version 1): header parsing, qemu's open checks, `info`.

use crate::block::{check_read, open_errno, single_child, EIO};
use crate::bytes::{be32, be64, read_backing_name};
use crate::limits::MAX_BACKING_NAME;
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use instar_wire::{FileId, ImageError, ImageInfo};

/// `QFI\xfb`, shared with qcow2.
pub const MAGIC: u32 = 0x5146_49fb;
/// The only version this driver reads.
pub const VERSION: u32 = 1;
/// Header size on disk.
pub const HEADER_SIZE: usize = 48;
/// `crypt_method` for AES-CBC.
pub const CRYPT_AES: u32 = 1;

/// The qcow v1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QcowHeader {
    /// Version (1).
    pub version: u32,
    /// Backing file name offset (0: none).
    pub backing_file_offset: u64,
    /// Backing file name length.
    pub backing_file_size: u32,
    /// Modification time (unused by qemu).
    pub mtime: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u8,
    /// log2 of the L2 entry count.
    pub l2_bits: u8,
    /// 0 none, 1 AES.
    pub crypt_method: u32,
    /// L1 table offset.
    pub l1_table_offset: u64,
}

impl QcowHeader {
    /// Decode without checks.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            version: be32(b, 4),
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            mtime: be32(b, 20),
            size: be64(b, 24),
            cluster_bits: b.get(32).copied().unwrap_or(0),
            l2_bits: b.get(33).copied().unwrap_or(0),
            crypt_method: be32(b, 36),
            l1_table_offset: be64(b, 40),
        }
    }

    /// Encode (tests, later writers).
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.mtime.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32] = self.cluster_bits;
        b[33] = self.l2_bits;
        b[36..40].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b
    }

    /// Number of L1 entries qemu derives from the size.
    pub fn l1_size(&self) -> u64 {
        let shift = self.cluster_bits as u32 + self.l2_bits as u32;
        (self.size + (1u64 << shift) - 1) >> shift
    }
}

/// A qcow image opened as `qemu-img info` opens it.
#[derive(Debug, Clone)]
pub struct QcowImage {
    /// The header.
    pub header: QcowHeader,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
}

impl QcowImage {
    /// Parse and validate with qemu's checks and messages; `filename` names
    /// the image in errno messages.
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let mut raw = [0u8; HEADER_SIZE];
        files.read_at(file, 0, &mut raw)?;
        let h = QcowHeader::decode(&raw);
        if be32(&raw, 0) != MAGIC {
            return Err(ImageError::open("Image not in qcow format"));
        }
        if h.version != VERSION {
            let mut msg = format!("qcow (v1) does not support qcow version {}", h.version);
            if h.version == 2 || h.version == 3 {
                // qemu's hint line, printed right after the message.
                msg.push_str("\nTry the 'qcow2' driver instead.");
            }
            return Err(ImageError::open(msg));
        }
        if h.size <= 1 {
            return Err(ImageError::open(
                "Image size is too small (must be at least 2 bytes)",
            ));
        }
        if h.cluster_bits < 9 || h.cluster_bits > 16 {
            return Err(ImageError::open("Cluster size must be between 512 and 64k"));
        }
        if h.l2_bits < 9 - 3 || h.l2_bits > 16 - 3 {
            return Err(ImageError::open(
                "L2 table size must be between 512 and 64k",
            ));
        }
        if h.crypt_method != 0 && h.crypt_method != CRYPT_AES {
            return Err(ImageError::open("invalid encryption method in qcow header"));
        }
        let shift = h.cluster_bits as u32 + h.l2_bits as u32;
        if h.size > u64::MAX - (1u64 << shift) || h.l1_size() > (i32::MAX as u64) / 8 {
            return Err(ImageError::open("Image too large"));
        }
        // qemu reads the L1 table here; past EOF it reads zeros, so only
        // the block layer's request bounds can fail it. `info` does not
        // need the table itself.
        if check_read(h.l1_table_offset as i64, h.l1_size() * 8).is_err() {
            return Err(open_errno(filename, EIO));
        }
        let backing_file = if h.backing_file_offset != 0 {
            let len = h.backing_file_size as u64;
            if len > MAX_BACKING_NAME {
                return Err(ImageError::open("Backing file name too long"));
            }
            // Checked even for an empty name: qemu's read of 0 bytes still
            // passes the request bounds check.
            if check_read(h.backing_file_offset as i64, len).is_err() {
                return Err(open_errno(filename, EIO));
            }
            read_backing_name(files, file, h.backing_file_offset, len)?
        } else {
            None
        };
        Ok(Self {
            header: h,
            backing_file,
        })
    }
}

/// qemu's qcow probe: magic and version 1.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= HEADER_SIZE && be32(buf, 0) == MAGIC && be32(buf, 4) == VERSION {
        100
    } else {
        0
    }
}

/// `info` of a qcow image.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    let img = QcowImage::open(files, file, filename)?;
    let h = &img.header;
    Ok(ImageInfo {
        // qemu's driver answers bdrv_get_info, so dirty-flag is present.
        dirty_flag: Some(false),
        format: "qcow".into(),
        virtual_size: h.size / 512 * 512,
        cluster_size: Some(1u64 << h.cluster_bits),
        encrypted: h.crypt_method != 0,
        backing_filename: img.backing_file,
        children: single_child(file),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use alloc::vec::Vec;

    fn hdr() -> QcowHeader {
        QcowHeader {
            version: 1,
            backing_file_offset: 0,
            backing_file_size: 0,
            mtime: 0,
            size: 64 << 20,
            cluster_bits: 12,
            l2_bits: 9,
            crypt_method: 0,
            l1_table_offset: 48,
        }
    }

    fn run(h: &QcowHeader, tail: &[u8]) -> Result<ImageInfo> {
        let mut img: Vec<u8> = h.encode().to_vec();
        img.extend_from_slice(tail);
        info(&mut MemFiles::new(img), 0, "x")
    }

    #[test]
    fn round_trip() {
        let h = hdr();
        assert_eq!(QcowHeader::decode(&h.encode()), h);
        let i = run(&h, &[]).unwrap();
        assert_eq!(i.format, "qcow");
        assert_eq!(i.virtual_size, 64 << 20);
        assert_eq!(i.cluster_size, Some(4096));
        assert!(i.format_specific.is_none());
        let mut h = hdr();
        h.backing_file_offset = 48;
        h.backing_file_size = 8;
        h.crypt_method = 1;
        let i = run(&h, b"base.raw").unwrap();
        assert_eq!(i.backing_filename.as_deref(), Some("base.raw"));
        assert!(i.encrypted);
        assert_eq!(probe(&h.encode(), ""), 100);
    }

    // Expected messages: qemu-img 10.0.2 on the same headers.
    #[test]
    fn hostile_headers() {
        let e = |h: QcowHeader| run(&h, &[]).unwrap_err().message;
        assert_eq!(
            info(&mut MemFiles::new(Vec::new()), 0, "x")
                .unwrap_err()
                .message,
            "Image not in qcow format"
        );
        assert_eq!(
            e(QcowHeader {
                version: 2,
                ..hdr()
            }),
            "qcow (v1) does not support qcow version 2\nTry the 'qcow2' driver instead."
        );
        assert_eq!(
            e(QcowHeader {
                version: 7,
                ..hdr()
            }),
            "qcow (v1) does not support qcow version 7"
        );
        assert_eq!(
            e(QcowHeader { size: 1, ..hdr() }),
            "Image size is too small (must be at least 2 bytes)"
        );
        assert_eq!(
            e(QcowHeader {
                cluster_bits: 17,
                ..hdr()
            }),
            "Cluster size must be between 512 and 64k"
        );
        assert_eq!(
            e(QcowHeader {
                l2_bits: 5,
                ..hdr()
            }),
            "L2 table size must be between 512 and 64k"
        );
        assert_eq!(
            e(QcowHeader {
                crypt_method: 2,
                ..hdr()
            }),
            "invalid encryption method in qcow header"
        );
        assert_eq!(
            e(QcowHeader {
                size: u64::MAX,
                ..hdr()
            }),
            "Image too large"
        );
        assert_eq!(
            e(QcowHeader {
                size: 1 << 62,
                cluster_bits: 9,
                l2_bits: 6,
                ..hdr()
            }),
            "Image too large"
        );
        assert_eq!(
            e(QcowHeader {
                backing_file_offset: 48,
                backing_file_size: 1024,
                ..hdr()
            }),
            "Backing file name too long"
        );
    }

    #[test]
    fn truncated_headers() {
        // qemu-img 10.0.2 on a qemu-img-created qcow image cut short.
        let cut = |n: usize| {
            info(&mut MemFiles::new(hdr().encode()[..n].to_vec()), 0, "x")
                .map_err(|e| e.message)
                .map(|i| i.virtual_size)
        };
        assert_eq!(cut(1), Err("Image not in qcow format".into()));
        assert_eq!(
            cut(4),
            Err("qcow (v1) does not support qcow version 0".into())
        );
        for n in [8, 16] {
            assert_eq!(
                cut(n),
                Err("Image size is too small (must be at least 2 bytes)".into())
            );
        }
        assert_eq!(
            cut(32),
            Err("Cluster size must be between 512 and 64k".into())
        );
        // Only the L1 offset is missing: it reads as zero.
        assert_eq!(cut(47), Ok(64 << 20));
    }

    #[test]
    fn table_reads_pass_request_bounds() {
        // qemu-img 10.0.2: the L1 table and the backing name are read at
        // open, and a read reaching past BDRV_MAX_LENGTH (or at a negative
        // offset) fails with EIO, even for an empty name.
        let eio = Err(String::from("Could not open 'x': Input/output error"));
        let max = 0x7fff_ffff_c000_0000u64;
        let e = |h: QcowHeader| run(&h, &[]).map(|_| ()).map_err(|e| e.message);
        for l1_table_offset in [max - 64, 1 << 63, 0xffff_ffff_0000_0000] {
            assert_eq!(
                e(QcowHeader {
                    l1_table_offset,
                    ..hdr()
                }),
                eio
            );
        }
        let backing = |offset: u64, len: u32| QcowHeader {
            backing_file_offset: offset,
            backing_file_size: len,
            ..hdr()
        };
        assert_eq!(e(backing(max, 0)), Ok(()));
        assert_eq!(e(backing(max - 5, 5)), Ok(()));
        assert_eq!(e(backing(max - 5, 6)), eio);
        assert_eq!(e(backing(1 << 63, 4)), eio);
        assert_eq!(e(backing(0xffff_ffff_0000_0000, 0)), eio);
        // The L1 read comes first.
        let mut h = backing(48, 5000);
        h.l1_table_offset = 1 << 63;
        assert_eq!(e(h), eio);
    }

    #[test]
    fn hostile_sweeps() {
        let mut img = hdr().encode().to_vec();
        img.resize(560, 0);
        crate::hostile::truncations(info, &img, "x", HEADER_SIZE + 8);
        crate::hostile::absurd_fields(info, &img, "x", 0..HEADER_SIZE, &crate::hostile::no_fix);
    }
}
