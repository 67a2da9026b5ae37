//! The only way format code reaches bytes.

use crate::Result;
use alloc::string::String;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};

/// The files of one call: the image ([`instar_wire::ROOT_FILE`]) and any
/// file the image names that the host agreed to open.
pub trait Files {
    /// Length of `file` in bytes.
    fn len(&mut self, file: FileId) -> Result<u64>;
    /// Fill `buf` from `file` at `offset`. Bytes past the end of the file
    /// read as zeros, as with qemu's file driver.
    fn read_at(&mut self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Open `path`, a name stored in `relative_to`, read-only. The host
    /// resolves it as qemu does and checks its allowlist; the error is ready
    /// to return. Gives the new file's id.
    fn open(&mut self, relative_to: FileId, path: &str) -> Result<FileId>;
    /// Open `path` as stored, relative to the current directory (qemu's
    /// qcow2 data files). This default treats it like [`Files::open`] of a
    /// name in the image's own directory.
    fn open_as_given(&mut self, path: &str) -> Result<FileId> {
        self.open(instar_wire::ROOT_FILE, path)
    }
    /// Is `offset` of `file` in data or in a hole, and how many bytes on
    /// the answer stays the same (`u64::MAX`: to the end and beyond), as
    /// the host's SEEK_DATA/SEEK_HOLE see it. Past the end is a hole. A
    /// source that knows no holes (this default) has data up to its end.
    fn data_at(&mut self, file: FileId, offset: u64) -> Result<(bool, u64)> {
        self.data_at_default(file, offset)
    }
    /// Bytes `file` occupies on disk (st_blocks * 512); a source without
    /// that notion (this default) occupies its length.
    fn allocated(&mut self, file: FileId) -> Result<u64> {
        self.len(file)
    }
    /// [`Files::data_at`] for a source without holes.
    #[doc(hidden)]
    fn data_at_default(&mut self, file: FileId, offset: u64) -> Result<(bool, u64)> {
        let len = self.len(file)?;
        Ok(if offset < len {
            (true, len - offset)
        } else {
            (false, u64::MAX)
        })
    }
}

/// In-memory [`Files`] for tests: file 0 is the image, `open` looks names up.
#[derive(Default)]
pub struct MemFiles {
    /// Open files by id.
    pub files: Vec<Vec<u8>>,
    /// Files that `open` can find, by the name as stored.
    pub named: Vec<(String, Vec<u8>)>,
}

impl MemFiles {
    /// One image, nothing else openable.
    pub fn new(image: Vec<u8>) -> Self {
        Self {
            files: alloc::vec![image],
            named: Vec::new(),
        }
    }
    fn get(&self, file: FileId) -> Result<&Vec<u8>> {
        self.files
            .get(file as usize)
            .ok_or_else(|| ImageError::operation("no such file id"))
    }
}

impl Files for MemFiles {
    fn len(&mut self, file: FileId) -> Result<u64> {
        Ok(self.get(file)?.len() as u64)
    }
    fn read_at(&mut self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.get(file)?;
        buf.fill(0);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = (data.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(())
    }
    fn open(&mut self, _relative_to: FileId, path: &str) -> Result<FileId> {
        let data = self
            .named
            .iter()
            .find(|(name, _)| name == path)
            .map(|(_, data)| data.clone())
            .ok_or_else(|| {
                ImageError::open(alloc::format!(
                    "Could not open '{path}': No such file or directory"
                ))
            })?;
        self.files.push(data);
        Ok((self.files.len() - 1) as FileId)
    }
}
