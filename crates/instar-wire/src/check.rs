//! The result of `check`: qemu's counters and the lines its driver prints
//! on stderr while checking, in order. The CLI renders the summary per
//! profile; the lines are printed as they are.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// How the check ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckStatus {
    /// The driver ran to the end; the counters are its result.
    Done,
    /// The driver gave up (qemu-img: `Check failed: STRERROR`, exit 1, no
    /// summary). The string is the strerror text.
    Failed(String),
    /// The format has no check in qemu (`This image format does not
    /// support checks`, exit 63).
    Unsupported,
    /// qemu checks this format but instar does not yet: refused with the
    /// format name, exit 1.
    NotImplemented,
}

/// qemu's `ImageCheck` counters plus the driver's stderr lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// How the check ended.
    pub status: CheckStatus,
    /// Format name as qemu reports it (`qcow2`).
    pub format: String,
    /// Errors of the check itself.
    pub check_errors: u64,
    /// Corruptions found.
    pub corruptions: u64,
    /// Leaked clusters found.
    pub leaks: u64,
    /// Corruptions repaired (always 0: instar does not repair).
    pub corruptions_fixed: u64,
    /// Leaks repaired (always 0).
    pub leaks_fixed: u64,
    /// End of the last used cluster, 0 when unknown.
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters of the active layer.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// Lines qemu's driver prints on stderr, without the newline, in order.
    pub diagnostics: Vec<String>,
}

impl CheckResult {
    /// An empty result with `status` for `format`.
    pub fn new(status: CheckStatus, format: impl Into<String>) -> Self {
        Self {
            status,
            format: format.into(),
            check_errors: 0,
            corruptions: 0,
            leaks: 0,
            corruptions_fixed: 0,
            leaks_fixed: 0,
            image_end_offset: 0,
            total_clusters: 0,
            allocated_clusters: 0,
            fragmented_clusters: 0,
            compressed_clusters: 0,
            diagnostics: Vec::new(),
        }
    }
}
