//! Confinement of the sandbox process, applied after the VM is built and
//! before the first guest instruction runs.
//!
//! Three layers, in this order:
//! 1. every inherited fd except stdio, the root image and the report socket
//!    is closed (so a compromised VMM cannot read what the CLI had open);
//! 2. Landlock: read-only filesystem access beneath the allowed directories,
//!    no TCP, no signals or abstract sockets out of the sandbox (best
//!    effort: older kernels enforce less, none at all before 5.13);
//! 3. seccomp: the allowlist below; anything else kills the process.
//!
//! They apply to the sandbox process only (a fork of the caller), so the
//! CLI stays unconfined and can run any number of VMs (see lib.rs).

use crate::VmmError;
use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// KVM_RUN = _IO(KVMIO, 0x80).
const KVM_RUN: u64 = 0xae80;

/// How a syscall's arguments are restricted.
#[derive(Debug, Clone, Copy)]
enum Args {
    /// Any arguments.
    Any,
    /// `ioctl(_, KVM_RUN, _)` only.
    KvmRun,
    /// `openat` without write access, creation or truncation.
    ReadOnlyOpen,
    /// `open` (flags in the second argument) likewise.
    ReadOnlyOpenLegacy,
    /// First argument is this process's report socket.
    ReportSocket,
    /// First argument is fd 2.
    Stderr,
    /// `mmap`/`mprotect` without PROT_EXEC (no new code in the VMM).
    NoExec,
    /// `tgkill(_, _, SIGABRT)`: abort() of a panicking VMM.
    Abort,
    /// `tkill(_, SIGABRT)`: musl's abort().
    AbortTkill,
    /// `fcntl(_, F_GETFD)` (std's debug-build check in `OwnedFd::drop`) or
    /// `fcntl(_, F_SETFD)` (musl's `open` re-sets FD_CLOEXEC).
    FdFlags,
    /// `lseek(_, _, SEEK_DATA)` or `lseek(_, _, SEEK_HOLE)`: hole maps
    /// only, never a plain seek.
    SeekDataHole,
    /// First argument is one of the run's output fds (the descriptors the
    /// caller opened for writing; they keep their numbers through
    /// [`close_other_fds`]). Not allowed at all in a run without outputs.
    OutputFd,
}

/// The reviewed allowlist: syscall, argument rule, who needs it. Both
/// glibc and musl builds are covered (musl calls `open`, `tkill`).
#[rustfmt::skip]
const ALLOWLIST: &[(i64, &str, Args, &str)] = &[
    (libc::SYS_ioctl, "ioctl", Args::KvmRun, "the run loop; no other KVM ioctl after setup"),
    (libc::SYS_pread64, "pread64", Args::Any, "READ calls: pread into guest memory"),
    (libc::SYS_pwrite64, "pwrite64", Args::OutputFd, "WRITE calls: guest memory to an output"),
    (libc::SYS_ftruncate, "ftruncate", Args::OutputFd, "SetOutputLength: the length of an output"),
    (libc::SYS_lseek, "lseek", Args::SeekDataHole, "hole maps (map of raw files): SEEK_DATA/SEEK_HOLE"),
    (libc::SYS_openat, "openat", Args::ReadOnlyOpen, "gate opens, read-only (Landlock limits where)"),
    (libc::SYS_open, "open", Args::ReadOnlyOpenLegacy, "gate opens with musl, read-only"),
    (libc::SYS_statx, "statx", Args::Any, "gate: file type and length (std uses statx)"),
    (libc::SYS_newfstatat, "newfstatat", Args::Any, "gate: realpath lstat, std fallback of statx"),
    (libc::SYS_fstat, "fstat", Args::Any, "std metadata fallback"),
    (libc::SYS_lstat, "lstat", Args::Any, "gate: musl realpath"),
    (libc::SYS_stat, "stat", Args::Any, "gate: musl realpath"),
    (libc::SYS_readlink, "readlink", Args::Any, "gate: realpath resolves symlinks"),
    (libc::SYS_readlinkat, "readlinkat", Args::Any, "gate: realpath resolves symlinks"),
    (libc::SYS_getcwd, "getcwd", Args::Any, "gate: realpath of a relative name"),
    (libc::SYS_faccessat, "faccessat", Args::Any, "gate: glibc realpath checks directory components"),
    (libc::SYS_faccessat2, "faccessat2", Args::Any, "gate: glibc realpath checks directory components"),
    (libc::SYS_close, "close", Args::Any, "dropping files"),
    (libc::SYS_fcntl, "fcntl", Args::FdFlags, "F_GETFD/F_SETFD only: std debug check, musl open"),
    (libc::SYS_sendmsg, "sendmsg", Args::ReportSocket, "the report (response, file fds) to the caller"),
    (libc::SYS_write, "write", Args::Stderr, "Rust's panic message, if the VMM itself panics"),
    (libc::SYS_writev, "writev", Args::Stderr, "musl's stderr writes"),
    (libc::SYS_mmap, "mmap", Args::NoExec, "malloc of large buffers, never executable"),
    (libc::SYS_mprotect, "mprotect", Args::NoExec, "malloc arena growth, never executable"),
    (libc::SYS_munmap, "munmap", Args::Any, "free of large buffers"),
    (libc::SYS_mremap, "mremap", Args::Any, "realloc of large buffers"),
    (libc::SYS_brk, "brk", Args::Any, "malloc of small buffers"),
    (libc::SYS_madvise, "madvise", Args::Any, "malloc trimming"),
    (libc::SYS_futex, "futex", Args::Any, "std/libc locks, the writer thread's channels"),
    (libc::SYS_sched_yield, "sched_yield", Args::Any, "std channel backoff between the two threads"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn", Args::Any, "return from a signal handler"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask", Args::Any, "abort() blocks signals"),
    (libc::SYS_getpid, "getpid", Args::Any, "abort() raises SIGABRT on itself"),
    (libc::SYS_gettid, "gettid", Args::Any, "abort() raises SIGABRT on itself"),
    (libc::SYS_tgkill, "tgkill", Args::Abort, "glibc abort(): SIGABRT to itself only"),
    (libc::SYS_tkill, "tkill", Args::AbortTkill, "musl abort(): SIGABRT to itself only"),
    (libc::SYS_clock_gettime, "clock_gettime", Args::Any, "timing of the run (vDSO fallback)"),
    (libc::SYS_exit, "exit", Args::Any, "thread exit"),
    (libc::SYS_exit_group, "exit_group", Args::Any, "_exit at the end of the run"),
];

/// A condition on the low 32 bits of an argument: every argument tested
/// here is an `int` (or, for ioctl, an `unsigned int` command) that the
/// kernel truncates to 32 bits, so that is what must be compared.
fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// Compile the allowlist for a process whose report socket is `socket` and
/// whose writable outputs are `outputs`.
fn filter(socket: RawFd, outputs: &[RawFd]) -> Result<BpfProgram, VmmError> {
    let fail = |e: &dyn std::fmt::Display| {
        VmmError::Failed(format!("cannot build the seccomp filter: {e}"))
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(nr, _, args, _) in ALLOWLIST {
        if let Args::OutputFd = args {
            // One rule per fd, OR-ed. No outputs: no rule at all (an empty
            // rule list would mean "any arguments" to seccompiler).
            if outputs.is_empty() {
                continue;
            }
            let mut chain = Vec::new();
            for &fd in outputs {
                let c = cond(0, SeccompCmpOp::Eq, fd as u64).map_err(|e| fail(&e))?;
                chain.push(SeccompRule::new(vec![c]).map_err(|e| fail(&e))?);
            }
            rules.insert(nr, chain);
            continue;
        }
        let conditions = match args {
            Args::Any => None,
            Args::KvmRun => Some(vec![cond(1, SeccompCmpOp::Eq, KVM_RUN)]),
            Args::ReadOnlyOpen => Some(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(
                    (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64,
                ),
                0,
            )]),
            Args::ReadOnlyOpenLegacy => Some(vec![cond(
                1,
                SeccompCmpOp::MaskedEq(
                    (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64,
                ),
                0,
            )]),
            Args::ReportSocket => Some(vec![cond(0, SeccompCmpOp::Eq, socket as u64)]),
            Args::Stderr => Some(vec![cond(0, SeccompCmpOp::Eq, 2)]),
            Args::NoExec => Some(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                0,
            )]),
            Args::Abort => Some(vec![cond(2, SeccompCmpOp::Eq, libc::SIGABRT as u64)]),
            Args::AbortTkill => Some(vec![cond(1, SeccompCmpOp::Eq, libc::SIGABRT as u64)]),
            Args::FdFlags => Some(vec![cond(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)]),
            Args::SeekDataHole => Some(vec![cond(2, SeccompCmpOp::Eq, libc::SEEK_DATA as u64)]),
            Args::OutputFd => unreachable!("handled above"),
        };
        let mut chain = Vec::new();
        if let Some(c) = conditions {
            let c = c
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(&e))?;
            chain.push(SeccompRule::new(c).map_err(|e| fail(&e))?);
        }
        if let Args::FdFlags = args {
            // Either command: a second rule, OR-ed with the first.
            let c = cond(1, SeccompCmpOp::Eq, libc::F_SETFD as u64).map_err(|e| fail(&e))?;
            chain.push(SeccompRule::new(vec![c]).map_err(|e| fail(&e))?);
        }
        if let Args::SeekDataHole = args {
            let c = cond(2, SeccompCmpOp::Eq, libc::SEEK_HOLE as u64).map_err(|e| fail(&e))?;
            chain.push(SeccompRule::new(vec![c]).map_err(|e| fail(&e))?);
        }
        rules.insert(nr, chain);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| fail(&e))?;
    BpfProgram::try_from(filter).map_err(|e| fail(&e))
}

/// How much of the sandbox is in force (reported in [`crate::RunStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum LandlockState {
    /// Every requested restriction is enforced.
    Full,
    /// The kernel's Landlock ABI enforces only part (e.g. no TCP rules).
    Partial,
    /// The kernel has no Landlock: only the gate and seccomp protect files.
    #[default]
    None,
}

/// Close every fd except those in `keep` (best effort: close_range needs
/// Linux 5.9; before that the fds stay open and seccomp still applies).
pub fn close_other_fds(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 0u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > from {
            // SAFETY: close_range only closes descriptors; none of the kept
            // ones is in [from, fd - 1], and no Rust object in this process
            // owns a descriptor outside `keep` that is used afterwards (the
            // caller lists every fd it will use).
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0) };
        }
        from = fd.saturating_add(1);
    }
}

/// Apply Landlock (read-only beneath `allow`) then seccomp to this process.
/// `outputs` are the already-open fds it may write (pwrite64, ftruncate);
/// Landlock stays read-only, so no file can be opened for writing by path.
pub fn confine(
    allow: &[PathBuf],
    socket: RawFd,
    outputs: &[RawFd],
) -> Result<LandlockState, VmmError> {
    let program = filter(socket, outputs)?;
    let landlock = landlock(allow);
    seccompiler::apply_filter(&program)
        .map_err(|e| VmmError::Failed(format!("cannot apply the seccomp filter: {e}")))?;
    Ok(landlock)
}

fn landlock(allow: &[PathBuf]) -> LandlockState {
    let abi = ABI::V6;
    let result = (|| -> Result<RulesetStatus, landlock::RulesetError> {
        Ok(Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::from_all(abi))?
            .create()?
            // A directory that cannot be opened now (removed since the gate
            // canonicalized it) is left out rather than failing the whole
            // ruleset: fail closed for that directory only.
            .add_rules(allow.iter().filter_map(|dir| {
                let fd = PathFd::new(dir).ok()?;
                Some(Ok::<_, landlock::RulesetError>(PathBeneath::new(
                    fd,
                    AccessFs::from_read(abi),
                )))
            }))?
            .restrict_self()?
            .ruleset)
    })();
    match result {
        Ok(RulesetStatus::FullyEnforced) => LandlockState::Full,
        Ok(RulesetStatus::PartiallyEnforced) => LandlockState::Partial,
        _ => LandlockState::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_compiles_and_is_unique() {
        assert!(filter(5, &[]).is_ok());
        assert!(filter(5, &[6, 7]).is_ok());
        let mut names: Vec<_> = ALLOWLIST.iter().map(|a| a.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALLOWLIST.len());
        assert!(ALLOWLIST.iter().all(|a| !a.3.is_empty()));
    }

    /// Fork, run `f` confined in the child, give its wait status.
    fn in_confined_child(allow: &[PathBuf], f: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: the child only runs `f` (no locks shared with other test
        // threads: it neither prints nor uses the test harness) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match confine(allow, -1, &[]) {
                Ok(LandlockState::Full) => f(),
                Ok(_) => 77, // kernel without (full) Landlock: skip
                Err(_) => 99,
            };
            // SAFETY: leave the forked test child without unwinding into
            // the harness.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our child; status is a local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn landlock_limits_reads_to_allowed_dirs() {
        let dir = std::env::temp_dir().join(format!("instar-landlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("in.img"), b"x").unwrap();
        let inside = dir.join("in.img");
        let status = in_confined_child(std::slice::from_ref(&dir), || {
            let ok = std::fs::File::open(&inside).is_ok();
            let denied = std::fs::File::open("/etc/hostname")
                .or_else(|_| std::fs::File::open("/etc/passwd"))
                .is_err_and(|e| e.raw_os_error() == Some(libc::EACCES));
            if ok && denied {
                0
            } else {
                1
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        match libc::WEXITSTATUS(status) {
            0 => {}
            77 => eprintln!("skipped: Landlock not fully available"),
            code => panic!("landlock check failed with {code}"),
        }
    }

    /// Fork, confine with `outputs` as the writable fds, run `f`; gives
    /// the wait status.
    fn in_child_with_outputs(outputs: &[RawFd], f: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: as in `in_confined_child`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match confine(&[std::env::temp_dir()], -1, outputs) {
                Ok(_) => f(),
                Err(_) => 99,
            };
            // SAFETY: as in `in_confined_child`.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our child; status is a local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    fn killed_by_seccomp(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn outputs_are_writable_by_fd_only() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir();
        let out_path = dir.join(format!("instar-out-{}", std::process::id()));
        let other_path = dir.join(format!("instar-other-{}", std::process::id()));
        let out = std::fs::File::create(&out_path).unwrap();
        let other = std::fs::File::create(&other_path).unwrap();
        let fd = out.as_raw_fd();
        // The output fd: pwrite and ftruncate work.
        let status = in_child_with_outputs(&[fd], || {
            let ok = out.write_at(b"abc", 10).is_ok() && out.set_len(100).is_ok();
            i32::from(!ok)
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
        assert_eq!(std::fs::metadata(&out_path).unwrap().len(), 100);
        // Another writable fd the process happens to hold: killed.
        let status = in_child_with_outputs(&[fd], || {
            let _ = other.write_at(b"abc", 0);
            0
        });
        assert!(killed_by_seccomp(status), "status {status:#x}");
        // The output by its path, for writing: killed (seccomp allows
        // read-only opens only; Landlock would refuse it too).
        let p = out_path.clone();
        let status = in_child_with_outputs(&[fd], move || {
            let _ = std::fs::OpenOptions::new().write(true).open(&p);
            0
        });
        assert!(killed_by_seccomp(status), "status {status:#x}");
        // No outputs: no pwrite at all.
        let status = in_child_with_outputs(&[], || {
            let _ = out.write_at(b"abc", 0);
            0
        });
        assert!(killed_by_seccomp(status), "status {status:#x}");
        assert_eq!(std::fs::read(&other_path).unwrap(), b"");
        let _ = std::fs::remove_file(out_path);
        let _ = std::fs::remove_file(other_path);
    }

    #[test]
    fn seccomp_kills_on_a_syscall_outside_the_list() {
        let status = in_confined_child(&[], || {
            // SAFETY: a plain syscall; it must not return.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            0
        });
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 77 {
            return; // confine gave up before seccomp; covered elsewhere
        }
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}"
        );
    }
}
