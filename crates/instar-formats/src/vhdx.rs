//! VHDX: the two headers (CRC-32C, sequence numbers), the log (qemu refuses
//! a read-only open when it holds entries to replay), the region table,
//! the metadata table and the BAT bounds checks qemu runs on open.
//!
//! Differencing images (a parent locator) are refused, as qemu does.

use crate::block::single_child;
use crate::block::{open_errno, request_fails, EINVAL, EIO, ENOTSUP};
use crate::bytes::{le16, le32, le64};
use crate::limits::{TABLE_CHUNK, VHDX_LOG_SCAN_PASSES};
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError, ImageInfo};

pub mod map;

pub(crate) const HEADER1_OFFSET: u64 = 64 * 1024;
pub(crate) const HEADER2_OFFSET: u64 = 128 * 1024;
pub(crate) const HEADER_SIZE: usize = 4096;
pub(crate) const REGION_TABLE_OFFSET: u64 = 192 * 1024;
pub(crate) const REGION_TABLE_SIZE: usize = 64 * 1024;
const METADATA_TABLE_MAX_SIZE: usize = 64 * 1024;
pub(crate) const LOG_MIN_SIZE: u64 = 1024 * 1024;
const LOG_SECTOR_SIZE: u64 = 4096;
pub(crate) const BLOCK_SIZE_MIN: u32 = 1024 * 1024;
pub(crate) const BLOCK_SIZE_MAX: u32 = 256 * 1024 * 1024;
pub(crate) const MAX_SECTORS_PER_BLOCK: u64 = 1 << 23;
const BAT_STATE_MASK: u64 = 7;
const BAT_FILE_OFF_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;
pub(crate) const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
const REGION_ENTRY_REQUIRED: u32 = 1;
pub(crate) const META_FLAGS_IS_REQUIRED: u32 = 4;
const PARAMS_HAS_PARENT: u32 = 2;
/// Region table entries the spec allows (qemu enforces it too).
const REGION_ENTRIES_MAX: u32 = 2047;
pub(crate) const BAT_GUID: [u8; 16] = ms_guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub(crate) const METADATA_GUID: [u8; 16] = ms_guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub(crate) const FILE_PARAM_GUID: [u8; 16] = ms_guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub(crate) const VIRTUAL_SIZE_GUID: [u8; 16] = ms_guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub(crate) const PAGE83_GUID: [u8; 16] = ms_guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub(crate) const PHYS_SECTOR_GUID: [u8; 16] = ms_guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const PARENT_LOCATOR_GUID: [u8; 16] = ms_guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
pub(crate) const LOGICAL_SECTOR_GUID: [u8; 16] = ms_guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);

const META_FILE_PARAMETER: u32 = 0x01;
const META_VIRTUAL_DISK_SIZE: u32 = 0x02;
const META_PAGE_83: u32 = 0x04;
const META_LOGICAL_SECTOR_SIZE: u32 = 0x08;
const META_PHYS_SECTOR_SIZE: u32 = 0x10;
const META_PARENT_LOCATOR: u32 = 0x20;
const META_ALL: u32 = META_FILE_PARAMETER
    | META_VIRTUAL_DISK_SIZE
    | META_PAGE_83
    | META_LOGICAL_SECTOR_SIZE
    | META_PHYS_SECTOR_SIZE;

/// `vhdxfile` at offset 0.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= 8 && &buf[..8] == b"vhdxfile" {
        100
    } else {
        0
    }
}

/// Describe the VHDX image in `file`.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    parse(files, file, filename).map(|(info, _)| info)
}

/// Where the payload blocks are found, for reads.
pub(crate) struct Layout {
    pub(crate) bat_offset: u64,
    pub(crate) block_size: u64,
    pub(crate) chunk_ratio_bits: u32,
}

/// Open the image as qemu does: its description and its BAT's layout.
pub(crate) fn parse(
    files: &mut dyn Files,
    file: FileId,
    filename: &str,
) -> Result<(ImageInfo, Layout)> {
    let einval = || open_errno(filename, EINVAL);
    let eio = || open_errno(filename, EIO);

    let mut sig = [0u8; 8];
    files.read_at(file, 0, &mut sig)?;
    if &sig != b"vhdxfile" {
        return Err(einval());
    }

    let header = parse_header(files, file)?;
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let log_offset = le64(&header, 72);
    let log_length = le32(&header, 68);
    regions.push((log_offset, log_offset.wrapping_add(u64::from(log_length))));

    parse_log(files, file, &header, filename)?;

    // Region table.
    let mut rt = vec![0u8; REGION_TABLE_SIZE];
    files.read_at(file, REGION_TABLE_OFFSET, &mut rt)?;
    if !checksum_ok(&rt) || &rt[..4] != b"regi" {
        return Err(einval());
    }
    let entry_count = le32(&rt, 8);
    if entry_count > REGION_ENTRIES_MAX {
        return Err(einval());
    }
    let (mut bat_rt, mut meta_rt) = (None, None);
    for i in 0..entry_count as usize {
        let e = &rt[16 + i * 32..48 + i * 32];
        let guid: [u8; 16] = e[..16].try_into().unwrap_or([0; 16]);
        let offset = le64(e, 16);
        let length = le32(e, 24);
        let bits = le32(e, 28);
        if let Some(line) = overlap(&regions, offset, u64::from(length)) {
            return Err(einval().with_warnings(vec![line]));
        }
        regions.push((offset, offset.wrapping_add(u64::from(length))));
        if guid == BAT_GUID {
            if bat_rt.is_some() {
                return Err(einval());
            }
            bat_rt = Some((offset, length));
        } else if guid == METADATA_GUID {
            if meta_rt.is_some() {
                return Err(einval());
            }
            meta_rt = Some((offset, length));
        } else if bits & REGION_ENTRY_REQUIRED != 0 {
            return Err(open_errno(filename, ENOTSUP));
        }
    }
    let (Some((bat_offset, bat_length)), Some((meta_offset, _))) = (bat_rt, meta_rt) else {
        return Err(einval());
    };

    // Metadata table.
    if request_fails(meta_offset, METADATA_TABLE_MAX_SIZE as u64) {
        return Err(eio());
    }
    let mut mt = vec![0u8; METADATA_TABLE_MAX_SIZE];
    files.read_at(file, meta_offset, &mut mt)?;
    if &mt[..8] != b"metadata" {
        return Err(einval());
    }
    let md_count = usize::from(le16(&mt, 10));
    if md_count * 32 > METADATA_TABLE_MAX_SIZE - 32 {
        return Err(einval());
    }
    let mut present = 0u32;
    let mut item_offset = [0u32; 6];
    for i in 0..md_count {
        let e = &mt[32 + i * 32..64 + i * 32];
        let guid: [u8; 16] = e[..16].try_into().unwrap_or([0; 16]);
        let which = match guid {
            FILE_PARAM_GUID => Some((META_FILE_PARAMETER, 0)),
            VIRTUAL_SIZE_GUID => Some((META_VIRTUAL_DISK_SIZE, 1)),
            PAGE83_GUID => Some((META_PAGE_83, 2)),
            LOGICAL_SECTOR_GUID => Some((META_LOGICAL_SECTOR_SIZE, 3)),
            PHYS_SECTOR_GUID => Some((META_PHYS_SECTOR_SIZE, 4)),
            PARENT_LOCATOR_GUID => Some((META_PARENT_LOCATOR, 5)),
            _ => None,
        };
        match which {
            Some((bit, slot)) => {
                if present & bit != 0 {
                    return Err(einval());
                }
                present |= bit;
                item_offset[slot] = le32(e, 16);
            }
            None if le32(e, 24) & META_FLAGS_IS_REQUIRED != 0 => {
                return Err(open_errno(filename, ENOTSUP));
            }
            None => {}
        }
    }
    if present != META_ALL {
        return Err(open_errno(filename, ENOTSUP));
    }
    let mut read_item = |slot: usize, len: usize| -> Result<[u8; 8]> {
        let at = u64::from(item_offset[slot]).wrapping_add(meta_offset);
        if request_fails(at, len as u64) {
            return Err(eio());
        }
        let mut b = [0u8; 8];
        files.read_at(file, at, &mut b[..len])?;
        Ok(b)
    };
    let params = read_item(0, 8)?;
    let block_size = le32(&params, 0);
    if le32(&params, 4) & PARAMS_HAS_PARENT != 0 {
        // A parent locator would have failed the presence check above.
        return Err(einval());
    }
    let virtual_disk_size = le64(&read_item(1, 8)?, 0);
    let logical_sector_size = le32(&read_item(3, 4)?, 0);
    let _physical_sector_size = le32(&read_item(4, 4)?, 0);
    if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&block_size) {
        return Err(einval());
    }
    // qemu only implements 512-byte logical sectors.
    if logical_sector_size != 512 {
        return Err(open_errno(filename, ENOTSUP));
    }
    let sectors_per_block = block_size / logical_sector_size;
    let chunk_ratio =
        MAX_SECTORS_PER_BLOCK * u64::from(logical_sector_size) / u64::from(block_size);
    if !sectors_per_block.is_power_of_two()
        || !chunk_ratio.is_power_of_two()
        || !block_size.is_power_of_two()
    {
        return Err(einval());
    }
    let chunk_ratio_bits = chunk_ratio.trailing_zeros();
    let total_sectors = virtual_disk_size >> logical_sector_size.trailing_zeros();

    let data_blocks =
        virtual_disk_size.wrapping_add(u64::from(block_size) - 1) / u64::from(block_size);
    let data_blocks = data_blocks as u32;
    let bat_entries = data_blocks.wrapping_add(data_blocks.wrapping_sub(1) >> chunk_ratio_bits);
    if u64::from(bat_entries) > u64::from(bat_length) / 8 {
        return Err(einval());
    }
    if request_fails(bat_offset, u64::from(bat_length)) {
        return Err(eio());
    }
    let bad_entry = check_bat(
        files,
        file,
        bat_offset,
        bat_entries,
        block_size,
        chunk_ratio,
        total_sectors,
        &regions,
    )?;
    if let Some(line) = bad_entry {
        return Err(einval().with_warnings(vec![line]));
    }

    let info = ImageInfo {
        format: "vhdx".into(),
        virtual_size: total_sectors.wrapping_mul(512),
        cluster_size: Some(u64::from(block_size)),
        dirty_flag: Some(false),
        children: single_child(file),
        ..Default::default()
    };
    let layout = Layout {
        bat_offset,
        block_size: u64::from(block_size),
        chunk_ratio_bits,
    };
    Ok((info, layout))
}

/// `vhdx_parse_header`: the valid header with the higher sequence number.
fn parse_header(files: &mut dyn Files, file: FileId) -> Result<Vec<u8>> {
    let mut h1 = vec![0u8; HEADER_SIZE];
    let mut h2 = vec![0u8; HEADER_SIZE];
    files.read_at(file, HEADER1_OFFSET, &mut h1)?;
    files.read_at(file, HEADER2_OFFSET, &mut h2)?;
    let valid = |h: &[u8]| checksum_ok(h) && &h[..4] == b"head" && le16(h, 66) == 1;
    let pick = match (valid(&h1), valid(&h2)) {
        (true, false) => Some(h1),
        (false, true) => Some(h2),
        (true, true) => {
            let (s1, s2) = (le64(&h1, 8), le64(&h2, 8));
            if s1 > s2 {
                Some(h1)
            } else if s2 > s1 {
                Some(h2)
            } else if h1 == h2 {
                // Disk2VHD writes two identical headers.
                Some(h1)
            } else {
                None
            }
        }
        (false, false) => None,
    };
    pick.ok_or_else(|| ImageError::open("No valid VHDX header found"))
}

struct Log {
    offset: u64,
    length: u64,
    read: u64,
    file_len: u64,
    /// Sector reads left (see [`VHDX_LOG_SCAN_PASSES`]).
    budget: u64,
}

impl Log {
    fn spend(&mut self) -> Result<()> {
        self.budget = self.budget.checked_sub(1).ok_or_else(|| {
            ImageError::limit(format!(
                "VHDX log scan read the log more than {VHDX_LOG_SCAN_PASSES} times over \
                 (VHDX_LOG_SCAN_PASSES); qemu-img would not finish on this image"
            ))
        })?;
        Ok(())
    }
}

/// `vhdx_parse_log`: a log with a valid active sequence must be replayed,
/// which a read-only open refuses.
fn parse_log(files: &mut dyn Files, file: FileId, header: &[u8], filename: &str) -> Result<()> {
    let einval = || open_errno(filename, EINVAL);
    let offset = le64(header, 72);
    let length = le32(header, 68);
    if offset < LOG_MIN_SIZE || !offset.is_multiple_of(LOG_MIN_SIZE) {
        return Err(einval());
    }
    if le16(header, 64) != 0 {
        return Err(einval());
    }
    let log_guid = &header[48..64];
    if log_guid.iter().all(|&b| b == 0) || length == 0 {
        return Ok(());
    }
    if u64::from(length) % LOG_MIN_SIZE != 0 {
        return Err(einval());
    }
    let sectors = u64::from(length) / LOG_SECTOR_SIZE;
    let mut log = Log {
        offset,
        length: u64::from(length),
        read: 0,
        file_len: files.len(file)?,
        budget: VHDX_LOG_SCAN_PASSES * sectors + 1,
    };
    if request_fails(offset, log.length) {
        return Err(open_errno(filename, EIO));
    }
    let mut found = false;
    loop {
        // Sectors at or past the end of the file read as zeros, which are
        // never a valid entry header: the rest of this pass finds nothing.
        if log.offset + log.read >= log.file_len {
            break;
        }
        let tail = log.read;
        if validate_entry(files, file, &mut log, 0, log_guid, filename)?.is_some() {
            // qemu keeps the newest sequence; only its existence matters here,
            // but the scan goes on since a later entry can still fail it.
            found = true;
            let mut seq = 0u64;
            while let Some(next) = validate_entry(files, file, &mut log, seq, log_guid, filename)? {
                seq = next;
            }
        }
        if log.read < tail {
            break;
        }
        if log.read == tail {
            // qemu's search starts over at the same place forever.
            return Err(ImageError::limit(
                "VHDX log scan never ends (an entry spans the whole log); qemu-img hangs on \
                 this image",
            ));
        }
    }
    if found {
        return Err(ImageError::open(format!(
            "VHDX image file '{filename}' opened read-only, but contains a log that needs to be \
             replayed\nTo replay the log, run:\nqemu-img check -r all '{filename}'"
        )));
    }
    Ok(())
}

fn log_sector(
    files: &mut dyn Files,
    file: FileId,
    log: &mut Log,
    buf: &mut [u8; 4096],
) -> Result<()> {
    log.spend()?;
    files.read_at(file, log.offset + log.read, buf)?;
    log.read += LOG_SECTOR_SIZE;
    if log.read >= log.length {
        log.read = 0;
    }
    Ok(())
}

/// `vhdx_validate_log_entry`: `Some(sequence)` for a valid entry.
fn validate_entry(
    files: &mut dyn Files,
    file: FileId,
    log: &mut Log,
    seq: u64,
    log_guid: &[u8],
    filename: &str,
) -> Result<Option<u64>> {
    let mut sector = [0u8; 4096];
    log.spend()?;
    files.read_at(file, log.offset + log.read, &mut sector)?;
    let entry_length = le32(&sector, 8);
    let sequence = le64(&sector, 16);
    let descriptor_count = le32(&sector, 24);
    let hdr_valid = &sector[..4] == b"loge"
        && log.length >= u64::from(entry_length)
        && u64::from(entry_length) % LOG_SECTOR_SIZE == 0
        && sequence != 0
        && &sector[32..48] == log_guid
        && u64::from(descriptor_count) * 32 <= u64::from(entry_length);
    if !hdr_valid || (seq > 0 && sequence != seq.wrapping_add(1)) {
        log.read += LOG_SECTOR_SIZE;
        if log.read >= log.length {
            log.read = 0;
        }
        return Ok(None);
    }
    let stored_crc = le32(&sector, 4);
    let desc_sectors = u64::from(descriptor_count.wrapping_add(2).div_ceil(128));
    let total_sectors = u64::from(entry_length) / LOG_SECTOR_SIZE;
    let mut crc = Crc32c::new();
    let mut desc_index = 0u64;
    for s in 0..desc_sectors {
        log_sector(files, file, log, &mut sector)?;
        if s == 0 {
            sector[4..8].fill(0);
        }
        // Descriptors follow the 64-byte entry header contiguously.
        let first = if s == 0 { 64 } else { 0 };
        let mut at = first;
        while at + 32 <= 4096 && desc_index < u64::from(descriptor_count) {
            let d = &sector[at..at + 32];
            let ok = le64(d, 24) == sequence
                && le64(d, 16).is_multiple_of(LOG_SECTOR_SIZE)
                && (&d[..4] == b"desc"
                    || (&d[..4] == b"zero" && le64(d, 8).is_multiple_of(LOG_SECTOR_SIZE)));
            if !ok {
                return Err(open_errno(filename, EINVAL));
            }
            desc_index += 1;
            at += 32;
        }
        crc.update(&sector);
    }
    if total_sectors > desc_sectors {
        for _ in 0..total_sectors - desc_sectors {
            log_sector(files, file, log, &mut sector)?;
            crc.update(&sector);
        }
    }
    Ok(if crc.finish() == stored_crc {
        Some(sequence)
    } else {
        None
    })
}

#[allow(clippy::too_many_arguments)]
/// `vhdx_check_bat_entries`: `Some(line)` when qemu refuses the image with
/// EINVAL, after printing `line` on stderr; qemu stops at the first bad
/// entry.
fn check_bat(
    files: &mut dyn Files,
    file: FileId,
    bat_offset: u64,
    bat_entries: u32,
    block_size: u32,
    chunk_ratio: u64,
    total_sectors: u64,
    regions: &[(u64, u64)],
) -> Result<Option<String>> {
    // qemu compares against the file node's length, whole sectors.
    let file_size = files.len(file)?.div_ceil(512) * 512;
    let in_file = file_size.saturating_sub(bat_offset) / 8;
    let n = u64::from(bat_entries).min(in_file);
    let mut payblocks = chunk_ratio;
    let mut chunk = vec![0u8; TABLE_CHUNK];
    let mut i = 0u64;
    while i < n {
        let count = (n - i).min((TABLE_CHUNK / 8) as u64) as usize;
        files.read_at(file, bat_offset + i * 8, &mut chunk[..count * 8])?;
        for k in 0..count {
            let entry = le64(&chunk, k * 8);
            let idx = i + k as u64;
            if entry & BAT_STATE_MASK != PAYLOAD_BLOCK_FULLY_PRESENT {
                continue;
            }
            let offset = entry & BAT_FILE_OFF_MASK;
            let rest = (total_sectors.wrapping_mul(512))
                .wrapping_sub(idx.wrapping_mul(u64::from(block_size)));
            let block_length = u64::from(block_size).min(rest) as u32;
            if offset > i64::MAX as u64 - u64::from(block_size) {
                return Ok(Some(format!("VHDX BAT entry {idx} offset overflow.")));
            }
            if offset >= file_size {
                return Ok(Some(format!(
                    "VHDX BAT entry {idx} start offset {offset} points after end of file \
                     ({file_size}). Image has probably been truncated."
                )));
            }
            let end = offset + u64::from(block_length);
            if end > file_size {
                return Ok(Some(format!(
                    "VHDX BAT entry {idx} end offset {} points after end of file \
                     ({file_size}). Image has probably been truncated.",
                    end - 1
                )));
            }
            if payblocks > 0 {
                payblocks -= 1;
                if let Some(line) = overlap(regions, offset, u64::from(block_size)) {
                    return Ok(Some(line));
                }
            } else {
                payblocks = chunk_ratio;
            }
        }
        i += count as u64;
    }
    Ok(None)
}

/// `vhdx_region_check`: the line qemu prints when `start..start+length`
/// overlaps a registered region. qemu keeps regions newest first, so the
/// newest overlapping one is named.
fn overlap(regions: &[(u64, u64)], start: u64, length: u64) -> Option<String> {
    let end = start.wrapping_add(length);
    regions
        .iter()
        .rev()
        .find(|&&(s, e)| !(start >= e || end <= s))
        .map(|(s, e)| format!("VHDX region {start}-{end} overlaps with region {s}-{e}"))
}

/// CRC-32C with the checksum field (bytes 4..8) taken as zero.
fn checksum_ok(buf: &[u8]) -> bool {
    let stored = le32(buf, 4);
    let mut c = Crc32c::new();
    c.update(&buf[..4]);
    c.update(&[0; 4]);
    c.update(&buf[8..]);
    c.finish() == stored
}

/// CRC-32C (Castagnoli), as VHDX uses it.
pub(crate) struct Crc32c(u32);

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

impl Crc32c {
    pub(crate) fn new() -> Self {
        Self(0xffff_ffff)
    }
    pub(crate) fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = CRC32C_TABLE[((self.0 ^ u32::from(b)) & 0xff) as usize] ^ (self.0 >> 8);
        }
    }
    pub(crate) fn finish(&self) -> u32 {
        !self.0
    }
}

/// A Microsoft GUID in its on-disk (mixed-endian) byte order.
const fn ms_guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

#[cfg(test)]
mod tests {
    //! Expected texts and values come from qemu-img 10.0.2 on images of
    //! the same shape (qemu-img create -f vhdx, then patched).
    use super::*;
    use crate::MemFiles;
    use alloc::string::String;
    use instar_wire::ErrorKind;

    const MIB: usize = 1 << 20;
    const META: usize = 2 * MIB;
    const BAT: usize = 3 * MIB;

    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    fn fix(b: &mut [u8], at: usize, len: usize) {
        b[at + 4..at + 8].fill(0);
        let mut c = Crc32c::new();
        c.update(&b[at..at + len]);
        let v = c.finish();
        put(b, at + 4, &v.to_le_bytes());
    }

    fn header(b: &mut [u8], at: usize, seq: u64) {
        put(b, at, b"head");
        put(b, at + 8, &seq.to_le_bytes());
        put(b, at + 66, &1u16.to_le_bytes());
        put(b, at + 68, &(MIB as u32).to_le_bytes());
        put(b, at + 72, &(MIB as u64).to_le_bytes());
        fix(b, at, HEADER_SIZE);
    }

    /// 1 GiB dynamic, 8 MiB blocks, no data: the layout qemu-img creates.
    fn image() -> Vec<u8> {
        let mut b = vec![0u8; 4 * MIB];
        put(&mut b, 0, b"vhdxfile");
        header(&mut b, HEADER1_OFFSET as usize, 1);
        header(&mut b, HEADER2_OFFSET as usize, 2);
        let rt = REGION_TABLE_OFFSET as usize;
        put(&mut b, rt, b"regi");
        put(&mut b, rt + 8, &2u32.to_le_bytes());
        for (i, (guid, off)) in [(BAT_GUID, BAT), (METADATA_GUID, META)].iter().enumerate() {
            let e = rt + 16 + i * 32;
            put(&mut b, e, guid);
            put(&mut b, e + 16, &(*off as u64).to_le_bytes());
            put(&mut b, e + 24, &(MIB as u32).to_le_bytes());
            put(&mut b, e + 28, &1u32.to_le_bytes());
        }
        fix(&mut b, rt, REGION_TABLE_SIZE);
        put(&mut b, META, b"metadata");
        let items: [([u8; 16], u32, &[u8]); 5] = [
            (FILE_PARAM_GUID, 0x10000, &(8 * MIB as u32).to_le_bytes()),
            (VIRTUAL_SIZE_GUID, 0x10008, &(1u64 << 30).to_le_bytes()),
            (PAGE83_GUID, 0x10010, &[0; 16]),
            (LOGICAL_SECTOR_GUID, 0x10020, &512u32.to_le_bytes()),
            (PHYS_SECTOR_GUID, 0x10024, &4096u32.to_le_bytes()),
        ];
        put(&mut b, META + 10, &(items.len() as u16).to_le_bytes());
        for (i, (guid, off, data)) in items.iter().enumerate() {
            let e = META + 32 + i * 32;
            put(&mut b, e, guid);
            put(&mut b, e + 16, &off.to_le_bytes());
            put(&mut b, e + 20, &(data.len() as u32).to_le_bytes());
            put(&mut b, META + *off as usize, data);
        }
        b
    }

    fn run(b: Vec<u8>) -> Result<ImageInfo> {
        info(&mut MemFiles::new(b), 0, "x.vhdx")
    }

    fn err(b: Vec<u8>) -> String {
        run(b).unwrap_err().message
    }

    #[test]
    fn probe_and_info() {
        assert_eq!(probe(b"vhdxfile", "x"), 100);
        assert_eq!(probe(b"vhdxfil", "x"), 0);
        let i = run(image()).unwrap();
        assert_eq!(
            (i.format.as_str(), i.virtual_size, i.cluster_size),
            ("vhdx", 1 << 30, Some(8 << 20))
        );
    }

    #[test]
    fn headers() {
        let mut b = image();
        b[HEADER1_OFFSET as usize + 100] ^= 1;
        assert!(run(b.clone()).is_ok(), "one valid header is enough");
        b[HEADER2_OFFSET as usize + 100] ^= 1;
        assert_eq!(err(b), "No valid VHDX header found");
        let mut b = image();
        header(&mut b, HEADER1_OFFSET as usize, 2);
        put(&mut b, HEADER1_OFFSET as usize + 16, &[1]);
        fix(&mut b, HEADER1_OFFSET as usize, HEADER_SIZE);
        assert_eq!(
            err(b),
            "No valid VHDX header found",
            "equal sequence numbers, different headers"
        );
        let mut b = image();
        b[0] = b'X';
        assert_eq!(err(b), "Could not open 'x.vhdx': Invalid argument");
        assert_eq!(
            err(image()[..300 * 1024].to_vec()),
            "Could not open 'x.vhdx': Invalid argument"
        );
    }

    #[test]
    fn dirty_log_refused() {
        let mut b = image();
        let guid = [7u8; 16];
        for at in [HEADER1_OFFSET as usize, HEADER2_OFFSET as usize] {
            put(&mut b, at + 48, &guid);
            fix(&mut b, at, HEADER_SIZE);
        }
        // One entry of one sector: header only, no descriptors.
        let e = MIB;
        put(&mut b, e, b"loge");
        put(&mut b, e + 8, &4096u32.to_le_bytes());
        put(&mut b, e + 16, &1u64.to_le_bytes());
        put(&mut b, e + 32, &guid);
        fix(&mut b, e, 4096);
        assert_eq!(
            err(b.clone()),
            "VHDX image file 'x.vhdx' opened read-only, but contains a log that needs to be replayed\n\
             To replay the log, run:\nqemu-img check -r all 'x.vhdx'"
        );
        // A wrong checksum makes the entry invalid: nothing to replay.
        b[e + 100] ^= 1;
        assert!(run(b).is_ok());
    }

    #[test]
    fn region_and_metadata_errors() {
        let rt = REGION_TABLE_OFFSET as usize;
        let einval = "Could not open 'x.vhdx': Invalid argument";
        let enotsup = "Could not open 'x.vhdx': Operation not supported";
        let mut b = image();
        b[rt + 200] ^= 1;
        assert_eq!(err(b), einval);
        let mut b = image();
        put(&mut b, rt + 8, &3000u32.to_le_bytes());
        fix(&mut b, rt, REGION_TABLE_SIZE);
        assert_eq!(err(b), einval);
        let mut b = image();
        put(&mut b, rt + 48 + 16, &(BAT as u64).to_le_bytes());
        fix(&mut b, rt, REGION_TABLE_SIZE);
        assert_eq!(err(b), einval, "overlapping regions");
        let mut b = image();
        put(&mut b, rt + 48, &[0x11; 16]);
        fix(&mut b, rt, REGION_TABLE_SIZE);
        assert_eq!(err(b), enotsup, "unknown required region");
        let mut b = image();
        put(&mut b, rt + 16 + 16, &(1u64 << 62).to_le_bytes());
        fix(&mut b, rt, REGION_TABLE_SIZE);
        assert!(
            run(b).is_ok(),
            "a BAT far past the end reads as zeros, as in qemu"
        );
        let mut b = image();
        put(&mut b, META + 10, &3000u16.to_le_bytes());
        assert_eq!(err(b), einval);
        let mut b = image();
        put(&mut b, META + 10, &4u16.to_le_bytes());
        assert_eq!(err(b), enotsup, "missing metadata item");
        let mut b = image();
        put(&mut b, META + 0x10020, &4096u32.to_le_bytes());
        assert_eq!(err(b), enotsup);
        let mut b = image();
        put(&mut b, META + 0x10000, &0u32.to_le_bytes());
        assert_eq!(err(b), einval);
        let mut b = image();
        put(&mut b, META + 0x10004, &2u32.to_le_bytes());
        assert_eq!(err(b), einval, "has_parent without a locator");
        let mut b = image();
        put(&mut b, META + 0x10008, &(1u64 << 50).to_le_bytes());
        assert_eq!(err(b), einval, "BAT region too small for the size");
    }

    #[test]
    fn bat_entries_checked() {
        let mut b = image();
        put(&mut b, BAT, &((1u64 << 40) | 6).to_le_bytes());
        let e = run(b).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Open, "Could not open 'x.vhdx': Invalid argument")
        );
        let mut b = image();
        put(&mut b, BAT, &((MIB as u64) | 6).to_le_bytes());
        assert_eq!(
            err(b),
            "Could not open 'x.vhdx': Invalid argument",
            "block over the log"
        );
    }

    /// The stderr line before the error, for a patched [`image`].
    fn warning(b: Vec<u8>) -> (String, Vec<String>) {
        let e = run(b).unwrap_err();
        (e.message, e.warnings)
    }

    #[test]
    fn bat_entry_warnings() {
        // Lines from qemu-img 10.0.2 on the same bytes (t-*.vhdx in the
        // report's verification set).
        let einval = "Could not open 'x.vhdx': Invalid argument";
        let truncated = |what: &str| {
            alloc::vec![format!(
                "VHDX BAT entry {what} points after end of file (4194304). Image has probably \
                 been truncated."
            )]
        };
        let mut b = image();
        put(&mut b, BAT, &((1u64 << 40) | 6).to_le_bytes());
        assert_eq!(
            warning(b),
            (einval.into(), truncated("0 start offset 1099511627776"))
        );
        let mut b = image();
        put(&mut b, BAT + 24, &((1u64 << 40) | 6).to_le_bytes());
        assert_eq!(
            warning(b),
            (einval.into(), truncated("3 start offset 1099511627776"))
        );
        let mut b = image();
        put(&mut b, BAT, &((MIB as u64) | 6).to_le_bytes());
        assert_eq!(
            warning(b),
            (einval.into(), truncated("0 end offset 9437183"))
        );
        // The file size qemu compares with is in whole sectors.
        let mut b = image();
        b.truncate(4 * MIB - 100);
        put(&mut b, BAT, &((3 * MIB as u64) | 6).to_le_bytes());
        assert_eq!(
            warning(b),
            (einval.into(), truncated("0 end offset 11534335"))
        );
        let mut b = image();
        put(&mut b, BAT, &0xFFFF_FFFF_FFF0_0006u64.to_le_bytes());
        assert_eq!(
            warning(b),
            (
                einval.into(),
                alloc::vec!["VHDX BAT entry 0 offset overflow.".into()]
            )
        );
    }

    #[test]
    fn region_overlap_warnings() {
        let einval = "Could not open 'x.vhdx': Invalid argument";
        let line = |s: &str| alloc::vec![String::from(s)];
        let rt = REGION_TABLE_OFFSET as usize;
        let mut b = image();
        put(&mut b, rt + 48 + 16, &(BAT as u64).to_le_bytes());
        fix(&mut b, rt, REGION_TABLE_SIZE);
        assert_eq!(
            warning(b),
            (
                einval.into(),
                line("VHDX region 3145728-4194304 overlaps with region 3145728-4194304")
            )
        );
        let mut b = image();
        put(&mut b, rt + 16 + 16, &(MIB as u64 + 4096).to_le_bytes());
        fix(&mut b, rt, REGION_TABLE_SIZE);
        assert_eq!(
            warning(b),
            (
                einval.into(),
                line("VHDX region 1052672-2101248 overlaps with region 1048576-2097152")
            )
        );
        // A payload block over the log, the metadata and the BAT: qemu
        // names the newest region it registered (the metadata).
        let mut b = image();
        b.resize(16 * MIB, 0);
        put(&mut b, BAT, &((MIB as u64) | 6).to_le_bytes());
        assert_eq!(
            warning(b),
            (
                einval.into(),
                line("VHDX region 1048576-9437184 overlaps with region 2097152-3145728")
            )
        );
        let mut b = image();
        b.resize(16 * MIB, 0);
        put(&mut b, BAT, &((8 * MIB as u64) | 6).to_le_bytes());
        put(&mut b, BAT + 8, &((3 * MIB as u64) | 6).to_le_bytes());
        assert_eq!(
            warning(b),
            (
                einval.into(),
                line("VHDX region 3145728-11534336 overlaps with region 3145728-4194304")
            )
        );
        // Errors qemu gives without a line of its own carry none.
        let mut b = image();
        put(&mut b, META + 10, &3000u16.to_le_bytes());
        assert_eq!(warning(b), (einval.into(), Vec::new()));
        assert!(run(image()).unwrap().warnings.is_empty());
    }

    #[test]
    fn crc32c_known_value() {
        let mut c = Crc32c::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xe306_9283);
    }

    #[test]
    fn log_scans_are_bounded() {
        let mut b = image();
        b.resize(8 * MIB, 0);
        let guid = [7u8; 16];
        for at in [HEADER1_OFFSET as usize, HEADER2_OFFSET as usize] {
            put(&mut b, at + 48, &guid);
            put(&mut b, at + 68, &(4 * MIB as u32).to_le_bytes());
            put(&mut b, at + 72, &(4 * MIB as u64).to_le_bytes());
            fix(&mut b, at, HEADER_SIZE);
        }
        // Every sector claims an entry as long as the log, with a bad
        // checksum: qemu's search comes back to where it started and
        // loops forever.
        for k in (4 * MIB..8 * MIB).step_by(4096) {
            put(&mut b, k, b"loge");
            put(&mut b, k + 8, &(4 * MIB as u32).to_le_bytes());
            put(&mut b, k + 16, &1u64.to_le_bytes());
            put(&mut b, k + 32, &guid);
        }
        let e = run(b.clone()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Limit);
        // One sector short of the log: each try wraps to just before its
        // start, so the scan ends after the first (qemu does the same).
        for k in (4 * MIB..8 * MIB).step_by(4096) {
            put(&mut b, k + 8, &(4 * MIB as u32 - 4096).to_le_bytes());
        }
        assert!(run(b).is_ok());
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on a qemu-img-created image cut short.
        assert_eq!(err(Vec::new()), "Could not open 'x.vhdx': Invalid argument");
        for n in [8, 64 * 1024] {
            assert_eq!(err(image()[..n].to_vec()), "No valid VHDX header found");
        }
        let img = image();
        crate::hostile::truncations(info, &img, "x.vhdx", 16);
        let none = &crate::hostile::no_fix;
        // Metadata table and items, and the BAT, carry no checksum.
        crate::hostile::absurd_fields(info, &img, "x.vhdx", META..META + 192, none);
        crate::hostile::absurd_fields(info, &img, "x.vhdx", META + 0x10000..META + 0x10028, none);
        crate::hostile::absurd_fields(info, &img, "x.vhdx", BAT..BAT + 32, none);
        let rt = REGION_TABLE_OFFSET as usize;
        let fix_rt = |b: &mut [u8]| fix(b, rt, REGION_TABLE_SIZE);
        crate::hostile::absurd_fields(info, &img, "x.vhdx", rt..rt + 80, &fix_rt);
        let h = HEADER2_OFFSET as usize;
        let fix_h = |b: &mut [u8]| fix(b, h, HEADER_SIZE);
        crate::hostile::absurd_fields(info, &img, "x.vhdx", h + 8..h + 80, &fix_h);
    }
}
