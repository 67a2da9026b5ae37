//! Fixed-width field access for on-disk structures, C strings, and bounded
//! or windowed reads: the one way every format reads an integer out of a
//! buffer.
//!
//! Callers index with offsets they derived from a struct layout, so the
//! slices are always long enough; the getters still never panic (a short
//! slice reads as zeros) so that a layout mistake cannot become a crash on
//! hostile input.

use crate::{Files, Result};
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};

fn take<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = off.checked_add(N).and_then(|end| buf.get(off..end)) {
        out.copy_from_slice(src);
    }
    out
}

/// Big-endian u16 at `off`.
pub fn be16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(take(buf, off))
}
/// Big-endian u32 at `off`.
pub fn be32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(take(buf, off))
}
/// Big-endian u64 at `off`.
pub fn be64(buf: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(take(buf, off))
}
/// Little-endian u16 at `off`.
pub fn le16(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(take(buf, off))
}
/// Little-endian u32 at `off`.
pub fn le32(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(take(buf, off))
}
/// Little-endian u64 at `off`.
pub fn le64(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(take(buf, off))
}

/// Read `len` bytes at `offset`, refusing lengths above `limit` (a named
/// const from [`crate::limits`]) before allocating anything.
pub fn read_vec(
    files: &mut dyn Files,
    file: FileId,
    offset: u64,
    len: u64,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>> {
    if len > limit {
        return Err(ImageError::limit(alloc::format!(
            "{what}: {len} bytes exceeds instar's limit of {limit} bytes"
        )));
    }
    // `len <= limit`, and every limit fits in memory on the targets we build.
    let n = usize::try_from(len).map_err(|_| ImageError::limit("size does not fit in memory"))?;
    let mut buf = alloc::vec![0u8; n];
    files.read_at(file, offset, &mut buf)?;
    Ok(buf)
}

/// The qcow/qcow2 backing file name: `len` bytes at `offset` (refused
/// above [`crate::limits::MAX_BACKING_NAME`]) read as a C string. qemu
/// treats an empty name as no backing file.
pub fn read_backing_name(
    files: &mut dyn Files,
    file: FileId,
    offset: u64,
    len: u64,
) -> Result<Option<alloc::string::String>> {
    let limit = crate::limits::MAX_BACKING_NAME;
    let name = read_vec(files, file, offset, len, limit, "backing file name")?;
    Ok(Some(c_string(&name)).filter(|n| !n.is_empty()))
}

/// The bytes before the first NUL (all of `bytes` without one): what C
/// code sees of a NUL-terminated buffer.
pub fn until_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// The bytes up to the first NUL, as qemu's C strings see them; invalid
/// UTF-8 becomes U+FFFD (the same replacement qemu's JSON output makes).
pub fn c_string(bytes: &[u8]) -> alloc::string::String {
    alloc::string::String::from_utf8_lossy(until_nul(bytes)).into_owned()
}

/// First position of `needle` (not empty) in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A read-ahead window of [`crate::limits::READ_CHUNK`] bytes over one
/// file, for walks that make many small reads but cannot lend the file to a
/// [`Cursor`] (they read other things between).
#[derive(Default)]
pub struct Window {
    bytes: Vec<u8>,
    start: u64,
}

impl Window {
    /// An empty window: the first read fills it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fill `out` from `offset` of `file` (zeros past EOF, as the file
    /// layer reads), through the window when `out` fits in one.
    pub fn read(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let chunk = crate::limits::READ_CHUNK;
        if out.len() > chunk {
            return files.read_at(file, offset, out);
        }
        let end = offset.checked_add(out.len() as u64);
        let covered =
            offset >= self.start && end.is_some_and(|e| e <= self.start + self.bytes.len() as u64);
        if !covered {
            self.bytes.resize(chunk, 0);
            files.read_at(file, offset, &mut self.bytes)?;
            self.start = offset;
        }
        // `offset >= start` and the range lies in the window, so this
        // difference is below `chunk`.
        let at = (offset - self.start) as usize;
        out.copy_from_slice(&self.bytes[at..at + out.len()]);
        Ok(())
    }
}

/// Sequential small reads served from one [`Window`], so walking a table
/// of many small records costs one host read per
/// [`crate::limits::READ_CHUNK`] instead of one per field.
pub struct Cursor<'a> {
    files: &'a mut dyn Files,
    file: FileId,
    window: Window,
}

impl<'a> Cursor<'a> {
    /// A cursor over `file` with an empty window.
    pub fn new(files: &'a mut dyn Files, file: FileId) -> Self {
        Self {
            files,
            file,
            window: Window::new(),
        }
    }

    /// Fill `out` from `offset` (zeros past EOF, as the file layer reads).
    pub fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.window.read(self.files, self.file, offset, out)
    }

    /// Read `len` bytes (at most `limit`) into a new vector.
    pub fn read_vec(&mut self, offset: u64, len: u64, limit: u64, what: &str) -> Result<Vec<u8>> {
        if len > limit {
            return Err(ImageError::limit(alloc::format!(
                "{what}: {len} bytes exceeds instar's limit of {limit} bytes"
            )));
        }
        let n =
            usize::try_from(len).map_err(|_| ImageError::limit("size does not fit in memory"))?;
        let mut buf = alloc::vec![0u8; n];
        self.read(offset, &mut buf)?;
        Ok(buf)
    }
}
