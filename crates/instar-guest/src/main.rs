//! instar's guest: the only code that reads image bytes. It runs at ring 3
//! on one vCPU with an identity map and no interrupts; the host starts it at
//! `_start` with the mailbox address in rdi. It decodes the request, runs
//! the engine over [`MailboxFiles`], writes the response and rings
//! [`PORT_DONE`]. Everything it can reach is its own RAM and four ports.
#![no_std]
#![no_main]

extern crate alloc;

mod heap;
mod mailbox;

use alloc::string::String;
use alloc::vec::Vec;
use instar_formats::write::Sink;
use instar_formats::Files;
use instar_wire::mailbox::{MESSAGE_ADDR, MESSAGE_CAPACITY, PORT_PANIC};
use instar_wire::{DataExtents, FileId, HostCall, HostReply, ImageError, OutId, Request, Response};
use mailbox::Mailbox;

/// Bytes per read-cache chunk. Header and table reads are small and
/// clustered; one exit costs 25-40 us here, so each miss fetches a whole
/// aligned chunk.
const CHUNK: usize = 256 << 10;
/// Chunks kept (LRU). 8 x 256 KiB = 2 MiB of heap.
const CACHE_ENTRIES: usize = 8;
/// Reads at least this long go straight into the caller's buffer, exactly
/// as asked: guest data (a cluster or more) read once, by one pread, with
/// no chunk rounding or copy; metadata reads are far smaller and keep the
/// cache's batching.
const DIRECT: usize = 32 << 10;
/// Largest single read request; bigger reads are split (the host refuses
/// more than `instar_vmm::limits::MAX_READ_BYTES`, 16 MiB).
const MAX_READ: usize = 16 << 20;
/// Largest single write request (the host refuses more than
/// `instar_vmm::limits::MAX_WRITE_BYTES`, 16 MiB).
const MAX_WRITE: usize = 16 << 20;

struct Chunk {
    file: FileId,
    index: u64,
    last_use: u64,
    data: Vec<u8>,
}

/// The host's last answer about one file's holes (queries walk forward,
/// so one reply per file answers many of them).
struct HoleMap {
    file: FileId,
    from: u64,
    extents: DataExtents,
}

/// [`Files`] over the mailbox, with a small read cache.
struct MailboxFiles {
    mailbox: Mailbox,
    lengths: Vec<u64>,
    cache: Vec<Chunk>,
    clock: u64,
    holes: Option<HoleMap>,
}

impl MailboxFiles {
    fn new(mailbox: Mailbox, root_length: u64) -> Self {
        Self {
            mailbox,
            lengths: alloc::vec![root_length],
            cache: Vec::new(),
            clock: 0,
            holes: None,
        }
    }

    fn host_call(&mut self, call: &HostCall) -> instar_formats::Result<HostReply> {
        host_call(self.mailbox, call)
    }

    /// Learn the lengths of the host-opened inputs after the root (files
    /// 1..count), before the engine opens anything itself.
    fn add_inputs(&mut self, count: usize) -> instar_formats::Result<()> {
        for file in 1..count as FileId {
            match self.host_call(&HostCall::Length { file })? {
                HostReply::Opened { file: f, length } if f == file => self.lengths.push(length),
                HostReply::Failed(e) => return Err(e),
                _ => {
                    return Err(ImageError::operation(
                        "internal error: unexpected host reply",
                    ))
                }
            }
        }
        Ok(())
    }

    fn length(&self, file: FileId) -> instar_formats::Result<u64> {
        self.lengths
            .get(file as usize)
            .copied()
            .ok_or_else(|| ImageError::operation("internal error: no such file id"))
    }

    /// One read exit: the host fills `buf` (zeros past the end of file).
    fn read_direct(
        &mut self,
        file: FileId,
        offset: u64,
        buf: &mut [u8],
    ) -> instar_formats::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_READ);
            let at = offset.saturating_add(done as u64);
            let status = self.mailbox.read(file, at, &mut buf[done..done + n]);
            if status != 0 {
                return Err(ImageError::operation(alloc::format!(
                    "Could not read image: I/O error (errno {status})"
                )));
            }
            done += n;
        }
        Ok(())
    }

    /// The cached chunk `index` of `file`, fetched on a miss.
    fn chunk(&mut self, file: FileId, index: u64, file_len: u64) -> instar_formats::Result<&[u8]> {
        self.clock += 1;
        let clock = self.clock;
        if let Some(pos) = self
            .cache
            .iter()
            .position(|c| c.file == file && c.index == index)
        {
            self.cache[pos].last_use = clock;
            return Ok(&self.cache[pos].data);
        }
        let start = index * CHUNK as u64;
        // Only the part inside the file crosses the boundary; the rest of
        // the chunk stays zero, as the read contract wants.
        let want = file_len.saturating_sub(start).min(CHUNK as u64) as usize;
        let slot = if self.cache.len() < CACHE_ENTRIES {
            self.cache.push(Chunk {
                file,
                index,
                last_use: clock,
                data: alloc::vec![0; CHUNK],
            });
            self.cache.len() - 1
        } else {
            let (pos, _) = self
                .cache
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.last_use)
                .expect("cache is full, so not empty");
            pos
        };
        let mut data = core::mem::take(&mut self.cache[slot].data);
        data.fill(0);
        let result = self.read_direct(file, start, &mut data[..want]);
        let entry = &mut self.cache[slot];
        entry.data = data;
        entry.file = file;
        entry.index = index;
        entry.last_use = clock;
        if let Err(e) = result {
            // Never leave a half-filled chunk findable.
            entry.index = u64::MAX;
            return Err(e);
        }
        Ok(&self.cache[slot].data)
    }
}

impl Files for MailboxFiles {
    fn len(&mut self, file: FileId) -> instar_formats::Result<u64> {
        self.length(file)
    }

    fn read_at(&mut self, file: FileId, offset: u64, buf: &mut [u8]) -> instar_formats::Result<()> {
        let file_len = self.length(file)?;
        if buf.is_empty() {
            return Ok(());
        }
        // Entirely past the end: zeros, no exit.
        if offset >= file_len {
            buf.fill(0);
            return Ok(());
        }
        if buf.len() >= DIRECT {
            return self.read_direct(file, offset, buf);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = match offset.checked_add(done as u64) {
                Some(at) if at < file_len => at,
                _ => {
                    buf[done..].fill(0);
                    break;
                }
            };
            let index = at / CHUNK as u64;
            let within = (at % CHUNK as u64) as usize;
            let n = (CHUNK - within).min(buf.len() - done);
            let chunk = self.chunk(file, index, file_len)?;
            buf[done..done + n].copy_from_slice(&chunk[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn allocated(&mut self, file: FileId) -> instar_formats::Result<u64> {
        match self.host_call(&HostCall::DataExtents { file, offset: 0 })? {
            HostReply::DataExtents(e) => Ok(e.allocated),
            HostReply::Failed(e) => Err(e),
            _ => Err(ImageError::operation(
                "internal error: unexpected host reply",
            )),
        }
    }

    fn data_at(&mut self, file: FileId, offset: u64) -> instar_formats::Result<(bool, u64)> {
        let len = self.length(file)?;
        if offset >= len {
            return Ok((false, u64::MAX));
        }
        let cached = matches!(&self.holes, Some(h) if h.file == file
            && h.from <= offset && offset < h.extents.scanned_to);
        if !cached {
            let extents = match self.host_call(&HostCall::DataExtents { file, offset })? {
                HostReply::DataExtents(e) => e,
                HostReply::Failed(e) => return Err(e),
                _ => {
                    return Err(ImageError::operation(
                        "internal error: unexpected host reply",
                    ))
                }
            };
            if extents.unsupported {
                return Ok((true, u64::MAX));
            }
            if extents.scanned_to <= offset {
                return Err(ImageError::operation(
                    "internal error: host scanned no holes",
                ));
            }
            self.holes = Some(HoleMap {
                file,
                from: offset,
                extents,
            });
        }
        let Some(h) = &self.holes else {
            return Ok((true, u64::MAX));
        };
        let e = &h.extents;
        // Ranges are ascending: the first that ends after `offset`.
        let i = e.data.partition_point(|&(_, end)| end <= offset);
        Ok(match e.data.get(i) {
            Some(&(start, end)) if start <= offset => (true, end - offset),
            Some(&(start, _)) => (false, start - offset),
            None if e.scanned_to >= len => (false, u64::MAX),
            None => (false, e.scanned_to - offset),
        })
    }

    fn open(&mut self, relative_to: FileId, path: &str) -> instar_formats::Result<FileId> {
        self.open_call(&HostCall::Open {
            relative_to,
            path: path.into(),
        })
    }

    fn open_as_given(&mut self, path: &str) -> instar_formats::Result<FileId> {
        self.open_call(&HostCall::OpenAsGiven { path: path.into() })
    }
}

impl MailboxFiles {
    fn open_call(&mut self, call: &HostCall) -> instar_formats::Result<FileId> {
        match self.host_call(call) {
            Ok(HostReply::Opened { file, length }) => {
                if file as usize != self.lengths.len() {
                    return Err(ImageError::operation(
                        "internal error: host gave an unexpected file id",
                    ));
                }
                self.lengths.push(length);
                Ok(file)
            }
            Ok(HostReply::Failed(error)) => Err(error),
            Ok(_) => Err(ImageError::operation(
                "internal error: unexpected host reply",
            )),
            Err(e) => Err(e),
        }
    }
}

/// One host call; the reply decoded.
fn host_call(mailbox: Mailbox, call: &HostCall) -> instar_formats::Result<HostReply> {
    let encoded = postcard::to_allocvec(call)
        .map_err(|_| ImageError::operation("internal error: cannot encode host call"))?;
    let reply = mailbox.call(&encoded);
    postcard::from_bytes::<HostReply>(reply)
        .map_err(|_| ImageError::operation("internal error: undecodable host reply"))
}

/// [`Sink`] over the mailbox: PORT_WRITE for data (straight from the
/// caller's buffer, no copy), host calls for lengths and progress. The host
/// checks every id and range; the errno it reports becomes qemu's wording.
struct MailboxSink {
    mailbox: Mailbox,
    names: Vec<String>,
}

impl Sink for MailboxSink {
    fn write_at(&mut self, file: OutId, offset: u64, data: &[u8]) -> instar_formats::Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(MAX_WRITE);
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| ImageError::operation("Could not write image: File too large"))?;
            let (status, failed_at) = self.mailbox.write(file, at, &data[done..done + n]);
            if status != 0 {
                return Err(ImageError::operation(alloc::format!(
                    "error while writing at byte {failed_at}: {}",
                    errno_text(status)
                )));
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&mut self, file: OutId, length: u64) -> instar_formats::Result<()> {
        match host_call(self.mailbox, &HostCall::SetOutputLength { file, length })? {
            HostReply::Done => Ok(()),
            HostReply::Failed(e) => Err(e),
            _ => Err(ImageError::operation(
                "internal error: unexpected host reply",
            )),
        }
    }

    fn output_name(&self, file: OutId) -> Option<&str> {
        self.names.get(file as usize).map(String::as_str)
    }

    fn progress(&mut self, done: u64, total: u64) -> instar_formats::Result<()> {
        host_call(self.mailbox, &HostCall::Progress { done, total }).map(|_| ())
    }
}

/// glibc's text for the errors a pwrite can give (the host passes errno).
fn errno_text(errno: u64) -> alloc::borrow::Cow<'static, str> {
    alloc::borrow::Cow::Borrowed(match errno {
        5 => "Input/output error",
        9 => "Bad file descriptor",
        22 => "Invalid argument",
        27 => "File too large",
        28 => "No space left on device",
        30 => "Read-only file system",
        122 => "Disk quota exceeded",
        n => return alloc::borrow::Cow::Owned(alloc::format!("errno {n}")),
    })
}

/// Run the request with the files and outputs the host set up for it.
fn serve(mailbox: Mailbox, request: &Request) -> Response {
    let mut files = MailboxFiles::new(mailbox, mailbox.root_length());
    let (inputs, names) = match request {
        Request::Convert {
            sources, outputs, ..
        } => (sources.len(), outputs.clone()),
        Request::Compare { .. } => (2, Vec::new()),
        _ => (1, Vec::new()),
    };
    if let Err(e) = files.add_inputs(inputs) {
        return Response::Error(e);
    }
    let mut sink = MailboxSink { mailbox, names };
    instar_engine::handle(&mut files, &mut sink, request)
}

/// Entry point: the host sets rip here, rsp to `STACK_TOP - 8` and rdi to
/// the mailbox address.
#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start(mailbox_addr: u64) -> ! {
    let mailbox = Mailbox::new(mailbox_addr);
    heap::init(mailbox.memory_end());
    let response = match mailbox.request() {
        Some(bytes) => match postcard::from_bytes::<Request>(bytes) {
            Ok(request) => serve(mailbox, &request),
            Err(_) => Response::Error(ImageError::operation("internal error: undecodable request")),
        },
        None => Response::Error(ImageError::operation(
            "internal error: request does not fit the mailbox",
        )),
    };
    match postcard::to_allocvec(&response) {
        Ok(encoded) => mailbox.done(&encoded),
        Err(_) => panic!("cannot encode the response"),
    }
}

/// Fixed-capacity writer into the mailbox message area, so a panic report
/// needs no allocation (the panic may be an allocation failure).
struct PanicText {
    len: usize,
}

impl core::fmt::Write for PanicText {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = (MESSAGE_CAPACITY as usize).saturating_sub(self.len);
        // Cut at a char boundary so the host always gets valid UTF-8.
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: the message area [MESSAGE_ADDR, +MESSAGE_CAPACITY) is
        // mapped guest RAM reserved for messages; len + n <= capacity.
        unsafe {
            core::ptr::copy_nonoverlapping(
                s.as_ptr(),
                (MESSAGE_ADDR as usize + self.len) as *mut u8,
                n,
            );
        }
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let mut text = PanicText { len: 0 };
    let _ = write!(text, "{}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(text, " at {}:{}", loc.file(), loc.line());
    }
    let mailbox = Mailbox::new(instar_wire::mailbox::MAILBOX_ADDR);
    loop {
        mailbox.signal_message(PORT_PANIC, MESSAGE_ADDR, text.len as u64);
    }
}
