//! The deadline of one run.
//!
//! The guest runs in a forked sandbox process, so the watchdog lives in the
//! caller: it waits for the sandbox's report with `poll` and a timeout, and
//! at the deadline kills the sandbox with SIGKILL (which also ends a
//! KVM_RUN in progress). Nothing inside the sandbox can disarm it, it needs
//! no timer syscall in the seccomp allowlist, and a sandbox that hangs in
//! any way (guest loop, stuck host call, deadlock after fork) is covered.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sandbox processes killed but not yet reaped.
static UNREAPED: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// A wall-clock deadline.
#[derive(Debug, Clone, Copy)]
pub struct Watchdog {
    start: Instant,
    timeout: Duration,
}

impl Watchdog {
    /// Arm for `timeout` from now.
    pub fn arm(timeout: Duration) -> Self {
        Self {
            start: Instant::now(),
            timeout,
        }
    }

    /// Milliseconds left, rounded up, for `poll` (0 once expired; capped at
    /// i32::MAX).
    pub fn poll_timeout_ms(&self) -> i32 {
        let left = self.timeout.saturating_sub(self.start.elapsed());
        let ms = left.as_micros().div_ceil(1000);
        i32::try_from(ms).unwrap_or(i32::MAX)
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        self.start.elapsed() >= self.timeout
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Time since arming.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Kill the sandbox process `pid` and reap it.
pub fn kill(pid: libc::pid_t) {
    // SAFETY: plain syscalls on our own child; `pid` is a child we forked and
    // have not reaped yet, so it cannot have been recycled.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
}

/// Kill the sandbox process `pid` without waiting for its teardown; it is
/// reaped by a later [`reap_finished`] (or by init when the caller exits).
pub fn kill_later(pid: libc::pid_t) {
    // SAFETY: `pid` is our unreaped child (see `kill`).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    if let Ok(mut list) = UNREAPED.lock() {
        list.push(pid);
    }
}

/// Reap the sandbox processes from [`kill_later`] that have ended.
pub fn reap_finished() {
    let Ok(mut list) = UNREAPED.lock() else {
        return;
    };
    list.retain(|&pid| {
        let mut status = 0;
        // SAFETY: waitpid on our own child; status is a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        r == 0 // still running: keep it
    });
}
