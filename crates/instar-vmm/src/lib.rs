//! The host side of the sandbox: a KVM micro-VM that runs the embedded
//! guest at ring 3, serves the byte ranges and opens it asks for (only of
//! files opened for this call, only inside the allowlist), and enforces the
//! memory, deadline and syscall limits. It never interprets image bytes.
//!
//! Each [`run`] forks a short-lived sandbox process: it builds the VM,
//! confines itself (closes inherited fds, Landlock, seccomp), runs the guest
//! and sends the typed response and the fds of any files the guest had
//! opened back over a socket, then exits. The caller is never confined, so
//! it can call [`run`] any number of times (one per image of a backing
//! chain, say) and keeps its own freedom to write output files. The
//! deadline is enforced by the caller, which kills the sandbox. See
//! docs/sandbox.md for the reasoning and measurements.
#![deny(missing_docs)]

pub mod gate;
pub mod kvm;
pub mod limits;
pub mod mailbox;
pub mod memory;
mod process;
pub mod sandbox;
pub mod vcpu;
pub mod watchdog;
pub mod writer;

use instar_wire::mailbox::{MAX_MEMORY, MIN_MEMORY, PAGE_SIZE};
use instar_wire::{Request, Response};
use std::path::PathBuf;
use std::time::Duration;

pub use sandbox::LandlockState;

/// The guest image, built by build.rs from crates/instar-guest.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/instar-guest.elf"));

/// Limits and permissions of one sandboxed call.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Guest RAM in bytes (rounded up to 2 MiB; between 36 MiB and 4 GiB).
    /// Touched lazily: only what the guest uses costs host memory.
    pub memory_bytes: u64,
    /// Wall-clock deadline for the whole run (VM start to response).
    pub timeout: Duration,
    /// Directories inside which files named by an image may be opened.
    /// The image's own directory is added by the caller. Canonicalized by
    /// [`run`]; directories that do not exist are ignored.
    pub allow_dirs: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    /// 512 MiB of lazily touched guest RAM ([`limits::DEFAULT_MEMORY_BYTES`]),
    /// a 60 s deadline ([`limits::DEFAULT_TIMEOUT`]), no allowed directory.
    fn default() -> Self {
        Self {
            memory_bytes: limits::DEFAULT_MEMORY_BYTES,
            timeout: limits::DEFAULT_TIMEOUT,
            allow_dirs: Vec::new(),
        }
    }
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
    /// The outputs given to [`run_files`], by [`instar_wire::OutId`] (empty
    /// for [`run`]), so the caller can sync and rename them.
    pub outputs: Vec<std::fs::File>,
    /// Counters and timings of the run.
    pub stats: RunStats,
}

/// Counters and timings of one run (for `--debug`-style output and tests).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunStats {
    /// VM exits (each guest call is one; plus the final one).
    pub exits: u64,
    /// READ calls served.
    pub reads: u64,
    /// Bytes read from files for the guest.
    pub bytes_read: u64,
    /// WRITE calls served.
    pub writes: u64,
    /// Bytes written to outputs for the guest.
    pub bytes_written: u64,
    /// Sandbox process: open /dev/kvm to VM ready (microseconds).
    pub setup_us: u64,
    /// Sandbox process: confinement (Landlock + seccomp) (microseconds).
    pub confine_us: u64,
    /// Sandbox process: first guest instruction to response (microseconds).
    pub guest_us: u64,
    /// Caller: [`run`] entry to return (microseconds), fork included.
    pub total_us: u64,
    /// Caller: the `fork` call itself (microseconds).
    pub fork_us: u64,
    /// How much of Landlock the kernel enforced.
    pub landlock: LandlockState,
}

/// Why a run failed. Displays as one line starting with `instar: `.
#[derive(Debug)]
pub enum VmmError {
    /// /dev/kvm cannot be used.
    NoKvm(String),
    /// Anything else (guest fault, deadline, protocol violation, setup
    /// failure); message is one line.
    Failed(String),
}

impl std::fmt::Display for VmmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmmError::NoKvm(m) | VmmError::Failed(m) => write!(f, "instar: {m}"),
        }
    }
}

impl std::error::Error for VmmError {}

/// glibc's strerror text for the errors an open, stat or read can give.
/// qemu-img prints glibc's wording; a musl build of instar must print the
/// same (musl says "Symbolic link loop" for ELOOP, for one).
pub fn strerror(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "Operation not permitted",
        libc::ENOENT => "No such file or directory",
        libc::EIO => "Input/output error",
        libc::ENXIO => "No such device or address",
        libc::EBADF => "Bad file descriptor",
        libc::EAGAIN => "Resource temporarily unavailable",
        libc::ENOMEM => "Cannot allocate memory",
        libc::EACCES => "Permission denied",
        libc::EBUSY => "Device or resource busy",
        libc::EEXIST => "File exists",
        libc::ENODEV => "No such device",
        libc::ENOTDIR => "Not a directory",
        libc::EISDIR => "Is a directory",
        libc::EINVAL => "Invalid argument",
        libc::ENFILE => "Too many open files in system",
        libc::EMFILE => "Too many open files",
        libc::ETXTBSY => "Text file busy",
        libc::EFBIG => "File too large",
        libc::ENOSPC => "No space left on device",
        libc::EROFS => "Read-only file system",
        libc::ENAMETOOLONG => "File name too long",
        libc::ENOSYS => "Function not implemented",
        libc::ELOOP => "Too many levels of symbolic links",
        libc::EOVERFLOW => "Value too large for defined data type",
        libc::EOPNOTSUPP => "Operation not supported",
        _ => return None,
    })
}

/// An OS error in qemu-img's words: glibc's strerror text (see
/// [`strerror`]), never Rust's " (os error N)" suffix.
pub(crate) fn os_error(e: std::io::Error) -> String {
    if let Some(text) = e.raw_os_error().and_then(strerror) {
        return text.to_string();
    }
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The files of one [`run_files`] call.
#[derive(Debug)]
pub struct RunFiles {
    /// Files the guest reads, by [`instar_wire::FileId`] (0.., in order);
    /// at least one. Files the guest opens itself get the ids after them.
    pub inputs: Vec<OpenedFile>,
    /// Files the guest writes through [`instar_wire::mailbox::PORT_WRITE`],
    /// by [`instar_wire::OutId`]. Opened for writing by the caller (the
    /// sandbox cannot open anything for writing: Landlock is read-only and
    /// seccomp allows `pwrite64`/`ftruncate` on these descriptors only).
    pub outputs: Vec<std::fs::File>,
    /// The names the guest may write into metadata (a vmdk descriptor's
    /// extent names), by OutId; informational for the host.
    pub output_names: Vec<String>,
    /// No write or length of any output may reach past this many bytes.
    pub output_limit: u64,
}

/// Run `request` in a fresh VM with `root` as file 0.
///
/// Blocks until the guest answers, fails, or the deadline passes; never
/// panics and never hangs. Safe to call repeatedly and from several threads
/// (each call forks its own sandbox process).
pub fn run(
    config: &SandboxConfig,
    root: OpenedFile,
    request: &Request,
) -> Result<Outcome, VmmError> {
    run_image(config, root, request, GUEST_ELF)
}

/// [`run`] with several input files and writable outputs (`convert`).
///
/// `progress(done, total)` is called in the caller's process, in order,
/// for every [`instar_wire::HostCall::Progress`] the guest makes (only
/// while this call blocks). The deadline is `config.timeout` for the whole
/// run, as for [`run`]: a caller converting large images sets it from the
/// size it expects to move (the CLI owns that policy), since the sandbox
/// cannot tell a slow legitimate convert from a spinning guest.
///
/// On success the outputs hold what the guest wrote; the caller still owns
/// durability (fsync) and naming (rename). On failure they may hold a
/// partial image: the caller must remove them or leave them unmistakably
/// incomplete.
pub fn run_files(
    config: &SandboxConfig,
    files: RunFiles,
    request: &Request,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outcome, VmmError> {
    run_files_image(config, files, request, progress, GUEST_ELF)
}

/// [`run`] with another guest image: for tests of the host's handling of
/// misbehaving guests (faults, loops, protocol violations).
#[doc(hidden)]
pub fn run_image(
    config: &SandboxConfig,
    root: OpenedFile,
    request: &Request,
    elf: &[u8],
) -> Result<Outcome, VmmError> {
    let files = RunFiles {
        inputs: vec![root],
        outputs: Vec::new(),
        output_names: Vec::new(),
        output_limit: 0,
    };
    run_files_image(config, files, request, &mut |_, _| {}, elf)
}

/// [`run_files`] with another guest image (tests of misbehaving guests).
#[doc(hidden)]
pub fn run_files_image(
    config: &SandboxConfig,
    files: RunFiles,
    request: &Request,
    progress: &mut dyn FnMut(u64, u64),
    elf: &[u8],
) -> Result<Outcome, VmmError> {
    let memory = config
        .memory_bytes
        .checked_next_multiple_of(PAGE_SIZE)
        .filter(|m| (MIN_MEMORY..=MAX_MEMORY).contains(m))
        .ok_or_else(|| {
            VmmError::Failed(format!(
                "guest memory of {} bytes is outside the supported range {} MiB to {} GiB",
                config.memory_bytes,
                MIN_MEMORY >> 20,
                MAX_MEMORY >> 30
            ))
        })?;
    if files.inputs.is_empty() {
        return Err(VmmError::Failed(
            "a run needs at least one input file".into(),
        ));
    }
    if files.inputs.len() + files.outputs.len() > limits::MAX_OPEN_FILES {
        return Err(VmmError::Failed(format!(
            "more than {} files in one run (MAX_OPEN_FILES)",
            limits::MAX_OPEN_FILES
        )));
    }
    let gate = gate::Gate::new(&config.allow_dirs);
    process::run(memory, config.timeout, gate, files, request, progress, elf)
}
