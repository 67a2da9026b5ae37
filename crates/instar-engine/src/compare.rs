//! `compare`: open both images with their backing chains and walk them as
//! qemu-img's `img_compare` does: block status of each side from the same
//! offset, skip runs that are zero on both, read the rest in chunks of at
//! most 2 MiB and report the first sector that differs (or the first
//! non-zero sector where only one side is allocated), then check that the
//! tail of the larger image reads as zeros.
//!
//! The result is what qemu-img prints and its exit code; errors are text
//! of that result too, so the host only prints.

use crate::map::{block_status, open_chain, Layer};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use instar_formats::{Files, Result};
use instar_wire::{CompareResult, ErrorKind, FileId, ImageError, MapEntry};

/// img_compare's `IO_BUF_SIZE`: the most it reads per side and step.
const IO_BUF_SIZE: u64 = 2 << 20;

/// qemu's BDRV_SECTOR_SIZE: mismatches are reported per sector.
const SECTOR: usize = 512;

// BDRV_BLOCK_* bits, for strict mode's comparison of status words.
const BLOCK_DATA: u32 = 0x01;
const BLOCK_ZERO: u32 = 0x02;
const BLOCK_OFFSET_VALID: u32 = 0x04;
const BLOCK_ALLOCATED: u32 = 0x10;
const BLOCK_EOF: u32 = 0x20;
const BLOCK_COMPRESSED: u32 = 0x80;

/// Parameters of one `compare` run (the fields of `Request::Compare`).
pub struct CompareParams<'a> {
    /// `-f`.
    pub format_a: Option<&'a str>,
    /// `-F`.
    pub format_b: Option<&'a str>,
    /// First image's name as given (file 0).
    pub filename_a: &'a str,
    /// Second image's name as given (file 1).
    pub filename_b: &'a str,
    /// `-s`.
    pub strict: bool,
    /// `-p`: progress text goes into stdout.
    pub progress: bool,
    /// Backing files allowed below each image.
    pub max_chain_depth: u32,
}

/// The file the host opened for the second image.
const FILE_B: FileId = 1;

struct Side<'a> {
    chain: Vec<Layer>,
    name: &'a str,
    size: u64,
    /// The last run: img_compare asks again at every step, but a run's
    /// end does not depend on where in it the question starts (except
    /// qcow2's INT_MAX cap per query, so long runs are asked again).
    last: Option<Status>,
}

/// Runs at most this long are reused for later steps inside them.
const REUSE_RUN: u64 = 1 << 30;

/// The status of one run as `bdrv_block_status_above` gives it.
#[derive(Clone)]
struct Status {
    entry: MapEntry,
    allocated: bool,
    word: u32,
}

impl Side<'_> {
    fn status(&mut self, files: &mut dyn Files, offset: u64) -> Result<Status> {
        if let Some(last) = &self.last {
            let e = &last.entry;
            let end = e.start + e.length;
            if e.start < offset && offset < end && e.length <= REUSE_RUN {
                let mut st = last.clone();
                let delta = offset - e.start;
                st.entry.start = offset;
                st.entry.length = end - offset;
                st.entry.offset = e.offset.map(|o| o + delta);
                return Ok(st);
            }
        }
        let st = self.query(files, offset)?;
        self.last = Some(st.clone());
        Ok(st)
    }

    fn query(&mut self, files: &mut dyn Files, offset: u64) -> Result<Status> {
        let entry = block_status(files, &mut self.chain, offset, self.size - offset)?;
        let last = entry.depth as usize + 1 == self.chain.len();
        // Zeros synthesised above a shorter backing file count as
        // allocated in the layer below (block_status_above's `*pnum == 0`
        // case); at the bottom of the chain they are not allocated.
        let allocated = entry.present || (entry.zero && !last);
        let mut word = 0;
        if entry.data {
            word |= BLOCK_DATA;
        }
        if entry.zero {
            word |= BLOCK_ZERO;
        }
        if entry.offset.is_some() {
            word |= BLOCK_OFFSET_VALID;
        }
        if allocated {
            word |= BLOCK_ALLOCATED;
        }
        if entry.compressed {
            word |= BLOCK_COMPRESSED;
        }
        let end = entry.start + entry.length;
        // EOF is the top image's end; an unallocated answer from the bottom
        // layer keeps that layer's own EOF.
        let layer_size = self.chain[entry.depth as usize].image.virtual_size();
        if end == self.size || (!allocated && last && end == layer_size) {
            word |= BLOCK_EOF;
        }
        Ok(Status {
            entry,
            allocated,
            word,
        })
    }

    /// `blk_pread` of `buf.len()` bytes at the start of `st`'s run.
    fn read(&mut self, files: &mut dyn Files, st: &Status, buf: &mut [u8]) -> Result<()> {
        let e = &st.entry;
        if e.zero || !e.data {
            buf.fill(0);
            return Ok(());
        }
        match (e.file, e.offset) {
            (Some(file), Some(at)) => files.read_at(file, at, buf),
            _ => self.chain[e.depth as usize].image.read(files, e.start, buf),
        }
    }
}

/// qemu's `qemu_progress_print` with `min_skip` 2, in its float
/// arithmetic, writing `progress_simple_print`'s text into stdout.
struct Progress {
    on: bool,
    current: f32,
    last_print: f32,
}

impl Progress {
    fn print(&mut self, out: &mut String, delta: f32) {
        if !self.on {
            return;
        }
        let mut current = self.current + delta / 100.0 * 100.0;
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + 2.0
            || current < self.last_print - 2.0
            || current == 100.0
            || current == 0.0
        {
            self.last_print = current;
            out.push_str(&format!("    ({:.2}/100%)\r", f64::from(current)));
        }
    }

    /// img_compare's step: `chunk` bytes of `base` are done.
    fn step(&mut self, out: &mut String, chunk: u64, base: u64) {
        self.print(out, chunk as f32 / base as f32 * 100.0);
    }
}

/// What ends the walk early: qemu-img's lines and exit code.
struct Stop {
    stdout: Option<String>,
    stderr: Vec<String>,
    exit_code: u8,
}

impl Stop {
    fn differ(line: String) -> Self {
        Stop {
            stdout: Some(line),
            stderr: Vec::new(),
            exit_code: 1,
        }
    }

    /// An error of the walk: instar's own limits in its words, the rest
    /// with the driver's lines and qemu-img's `line`.
    fn error(e: ImageError, line: String, exit_code: u8) -> Self {
        let mut stderr: Vec<String> = e.warnings.iter().map(|w| format!("{w}\n")).collect();
        stderr.push(match e.kind {
            ErrorKind::Limit => format!("instar: {}\n", e.message),
            _ => format!("qemu-img: {line}\n"),
        });
        Stop {
            stdout: None,
            stderr,
            exit_code,
        }
    }
}

fn open_side<'a>(
    files: &mut dyn Files,
    file: FileId,
    format: Option<&str>,
    name: &'a str,
    depth: u32,
) -> core::result::Result<Side<'a>, Vec<String>> {
    match open_chain(files, file, format, name, depth) {
        Ok(chain) => {
            let size = chain[0].image.virtual_size();
            Ok(Side {
                chain,
                name,
                size,
                last: None,
            })
        }
        Err(e) => {
            let mut lines: Vec<String> = e.warnings.iter().map(|w| warning(w)).collect();
            lines.push(match e.kind {
                ErrorKind::Limit => format!("instar: {}\n", e.message),
                _ => format!("qemu-img: Could not open '{name}': {}\n", e.message),
            });
            Err(lines)
        }
    }
}

/// Compare file 0 with file 1.
pub fn compare(files: &mut dyn Files, p: &CompareParams) -> CompareResult {
    let mut out = String::new();
    let mut result = CompareResult {
        stdout: Vec::new(),
        stderr: Vec::new(),
        exit_code: 2,
    };
    let opened = open_side(
        files,
        instar_wire::ROOT_FILE,
        p.format_a,
        p.filename_a,
        p.max_chain_depth,
    )
    .and_then(|a| {
        // Each image warns as it opens, before the next is opened.
        result.stderr = warnings(&a);
        let b = open_side(files, FILE_B, p.format_b, p.filename_b, p.max_chain_depth)?;
        // qemu warns about a missing module once per process.
        let once: Vec<String> = warnings(&b)
            .into_iter()
            .filter(|w| !(w.contains("module is missing") && result.stderr.contains(w)))
            .collect();
        result.stderr.extend(once);
        Ok((a, b))
    });
    match opened {
        Err(lines) => result.stderr.extend(lines),
        Ok((mut a, mut b)) => {
            let mut progress = Progress {
                on: p.progress,
                current: 0.0,
                last_print: 0.0,
            };
            match walk(files, &mut a, &mut b, p.strict, &mut progress, &mut out) {
                Ok(()) => {
                    out.push_str("Images are identical.\n");
                    result.exit_code = 0;
                }
                Err(stop) => {
                    if let Some(line) = stop.stdout {
                        out.push_str(&line);
                        out.push('\n');
                    }
                    result.stderr.extend(stop.stderr);
                    result.exit_code = stop.exit_code;
                }
            }
        }
    }
    // qemu_progress_end.
    if p.progress {
        out.push('\n');
    }
    result.stdout = out.split_terminator('\n').map(String::from).collect();
    result
}

fn warnings(side: &Side) -> Vec<String> {
    side.chain
        .iter()
        .flat_map(|l| l.image.warnings().iter().map(|w| warning(w)))
        .collect()
}

/// A driver's warning as qemu prints it: `qemu-img: ` and a newline,
/// except the qcow2 leak hint that follows a warning without either.
fn warning(w: &str) -> String {
    if w.starts_with("Some clusters may be leaked") {
        w.into()
    } else {
        format!("qemu-img: {w}\n")
    }
}

fn walk<'a>(
    files: &mut dyn Files,
    a: &mut Side<'a>,
    b: &mut Side<'a>,
    strict: bool,
    progress: &mut Progress,
    out: &mut String,
) -> core::result::Result<(), Stop> {
    let total = a.size.min(b.size);
    let base = a.size.max(b.size);
    progress.print(out, 0.0);
    if strict && a.size != b.size {
        return Err(Stop::differ("Strict mode: Image size mismatch!".into()));
    }
    let mut buf1 = vec![0u8; IO_BUF_SIZE.min(base) as usize];
    let mut buf2 = vec![0u8; IO_BUF_SIZE.min(total) as usize];
    let mut offset = 0u64;
    while offset < total {
        let s1 = status(files, a, offset)?;
        let s2 = status(files, b, offset)?;
        let mut chunk = s1.entry.length.min(s2.entry.length);
        if strict && s1.word != s2.word {
            return Err(Stop::differ(format!(
                "Strict mode: Offset {offset} block status mismatch!"
            )));
        }
        if s1.entry.zero && s2.entry.zero {
            // Nothing to read.
        } else if s1.allocated == s2.allocated {
            if s1.allocated {
                chunk = chunk.min(IO_BUF_SIZE);
                let n = chunk as usize;
                read(files, a, &s1, offset, &mut buf1[..n])?;
                read(files, b, &s2, offset, &mut buf2[..n])?;
                let (differ, same) = compare_buffers(&buf1[..n], &buf2[..n]);
                if differ || same != n {
                    let at = offset + if differ { 0 } else { same as u64 };
                    return Err(Stop::differ(format!("Content mismatch at offset {at}!")));
                }
            }
        } else {
            chunk = chunk.min(IO_BUF_SIZE);
            let (side, st) = if s1.allocated {
                (&mut *a, &s1)
            } else {
                (&mut *b, &s2)
            };
            check_empty(files, side, st, offset, &mut buf1[..chunk as usize])?;
        }
        offset += chunk;
        progress.step(out, chunk, base);
    }
    if a.size != b.size {
        out.push_str("Warning: Image size mismatch!\n");
        let over = if a.size > b.size { a } else { b };
        while offset < base {
            let st = status(files, over, offset)?;
            let mut chunk = st.entry.length;
            if st.allocated && !st.entry.zero {
                chunk = chunk.min(IO_BUF_SIZE);
                check_empty(files, over, &st, offset, &mut buf1[..chunk as usize])?;
            }
            offset += chunk;
            progress.step(out, chunk, base);
        }
    }
    Ok(())
}

fn status(
    files: &mut dyn Files,
    side: &mut Side,
    offset: u64,
) -> core::result::Result<Status, Stop> {
    let st = side.status(files, offset).map_err(|e| {
        let line = format!("Sector allocation test failed for {}", side.name);
        Stop::error(e, line, 3)
    })?;
    if st.entry.length == 0 || st.entry.start != offset {
        return Err(Stop::error(
            ImageError::operation("block status returned an empty run"),
            format!("Sector allocation test failed for {}", side.name),
            3,
        ));
    }
    Ok(st)
}

fn read(
    files: &mut dyn Files,
    side: &mut Side,
    st: &Status,
    offset: u64,
    buf: &mut [u8],
) -> core::result::Result<(), Stop> {
    // Drivers' read errors are the strerror text of qemu's errno.
    side.read(files, st, buf).map_err(|e| {
        let line = format!(
            "Error while reading offset {offset} of {}: {}",
            side.name, e.message
        );
        Stop::error(e, line, 4)
    })
}

/// qemu's `check_empty_sectors`: the run must read as zeros.
fn check_empty(
    files: &mut dyn Files,
    side: &mut Side,
    st: &Status,
    offset: u64,
    buf: &mut [u8],
) -> core::result::Result<(), Stop> {
    read(files, side, st, offset, buf)?;
    match find_nonzero(buf) {
        Some(i) => Err(Stop::differ(format!(
            "Content mismatch at offset {}!",
            offset + i as u64
        ))),
        None => Ok(()),
    }
}

/// qemu's `compare_buffers` with sector granularity: whether the first
/// sector differs, and how many bytes (whole sectors, or all) share that
/// answer. Only the first differing sector matters to img_compare.
fn compare_buffers(a: &[u8], b: &[u8]) -> (bool, usize) {
    match first_difference(a, b) {
        None => (false, a.len()),
        Some(i) if i < SECTOR => (true, 0),
        Some(i) => (false, i / SECTOR * SECTOR),
    }
}

/// qemu's `find_nonzero`: the start of the first sector holding a
/// non-zero byte.
fn find_nonzero(buf: &[u8]) -> Option<usize> {
    first_nonzero(buf).map(|i| i / SECTOR * SECTOR)
}

// Four words a step: the guest has no SIMD, and the builtin memcmp
// compares bytes.
fn word(x: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(x[i..i + 8].try_into().unwrap_or([0; 8]))
}

/// Index of the first byte where `a` and `b` (equally long) differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut at = 0;
    for (x, y) in a.chunks_exact(32).zip(b.chunks_exact(32)) {
        let d = (word(x, 0) ^ word(y, 0))
            | (word(x, 8) ^ word(y, 8))
            | (word(x, 16) ^ word(y, 16))
            | (word(x, 24) ^ word(y, 24));
        if d != 0 {
            break;
        }
        at += 32;
    }
    (at..n).find(|&i| a[i] != b[i])
}

/// Index of the first non-zero byte.
fn first_nonzero(a: &[u8]) -> Option<usize> {
    let mut at = 0;
    for x in a.chunks_exact(32) {
        if word(x, 0) | word(x, 8) | word(x, 16) | word(x, 24) != 0 {
            break;
        }
        at += 32;
    }
    (at..a.len()).find(|&i| a[i] != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use instar_formats::MemFiles;

    fn params(strict: bool) -> CompareParams<'static> {
        CompareParams {
            format_a: Some("raw"),
            format_b: Some("raw"),
            filename_a: "a.raw",
            filename_b: "b.raw",
            strict,
            progress: false,
            max_chain_depth: 15,
        }
    }

    fn run(a: Vec<u8>, b: Vec<u8>, strict: bool) -> CompareResult {
        let mut f = MemFiles::new(a);
        f.files.push(b);
        compare(&mut f, &params(strict))
    }

    #[test]
    fn identical_and_sector_of_first_difference() {
        let a = vec![7u8; 8192];
        let r = run(a.clone(), a.clone(), false);
        assert_eq!(r.stdout, vec![String::from("Images are identical.")]);
        assert_eq!(r.exit_code, 0);
        let mut b = a.clone();
        b[5000] = 0;
        let r = run(a.clone(), b, false);
        // The sector holding byte 5000 starts at 4608.
        assert_eq!(
            r.stdout,
            vec![String::from("Content mismatch at offset 4608!")]
        );
        assert_eq!(r.exit_code, 1);
        let mut b = a.clone();
        b[3] = 0;
        assert_eq!(
            run(a, b, false).stdout,
            vec![String::from("Content mismatch at offset 0!")]
        );
    }

    #[test]
    fn sizes() {
        let mut a = vec![7u8; 4096];
        a.extend(vec![0u8; 4096]);
        let b = vec![7u8; 4096];
        let r = run(a.clone(), b.clone(), false);
        assert_eq!(
            r.stdout,
            vec![
                String::from("Warning: Image size mismatch!"),
                String::from("Images are identical.")
            ]
        );
        let r = run(a.clone(), b.clone(), true);
        assert_eq!(
            r.stdout,
            vec![String::from("Strict mode: Image size mismatch!")]
        );
        assert_eq!(r.exit_code, 1);
        a[6000] = 1;
        let r = run(b, a, false);
        assert_eq!(
            r.stdout,
            vec![
                String::from("Warning: Image size mismatch!"),
                String::from("Content mismatch at offset 5632!")
            ]
        );
    }

    #[test]
    fn open_errors_name_the_image() {
        let mut f = MemFiles::new(vec![0u8; 512]);
        f.files.push(vec![0u8; 512]);
        let mut p = params(false);
        p.format_b = Some("bogus");
        let r = compare(&mut f, &p);
        assert_eq!(r.exit_code, 2);
        assert!(
            r.stderr[0].starts_with("qemu-img: Could not open 'b.raw': "),
            "{:?}",
            r.stderr
        );
    }

    // qemu-img 10.0.2 compare -p -f raw -F raw of two 4 MiB raw files
    // (equal, then the first cut to 3000000 bytes) printed these.
    #[test]
    fn progress_text() {
        let a: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        let mut p = params(false);
        p.progress = true;
        let mut f = MemFiles::new(a.clone());
        f.files.push(a.clone());
        let r = compare(&mut f, &p);
        assert_eq!(
            r.stdout.concat(),
            "    (0.00/100%)\r    (50.00/100%)\r    (100.00/100%)\rImages are identical."
        );
        assert_eq!(r.stdout.len(), 2);
        let mut f = MemFiles::new(a[..3_000_000].to_vec());
        f.files.push(a);
        let r = compare(&mut f, &p);
        assert_eq!(
            r.stdout,
            vec![
                String::from("    (0.00/100%)\r    (50.00/100%)\r    (71.53/100%)\rContent mismatch at offset 3000000!"),
                String::new()
            ]
        );
    }

    #[test]
    fn buffers() {
        let a = [0u8; 1500];
        let mut b = [0u8; 1500];
        assert_eq!(compare_buffers(&a, &b), (false, 1500));
        b[1400] = 1;
        assert_eq!(compare_buffers(&a, &b), (false, 1024));
        assert_eq!(find_nonzero(&b), Some(1024));
        assert_eq!(find_nonzero(&a), None);
    }
}
