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
        Self::open_with(files, file, filename, false)
    }

    /// [`QcowImage::open`] for I/O (`map`, `convert`): an encrypted image
    /// then needs its key, which instar never takes, and qemu refuses it
    /// right after the encryption method check.
    pub fn open_with(
        files: &mut dyn Files,
        file: FileId,
        filename: &str,
        for_io: bool,
    ) -> Result<Self> {
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
        if for_io && h.crypt_method == CRYPT_AES {
            return Err(ImageError::open(
                "Parameter 'encrypt.key-secret' is required for cipher",
            ));
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

/// qcow's compressed-cluster flag in an L2 entry.
const OFLAG_COMPRESSED: u64 = 1 << 63;

/// What one L2 entry makes of its cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cluster {
    Unallocated,
    Compressed,
    /// The entry, an offset in the image file.
    Data(u64),
}

/// A qcow image opened for block status and reads: qemu's
/// `get_cluster_offset`, `qcow_co_block_status` and `decompress_cluster`.
/// The L1 table (up to 256 MiB) and L2 tables are read through windows.
pub struct QcowMap {
    image: QcowImage,
    file: FileId,
    l1: crate::sectored::TableWindow,
    l2: crate::sectored::TableWindow,
    inflater: crate::sectored::Inflater,
    /// The last cluster inflated.
    cache: alloc::vec::Vec<u8>,
    cache_offset: Option<u64>,
}

impl QcowMap {
    /// Open as qemu-img map does (an encrypted image needs its key).
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let image = QcowImage::open_with(files, file, filename, true)?;
        let cs = 1usize << image.header.cluster_bits;
        Ok(Self {
            image,
            file,
            l1: crate::sectored::TableWindow::new(),
            l2: crate::sectored::TableWindow::new(),
            inflater: crate::sectored::Inflater::new(),
            cache: alloc::vec![0u8; cs],
            cache_offset: None,
        })
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.image.header.cluster_bits
    }

    /// get_cluster_offset without allocation: the L2 entry of `pos`.
    fn entry(&mut self, files: &mut dyn Files, pos: u64) -> Result<u64> {
        Ok(self.lookup(files, pos)?.0)
    }

    /// The L2 entry of `pos`, and how many bytes from `pos` on share it
    /// (to the end of the cluster, or of the whole L2 span when the L1
    /// entry is empty).
    fn lookup(&mut self, files: &mut dyn Files, pos: u64) -> Result<(u64, u64)> {
        let h = &self.image.header;
        let l1_index = pos >> (h.cluster_bits as u32 + h.l2_bits as u32);
        // The L1 table passed qemu's read bounds at open, and pos < size.
        let l2_offset = be64(
            self.l1
                .get(files, self.file, h.l1_table_offset + l1_index * 8, 8)?,
            0,
        );
        let span = 1u64 << (h.cluster_bits as u32 + h.l2_bits as u32);
        if l2_offset == 0 {
            return Ok((0, span - (pos & (span - 1))));
        }
        let l2_size = 1u64 << h.l2_bits;
        if check_read(l2_offset as i64, l2_size * 8).is_err() {
            return Err(crate::sectored::metadata_error(EIO));
        }
        let l2_index = (pos >> h.cluster_bits) & (l2_size - 1);
        let cs = 1u64 << h.cluster_bits;
        let entry = be64(
            self.l2.get(files, self.file, l2_offset + l2_index * 8, 8)?,
            0,
        );
        Ok((entry, cs - (pos & (cs - 1))))
    }

    fn kind(entry: u64) -> Cluster {
        if entry == 0 {
            Cluster::Unallocated
        } else if entry & OFLAG_COMPRESSED != 0 {
            Cluster::Compressed
        } else {
            Cluster::Data(entry)
        }
    }

    /// qemu answers one cluster at a time; runs of the same answer are
    /// joined here (map merges them the same way), stopping before any
    /// cluster whose tables fail so that its error comes on its own query.
    fn find(&mut self, files: &mut dyn Files, pos: u64, len: u64) -> Result<crate::map::Extent> {
        use crate::map::{Extent, HostRef, Mapping};
        let cs = self.cluster_size();
        let into = pos & (cs - 1);
        let (entry, step) = self.lookup(files, pos)?;
        let first = Self::kind(entry);
        let mut length = step.min(len);
        // Joining data clusters is exact only where qemu's `offset |
        // index` equals `offset + index`.
        let joinable = match first {
            Cluster::Data(c) => c & (cs - 1) == 0,
            _ => true,
        };
        let mut next_data = match first {
            Cluster::Data(c) => c.checked_add(cs),
            _ => None,
        };
        while joinable && length < len {
            let Ok((e, step)) = self.lookup(files, pos + length) else {
                break;
            };
            let k = Self::kind(e);
            let same = match (first, k) {
                (Cluster::Data(_), Cluster::Data(c)) => Some(c) == next_data,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            next_data = next_data.and_then(|c| c.checked_add(cs));
            length = length.saturating_add(step).min(len);
        }
        let mapping = match first {
            Cluster::Unallocated => Mapping::Unallocated { at: None },
            Cluster::Compressed => Mapping::Compressed,
            Cluster::Data(c) => Mapping::Data {
                at: HostRef {
                    file: self.file,
                    offset: c | into,
                },
            },
        };
        Ok(Extent::new(length, mapping))
    }

    /// decompress_cluster: inflate the cluster of `entry` into the cache.
    fn inflate(&mut self, files: &mut dyn Files, entry: u64) -> Result<()> {
        let cb = self.image.header.cluster_bits as u32;
        let cs = 1u64 << cb;
        let coffset = entry & ((1u64 << (63 - cb)) - 1);
        if self.cache_offset == Some(coffset) {
            return Ok(());
        }
        let csize = (entry >> (63 - cb)) & (cs - 1);
        if check_read(coffset as i64, csize).is_err() {
            return Err(crate::sectored::read_error(EIO));
        }
        self.cache_offset = None;
        if !self.inflater.inflate_file(
            files,
            self.file,
            coffset,
            csize,
            crate::sectored::Inflate::RawFill,
            &mut self.cache,
        )? {
            return Err(crate::sectored::read_error(EIO));
        }
        self.cache_offset = Some(coffset);
        Ok(())
    }
}

impl crate::map::MapImage for QcowMap {
    fn format(&self) -> &'static str {
        "qcow"
    }
    fn virtual_size(&self) -> u64 {
        self.image.header.size / 512 * 512
    }
    fn backing(&self) -> Option<(&str, Option<&str>)> {
        self.image
            .backing_file
            .as_deref()
            .filter(|b| !b.is_empty())
            .map(|b| (b, None))
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
        // qcow_refresh_limits: request_alignment 512.
        crate::sectored::aligned(offset, len, 512, |o, l| self.find(files, o, l))
    }
    fn read(&mut self, files: &mut dyn Files, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let into = (pos & (cs - 1)) as usize;
            let n = (cs as usize - into).min(buf.len() - done);
            let entry = self.entry(files, pos)?;
            match Self::kind(entry) {
                Cluster::Compressed => {
                    self.inflate(files, entry)?;
                    buf[done..done + n].copy_from_slice(&self.cache[into..into + n]);
                }
                _ => {
                    return Err(ImageError::operation(
                        "internal error: qcow read of a cluster that is not compressed",
                    ))
                }
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

    #[test]
    fn block_status_and_compressed_reads() {
        use crate::map::{HostRef, MapImage, Mapping};
        // 4 KiB clusters, 512-entry L2 tables (2 MiB each), 4 MiB: 2 L1 entries.
        let h = QcowHeader {
            size: 4 << 20,
            ..hdr()
        };
        let mut img = h.encode().to_vec();
        img.resize(12288, 0);
        img[48..56].copy_from_slice(&4096u64.to_be_bytes());
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let packed = miniz_oxide::deflate::compress_to_vec(&pattern, 6);
        let compressed = OFLAG_COMPRESSED | ((packed.len() as u64) << (63 - 12)) | 12288;
        for (i, v) in [(0usize, 8192u64), (1, compressed)] {
            img[4096 + 8 * i..4096 + 8 * i + 8].copy_from_slice(&v.to_be_bytes());
        }
        img.extend_from_slice(&packed);
        let orig = img.clone();
        let mut f = MemFiles::new(img);
        let mut m = QcowMap::open(&mut f, 0, "x").unwrap();
        let e = m.block_status(&mut f, 0, 4 << 20).unwrap();
        assert_eq!(
            (e.length, e.mapping),
            (
                4096,
                Mapping::Data {
                    at: HostRef {
                        file: 0,
                        offset: 8192
                    }
                }
            )
        );
        let e = m.block_status(&mut f, 4096, 4 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (4096, Mapping::Compressed));
        // The rest of the first L2 and the empty second L1 entry join.
        let e = m.block_status(&mut f, 8192, (4 << 20) - 8192).unwrap();
        assert_eq!(
            (e.length, e.mapping),
            ((4 << 20) - 8192, Mapping::Unallocated { at: None })
        );
        let mut buf = alloc::vec![0u8; 4000];
        m.read(&mut f, 4096 + 50, &mut buf).unwrap();
        assert_eq!(buf[..], pattern[50..4050]);
        // A cluster that does not inflate to its size is qemu's EIO.
        let mut bad = f.files[0].clone();
        let bad_entry = OFLAG_COMPRESSED | (4u64 << (63 - 12)) | 12288;
        bad[4104..4112].copy_from_slice(&bad_entry.to_be_bytes());
        let mut f = MemFiles::new(bad);
        let mut m = QcowMap::open(&mut f, 0, "x").unwrap();
        let e = m.read(&mut f, 4096, &mut buf).unwrap_err();
        assert_eq!(e.message, "Input/output error");
        // Map and reads of the image cut short or with absurd fields:
        // answers or errors, never a panic.
        fn walk(f: &mut dyn Files, file: FileId, _: &str) -> Result<ImageInfo> {
            crate::sectored::walk_map(f, file, "qcow")
        }
        crate::hostile::truncations(walk, &orig, "x", 64);
        for fields in [0..HEADER_SIZE, 4096..4112] {
            crate::hostile::absurd_fields(walk, &orig, "x", fields, &crate::hostile::no_fix);
        }
    }

    #[test]
    fn encrypted_needs_the_key_for_io() {
        let h = QcowHeader {
            crypt_method: CRYPT_AES,
            ..hdr()
        };
        let mut f = MemFiles::new(h.encode().to_vec());
        assert!(info(&mut f, 0, "x").unwrap().encrypted);
        let e = QcowMap::open(&mut f, 0, "x").err().unwrap();
        assert_eq!(
            e.message,
            "Parameter 'encrypt.key-secret' is required for cipher"
        );
        // The header checks before it still come first.
        let h = QcowHeader {
            crypt_method: CRYPT_AES,
            cluster_bits: 8,
            ..hdr()
        };
        let mut f = MemFiles::new(h.encode().to_vec());
        let e = QcowMap::open(&mut f, 0, "x").err().unwrap();
        assert_eq!(e.message, "Cluster size must be between 512 and 64k");
    }
}
