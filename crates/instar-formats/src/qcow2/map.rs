//! qcow2 block status: qemu's `qcow2_get_host_offset` and
//! `qcow2_co_block_status` over the L1/L2 tables, subclusters included.
//!
//! L2 entries are read only for the clusters a query covers, through
//! [`Files`] (whose cache batches neighbouring tables into one host read);
//! memory is the L1 table (at most qemu's 32 MiB) plus one query's entries.

use super::header::{CRYPT_NONE, EXTL2_SUBCLUSTERS};
use super::tables::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::{Encryption, Qcow2Image};
use crate::bytes::be64;
use crate::limits::TABLE_CHUNK;
use crate::map::{Extent, HostRef, MapImage, Mapping};
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};

/// qemu's QCow2SubclusterType.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Normal,
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    UnallocatedPlain,
    UnallocatedAlloc,
    Invalid,
}

/// L2 entries decoded per step of a run (the read itself goes through the
/// [`Files`] cache, which fetches far larger chunks).
const L2_BATCH: usize = 256;

/// `%#x` as C prints it: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// A qcow2 corruption found during I/O, as qemu reports it: the driver's
/// own stderr line (the image is open read-only, so qemu cannot mark it
/// corrupt and calls it non-fatal), then qemu-img's "Could not read file
/// metadata". The line is complete: it has no `qemu-img: ` prefix.
pub fn corruption(message: &str) -> ImageError {
    ImageError::operation("Could not read file metadata: Input/output error").with_warnings(vec![
        format!(
            "qcow2: Image is corrupt: {message}; further non-fatal corruption events will be suppressed"
        ),
    ])
}

/// A qcow2 image opened for block status.
pub struct Qcow2Map {
    image: Qcow2Image,
    l1: Vec<u64>,
    /// Where data clusters live: the image, or its external data file.
    data_file: FileId,
    backing: Option<String>,
    backing_format: Option<String>,
    /// qemu's `metadata_preallocation`, found on the first query.
    preallocated: Option<bool>,
    /// What qemu prints on stderr while opening (stale bitmaps).
    warnings: Vec<String>,
    /// Compressed-cluster state, made on the first compressed read.
    decompressor: Option<super::read::Decompressor>,
}

impl Qcow2Map {
    /// Open as qemu-img map does (a full read-only open: the data file is
    /// opened, the L1 table loaded).
    pub fn open(files: &mut dyn Files, file: FileId) -> Result<Self> {
        let image = Qcow2Image::open(files, file)?;
        let h = &image.header;
        if h.crypt_method != CRYPT_NONE {
            // A full open needs the key; instar takes none.
            return Err(ImageError::open(match image.encryption {
                Encryption::Aes => "Parameter 'encrypt.key-secret' is required for cipher",
                _ => "Parameter 'encrypt.key-secret' is required for cipher",
            }));
        }
        let data_file = if image.has_data_file() {
            match image.extensions.data_file.clone() {
                // qemu opens the data file by its stored name as is, not
                // relative to the image.
                Some(name) => files.open_as_given(&name)?,
                None => return Err(ImageError::open("'data-file' is required for this image")),
            }
        } else {
            file
        };
        let count = h.l1_size as usize;
        let mut l1 = Vec::with_capacity(count);
        let per = TABLE_CHUNK / 8;
        let mut at = 0usize;
        while at < count {
            let n = (count - at).min(per);
            l1.extend(super::tables::read_entries(
                files,
                file,
                h.l1_table_offset,
                at as u64,
                n,
            )?);
            at += n;
        }
        let backing = image.backing_file.clone().filter(|b| !b.is_empty());
        let warnings = image.info().warnings;
        let backing_format = image.extensions.backing_format.clone();
        Ok(Self {
            image,
            l1,
            data_file,
            backing,
            backing_format,
            preallocated: None,
            warnings,
            decompressor: None,
        })
    }

    /// Read the internal snapshot `id_or_name` instead of the active state,
    /// as qemu's `bdrv_snapshot_load_tmp_by_id_or_name` does for
    /// `convert -l`: its L1 table replaces the active one (an id match
    /// first, then a name match); the virtual size stays the image's.
    pub fn use_snapshot(&mut self, files: &mut dyn Files, id_or_name: &str) -> Result<()> {
        let sn = self
            .image
            .snapshots
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| self.image.snapshots.iter().find(|s| s.name == id_or_name))
            .ok_or_else(|| ImageError::open("Failed to load snapshot: Can't find snapshot"))?;
        let (offset, count) = (sn.l1_table_offset, sn.l1_size as u64);
        if count > crate::limits::QCOW2_MAX_L1_BYTES / 8 {
            return Err(ImageError::open(
                "Failed to load snapshot: Snapshot L1 table too large",
            ));
        }
        if (i64::MAX as u64 - count * 8) < offset
            || offset & (self.image.header.cluster_size() - 1) != 0
        {
            return Err(ImageError::open(
                "Failed to load snapshot: Snapshot L1 table offset invalid",
            ));
        }
        let mut l1 = Vec::with_capacity(count as usize);
        let per = (TABLE_CHUNK / 8) as u64;
        let mut at = 0u64;
        while at < count {
            let n = (count - at).min(per);
            let entries =
                super::tables::read_entries(files, self.image.file, offset, at, n as usize)
                    .map_err(|_| {
                        ImageError::open(
                            "Failed to load snapshot: Failed to read l1 table for snapshot",
                        )
                    })?;
            l1.extend(entries);
            at += n;
        }
        self.l1 = l1;
        Ok(())
    }

    /// The L2 entry of the cluster holding guest `offset` (0 when none).
    fn l2_entry(&self, files: &mut dyn Files, offset: u64) -> Result<u64> {
        let h = &self.image.header;
        let (cb, l2_bits) = (h.cluster_bits, h.l2_bits());
        let l1_index = offset >> (cb + l2_bits);
        let l2_index = (offset >> cb) & ((1u64 << l2_bits) - 1);
        let l2_offset = self.l1.get(l1_index as usize).copied().unwrap_or(0) & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(0);
        }
        Ok(self.read_l2(files, l2_offset, l2_index, 1)?[0].0)
    }

    /// qemu's `qcow2_detect_metadata_preallocation`: far more clusters in
    /// use (refcount > 0) than the file occupies on disk means data
    /// clusters were preallocated as holes, and block status must ask the
    /// file. Errors count as "no", as in qemu.
    fn metadata_preallocated(&mut self, files: &mut dyn Files) -> bool {
        if let Some(p) = self.preallocated {
            return p;
        }
        let p = self.detect_preallocation(files).unwrap_or(false);
        self.preallocated = Some(p);
        p
    }

    fn detect_preallocation(&self, files: &mut dyn Files) -> Result<bool> {
        let h = &self.image.header;
        let file = self.image.file;
        let cs = h.cluster_size();
        let file_length = files.len(file)?;
        let real_clusters = files.allocated(file)? / cs;
        let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters.saturating_add(2));
        let end_cluster = file_length.div_ceil(cs);
        // Refcount entries per block: cluster bytes * 8 / width.
        let rb_bits = h.cluster_bits + 3 - h.refcount_order;
        let width = h.refcount_bits();
        let table_entries = h.refcount_table_clusters as u64 * cs / 8;
        let mut count = 0u64;
        let mut cluster = 0u64;
        let mut block: Option<(u64, Vec<u8>)> = None;
        while cluster < end_cluster && count < threshold {
            let index = cluster >> rb_bits;
            if index >= table_entries {
                break;
            }
            let entry =
                super::tables::read_entries(files, file, h.refcount_table_offset, index, 1)?;
            let rb = entry[0] & super::tables::REFT_OFFSET_MASK;
            let per_block = 1u64 << rb_bits;
            let span_end = ((index + 1) << rb_bits).min(end_cluster);
            if rb == 0 {
                cluster = span_end;
                continue;
            }
            if rb & (cs - 1) != 0 {
                return Err(ImageError::operation("unaligned refcount block"));
            }
            if block.as_ref().map(|b| b.0) != Some(rb) {
                let mut buf = vec![0u8; cs as usize];
                files.read_at(file, rb, &mut buf)?;
                block = Some((rb, buf));
            }
            let buf = &block.as_ref().expect("just loaded").1;
            while cluster < span_end && count < threshold {
                let i = (cluster & (per_block - 1)) as usize;
                let refcount: u64 = match width {
                    1 | 2 | 4 => {
                        // Sub-byte entries are packed from the low bits.
                        let w = width as usize;
                        let byte = buf[i * w / 8];
                        u64::from((byte >> (i * w % 8)) & (((1u16 << w) - 1) as u8))
                    }
                    8 => u64::from(buf[i]),
                    16 => u64::from(u16::from_be_bytes([buf[2 * i], buf[2 * i + 1]])),
                    32 => u64::from(crate::bytes::be32(buf, 4 * i)),
                    _ => be64(buf, 8 * i),
                };
                count += u64::from(refcount != 0);
                cluster += 1;
            }
        }
        Ok(count >= threshold)
    }

    fn cluster_type(&self, entry: u64) -> Sub {
        let h = &self.image.header;
        if entry & OFLAG_COMPRESSED != 0 {
            Sub::Compressed
        } else if entry & OFLAG_ZERO != 0 && !h.has_subclusters() {
            if entry & L2E_OFFSET_MASK != 0 {
                Sub::ZeroAlloc
            } else {
                Sub::ZeroPlain
            }
        } else if entry & L2E_OFFSET_MASK == 0 {
            // Offset 0 is valid in an external data file; refcount-one
            // (COPIED) tells an allocated cluster there from a hole.
            if self.image.has_data_file() && entry & OFLAG_COPIED != 0 {
                Sub::Normal
            } else {
                Sub::UnallocatedPlain
            }
        } else {
            Sub::Normal
        }
    }

    /// qemu's `qcow2_get_subcluster_type`.
    fn sub_type(&self, entry: u64, bitmap: u64, sc: u32) -> Sub {
        if !self.image.header.has_subclusters() {
            return self.cluster_type(entry);
        }
        let alloc = 1u64 << sc;
        let zero = 1u64 << (sc + 32);
        match self.cluster_type(entry) {
            Sub::Compressed => Sub::Compressed,
            Sub::Normal => {
                if (bitmap >> 32) & bitmap != 0 {
                    Sub::Invalid
                } else if bitmap & zero != 0 {
                    Sub::ZeroAlloc
                } else if bitmap & alloc != 0 {
                    Sub::Normal
                } else {
                    Sub::UnallocatedAlloc
                }
            }
            _ => {
                if bitmap & 0xffff_ffff != 0 {
                    Sub::Invalid
                } else if bitmap & zero != 0 {
                    Sub::ZeroPlain
                } else {
                    Sub::UnallocatedPlain
                }
            }
        }
    }

    /// qemu's `qcow2_get_subcluster_range_type`: the type at `from` and
    /// how many subclusters from there share it.
    fn range_type(&self, entry: u64, bitmap: u64, from: u32) -> Option<(Sub, u32)> {
        let ty = self.sub_type(entry, bitmap, from);
        let spc = self.subclusters_per_cluster();
        if ty == Sub::Invalid {
            return None;
        }
        if !self.image.header.has_subclusters() || ty == Sub::Compressed {
            return Some((ty, spc - from));
        }
        // Bits below `from` count as "same" so the run starts at `from`.
        let below = if from == 0 { 0 } else { (1u32 << from) - 1 };
        let n = match ty {
            Sub::Normal => ((bitmap as u32) | below).trailing_ones() - from,
            Sub::ZeroPlain | Sub::ZeroAlloc => {
                (((bitmap >> 32) as u32) | below).trailing_ones() - from
            }
            _ => ((((bitmap >> 32) as u32) | bitmap as u32) & !below).trailing_zeros() - from,
        };
        Some((ty, n))
    }

    fn subclusters_per_cluster(&self) -> u32 {
        if self.image.header.has_subclusters() {
            EXTL2_SUBCLUSTERS
        } else {
            1
        }
    }

    fn subcluster_bits(&self) -> u32 {
        let h = &self.image.header;
        if h.has_subclusters() {
            h.cluster_bits - 5
        } else {
            h.cluster_bits
        }
    }

    /// Entries (and bitmaps) `first..first + count` of the L2 table at
    /// `l2_offset`.
    fn read_l2(
        &self,
        files: &mut dyn Files,
        l2_offset: u64,
        first: u64,
        count: usize,
    ) -> Result<Vec<(u64, u64)>> {
        let size = self.image.header.l2_entry_size();
        let at = l2_offset
            .checked_add(first * size)
            .ok_or_else(|| ImageError::operation("L2 table offset overflow"))?;
        let mut buf = vec![0u8; count * size as usize];
        files.read_at(self.image.file, at, &mut buf)?;
        Ok(buf
            .chunks_exact(size as usize)
            .map(|c| (be64(c, 0), if size == 16 { be64(c, 8) } else { 0 }))
            .collect())
    }
}

impl MapImage for Qcow2Map {
    fn format(&self) -> &'static str {
        "qcow2"
    }
    fn virtual_size(&self) -> u64 {
        self.image.header.virtual_size()
    }
    fn backing(&self) -> Option<(&str, Option<&str>)> {
        self.backing
            .as_deref()
            .map(|b| (b, self.backing_format.as_deref()))
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn load_snapshot(&mut self, files: &mut dyn Files, id_or_name: &str) -> Result<()> {
        self.use_snapshot(files, id_or_name)
    }

    fn read(&mut self, files: &mut dyn Files, offset: u64, buf: &mut [u8]) -> Result<()> {
        let h = &self.image.header;
        let (cb, cs, ctype) = (h.cluster_bits, h.cluster_size(), h.compression_type);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let within = (at & (cs - 1)) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            let entry = self.l2_entry(files, at)?;
            if entry & OFLAG_COMPRESSED == 0 {
                return Err(ImageError::operation(
                    "internal error: read of a cluster that is not compressed",
                ));
            }
            let file = self.image.file;
            let d = self
                .decompressor
                .get_or_insert_with(|| super::read::Decompressor::new(cs));
            let cluster = d.cluster(files, file, entry, cb, ctype)?;
            buf[done..done + n].copy_from_slice(&cluster[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn block_status(&mut self, files: &mut dyn Files, offset: u64, len: u64) -> Result<Extent> {
        let h = &self.image.header;
        let cb = h.cluster_bits;
        let cs = 1u64 << cb;
        let l2_bits = h.l2_bits();
        let l2_size = 1u64 << l2_bits;
        let in_cluster = offset & (cs - 1);
        let l2_index = (offset >> cb) & (l2_size - 1);
        let l1_index = offset >> (cb + l2_bits);
        // qemu caps one query at INT_MAX bytes.
        let len = len.min(i32::MAX as u64);
        let needed = len + in_cluster;
        let available = ((l2_size - l2_index) << cb).min(needed);
        let l2e = self.l1.get(l1_index as usize).copied().unwrap_or(0);
        let l2_offset = l2e & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Extent::new(
                available - in_cluster,
                Mapping::Unallocated { at: None },
            ));
        }
        if l2_offset & (cs - 1) != 0 {
            return Err(corruption(&format!(
                "L2 table offset {} unaligned (L1 index: {})",
                hex(l2_offset),
                hex(l1_index)
            )));
        }
        let nb = needed.div_ceil(cs).min(l2_size - l2_index) as usize;
        // Entries are read in small batches as the run goes on: most runs
        // end long before the L2 table does, and decoding a whole table
        // per query would cost more than the walk.
        let mut entries = self.read_l2(files, l2_offset, l2_index, nb.min(L2_BATCH))?;
        let (entry, bitmap) = entries[0];
        let sc_bits = self.subcluster_bits();
        let sc_index = ((offset >> sc_bits) & (self.subclusters_per_cluster() as u64 - 1)) as u32;
        let ty = self.sub_type(entry, bitmap, sc_index);
        let host_cluster = entry & L2E_OFFSET_MASK;
        if h.version < 3 && matches!(ty, Sub::ZeroPlain | Sub::ZeroAlloc) {
            return Err(corruption(&format!(
                "Zero cluster entry found in pre-v3 image (L2 offset: {}, L2 index: {})",
                hex(l2_offset),
                hex(l2_index)
            )));
        }
        match ty {
            Sub::Compressed if self.image.has_data_file() => {
                return Err(corruption(&format!(
                    "Compressed cluster entry found in image with external data file (L2 offset: {}, L2 index: {})",
                    hex(l2_offset),
                    hex(l2_index)
                )));
            }
            Sub::Normal | Sub::ZeroAlloc | Sub::UnallocatedAlloc => {
                if host_cluster & (cs - 1) != 0 {
                    return Err(corruption(&format!(
                        "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                        hex(host_cluster),
                        hex(l2_offset),
                        hex(l2_index)
                    )));
                }
                if self.image.has_data_file() && host_cluster != offset - in_cluster {
                    return Err(corruption(&format!(
                        "External data file host cluster offset {} does not match guest cluster offset: {}, L2 index: {})",
                        hex(host_cluster),
                        hex(offset - in_cluster),
                        hex(l2_index)
                    )));
                }
            }
            _ => {}
        }
        // qemu's count_contiguous_subclusters.
        let spc = self.subclusters_per_cluster();
        let mut count = 0u64;
        let mut expected_type = Sub::Normal;
        let mut check_offset = false;
        let mut expected_offset = 0u64;
        for i in 0..nb {
            if i == entries.len() {
                let more = (nb - i).min(L2_BATCH);
                let next = self.read_l2(files, l2_offset, l2_index + i as u64, more)?;
                entries.extend(next);
            }
            let (e, b) = entries[i];
            let first = if i == 0 { sc_index } else { 0 };
            let Some((t, n)) = self.range_type(e, b, first) else {
                return Err(corruption(&format!(
                    "Invalid cluster entry found  (L2 offset: {}, L2 index: {})",
                    hex(l2_offset),
                    hex(l2_index + i as u64)
                )));
            };
            if i == 0 {
                if t == Sub::Compressed {
                    count = n as u64;
                    break;
                }
                expected_type = t;
                expected_offset = e & L2E_OFFSET_MASK;
                check_offset = matches!(t, Sub::Normal | Sub::ZeroAlloc | Sub::UnallocatedAlloc);
            } else if t != expected_type {
                break;
            } else if check_offset {
                expected_offset = expected_offset.wrapping_add(cs);
                if expected_offset != e & L2E_OFFSET_MASK {
                    break;
                }
            }
            count += n as u64;
            if first + n < spc {
                break;
            }
        }
        let available = ((count + sc_index as u64) << sc_bits).min(needed);
        let length = available - in_cluster;
        let at = HostRef {
            file: self.data_file,
            offset: host_cluster + in_cluster,
        };
        let mapping = match ty {
            Sub::Normal => Mapping::Data { at },
            Sub::Compressed => Mapping::Compressed,
            Sub::ZeroPlain => Mapping::Zero { at: None },
            Sub::ZeroAlloc => Mapping::Zero { at: Some(at) },
            Sub::UnallocatedPlain => Mapping::Unallocated { at: None },
            Sub::UnallocatedAlloc => Mapping::Unallocated { at: Some(at) },
            // The count above reports it first; kept for totality.
            Sub::Invalid => {
                return Err(corruption(&format!(
                    "Invalid cluster entry found  (L2 offset: {}, L2 index: {})",
                    hex(l2_offset),
                    hex(l2_index)
                )))
            }
        };
        let recurse = matches!(mapping, Mapping::Data { .. }) && self.metadata_preallocated(files);
        Ok(Extent {
            length,
            mapping,
            recurse,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::{Qcow2Header, HEADER_SIZE, INCOMPAT_EXTL2};
    use super::*;
    use crate::MemFiles;

    const L2: u64 = 0x40000;

    /// `qemu-img create -f qcow2 x 64M` layout: 64 KiB clusters, refcount
    /// table at 0x10000, L1 (one entry) at 0x30000, one L2 table at 0x40000
    /// with `entries` (pairs of entry and bitmap; the bitmap is written only
    /// with extended L2).
    fn image(extl2: bool, entries: &[(u64, u64)]) -> Vec<u8> {
        let h = Qcow2Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 64 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if extl2 { INCOMPAT_EXTL2 } else { 0 },
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
        };
        let mut b = vec![0u8; 0x60000];
        b[..HEADER_SIZE].copy_from_slice(&h.encode());
        b[0x30000..0x30008].copy_from_slice(&(L2 | OFLAG_COPIED).to_be_bytes());
        let size = if extl2 { 16 } else { 8 };
        for (i, (e, bm)) in entries.iter().enumerate() {
            let at = L2 as usize + i * size;
            b[at..at + 8].copy_from_slice(&e.to_be_bytes());
            if extl2 {
                b[at + 8..at + 16].copy_from_slice(&bm.to_be_bytes());
            }
        }
        b
    }

    fn status(img: Vec<u8>, offset: u64, len: u64) -> Result<Extent> {
        let mut f = MemFiles::new(img);
        let mut m = Qcow2Map::open(&mut f, 0)?;
        m.block_status(&mut f, offset, len)
    }

    fn data(offset: u64) -> Mapping {
        Mapping::Data {
            at: HostRef { file: 0, offset },
        }
    }

    #[test]
    fn contiguous_clusters_make_one_run() {
        let c = OFLAG_COPIED;
        let img = image(
            false,
            &[(c | 0x50000, 0), (c | 0x60000, 0), (c | 0x80000, 0)],
        );
        let e = status(img.clone(), 0, 64 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (0x20000, data(0x50000)));
        // From the middle of a cluster, to the end of the run.
        let e = status(img.clone(), 0x1234, 64 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (0x20000 - 0x1234, data(0x51234)));
        // Never past what was asked.
        assert_eq!(status(img, 0, 100).unwrap().length, 100);
    }

    #[test]
    fn zero_compressed_unallocated() {
        let comp = OFLAG_COMPRESSED | (3u64 << 54) | 0x70000;
        let img = image(false, &[(1, 0), (0x50001, 0), (comp, 0), (comp, 0), (0, 0)]);
        let e = status(img.clone(), 0, 64 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (0x10000, Mapping::Zero { at: None }));
        let e = status(img.clone(), 0x10000, 64 << 20).unwrap();
        let at = Some(HostRef {
            file: 0,
            offset: 0x50000,
        });
        assert_eq!((e.length, e.mapping), (0x10000, Mapping::Zero { at }));
        // Compressed clusters come one at a time.
        let e = status(img.clone(), 0x20000, 64 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (0x10000, Mapping::Compressed));
        // The rest of the L2 table is unallocated.
        let e = status(img, 0x40000, (64 << 20) - 0x40000).unwrap();
        assert_eq!(
            (e.length, e.mapping),
            ((64 << 20) - 0x40000, Mapping::Unallocated { at: None })
        );
    }

    #[test]
    fn unallocated_l1_entry_spans_its_l2_table() {
        let mut img = image(false, &[]);
        img[0x30000..0x30008].fill(0);
        let e = status(img, 0, 1 << 40).unwrap();
        // One L2 table of 8192 entries maps 512 MiB.
        assert_eq!(
            (e.length, e.mapping),
            (512 << 20, Mapping::Unallocated { at: None })
        );
    }

    #[test]
    fn subclusters() {
        // Subclusters 0-3 allocated, 4-5 zero, the rest unallocated.
        let bitmap = 0xf | (0x30 << 32);
        let img = image(true, &[(OFLAG_COPIED | 0x50000, bitmap)]);
        let sc = 0x10000 / 32;
        let e = status(img.clone(), 0, 64 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (4 * sc, data(0x50000)));
        let e = status(img.clone(), 4 * sc, 64 << 20).unwrap();
        let at = Some(HostRef {
            file: 0,
            offset: 0x50000 + 4 * sc,
        });
        assert_eq!((e.length, e.mapping), (2 * sc, Mapping::Zero { at }));
        let e = status(img, 6 * sc, 64 << 20).unwrap();
        let at = Some(HostRef {
            file: 0,
            offset: 0x50000 + 6 * sc,
        });
        assert_eq!(
            (e.length, e.mapping),
            (26 * sc, Mapping::Unallocated { at })
        );
    }

    fn corrupt_line(e: ImageError) -> String {
        assert_eq!(
            e.message,
            "Could not read file metadata: Input/output error"
        );
        e.warnings.concat()
    }

    #[test]
    fn hostile_entries() {
        // qemu-img 10.0.2 map of safe/qcow2/check/qcow2-l2-unaligned.qcow2.
        let img = image(false, &[(OFLAG_COPIED | 0x50200, 0)]);
        assert_eq!(
            corrupt_line(status(img, 0, 1 << 20).unwrap_err()),
            "qcow2: Image is corrupt: Cluster allocation offset 0x50200 unaligned \
             (L2 offset: 0x40000, L2 index: 0); further non-fatal corruption events will be suppressed"
        );
        let mut img = image(false, &[]);
        img[0x30000..0x30008].copy_from_slice(&(0x40200u64).to_be_bytes());
        assert!(corrupt_line(status(img, 0, 1 << 20).unwrap_err())
            .contains("L2 table offset 0x40200 unaligned (L1 index: 0)"));
        // Data past the end of the file is reported where the table says:
        // block status does not read it.
        let far = 0x00ff_ffff_ffff_0000;
        let img = image(false, &[(far, 0)]);
        assert_eq!(status(img, 0, 1 << 20).unwrap().mapping, data(far));
        // A compressed entry with every size bit set is still one cluster.
        let img = image(
            false,
            &[(OFLAG_COMPRESSED | (0xffu64 << 54) | 0x3f_ffff_ffff_ffff, 0)],
        );
        let e = status(img, 0, 1 << 20).unwrap();
        assert_eq!((e.length, e.mapping), (0x10000, Mapping::Compressed));
        // Both the allocated and the zero bit of one subcluster: invalid.
        let img = image(true, &[(OFLAG_COPIED | 0x50000, 1 | (1 << 32))]);
        assert!(corrupt_line(status(img, 0, 1 << 20).unwrap_err())
            .contains("Invalid cluster entry found  (L2 offset: 0x40000, L2 index: 0)"));
    }
}
