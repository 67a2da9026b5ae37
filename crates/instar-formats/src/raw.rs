//! raw format: the image is the disk. qemu's raw driver probes with the
//! lowest score (1) so that every other format wins, and reports the file's
//! length rounded up to whole 512-byte sectors (the file node counts
//! sectors, so a 1023999-byte file is a 1024000-byte disk).

use crate::block::{open_errno, single_child, EFBIG, SECTOR};
use crate::{Files, Result};
use instar_wire::{FileId, ImageInfo};

/// Probe score: raw accepts anything, at the lowest priority.
pub fn probe(_buf: &[u8], _filename: &str) -> u32 {
    1
}

/// Describe a raw image.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    let len = files.len(file)?;
    // The file node counts whole sectors; a length within 511 bytes of
    // u64::MAX is not a real file, but must not wrap.
    let virtual_size = len
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(|| open_errno(filename, EFBIG))?;
    Ok(ImageInfo {
        // qemu's driver answers bdrv_get_info, so dirty-flag is present.
        dirty_flag: Some(false),
        format: "raw".into(),
        virtual_size,
        children: single_child(file),
        ..ImageInfo::default()
    })
}

/// A raw image opened for block status: every byte is the file's own, so
/// the file's holes are the image's zeros (qemu's raw driver hands block
/// status to the file driver).
pub struct RawMap {
    file: FileId,
    size: u64,
}

impl RawMap {
    /// Open `file` as raw.
    pub fn open(files: &mut dyn Files, file: FileId) -> Result<Self> {
        let len = files.len(file)?;
        let size = len
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| crate::block::open_errno("", EFBIG))?;
        Ok(Self { file, size })
    }
}

impl crate::map::MapImage for RawMap {
    fn format(&self) -> &'static str {
        "raw"
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_status(
        &mut self,
        files: &mut dyn Files,
        offset: u64,
        len: u64,
    ) -> Result<crate::map::Extent> {
        use crate::map::{file_status, Extent, HostRef, Mapping};
        let (data, length) = file_status(files, self.file, offset, len)?;
        let at = HostRef {
            file: self.file,
            offset,
        };
        Ok(Extent::new(
            length,
            if data {
                Mapping::Data { at }
            } else {
                Mapping::Zero { at: Some(at) }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use alloc::vec;

    fn info_of(data: alloc::vec::Vec<u8>) -> Result<ImageInfo> {
        let mut f = MemFiles::new(data);
        info(&mut f, 0, "x")
    }

    #[test]
    fn probe_is_lowest() {
        assert_eq!(probe(&[], "x"), 1);
        assert_eq!(probe(&[0u8; 2048], "a.dmg"), 1);
    }

    #[test]
    fn sizes_round_up_to_sectors() {
        // qemu-img info: 1023999-byte file -> 1024000, 512 -> 512, 0 -> 0.
        assert_eq!(info_of(vec![0; 1023999]).unwrap().virtual_size, 1024000);
        assert_eq!(info_of(vec![0; 512]).unwrap().virtual_size, 512);
        assert_eq!(info_of(vec![]).unwrap().virtual_size, 0);
        // afl5.img, 1028 bytes, with -f raw: 1536.
        assert_eq!(info_of(vec![1; 1028]).unwrap().virtual_size, 1536);
    }

    #[test]
    fn fields() {
        let i = info_of(vec![0; 512]).unwrap();
        assert_eq!(i.format, "raw");
        assert_eq!(i.cluster_size, None);
        assert!(i.dirty_flag == Some(false) && !i.encrypted);
        assert_eq!(i.children, single_child(0));
    }

    #[test]
    fn hostile_sweeps() {
        // raw has no header: every length is a disk, down to nothing.
        assert_eq!(crate::hostile::truncations(info, &[7u8; 1500], "x", 600), 0);
    }
}
