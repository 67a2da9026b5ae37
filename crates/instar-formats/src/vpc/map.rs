//! VPC block status: qemu's `vpc_co_block_status`.
//!
//! A fixed disk (footer type 2) hands the question to the file
//! (BDRV_BLOCK_RAW): data or holes at the same offset. A dynamic disk looks
//! up the BAT: an allocated block is data right after its sector bitmap (the
//! bitmap itself is not consulted, as in qemu), an unallocated one reads as
//! zeros (qemu answers BDRV_BLOCK_ZERO; it follows no parent). BAT entries
//! are read on demand through a [`Window`].

use super::{be32, be64, DYN_HEADER_SIZE, FOOTER_SIZE, VHD_FIXED};
use crate::bytes::Window;
use crate::map::{file_status, Extent, HostRef, MapImage, Mapping};
use crate::{Files, Result};
use instar_wire::FileId;

/// A VPC image opened for block status.
pub struct VpcMap {
    file: FileId,
    size: u64,
    /// `None` for a fixed disk.
    dynamic: Option<Dynamic>,
    window: Window,
}

struct Dynamic {
    block_size: u64,
    bitmap_size: u64,
    entries: u64,
    bat_offset: u64,
}

impl VpcMap {
    /// Open as qemu does (the checks of `info`).
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let info = super::info(files, file, filename)?;
        let mut footer = [0u8; FOOTER_SIZE as usize];
        files.read_at(file, 0, &mut footer)?;
        let at_start = &footer[..8] == b"conectix";
        if !at_start {
            // info found it at the end of the file.
            let len = files.len(file)?.div_ceil(512) * 512;
            files.read_at(file, len - FOOTER_SIZE, &mut footer)?;
        }
        let dynamic = if be32(&footer, 60) == VHD_FIXED {
            None
        } else {
            // info read and checked the dynamic header (a footer of another
            // type at the end of the file is refused).
            let mut h = [0u8; DYN_HEADER_SIZE];
            files.read_at(file, be64(&footer, 16), &mut h)?;
            let block_size = u64::from(be32(&h, 32));
            Some(Dynamic {
                block_size,
                bitmap_size: ((block_size / (8 * 512)) + 511) & !511,
                entries: u64::from(be32(&h, 28)),
                bat_offset: be64(&h, 16),
            })
        };
        Ok(Self {
            file,
            size: info.virtual_size,
            dynamic,
            window: Window::new(),
        })
    }

    /// qemu's `get_image_offset` for reads: where guest `offset` lives.
    fn image_offset(&mut self, files: &mut dyn Files, offset: u64) -> Result<Option<u64>> {
        let d = self.dynamic.as_ref().expect("dynamic disks only");
        let index = offset / d.block_size;
        if index >= d.entries {
            return Ok(None);
        }
        let (bat, bitmap, in_block) = (d.bat_offset, d.bitmap_size, offset % d.block_size);
        let mut e = [0u8; 4];
        // info checked that the BAT lies within qemu's request bounds.
        self.window
            .read(files, self.file, bat + index * 4, &mut e)?;
        let e = u32::from_be_bytes(e);
        if e == u32::MAX {
            return Ok(None);
        }
        Ok(Some(512 * u64::from(e) + bitmap + in_block))
    }
}

impl MapImage for VpcMap {
    fn format(&self) -> &'static str {
        "vpc"
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_status(&mut self, files: &mut dyn Files, offset: u64, len: u64) -> Result<Extent> {
        let Some(d) = &self.dynamic else {
            let (data, length) = file_status(files, self.file, offset, len)?;
            let at = HostRef {
                file: self.file,
                offset,
            };
            return Ok(Extent::new(
                length,
                if data {
                    Mapping::Data { at }
                } else {
                    Mapping::Zero { at: Some(at) }
                },
            ));
        };
        let block_size = d.block_size;
        // The first block decides; an allocated block ends the run at its
        // end (its neighbour's data lies past a bitmap), unallocated blocks
        // run on until an allocated one.
        let first = self.image_offset(files, offset)?;
        let mut done = 0u64;
        let mut at = offset;
        loop {
            let n = (at / block_size + 1) * block_size - at;
            let n = n.min(len - done);
            done += n;
            at += n;
            if let Some(host) = first {
                return Ok(Extent::new(
                    done,
                    Mapping::Data {
                        at: HostRef {
                            file: self.file,
                            offset: host,
                        },
                    },
                ));
            }
            if done == len || self.image_offset(files, at)?.is_some() {
                return Ok(Extent::new(done, Mapping::Zero { at: None }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A dynamic VHD of 4 blocks of 2 MiB: block 1 allocated, the rest not.
    fn dynamic() -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[16..24].copy_from_slice(&512u64.to_be_bytes());
        f[28..32].copy_from_slice(b"win ");
        f[48..56].copy_from_slice(&(8u64 << 20).to_be_bytes());
        f[60..64].copy_from_slice(&3u32.to_be_bytes());
        let sum = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
        let mut img = f.clone();
        let mut h = vec![0u8; 1024];
        h[..8].copy_from_slice(b"cxsparse");
        h[16..24].copy_from_slice(&1536u64.to_be_bytes());
        h[28..32].copy_from_slice(&4u32.to_be_bytes());
        h[32..36].copy_from_slice(&(2u32 << 20).to_be_bytes());
        img.extend_from_slice(&h);
        for e in [u32::MAX, 4, u32::MAX, u32::MAX] {
            img.extend_from_slice(&e.to_be_bytes());
        }
        img.resize(2048 + 512 + (2 << 20), 0);
        img.extend_from_slice(&f);
        img
    }

    #[test]
    fn bat_lookups() {
        let mut f = MemFiles::new(dynamic());
        let mut m = VpcMap::open(&mut f, 0, "p.vhd").unwrap();
        let e = m.block_status(&mut f, 0, 8 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (2 << 20, Mapping::Zero { at: None }));
        // Data follows the block's one-sector bitmap; the run ends with
        // the block.
        let e = m.block_status(&mut f, (2 << 20) + 512, 6 << 20).unwrap();
        let at = HostRef {
            file: 0,
            offset: 2048 + 512 + 512,
        };
        assert_eq!(
            (e.length, e.mapping),
            ((2 << 20) - 512, Mapping::Data { at })
        );
        // Unallocated blocks run on to the end.
        let e = m.block_status(&mut f, 4 << 20, 4 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (4 << 20, Mapping::Zero { at: None }));
    }
}
