//! Output writes on a second thread of the sandbox process.
//!
//! A WRITE exit copies the guest's bytes into a host buffer (a memcpy,
//! far cheaper than the pwrite into the page cache) and returns at once,
//! so the guest reads and examines its next batch while this thread
//! writes the previous one: the overlap qemu-img gets from its coroutines
//! and thread pool. At most [`limits::WRITES_IN_FLIGHT`] buffers of at
//! most [`limits::MAX_WRITE_BYTES`] exist; a further write waits for one.
//!
//! The thread confines itself (Landlock and seccomp are per thread) before
//! it takes any job, and the run does not start until it has. A failed
//! write is reported at the next write, length change or the end of the
//! run, with the offset it failed at.

use crate::{limits, VmmError};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

struct Job {
    out: usize,
    offset: u64,
    data: Vec<u8>,
}

struct Done {
    data: Vec<u8>,
    /// Bytes written, or (offset, errno) of the failure.
    result: Result<u64, (u64, i32)>,
}

/// The writer thread's handle, owned by the main thread.
pub struct Writer {
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    in_flight: usize,
    pool: Vec<Vec<u8>>,
    error: Option<(u64, i32)>,
    /// Bytes written so far (completed writes only).
    pub bytes_written: u64,
}

fn gone() -> VmmError {
    VmmError::Failed("the sandbox's writer thread stopped".into())
}

/// pwrite all of `data`; (offset, errno) of a failure.
pub(crate) fn write_all(file: &File, offset: u64, data: &[u8]) -> Result<u64, (u64, i32)> {
    let mut done = 0usize;
    while done < data.len() {
        let at = offset + done as u64;
        match file.write_at(&data[done..], at) {
            Ok(0) => return Err((at, libc::ENOSPC)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((at, e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }
    Ok(done as u64)
}

/// The thread's job loop, until the main thread drops its handle.
fn serve(outputs: &[File], jobs: Receiver<Job>, done: SyncSender<Done>) {
    while let Ok(job) = jobs.recv() {
        let result = match outputs.get(job.out) {
            Some(file) => write_all(file, job.offset, &job.data),
            None => Err((job.offset, libc::EBADF)),
        };
        let reply = Done {
            data: job.data,
            result,
        };
        if done.send(reply).is_err() {
            return;
        }
    }
}

impl Writer {
    /// Start the thread; it runs `confine` first and takes jobs only if
    /// that worked. Returns once it is confined.
    pub fn spawn(
        outputs: Arc<Vec<File>>,
        confine: impl FnOnce() -> Result<(), VmmError> + Send + 'static,
    ) -> Result<Self, VmmError> {
        let (jobs, job_rx) = sync_channel::<Job>(limits::WRITES_IN_FLIGHT);
        let (done_tx, done) = sync_channel::<Done>(limits::WRITES_IN_FLIGHT);
        let (ready_tx, ready_rx) = sync_channel::<Result<(), VmmError>>(1);
        std::thread::Builder::new()
            .name("instar-writer".into())
            .spawn(move || {
                let confined = confine();
                let ok = confined.is_ok();
                if ready_tx.send(confined).is_ok() && ok {
                    serve(&outputs, job_rx, done_tx);
                }
                // Never return: a thread's exit runs teardown system calls
                // (std's sigaltstack removal) outside the allowlist. The
                // process's _exit ends it.
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| {
                VmmError::Failed(format!(
                    "cannot start the writer thread: {}",
                    crate::os_error(e)
                ))
            })?;
        ready_rx.recv().map_err(|_| gone())??;
        Ok(Self {
            jobs,
            done,
            in_flight: 0,
            pool: Vec::new(),
            error: None,
            bytes_written: 0,
        })
    }

    fn wait_one(&mut self) -> Result<(), VmmError> {
        let done = self.done.recv().map_err(|_| gone())?;
        self.in_flight -= 1;
        self.pool.push(done.data);
        match done.result {
            Ok(n) => self.bytes_written += n,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        Ok(())
    }

    /// Queue a copy of `data` for output `out` at `offset`. Gives an
    /// earlier write's failure instead, if one failed.
    pub fn submit(
        &mut self,
        out: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<(u64, i32)>, VmmError> {
        if let Some(e) = self.error {
            return Ok(Some(e));
        }
        if self.in_flight >= limits::WRITES_IN_FLIGHT {
            self.wait_one()?;
            if let Some(e) = self.error {
                return Ok(Some(e));
            }
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        self.jobs
            .send(Job {
                out,
                offset,
                data: buf,
            })
            .map_err(|_| gone())?;
        self.in_flight += 1;
        Ok(None)
    }

    /// Wait for every queued write; the first failure, if any.
    pub fn drain(&mut self) -> Result<Option<(u64, i32)>, VmmError> {
        while self.in_flight > 0 {
            self.wait_one()?;
        }
        Ok(self.error)
    }
}
