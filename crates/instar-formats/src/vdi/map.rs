//! VDI block status: qemu's `vdi_co_block_status` over the block map.
//!
//! A block is data at `offset_data + entry * block_size` or, when its entry
//! is unallocated (0xffffffff) or discarded (0xfffffffe), zeros (qemu
//! answers BDRV_BLOCK_ZERO: VDI has no backing file). Static images ask
//! the file about holes (BDRV_BLOCK_RECURSE). Entries are read on demand
//! through a [`Window`], so the map (up to 2 GiB) is never held.

use super::{le32, HEADER_SIZE};
use crate::bytes::Window;
use crate::map::{Extent, HostRef, MapImage, Mapping};
use crate::{Files, Result};
use instar_wire::FileId;

/// Entries at or above this are not allocated (VDI_DISCARDED).
const VDI_DISCARDED: u32 = 0xffff_fffe;
/// `image_type` of a preallocated image.
const VDI_TYPE_STATIC: u32 = 2;

/// A VDI image opened for block status.
pub struct VdiMap {
    file: FileId,
    size: u64,
    block_size: u64,
    offset_bmap: u64,
    offset_data: u64,
    blocks: u64,
    static_image: bool,
    window: Window,
}

impl VdiMap {
    /// Open as qemu does (the header checks of `info`).
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let info = super::info(files, file, filename)?;
        let mut h = [0u8; HEADER_SIZE];
        files.read_at(file, 0, &mut h)?;
        Ok(Self {
            file,
            size: info.virtual_size,
            // info accepted only 1 MiB blocks.
            block_size: u64::from(le32(&h, 0x178)),
            offset_bmap: u64::from(le32(&h, 0x154)),
            offset_data: u64::from(le32(&h, 0x158)),
            blocks: u64::from(le32(&h, 0x180)),
            static_image: le32(&h, 0x4c) == VDI_TYPE_STATIC,
            window: Window::new(),
        })
    }

    fn entry(&mut self, files: &mut dyn Files, index: u64) -> Result<u32> {
        if index >= self.blocks {
            // The size check in open keeps queries inside the map.
            return Ok(u32::MAX);
        }
        let mut e = [0u8; 4];
        self.window
            .read(files, self.file, self.offset_bmap + index * 4, &mut e)?;
        Ok(u32::from_le_bytes(e))
    }
}

impl MapImage for VdiMap {
    fn format(&self) -> &'static str {
        "vdi"
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_status(&mut self, files: &mut dyn Files, offset: u64, len: u64) -> Result<Extent> {
        let bs = self.block_size;
        let first = self.entry(files, offset / bs)?;
        let in_block = offset % bs;
        let mut length = (bs - in_block).min(len);
        // Neighbouring blocks that answer the same (and, for data, continue
        // on the host) merge in qemu-img; answering them at once saves calls.
        let data = self.offset_data;
        let host = move |e: u32| data + u64::from(e) * bs;
        let mut index = offset / bs + 1;
        while length < len {
            let e = self.entry(files, index)?;
            let same = if first >= VDI_DISCARDED {
                e >= VDI_DISCARDED
            } else {
                e < VDI_DISCARDED && host(e) == host(first) + (index - offset / bs) * bs
            };
            if !same {
                break;
            }
            length = (length + bs).min(len);
            index += 1;
        }
        if first >= VDI_DISCARDED {
            return Ok(Extent::new(length, Mapping::Zero { at: None }));
        }
        Ok(Extent {
            length,
            mapping: Mapping::Data {
                at: HostRef {
                    file: self.file,
                    offset: host(first) + in_block,
                },
            },
            recurse: self.static_image,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use alloc::vec;

    /// A 4 MiB VDI: block 0 at data block 1, block 1 unallocated, block 2
    /// discarded, block 3 at data block 2 (so blocks 0 and 3 never merge).
    fn image(image_type: u32) -> Vec<u8> {
        let mut h = vec![0u8; 0x1200 + (3 << 20)];
        let put =
            |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut h, 0x40, 0xbeda_107f);
        put(&mut h, 0x44, 0x0001_0001);
        put(&mut h, 0x4c, image_type);
        put(&mut h, 0x154, 0x200);
        put(&mut h, 0x158, 0x1200);
        put(&mut h, 0x168, 512);
        h[0x170..0x178].copy_from_slice(&(4u64 << 20).to_le_bytes());
        put(&mut h, 0x178, 1 << 20);
        put(&mut h, 0x180, 4);
        for (i, e) in [1u32, u32::MAX, VDI_DISCARDED, 2].iter().enumerate() {
            put(&mut h, 0x200 + 4 * i, *e);
        }
        h
    }

    use alloc::vec::Vec;

    #[test]
    fn blocks() {
        let mut f = MemFiles::new(image(1));
        let mut m = VdiMap::open(&mut f, 0, "v.vdi").unwrap();
        let at = |offset| Mapping::Data {
            at: HostRef { file: 0, offset },
        };
        let e = m.block_status(&mut f, 512, 4 << 20).unwrap();
        assert_eq!(
            (e.length, e.mapping, e.recurse),
            ((1 << 20) - 512, at(0x1200 + (1 << 20) + 512), false)
        );
        // Unallocated and discarded blocks are zeros, answered together.
        let e = m.block_status(&mut f, 1 << 20, 3 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (2 << 20, Mapping::Zero { at: None }));
        let e = m.block_status(&mut f, 3 << 20, 1 << 20).unwrap();
        assert_eq!(e.mapping, at(0x1200 + (2 << 20)));
        // Static images ask the file about holes.
        let mut f = MemFiles::new(image(2));
        let mut m = VdiMap::open(&mut f, 0, "v.vdi").unwrap();
        assert!(m.block_status(&mut f, 0, 1 << 20).unwrap().recurse);
    }
}
