//! vmdk target: the five subformats qemu-img creates (monolithicSparse,
//! monolithicFlat, streamOptimized, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat), laid out byte for byte as qemu's
//! `vmdk_co_do_create`/`vmdk_init_extent` lay them out, with grains
//! allocated the way qemu's `get_cluster_offset` allocates them while
//! `qemu-img convert` writes in ascending order.
//!
//! Sparse extents: header, descriptor area (20 sectors), redundant grain
//! directory and its tables, grain directory and its tables, then grains
//! from the first 64 KiB boundary on. Both directories are written at
//! creation (qemu preallocates every grain table); a grain table is written
//! to both copies once the writer has moved past it, so only the current
//! table (2 KiB) and one partial grain are ever held.
//!
//! The descriptor is written last: its CID is a hash of what was written
//! (qemu draws a random one; the guest has no entropy source, and a CID only
//! has to change when the content does).

use super::{ImageWriter, Sink};
use crate::limits::VMDK_MAX_EXTENTS;
use crate::Result;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::convert::{VmdkAdapter, VmdkOptions, VmdkSubformat};
use instar_wire::{FormatSpecific, ImageError, ImageInfo, OutId};
use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};

const SECTOR: u64 = 512;
const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
/// Grain table entries per table (`num_gtes_per_gt`).
const GTES: u64 = 512;
const GT_SECTORS: u64 = GTES * 4 / SECTOR;
const DESC_OFFSET: u64 = 1;
const DESC_SECTORS: u64 = 20;
/// qemu's constant extent size of the twoGbMaxExtent subformats.
const SPLIT_SIZE: u64 = 0x8000_0000;
/// qemu refuses to open an extent with more grain tables than this
/// (`vmdk_add_extent`: "L1 size too big").
const MAX_GT_COUNT: u64 = 32 * 1024 * 1024;
/// qemu's BUF_SIZE for the `parentFileNameHint` line (snprintf bound).
const PARENT_LINE_MAX: usize = 4095;
/// Compressed grains are gathered up to this many bytes per sink write.
const STREAM_BATCH: usize = 1 << 20;
/// zlib's Z_DEFAULT_COMPRESSION, which qemu's `compress()` uses.
const DEFLATE_LEVEL: i32 = 6;
/// A grain table entry meaning "reads as zeros" (`VMDK_GTE_ZEROED`).
const GTE_ZEROED: u32 = 1;

const VMDK4_FLAG_NL_DETECT: u32 = 1 << 0;
const VMDK4_FLAG_RGD: u32 = 1 << 1;
const VMDK4_FLAG_ZERO_GRAIN: u32 = 1 << 2;
const VMDK4_FLAG_COMPRESS: u32 = 1 << 16;
const VMDK4_FLAG_MARKER: u32 = 1 << 17;
const VMDK4_COMPRESSION_DEFLATE: u16 = 1;

const ALL_SUBFORMATS: [VmdkSubformat; 5] = [
    VmdkSubformat::MonolithicSparse,
    VmdkSubformat::MonolithicFlat,
    VmdkSubformat::StreamOptimized,
    VmdkSubformat::TwoGbMaxExtentSparse,
    VmdkSubformat::TwoGbMaxExtentFlat,
];

fn subformat_name(s: VmdkSubformat) -> &'static str {
    match s {
        VmdkSubformat::MonolithicSparse => "monolithicSparse",
        VmdkSubformat::MonolithicFlat => "monolithicFlat",
        VmdkSubformat::StreamOptimized => "streamOptimized",
        VmdkSubformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
        VmdkSubformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
    }
}

fn adapter_name(a: VmdkAdapter) -> &'static str {
    match a {
        VmdkAdapter::Ide => "ide",
        VmdkAdapter::Buslogic => "buslogic",
        VmdkAdapter::Lsilogic => "lsilogic",
        VmdkAdapter::LegacyEsx => "legacyESX",
    }
}

fn is_flat(s: VmdkSubformat) -> bool {
    matches!(
        s,
        VmdkSubformat::MonolithicFlat | VmdkSubformat::TwoGbMaxExtentFlat
    )
}

fn is_split(s: VmdkSubformat) -> bool {
    matches!(
        s,
        VmdkSubformat::TwoGbMaxExtentSparse | VmdkSubformat::TwoGbMaxExtentFlat
    )
}

/// qemu rounds the requested size up to whole sectors.
fn disk_size(virtual_size: u64) -> Result<u64> {
    virtual_size
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(|| ImageError::limit("vmdk target size too large"))
}

/// Sizes of the extent files after the descriptor, as qemu creates them
/// (none for an empty disk, which qemu then fails to open).
fn extent_sizes(subformat: VmdkSubformat, size: u64) -> Vec<u64> {
    if is_split(subformat) {
        let n = size.div_ceil(SPLIT_SIZE);
        (0..n)
            .map(|i| (size - i * SPLIT_SIZE).min(SPLIT_SIZE))
            .collect()
    } else if is_flat(subformat) {
        if size > 0 {
            vec![size]
        } else {
            Vec::new()
        }
    } else {
        // The monolithic extent exists even when empty.
        vec![size]
    }
}

/// qemu's `filename_decompose`: directory (up to the last `/`, else `\`,
/// else `:`), then the name split at its last dot.
fn decompose(dst: &str) -> (&str, &str, &str) {
    let cut = dst
        .rfind('/')
        .or_else(|| dst.rfind('\\'))
        .or_else(|| dst.rfind(':'))
        .map_or(0, |i| i + 1);
    let (path, name) = dst.split_at(cut);
    match name.rfind('.') {
        Some(q) => (path, &name[..q], &name[q..]),
        None => (path, name, ""),
    }
}

/// The files a vmdk target consists of, the descriptor (or monolithic
/// image) `dst` first, then the extents named as qemu names them.
pub fn output_files(opts: &VmdkOptions, dst: &str, virtual_size: u64) -> Vec<String> {
    let mut names = vec![String::from(dst)];
    if !is_flat(opts.subformat) && !is_split(opts.subformat) {
        return names;
    }
    let Ok(size) = disk_size(virtual_size) else {
        return names;
    };
    let count = extent_sizes_count(opts.subformat, size);
    if count > VMDK_MAX_EXTENTS as u64 {
        // create() refuses this size; no files beyond dst are made.
        return names;
    }
    let (path, prefix, postfix) = decompose(dst);
    for idx in 1..=count {
        names.push(if is_split(opts.subformat) {
            let kind = if is_flat(opts.subformat) { 'f' } else { 's' };
            format!("{path}{prefix}-{kind}{idx:03}{postfix}")
        } else {
            format!("{path}{prefix}-flat{postfix}")
        });
    }
    names
}

fn extent_sizes_count(subformat: VmdkSubformat, size: u64) -> u64 {
    if is_split(subformat) {
        size.div_ceil(SPLIT_SIZE)
    } else {
        u64::from(size > 0)
    }
}

/// The parentCID of a vmdk target whose backing file is `backing`: its
/// CID, which it must have, being vmdk (qemu opens it without its own
/// backing chain and reads the CID from its descriptor).
pub fn parent_cid(backing: &ImageInfo) -> Result<u32> {
    match &backing.format_specific {
        Some(FormatSpecific::Vmdk(v)) if backing.format == "vmdk" => {
            u32::try_from(v.cid).map_err(|_| ImageError::operation("Failed to read parent CID"))
        }
        _ => Err(ImageError::operation(format!(
            "Invalid backing file format: {}. Must be vmdk",
            backing.format
        ))),
    }
}

/// Where a sparse extent keeps its tables, in sectors (`vmdk_init_extent`).
#[derive(Clone, Copy)]
struct Layout {
    capacity: u64,
    gt_count: u64,
    gd_sectors: u64,
    rgd_offset: u64,
    gd_offset: u64,
    grain_offset: u64,
}

impl Layout {
    fn new(size: u64) -> Result<Self> {
        let capacity = size / SECTOR;
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let gt_count = grains.div_ceil(GTES);
        if gt_count > MAX_GT_COUNT {
            return Err(ImageError::limit(
                "vmdk target too large: qemu cannot open a sparse extent of more than 1 PiB (L1 size too big)",
            ));
        }
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        let rgd_offset = DESC_OFFSET + DESC_SECTORS;
        let gd_offset = rgd_offset + gd_sectors + GT_SECTORS * gt_count;
        let grain_offset =
            (gd_offset + gd_sectors + GT_SECTORS * gt_count).next_multiple_of(GRAIN_SECTORS);
        Ok(Self {
            capacity,
            gt_count,
            gd_sectors,
            rgd_offset,
            gd_offset,
            grain_offset,
        })
    }

    fn header(&self, compress: bool, zeroed_grain: bool) -> [u8; SECTOR as usize] {
        let version: u32 = if compress {
            3
        } else if zeroed_grain {
            2
        } else {
            1
        };
        let mut flags = VMDK4_FLAG_RGD | VMDK4_FLAG_NL_DETECT;
        if compress {
            flags |= VMDK4_FLAG_COMPRESS | VMDK4_FLAG_MARKER;
        }
        if zeroed_grain {
            flags |= VMDK4_FLAG_ZERO_GRAIN;
        }
        let mut h = [0u8; SECTOR as usize];
        let mut at = 0;
        let mut put = |b: &[u8]| {
            h[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        put(b"KDMV");
        put(&version.to_le_bytes());
        put(&flags.to_le_bytes());
        put(&self.capacity.to_le_bytes());
        put(&GRAIN_SECTORS.to_le_bytes());
        put(&DESC_OFFSET.to_le_bytes());
        put(&DESC_SECTORS.to_le_bytes());
        put(&(GTES as u32).to_le_bytes());
        put(&self.rgd_offset.to_le_bytes());
        put(&self.gd_offset.to_le_bytes());
        put(&self.grain_offset.to_le_bytes());
        put(&[0, b'\n', b' ', b'\r', b'\n']);
        let algorithm = if compress {
            VMDK4_COMPRESSION_DEFLATE
        } else {
            0
        };
        put(&algorithm.to_le_bytes());
        h
    }

    /// Sector of grain table `gt` in the directory starting at `dir`.
    fn gt_sector(&self, dir: u64, gt: u64) -> u64 {
        dir + self.gd_sectors + gt * GT_SECTORS
    }

    /// Header and both grain directories; the tables stay holes.
    fn init(&self, sink: &mut dyn Sink, file: OutId, compress: bool, zeroed: bool) -> Result<()> {
        sink.write_at(file, 0, &self.header(compress, zeroed))?;
        sink.set_len(file, self.grain_offset * SECTOR)?;
        // Directory entries are 32-bit sectors (qemu's wrap-around would
        // point them at the header; refuse instead).
        if self.gt_sector(self.gd_offset, self.gt_count) > u64::from(u32::MAX) {
            return Err(ImageError::limit(
                "vmdk target too large for 32-bit grain directory entries",
            ));
        }
        for dir in [self.rgd_offset, self.gd_offset] {
            let mut gt = 0;
            while gt < self.gt_count {
                let n = (self.gt_count - gt).min(16384);
                let mut buf = Vec::with_capacity((n * 4) as usize);
                for i in gt..gt + n {
                    buf.extend_from_slice(&(self.gt_sector(dir, i) as u32).to_le_bytes());
                }
                sink.write_at(file, dir * SECTOR + gt * 4, &buf)?;
                gt += n;
            }
        }
        Ok(())
    }
}

struct Extent {
    file: OutId,
    /// Guest offset of the extent's first byte.
    start: u64,
    size: u64,
    /// `None` for a flat extent.
    layout: Option<Layout>,
}

/// Allocation state of the sparse extent being written.
struct SparseState {
    /// Next free sector of the extent file (qemu's `next_cluster_sector`).
    next_sector: u64,
    /// End of the extent file in sectors: qemu fills each grain it
    /// allocates with zeros before writing the compressed grain over its
    /// start, so the file reaches a whole grain past the last one.
    end_sector: u64,
    gt_index: u64,
    gt: Vec<u32>,
    gt_dirty: bool,
    /// The grain `grain_buf` holds, when a write ended inside it.
    pending: Option<u64>,
    grain_buf: Vec<u8>,
    /// Compressed grains not yet handed to the sink, starting at
    /// `stream_at` (a sector boundary) of the extent file.
    stream: Vec<u8>,
    stream_at: u64,
}

/// Writes a vmdk image (see the module documentation).
pub struct VmdkWriter {
    opts: VmdkOptions,
    size: u64,
    parent_cid: u32,
    extents: Vec<Extent>,
    cur: usize,
    state: SparseState,
    deflate: Option<Box<CompressorOxide>>,
    deflate_out: Vec<u8>,
    zeros: Vec<u8>,
    hash: u64,
    /// Whether guest data was written: qemu then rewrites the descriptor
    /// with a new CID, which pads a descriptor file to whole sectors.
    wrote: bool,
}

impl VmdkWriter {
    /// Lay out a `virtual_size`-byte vmdk image over the outputs that
    /// [`output_files`] named. `parent_cid` is [`parent_cid`] of the
    /// backing file, required when `opts.backing_file` is set.
    pub fn create(
        sink: &mut dyn Sink,
        opts: &VmdkOptions,
        compress: bool,
        virtual_size: u64,
        parent_cid: Option<u32>,
    ) -> Result<Self> {
        let subformat = opts.subformat;
        let flat = is_flat(subformat);
        if opts.compat6 && opts.hwversion.is_some() {
            return Err(ImageError::operation(
                "compat6 cannot be enabled with hwversion set",
            ));
        }
        if flat && opts.backing_file.is_some() {
            return Err(ImageError::operation("Flat image can't have backing file"));
        }
        if flat && opts.zeroed_grain {
            return Err(ImageError::operation(
                "Flat image can't enable zeroed grain",
            ));
        }
        let parent_cid = match (&opts.backing_file, parent_cid) {
            (None, _) => 0xffff_ffff,
            (Some(_), Some(cid)) => cid,
            (Some(_), None) => return Err(ImageError::limit(
                "convert to vmdk with a backing file is not implemented yet (its CID is not read)",
            )),
        };
        let size = disk_size(virtual_size)?;
        let stream = subformat == VmdkSubformat::StreamOptimized;
        let count = extent_sizes_count(subformat, size);
        if count > VMDK_MAX_EXTENTS as u64 {
            return Err(ImageError::limit(format!(
                "vmdk target too large: more than {VMDK_MAX_EXTENTS} extent files"
            )));
        }
        let separate = flat || is_split(subformat);
        let mut extents = Vec::new();
        let mut start = 0;
        for (i, ext_size) in extent_sizes(subformat, size).into_iter().enumerate() {
            let file = if separate { i as OutId + 1 } else { 0 };
            if sink.output_name(file).is_none() {
                return Err(ImageError::operation(
                    "internal error: vmdk extent file missing",
                ));
            }
            let layout = if flat {
                None
            } else {
                Some(Layout::new(ext_size)?)
            };
            extents.push(Extent {
                file,
                start,
                size: ext_size,
                layout,
            });
            start += ext_size;
        }
        for e in &extents {
            match &e.layout {
                Some(l) => l.init(sink, e.file, stream, opts.zeroed_grain)?,
                None => sink.set_len(e.file, e.size)?,
            }
        }
        let deflate = stream.then(|| {
            Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
                DEFLATE_LEVEL,
                15,
                0,
            )))
        });
        let mut w = Self {
            opts: opts.clone(),
            size,
            parent_cid,
            extents,
            cur: 0,
            state: SparseState {
                next_sector: 0,
                end_sector: 0,
                gt_index: 0,
                gt: vec![0; GTES as usize],
                gt_dirty: false,
                pending: None,
                grain_buf: vec![0; GRAIN as usize],
                stream: Vec::new(),
                stream_at: 0,
            },
            deflate,
            deflate_out: if stream {
                vec![0; 2 * GRAIN as usize + 64]
            } else {
                Vec::new()
            },
            zeros: Vec::new(),
            hash: 0x6a09_e667_f3bc_c908 ^ size,
            wrote: false,
        };
        let kind = ALL_SUBFORMATS
            .iter()
            .position(|&s| s == subformat)
            .unwrap_or(0);
        w.mix(kind as u64);
        w.enter_extent(0);
        if size == 0 {
            w.write_descriptor(sink)?;
            let name = sink.output_name(0).unwrap_or_default();
            return Err(ImageError::operation(if separate {
                String::from("vmdk image without extents: qemu-img aborts on it (vmdk_co_get_info: Assertion `s->num_extents' failed)")
            } else {
                format!(
                    "Could not open '{name}': Unsupported image type '{}'",
                    subformat_name(subformat)
                )
            }));
        }
        if compress && flat {
            // qemu-img creates the target, then finds no cluster size for -c.
            w.write_descriptor(sink)?;
            return Err(ImageError::operation("invalid cluster size"));
        }
        Ok(w)
    }

    fn stream_optimized(&self) -> bool {
        self.deflate.is_some()
    }

    fn enter_extent(&mut self, i: usize) {
        self.cur = i;
        let st = &mut self.state;
        st.next_sector = self
            .extents
            .get(i)
            .and_then(|e| e.layout)
            .map_or(0, |l| l.grain_offset);
        st.end_sector = st.next_sector;
        st.gt_index = 0;
        st.gt.fill(0);
        st.gt_dirty = false;
        st.pending = None;
        st.stream.clear();
        st.stream_at = st.next_sector * SECTOR;
    }

    /// The extent holding guest `offset`, finishing those before it.
    fn extent_at(&mut self, sink: &mut dyn Sink, offset: u64) -> Result<usize> {
        loop {
            let e = self
                .extents
                .get(self.cur)
                .ok_or_else(|| ImageError::operation("internal error: vmdk write past the end"))?;
            if offset < e.start {
                return Err(ImageError::operation(
                    "internal error: vmdk writes out of order",
                ));
            }
            if offset - e.start < e.size {
                return Ok(self.cur);
            }
            self.finish_extent(sink)?;
            self.enter_extent(self.cur + 1);
        }
    }

    fn finish_extent(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let Some(e) = self.extents.get(self.cur) else {
            return Ok(());
        };
        if e.layout.is_none() {
            return Ok(());
        }
        let file = e.file;
        self.flush_pending(sink)?;
        self.flush_gt(sink)?;
        self.flush_stream(sink)?;
        let end = self.state.next_sector.max(self.state.end_sector);
        sink.set_len(file, end * SECTOR)
    }

    fn mix(&mut self, v: u64) {
        self.hash = (self.hash ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(31);
    }

    fn cid(&self) -> u32 {
        let h = self.hash ^ (self.hash >> 32);
        match h as u32 {
            // ffffffff is what a parentCID of "no parent" reads as.
            u32::MAX => 0x7fff_ffff,
            c => c,
        }
    }

    fn set_gte(&mut self, sink: &mut dyn Sink, grain: u64, value: u32) -> Result<()> {
        let gt = grain / GTES;
        if gt != self.state.gt_index {
            self.flush_gt(sink)?;
            self.state.gt_index = gt;
        }
        self.state.gt[(grain % GTES) as usize] = value;
        self.state.gt_dirty = true;
        Ok(())
    }

    /// Write the current grain table to both directories' copies.
    fn flush_gt(&mut self, sink: &mut dyn Sink) -> Result<()> {
        if !self.state.gt_dirty {
            return Ok(());
        }
        let e = &self.extents[self.cur];
        let Some(l) = e.layout else { return Ok(()) };
        let mut buf = [0u8; (GTES * 4) as usize];
        for (d, v) in buf.chunks_exact_mut(4).zip(&self.state.gt) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        for dir in [l.rgd_offset, l.gd_offset] {
            sink.write_at(e.file, l.gt_sector(dir, self.state.gt_index) * SECTOR, &buf)?;
        }
        self.state.gt.fill(0);
        self.state.gt_dirty = false;
        Ok(())
    }

    fn flush_stream(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let st = &mut self.state;
        if !st.stream.is_empty() {
            sink.write_at(self.extents[self.cur].file, st.stream_at, &st.stream)?;
            st.stream_at += st.stream.len() as u64;
            st.stream.clear();
        }
        Ok(())
    }

    /// Take `sectors` sectors at the end of the extent file.
    fn allocate(&mut self, sectors: u64) -> Result<u32> {
        let at = self.state.next_sector;
        let end = at + sectors;
        if end > u64::from(u32::MAX) {
            return Err(ImageError::limit(
                "vmdk extent file would exceed 2 TiB (32-bit grain offsets)",
            ));
        }
        self.state.next_sector = end;
        Ok(at as u32)
    }

    /// Bytes of grain `grain` inside the current extent.
    fn grain_len(&self, grain: u64) -> u64 {
        (self.extents[self.cur].size - grain * GRAIN).min(GRAIN)
    }

    /// Write grain `grain`'s first `len` bytes of `data` as one compressed
    /// grain with its marker, as qemu's `vmdk_write_extent` does.
    fn put_compressed(&mut self, sink: &mut dyn Sink, grain: u64, data: &[u8]) -> Result<()> {
        let Some(d) = self.deflate.as_mut() else {
            return Err(ImageError::operation("internal error: no compressor"));
        };
        d.reset();
        let (status, used, n) = compress(d, data, &mut self.deflate_out, TDEFLFlush::Finish);
        if status != TDEFLStatus::Done || used != data.len() {
            return Err(ImageError::operation("vmdk: grain compression failed"));
        }
        let total = 12 + n as u64;
        let sector = self.allocate(total.div_ceil(SECTOR))?;
        self.state.end_sector = self.state.end_sector.max(u64::from(sector) + GRAIN_SECTORS);
        let st = &mut self.state;
        st.stream
            .extend_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
        st.stream.extend_from_slice(&(n as u32).to_le_bytes());
        st.stream.extend_from_slice(&self.deflate_out[..n]);
        let padded = st.stream.len().next_multiple_of(SECTOR as usize);
        st.stream.resize(padded, 0);
        self.set_gte(sink, grain, sector)?;
        if self.state.stream.len() >= STREAM_BATCH {
            self.flush_stream(sink)?;
        }
        Ok(())
    }

    fn flush_pending(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let Some(grain) = self.state.pending.take() else {
            return Ok(());
        };
        let buf = core::mem::take(&mut self.state.grain_buf);
        let r = self.put_grains(sink, grain, &buf);
        self.state.grain_buf = buf;
        r
    }

    /// Allocate and write whole grains from `grain` on (`data` is a whole
    /// number of grains, or the extent's last grain).
    fn put_grains(&mut self, sink: &mut dyn Sink, grain: u64, data: &[u8]) -> Result<()> {
        if self.stream_optimized() {
            let len = self.grain_len(grain) as usize;
            return self.put_compressed(sink, grain, &data[..len.min(data.len())]);
        }
        // Uncompressed grains are whole 64 KiB even at the end of the
        // extent, as qemu's copy-on-write fills them.
        let count = (data.len() as u64).div_ceil(GRAIN);
        let first = self.allocate(count * GRAIN_SECTORS)?;
        sink.write_at(self.extents[self.cur].file, u64::from(first) * SECTOR, data)?;
        if !(data.len() as u64).is_multiple_of(GRAIN) {
            let pad = GRAIN - data.len() as u64 % GRAIN;
            self.ensure_zeros();
            let at = u64::from(first) * SECTOR + data.len() as u64;
            sink.write_at(self.extents[self.cur].file, at, &self.zeros[..pad as usize])?;
        }
        for i in 0..count {
            self.set_gte(sink, grain + i, first + (i * GRAIN_SECTORS) as u32)?;
        }
        Ok(())
    }

    fn ensure_zeros(&mut self) {
        if self.zeros.is_empty() {
            self.zeros = vec![0; GRAIN as usize];
        }
    }

    /// `data` at extent-relative `rel` of the current sparse extent.
    fn sparse_write(&mut self, sink: &mut dyn Sink, mut rel: u64, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let grain = rel / GRAIN;
            let in_grain = rel % GRAIN;
            let glen = self.grain_len(grain);
            if self.state.pending.is_some_and(|p| p != grain) {
                self.flush_pending(sink)?;
            }
            let left = data.len() as u64;
            if self.state.pending.is_none() && in_grain == 0 && left >= glen {
                // Whole grains straight from the caller's buffer.
                let whole = if self.stream_optimized() || glen < GRAIN {
                    glen
                } else {
                    (left / GRAIN) * GRAIN
                };
                self.put_grains(sink, grain, &data[..whole as usize])?;
                rel += whole;
                data = &data[whole as usize..];
                continue;
            }
            if self.state.pending.is_none() {
                self.state.grain_buf.fill(0);
                self.state.pending = Some(grain);
            }
            let n = (glen - in_grain).min(left);
            self.state.grain_buf[in_grain as usize..(in_grain + n) as usize]
                .copy_from_slice(&data[..n as usize]);
            rel += n;
            data = &data[n as usize..];
            if in_grain + n == glen {
                let buf = core::mem::take(&mut self.state.grain_buf);
                self.state.pending = None;
                let r = self.put_grains(sink, grain, &buf[..glen as usize]);
                self.state.grain_buf = buf;
                r?;
            }
        }
        Ok(())
    }

    fn write_descriptor(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let o = &self.opts;
        let flat = is_flat(o.subformat);
        let mut lines = String::new();
        for e in &self.extents {
            let name = sink
                .output_name(e.file)
                .ok_or_else(|| ImageError::operation("internal error: vmdk extent file missing"))?;
            // g_path_get_basename on a POSIX host splits at '/' only.
            let base = name.rsplit('/').next().unwrap_or(name);
            let sectors = e.size.div_ceil(SECTOR);
            if flat {
                lines.push_str(&format!("RW {sectors} FLAT \"{base}\" 0\n"));
            } else {
                lines.push_str(&format!("RW {sectors} SPARSE \"{base}\"\n"));
            }
        }
        let parent_line = match &o.backing_file {
            Some(b) => {
                let mut l = format!("parentFileNameHint=\"{b}\"");
                if l.len() > PARENT_LINE_MAX {
                    let mut cut = PARENT_LINE_MAX;
                    while !l.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.truncate(cut);
                }
                l
            }
            None => String::new(),
        };
        let hw = if o.compat6 {
            "6"
        } else {
            o.hwversion.as_deref().unwrap_or("4")
        };
        let tools = o.toolsversion.as_deref().unwrap_or("2147483647");
        // VMware's geometry: 16 heads for IDE, 255 for SCSI adapters.
        let heads: u64 = if o.adapter == VmdkAdapter::Ide {
            16
        } else {
            255
        };
        let cylinders = self.size / (63 * heads * SECTOR);
        let desc = format!(
            "# Disk DescriptorFile\n\
             version=1\n\
             CID={:x}\n\
             parentCID={:x}\n\
             createType=\"{}\"\n\
             {}\n\
             # Extent description\n\
             {}\n\
             # The Disk Data Base\n\
             #DDB\n\
             \n\
             ddb.virtualHWVersion = \"{}\"\n\
             ddb.geometry.cylinders = \"{}\"\n\
             ddb.geometry.heads = \"{}\"\n\
             ddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\n\
             ddb.toolsVersion = \"{}\"\n",
            self.cid(),
            self.parent_cid,
            subformat_name(o.subformat),
            parent_line,
            lines,
            hw,
            cylinders,
            heads,
            adapter_name(o.adapter),
            tools,
        );
        if flat || is_split(o.subformat) {
            sink.write_at(0, 0, desc.as_bytes())?;
            let len = desc.len() as u64;
            sink.set_len(
                0,
                if self.wrote {
                    len.next_multiple_of(SECTOR)
                } else {
                    len
                },
            )
        } else {
            sink.write_at(0, DESC_OFFSET * SECTOR, desc.as_bytes())
        }
    }
}

impl ImageWriter for VmdkWriter {
    fn granularity(&self) -> u64 {
        GRAIN
    }

    fn write(&mut self, sink: &mut dyn Sink, mut offset: u64, mut data: &[u8]) -> Result<()> {
        self.mix(offset);
        self.mix(data.len() as u64);
        self.wrote |= !data.is_empty();
        for block in data.chunks(4096) {
            let mut w = [0u8; 8];
            let n = block.len().min(8);
            w[..n].copy_from_slice(&block[..n]);
            self.mix(u64::from_le_bytes(w));
        }
        while !data.is_empty() {
            let i = self.extent_at(sink, offset)?;
            let e = &self.extents[i];
            let rel = offset - e.start;
            let n = (e.size - rel).min(data.len() as u64) as usize;
            if e.layout.is_some() {
                self.sparse_write(sink, rel, &data[..n])?;
            } else {
                sink.write_at(e.file, rel, &data[..n])?;
            }
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn zero(&mut self, sink: &mut dyn Sink, mut offset: u64, mut len: u64) -> Result<()> {
        // Unallocated grains read as zeros unless there is a backing file
        // (flat extents cannot have one).
        if self.opts.backing_file.is_none() {
            return Ok(());
        }
        self.mix(offset ^ 0x5a5a);
        self.mix(len);
        self.wrote |= len > 0;
        self.ensure_zeros();
        while len > 0 {
            let i = self.extent_at(sink, offset)?;
            let e = &self.extents[i];
            let mut rel = offset - e.start;
            let n = (e.size - rel).min(len);
            let end = rel + n;
            while rel < end {
                let grain = rel / GRAIN;
                let glen = self.grain_len(grain);
                let in_grain = rel % GRAIN;
                let step = (glen - in_grain).min(end - rel);
                if self.opts.zeroed_grain && in_grain == 0 && step == glen {
                    if self.state.pending.is_some() {
                        self.flush_pending(sink)?;
                    }
                    self.set_gte(sink, grain, GTE_ZEROED)?;
                } else {
                    // qemu's zero write is refused here and the block layer
                    // writes a buffer of zeros instead.
                    let zeros = core::mem::take(&mut self.zeros);
                    let r = self.sparse_write(sink, rel, &zeros[..step as usize]);
                    self.zeros = zeros;
                    r?;
                }
                rel += step;
            }
            offset += n;
            len -= n;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, sink: &mut dyn Sink) -> Result<()> {
        self.finish_extent(sink)?;
        self.write_descriptor(sink)
    }
}

#[cfg(test)]
mod tests;
