//! The wire protocol between the instar host (VMM + CLI) and the guest.
//!
//! Everything that crosses the VM boundary is defined here: the request the
//! host gives the guest, the calls the guest makes back to the host while it
//! works (read a byte range, open a named file), and the typed result it
//! returns. Results are data, never pre-rendered text: only the CLI knows
//! about qemu-img versions and output layouts.
//!
//! This crate is `no_std` + `alloc` so the guest can use it; it must never do
//! I/O. Messages are encoded with postcard; every decode on the host is of a
//! bounded buffer (see [`mailbox`]).
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod check;
pub mod convert;
pub mod info;
pub mod mailbox;
pub mod map;
pub mod measure;

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

pub use check::*;
pub use convert::{CompareResult, ConvertResult, ConvertSource, ConvertTarget, OutId};
pub use info::*;
pub use map::{MapEntry, MapResult};
pub use measure::{MeasureFormat, MeasureInfo, MeasureResult, MeasureTarget};

/// Index of a file in the host's per-call file table. The image named on the
/// command line is always [`ROOT_FILE`]; further files (vmdk extents, data
/// files) are added by [`HostCall::Open`].
pub type FileId = u32;

/// The file the host opened for the command line argument.
pub const ROOT_FILE: FileId = 0;

/// What the host asks the guest to do. One request per VM run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// `qemu-img info` of [`ROOT_FILE`].
    Info {
        /// `-f FMT`, or `None` to probe.
        format: Option<String>,
        /// The file name as given on the command line (probing of some
        /// formats, e.g. dmg, looks at the name; messages quote it).
        filename: String,
    },
    /// `qemu-img map` of [`ROOT_FILE`] and its backing chain.
    Map {
        /// `-f FMT`, or `None` to probe.
        format: Option<String>,
        /// The file name as given on the command line.
        filename: String,
        /// `--start-offset`.
        start: u64,
        /// `--max-length`, or `None` for the whole image.
        max_length: Option<u64>,
        /// Backing files the guest may open below the image (config
        /// `max_chain_depth` minus one).
        max_chain_depth: u32,
        /// At most this many merged entries; more is a limit error (map
        /// output of a fragmented image can be huge).
        max_entries: u64,
        /// Human output: qemu-img merges zero and unallocated runs there
        /// and stops at data it cannot place, so the walk differs.
        human: bool,
        /// qemu-img tells compressed runs apart (8.2 on): they end a merge.
        split_compressed: bool,
    },
    /// `qemu-img measure` of [`ROOT_FILE`] (and its backing chain) for a
    /// target the CLI validated.
    Measure {
        /// `-f FMT`, or `None` to probe.
        format: Option<String>,
        /// The file name as given on the command line.
        filename: String,
        /// What to measure for.
        target: MeasureTarget,
        /// Backing files the guest may open below the image.
        max_chain_depth: u32,
    },
    /// `qemu-img convert`: sources are files `0..sources.len()`, the
    /// outputs were created by the host (see [`convert`]).
    Convert {
        /// The sources, concatenated in order.
        sources: Vec<ConvertSource>,
        /// What to write.
        target: ConvertTarget,
        /// Names of the output files the host created, by [`OutId`]: the
        /// writer may refer to them (e.g. in a vmdk descriptor).
        outputs: Vec<String>,
        /// `-S` in bytes: runs of zeros at least this long (aligned to it)
        /// are not written; 0 turns zero detection off.
        sparse_size: u64,
        /// `-l`: read this internal snapshot instead of the active state.
        snapshot: Option<String>,
        /// `-B` given: copy only what the top image of the source holds
        /// (the rest comes from the target's backing file).
        target_has_backing: bool,
        /// Backing files the guest may open below each source.
        max_chain_depth: u32,
        /// `-p`: report progress through [`HostCall::Progress`].
        progress: bool,
    },
    /// `qemu-img compare A B`: A is file 0, B is file 1.
    Compare {
        /// `-f` for A, or `None` to probe.
        format_a: Option<String>,
        /// `-F` for B, or `None` to probe.
        format_b: Option<String>,
        /// A's name as given.
        filename_a: String,
        /// B's name as given.
        filename_b: String,
        /// `-s`: strict (sizes must match, allocation must match).
        strict: bool,
        /// `-p` (and not `-q`): stdout carries qemu's progress lines.
        progress: bool,
        /// Backing files the guest may open below each image.
        max_chain_depth: u32,
    },
    /// `qemu-img check` of [`ROOT_FILE`] (no repair).
    Check {
        /// `-f FMT`, or `None` to probe.
        format: Option<String>,
        /// The file name as given on the command line.
        filename: String,
    },
}

/// What the guest returns at the end of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Result of [`Request::Info`].
    Info(ImageInfo),
    /// Result of [`Request::Map`].
    Map(MapResult),
    /// Result of [`Request::Measure`].
    Measure(MeasureResult),
    /// Result of [`Request::Check`].
    Check(CheckResult),
    /// Result of [`Request::Convert`].
    Convert(ConvertResult),
    /// Result of [`Request::Compare`]: the lines and exit code qemu-img
    /// gives (built in the guest, see instar-engine's compare).
    Compare(CompareResult),
    /// The operation failed; the error is what qemu-img would report.
    Error(ImageError),
}

/// Why an operation failed, in qemu-img's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageError {
    /// What class of failure this is (selects the exit code).
    pub kind: ErrorKind,
    /// The message qemu-img prints after `Could not open 'FILE': ` (for
    /// [`ErrorKind::Open`]) or after `qemu-img: ` otherwise. Exact text.
    pub message: String,
    /// Lines qemu-img prints on stderr before the error (e.g. vhdx's region
    /// overlap report), without the `qemu-img: ` prefix and the newline.
    pub warnings: Vec<String>,
}

/// Class of an [`ImageError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Opening the image failed: qemu-img prints `Could not open 'F': MSG`.
    Open,
    /// The image opened but the operation failed: `qemu-img: MSG`.
    Operation,
    /// A file the image names was refused by the host's allowlist (message
    /// is instar's own, names the path and the setting).
    Refused,
    /// A limit of instar's was hit (message names the value and the limit).
    Limit,
}

impl ImageError {
    /// An open error with qemu-img's inner message.
    pub fn open(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Open,
            message: message.into(),
            warnings: Vec::new(),
        }
    }
    /// An operation error.
    pub fn operation(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Operation,
            message: message.into(),
            warnings: Vec::new(),
        }
    }
    /// A limit error.
    pub fn limit(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Limit,
            message: message.into(),
            warnings: Vec::new(),
        }
    }
    /// The same error, preceded on stderr by `warnings`.
    pub fn with_warnings(mut self, warnings: Vec<String>) -> Self {
        self.warnings = warnings;
        self
    }
}

/// A call the guest makes to the host while it works. Encoded into the
/// mailbox by the guest, answered in place by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostCall {
    /// Open `path` read-only, resolved the way qemu-img resolves a file name
    /// stored in `relative_to` (relative to that file's directory unless
    /// absolute). The host canonicalizes it and checks the allowlist.
    Open {
        /// The file whose metadata named `path`.
        relative_to: FileId,
        /// The name as stored in the image.
        path: String,
    },
    /// Open `path` read-only exactly as stored, relative to the current
    /// directory unless absolute (qemu opens a qcow2 external data file
    /// this way, not relative to the image). Gate and allowlist as for
    /// [`HostCall::Open`].
    OpenAsGiven {
        /// The name as stored in the image.
        path: String,
    },
    /// Where `file` has data, from `offset` on, as the host's
    /// SEEK_DATA/SEEK_HOLE see it (qemu's file driver asks the same). The
    /// host only seeks; it reads nothing.
    DataExtents {
        /// A file of this call.
        file: FileId,
        /// Start of the scan.
        offset: u64,
    },
    /// Set the length of output `file` (ftruncate; for formats whose last
    /// bytes are holes).
    SetOutputLength {
        /// An output of this run.
        file: OutId,
        /// New length (within the host's output limit).
        length: u64,
    },
    /// The length of input `file` (one of the files the host opened for
    /// the call: `compare`'s second image, `convert`'s later sources; the
    /// header only carries the root's). Answered with
    /// [`HostReply::Opened`].
    Length {
        /// A file of this call.
        file: FileId,
    },
    /// `-p`: the guest has converted `done` of `total` units.
    Progress {
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
}

/// The host's answer to a [`HostCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostReply {
    /// The file is open.
    Opened {
        /// Its id for later reads.
        file: FileId,
        /// Its length in bytes at open time.
        length: u64,
    },
    /// The open failed; `error` is ready to be returned as is.
    Failed(ImageError),
    /// Answer to [`HostCall::DataExtents`].
    DataExtents(DataExtents),
    /// The call worked and has nothing to say.
    Done,
}

/// Data ranges of a file between `offset` and `scanned_to`; everything else
/// in that span is a hole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataExtents {
    /// Data ranges `(start, end)`, ascending, inside the scanned span.
    pub data: Vec<(u64, u64)>,
    /// The scan covered up to here (the file length, or less when the
    /// host stopped after its limit of ranges per reply).
    pub scanned_to: u64,
    /// Bytes the file occupies on disk (st_blocks * 512).
    pub allocated: u64,
    /// SEEK_DATA is not supported: treat everything as data, as qemu does.
    pub unsupported: bool,
}
