//! Typed result of `map`: the merged extents of an image as qemu-img's
//! `img_map` would print them (the CLI only formats them).

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::FileId;

/// One line of `qemu-img map`: a run of guest bytes with the same status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// How many backing files down the status was found (0: the image).
    pub depth: u64,
    /// Allocated at `depth` (qemu's BDRV_BLOCK_ALLOCATED).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data (qemu's BDRV_BLOCK_DATA).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in `file`, when the data lives at a known offset.
    pub offset: Option<u64>,
    /// The file holding the bytes at `offset` (set exactly when `offset`
    /// is); the host knows its name.
    pub file: Option<FileId>,
}

/// Result of [`crate::Request::Map`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapResult {
    /// Merged entries in guest order, as qemu-img's JSON output lists them
    /// (the human renderer merges further, as qemu-img does).
    pub entries: Vec<MapEntry>,
    /// When set, the walk stopped early with this error after `entries`
    /// (qemu-img prints what it had, then the error).
    pub error: Option<crate::ImageError>,
    /// Lines qemu-img prints on stderr while opening.
    pub warnings: Vec<String>,
}
