//! VHDX block status and reads.
//!
//! qemu's vhdx driver has no block-status callback, so the block layer
//! calls the whole disk data without a host offset (BDRV_BLOCK_DATA):
//! `qemu-img map` prints one data run, and human output fails as for
//! compressed clusters. Reads follow `vhdx_co_readv`: the BAT entry of
//! each payload block (sector-bitmap entries interleaved every
//! `chunk_ratio` blocks) says fully present (read from the file), not
//! present, undefined, zero or unmapped (zeros); a partially present
//! block (differencing images, which qemu refuses to open anyway) or an
//! unknown state is an I/O error.

use super::{Layout, BAT_FILE_OFF_MASK, BAT_STATE_MASK, PAYLOAD_BLOCK_FULLY_PRESENT};
use crate::bytes::Window;
use crate::map::{Extent, MapImage, Mapping};
use crate::{Files, Result};
use instar_wire::{FileId, ImageError};

const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
const PAYLOAD_BLOCK_ZERO: u64 = 2;
const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
const PAYLOAD_BLOCK_UNMAPPED_V095: u64 = 5;

/// A VHDX image opened for block status.
pub struct VhdxMap {
    file: FileId,
    size: u64,
    layout: Layout,
    window: Window,
}

impl VhdxMap {
    /// Open as qemu does (the checks of `info`).
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let (info, layout) = super::parse(files, file, filename)?;
        Ok(Self {
            file,
            size: info.virtual_size,
            layout,
            window: Window::new(),
        })
    }
}

impl MapImage for VhdxMap {
    fn format(&self) -> &'static str {
        "vhdx"
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_status(&mut self, _files: &mut dyn Files, _offset: u64, len: u64) -> Result<Extent> {
        Ok(Extent::new(len, Mapping::Opaque))
    }
    fn read(&mut self, files: &mut dyn Files, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.layout.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = at / bs;
            let in_block = at % bs;
            let n = usize::try_from(bs - in_block)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let index = block + (block >> self.layout.chunk_ratio_bits);
            let mut e = [0u8; 8];
            // info checked that the BAT's entries lie within qemu's
            // request bounds; past the end of the file they read as 0.
            self.window.read(
                files,
                self.file,
                self.layout.bat_offset.wrapping_add(index * 8),
                &mut e,
            )?;
            let entry = u64::from_le_bytes(e);
            let out = &mut buf[done..done + n];
            match entry & BAT_STATE_MASK {
                PAYLOAD_BLOCK_NOT_PRESENT
                | PAYLOAD_BLOCK_UNDEFINED
                | PAYLOAD_BLOCK_UNMAPPED
                | PAYLOAD_BLOCK_UNMAPPED_V095
                | PAYLOAD_BLOCK_ZERO => out.fill(0),
                PAYLOAD_BLOCK_FULLY_PRESENT => {
                    let base = entry & BAT_FILE_OFF_MASK;
                    // qemu adds the offset in the block only to a
                    // nonzero block offset.
                    let host = if base == 0 {
                        0
                    } else {
                        base.wrapping_add(in_block)
                    };
                    files.read_at(self.file, host, out)?;
                }
                _ => return Err(ImageError::operation("Input/output error")),
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use alloc::vec;

    fn map_over(bat: &[u64], data: &[(u64, u8)]) -> (VhdxMap, MemFiles) {
        let mut img = vec![0u8; 8 << 20];
        for (i, e) in bat.iter().enumerate() {
            img[4096 + i * 8..4096 + i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        for &(at, v) in data {
            img[at as usize..at as usize + (1 << 20)].fill(v);
        }
        let m = VhdxMap {
            file: 0,
            size: 4 << 20,
            layout: Layout {
                bat_offset: 4096,
                block_size: 1 << 20,
                chunk_ratio_bits: 11,
            },
            window: Window::new(),
        };
        (m, MemFiles::new(img))
    }

    #[test]
    fn block_states() {
        let present = |mb: u64| (mb << 20) | PAYLOAD_BLOCK_FULLY_PRESENT;
        let (mut m, mut f) = map_over(
            &[
                present(2),
                PAYLOAD_BLOCK_ZERO,
                PAYLOAD_BLOCK_UNMAPPED,
                present(4),
            ],
            &[(2 << 20, 0xaa), (4 << 20, 0xbb)],
        );
        let e = m.block_status(&mut f, 0, 4 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (4 << 20, Mapping::Opaque));
        let mut buf = vec![1u8; 4 << 20];
        m.read(&mut f, 0, &mut buf).unwrap();
        assert!(buf[..1 << 20].iter().all(|&b| b == 0xaa));
        assert!(buf[1 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(buf[3 << 20..].iter().all(|&b| b == 0xbb));
        // A partially present block cannot be read.
        let (mut m, mut f) = map_over(&[7], &[]);
        assert!(m.read(&mut f, 0, &mut buf[..512]).is_err());
    }
}
