//! Disk image formats, one module per format: probe, parse headers and
//! tables, validate, describe. `no_std` + `alloc` and sans-I/O: every byte
//! comes through [`Files`], so the same code runs in the guest (over the
//! mailbox) and in host unit tests (over memory).
//!
//! This crate must never do I/O of its own, never panic on image bytes
//! (every size and offset from an image is checked arithmetic), and never
//! allocate an amount taken from an image without a named limit.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub(crate) mod block;
pub mod bytes;
pub mod files;
#[cfg(test)]
mod hostile;
pub mod limits;
pub mod map;
pub mod probe;
pub(crate) mod sectored;
pub mod write;

pub mod bochs;
pub mod cloop;
pub mod dmg;
pub mod luks;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use files::{Files, MemFiles};
pub use instar_wire::{FileId, ImageError, ImageInfo};

/// Result of a format operation; the error carries qemu-img's message.
pub type Result<T> = core::result::Result<T, ImageError>;

/// How many bytes qemu reads from the start of a file to probe its format
/// (BLOCK_PROBE_BUF_SIZE).
pub const PROBE_BUF_SIZE: usize = 2048;

/// One format driver: its qemu name, its probe and its `info`.
pub struct Driver {
    /// Name as qemu-img prints it and takes it in `-f`.
    pub name: &'static str,
    /// Score for the first [`PROBE_BUF_SIZE`] bytes and the file name
    /// (qemu's `bdrv_probe`); `None` for drivers that never probe.
    pub probe: Option<fn(buf: &[u8], filename: &str) -> u32>,
    /// Parse the image in `file` and describe it.
    pub info: fn(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo>,
}
