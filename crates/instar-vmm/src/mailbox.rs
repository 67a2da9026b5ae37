//! The host side of the mailbox protocol (see docs/wire-protocol.md).
//!
//! Every guest→host value is validated before use: file ids against the
//! call's file table, lengths against the limits, addresses against guest
//! RAM. A violation ends the run with an error; it is never "fixed up".

use crate::gate::Gate;
use crate::memory::GuestMemory;
use crate::{limits, OpenedFile, RunFiles, VmmError};
use instar_wire::mailbox::{
    Le64, MailboxHeader, HEADER_BYTES, MAGIC, MAILBOX_ADDR, MESSAGE_ADDR, MESSAGE_CAPACITY,
    PORT_CALL, PORT_DONE, PORT_PANIC, PORT_READ, PORT_WRITE, PROTOCOL_VERSION, STATUS_OK,
};
use instar_wire::{DataExtents, ErrorKind, HostCall, HostReply, ImageError, Request, Response};
use std::os::unix::fs::FileExt;

/// What the run loop does after an exit.
pub enum Exit {
    /// Resume the guest.
    Continue,
    /// The guest is done; its response.
    Done(Box<Response>),
}

/// Host state of one run: the call's files and counters.
pub struct HostMailbox {
    /// Files of the call, indexed by FileId (0 = root).
    pub files: Vec<OpenedFile>,
    gate: Gate,
    /// VM exits so far.
    pub exits: u64,
    /// READ calls served.
    pub reads: u64,
    /// Bytes read for the guest.
    pub bytes_read: u64,
    /// WRITE calls served.
    pub writes: u64,
    /// Bytes written for the guest.
    pub bytes_written: u64,
    /// Most exits this run may make (see [`limits::EXITS_PER_OUTPUT_MIB`]).
    pub exit_limit: u64,
    /// Writable outputs, by OutId (shared with the writer thread).
    outputs: std::sync::Arc<Vec<std::fs::File>>,
    /// The writer thread, when started (see [`crate::writer`]); without
    /// it writes are synchronous.
    writer: Option<crate::writer::Writer>,
    /// No output byte at or past this offset may be written.
    output_limit: u64,
    /// Where progress calls go (the report socket, in the sandbox).
    progress: Option<Box<dyn FnMut(u64, u64)>>,
}

fn violation(what: impl std::fmt::Display) -> VmmError {
    VmmError::Failed(format!("guest protocol violation: {what}"))
}

impl HostMailbox {
    /// State for a run with `root` as file 0.
    pub fn new(root: OpenedFile, gate: Gate) -> Self {
        Self::with_files(
            RunFiles {
                inputs: vec![root],
                outputs: Vec::new(),
                output_names: Vec::new(),
                output_limit: 0,
            },
            gate,
        )
    }

    /// State for a run with `files.inputs` as files 0.. and the outputs.
    pub fn with_files(files: RunFiles, gate: Gate) -> Self {
        let extra = (files.output_limit >> 20).saturating_mul(limits::EXITS_PER_OUTPUT_MIB);
        Self {
            files: files.inputs,
            gate,
            exits: 0,
            reads: 0,
            bytes_read: 0,
            writes: 0,
            bytes_written: 0,
            exit_limit: limits::MAX_EXITS.saturating_add(extra),
            outputs: std::sync::Arc::new(files.outputs),
            writer: None,
            output_limit: files.output_limit,
            progress: None,
        }
    }

    /// Write outputs on a second thread that runs `confine` first (see
    /// [`crate::writer`]). Nothing to do for a run without outputs.
    pub fn spawn_writer(
        &mut self,
        confine: impl FnOnce() -> Result<(), VmmError> + Send + 'static,
    ) -> Result<(), VmmError> {
        if !self.outputs.is_empty() {
            self.writer = Some(crate::writer::Writer::spawn(self.outputs.clone(), confine)?);
        }
        Ok(())
    }

    /// Wait for queued writes; the first failure, in qemu-img's words.
    fn drain_writes(&mut self) -> Result<Option<String>, VmmError> {
        let Some(w) = self.writer.as_mut() else {
            return Ok(None);
        };
        let failed = w.drain()?;
        self.bytes_written += std::mem::take(&mut w.bytes_written);
        Ok(failed.map(|(at, errno)| write_error(at, errno)))
    }

    /// Send the guest's progress calls to `f`.
    pub fn set_progress(&mut self, f: Box<dyn FnMut(u64, u64)>) {
        self.progress = Some(f);
    }

    /// Write the header and the request before the guest starts.
    pub fn start(&self, memory: &mut GuestMemory, request: &Request) -> Result<(), VmmError> {
        let encoded = postcard::to_allocvec(request)
            .map_err(|e| VmmError::Failed(format!("cannot encode request: {e}")))?;
        if encoded.len() as u64 > MESSAGE_CAPACITY {
            return Err(VmmError::Failed(format!(
                "request of {} bytes does not fit the mailbox ({MESSAGE_CAPACITY} bytes)",
                encoded.len()
            )));
        }
        let root_length = self.files[0]
            .file
            .metadata()
            .map_err(|e| {
                VmmError::Failed(format!(
                    "cannot stat '{}': {}",
                    self.files[0].display_name,
                    crate::os_error(e)
                ))
            })?
            .len();
        let header = MailboxHeader {
            magic: Le64::new(MAGIC),
            version: Le64::new(PROTOCOL_VERSION),
            memory_end: Le64::new(memory.size()),
            root_length: Le64::new(root_length),
            request_len: Le64::new(encoded.len() as u64),
            ..Default::default()
        };
        let oob = || VmmError::Failed("guest memory too small for the mailbox".into());
        memory
            .write(MAILBOX_ADDR, &header.to_bytes())
            .ok_or_else(oob)?;
        memory.write(MESSAGE_ADDR, &encoded).ok_or_else(oob)?;
        Ok(())
    }

    fn header(memory: &GuestMemory) -> Result<MailboxHeader, VmmError> {
        let bytes = memory
            .slice(MAILBOX_ADDR, HEADER_BYTES as u64)
            .ok_or_else(|| violation("mailbox outside memory"))?;
        let mut b = [0u8; HEADER_BYTES];
        b.copy_from_slice(bytes);
        Ok(MailboxHeader::from_bytes(&b))
    }

    fn put_header(memory: &mut GuestMemory, header: &MailboxHeader) -> Result<(), VmmError> {
        memory
            .write(MAILBOX_ADDR, &header.to_bytes())
            .ok_or_else(|| violation("mailbox outside memory"))
    }

    /// The guest message named by `msg_addr`/`msg_len`, at most `max` bytes.
    fn message<'m>(
        memory: &'m GuestMemory,
        header: &MailboxHeader,
        max: u64,
    ) -> Result<&'m [u8], VmmError> {
        let (addr, len) = (header.msg_addr.get(), header.msg_len.get());
        if len > max {
            return Err(violation(format!(
                "message of {len} bytes exceeds the limit of {max}"
            )));
        }
        memory.slice(addr, len).ok_or_else(|| {
            violation(format!(
                "message at {addr:#x}+{len} is outside guest memory"
            ))
        })
    }

    /// Handle one `out` to `port`.
    pub fn handle(&mut self, port: u16, memory: &mut GuestMemory) -> Result<Exit, VmmError> {
        let mut header = Self::header(memory)?;
        match port {
            PORT_READ => {
                let status = self.read(&header, memory)?;
                header.status = Le64::new(status);
                Self::put_header(memory, &header)?;
                Ok(Exit::Continue)
            }
            PORT_WRITE => {
                let (status, at) = self.write(&header, memory)?;
                header.status = Le64::new(status);
                header.offset = Le64::new(at);
                Self::put_header(memory, &header)?;
                Ok(Exit::Continue)
            }
            PORT_CALL => {
                let message = Self::message(memory, &header, limits::MAX_MESSAGE_BYTES)?;
                let call: HostCall = postcard::from_bytes(message)
                    .map_err(|_| violation("undecodable host call"))?;
                let reply = self.call(call)?;
                let encoded = postcard::to_allocvec(&reply)
                    .map_err(|e| VmmError::Failed(format!("cannot encode reply: {e}")))?;
                if encoded.len() as u64 > MESSAGE_CAPACITY {
                    return Err(VmmError::Failed(
                        "host reply does not fit the mailbox".into(),
                    ));
                }
                memory
                    .write(MESSAGE_ADDR, &encoded)
                    .ok_or_else(|| violation("mailbox outside memory"))?;
                header.reply_len = Le64::new(encoded.len() as u64);
                Self::put_header(memory, &header)?;
                Ok(Exit::Continue)
            }
            PORT_DONE => {
                let message = Self::message(memory, &header, limits::MAX_MESSAGE_BYTES)?;
                let mut response: Response =
                    postcard::from_bytes(message).map_err(|_| violation("undecodable response"))?;
                // A write that failed after its exit returned fails the run
                // here, whatever the guest concluded.
                if let Some(message) = self.drain_writes()? {
                    if !matches!(response, Response::Error(_)) {
                        response = Response::Error(ImageError::operation(message));
                    }
                }
                Ok(Exit::Done(Box::new(response)))
            }
            PORT_PANIC => {
                let message = Self::message(memory, &header, MESSAGE_CAPACITY)?;
                Err(VmmError::Failed(format!(
                    "guest panicked: {}",
                    one_line(message, limits::MAX_PANIC_TEXT)
                )))
            }
            other => Err(violation(format!("write to unknown port {other:#x}"))),
        }
    }

    fn read(&mut self, header: &MailboxHeader, memory: &mut GuestMemory) -> Result<u64, VmmError> {
        let (id, offset, length, buffer) = (
            header.file.get(),
            header.offset.get(),
            header.length.get(),
            header.buffer.get(),
        );
        let file = usize::try_from(id)
            .ok()
            .and_then(|i| self.files.get(i))
            .ok_or_else(|| violation(format!("read of unknown file id {id}")))?;
        if length > limits::MAX_READ_BYTES {
            return Err(violation(format!(
                "read of {length} bytes exceeds MAX_READ_BYTES ({})",
                limits::MAX_READ_BYTES
            )));
        }
        let buf = memory.slice_mut(buffer, length).ok_or_else(|| {
            violation(format!(
                "read target {buffer:#x}+{length} is outside guest memory"
            ))
        })?;
        self.reads += 1;
        let mut done = 0usize;
        while done < buf.len() {
            let Some(at) = offset.checked_add(done as u64) else {
                break;
            };
            match file.file.read_at(&mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Ok(e.raw_os_error().map_or(libc::EIO as u64, |n| n as u64)),
            }
        }
        // Past the end of the file reads as zeros (qemu's file driver does
        // the same for reads beyond EOF).
        buf[done..].fill(0);
        self.bytes_read += done as u64;
        Ok(STATUS_OK)
    }

    /// PORT_WRITE: guest memory to an output. Everything the guest names is
    /// checked first (a protocol violation ends the run); an OS error is
    /// the guest's to report (errno in `status`, the offset it failed at in
    /// `offset`: with the writer thread it may be an earlier write's).
    fn write(
        &mut self,
        header: &MailboxHeader,
        memory: &GuestMemory,
    ) -> Result<(u64, u64), VmmError> {
        let (id, offset, length, buffer) = (
            header.file.get(),
            header.offset.get(),
            header.length.get(),
            header.buffer.get(),
        );
        let outputs = self.outputs.clone();
        let file = usize::try_from(id)
            .ok()
            .and_then(|i| outputs.get(i))
            .ok_or_else(|| violation(format!("write to unknown output {id}")))?;
        if length > limits::MAX_WRITE_BYTES {
            return Err(violation(format!(
                "write of {length} bytes exceeds MAX_WRITE_BYTES ({})",
                limits::MAX_WRITE_BYTES
            )));
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.output_limit)
        {
            return Err(violation(format!(
                "write at {offset}+{length} past the output limit of {} bytes",
                self.output_limit
            )));
        }
        let buf = memory.slice(buffer, length).ok_or_else(|| {
            violation(format!(
                "write source {buffer:#x}+{length} is outside guest memory"
            ))
        })?;
        self.writes += 1;
        let result = match self.writer.as_mut() {
            Some(w) => match w.submit(id as usize, offset, buf)? {
                Some(failed) => Err(failed),
                None => Ok(0),
            },
            None => crate::writer::write_all(file, offset, buf),
        };
        match result {
            Ok(n) => {
                self.bytes_written += n;
                Ok((STATUS_OK, offset))
            }
            Err((at, errno)) => Ok((errno as u64, at)),
        }
    }

    fn set_output_length(&mut self, id: u32, length: u64) -> Result<HostReply, VmmError> {
        if let Some(message) = self.drain_writes()? {
            return Ok(HostReply::Failed(ImageError::operation(message)));
        }
        let file = self
            .outputs
            .get(id as usize)
            .ok_or_else(|| violation(format!("length of unknown output {id}")))?;
        if length > self.output_limit {
            return Err(violation(format!(
                "output length {length} past the output limit of {} bytes",
                self.output_limit
            )));
        }
        Ok(match file.set_len(length) {
            Ok(()) => HostReply::Done,
            Err(e) => HostReply::Failed(ImageError::operation(format!(
                "Could not resize image: {}",
                crate::os_error(e)
            ))),
        })
    }

    /// Open `path`, a name found in the file shown as `base`, through the
    /// gate, within the per-call limits.
    fn open_file(&mut self, base: &str, path: &str) -> HostReply {
        if path.len() > limits::MAX_PATH_BYTES {
            return HostReply::Failed(ImageError::limit(format!(
                "file name of {} bytes is longer than {} (MAX_PATH_BYTES)",
                path.len(),
                limits::MAX_PATH_BYTES
            )));
        }
        if self.files.len() > limits::MAX_OPEN_FILES {
            return HostReply::Failed(ImageError {
                kind: ErrorKind::Limit,
                warnings: Vec::new(),
                message: format!(
                    "image names more than {} files (MAX_OPEN_FILES)",
                    limits::MAX_OPEN_FILES
                ),
            });
        }
        match self.gate.open(base, path) {
            Ok(opened) => {
                let length = opened.file.metadata().map(|m| m.len()).unwrap_or(0);
                let file = self.files.len() as u32;
                self.files.push(opened);
                HostReply::Opened { file, length }
            }
            Err(e) => HostReply::Failed(e),
        }
    }

    fn call(&mut self, call: HostCall) -> Result<HostReply, VmmError> {
        match call {
            HostCall::Open { relative_to, path } => {
                let base = self.files.get(relative_to as usize).ok_or_else(|| {
                    violation(format!("open relative to unknown file id {relative_to}"))
                })?;
                let base = base.display_name.clone();
                Ok(self.open_file(&base, &path))
            }
            // The gate combines with an empty base: the name as stored.
            HostCall::OpenAsGiven { path } => Ok(self.open_file("", &path)),
            HostCall::DataExtents { file, offset } => {
                let f = self
                    .files
                    .get(file as usize)
                    .ok_or_else(|| violation(format!("hole map of unknown file id {file}")))?;
                Ok(HostReply::DataExtents(data_extents(&f.file, offset)))
            }
            HostCall::Length { file } => {
                let f = self
                    .files
                    .get(file as usize)
                    .ok_or_else(|| violation(format!("length of unknown file id {file}")))?;
                Ok(match f.file.metadata() {
                    Ok(m) => HostReply::Opened {
                        file,
                        length: m.len(),
                    },
                    Err(e) => HostReply::Failed(ImageError::operation(format!(
                        "Could not open '{}': {}",
                        f.display_name,
                        crate::os_error(e)
                    ))),
                })
            }
            HostCall::SetOutputLength { file, length } => self.set_output_length(file, length),
            HostCall::Progress { done, total } => {
                if let Some(f) = self.progress.as_mut() {
                    f(done, total);
                }
                Ok(HostReply::Done)
            }
        }
    }
}

/// qemu-img convert's message for a failed write.
fn write_error(at: u64, errno: i32) -> String {
    let text = crate::strerror(errno)
        .map(String::from)
        .unwrap_or_else(|| crate::os_error(std::io::Error::from_raw_os_error(errno)));
    format!("error while writing at byte {at}: {text}")
}

/// The data ranges of `file` from `offset` on, by SEEK_DATA/SEEK_HOLE as
/// qemu's file driver finds them (`find_allocation`), at most
/// [`limits::MAX_DATA_EXTENTS`] of them. Only seeks: no byte is read.
fn data_extents(file: &std::fs::File, offset: u64) -> DataExtents {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let (len, allocated) = match file.metadata() {
        Ok(m) => (m.len(), m.blocks().saturating_mul(512)),
        Err(_) => (0, 0),
    };
    let unsupported = DataExtents {
        data: Vec::new(),
        scanned_to: len,
        allocated,
        unsupported: true,
    };
    let seek = |pos: u64, whence: i32| -> Result<u64, i32> {
        let pos = i64::try_from(pos).map_err(|_| libc::ENXIO)?;
        // SAFETY: lseek on a descriptor this process owns for the whole
        // call; it only moves the file offset, which no read here uses
        // (reads are pread).
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            Ok(r as u64)
        }
    };
    let mut data = Vec::new();
    let mut pos = offset;
    while pos < len {
        if data.len() >= limits::MAX_DATA_EXTENTS {
            return DataExtents {
                data,
                scanned_to: pos,
                allocated,
                unsupported: false,
            };
        }
        let start = match seek(pos, libc::SEEK_DATA) {
            Ok(d) if d >= pos => d,
            // No data after `pos`: the rest is a hole.
            Err(libc::ENXIO) => break,
            // qemu pretends there are no holes when it cannot ask.
            _ => return unsupported,
        };
        if start >= len {
            break;
        }
        let end = match seek(start, libc::SEEK_HOLE) {
            Ok(h) if h > start => h.min(len),
            _ => return unsupported,
        };
        data.push((start, end));
        pos = end;
    }
    DataExtents {
        data,
        scanned_to: len.max(offset),
        allocated,
        unsupported: false,
    }
}

/// Guest text as one printable line of at most `max` bytes.
fn one_line(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use instar_wire::mailbox::{HEAP_ADDR, MIN_MEMORY};

    fn setup(content: &[u8]) -> (HostMailbox, GuestMemory, std::path::PathBuf) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("instar-mbox-{}-{n}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        let root = OpenedFile {
            display_name: path.to_string_lossy().into(),
            file: std::fs::File::open(&path).unwrap(),
        };
        let mut memory = GuestMemory::new(MIN_MEMORY).unwrap();
        let mb = HostMailbox::new(root, Gate::default());
        let req = Request::Info {
            format: None,
            filename: "x".into(),
        };
        mb.start(&mut memory, &req).unwrap();
        (mb, memory, path)
    }

    fn set(memory: &mut GuestMemory, f: impl FnOnce(&mut MailboxHeader)) {
        let mut h = HostMailbox::header(memory).unwrap();
        f(&mut h);
        HostMailbox::put_header(memory, &h).unwrap();
    }

    fn err(r: Result<Exit, VmmError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn start_writes_header_and_request() {
        let (_mb, memory, path) = setup(b"hello");
        let h = HostMailbox::header(&memory).unwrap();
        assert_eq!(h.magic.get(), MAGIC);
        assert_eq!(h.root_length.get(), 5);
        assert_eq!(h.memory_end.get(), MIN_MEMORY);
        let req: Request =
            postcard::from_bytes(memory.slice(MESSAGE_ADDR, h.request_len.get()).unwrap()).unwrap();
        assert_eq!(
            req,
            Request::Info {
                format: None,
                filename: "x".into()
            }
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_fills_and_zero_pads() {
        let (mut mb, mut memory, path) = setup(b"hello world");
        memory.write(HEAP_ADDR, &[0xff; 16]).unwrap();
        set(&mut memory, |h| {
            h.file = Le64::new(0);
            h.offset = Le64::new(6);
            h.length = Le64::new(16);
            h.buffer = Le64::new(HEAP_ADDR);
        });
        assert!(matches!(
            mb.handle(PORT_READ, &mut memory),
            Ok(Exit::Continue)
        ));
        assert_eq!(
            memory.slice(HEAP_ADDR, 16).unwrap(),
            b"world\0\0\0\0\0\0\0\0\0\0\0"
        );
        assert_eq!(
            HostMailbox::header(&memory).unwrap().status.get(),
            STATUS_OK
        );
        // Offset at u64::MAX is all zeros, not an overflow.
        set(&mut memory, |h| h.offset = Le64::new(u64::MAX));
        assert!(matches!(
            mb.handle(PORT_READ, &mut memory),
            Ok(Exit::Continue)
        ));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn writes_stay_inside_the_outputs_and_their_limit() {
        let (mb, mut memory, path) = setup(b"data");
        let out_path = path.with_extension("out");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&out_path)
            .unwrap();
        let root = mb.files.into_iter().next().unwrap();
        let mut mb = HostMailbox::with_files(
            RunFiles {
                inputs: vec![root],
                outputs: vec![out],
                output_names: vec!["out".into()],
                output_limit: 8192,
            },
            Gate::default(),
        );
        memory.write(HEAP_ADDR, b"0123456789").unwrap();
        set(&mut memory, |h| {
            h.file = Le64::new(0);
            h.offset = Le64::new(4000);
            h.length = Le64::new(10);
            h.buffer = Le64::new(HEAP_ADDR);
        });
        assert!(matches!(
            mb.handle(PORT_WRITE, &mut memory),
            Ok(Exit::Continue)
        ));
        assert_eq!(
            HostMailbox::header(&memory).unwrap().status.get(),
            STATUS_OK
        );
        let written = std::fs::read(&out_path).unwrap();
        assert_eq!(&written[4000..], b"0123456789");
        assert_eq!((mb.writes, mb.bytes_written), (1, 10));
        // Past the output limit, even by one byte.
        set(&mut memory, |h| h.offset = Le64::new(8192 - 9));
        assert!(err(mb.handle(PORT_WRITE, &mut memory)).contains("past the output limit"));
        set(&mut memory, |h| h.offset = Le64::new(u64::MAX - 4));
        assert!(err(mb.handle(PORT_WRITE, &mut memory)).contains("past the output limit"));
        // An output that does not exist; an input is not an output.
        set(&mut memory, |h| {
            h.offset = Le64::new(0);
            h.file = Le64::new(1);
        });
        assert!(err(mb.handle(PORT_WRITE, &mut memory)).contains("unknown output 1"));
        // Guest memory bounds and the per-call size.
        let size = memory.size();
        set(&mut memory, |h| {
            h.file = Le64::new(0);
            h.buffer = Le64::new(size - 4);
        });
        assert!(err(mb.handle(PORT_WRITE, &mut memory)).contains("outside guest memory"));
        set(&mut memory, |h| {
            h.buffer = Le64::new(HEAP_ADDR);
            h.length = Le64::new(limits::MAX_WRITE_BYTES + 1);
        });
        assert!(err(mb.handle(PORT_WRITE, &mut memory)).contains("MAX_WRITE_BYTES"));
        // Lengths: within the limit they apply, past it they are refused.
        assert_eq!(
            mb.call(HostCall::SetOutputLength {
                file: 0,
                length: 8192
            })
            .unwrap(),
            HostReply::Done
        );
        assert_eq!(std::fs::metadata(&out_path).unwrap().len(), 8192);
        assert!(mb
            .call(HostCall::SetOutputLength {
                file: 0,
                length: 8193
            })
            .is_err());
        assert!(mb
            .call(HostCall::SetOutputLength { file: 1, length: 0 })
            .is_err());
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(out_path).unwrap();
    }

    #[test]
    fn progress_and_lengths_of_inputs() {
        let (mut mb, _memory, path) = setup(b"12345");
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let s = seen.clone();
        mb.set_progress(Box::new(move |d, t| s.borrow_mut().push((d, t))));
        assert_eq!(
            mb.call(HostCall::Progress { done: 3, total: 9 }).unwrap(),
            HostReply::Done
        );
        assert_eq!(*seen.borrow(), vec![(3, 9)]);
        assert_eq!(
            mb.call(HostCall::Length { file: 0 }).unwrap(),
            HostReply::Opened { file: 0, length: 5 }
        );
        assert!(mb.call(HostCall::Length { file: 1 }).is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_bounds_are_enforced() {
        let (mut mb, mut memory, path) = setup(b"data");
        let size = memory.size();
        set(&mut memory, |h| {
            h.length = Le64::new(16);
            h.buffer = Le64::new(size - 8);
        });
        assert!(err(mb.handle(PORT_READ, &mut memory)).contains("outside guest memory"));
        set(&mut memory, |h| h.buffer = Le64::new(u64::MAX - 4));
        assert!(err(mb.handle(PORT_READ, &mut memory)).contains("outside guest memory"));
        set(&mut memory, |h| {
            h.buffer = Le64::new(HEAP_ADDR);
            h.length = Le64::new(limits::MAX_READ_BYTES + 1);
        });
        assert!(err(mb.handle(PORT_READ, &mut memory)).contains("MAX_READ_BYTES"));
        set(&mut memory, |h| {
            h.length = Le64::new(4);
            h.file = Le64::new(1);
        });
        assert!(err(mb.handle(PORT_READ, &mut memory)).contains("unknown file id"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn messages_are_bounded_and_decoded() {
        let (mut mb, mut memory, path) = setup(b"data");
        set(&mut memory, |h| {
            h.msg_addr = Le64::new(HEAP_ADDR);
            h.msg_len = Le64::new(limits::MAX_MESSAGE_BYTES + 1);
        });
        assert!(err(mb.handle(PORT_DONE, &mut memory)).contains("exceeds the limit"));
        let size = memory.size();
        set(&mut memory, |h| {
            h.msg_addr = Le64::new(size - 2);
            h.msg_len = Le64::new(3);
        });
        assert!(err(mb.handle(PORT_CALL, &mut memory)).contains("outside guest memory"));
        memory.write(HEAP_ADDR, &[0xff; 8]).unwrap();
        set(&mut memory, |h| {
            h.msg_addr = Le64::new(HEAP_ADDR);
            h.msg_len = Le64::new(8);
        });
        assert!(err(mb.handle(PORT_DONE, &mut memory)).contains("undecodable response"));
        assert!(err(mb.handle(PORT_CALL, &mut memory)).contains("undecodable host call"));
        assert!(err(mb.handle(0x99, &mut memory)).contains("unknown port"));
        memory.write(HEAP_ADDR, b"boom\nline").unwrap();
        set(&mut memory, |h| h.msg_len = Le64::new(9));
        assert_eq!(
            err(mb.handle(PORT_PANIC, &mut memory)),
            "instar: guest panicked: boom line"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn open_call_goes_through_the_gate() {
        let (mut mb, mut memory, path) = setup(b"data");
        let call = postcard::to_allocvec(&HostCall::Open {
            relative_to: 0,
            path: "/etc/passwd".into(),
        })
        .unwrap();
        memory.write(HEAP_ADDR, &call).unwrap();
        set(&mut memory, |h| {
            h.msg_addr = Le64::new(HEAP_ADDR);
            h.msg_len = Le64::new(call.len() as u64);
        });
        assert!(matches!(
            mb.handle(PORT_CALL, &mut memory),
            Ok(Exit::Continue)
        ));
        let len = HostMailbox::header(&memory).unwrap().reply_len.get();
        let reply: HostReply =
            postcard::from_bytes(memory.slice(MESSAGE_ADDR, len).unwrap()).unwrap();
        match reply {
            HostReply::Failed(e) => assert_eq!(e.kind, ErrorKind::Refused),
            other => panic!("{other:?}"),
        }
        let call = postcard::to_allocvec(&HostCall::Open {
            relative_to: 7,
            path: "x".into(),
        })
        .unwrap();
        memory.write(HEAP_ADDR, &call).unwrap();
        set(&mut memory, |h| h.msg_len = Le64::new(call.len() as u64));
        assert!(err(mb.handle(PORT_CALL, &mut memory)).contains("unknown file id 7"));
        std::fs::remove_file(path).unwrap();
    }
}
