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

pub mod info;
pub mod mailbox;

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

pub use info::*;

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
}

/// What the guest returns at the end of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Result of [`Request::Info`].
    Info(ImageInfo),
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
}
