//! The host side of the sandbox: a KVM micro-VM that runs the embedded
//! guest at ring 3, serves the byte ranges and opens it asks for (only of
//! files opened for this call, only inside the allowlist), and enforces the
//! memory, deadline and syscall limits. It never interprets image bytes.
#![deny(missing_docs)]

use instar_wire::{Request, Response};
use std::path::PathBuf;
use std::time::Duration;

/// Limits and permissions of one sandboxed call.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Wall-clock deadline for the guest.
    pub timeout: Duration,
    /// Directories (canonical) inside which files named by an image may be
    /// opened. The image's own directory is added by the caller.
    pub allow_dirs: Vec<PathBuf>,
}

/// A file the host opened for this call.
#[derive(Debug)]
pub struct OpenedFile {
    /// The name qemu-img would show for it (as given, or combined with the
    /// name of the file that referenced it, like qemu's `path_combine`).
    pub display_name: String,
    /// The open file (read-only).
    pub file: std::fs::File,
}

/// What a run gives back.
#[derive(Debug)]
pub struct Outcome {
    /// The guest's answer.
    pub response: Response,
    /// Every file of the call, indexed by [`instar_wire::FileId`] (0 = root).
    pub files: Vec<OpenedFile>,
}

/// Why a run failed (each variant displays as one line).
#[derive(Debug)]
pub enum VmmError {
    /// /dev/kvm cannot be used.
    NoKvm(String),
    /// Anything else; message is one line.
    Failed(String),
}

/// Run `request` in a fresh VM with `root` as file 0.
pub fn run(config: &SandboxConfig, root: OpenedFile, request: &Request) -> Result<Outcome, VmmError> {
    let _ = (config, root, request);
    Err(VmmError::Failed("not yet implemented".into()))
}
