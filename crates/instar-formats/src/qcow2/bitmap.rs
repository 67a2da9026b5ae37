//! Persistent dirty bitmaps: the bitmap directory and its entries' tables.

use super::extensions::BitmapsExt;
use super::header::Qcow2Header;
use crate::bytes::{be16, be32, be64, c_string, read_vec, Cursor};
use crate::limits::*;
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use instar_wire::{BitmapFlag, BitmapInfo, FileId, ImageError};

/// Fixed part of a directory entry.
pub const DIR_ENTRY_SIZE: usize = 24;
/// The bitmap is being modified (its data is not trustworthy).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// The bitmap tracks writes automatically.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags qemu does not know.
pub const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bits of a bitmap table entry that must be zero.
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Offset bits of a bitmap table entry.
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "All ones" flag of a table entry without data cluster.
pub const TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Bitmap table offset.
    pub table_offset: u64,
    /// Bitmap table entries.
    pub table_size: u32,
    /// Flags.
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
}

impl Bitmap {
    /// The QAPI view `info` prints.
    pub fn info(&self) -> BitmapInfo {
        let mut flags = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            flags.push(BitmapFlag::InUse);
        }
        if self.flags & FLAG_AUTO != 0 {
            flags.push(BitmapFlag::Auto);
        }
        BitmapInfo {
            name: self.name.clone(),
            granularity: 1u64 << self.granularity_bits,
            flags,
        }
    }
}

/// Load the directory with qemu's checks (`bitmap_list_load`).
pub fn read_directory(
    files: &mut dyn Files,
    file: FileId,
    h: &Qcow2Header,
    ext: &BitmapsExt,
) -> Result<Vec<Bitmap>> {
    if ext.directory_size == 0 {
        return Err(ImageError::open("Requested bitmap directory size is zero"));
    }
    if ext.directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
        return Err(ImageError::open(
            "Requested bitmap directory size is too big",
        ));
    }
    // The directory can be 64 MiB; walk it through a window instead of
    // holding it.
    let size = ext.directory_size;
    let base = ext.directory_offset;
    let mut cur = Cursor::new(files, file);
    let broken = || ImageError::open("Broken bitmap directory");
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    let mut count: u32 = 0;
    while pos < size {
        if pos + DIR_ENTRY_SIZE as u64 > size {
            return Err(broken());
        }
        count += 1;
        if count > ext.nb_bitmaps {
            return Err(ImageError::open(
                "More bitmaps found than specified in header extension",
            ));
        }
        let mut e = [0u8; DIR_ENTRY_SIZE];
        // The directory offset is only checked for alignment: add with care.
        let at = base.checked_add(pos).ok_or_else(broken)?;
        cur.read(at, &mut e)?;
        let table_offset = be64(&e, 0);
        let table_size = be32(&e, 8);
        let flags = be32(&e, 12);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = be16(&e, 18);
        let extra = be32(&e, 20);
        let entry_len =
            (DIR_ENTRY_SIZE as u64 + extra as u64 + name_size as u64).next_multiple_of(8);
        // qemu sizes the entry as a C int (calc_dir_entry_size), so a huge
        // extra_data_size wraps and passes this bounds check; the extra-data
        // refusal below then reports it (corpus image bm-extra-size-huge).
        let qemu_len = entry_len as u32 as i32;
        if qemu_len >= 0 && pos + qemu_len as u64 > size {
            return Err(broken());
        }
        if extra != 0 {
            return Err(ImageError::open("Bitmap extra data is not supported"));
        }
        let name_bytes = cur.read_vec(
            at + DIR_ENTRY_SIZE as u64,
            name_size as u64,
            u16::MAX as u64,
            "bitmap name",
        )?;
        let phys = table_size as u64 * h.cluster_size();
        let bad = table_size == 0
            || table_offset == 0
            || !table_offset.is_multiple_of(h.cluster_size())
            || table_size > QCOW2_MAX_BITMAP_TABLE_ENTRIES
            || !(QCOW2_MIN_BITMAP_GRANULARITY_BITS..=QCOW2_MAX_BITMAP_GRANULARITY_BITS)
                .contains(&granularity_bits)
            || flags & RESERVED_FLAGS != 0
            || name_size > QCOW2_MAX_BITMAP_NAME
            || kind != TYPE_DIRTY_TRACKING
            || phys > QCOW2_MAX_BITMAP_PHYS_SIZE;
        if bad {
            // qemu prints the name with "%.*s", stopping at a NUL.
            return Err(ImageError::open(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                c_string(&name_bytes)
            )));
        }
        out.push(Bitmap {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name: c_string(&name_bytes),
        });
        pos += entry_len;
    }
    if count != ext.nb_bitmaps {
        return Err(ImageError::open(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// What qemu does with each bitmap at open (`qcow2_load_dirty_bitmaps`
/// with a read-only image): reject duplicate names, and for bitmaps not in
/// use check every table entry and that the table fits the image size.
/// Tables are streamed in chunks, never held whole.
pub fn check_loadable(
    files: &mut dyn Files,
    file: FileId,
    h: &Qcow2Header,
    bitmaps: &[Bitmap],
) -> Result<()> {
    let cluster = h.cluster_size();
    for (i, bm) in bitmaps.iter().enumerate() {
        if bitmaps[..i].iter().any(|b| b.name == bm.name) {
            if bm.flags & FLAG_IN_USE != 0 {
                continue;
            }
            return Err(ImageError::open(format!(
                "Bitmap already exists: {}",
                bm.name
            )));
        }
        if bm.flags & FLAG_IN_USE != 0 {
            continue;
        }
        let mut remaining = bm.table_size as u64 * 8;
        let mut off = bm.table_offset;
        while remaining > 0 {
            let n = remaining.min(TABLE_CHUNK as u64);
            let chunk = read_vec(files, file, off, n, TABLE_CHUNK as u64, "bitmap table")?;
            for e in chunk.chunks_exact(8) {
                let entry = be64(e, 0);
                let offset = entry & TABLE_ENTRY_OFFSET_MASK;
                let bad = entry & TABLE_ENTRY_RESERVED_MASK != 0
                    || (offset != 0
                        && (entry & TABLE_ENTRY_FLAG_ALL_ONES != 0
                            || !offset.is_multiple_of(cluster)));
                if bad {
                    return Err(ImageError::open(format!(
                        "Could not read bitmap_table table from image for bitmap '{}': Invalid argument",
                        bm.name
                    )));
                }
            }
            off += n;
            remaining -= n;
        }
        // The serialized bitmap is whole 64-bit words of one bit per
        // granule of the virtual disk.
        let size = h.virtual_size();
        let bytes = if size == 0 {
            0
        } else {
            (((size - 1) >> (bm.granularity_bits as u32 + 6)) + 1) * 8
        };
        let clusters = bytes.div_ceil(cluster);
        if clusters != bm.table_size as u64 {
            return Err(ImageError::open(format!(
                "Could not read bitmap '{}' from image: Invalid argument",
                bm.name
            )));
        }
    }
    Ok(())
}
