//! Typed request and result of `measure`: the target the CLI validated from
//! `-O`/`-o`, and the sizes qemu-img prints.

use serde::{Deserialize, Serialize};

/// The image format being measured for (qemu's `bdrv_measure` drivers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeasureFormat {
    /// `raw`: the virtual size, sector-aligned.
    Raw,
    /// `qcow2` with the options below.
    Qcow2,
}

/// A validated measure target: every creation option that changes the
/// arithmetic, already checked the way qemu's driver checks them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasureTarget {
    /// Target driver.
    pub format: MeasureFormat,
    /// qcow2 `cluster_size` (bytes, a power of two).
    pub cluster_size: u64,
    /// qcow2 `refcount_bits`.
    pub refcount_bits: u64,
    /// qcow2 `extended_l2`.
    pub extended_l2: bool,
    /// qcow2 `compat`: 2 (0.10) or 3 (1.1).
    pub version: u32,
    /// `preallocation=full|falloc`: every data cluster counts as required.
    pub prealloc_all: bool,
    /// `backing_file` given: qemu assumes every cluster must be written.
    pub has_backing_file: bool,
    /// Bytes the LUKS header takes, rounded to clusters (0 unencrypted).
    pub luks_payload: u64,
    /// `size` from `-o` or `--size` (`None`: 0, or the source's size).
    pub size: Option<u64>,
    /// The imitated qemu-img reports `bitmaps` (5.1 and newer).
    pub report_bitmaps: bool,
    /// Its parallels driver keeps persistent bitmaps (8.x and newer).
    pub parallels_bitmaps: bool,
}

/// `BlockMeasureInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasureInfo {
    /// `required size`.
    pub required: u64,
    /// `fully allocated size`.
    pub fully_allocated: u64,
    /// `bitmaps size`, when source and target both keep persistent bitmaps.
    pub bitmaps: Option<u64>,
}

/// Result of [`crate::Request::Measure`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasureResult {
    /// The sizes.
    pub info: MeasureInfo,
    /// Lines qemu-img prints on stderr while opening the source.
    pub warnings: alloc::vec::Vec<alloc::string::String>,
}
