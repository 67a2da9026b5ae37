//! The internal snapshot table: variable-length entries, each 8-aligned.

use super::header::Qcow2Header;
use crate::bytes::{be16, be32, be64, c_string, Cursor};
use crate::limits::*;
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError, SnapshotInfo};

/// Fixed part of a snapshot table entry.
pub const HEADER_SIZE: usize = 40;
/// Extra data qemu knows: large VM state size, disk size, icount.
pub const KNOWN_EXTRA_SIZE: u32 = 24;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot's own L1 table.
    pub l1_table_offset: u64,
    /// Its L1 entry count.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present).
    pub vm_state_size: u64,
    /// Disk size at snapshot time (the image size when not recorded).
    pub disk_size: u64,
    /// Instruction count, when recorded (`u64::MAX` means none).
    pub icount: Option<u64>,
    /// Extra data length as stored.
    pub extra_data_size: u32,
}

impl Snapshot {
    /// The QAPI view `info` prints.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec as u64,
            date_nsec: self.date_nsec as u64,
            vm_clock_sec: self.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: self.vm_clock_nsec % 1_000_000_000,
            icount: self.icount,
        }
    }
}

/// Read the snapshot table as qemu does at open, with its checks. The
/// header's count and offset were validated by
/// [`Qcow2Header::check_tables`], so at most 65536 entries of at most
/// 40 + 1024 + 2 * 65535 bytes each are read, and qemu's 64 MiB total cap
/// stops a large table early.
pub fn read_table(files: &mut dyn Files, file: FileId, h: &Qcow2Header) -> Result<Vec<Snapshot>> {
    let n = h.nb_snapshots;
    let mut out = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    let mut cur = Cursor::new(files, file);
    let start = h.snapshots_offset;
    let mut offset = start;
    let mut table_length: u64 = 0;
    for i in 0..n {
        table_length = table_length.next_multiple_of(8);
        offset = offset.next_multiple_of(8);
        let mut b = [0u8; HEADER_SIZE];
        cur.read(offset, &mut b)?;
        offset += HEADER_SIZE as u64;
        let extra_data_size = be32(&b, 36);
        let id_size = be16(&b, 12) as u64;
        let name_size = be16(&b, 14) as u64;
        if extra_data_size > QCOW2_MAX_SNAPSHOT_EXTRA_DATA {
            return Err(ImageError::open(format!(
                "Too much extra metadata in snapshot table entry {i}\n\
                 You can force-remove this extra metadata with qemu-img check -r all"
            )));
        }
        let known = extra_data_size.min(KNOWN_EXTRA_SIZE);
        let mut extra = [0u8; KNOWN_EXTRA_SIZE as usize];
        cur.read(offset, &mut extra[..known as usize])?;
        // The unknown remainder is skipped, not kept.
        offset += extra_data_size as u64;
        let vm_state_size = if extra_data_size >= 8 {
            be64(&extra, 0)
        } else {
            be32(&b, 32) as u64
        };
        let disk_size = if extra_data_size >= 16 {
            be64(&extra, 8)
        } else {
            h.virtual_size()
        };
        let icount = if extra_data_size >= 24 {
            Some(be64(&extra, 16))
        } else {
            None
        };
        let id = cur.read_vec(offset, id_size, u16::MAX as u64, "snapshot id")?;
        offset += id_size;
        let name = cur.read_vec(offset, name_size, u16::MAX as u64, "snapshot name")?;
        offset += name_size;
        table_length += HEADER_SIZE as u64 + extra_data_size as u64 + id_size + name_size;
        if table_length > QCOW2_MAX_SNAPSHOTS_SIZE || offset - start > i32::MAX as u64 {
            return Err(ImageError::open(format!(
                "Snapshot table is too big\n\
                 You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                n - i
            )));
        }
        out.push(Snapshot {
            l1_table_offset: be64(&b, 0),
            l1_size: be32(&b, 8),
            id: c_string(&id),
            name: c_string(&name),
            date_sec: be32(&b, 16),
            date_nsec: be32(&b, 20),
            vm_clock_nsec: be64(&b, 24),
            vm_state_size,
            disk_size,
            // All-ones means "not recorded".
            icount: icount.filter(|&c| c != u64::MAX),
            extra_data_size,
        });
    }
    Ok(out)
}

/// Encode one entry (for tests and later writers): id, name, and 24 bytes
/// of known extra data.
pub fn encode_entry(s: &Snapshot) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_SIZE + 24 + s.id.len() + s.name.len() + 8);
    b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
    b.extend_from_slice(&s.l1_size.to_be_bytes());
    b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
    b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
    b.extend_from_slice(&s.date_sec.to_be_bytes());
    b.extend_from_slice(&s.date_nsec.to_be_bytes());
    b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
    b.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
    b.extend_from_slice(&KNOWN_EXTRA_SIZE.to_be_bytes());
    b.extend_from_slice(&s.vm_state_size.to_be_bytes());
    b.extend_from_slice(&s.disk_size.to_be_bytes());
    b.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
    b.extend_from_slice(s.id.as_bytes());
    b.extend_from_slice(s.name.as_bytes());
    while b.len() % 8 != 0 {
        b.push(0);
    }
    b
}
