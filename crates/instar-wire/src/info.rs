//! Typed result of `info`: mirrors qemu's QAPI `ImageInfo` and the
//! format-specific unions. Field order inside each struct is the QAPI member
//! order (base first), which the CLI needs to reproduce qemu's hash order.

use crate::FileId;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// What `info` learned of one image (one node of qemu's block graph, format
/// layer). File-level facts (`actual-size`, file length, the child file
/// nodes' own info) are filled in by the host from `stat`, never by the guest.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Format driver name as qemu-img prints it (`qcow2`, `raw`, `vpc`...).
    pub format: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// `cluster-size`, where the format has one (omitted when `None`/0).
    pub cluster_size: Option<u64>,
    /// True for encrypted images (qcow2 with encryption, raw LUKS...).
    pub encrypted: bool,
    /// `compressed` (only vmdk extents set it; kept for completeness).
    pub compressed: Option<bool>,
    /// `dirty-flag`: present exactly when qemu's driver answers
    /// `bdrv_get_info` (raw, qcow2, qed, vmdk, vpc, vhdx, vdi...), absent for
    /// drivers without it (parallels, bochs, cloop, dmg). `Some(true)` prints
    /// `cleanly shut down: no` (qcow2 v3 dirty bit, qed need-check bit).
    pub dirty_flag: Option<bool>,
    /// Backing file name exactly as stored in the image.
    pub backing_filename: Option<String>,
    /// Backing file format as stored in the image.
    pub backing_filename_format: Option<String>,
    /// Internal snapshots (qcow2), in table order.
    pub snapshots: Vec<SnapshotInfo>,
    /// The format-specific section, for formats that have one.
    pub format_specific: Option<FormatSpecific>,
    /// Child file nodes in the order qemu-img lists them (newest attached
    /// first: e.g. `extents.1`, `extents.0`, `file`). The host renders each
    /// from its own stat of the file.
    pub children: Vec<ChildFile>,
    /// Lines qemu-img prints on stderr while opening this image (warnings
    /// such as dmg's missing-module notes), exact text without the
    /// `qemu-img: ` prefix and the newline.
    pub warnings: Vec<String>,
}

/// A child node that is a plain file the host opened for this call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildFile {
    /// qemu's child name: `file`, `extents.0`, `data-file`...
    pub name: String,
    /// The host file-table entry.
    pub file: FileId,
    /// Whether qemu counts this child in the parent's `actual-size`
    /// (children with the DATA or METADATA role).
    pub counts_in_disk_size: bool,
}

/// One internal snapshot (QAPI `SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot id string.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Size of saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u64,
    /// Guest clock, seconds.
    pub vm_clock_sec: u64,
    /// Guest clock, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
}

/// The `format-specific` union (QAPI `ImageInfoSpecific`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FormatSpecific {
    /// `type: qcow2`.
    Qcow2(Qcow2Info),
    /// `type: vmdk`.
    Vmdk(VmdkInfo),
    /// `type: luks`.
    Luks(LuksInfo),
}

/// QAPI `ImageInfoSpecificQCow2`, members in QAPI order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Qcow2Info {
    /// `0.10` for v2, `1.1` for v3.
    pub compat: String,
    /// External data file name as stored (v3 only).
    pub data_file: Option<String>,
    /// `data-file-raw` bit (present when a data file is configured).
    pub data_file_raw: Option<bool>,
    /// Extended L2 entries (v3 only).
    pub extended_l2: Option<bool>,
    /// Lazy refcounts (v3 only).
    pub lazy_refcounts: Option<bool>,
    /// Corrupt bit (v3 only).
    pub corrupt: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// Encryption details, when encrypted.
    pub encrypt: Option<Qcow2Encrypt>,
    /// Persistent dirty bitmaps (present only when there is at least one).
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// `zlib` or `zstd`.
    pub compression_type: String,
}

/// QAPI `ImageInfoSpecificQCow2Encryption` (union on `format`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Qcow2Encrypt {
    /// Legacy AES-CBC (`format: aes`), no further fields.
    Aes,
    /// LUKS (`format: luks` plus the LUKS fields).
    Luks(LuksInfo),
}

/// One persistent bitmap (QAPI `Qcow2BitmapInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Flags in qemu's order: `in-use`, `auto`.
    pub flags: Vec<BitmapFlag>,
}

/// A flag of a persistent bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BitmapFlag {
    /// `in-use`.
    InUse,
    /// `auto`.
    Auto,
}

/// QAPI `ImageInfoSpecificVmdk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmdkInfo {
    /// `createType` from the descriptor.
    pub create_type: String,
    /// Content id.
    pub cid: u64,
    /// Parent content id.
    pub parent_cid: u64,
    /// One entry per extent, in descriptor order.
    pub extents: Vec<VmdkExtentInfo>,
}

/// QAPI `VmdkExtentInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmdkExtentInfo {
    /// Extent file name as qemu shows it.
    pub filename: String,
    /// `SPARSE`, `FLAT`, `VMFSSPARSE`... (may be empty).
    pub format: String,
    /// Extent size in bytes.
    pub virtual_size: u64,
    /// Grain size in bytes (sparse extents).
    pub cluster_size: Option<u64>,
    /// Compressed grains (streamOptimized).
    pub compressed: Option<bool>,
}

/// QAPI `QCryptoBlockInfoLUKS`, members in QAPI order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuksInfo {
    /// e.g. `aes-256`.
    pub cipher_alg: String,
    /// e.g. `xts`.
    pub cipher_mode: String,
    /// e.g. `plain64`.
    pub ivgen_alg: String,
    /// Present for ESSIV.
    pub ivgen_hash_alg: Option<String>,
    /// e.g. `sha256`.
    pub hash_alg: String,
    /// Detached header (qemu 9.0+ prints it).
    pub detached_header: bool,
    /// Payload offset in bytes.
    pub payload_offset: i64,
    /// Master key PBKDF iterations.
    pub master_key_iters: u64,
    /// Volume UUID string.
    pub uuid: String,
    /// The 8 key slots.
    pub slots: Vec<LuksSlot>,
}

/// QAPI `QCryptoBlockInfoLUKSSlot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuksSlot {
    /// Slot in use.
    pub active: bool,
    /// PBKDF iterations (only for active slots).
    pub iters: Option<u64>,
    /// Anti-forensic stripes (only for active slots).
    pub stripes: Option<u64>,
    /// Key material offset in bytes.
    pub key_offset: u64,
}
