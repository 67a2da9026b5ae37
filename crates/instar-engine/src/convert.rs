//! `convert`: read the sources (each with its backing chain) in order as
//! one concatenated disk and feed a target writer, the way qemu-img's
//! `convert_do_copy` decides what to copy:
//!
//! - runs that read as zeros through the chain are not written (a new
//!   target reads as zeros there), or written as zeros
//!   ([`ImageWriter::zero`]) when the target has a backing file whose
//!   data they must hide;
//! - with `-B` (`target_has_backing`) only what the top image of a source
//!   holds is copied; the rest comes from the target's backing file;
//! - data is read in batches of up to [`BATCH`] bytes into one reusable
//!   buffer (plain clusters by one read per host-contiguous stretch,
//!   compressed and other stored-differently runs through
//!   [`MapImage::read`]), then zero detection as `-S` asks
//!   (`is_allocated_sectors_min`) splits it into what is written and what
//!   is skipped.
//!
//! Memory is the batch buffer plus each format's per-layer state,
//! whatever the image size.

use crate::map::{block_status, open_chain, Layer};
use alloc::boxed::Box;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use instar_formats::map::{self as fmap, HostRef, Mapping};
use instar_formats::write::{self, ImageWriter, Sink};
use instar_formats::{Files, Result};
use instar_wire::{
    ConvertResult, ConvertSource, ConvertTarget, ErrorKind, FileId, ImageError, OutId,
};

/// Largest batch of guest data read and written at once: big enough that
/// the per-exit cost (25-40 us) is noise next to the copy, small enough to
/// keep the guest's footprint (and the host's pwrite size) modest.
pub const BATCH: u64 = 8 << 20;

/// qemu's BDRV_REQUEST_MAX_SECTORS (INT_MAX >> 9) in bytes: the most
/// qemu-img's convert asks of block status at once.
const BDRV_REQUEST_MAX_BYTES: u64 = ((i32::MAX as u64) >> 9) << 9;

/// qemu-img convert's buffer (`buf_sectors`, 2 MiB): data runs are copied,
/// and progress is printed, in pieces of at most this.
const PROGRESS_CHUNK: u64 = 2 << 20;

/// qemu's BDRV_SECTOR_SIZE: zero detection works in sectors.
const SECTOR: usize = 512;

/// The fields of `Request::Convert`.
pub struct ConvertParams<'a> {
    /// The sources, concatenated in order (file id = index).
    pub sources: &'a [ConvertSource],
    /// What to write.
    pub target: &'a ConvertTarget,
    /// `-S` in bytes (0: no zero detection).
    pub sparse_size: u64,
    /// `-l`.
    pub snapshot: Option<&'a str>,
    /// `-B` given.
    pub target_has_backing: bool,
    /// Backing files allowed below each source.
    pub max_chain_depth: u32,
    /// `-p`.
    pub progress: bool,
}

/// What a run of a source is, for copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Read it: plainly at `at`, or through layer `depth`'s reader.
    Data {
        len: u64,
        at: Option<HostRef>,
        depth: usize,
    },
    /// Reads as zeros.
    Zero { len: u64 },
    /// The target's backing file provides it (`-B`): nothing to do.
    Backing { len: u64 },
}

/// [`Sink`] that counts what is written (for [`ConvertResult`]).
struct Counting<'a> {
    inner: &'a mut dyn Sink,
    bytes: u64,
}

impl Sink for Counting<'_> {
    fn write_at(&mut self, file: OutId, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(file, offset, data)?;
        self.bytes = self.bytes.saturating_add(data.len() as u64);
        Ok(())
    }
    fn set_len(&mut self, file: OutId, length: u64) -> Result<()> {
        self.inner.set_len(file, length)
    }
    fn output_name(&self, file: OutId) -> Option<&str> {
        self.inner.output_name(file)
    }
    fn progress(&mut self, done: u64, total: u64) -> Result<()> {
        self.inner.progress(done, total)
    }
}

/// qemu-img's wording for a failed block status query (the corruption
/// line a format adds stays a warning before it).
fn status_error(e: ImageError, offset: u64) -> ImageError {
    match e.kind {
        ErrorKind::Limit => e,
        _ => ImageError {
            message: format!(
                "error while reading block status at offset {offset}: Input/output error"
            ),
            ..e
        },
    }
}

/// qemu-img's wording for a failed read of guest data at `offset`.
fn read_error(e: ImageError, offset: u64) -> ImageError {
    match e.kind {
        ErrorKind::Limit => e,
        _ => ImageError {
            message: format!("error while reading at byte {offset}: Input/output error"),
            ..e
        },
    }
}

/// One opened source.
struct Source {
    chain: Vec<Layer>,
    size: u64,
}

/// The run of `src` at `offset`, at most `len` bytes.
fn classify(
    files: &mut dyn Files,
    src: &mut Source,
    offset: u64,
    len: u64,
    target_has_backing: bool,
) -> Result<Run> {
    if !target_has_backing {
        let e = block_status(files, &mut src.chain, offset, len)?;
        return Ok(if e.zero || !e.data {
            // Not data anywhere in the chain reads as zeros.
            Run::Zero { len: e.length }
        } else {
            Run::Data {
                len: e.length,
                at: match (e.file, e.offset) {
                    (Some(file), Some(offset)) if !e.compressed => Some(HostRef { file, offset }),
                    _ => None,
                },
                depth: e.depth as usize,
            }
        });
    }
    // `-B`: the top image alone (qemu's bdrv_block_status, not _above).
    let top = &mut src.chain[0];
    let ext = top.image.block_status(files, offset, len)?;
    if ext.length == 0 || ext.length > len {
        return Err(ImageError::operation(
            "Could not read file metadata: Input/output error",
        ));
    }
    let mut length = ext.length;
    if let (true, Mapping::Data { at }) = (ext.recurse, ext.mapping) {
        let (zero, n) = fmap::recurse_into_file(files, at, length)?;
        if zero {
            return Ok(Run::Zero { len: n });
        }
        length = n;
    }
    Ok(match ext.mapping {
        Mapping::Data { at } => Run::Data {
            len: length,
            at: Some(at),
            depth: 0,
        },
        Mapping::Compressed | Mapping::Opaque => Run::Data {
            len: length,
            at: None,
            depth: 0,
        },
        Mapping::Zero { .. } => Run::Zero { len: length },
        Mapping::Unallocated { .. } => Run::Backing { len: length },
    })
}

/// qemu-img's `is_allocated_sectors`: how many sectors from the start of
/// `buf` (`n` sectors, the last maybe partial) share the first one's
/// zero-ness, with qemu's alignment of the end to `alignment` sectors
/// (counted from `sector`). Gives (is data, sectors).
fn allocated_sectors(buf: &[u8], n: usize, sector: u64, alignment: u64) -> (bool, usize) {
    let is_zero_at = |i: usize| {
        let end = ((i + 1) * SECTOR).min(buf.len());
        is_zero(&buf[i * SECTOR..end])
    };
    let zero = is_zero_at(0);
    let mut i = 1;
    while i < n && is_zero_at(i) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let mut zero = zero;
    let tail = ((sector + i as u64) & (alignment - 1)) as usize;
    if tail != 0 {
        if zero && i <= tail {
            // A short zero stretch that is only an unaligned tail is
            // treated as data.
            zero = false;
        }
        if !zero {
            i = (i + alignment as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: data, unless at least `min`
/// sectors of zeros follow; gives (is data, sectors).
fn allocated_sectors_min(
    buf: &[u8],
    n: usize,
    min: usize,
    sector: u64,
    alignment: u64,
) -> (bool, usize) {
    let min = min.min(n);
    let (data, first) = allocated_sectors(buf, n, sector, alignment);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let (data, k) = allocated_sectors(
            &buf[checked * SECTOR..],
            n - checked,
            sector + checked as u64,
            alignment,
        );
        checked += k;
        if data {
            used = checked;
        } else if k >= min {
            break;
        }
    }
    (true, used)
}

/// qemu's `buffer_is_zero`: 64 bytes at a time as eight words (the guest
/// has no SIMD), stopping at the first non-zero block, so data costs
/// almost nothing to tell apart and zeros cost one pass.
fn is_zero(b: &[u8]) -> bool {
    let word = |c: &[u8], i: usize| {
        u64::from_ne_bytes([
            c[i],
            c[i + 1],
            c[i + 2],
            c[i + 3],
            c[i + 4],
            c[i + 5],
            c[i + 6],
            c[i + 7],
        ])
    };
    let mut blocks = b.chunks_exact(64);
    for c in blocks.by_ref() {
        let acc = word(c, 0)
            | word(c, 8)
            | word(c, 16)
            | word(c, 24)
            | word(c, 32)
            | word(c, 40)
            | word(c, 48)
            | word(c, 56);
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// The copy loop's state: target, batch buffer, progress.
struct Copier<'s> {
    sink: Counting<'s>,
    writer: Box<dyn ImageWriter>,
    buf: Vec<u8>,
    /// Global guest offset of `buf[0]`, and bytes filled.
    pending_start: u64,
    pending_len: usize,
    /// A plain read not issued yet: file, host offset, position in `buf`,
    /// length (host-contiguous runs are merged into one read).
    read: Option<(FileId, u64, usize, usize)>,
    /// `-S` in sectors (0: off) and the alignment of zero runs in sectors.
    min_sparse: usize,
    alignment: u64,
    /// The target has a backing file: zeros must be written as zeros.
    zero_writes: bool,
    progress: bool,
    /// qemu-img's `allocated_sectors` in bytes: what progress counts.
    total: u64,
    last_step: u64,
    /// Progress as qemu-img counts it: bytes of counted runs done, and
    /// where its current 2 MiB chunk sequence started / should continue.
    done: u64,
    chunk_start: u64,
    expect: u64,
}

impl Copier<'_> {
    fn issue_read(&mut self, files: &mut dyn Files) -> Result<()> {
        if let Some((file, at, pos, len)) = self.read.take() {
            let guest = self.pending_start + pos as u64;
            files
                .read_at(file, at, &mut self.buf[pos..pos + len])
                .map_err(|e| read_error(e, guest))?;
        }
        Ok(())
    }

    /// Write what the batch holds, skipping zeros as `-S` asks.
    fn flush(&mut self, files: &mut dyn Files) -> Result<()> {
        self.issue_read(files)?;
        let len = self.pending_len;
        if len == 0 {
            return Ok(());
        }
        let start = self.pending_start;
        self.pending_len = 0;
        if self.min_sparse == 0 {
            return self.writer.write(&mut self.sink, start, &self.buf[..len]);
        }
        let sectors = len.div_ceil(SECTOR);
        let mut at = 0usize; // in sectors
        while at < sectors {
            let (data, n) = allocated_sectors_min(
                &self.buf[at * SECTOR..len],
                sectors - at,
                self.min_sparse,
                start / SECTOR as u64 + at as u64,
                self.alignment,
            );
            let n = n.max(1);
            let from = at * SECTOR;
            let to = ((at + n) * SECTOR).min(len);
            if data {
                self.writer
                    .write(&mut self.sink, start + from as u64, &self.buf[from..to])?;
            } else if self.zero_writes {
                self.writer
                    .zero(&mut self.sink, start + from as u64, (to - from) as u64)?;
            }
            at += n;
        }
        Ok(())
    }

    /// `n` counted bytes at guest offset `g` are done: report them the way
    /// qemu-img's copy loop does, after each chunk of at most
    /// [`PROGRESS_CHUNK`] from the start of a run.
    fn counted(&mut self, g: u64, n: u64) -> Result<()> {
        if !self.progress {
            return Ok(());
        }
        if g != self.expect {
            self.chunk_start = g;
        }
        let end = g + n;
        let mut at = g;
        while at < end {
            let chunk_end =
                self.chunk_start + ((at - self.chunk_start) / PROGRESS_CHUNK + 1) * PROGRESS_CHUNK;
            let e = chunk_end.min(end);
            self.done += e - at;
            self.report(self.done)?;
            at = e;
        }
        self.expect = end;
        Ok(())
    }

    /// Report progress when the shown value (0.01 % steps) changes.
    fn report(&mut self, done: u64) -> Result<()> {
        if !self.progress || self.total == 0 {
            return Ok(());
        }
        let step = (done as u128 * 10_000 / self.total as u128) as u64;
        if step != self.last_step {
            self.last_step = step;
            self.sink.progress(done, self.total)?;
        }
        Ok(())
    }
}

/// qemu's `pow2floor`.
fn pow2floor(v: u64) -> u64 {
    if v == 0 {
        0
    } else {
        1 << (63 - v.leading_zeros())
    }
}

/// qemu-img's first pass for `-p`: bytes of the runs its copy loop counts
/// (data, and zeros when `-S 0`), so percentages match its own.
fn counted_total(
    files: &mut dyn Files,
    sources: &mut [Source],
    copy_end: u64,
    p: &ConvertParams,
) -> Result<u64> {
    let mut total = 0u64;
    let mut base = 0u64;
    for src in sources.iter_mut() {
        let end = src.size.min(copy_end.saturating_sub(base));
        let mut off = 0u64;
        while off < end {
            let ask = (end - off).min(BDRV_REQUEST_MAX_BYTES);
            let run = classify(files, src, off, ask, p.target_has_backing)
                .map_err(|e| status_error(e, off))?;
            let (len, counts) = match run {
                Run::Data { len, .. } => (len, true),
                Run::Zero { len } => (len, p.sparse_size / SECTOR as u64 == 0),
                Run::Backing { len } => (len, false),
            };
            if counts {
                total += len;
            }
            off += len;
        }
        base += src.size;
    }
    Ok(total)
}

/// Convert the sources into the target. Open errors come before anything
/// is written (except the target's creation, which the host has done).
pub fn convert(
    files: &mut dyn Files,
    sink: &mut dyn Sink,
    p: &ConvertParams,
) -> Result<ConvertResult> {
    if p.sources.is_empty() {
        return Err(ImageError::operation("Must specify image file name"));
    }
    if p.snapshot.is_some() && p.sources.len() > 1 {
        return Err(ImageError::open(
            "No support for concatenating multiple snapshot",
        ));
    }
    let mut sources = Vec::with_capacity(p.sources.len());
    let mut warnings = Vec::new();
    let mut total = 0u64;
    for (i, s) in p.sources.iter().enumerate() {
        let mut chain = open_chain(
            files,
            i as FileId,
            s.format.as_deref(),
            &s.filename,
            p.max_chain_depth,
        )?;
        if let Some(name) = p.snapshot {
            chain[0].image.load_snapshot(files, name)?;
        }
        warnings.extend(
            chain
                .iter()
                .flat_map(|l| l.image.warnings().iter().cloned()),
        );
        let size = chain[0].image.virtual_size();
        total = total
            .checked_add(size)
            .ok_or_else(|| ImageError::limit("the sources' total size overflows"))?;
        sources.push(Source { chain, size });
    }
    let virtual_size = p.target.size.unwrap_or(total);
    let copy_end = virtual_size.min(total);
    let mut counting = Counting {
        inner: sink,
        bytes: 0,
    };
    let writer = write::create(&mut counting, p.target, virtual_size)?;
    let min_sparse = (p.sparse_size / SECTOR as u64) as usize;
    let mut c = Copier {
        sink: counting,
        writer,
        buf: vec![0u8; BATCH as usize],
        pending_start: 0,
        pending_len: 0,
        read: None,
        min_sparse,
        alignment: pow2floor(min_sparse as u64).max(1),
        zero_writes: p.target_has_backing,
        progress: p.progress,
        total: if p.progress {
            counted_total(files, &mut sources, copy_end, p)?
        } else {
            0
        },
        last_step: u64::MAX,
        done: 0,
        chunk_start: 0,
        expect: u64::MAX,
    };
    c.report(0)?;
    let mut base = 0u64;
    for src in &mut sources {
        let end = src.size.min(copy_end.saturating_sub(base));
        let mut off = 0u64;
        while off < end {
            let g = base + off;
            // qemu-img asks at most BDRV_REQUEST_MAX_SECTORS at a time
            // (drivers with 32-bit sector counts depend on it).
            let ask = (end - off).min(BDRV_REQUEST_MAX_BYTES);
            let run = classify(files, src, off, ask, p.target_has_backing)
                .map_err(|e| status_error(e, off))?;
            match run {
                Run::Data { len, at, depth } => {
                    let window_end = (g / BATCH + 1) * BATCH;
                    let n = len.min(window_end - g);
                    let contiguous = c.pending_len > 0
                        && c.pending_start + c.pending_len as u64 == g
                        && !g.is_multiple_of(BATCH);
                    if !contiguous {
                        c.flush(files)?;
                        c.pending_start = g;
                    }
                    let pos = c.pending_len;
                    let nu = n as usize;
                    match at {
                        Some(h) => {
                            let merged = match &mut c.read {
                                Some((file, start, _, rlen))
                                    if *file == h.file && *start + *rlen as u64 == h.offset =>
                                {
                                    *rlen += nu;
                                    true
                                }
                                _ => false,
                            };
                            if !merged {
                                c.issue_read(files)?;
                                c.read = Some((h.file, h.offset, pos, nu));
                            }
                        }
                        None => {
                            c.issue_read(files)?;
                            src.chain[depth]
                                .image
                                .read(files, off, &mut c.buf[pos..pos + nu])
                                .map_err(|e| read_error(e, g))?;
                        }
                    }
                    c.pending_len += nu;
                    off += n;
                    c.counted(g, n)?;
                }
                Run::Zero { len } => {
                    c.flush(files)?;
                    if c.zero_writes {
                        c.writer.zero(&mut c.sink, g, len)?;
                    }
                    off += len;
                    if c.min_sparse == 0 {
                        c.counted(g, len)?;
                    }
                }
                Run::Backing { len } => {
                    c.flush(files)?;
                    off += len;
                }
            }
        }
        c.flush(files)?;
        base += src.size;
    }
    c.flush(files)?;
    let Copier {
        writer, mut sink, ..
    } = c;
    writer.finish(&mut sink)?;
    Ok(ConvertResult {
        virtual_size,
        bytes_written: sink.bytes,
        warnings,
    })
}

#[cfg(test)]
mod tests;
