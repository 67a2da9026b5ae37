//! VDI (VirtualBox): the 512-byte header. qemu accepts only version 1.1,
//! 1 MiB blocks, 512-byte sectors and images without a parent; `info`
//! needs nothing past the header (qemu reads the block map too, but a read
//! of it cannot fail on a regular file: its offset is 32-bit).

use crate::block::single_child;
use crate::bytes::{le32, le64};
use crate::{Files, Result};
use alloc::format;
use instar_wire::{FileId, ImageError, ImageInfo};

pub mod map;

const VDI_SIGNATURE: u32 = 0xbeda_107f;
const VDI_VERSION_1_1: u32 = 0x0001_0001;
const SECTOR_SIZE: u64 = 512;
const DEFAULT_CLUSTER_SIZE: u32 = 1024 * 1024;
/// qemu's block map limit (entries of its in-memory block map).
const VDI_BLOCKS_IN_IMAGE_MAX: u32 = 0x1fff_ff80;
const VDI_DISK_SIZE_MAX: u64 = VDI_BLOCKS_IN_IMAGE_MAX as u64 * DEFAULT_CLUSTER_SIZE as u64;
const HEADER_SIZE: usize = 512;

/// The signature at offset 64 (qemu needs a whole header in the buffer).
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= HEADER_SIZE && le32(buf, 0x40) == VDI_SIGNATURE {
        100
    } else {
        0
    }
}

/// Describe the VDI image in `file`.
pub fn info(files: &mut dyn Files, file: FileId, _filename: &str) -> Result<ImageInfo> {
    let mut h = [0u8; HEADER_SIZE];
    files.read_at(file, 0, &mut h)?;
    let signature = le32(&h, 0x40);
    let version = le32(&h, 0x44);
    let offset_bmap = le32(&h, 0x154);
    let offset_data = le32(&h, 0x158);
    let sector_size = le32(&h, 0x168);
    let mut disk_size = le64(&h, 0x170);
    let block_size = le32(&h, 0x178);
    let blocks_in_image = le32(&h, 0x180);
    let uuid_link = &h[0x1a8..0x1b8];
    let uuid_parent = &h[0x1b8..0x1c8];

    if disk_size > VDI_DISK_SIZE_MAX {
        return Err(ImageError::open(format!(
            "Unsupported VDI image size (size is 0x{disk_size:x}, max supported is 0x{VDI_DISK_SIZE_MAX:x})"
        )));
    }
    // VBoxManage convertfromraw writes odd sizes; qemu rounds them up.
    disk_size = disk_size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let room = u64::from(blocks_in_image) * u64::from(block_size);
    let err = if signature != VDI_SIGNATURE {
        format!("Image not in VDI format (bad signature {signature:08x})")
    } else if version != VDI_VERSION_1_1 {
        format!(
            "unsupported VDI image (version {}.{})",
            version >> 16,
            version & 0xffff
        )
    } else if u64::from(offset_bmap) % SECTOR_SIZE != 0 {
        format!("unsupported VDI image (unaligned block map offset 0x{offset_bmap:x})")
    } else if u64::from(offset_data) % SECTOR_SIZE != 0 {
        format!("unsupported VDI image (unaligned data offset 0x{offset_data:x})")
    } else if u64::from(sector_size) != SECTOR_SIZE {
        format!("unsupported VDI image (sector size {sector_size} is not {SECTOR_SIZE})")
    } else if block_size != DEFAULT_CLUSTER_SIZE {
        format!("unsupported VDI image (block size {block_size} is not {DEFAULT_CLUSTER_SIZE})")
    } else if disk_size > room {
        format!("unsupported VDI image (disk size {disk_size}, image bitmap has room for {room})")
    } else if uuid_link.iter().any(|&b| b != 0) {
        "unsupported VDI image (non-NULL link UUID)".into()
    } else if uuid_parent.iter().any(|&b| b != 0) {
        "unsupported VDI image (non-NULL parent UUID)".into()
    } else if blocks_in_image > VDI_BLOCKS_IN_IMAGE_MAX {
        format!(
            "unsupported VDI image (too many blocks {blocks_in_image}, max is {VDI_BLOCKS_IN_IMAGE_MAX})"
        )
    } else {
        return Ok(ImageInfo {
            format: "vdi".into(),
            virtual_size: disk_size,
            cluster_size: Some(u64::from(block_size)),
            dirty_flag: Some(false),
            children: single_child(file),
            ..Default::default()
        });
    };
    Err(ImageError::open(err))
}

#[cfg(test)]
mod tests {
    //! Expected texts and values come from qemu-img 10.0.2 on the same
    //! bytes.
    use super::*;
    use crate::MemFiles;
    use alloc::string::String;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A 1 GiB dynamic image header as qemu-img creates it.
    fn header() -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..40].copy_from_slice(b"<<< QEMU VM Virtual Disk Image >>>\n\0\0\0\0\0");
        let put32 =
            |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut h, 0x40, VDI_SIGNATURE);
        put32(&mut h, 0x44, VDI_VERSION_1_1);
        put32(&mut h, 0x48, 0x180);
        put32(&mut h, 0x4c, 1);
        put32(&mut h, 0x154, 0x200);
        put32(&mut h, 0x158, 0x1200);
        put32(&mut h, 0x168, 512);
        h[0x170..0x178].copy_from_slice(&(1u64 << 30).to_le_bytes());
        put32(&mut h, 0x178, DEFAULT_CLUSTER_SIZE);
        put32(&mut h, 0x180, 1024);
        h
    }

    fn with(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut h = header();
        h[at..at + bytes.len()].copy_from_slice(bytes);
        h
    }

    fn err(img: Vec<u8>) -> String {
        info(&mut MemFiles::new(img), 0, "v.vdi")
            .unwrap_err()
            .message
    }

    #[test]
    fn probe_and_info() {
        assert_eq!(probe(&header(), "x"), 100);
        assert_eq!(probe(&header()[..511], "x"), 0);
        let i = info(&mut MemFiles::new(header()), 0, "v.vdi").unwrap();
        assert_eq!((i.virtual_size, i.cluster_size), (1 << 30, Some(1 << 20)));
        // Odd sizes round up to a sector.
        let i = info(
            &mut MemFiles::new(with(0x170, &1_000_001u64.to_le_bytes())),
            0,
            "v.vdi",
        )
        .unwrap();
        assert_eq!(i.virtual_size, 1_000_448);
    }

    #[test]
    fn hostile_headers() {
        assert_eq!(
            err(with(0x40, &0x1234_5678u32.to_le_bytes())),
            "Image not in VDI format (bad signature 12345678)"
        );
        assert_eq!(
            err(with(0x44, &0x0001_0000u32.to_le_bytes())),
            "unsupported VDI image (version 1.0)"
        );
        assert_eq!(
            err(with(0x154, &0x201u32.to_le_bytes())),
            "unsupported VDI image (unaligned block map offset 0x201)"
        );
        assert_eq!(
            err(with(0x158, &0x1201u32.to_le_bytes())),
            "unsupported VDI image (unaligned data offset 0x1201)"
        );
        assert_eq!(
            err(with(0x168, &4096u32.to_le_bytes())),
            "unsupported VDI image (sector size 4096 is not 512)"
        );
        assert_eq!(
            err(with(0x178, &0x20_0000u32.to_le_bytes())),
            "unsupported VDI image (block size 2097152 is not 1048576)"
        );
        assert_eq!(
            err(with(0x170, &(1u64 << 40).to_le_bytes())),
            "unsupported VDI image (disk size 1099511627776, image bitmap has room for 1073741824)"
        );
        assert_eq!(
            err(with(0x1a8, &[1])),
            "unsupported VDI image (non-NULL link UUID)"
        );
        assert_eq!(
            err(with(0x1b8, &[1])),
            "unsupported VDI image (non-NULL parent UUID)"
        );
        assert_eq!(
            err(with(0x170, &(0x1fff_ff90u64 << 20).to_le_bytes())),
            "Unsupported VDI image size (size is 0x1fffff9000000, max supported is 0x1fffff8000000)"
        );
        let mut many = with(0x170, &1000u64.to_le_bytes());
        many[0x180..0x184].copy_from_slice(&0x2000_0000u32.to_le_bytes());
        assert_eq!(
            err(many),
            "unsupported VDI image (too many blocks 536870912, max is 536870784)"
        );
        let mut short = header();
        short.truncate(100);
        assert_eq!(
            err(short),
            "unsupported VDI image (sector size 0 is not 512)"
        );
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on a qemu-img-created VDI image cut short.
        for n in [0, 1, 16, 64] {
            assert_eq!(
                err(header()[..n].to_vec()),
                "Image not in VDI format (bad signature 00000000)"
            );
        }
        for n in [100, 200] {
            assert_eq!(
                err(header()[..n].to_vec()),
                "unsupported VDI image (sector size 0 is not 512)"
            );
        }
        let img = header();
        crate::hostile::truncations(info, &img, "v.vdi", HEADER_SIZE);
        crate::hostile::absurd_fields(info, &img, "v.vdi", 0..HEADER_SIZE, &crate::hostile::no_fix);
    }
}
