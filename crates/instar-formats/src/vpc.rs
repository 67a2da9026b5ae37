//! VPC (Virtual PC / Hyper-V VHD): the 512-byte footer (copy at offset 0
//! for dynamic and differencing disks, at the end for fixed ones), the
//! dynamic disk header and the block allocation table.
//!
//! qemu does not follow a differencing disk's parent (no backing file is
//! reported), so neither does this module.

use crate::block::single_child;
use crate::block::{open_errno, request_fails, EFBIG};
use crate::bytes::{be16, be32, be64};
use crate::limits::TABLE_CHUNK;
use crate::{Files, Result};
use alloc::format;
use alloc::vec;
use instar_wire::{FileId, ImageError, ImageInfo};

pub mod map;

const FOOTER_SIZE: u64 = 512;
const DYN_HEADER_SIZE: usize = 1024;
const VHD_FIXED: u32 = 2;
/// qemu's 2040 GiB ceiling, in sectors.
const VHD_MAX_SECTORS: u64 = 0xff00_0000;
/// The largest CHS geometry: with it the footer's size is trusted.
const VHD_MAX_GEOMETRY: u64 = 65535 * 16 * 255;

/// `conectix` at offset 0 (a fixed disk, footer only at the end, probes as
/// raw).
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= 8 && &buf[..8] == b"conectix" {
        100
    } else {
        0
    }
}

/// Describe the VHD image in `file`.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    let mut footer = [0u8; FOOTER_SIZE as usize];
    files.read_at(file, 0, &mut footer)?;
    let mut fixed = false;
    if &footer[..8] != b"conectix" {
        let len = files.len(file)?.div_ceil(512) * 512;
        if len < FOOTER_SIZE {
            return Err(ImageError::open("File too small for a VHD header"));
        }
        files.read_at(file, len - FOOTER_SIZE, &mut footer)?;
        if &footer[..8] != b"conectix" || be32(&footer, 60) != VHD_FIXED {
            return Err(ImageError::open("invalid VPC image"));
        }
        fixed = true;
    }

    let stored = be32(&footer, 64);
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    if !sum != stored {
        return Err(ImageError::open("Incorrect header checksum"));
    }

    let cyls = u64::from(be16(&footer, 56));
    let mut total_sectors = cyls * u64::from(footer[58]) * u64::from(footer[59]);
    // Virtual PC and old qemu size the disk by its CHS geometry; every
    // other creator's current_size is right.
    let app = &footer[28..32];
    let use_chs = app == b"vpc " || app == b"qemu";
    if !use_chs || total_sectors == VHD_MAX_GEOMETRY {
        total_sectors = be64(&footer, 48) / 512;
    }
    if total_sectors > VHD_MAX_SECTORS {
        return Err(open_errno(filename, EFBIG));
    }

    let mut cluster_size = None;
    if !fixed {
        let data_offset = be64(&footer, 16);
        if request_fails(data_offset, DYN_HEADER_SIZE as u64) {
            return Err(ImageError::open(
                "Error reading dynamic VHD header: Input/output error",
            ));
        }
        let mut dyn_hdr = [0u8; DYN_HEADER_SIZE];
        files.read_at(file, data_offset, &mut dyn_hdr)?;
        if &dyn_hdr[..8] != b"cxsparse" {
            return Err(ImageError::open("Invalid header magic"));
        }
        let block_size = be32(&dyn_hdr, 32);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(ImageError::open(format!("Invalid block size {block_size}")));
        }
        let bitmap_size = u64::from(((block_size / (8 * 512)) + 511) & !511);
        let max_table_entries = be32(&dyn_hdr, 28);
        if (total_sectors * 512) / u64::from(block_size) > 0xffff_ffff {
            return Err(ImageError::open("Too many blocks"));
        }
        let computed = u64::from(max_table_entries) * u64::from(block_size);
        if computed < total_sectors * 512 {
            return Err(ImageError::open("Page table too small"));
        }
        if max_table_entries > (i32::MAX as u32) / 4 {
            return Err(ImageError::open(format!(
                "Max Table Entries too large ({})",
                max_table_entries as i32
            )));
        }
        let bat_offset = be64(&dyn_hdr, 16);
        let bat_bytes = u64::from(max_table_entries) * 4;
        if request_fails(bat_offset, bat_bytes) {
            return Err(ImageError::open(
                "Error reading pagetable: Input/output error",
            ));
        }
        let mut free = (bat_offset + bat_bytes).div_ceil(512) * 512;
        // Only the part of the BAT inside the file is read: past the end
        // every entry reads as 0, a block at sector 0.
        let file_len = files.len(file)?;
        let in_file = file_len.saturating_sub(bat_offset).min(bat_bytes);
        let mut chunk = vec![0u8; TABLE_CHUNK];
        let mut done = 0u64;
        while done < in_file {
            let n = (in_file - done).min(TABLE_CHUNK as u64) as usize;
            let n = n - n % 4;
            if n == 0 {
                break;
            }
            files.read_at(file, bat_offset + done, &mut chunk[..n])?;
            for e in chunk[..n].chunks_exact(4) {
                let e = be32(e, 0);
                if e != 0xffff_ffff {
                    free = free.max(512 * u64::from(e) + bitmap_size + u64::from(block_size));
                }
            }
            done += n as u64;
        }
        if done < bat_bytes {
            // The next entry may straddle the end of the file (its missing
            // bytes read as zeros); any after it lie wholly past the end and
            // read as 0, a block at offset 0.
            let mut tail = [0u8; 4];
            files.read_at(file, bat_offset + done, &mut tail)?;
            let e = u32::from_be_bytes(tail);
            if e != 0xffff_ffff {
                free = free.max(512 * u64::from(e) + bitmap_size + u64::from(block_size));
            }
            if done + 4 < bat_bytes {
                free = free.max(bitmap_size + u64::from(block_size));
            }
        }
        if free > file_len.div_ceil(512) * 512 {
            return Err(ImageError::open(
                "block-vpc: free_data_block_offset points after the end of file. \
                 The image has been truncated.",
            ));
        }
        // qemu keys the cluster size on the footer's type, not on where
        // the footer was found.
        if be32(&footer, 60) != VHD_FIXED {
            cluster_size = Some(u64::from(block_size));
        }
    }

    Ok(ImageInfo {
        format: "vpc".into(),
        virtual_size: total_sectors * 512,
        cluster_size,
        dirty_flag: Some(false),
        children: single_child(file),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    //! Expected texts and values come from qemu-img 10.0.2 on the same
    //! bytes.
    use super::*;
    use crate::MemFiles;
    use alloc::string::String;
    use alloc::vec::Vec;

    fn footer(app: &[u8; 4], chs: (u16, u8, u8), size: u64, ty: u32, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[28..32].copy_from_slice(app);
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[56..58].copy_from_slice(&chs.0.to_be_bytes());
        f[58] = chs.1;
        f[59] = chs.2;
        f[60..64].copy_from_slice(&ty.to_be_bytes());
        let sum = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
        f
    }

    /// A dynamic VHD as qemu-img creates it: footer, header, BAT, footer.
    fn dynamic(app: &[u8; 4], chs: (u16, u8, u8), size: u64, entries: u32, block: u32) -> Vec<u8> {
        let f = footer(app, chs, size, 3, 512);
        let mut img = f.clone();
        let mut h = vec![0u8; 1024];
        h[..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&1536u64.to_be_bytes());
        h[28..32].copy_from_slice(&entries.to_be_bytes());
        h[32..36].copy_from_slice(&block.to_be_bytes());
        img.extend_from_slice(&h);
        let bat = (entries as usize * 4).div_ceil(512) * 512;
        img.extend(core::iter::repeat_n(0xffu8, bat));
        img.extend_from_slice(&f);
        img
    }

    fn err(img: Vec<u8>) -> String {
        info(&mut MemFiles::new(img), 0, "p.vhd")
            .unwrap_err()
            .message
    }

    #[test]
    fn probe_needs_leading_footer() {
        assert_eq!(probe(b"conectix", "x"), 100);
        assert_eq!(probe(b"conecti", "x"), 0);
    }

    #[test]
    fn dynamic_sizes_by_creator() {
        // qemu sizes by CHS for "qemu" and "vpc ", by current_size else.
        let chs = (200, 16, 63);
        let i = info(
            &mut MemFiles::new(dynamic(b"qemu", chs, 104_865_792, 51, 0x20_0000)),
            0,
            "p.vhd",
        )
        .unwrap();
        assert_eq!(i.virtual_size, 200 * 16 * 63 * 512);
        assert_eq!(i.cluster_size, Some(0x20_0000));
        let i = info(
            &mut MemFiles::new(dynamic(b"win ", chs, 104_857_600, 51, 0x20_0000)),
            0,
            "p.vhd",
        )
        .unwrap();
        assert_eq!(i.virtual_size, 104_857_600);
        // The maximum geometry means "trust current_size".
        let i = info(
            &mut MemFiles::new(dynamic(b"vpc ", (65535, 16, 255), 1 << 30, 512, 0x20_0000)),
            0,
            "p.vhd",
        )
        .unwrap();
        assert_eq!(i.virtual_size, 1 << 30);
    }

    #[test]
    fn fixed_footer_at_end() {
        let mut img = vec![0u8; 1 << 20];
        img.extend_from_slice(&footer(b"qemu", (20, 4, 17), 1 << 20, 2, u64::MAX));
        let i = info(&mut MemFiles::new(img), 0, "p.vhd").unwrap();
        assert_eq!(i.virtual_size, 20 * 4 * 17 * 512);
        assert_eq!(i.cluster_size, None);
    }

    #[test]
    fn hostile_headers() {
        let good = || dynamic(b"qemu", (200, 16, 63), 104_865_792, 51, 0x20_0000);
        let mut bad_sum = good();
        bad_sum[64] ^= 1;
        assert_eq!(err(bad_sum), "Incorrect header checksum");
        let mut magic = good();
        magic[512] = b'x';
        assert_eq!(err(magic), "Invalid header magic");
        assert_eq!(
            err(dynamic(b"qemu", (200, 16, 63), 0, 51, 3000)),
            "Invalid block size 3000"
        );
        assert_eq!(
            err(dynamic(b"qemu", (200, 16, 63), 0, 2, 0x20_0000)),
            "Page table too small"
        );
        let mut huge = good();
        huge[512 + 28..512 + 32].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert_eq!(err(huge), "Max Table Entries too large (2147483647)");
        let mut past_end = good();
        past_end[1536..1540].copy_from_slice(&0x10_0000u32.to_be_bytes());
        assert_eq!(
            err(past_end),
            "block-vpc: free_data_block_offset points after the end of file. The image has been truncated."
        );
        assert_eq!(err(vec![b'x'; 100]), "invalid VPC image");
        let mut small = b"conectix".to_vec();
        small.resize(108, 0);
        assert_eq!(err(small), "Incorrect header checksum");
        assert_eq!(
            err(dynamic(b"win ", (1, 1, 1), 1 << 50, 51, 0x20_0000)),
            "Could not open 'p.vhd': File too large"
        );
        // A huge BAT far past the end of a small file: bounded work, and
        // the zero entries past EOF still count as blocks at offset 0.
        let mut far = good();
        far[512 + 16..512 + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            err(far),
            "block-vpc: free_data_block_offset points after the end of file. The image has been truncated."
        );
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on a qemu-img-created dynamic VHD cut short.
        let img = dynamic(b"qemu", (520, 16, 63), 64 << 20, 32, 2 << 20);
        assert_eq!(err(Vec::new()), "File too small for a VHD header");
        assert_eq!(err(img[..1].to_vec()), "invalid VPC image");
        // The footer's fields all lie in its first 85 bytes; the dynamic
        // header then reads as zeros.
        assert_eq!(err(img[..100].to_vec()), "Invalid header magic");
        crate::hostile::truncations(info, &img, "p.vhd", 600);
        let footer = |b: &mut [u8]| {
            let sum = b[..512]
                .iter()
                .enumerate()
                .filter(|(i, _)| !(64..68).contains(i))
                .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
            b[64..68].copy_from_slice(&(!sum).to_be_bytes());
        };
        crate::hostile::absurd_fields(info, &img, "p.vhd", 0..64, &footer);
        crate::hostile::absurd_fields(info, &img, "p.vhd", 512..1536, &footer);
    }
}
