//! One run = one forked sandbox process.
//!
//! Caller: socketpair, fork, then wait for the report under the watchdog.
//! Sandbox process: close inherited fds, build the VM, confine itself, run
//! the guest, send the report, `_exit`. The report travels over a
//! SOCK_SEQPACKET socket as messages tagged `F` (fds of files the guest had
//! opened, SCM_RIGHTS, in order) and `D` (a chunk of the postcard-encoded
//! [`Report`]); end of stream is the sandbox closing its end. While the
//! guest runs, `P` messages (two little-endian u64: done, total) carry its
//! progress calls to the caller's callback.

use crate::gate::Gate;
use crate::mailbox::HostMailbox;
use crate::sandbox;
use crate::vcpu::Vm;
use crate::watchdog::Watchdog;
use crate::{kvm, limits, OpenedFile, Outcome, RunFiles, RunStats, VmmError};
use instar_wire::{Request, Response};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// fds per `F` message (the kernel's SCM_MAX_FD is 253).
const FDS_PER_MESSAGE: usize = 250;
/// Payload bytes per `D` message (well below the default socket buffer).
const CHUNK: usize = 60 << 10;

#[derive(Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // built once per run
enum ReportResult {
    Ok(Response),
    NoKvm(String),
    Failed(String),
}

#[derive(Serialize, Deserialize)]
struct Report {
    result: ReportResult,
    /// Display names of the files the guest opened, after the inputs (the
    /// fds come in `F` messages).
    names: Vec<String>,
    stats: RunStats,
}

fn errno_text() -> String {
    crate::os_error(std::io::Error::last_os_error())
}

pub(crate) fn run(
    memory: u64,
    timeout: Duration,
    gate: Gate,
    files: RunFiles,
    request: &Request,
    progress: &mut dyn FnMut(u64, u64),
    elf: &[u8],
) -> Result<Outcome, VmmError> {
    let watchdog = Watchdog::arm(timeout);
    crate::watchdog::reap_finished();
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two fds into the array we own; checked.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(VmmError::Failed(format!(
            "cannot create the sandbox socket: {}",
            errno_text()
        )));
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    let fork_start = Instant::now();
    // SAFETY: fork is sound here because the child only runs code that is
    // safe after fork in a possibly multi-threaded process with glibc/musl
    // (their malloc is fork-safe; the child takes no std lock that another
    // thread could hold: it never prints) and ends with _exit, never
    // returning into the caller's frames.
    let pid = unsafe { libc::fork() };
    let fork_us = fork_start.elapsed().as_micros() as u64;
    if pid < 0 {
        return Err(VmmError::Failed(format!(
            "cannot fork the sandbox process: {}",
            errno_text()
        )));
    }
    if pid == 0 {
        drop(ours);
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sandbox_main(theirs, memory, gate, files, request, elf)
        })) {
            Ok(()) => 0,
            Err(_) => 101,
        };
        // SAFETY: ends the sandbox process without running the caller's
        // atexit handlers or flushing its stdio buffers (they belong to the
        // caller's copy).
        unsafe { libc::_exit(code) };
    }
    drop(theirs);
    let RunFiles {
        inputs, outputs, ..
    } = files;
    let (data, fds) = match receive(&ours, pid, &watchdog, progress) {
        Ok(r) => r,
        Err(Received::Timeout) => {
            return Err(VmmError::Failed(format!(
                "the sandbox did not finish within {} (deadline); the guest was stopped",
                human(timeout)
            )))
        }
        Err(Received::Broken(why)) => {
            return Err(VmmError::Failed(format!("sandbox report broken: {why}")))
        }
    };
    let report: Report = match postcard::from_bytes(&data) {
        Ok(r) => {
            // A complete report: the sandbox is only exiting now. Its
            // teardown (VM, guest RAM) takes a millisecond or more, so it
            // is reaped later rather than waited for here.
            crate::watchdog::kill_later(pid);
            r
        }
        Err(_) => return Err(VmmError::Failed(died(reap(pid, &watchdog)))),
    };
    let mut stats = report.stats;
    stats.total_us = watchdog.elapsed().as_micros() as u64;
    stats.fork_us = fork_us;
    match report.result {
        ReportResult::Ok(response) => {
            if report.names.len() != fds.len() {
                return Err(VmmError::Failed(format!(
                    "sandbox report broken: {} file names but {} files",
                    report.names.len(),
                    fds.len()
                )));
            }
            let mut files = inputs;
            for (display_name, fd) in report.names.into_iter().zip(fds) {
                files.push(OpenedFile {
                    display_name,
                    file: std::fs::File::from(fd),
                });
            }
            Ok(Outcome {
                response,
                files,
                outputs,
                stats,
            })
        }
        ReportResult::NoKvm(m) => Err(VmmError::NoKvm(m)),
        ReportResult::Failed(m) => Err(VmmError::Failed(m)),
    }
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Why the sandbox ended without a report, from its wait status.
fn died(status: Option<libc::c_int>) -> String {
    match status {
        Some(s) if libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGSYS => {
            "the sandbox process made a system call outside its seccomp allowlist and was killed (a bug in instar)"
                .into()
        }
        Some(s) if libc::WIFSIGNALED(s) => {
            format!("the sandbox process was killed by signal {}", libc::WTERMSIG(s))
        }
        Some(s) if libc::WIFEXITED(s) => {
            format!("the sandbox process exited with status {} without a result", libc::WEXITSTATUS(s))
        }
        _ => "the sandbox process ended without a result".into(),
    }
}

/// Wait for the sandbox to end (it closed its socket, so it is exiting or
/// dead); kill it at the deadline. Gives its wait status if known.
fn reap(pid: libc::pid_t, watchdog: &Watchdog) -> Option<libc::c_int> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own unreaped child, status is our local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        if r < 0 {
            return None; // e.g. SIGCHLD ignored by the caller: auto-reaped
        }
        if watchdog.expired() {
            crate::watchdog::kill(pid);
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

enum Received {
    Timeout,
    Broken(String),
}

/// Read the report until the sandbox closes its end, within the deadline.
fn receive(
    sock: &OwnedFd,
    pid: libc::pid_t,
    watchdog: &Watchdog,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Vec<u8>, Vec<OwnedFd>), Received> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; CHUNK + 1];
    let fail = |why: String| {
        crate::watchdog::kill(pid);
        Received::Broken(why)
    };
    loop {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on our stack.
        let r = unsafe { libc::poll(&mut pfd, 1, watchdog.poll_timeout_ms()) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(fail(format!("poll: {}", errno_text())));
        }
        if r == 0 {
            crate::watchdog::kill(pid);
            return Err(Received::Timeout);
        }
        let (n, got) = recv_with_fds(sock.as_raw_fd(), &mut buf).map_err(&fail)?;
        if n == 0 {
            return Ok((data, fds));
        }
        match buf[0] {
            b'F' => fds.extend(got),
            b'P' if got.is_empty() && n == 17 => {
                let word = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[i..i + 8]);
                    u64::from_le_bytes(b)
                };
                progress(word(1), word(9));
            }
            b'D' if got.is_empty() => {
                if data.len() as u64 + n as u64 > limits::MAX_REPORT_BYTES {
                    return Err(fail(format!(
                        "larger than {} bytes (MAX_REPORT_BYTES)",
                        limits::MAX_REPORT_BYTES
                    )));
                }
                data.extend_from_slice(&buf[1..n]);
            }
            tag => return Err(fail(format!("unexpected message {tag:#x}"))),
        }
        if fds.len() > limits::MAX_OPEN_FILES {
            return Err(fail("too many files".into()));
        }
    }
}

/// recvmsg one message; gives its length and any fds that came with it
/// (owned at once, so none leaks on an error path).
fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), String> {
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 256];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1 as _;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: msg points at our iovec and control buffer, both live and
        // sized as declared.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("recvmsg: {}", errno_text()));
        }
    };
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel filled,
    // bounded by msg_controllen; CMSG_DATA of an SCM_RIGHTS header holds
    // (cmsg_len - CMSG_LEN(0)) / 4 fds, which now belong to us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err("truncated message".into());
    }
    Ok((n, fds))
}

/// sendmsg one message with optional fds.
fn send(sock: RawFd, tag: u8, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(payload.len() + 1);
    bytes.push(tag);
    bytes.extend_from_slice(payload);
    let mut control = [0u64; 256];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1 as _;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        assert!(
            space <= std::mem::size_of_val(&control),
            "FDS_PER_MESSAGE fits the control buffer"
        );
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is aligned (u64) and at least `space`
        // bytes, so the first header and its data fit; we copy exactly
        // `data_len` bytes of fds into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len as usize,
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers sized as declared.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The sandbox process.
fn sandbox_main(
    sock: OwnedFd,
    memory: u64,
    gate: Gate,
    files: RunFiles,
    request: &Request,
    elf: &[u8],
) {
    let sock_fd = sock.as_raw_fd();
    let mut keep = vec![0, 1, 2, sock_fd];
    keep.extend(files.inputs.iter().map(|f| f.file.as_raw_fd()));
    keep.extend(files.outputs.iter().map(|f| f.as_raw_fd()));
    sandbox::close_other_fds(&keep);
    let mut stats = RunStats::default();
    let mut opened = Vec::new();
    // The VM outlives the report: tearing it down (VM fd, guest RAM) takes
    // a millisecond or more, which the caller should not wait for. It goes
    // away with the process after the socket is closed.
    let mut parked: Option<Vm> = None;
    let result = match run_guest(
        memory,
        gate,
        files,
        request,
        elf,
        sock_fd,
        &mut stats,
        &mut opened,
        &mut parked,
    ) {
        Ok(response) => ReportResult::Ok(response),
        Err(VmmError::NoKvm(m)) => ReportResult::NoKvm(m),
        Err(VmmError::Failed(m)) => ReportResult::Failed(m),
    };
    let ok = matches!(result, ReportResult::Ok(_));
    let names: Vec<String> = if ok {
        opened.iter().map(|f| f.display_name.clone()).collect()
    } else {
        Vec::new()
    };
    if ok {
        let raw: Vec<RawFd> = opened.iter().map(|f| f.file.as_raw_fd()).collect();
        for chunk in raw.chunks(FDS_PER_MESSAGE) {
            if send(sock_fd, b'F', &[], chunk).is_err() {
                return;
            }
        }
    }
    let report = Report {
        result,
        names,
        stats,
    };
    let Ok(encoded) = postcard::to_allocvec(&report) else {
        return;
    };
    for chunk in encoded.chunks(CHUNK) {
        if send(sock_fd, b'D', chunk, &[]).is_err() {
            return;
        }
    }
    // End of report for the caller, now; the VM is left to the kernel's
    // process teardown after _exit.
    drop(sock);
    std::mem::forget(parked);
}

#[allow(clippy::too_many_arguments)]
fn run_guest(
    memory: u64,
    gate: Gate,
    files: RunFiles,
    request: &Request,
    elf: &[u8],
    sock_fd: RawFd,
    stats: &mut RunStats,
    files_out: &mut Vec<OpenedFile>,
    parked: &mut Option<Vm>,
) -> Result<Response, VmmError> {
    let t0 = Instant::now();
    let kvm = kvm::open()?;
    let vm = parked.insert(Vm::new(&kvm, memory, elf)?);
    drop(kvm);
    let allowed = gate.allowed().to_vec();
    let inputs = files.inputs.len();
    let output_fds: Vec<RawFd> = files.outputs.iter().map(|f| f.as_raw_fd()).collect();
    let mut mailbox = HostMailbox::with_files(files, gate);
    mailbox.set_progress(Box::new(move |done, total| {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&done.to_le_bytes());
        payload[8..].copy_from_slice(&total.to_le_bytes());
        // A caller that stopped listening is handled by its deadline.
        let _ = send(sock_fd, b'P', &payload, &[]);
    }));
    mailbox.start(&mut vm.memory, request)?;
    // The writer thread confines itself (Landlock and seccomp hold per
    // thread) before it takes a job; the run starts only after that.
    let (writer_allowed, writer_fds) = (allowed.clone(), output_fds.clone());
    mailbox.spawn_writer(move || {
        sandbox::confine(&writer_allowed, sock_fd, &writer_fds).map(|_| ())
    })?;
    stats.setup_us = t0.elapsed().as_micros() as u64;
    let t1 = Instant::now();
    stats.landlock = sandbox::confine(&allowed, sock_fd, &output_fds)?;
    stats.confine_us = t1.elapsed().as_micros() as u64;
    let t2 = Instant::now();
    let result = vm.run(&mut mailbox);
    stats.guest_us = t2.elapsed().as_micros() as u64;
    stats.exits = mailbox.exits;
    stats.reads = mailbox.reads;
    stats.bytes_read = mailbox.bytes_read;
    stats.writes = mailbox.writes;
    stats.bytes_written = mailbox.bytes_written;
    let response = result?;
    files_out.extend(mailbox.files.drain(inputs..));
    Ok(response)
}
