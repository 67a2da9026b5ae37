//! The qcow2 header (cluster 0, big-endian) and qemu's open-time checks on
//! its fields.

use crate::bytes::{be32, be64};
use crate::limits::*;
use crate::Result;
use alloc::format;
use instar_wire::ImageError;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of qemu's header struct: the v3 fields plus the compression type
/// byte and padding. qemu always reads this much.
pub const HEADER_SIZE: usize = QCOW2_HEADER_STRUCT_SIZE as usize;
/// Header length implied by a v2 image.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum header length of a v3 image.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Offset of the compression type byte.
pub const COMPRESSION_TYPE_OFFSET: u32 = 104;

/// Incompatible feature: image was not closed cleanly (refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type field is in use.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit qemu 10 understands.
pub const INCOMPAT_MASK: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// `crypt_method` values.
pub const CRYPT_NONE: u32 = 0;
/// Legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// LUKS (header in the crypto-header extension area).
pub const CRYPT_LUKS: u32 = 2;

/// `compression_type` values.
pub const COMPRESSION_ZLIB: u8 = 0;
/// zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// Subclusters per cluster with extended L2 entries.
pub const EXTL2_SUBCLUSTERS: u32 = 32;

/// The decoded header, v2 fields defaulted as qemu does (no features,
/// 16-bit refcounts, 72-byte header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0: none).
    pub backing_file_offset: u64,
    /// Backing file name length.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes as stored.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 entries.
    pub l1_size: u32,
    /// Active L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Internal snapshot count.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length; extensions start here.
    pub header_length: u32,
    /// 0 zlib, 1 zstd (0 when the header is too short to hold it).
    pub compression_type: u8,
}

impl Qcow2Header {
    /// Decode [`HEADER_SIZE`] bytes without checks.
    pub fn decode(b: &[u8]) -> Self {
        let version = be32(b, 4);
        let mut h = Self {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: COMPRESSION_ZLIB,
        };
        if version != 2 {
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
        }
        if h.header_length > COMPRESSION_TYPE_OFFSET {
            h.compression_type = b
                .get(COMPRESSION_TYPE_OFFSET as usize)
                .copied()
                .unwrap_or(0);
        }
        h
    }

    /// Encode as a v2/v3 header (for tests and later writers).
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &MAGIC.to_be_bytes());
        put(4, &self.version.to_be_bytes());
        put(8, &self.backing_file_offset.to_be_bytes());
        put(16, &self.backing_file_size.to_be_bytes());
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.size.to_be_bytes());
        put(32, &self.crypt_method.to_be_bytes());
        put(36, &self.l1_size.to_be_bytes());
        put(40, &self.l1_table_offset.to_be_bytes());
        put(48, &self.refcount_table_offset.to_be_bytes());
        put(56, &self.refcount_table_clusters.to_be_bytes());
        put(60, &self.nb_snapshots.to_be_bytes());
        put(64, &self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            put(72, &self.incompatible_features.to_be_bytes());
            put(80, &self.compatible_features.to_be_bytes());
            put(88, &self.autoclear_features.to_be_bytes());
            put(96, &self.refcount_order.to_be_bytes());
            put(100, &self.header_length.to_be_bytes());
            put(104, &[self.compression_type]);
        }
        b
    }

    /// Cluster size in bytes (valid after [`Self::check_basic`]).
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Extended L2 entries in use.
    pub fn has_subclusters(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// log2 of the number of entries per L2 table.
    pub fn l2_bits(&self) -> u32 {
        // L2 entries are 8 bytes, 16 with extended L2.
        self.cluster_bits - if self.has_subclusters() { 4 } else { 3 }
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1u64 << self.refcount_order
    }

    /// Virtual size as qemu reports it: whole 512-byte sectors.
    pub fn virtual_size(&self) -> u64 {
        self.size / 512 * 512
    }

    /// Where header extensions end: the backing file name, or the end of
    /// cluster 0.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// The checks qemu makes before looking at feature bits: magic,
    /// version, cluster size, header length, backing name offset.
    pub fn check_basic(&self, magic: u32) -> Result<()> {
        if magic != MAGIC {
            return Err(ImageError::open("Image is not in qcow2 format"));
        }
        if self.version < 2 || self.version > 3 {
            return Err(ImageError::open(format!(
                "Unsupported qcow2 version {}",
                self.version
            )));
        }
        if self.cluster_bits < QCOW2_MIN_CLUSTER_BITS || self.cluster_bits > QCOW2_MAX_CLUSTER_BITS
        {
            return Err(ImageError::open(format!(
                "Unsupported cluster size: 2^{}",
                self.cluster_bits
            )));
        }
        if self.version == 3 && self.header_length < V3_MIN_HEADER_LENGTH {
            return Err(ImageError::open("qcow2 header too short"));
        }
        if self.header_length as u64 > self.cluster_size() {
            return Err(ImageError::open("qcow2 header exceeds cluster size"));
        }
        if self.backing_file_offset > self.cluster_size() {
            return Err(ImageError::open("Invalid backing file offset"));
        }
        Ok(())
    }

    /// qemu's compression type checks (this build has zstd).
    pub fn check_compression(&self) -> Result<()> {
        let flag = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match self.compression_type {
            COMPRESSION_ZLIB if flag => Err(ImageError::open(
                "qcow2: Compression type incompatible feature bit must not be set",
            )),
            COMPRESSION_ZLIB => Ok(()),
            COMPRESSION_ZSTD if !flag => Err(ImageError::open(
                "qcow2: Compression type incompatible feature bit must be set",
            )),
            COMPRESSION_ZSTD => Ok(()),
            t => Err(ImageError::open(format!(
                "qcow2: unknown compression type: {t}"
            ))),
        }
    }

    /// The checks qemu makes after the feature bits: subcluster size,
    /// refcount width, table placement and sizes.
    pub fn check_tables(&self) -> Result<()> {
        if self.has_subclusters() {
            let sub = (self.cluster_size() / EXTL2_SUBCLUSTERS as u64) as u32;
            if sub < (1 << QCOW2_MIN_CLUSTER_BITS) {
                return Err(ImageError::open(format!(
                    "Unsupported subcluster size: {sub}"
                )));
            }
        }
        if self.refcount_order > QCOW2_MAX_REFCOUNT_ORDER {
            return Err(ImageError::open(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(ImageError::open(
                "Image does not contain a reference count table",
            ));
        }
        self.validate_table(
            self.refcount_table_offset,
            self.refcount_table_clusters as u64,
            self.cluster_size(),
            QCOW2_MAX_REFTABLE_BYTES,
            "Reference count table",
        )?;
        self.validate_table(
            self.snapshots_offset,
            self.nb_snapshots as u64,
            super::snapshot::HEADER_SIZE as u64,
            super::snapshot::HEADER_SIZE as u64 * QCOW2_MAX_SNAPSHOTS,
            "Snapshot table",
        )?;
        self.validate_table(
            self.l1_table_offset,
            self.l1_size as u64,
            8,
            QCOW2_MAX_L1_BYTES,
            "Active L1 table",
        )?;
        // qemu computes this in wrapping 64-bit arithmetic.
        let shift = self.cluster_bits + self.l2_bits();
        let l1_needed = self.size.wrapping_add((1u64 << shift) - 1) >> shift;
        if l1_needed > i32::MAX as u64 {
            return Err(ImageError::open("Image is too big"));
        }
        if (self.l1_size as u64) < l1_needed {
            return Err(ImageError::open("L1 table is too small"));
        }
        Ok(())
    }

    /// qemu's `qcow2_validate_table`: entry count within the byte limit,
    /// offset cluster-aligned and the table below 2^63.
    pub fn validate_table(
        &self,
        offset: u64,
        entries: u64,
        entry_len: u64,
        max_bytes: u64,
        name: &str,
    ) -> Result<()> {
        if entries > max_bytes / entry_len {
            return Err(ImageError::open(format!("{name} too large")));
        }
        let bytes = entries * entry_len;
        if (i64::MAX as u64) - bytes < offset || offset & (self.cluster_size() - 1) != 0 {
            return Err(ImageError::open(format!("{name} offset invalid")));
        }
        Ok(())
    }
}
