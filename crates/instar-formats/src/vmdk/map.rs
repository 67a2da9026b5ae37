//! VMDK block status and reads: qemu's `vmdk_co_block_status`,
//! `get_cluster_offset` and `vmdk_read_extent` over every extent kind
//! `info` accepts.
//!
//! Flat extents are data at their file offset (BDRV_BLOCK_RECURSE: the
//! file's holes are zeros). Sparse extents (VMDK4, VMDK3/COWD, seSparse)
//! look a grain up through the grain directory and a grain table: data, a
//! zeroed grain (BDRV_BLOCK_ZERO), or unallocated (the parent named by
//! parentFileNameHint decides). Grains of streamOptimized extents are
//! compressed: block status says so and [`MapImage::read`] inflates them.
//! Table entries are read on demand through a [`Window`] per file.

use super::Extent as VmdkExtent;
use crate::bytes::Window;
use crate::map::{Extent, HostRef, MapImage, Mapping};
use crate::{Files, Result};
use alloc::string::String;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// Grain table entry of a zeroed grain (VMDK_GTE_ZEROED).
const GTE_ZEROED: u64 = 1;
/// A compressed grain's marker: the guest sector (8 bytes) and the
/// compressed size (4 bytes) before the data.
const MARKER_SIZE: usize = 12;

/// What `get_cluster_offset` found for one grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    /// VMDK_OK: the grain (flat extents: the extent) starts here.
    At(u64),
    Zeroed,
    Unallocated,
    /// VMDK_ERROR.
    Error,
}

/// A VMDK image opened for block status.
pub struct VmdkMap {
    size: u64,
    extents: Vec<VmdkExtent>,
    backing: Option<String>,
    /// Table reads per extent file: one window for grain directories,
    /// one for grain tables, so that walking both never thrashes.
    windows: Vec<(FileId, bool, Window)>,
    /// Reusable inflate state, input and output of compressed grains.
    inflate: Option<Inflate>,
}

struct Inflate {
    state: alloc::boxed::Box<DecompressorOxide>,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes the grain now in `output` decompressed to, and where it is.
    cached: Option<(u64, FileId, usize)>,
}

fn eio() -> ImageError {
    ImageError::operation("Could not read file metadata: Input/output error")
}

impl VmdkMap {
    /// Open as qemu does: the descriptor, every extent, the parent's name.
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let (info, extents) = super::parse(files, file, filename)?;
        for e in &extents {
            // qemu divides by these (a zero crashes it); real images never
            // have one.
            if e.cluster_sectors == 0 || (!e.flat && (e.l1_entry_sectors == 0 || e.l2_size == 0)) {
                return Err(ImageError::limit(alloc::format!(
                    "VMDK extent '{}' has a zero grain or grain table size",
                    e.display
                )));
            }
        }
        Ok(Self {
            size: info.virtual_size,
            extents,
            backing: info.backing_filename.filter(|b| !b.is_empty()),
            windows: Vec::new(),
            inflate: None,
        })
    }

    fn read_table(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        directory: bool,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let i = match self
            .windows
            .iter()
            .position(|(f, d, _)| *f == file && *d == directory)
        {
            Some(i) => i,
            None => {
                self.windows.push((file, directory, Window::new()));
                self.windows.len() - 1
            }
        };
        self.windows[i].2.read(files, file, offset, out)
    }

    /// qemu's `find_extent`: the first extent ending after `sector`.
    fn find_extent(&self, sector: u64) -> Option<usize> {
        let sector = i64::try_from(sector).ok()?;
        self.extents.iter().position(|e| sector < e.end_sector)
    }

    /// Byte offset of guest `offset` inside extent `e`, and inside its
    /// grain (`vmdk_find_offset_in_cluster`), as C's wrapping arithmetic.
    fn offsets(e: &VmdkExtent, offset: u64) -> (u64, u64) {
        let begin = (e.end_sector.wrapping_sub(e.sectors) as u64).wrapping_mul(512);
        let rel = offset.wrapping_sub(begin);
        (rel, rel % e.cluster_sectors.wrapping_mul(512).max(1))
    }

    /// qemu's `get_cluster_offset` without allocation, and whether the
    /// whole grain directory entry is unallocated.
    fn grain(&mut self, files: &mut dyn Files, ei: usize, offset: u64) -> Result<(Grain, bool)> {
        Ok(match self.grain_inner(files, ei, offset)? {
            None => (Grain::Unallocated, true),
            Some(g) => (g, false),
        })
    }

    /// `None`: the grain directory entry is 0.
    fn grain_inner(
        &mut self,
        files: &mut dyn Files,
        ei: usize,
        offset: u64,
    ) -> Result<Option<Grain>> {
        let e = &self.extents[ei];
        if e.flat {
            return Ok(Some(Grain::At(e.flat_offset)));
        }
        let (rel, _) = Self::offsets(e, offset);
        let sector = rel >> 9;
        let l1_index = sector / u64::from(e.l1_entry_sectors);
        if l1_index >= u64::from(e.l1_size) {
            return Ok(Some(Grain::Error));
        }
        let (file, l1_offset, l2_size, cluster_sectors) =
            (e.file, e.l1_offset, u64::from(e.l2_size), e.cluster_sectors);
        let sesparse = e.sesparse;
        let has_zero_grain = e.has_zero_grain;
        let entry_size: u64 = if sesparse.is_some() { 8 } else { 4 };
        let mut buf = [0u8; 8];
        let n = entry_size as usize;
        self.read_table(
            files,
            file,
            true,
            l1_offset.wrapping_add(l1_index * entry_size),
            &mut buf[..n],
        )?;
        let l1 = u64::from_le_bytes(buf);
        let l2_offset: u64 = match sesparse {
            Some((tables, _)) => {
                if l1 == 0 {
                    0
                } else if l1 & 0xffff_ffff_0000_0000 != 0x1000_0000_0000_0000 {
                    return Ok(Some(Grain::Error));
                } else {
                    let at = tables.wrapping_add((l1 & 0xffff_ffff) * (l2_size * 8) / 512);
                    if at > 0xffff_ffff {
                        return Ok(Some(Grain::Error));
                    }
                    at
                }
            }
            None => l1,
        };
        if l2_offset == 0 {
            return Ok(None);
        }
        let l2_index = (sector / cluster_sectors) % l2_size;
        let mut buf = [0u8; 8];
        self.read_table(
            files,
            file,
            false,
            l2_offset * 512 + l2_index * entry_size,
            &mut buf[..n],
        )?;
        let mut cluster_sector = u64::from_le_bytes(buf);
        let mut zeroed = false;
        if let Some((_, grains)) = sesparse {
            match cluster_sector >> 60 {
                0 => {
                    if cluster_sector != 0 {
                        return Ok(Some(Grain::Error));
                    }
                }
                // SCSI-unmapped and zero grains.
                1 | 2 => zeroed = true,
                3 => {
                    let index = ((cluster_sector & 0x0fff_0000_0000_0000) >> 48)
                        | ((cluster_sector & 0x0000_ffff_ffff_ffff) << 12);
                    cluster_sector = grains.wrapping_add(index.wrapping_mul(cluster_sectors));
                }
                _ => return Ok(Some(Grain::Error)),
            }
        }
        if has_zero_grain && cluster_sector == GTE_ZEROED {
            zeroed = true;
        }
        if zeroed {
            return Ok(Some(Grain::Zeroed));
        }
        if cluster_sector == 0 {
            return Ok(Some(Grain::Unallocated));
        }
        Ok(Some(Grain::At(cluster_sector.wrapping_shl(9))))
    }

    /// One grain's answer: what it is, and how many bytes from `offset`
    /// it covers.
    fn grain_status(
        &mut self,
        files: &mut dyn Files,
        offset: u64,
    ) -> Result<(usize, Grain, u64, u64)> {
        let ei = self.find_extent(offset >> 9).ok_or_else(eio)?;
        let (g, whole_table) = self.grain(files, ei, offset)?;
        let e = &self.extents[ei];
        let (rel, in_cluster) = Self::offsets(e, offset);
        let mut n = e.cluster_sectors.wrapping_mul(512).wrapping_sub(in_cluster);
        if whole_table {
            // Every grain of this directory entry is unallocated: answer
            // them at once, up to the extent's end.
            let span = u64::from(e.l1_entry_sectors) * 512;
            let to_table_end = span - rel % span;
            let to_extent_end = (e.end_sector as u64).wrapping_mul(512).wrapping_sub(offset);
            n = n.max(to_table_end.min(to_extent_end));
        }
        Ok((ei, g, in_cluster, n))
    }

    /// The decompressed grain at host `at` of extent `ei`: qemu's
    /// `vmdk_read_extent` for compressed extents. Errors are qemu's EINVAL.
    fn inflate_grain(&mut self, files: &mut dyn Files, ei: usize, at: u64) -> Result<&[u8]> {
        let e = &self.extents[ei];
        let (file, has_marker) = (e.file, e.has_marker);
        // info limits grains to 0x200000 sectors (1 GiB); real ones are
        // 64 KiB.
        let cluster_bytes = usize::try_from(e.cluster_sectors * 512)
            .map_err(|_| ImageError::limit("VMDK grain does not fit in memory"))?;
        let inf = self.inflate.get_or_insert_with(|| Inflate {
            state: alloc::boxed::Box::default(),
            input: Vec::new(),
            output: Vec::new(),
            cached: None,
        });
        if let Some((c_at, c_file, len)) = inf.cached {
            if c_at == at && c_file == file {
                return Ok(&inf.output[..len]);
            }
        }
        inf.cached = None;
        let invalid = || ImageError::operation("Invalid argument");
        // Two grains are read in case marker and data exceed one.
        let buf_bytes = cluster_bytes * 2;
        inf.input.resize(buf_bytes, 0);
        files.read_at(file, at, &mut inf.input)?;
        let (data, data_len) = if has_marker {
            let size =
                u32::from_le_bytes([inf.input[8], inf.input[9], inf.input[10], inf.input[11]])
                    as usize;
            (MARKER_SIZE, size)
        } else {
            (0, cluster_bytes)
        };
        if data_len == 0 || data_len > buf_bytes {
            return Err(invalid());
        }
        // The marker's size may run past the two grains read (the missing
        // bytes are whatever followed in qemu's buffer: never valid data).
        let end = (data + data_len).min(buf_bytes);
        inf.output.resize(cluster_bytes, 0);
        // zlib's uncompress(): a zlib stream that must end within the
        // output buffer.
        inf.state.init();
        let flags = inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER
            | inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
            | inflate_flags::TINFL_FLAG_COMPUTE_ADLER32;
        let (status, _, written) = decompress(
            &mut inf.state,
            &inf.input[data..end],
            &mut inf.output,
            0,
            flags,
        );
        if status != TINFLStatus::Done {
            return Err(invalid());
        }
        inf.cached = Some((at, file, written));
        Ok(&inf.output[..written])
    }
}

impl MapImage for VmdkMap {
    fn format(&self) -> &'static str {
        "vmdk"
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn backing(&self) -> Option<(&str, Option<&str>)> {
        self.backing.as_deref().map(|b| (b, Some("vmdk")))
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn block_status(&mut self, files: &mut dyn Files, offset: u64, len: u64) -> Result<Extent> {
        let (ei, g, in_cluster, n) = self.grain_status(files, offset)?;
        let e = &self.extents[ei];
        let (file, flat, compressed) = (e.file, e.flat, e.compressed);
        let first = match g {
            Grain::Error => return Err(eio()),
            Grain::Unallocated => Mapping::Unallocated { at: None },
            Grain::Zeroed => Mapping::Zero { at: None },
            Grain::At(_) if compressed => Mapping::Compressed,
            Grain::At(c) => Mapping::Data {
                at: HostRef {
                    file,
                    offset: c.wrapping_add(in_cluster),
                },
            },
        };
        let mut length = n.min(len);
        // Following grains of the same kind (data continuing on the host)
        // merge in qemu-img; answering them together saves calls. A flat
        // extent is one grain.
        while length < len && !flat {
            let at = offset + length;
            let (ei2, g2, in2, n2) = self.grain_status(files, at)?;
            let e2 = &self.extents[ei2];
            let next = match g2 {
                Grain::Error => break,
                Grain::Unallocated => Mapping::Unallocated { at: None },
                Grain::Zeroed => Mapping::Zero { at: None },
                Grain::At(_) if e2.compressed => Mapping::Compressed,
                Grain::At(c) => Mapping::Data {
                    at: HostRef {
                        file: e2.file,
                        offset: c.wrapping_add(in2),
                    },
                },
            };
            let same = match (first, next) {
                (Mapping::Data { at: a }, Mapping::Data { at: b }) => {
                    a.file == b.file && a.offset.wrapping_add(length) == b.offset
                }
                (a, b) => a == b,
            };
            if !same || e2.flat {
                break;
            }
            length += n2.min(len - length);
        }
        Ok(Extent {
            length,
            mapping: first,
            recurse: flat,
        })
    }
    fn read(&mut self, files: &mut dyn Files, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (ei, g, in_cluster, n) = self.grain_status(files, at)?;
            let n = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match g {
                Grain::At(host) if self.extents[ei].compressed => {
                    let grain = self.inflate_grain(files, ei, host)?;
                    let start = usize::try_from(in_cluster).unwrap_or(usize::MAX);
                    match start.checked_add(n).filter(|&end| end <= grain.len()) {
                        Some(end) => out.copy_from_slice(&grain[start..end]),
                        None => return Err(ImageError::operation("Invalid argument")),
                    }
                }
                Grain::At(host) => {
                    files.read_at(self.extents[ei].file, host.wrapping_add(in_cluster), out)?
                }
                _ => {
                    return Err(ImageError::operation(
                        "internal error: read of VMDK data that block status did not report",
                    ))
                }
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

    /// A monolithicSparse image of 4 grains (64 KiB) with one grain table:
    /// grain 0 data, grain 1 zeroed, grain 2 unallocated, grain 3 data.
    fn sparse(compressed: bool) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        let mut flags = 3u32 | (1 << 2);
        if compressed {
            flags |= 1 << 16;
        }
        h[8..12].copy_from_slice(&flags.to_le_bytes());
        h[12..20].copy_from_slice(&512u64.to_le_bytes()); // capacity: 4 grains
        h[20..28].copy_from_slice(&128u64.to_le_bytes()); // granularity
        h[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptor at 1
        h[36..44].copy_from_slice(&20u64.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&21u64.to_le_bytes()); // gd at sector 21
        h[64..72].copy_from_slice(&128u64.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        if compressed {
            h[77..79].copy_from_slice(&1u16.to_le_bytes());
        }
        let mut img = h;
        img.extend_from_slice(
            b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 512 SPARSE \"x.vmdk\"\n",
        );
        img.resize(128 * 512, 0);
        // gd at sector 21 -> gt at sector 22.
        img[21 * 512..21 * 512 + 4].copy_from_slice(&22u32.to_le_bytes());
        let gt = 22 * 512;
        for (i, v) in [128u32, 1, 0, 256].iter().enumerate() {
            img[gt + 4 * i..gt + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        img.resize(384 * 512, 0);
        for (sector, byte) in [(128usize, 0xaau8), (256, 0xbb)] {
            if compressed {
                let data = vec![byte; 65536];
                let z = miniz_oxide::deflate::compress_to_vec_zlib(&data, 6);
                let at = sector * 512;
                img[at + 8..at + 12].copy_from_slice(&(z.len() as u32).to_le_bytes());
                img[at + 12..at + 12 + z.len()].copy_from_slice(&z);
            } else {
                img[sector * 512..sector * 512 + 65536].fill(byte);
            }
        }
        img
    }

    fn runs(m: &mut VmdkMap, f: &mut MemFiles) -> Vec<(u64, Mapping)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < m.virtual_size() {
            let e = m.block_status(f, at, m.virtual_size() - at).unwrap();
            out.push((e.length, e.mapping));
            at += e.length;
        }
        out
    }

    #[test]
    fn grains_of_a_sparse_extent() {
        let mut f = MemFiles::new(sparse(false));
        let mut m = VmdkMap::open(&mut f, 0, "x.vmdk").unwrap();
        let data = |o| Mapping::Data {
            at: HostRef { file: 0, offset: o },
        };
        assert_eq!(
            runs(&mut m, &mut f),
            [
                (65536, data(65536)),
                (65536, Mapping::Zero { at: None }),
                (65536, Mapping::Unallocated { at: None }),
                (65536, data(131072)),
            ]
        );
        assert!(m.supports_backing() && m.backing().is_none());
    }

    #[test]
    fn compressed_grains_inflate() {
        let mut f = MemFiles::new(sparse(true));
        let mut m = VmdkMap::open(&mut f, 0, "x.vmdk").unwrap();
        let r = runs(&mut m, &mut f);
        assert_eq!(r[0], (65536, Mapping::Compressed));
        assert_eq!(r[3], (65536, Mapping::Compressed));
        let mut buf = vec![0u8; 1000];
        m.read(&mut f, 65536 * 3 + 100, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xbb));
        m.read(&mut f, 10, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xaa));
        // A corrupt stream is an error, never a panic.
        let mut bad = sparse(true);
        bad[128 * 512 + 20] ^= 0xff;
        let mut f = MemFiles::new(bad);
        let mut m = VmdkMap::open(&mut f, 0, "x.vmdk").unwrap();
        assert!(m.read(&mut f, 0, &mut buf).is_err());
    }

    #[test]
    fn hostile_tables_never_panic() {
        let img = sparse(true);
        // The header, the grain directory and table, a marker.
        let spots = (0..96)
            .chain(21 * 512..21 * 512 + 8)
            .chain(22 * 512..22 * 512 + 16);
        for at in spots.chain(128 * 512..128 * 512 + 16) {
            for v in [0u8, 0xff, 0x80] {
                let mut b = img.clone();
                b[at] = v;
                let mut f = MemFiles::new(b);
                let Ok(mut m) = VmdkMap::open(&mut f, 0, "x.vmdk") else {
                    continue;
                };
                let size = m.virtual_size();
                let mut o = 0;
                let mut calls = 0;
                while o < size && calls < 1000 {
                    calls += 1;
                    match m.block_status(&mut f, o, size - o) {
                        Ok(e) => {
                            if e.mapping == Mapping::Compressed {
                                let mut buf = vec![0u8; e.length.min(1 << 20) as usize];
                                let _ = m.read(&mut f, o, &mut buf);
                            }
                            o += e.length;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
