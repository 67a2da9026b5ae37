//! vpc (VHD) target, laid out as qemu-img 10.0 `convert -O vpc` leaves it
//! (vpc_co_create, then qemu's allocating writes).
//!
//! Dynamic: footer copy at 0, dynamic header at 512, BAT at 1536 (0xff
//! sectors), then one 2 MiB block per block that holds data, each behind
//! its 512-byte sector bitmap (all ones: every sector of an allocated block
//! is marked written, as qemu marks it), in guest order; the footer at the
//! end. Fixed: the guest data, then the footer.
//!
//! Without `force_size` qemu rounds the size up to what the CHS geometry
//! can express (and `info` reports that size for a "qemu" creator); with it
//! the footer says "qem2" and the size is kept (rounded up to a sector).
//!
//! The footer's timestamp is 0 (2000-01-01) and its UUID is derived (see
//! [`super::ident`]) where qemu takes the clock and a random UUID.

use super::ident::Ident;
use super::table::{Entry, TableWriter};
use super::{is_zero, ImageWriter, Sink};
use crate::Result;
use alloc::boxed::Box;
use instar_wire::convert::{VhdSubformat, VpcOptions};
use instar_wire::ImageError;

const SECTOR: u64 = 512;
const FOOTER_SIZE: u64 = 512;
const DYN_HEADER_OFFSET: u64 = 512;
const DYN_HEADER_SIZE: usize = 1024;
const BAT_OFFSET: u64 = 1536;
/// qemu creates dynamic disks with 2 MiB blocks only.
const BLOCK_SIZE: u64 = 0x20_0000;
/// `((block_size / (8 * 512)) + 511) & ~511` for 2 MiB blocks.
const BITMAP_SIZE: u64 = 512;
const VHD_FIXED: u32 = 2;
const VHD_DYNAMIC: u32 = 3;
/// VHD_CHS_MAX_C/H/S: the geometry that means "use current_size".
const CHS_MAX: (u16, u8, u8) = (65535, 16, 255);
/// VHD_MAX_GEOMETRY, in sectors.
const VHD_MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// VHD_MAX_SECTORS: qemu's 2040 GiB ceiling.
const VHD_MAX_SECTORS: u64 = 0xff00_0000;

/// The footer's CHS geometry and the sector count of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cyls: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub secs_per_cyl: u8,
    /// Sectors of the image (what `info` reports, times 512).
    pub total_sectors: u64,
}

/// qemu's calculate_geometry (the VHD specification's algorithm, with up
/// to 255 heads above 127 GiB), with qemu's integer widths: the head count
/// is a `uint8_t`, the cylinders-times-heads product a `uint32_t`.
fn calculate_geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(VHD_MAX_GEOMETRY);
    let (secs, heads, cth): (u8, u8, u32);
    if total >= 65535 * 16 * 63 {
        secs = 255;
        heads = 16;
        cth = (total / 255) as u32;
    } else {
        let mut s = 17u8;
        let mut c = (total / 17) as u32;
        // DIV_ROUND_UP into a uint8_t: qemu keeps the low byte.
        let mut h = (c.div_ceil(1024)) as u8;
        if h < 4 {
            h = 4;
        }
        if c >= u32::from(h) * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = (total / 31) as u32;
        }
        if c >= u32::from(h) * 1024 {
            s = 63;
            h = 16;
            c = (total / 63) as u32;
        }
        (secs, heads, cth) = (s, h, c);
    }
    ((cth / u32::from(heads)) as u16, heads, secs)
}

/// qemu's calculate_rounded_image_size for a size already rounded up to a
/// sector: the smallest geometry holding it, or the size itself with the
/// maximum geometry (`force_size`, or sizes past what CHS can express).
pub fn geometry(size: u64, force_size: bool) -> Result<Geometry> {
    let (mut cyls, mut heads, mut secs) = (0u16, 0u8, 0u8);
    let chs = |c: u16, h: u8, s: u8| u64::from(c) * u64::from(h) * u64::from(s);
    if force_size {
        (cyls, heads, secs) = CHS_MAX;
    } else {
        let wanted = VHD_MAX_GEOMETRY.min(size / SECTOR);
        let mut i = 0u64;
        while wanted > chs(cyls, heads, secs) {
            // Each step raises the request by one sector; the geometry
            // catches up within one cylinder (at most 16 * 255 steps).
            if i > 1 << 20 {
                return Err(ImageError::operation(
                    "internal error: no CHS geometry found",
                ));
            }
            (cyls, heads, secs) = calculate_geometry(wanted + i);
            i += 1;
        }
    }
    let total_sectors = if chs(cyls, heads, secs) == VHD_MAX_GEOMETRY {
        let n = size / SECTOR;
        if n > VHD_MAX_SECTORS {
            return Err(ImageError::operation(
                "Disk size is too large, max size is 2040 GiB",
            ));
        }
        n
    } else {
        chs(cyls, heads, secs)
    };
    Ok(Geometry {
        cyls,
        heads,
        secs_per_cyl: secs,
        total_sectors,
    })
}

/// The virtual size of a vpc target created for `size` bytes (what qemu-img
/// `info` then reports).
pub fn target_size(opts: &VpcOptions, size: u64) -> Result<u64> {
    let size = round_up_sector(size)?;
    Ok(geometry(size, opts.force_size)?.total_sectors * SECTOR)
}

fn round_up_sector(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(SECTOR)
        .ok_or_else(|| ImageError::operation("Disk size is too large, max size is 2040 GiB"))
}

/// `vpc_checksum`: one's complement of the byte sum.
fn checksum(buf: &[u8]) -> u32 {
    !buf.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)))
}

struct Dynamic {
    bat: TableWriter,
    /// Where the next block's bitmap goes (qemu's free_data_block_offset);
    /// the footer goes here in the end.
    free: u64,
    /// The block being written and the file offset of its data.
    current: Option<(u64, u64)>,
}

/// Writes a vpc image.
pub struct VpcWriter {
    size: u64,
    footer: [u8; FOOTER_SIZE as usize],
    dynamic: Option<Dynamic>,
    ident: Ident,
    /// End of the last write: writes must come in ascending order.
    next: u64,
}

impl VpcWriter {
    /// Start a vpc image for `virtual_size` bytes of guest data (the image
    /// may be larger: see [`target_size`]).
    pub fn create(sink: &mut dyn Sink, opts: &VpcOptions, virtual_size: u64) -> Result<Self> {
        let size = round_up_sector(virtual_size)?;
        let g = geometry(size, opts.force_size)?;
        // qemu writes the rounded size into the footer.
        let size = g.total_sectors * SECTOR;
        let dynamic = opts.subformat == VhdSubformat::Dynamic;

        let mut f = [0u8; FOOTER_SIZE as usize];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        let data_offset = if dynamic { DYN_HEADER_OFFSET } else { u64::MAX };
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[28..32].copy_from_slice(if opts.force_size { b"qem2" } else { b"qemu" });
        f[32..34].copy_from_slice(&5u16.to_be_bytes());
        f[34..36].copy_from_slice(&3u16.to_be_bytes());
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[56..58].copy_from_slice(&g.cyls.to_be_bytes());
        f[58] = g.heads;
        f[59] = g.secs_per_cyl;
        let ty = if dynamic { VHD_DYNAMIC } else { VHD_FIXED };
        f[60..64].copy_from_slice(&ty.to_be_bytes());

        let mut ident = Ident::new("vpc");
        ident.bytes(sink.output_name(0).unwrap_or("").as_bytes());
        ident.bytes(&f);

        let dynamic = if dynamic {
            let entries = g.total_sectors.div_ceil(BLOCK_SIZE / SECTOR);
            let max_table_entries = u32::try_from(entries)
                .map_err(|_| ImageError::operation("internal error: VHD BAT too large"))?;
            let mut h = [0u8; DYN_HEADER_SIZE];
            h[..8].copy_from_slice(b"cxsparse");
            h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
            h[16..24].copy_from_slice(&BAT_OFFSET.to_be_bytes());
            h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
            h[28..32].copy_from_slice(&max_table_entries.to_be_bytes());
            h[32..36].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
            let sum = checksum(&h);
            h[36..40].copy_from_slice(&sum.to_be_bytes());
            sink.write_at(0, DYN_HEADER_OFFSET, &h)?;
            // qemu fills whole sectors of 0xff, so the padding after the
            // last entry reads as unallocated entries too.
            let bat_bytes = (entries * 4).next_multiple_of(SECTOR);
            let bat = TableWriter::new(
                0,
                BAT_OFFSET,
                bat_bytes / 4,
                Entry::Be32,
                Box::new(|_| u64::from(u32::MAX)),
                true,
            );
            Some(Dynamic {
                bat,
                free: BAT_OFFSET + bat_bytes,
                current: None,
            })
        } else {
            // qemu's file protocol allocates the first 4 KiB of every file
            // it creates (allocate_first_block, for alignment probing);
            // fixed images keep guest data there, so do the same for equal
            // maps and sizes.
            sink.write_at(0, 0, &[0u8; 4096][..size.min(4096) as usize])?;
            None
        };
        let w = Self {
            size,
            footer: f,
            dynamic,
            ident,
            next: 0,
        };
        if w.dynamic.is_none() && size == 0 {
            // The footer alone lands at offset 0, where qemu takes it for a
            // dynamic disk's copy when it opens the new image: qemu-img
            // leaves the file so and fails.
            sink.write_at(0, 0, &w.sealed_footer())?;
            return Err(ImageError::open("Error reading dynamic VHD header"));
        }
        Ok(w)
    }

    fn sealed_footer(&self) -> [u8; FOOTER_SIZE as usize] {
        let mut f = self.footer;
        f[68..84].copy_from_slice(&self.ident.uuid(0));
        let sum = checksum(&f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        f
    }

    /// The virtual size of the image being written.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }
}

impl ImageWriter for VpcWriter {
    fn granularity(&self) -> u64 {
        if self.dynamic.is_some() {
            BLOCK_SIZE
        } else {
            64 << 10
        }
    }

    fn write(&mut self, sink: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| offset >= self.next && e <= self.size)
            .ok_or_else(|| {
                ImageError::operation("internal error: vpc write out of order or past the end")
            })?;
        self.next = end;
        self.ident.write(offset, data);
        let Some(d) = self.dynamic.as_mut() else {
            return sink.write_at(0, offset, data);
        };
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let block = at / BLOCK_SIZE;
            let within = at % BLOCK_SIZE;
            let n = ((BLOCK_SIZE - within) as usize).min(data.len() - done);
            let base = match d.current {
                Some((b, base)) if b == block => base,
                // A block that would only get zeros stays unallocated (it
                // reads as zeros), however the engine cut its writes.
                _ if is_zero(&data[done..done + n]) => {
                    done += n;
                    continue;
                }
                _ => {
                    let sector = u32::try_from(d.free / SECTOR).map_err(|_| {
                        ImageError::operation("internal error: VHD block past 2 TiB")
                    })?;
                    d.bat.set(sink, block, u64::from(sector))?;
                    sink.write_at(0, d.free, &[0xff; BITMAP_SIZE as usize])?;
                    let base = d.free + BITMAP_SIZE;
                    d.free = base + BLOCK_SIZE;
                    d.current = Some((block, base));
                    base
                }
            };
            sink.write_at(0, base + within, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn zero(&mut self, _sink: &mut dyn Sink, offset: u64, len: u64) -> Result<()> {
        // Unwritten ranges read as zeros (qemu's has_zero_init for vpc).
        self.next = offset.saturating_add(len).max(self.next);
        Ok(())
    }

    fn finish(self: Box<Self>, sink: &mut dyn Sink) -> Result<()> {
        let f = self.sealed_footer();
        match self.dynamic {
            Some(d) => {
                d.bat.finish(sink)?;
                sink.write_at(0, 0, &f)?;
                sink.write_at(0, d.free, &f)
            }
            None => sink.write_at(0, self.size, &f),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Sizes and geometries are qemu-img 10.0.2's (`convert -O vpc` of raw
    //! files of these sizes, then `info`).
    use super::*;
    use crate::write::MemSink;
    use crate::MemFiles;
    use alloc::vec;
    use alloc::vec::Vec;

    fn opts(subformat: VhdSubformat, force_size: bool) -> VpcOptions {
        VpcOptions {
            subformat,
            force_size,
        }
    }

    /// Write `chunks` (offset, data) and return the image.
    fn build(o: VpcOptions, size: u64, chunks: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut sink = MemSink::new(&["t.vhd"]);
        let mut w: Box<dyn ImageWriter> = Box::new(VpcWriter::create(&mut sink, &o, size).unwrap());
        for (off, d) in chunks {
            w.write(&mut sink, *off, d).unwrap();
        }
        w.finish(&mut sink).unwrap();
        sink.files.remove(0)
    }

    /// Guest bytes of a dynamic image, read the way qemu's vpc driver does.
    fn read_dynamic(img: &[u8], size: u64) -> Vec<u8> {
        let entries = crate::bytes::be32(img, 512 + 28) as u64;
        let mut out = vec![0u8; size as usize];
        for b in 0..entries {
            let e = crate::bytes::be32(img, (1536 + 4 * b) as usize);
            if e == u32::MAX {
                continue;
            }
            let bitmap = e as usize * 512;
            assert!(img[bitmap..bitmap + 512].iter().all(|&x| x == 0xff));
            let from = bitmap + 512;
            let start = (b * BLOCK_SIZE) as usize;
            let n = (size as usize - start).min(BLOCK_SIZE as usize);
            out[start..start + n].copy_from_slice(&img[from..from + n]);
        }
        out
    }

    /// Guest bytes of `img` read through the format's own block status
    /// and read (map.rs), and the number of plain data runs reported.
    pub(crate) fn via_map(img: &[u8], format: &str) -> (Vec<u8>, usize) {
        use crate::map::Mapping;
        let mut files = MemFiles::new(img.to_vec());
        let mut m = crate::map::open(&mut files, 0, Some(format), "t").unwrap();
        let size = m.virtual_size();
        let mut out = vec![0u8; size as usize];
        let (mut at, mut runs) = (0u64, 0);
        while at < size {
            let e = m.block_status(&mut files, at, size - at).unwrap();
            match e.mapping {
                Mapping::Data { at: h } => {
                    let (from, n) = (h.offset as usize, e.length as usize);
                    let dst = &mut out[at as usize..][..n];
                    // A fixed image's data may run into a hole past the
                    // last write: it reads as zeros.
                    let have = img.len().saturating_sub(from).min(n);
                    dst[..have].copy_from_slice(&img[from..from + have]);
                    runs += 1;
                }
                Mapping::Zero { .. } | Mapping::Unallocated { .. } => {}
                // vhdx has no block status in qemu: all of it is read
                // through the driver.
                Mapping::Opaque => {
                    let dst = &mut out[at as usize..][..e.length as usize];
                    m.read(&mut files, at, dst).unwrap();
                }
                other => panic!("unexpected {other:?}"),
            }
            at += e.length;
        }
        (out, runs)
    }

    #[test]
    fn geometry_matches_qemu() {
        // (requested bytes, qemu's virtual size, C/H/S)
        let cases: &[(u64, u64, (u16, u8, u8))] = &[
            (0, 0, (0, 0, 0)),
            (1, 34816, (1, 4, 17)),
            (10 << 20, 10514432, (302, 4, 17)),
            (1 << 30, 1073995776, (2081, 16, 63)),
            (100 << 30, 107374632960, (51401, 16, 255)),
            (136365211648, 136365219840, (65279, 16, 255)),
            (136365211649, 136365219840, (65279, 16, 255)),
            (200_000_000_000, 200_000_000_000, (65535, 16, 255)),
        ];
        for &(req, size, chs) in cases {
            let g = geometry(round_up_sector(req).unwrap(), false).unwrap();
            assert_eq!(g.total_sectors * 512, size, "{req}");
            assert_eq!((g.cyls, g.heads, g.secs_per_cyl), chs, "{req}");
        }
        let g = geometry(1000 << 30, false).unwrap();
        assert_eq!(
            (g.cyls, g.heads, g.secs_per_cyl, g.total_sectors),
            (65535, 16, 255, 1000 << 21)
        );
        let f = opts(VhdSubformat::Dynamic, true);
        assert_eq!(target_size(&f, 10_000_001).unwrap(), 10_000_384);
        assert_eq!(
            target_size(&f, 2041 << 30).unwrap_err().message,
            "Disk size is too large, max size is 2040 GiB"
        );
        assert_eq!(
            target_size(&opts(VhdSubformat::Fixed, false), 2041 << 30)
                .unwrap_err()
                .message,
            "Disk size is too large, max size is 2040 GiB"
        );
    }

    #[test]
    fn dynamic_roundtrip() {
        let size = 10u64 << 20;
        let a: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        let b = vec![7u8; 100];
        let c = vec![9u8; (3 << 20) + 17];
        let img = build(
            opts(VhdSubformat::Dynamic, false),
            size,
            &[
                (3 << 20, a.clone()),
                ((3 << 20) + 6000, b.clone()),
                ((5 << 20) + 3, c.clone()),
            ],
        );
        let info = crate::vpc::info(&mut MemFiles::new(img.clone()), 0, "t.vhd").unwrap();
        assert_eq!(info.virtual_size, 10514432);
        assert_eq!(info.cluster_size, Some(BLOCK_SIZE));
        // Blocks 1, 2, 3 and 4 hold data, in that order, after a 512-byte BAT.
        let bat: Vec<u32> = (0..6)
            .map(|i| crate::bytes::be32(&img, 1536 + 4 * i))
            .collect();
        let blk = (BLOCK_SIZE + 512) as u32 / 512;
        assert_eq!(
            bat,
            [u32::MAX, 4, 4 + blk, 4 + 2 * blk, 4 + 3 * blk, u32::MAX]
        );
        assert_eq!(img.len() as u64, 2048 + 4 * (BLOCK_SIZE + 512) + 512);
        assert_eq!(img[..512], img[img.len() - 512..]);
        let mut want = vec![0u8; info.virtual_size as usize];
        want[3 << 20..(3 << 20) + 5000].copy_from_slice(&a);
        want[(3 << 20) + 6000..(3 << 20) + 6100].copy_from_slice(&b);
        want[(5 << 20) + 3..(5 << 20) + 3 + c.len()].copy_from_slice(&c);
        assert!(read_dynamic(&img, info.virtual_size) == want);
        let (guest, runs) = via_map(&img, "vpc");
        assert!(guest == want);
        assert_eq!(runs, 4, "one run per allocated block");
    }

    #[test]
    fn fixed_and_forced() {
        let size = 1_000_000u64;
        let img = build(
            opts(VhdSubformat::Fixed, true),
            size,
            &[(999_000, vec![1u8; 1000])],
        );
        assert_eq!(img.len(), 1_000_448 + 512);
        assert_eq!(&img[img.len() - 512 + 28..][..4], b"qem2");
        let info = crate::vpc::info(&mut MemFiles::new(img.clone()), 0, "t.vhd").unwrap();
        assert_eq!((info.virtual_size, info.cluster_size), (1_000_448, None));
        assert!(img[999_000..1_000_000].iter().all(|&x| x == 1));
        assert!(img[..999_000].iter().all(|&x| x == 0));

        let img = build(opts(VhdSubformat::Dynamic, true), size, &[]);
        assert_eq!(img.len(), 512 + 1024 + 512 + 512);
        let info = crate::vpc::info(&mut MemFiles::new(img), 0, "t.vhd").unwrap();
        assert_eq!(info.virtual_size, 1_000_448);
    }

    #[test]
    fn empty_image() {
        let img = build(opts(VhdSubformat::Dynamic, false), 0, &[]);
        assert_eq!(img.len(), 2048);
        let info = crate::vpc::info(&mut MemFiles::new(img), 0, "t.vhd").unwrap();
        assert_eq!(info.virtual_size, 0);
        // An empty fixed image is its footer alone, at offset 0, where it
        // reads as a dynamic image's: qemu-img 10.0.2 writes the same 512
        // bytes, fails to open them and exits 1.
        let mut sink = MemSink::new(&["t.vhd"]);
        let o = opts(VhdSubformat::Fixed, false);
        let e = VpcWriter::create(&mut sink, &o, 0).err().unwrap();
        assert_eq!(e.message, "Error reading dynamic VHD header");
        assert_eq!(sink.files[0].len(), 512);
        assert_eq!(&sink.files[0][..8], b"conectix");
    }

    #[test]
    fn zeros_do_not_allocate() {
        // One write of zeros up to the middle of block 1, then data: block
        // 0 stays unallocated, block 1 gets the data.
        let mut d = vec![0u8; (3 << 20) as usize];
        d[(3 << 20) - 1] = 1;
        let img = build(opts(VhdSubformat::Dynamic, false), 4 << 20, &[(0, d)]);
        assert_eq!(crate::bytes::be32(&img, 1536), u32::MAX);
        assert_eq!(crate::bytes::be32(&img, 1540), 4);
        assert_eq!(img.len() as u64, 2048 + BITMAP_SIZE + BLOCK_SIZE + 512);
    }

    #[test]
    fn refuses_disorder() {
        let mut sink = MemSink::new(&["t.vhd"]);
        let mut w =
            VpcWriter::create(&mut sink, &opts(VhdSubformat::Dynamic, false), 8 << 20).unwrap();
        w.write(&mut sink, 4 << 20, &[1; 10]).unwrap();
        assert!(w.write(&mut sink, 1 << 20, &[1; 10]).is_err());
        assert!(w.write(&mut sink, 100 << 20, &[1; 10]).is_err());
    }

    #[test]
    fn uuid_is_derived_from_data() {
        let o = opts(VhdSubformat::Dynamic, false);
        let x = build(o, 4 << 20, &[(0, vec![1; 512])]);
        let y = build(o, 4 << 20, &[(0, vec![1; 512])]);
        let z = build(o, 4 << 20, &[(0, vec![2; 512])]);
        assert_eq!(x[68..84], y[68..84]);
        assert_ne!(x[68..84], z[68..84]);
    }
}
