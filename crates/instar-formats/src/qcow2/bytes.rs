//! Fixed-width field access for on-disk structures, and bounded reads.
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

/// The bytes up to the first NUL, as qemu's C strings see them; invalid
/// UTF-8 becomes U+FFFD (the same replacement qemu's JSON output makes).
pub fn c_string(bytes: &[u8]) -> alloc::string::String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    alloc::string::String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Sequential small reads served from one window, so walking a table of
/// many small records costs one host read per [`crate::limits::READ_CHUNK`]
/// instead of one per field.
pub struct Cursor<'a> {
    files: &'a mut dyn Files,
    file: FileId,
    window: Vec<u8>,
    start: u64,
}

impl<'a> Cursor<'a> {
    /// A cursor over `file` with an empty window.
    pub fn new(files: &'a mut dyn Files, file: FileId) -> Self {
        Self {
            files,
            file,
            window: Vec::new(),
            start: 0,
        }
    }

    /// Fill `out` from `offset` (zeros past EOF, as the file layer reads).
    pub fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        let chunk = crate::limits::READ_CHUNK;
        if out.len() > chunk {
            return self.files.read_at(self.file, offset, out);
        }
        let end = offset.checked_add(out.len() as u64);
        let covered =
            offset >= self.start && end.is_some_and(|e| e <= self.start + self.window.len() as u64);
        if !covered {
            self.window.resize(chunk, 0);
            self.files.read_at(self.file, offset, &mut self.window)?;
            self.start = offset;
        }
        // `offset >= start` and the range lies in the window, so this
        // difference is below `chunk`.
        let at = (offset - self.start) as usize;
        out.copy_from_slice(&self.window[at..at + out.len()]);
        Ok(())
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
