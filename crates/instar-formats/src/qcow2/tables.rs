//! L1/L2 and refcount table entries: the layout check/map/convert walk.
//! Only decoding lives here; the walks read through [`crate::Files`] in
//! bounded ranges.

use super::header::Qcow2Header;
use crate::bytes::be64;
use crate::{Files, Result};
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};

/// Offset bits of an L1 entry (an L2 table offset).
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a standard L2 entry (a data cluster offset).
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one (may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed cluster (never has COPIED).
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (v3 standard clusters).
pub const OFLAG_ZERO: u64 = 1;
/// Offset bits of a refcount table entry (a refcount block offset).
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here (falls through to the backing file).
    Unallocated,
    /// Reads as zeros; `preallocated` keeps a host cluster.
    Zero {
        /// Host cluster kept for the zero cluster, if any.
        preallocated: Option<u64>,
    },
    /// Data at `offset` in the image (or the data file).
    Normal {
        /// Host offset of the cluster.
        offset: u64,
        /// COPIED flag.
        copied: bool,
    },
    /// Compressed data starting at `offset`, spanning `sectors` 512-byte
    /// sectors (qemu's rounded-up count).
    Compressed {
        /// Host byte offset of the compressed stream.
        offset: u64,
        /// Number of 512-byte sectors the stream may touch.
        sectors: u64,
    },
}

impl Qcow2Header {
    /// Decode a (first word of an) L2 entry the way qemu does.
    pub fn decode_l2(&self, entry: u64) -> L2Entry {
        if entry & OFLAG_COMPRESSED != 0 {
            let csize_shift = 62 - (self.cluster_bits - 8);
            let csize_mask = (1u64 << (self.cluster_bits - 8)) - 1;
            let offset = entry & ((1u64 << csize_shift) - 1);
            let sectors = ((entry >> csize_shift) & csize_mask) + 1;
            return L2Entry::Compressed { offset, sectors };
        }
        let offset = entry & L2E_OFFSET_MASK;
        if entry & OFLAG_ZERO != 0 && self.version >= 3 && !self.has_subclusters() {
            return L2Entry::Zero {
                preallocated: (offset != 0).then_some(offset),
            };
        }
        if offset == 0 {
            return L2Entry::Unallocated;
        }
        L2Entry::Normal {
            offset,
            copied: entry & OFLAG_COPIED != 0,
        }
    }

    /// Bytes of one L2 entry (16 with extended L2: entry plus bitmap).
    pub fn l2_entry_size(&self) -> u64 {
        if self.has_subclusters() {
            16
        } else {
            8
        }
    }

    /// Guest bytes covered by one L1 entry.
    pub fn l1_entry_span(&self) -> u64 {
        1u64 << (self.cluster_bits + self.l2_bits())
    }
}

/// Read `count` big-endian u64 entries starting at entry `first` of the
/// table at `table_offset`. The caller bounds `count` (a chunk), so a
/// table as large as qemu allows never becomes one allocation.
pub fn read_entries(
    files: &mut dyn Files,
    file: FileId,
    table_offset: u64,
    first: u64,
    count: usize,
) -> Result<Vec<u64>> {
    let at = first
        .checked_mul(8)
        .and_then(|o| o.checked_add(table_offset))
        .ok_or_else(|| ImageError::operation("table offset overflow"))?;
    let mut buf = alloc::vec![0u8; count * 8];
    files.read_at(file, at, &mut buf)?;
    Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(cluster_bits: u32, version: u32) -> Qcow2Header {
        let mut b = [0u8; super::super::header::HEADER_SIZE];
        b[4..8].copy_from_slice(&version.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        Qcow2Header::decode(&b)
    }

    #[test]
    fn l2_entries() {
        let h3 = h(16, 3);
        assert_eq!(h3.decode_l2(0), L2Entry::Unallocated);
        assert_eq!(
            h3.decode_l2(OFLAG_COPIED | 0x50000),
            L2Entry::Normal {
                offset: 0x50000,
                copied: true
            }
        );
        assert_eq!(h3.decode_l2(1), L2Entry::Zero { preallocated: None });
        assert_eq!(
            h3.decode_l2(0x50001),
            L2Entry::Zero {
                preallocated: Some(0x50000)
            }
        );
        // v2 has no zero flag.
        assert_eq!(
            h(16, 2).decode_l2(0x50001),
            L2Entry::Normal {
                offset: 0x50000,
                copied: false
            }
        );
        // 64 KiB clusters: 54-bit offset, 8-bit sector count minus one.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            h3.decode_l2(e),
            L2Entry::Compressed {
                offset: 0x12345,
                sectors: 4
            }
        );
        assert_eq!(h3.l1_entry_span(), 1 << 29);
    }
}
