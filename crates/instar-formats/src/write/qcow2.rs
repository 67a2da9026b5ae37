//! qcow2 target: header in cluster 0, the L1 table after it, then L2
//! tables and data clusters in the order the guest data arrives, and the
//! refcount structures last (the header is written at the very end, so an
//! interrupted conversion leaves no valid image).
//!
//! Memory stays bounded however large and sparse the image: the L1 table
//! (at most qemu's 32 MiB), one L2 table, one cluster being assembled, and
//! one refcount block. Every host cluster below the allocation frontier is
//! referenced exactly once except compressed clusters, which several
//! compressed guest clusters may share; the refcount block holding such a
//! shared cluster is kept in memory and written out as soon as allocation
//! moves past its range, all others are written at [`ImageWriter::finish`]
//! as "one reference each".

use super::{ImageWriter, Sink};
use crate::limits::{
    MAX_BACKING_NAME, QCOW2_BACKING_FORMAT_BUF, QCOW2_MAX_CLUSTER_BITS, QCOW2_MAX_L1_BYTES,
    QCOW2_MAX_REFTABLE_BYTES, QCOW2_MIN_CLUSTER_BITS,
};
use crate::qcow2::extensions::{EXT_BACKING_FORMAT, EXT_FEATURE_TABLE};
use crate::qcow2::header::{
    COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, EXTL2_SUBCLUSTERS, INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2, MAGIC, V2_HEADER_LENGTH,
};
use crate::qcow2::tables::{OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::Result;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::convert::{Compression, Preallocation, Qcow2Options};
use instar_wire::ImageError;

/// Header length qemu writes for version 3 (its `QCowHeader` including
/// the compression type byte and padding).
const V3_HEADER_LENGTH: usize = 112;
/// Host offsets must fit the offset bits of L1/L2 entries (bits 9..55).
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// qemu writes its feature name table only when the cluster is larger than
/// this (found with qemu-img 10.0.2: 4 KiB clusters have none, 8 KiB do).
const FEATURE_TABLE_MIN_CLUSTER: u64 = 8192;
/// Bytes per write when metadata or zeros are generated in bulk.
const BULK_WRITE: usize = 1 << 20;

/// The feature name table qemu writes (type, bit, name).
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

fn limit(msg: &str) -> ImageError {
    ImageError::limit(msg)
}

fn overflow() -> ImageError {
    ImageError::limit("qcow2 target: image too large for its cluster size")
}

/// One cluster's compressor, reused across clusters.
struct Compressor {
    kind: Codec,
    /// Hash table of [`incompressible`].
    table: Vec<u32>,
}

enum Codec {
    Zlib(Box<miniz_oxide::deflate::core::CompressorOxide>),
    Zstd(Box<ZstdState>),
}

struct ZstdState {
    enc: ruzstd::encoding::FrameCompressor<Src, Vec<u8>, ruzstd::encoding::MatchGeneratorDriver>,
}

/// An owned source for ruzstd (its `Read` wants a value it can keep).
struct Src {
    buf: Vec<u8>,
    pos: usize,
}

impl ruzstd::io::Read for Src {
    fn read(&mut self, out: &mut [u8]) -> core::result::Result<usize, ruzstd::io::Error> {
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Compressor {
    fn new(kind: Compression) -> Self {
        let kind = match kind {
            Compression::Zlib => {
                // qemu: deflateInit2(Z_DEFAULT_COMPRESSION, -12 window bits):
                // raw deflate, no zlib header.
                let flags = miniz_oxide::deflate::core::create_comp_flags_from_zip_params(
                    ZLIB_LEVEL, -12, 0,
                );
                Codec::Zlib(Box::new(miniz_oxide::deflate::core::CompressorOxide::new(
                    flags,
                )))
            }
            Compression::Zstd => Codec::Zstd(Box::new(ZstdState {
                enc: ruzstd::encoding::FrameCompressor::new(
                    ruzstd::encoding::CompressionLevel::Fastest,
                ),
            })),
        };
        Self {
            kind,
            table: vec![0; 1 << PROBE_BITS],
        }
    }

    /// Compress `data` into `out` (cleared first); `false` when the result
    /// would not be smaller than a cluster (qemu then writes the cluster
    /// uncompressed).
    fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        if incompressible(data, &mut self.table) {
            return false;
        }
        // qemu gives the compressor `cluster_size - 1` bytes of room.
        let room = data.len() - 1;
        match &mut self.kind {
            Codec::Zlib(c) => {
                use miniz_oxide::deflate::core::{compress, TDEFLFlush, TDEFLStatus};
                c.reset();
                out.clear();
                out.resize(room, 0);
                let (status, _, written) = compress(c, data, out, TDEFLFlush::Finish);
                if status != TDEFLStatus::Done {
                    return false;
                }
                out.truncate(written);
                true
            }
            Codec::Zstd(z) => {
                let mut buf = match z.enc.set_source(Src {
                    buf: Vec::new(),
                    pos: 0,
                }) {
                    Some(s) => s.buf,
                    None => Vec::new(),
                };
                buf.clear();
                buf.extend_from_slice(data);
                z.enc.set_source(Src { buf, pos: 0 });
                let mut drain = core::mem::take(out);
                drain.clear();
                z.enc.set_drain(drain);
                z.enc.compress();
                *out = z.enc.set_drain(Vec::new()).unwrap_or_default();
                out.len() <= room
            }
        }
    }
}

/// Whether `data` is so close to random that compressing it cannot save
/// anything worth the time (already compressed or encrypted guest data):
/// a near-flat byte histogram leaves Huffman coding nothing to gain, and a
/// scan for repeats finds almost none. Both compressors spend 10 to 50
/// times longer on such a cluster than on text, only for qemu to store it
/// uncompressed anyway. At worst a cluster that would have shrunk by a
/// fraction of a percent is stored as it is.
fn incompressible(data: &[u8], table: &mut [u32]) -> bool {
    let n = data.len();
    if n < 4096 {
        return false;
    }
    let mut hist = [0u32; 256];
    for &b in data {
        hist[b as usize] += 1;
    }
    // Chi-square against a flat histogram, times 256 / n to stay integral:
    // its entropy shortfall is about chi2 / (2 n ln 2) bits per byte, and
    // the bound keeps that under 0.02 (random data scores about 255).
    let expected = n as u64;
    let chi: u64 = hist
        .iter()
        .map(|&c| {
            let d = (u64::from(c) * 256).abs_diff(expected);
            d * d
        })
        .sum::<u64>()
        / (256 * expected);
    if chi * 36 > n as u64 {
        return false;
    }
    // Repeats of 8 bytes or more, found through a hash table of every
    // fourth position (looked up at every position).
    table.fill(0);
    let mut matched = 0usize;
    let mut i = 0;
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&data[i..i + 8]);
        let word = u64::from_le_bytes(w);
        let h = (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - PROBE_BITS)) as usize;
        let prev = table[h] as usize;
        if i % 4 == 0 {
            table[h] = i as u32 + 1;
        }
        if prev != 0 && data[prev - 1..prev + 7] == data[i..i + 8] {
            matched += 8;
            i += 8;
            if matched * 64 > n {
                return false;
            }
            continue;
        }
        i += 1;
    }
    true
}

/// log2 of the entries of [`incompressible`]'s hash table.
const PROBE_BITS: u32 = 14;

/// miniz level for zlib clusters. qemu uses zlib's default (6); miniz's
/// level 6 is markedly slower than zlib's, and qemu-img compresses on
/// several threads while the guest has one, so a faster level keeps -c
/// near qemu-img's wall time at a slightly lower ratio.
const ZLIB_LEVEL: i32 = 1;

/// Last compressed cluster's host cluster, still open for more compressed
/// data (qemu's `free_byte_offset`).
#[derive(Clone, Copy)]
struct Tail {
    /// Host cluster index.
    cluster: u64,
    /// Host byte offset where the next compressed stream would start.
    end: u64,
    /// References to `cluster` so far.
    count: u64,
}

/// The guest cluster being assembled from partial writes.
struct Pending {
    cluster: u64,
    /// Bytes named (written or zeroed) per subcluster.
    named: [u32; EXTL2_SUBCLUSTERS as usize],
    /// Subclusters holding written data.
    data: u32,
}

/// A refcount block kept in memory because it counts shared clusters.
struct Block {
    index: u64,
    bytes: Vec<u8>,
}

/// Writes a qcow2 image.
pub struct Qcow2Writer {
    version: u32,
    cluster_bits: u32,
    cs: u64,
    ext_l2: bool,
    /// Subclusters per cluster (1 without extended L2).
    nsc: u32,
    sc_size: u64,
    l2_entries: u64,
    entry_size: u64,
    refcount_order: u32,
    /// Refcount entries per refcount block.
    rb_entries: u64,
    refcount_max: u64,
    vsize: u64,
    /// The size asked for: bytes from here to `vsize` (the sector
    /// rounding) read as zeros and are never written by the caller.
    asked: u64,
    backing: bool,
    opts: Qcow2Options,
    compressor: Option<Compressor>,
    comp_out: Vec<u8>,

    l1: Vec<u64>,
    l1_offset: u64,
    /// First unallocated host cluster.
    next_free: u64,

    /// The loaded L2 table: its L1 index, content, host cluster (0 = not
    /// allocated yet), whether it differs from what the file has.
    l2_index: Option<u64>,
    l2: Vec<u8>,
    l2_host: u64,
    l2_dirty: bool,

    pending: Option<Pending>,
    buf: Vec<u8>,
    zeros: Vec<u8>,
    tail: Option<Tail>,
    block: Option<Block>,
    /// Host cluster of each refcount block written early, by block index
    /// (0: written at finish).
    rb_written: Vec<u64>,

    /// Preallocation: first L2 table cluster and first data cluster (data
    /// of guest cluster g is at `prealloc_data + g`).
    prealloc_l2: u64,
    prealloc_data: u64,
    /// falloc/full: host byte offset up to which the data area was filled.
    filled: u64,
    /// End of the last range written or zeroed.
    done: u64,
}

impl Qcow2Writer {
    /// Lay out the image and write what is known before any data: the L1
    /// table area (and, preallocated, every L2 table).
    pub fn create(
        sink: &mut dyn Sink,
        opts: &Qcow2Options,
        compress: bool,
        virtual_size: u64,
    ) -> Result<Self> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two()
            || !(1 << QCOW2_MIN_CLUSTER_BITS..=1 << QCOW2_MAX_CLUSTER_BITS).contains(&cs)
        {
            return Err(limit(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        let cluster_bits = cs.trailing_zeros();
        if opts.version != 2 && opts.version != 3 {
            return Err(limit("qcow2 target: compat must be 0.10 or 1.1"));
        }
        let rb = opts.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(limit(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if opts.version < 3 {
            if rb != 16 {
                return Err(limit("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"));
            }
            if opts.lazy_refcounts {
                return Err(limit("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
            }
            if opts.extended_l2 {
                return Err(limit("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
            }
            if opts.compression != Compression::Zlib {
                return Err(limit("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
            }
        }
        if opts.extended_l2 && cs < 16384 {
            return Err(limit(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if compress && opts.preallocation != Preallocation::Off {
            return Err(limit(
                "Compression and preallocation not supported at the same time",
            ));
        }
        let backing = opts.backing_file.is_some();
        if backing && opts.preallocation != Preallocation::Off && !opts.extended_l2 {
            return Err(limit("Backing file and preallocation can only be used at the same time if extended_l2 is on"));
        }
        if let Some(b) = &opts.backing_file {
            if b.len() as u64 > MAX_BACKING_NAME {
                return Err(limit("Backing file name too long"));
            }
        }
        if let Some(f) = &opts.backing_format {
            if f.len() as u32 >= QCOW2_BACKING_FORMAT_BUF {
                return Err(limit("Backing format name too long"));
            }
        }
        let ext_l2 = opts.extended_l2;
        let entry_size = if ext_l2 { 16 } else { 8 };
        let l2_entries = cs / entry_size;
        let nsc = if ext_l2 { EXTL2_SUBCLUSTERS } else { 1 };
        let refcount_order = rb.trailing_zeros();
        let rb_entries = cs * 8 / u64::from(rb);
        let refcount_max = if rb == 64 { u64::MAX } else { (1u64 << rb) - 1 };

        // qemu rounds the size up to whole sectors.
        let vsize = virtual_size.checked_add(511).ok_or_else(overflow)? & !511;
        let clusters = vsize.div_ceil(cs);
        let l1_size = clusters.div_ceil(l2_entries);
        if l1_size * 8 > QCOW2_MAX_L1_BYTES {
            return Err(limit("Image size is too large for this cluster size"));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);

        let mut w = Self {
            version: opts.version,
            cluster_bits,
            cs,
            ext_l2,
            nsc,
            sc_size: cs / u64::from(nsc),
            l2_entries,
            entry_size,
            refcount_order,
            rb_entries,
            refcount_max,
            vsize,
            asked: virtual_size,
            backing,
            opts: opts.clone(),
            compressor: compress.then(|| Compressor::new(opts.compression)),
            comp_out: Vec::new(),
            l1: vec![0; l1_size as usize],
            l1_offset: if l1_size > 0 { cs } else { 0 },
            next_free: 1 + l1_clusters,
            l2_index: None,
            l2: Vec::new(),
            l2_host: 0,
            l2_dirty: false,
            pending: None,
            buf: Vec::new(),
            zeros: Vec::new(),
            tail: None,
            block: None,
            rb_written: Vec::new(),
            prealloc_l2: 0,
            prealloc_data: 0,
            filled: 0,
            done: 0,
        };
        // The header must fit cluster 0 with its extensions.
        w.header(0, 0, 0)?;
        if opts.preallocation != Preallocation::Off && clusters > 0 {
            w.preallocate(sink, clusters)?;
        }
        Ok(w)
    }

    fn host_bytes(&self, cluster: u64) -> Result<u64> {
        let b = cluster.checked_mul(self.cs).ok_or_else(overflow)?;
        if b >= MAX_HOST_OFFSET {
            return Err(overflow());
        }
        Ok(b)
    }

    /// Layout for preallocation: every L2 table, then every data cluster
    /// (guest cluster g at `prealloc_data + g`); L2 tables are written now.
    fn preallocate(&mut self, sink: &mut dyn Sink, clusters: u64) -> Result<()> {
        let tables = self.l1.len() as u64;
        self.prealloc_l2 = self.next_free;
        self.prealloc_data = self.prealloc_l2 + tables;
        self.next_free = self
            .prealloc_data
            .checked_add(clusters)
            .ok_or_else(overflow)?;
        self.host_bytes(self.next_free)?;
        for i in 0..tables {
            self.l1[i as usize] = self.host_bytes(self.prealloc_l2 + i)? | OFLAG_COPIED;
        }
        // L2 tables in batches of whole tables.
        let per_batch = (BULK_WRITE as u64 / self.cs).max(1);
        let mut out = Vec::new();
        let mut i = 0;
        while i < tables {
            let n = per_batch.min(tables - i);
            out.clear();
            for t in i..i + n {
                let start = out.len();
                out.resize(start + self.cs as usize, 0);
                self.prealloc_table(t, &mut out[start..])?;
            }
            sink.write_at(0, self.host_bytes(self.prealloc_l2 + i)?, &out)?;
            i += n;
        }
        let data_start = self.host_bytes(self.prealloc_data)?;
        self.filled = data_start;
        sink.set_len(0, self.host_bytes(self.next_free)?)?;
        Ok(())
    }

    /// The preallocated L2 table `t` as created: every cluster mapped; with
    /// subclusters none allocated yet (qemu's `prealloc` link leaves the
    /// bitmap alone, so the backing file or zeros show through).
    fn prealloc_table(&self, t: u64, out: &mut [u8]) -> Result<()> {
        let clusters = self.vsize.div_ceil(self.cs);
        let first = t * self.l2_entries;
        let end = (first + self.l2_entries).min(clusters);
        for g in first..end {
            let e = ((g - first) * self.entry_size) as usize;
            let word = self.host_bytes(self.prealloc_data + g)? | OFLAG_COPIED;
            out[e..e + 8].copy_from_slice(&word.to_be_bytes());
        }
        Ok(())
    }

    fn preallocated(&self) -> bool {
        self.prealloc_data != 0
    }

    /// Build the header cluster's bytes (header, extensions, backing name).
    fn header(&self, l1_size: u64, reftable: u64, reftable_clusters: u64) -> Result<Vec<u8>> {
        let v3 = self.version >= 3;
        let base = if v3 {
            V3_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH as usize
        };
        let mut h = vec![0u8; base];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&self.version.to_be_bytes());
        h[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&self.vsize.to_be_bytes());
        h[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
        h[40..48].copy_from_slice(&self.l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&reftable.to_be_bytes());
        h[56..60].copy_from_slice(&(reftable_clusters as u32).to_be_bytes());
        if v3 {
            let mut incompat = 0u64;
            if self.ext_l2 {
                incompat |= INCOMPAT_EXTL2;
            }
            if self.opts.compression == Compression::Zstd {
                incompat |= INCOMPAT_COMPRESSION;
            }
            let compat = if self.opts.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            };
            h[72..80].copy_from_slice(&incompat.to_be_bytes());
            h[80..88].copy_from_slice(&compat.to_be_bytes());
            h[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            h[100..104].copy_from_slice(&(V3_HEADER_LENGTH as u32).to_be_bytes());
            if self.opts.compression == Compression::Zstd {
                h[104] = COMPRESSION_ZSTD;
            }
        }
        fn ext(h: &mut Vec<u8>, kind: u32, data: &[u8]) {
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&(data.len() as u32).to_be_bytes());
            h.extend_from_slice(data);
            h.resize(h.len().next_multiple_of(8), 0);
        }
        if let Some(f) = &self.opts.backing_format {
            if self.backing {
                ext(&mut h, EXT_BACKING_FORMAT, f.as_bytes());
            }
        }
        if v3 && self.cs >= FEATURE_TABLE_MIN_CLUSTER {
            let mut t = Vec::with_capacity(FEATURES.len() * 48);
            for (kind, bit, name) in FEATURES {
                let at = t.len();
                t.resize(at + 48, 0);
                t[at] = kind;
                t[at + 1] = bit;
                t[at + 2..at + 2 + name.len()].copy_from_slice(name.as_bytes());
            }
            ext(&mut h, EXT_FEATURE_TABLE, &t);
        }
        // End of extensions.
        h.extend_from_slice(&[0u8; 8]);
        if let Some(b) = &self.opts.backing_file {
            let at = h.len() as u64;
            h.extend_from_slice(b.as_bytes());
            h[8..16].copy_from_slice(&at.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
        }
        if h.len() as u64 > self.cs {
            // qemu-img 10.0.2's words when the backing name does not fit
            // cluster 0.
            return Err(ImageError::operation(alloc::format!(
                "Could not assign backing file '{}' with format '{}': No space left on device",
                self.opts.backing_file.as_deref().unwrap_or(""),
                self.opts.backing_format.as_deref().unwrap_or("")
            )));
        }
        Ok(h)
    }

    fn block_of(&self, cluster: u64) -> u64 {
        cluster / self.rb_entries
    }

    /// Allocate `n` contiguous host clusters, each referenced once.
    fn alloc(&mut self, sink: &mut dyn Sink, n: u64) -> Result<u64> {
        let first = self.next_free;
        if let Some(t) = self.tail {
            if self.block_of(first) != self.block_of(t.cluster) {
                // Compressed data never spans refcount blocks here, so the
                // in-memory block can be closed.
                self.tail = None;
            }
        }
        if self
            .block
            .as_ref()
            .is_some_and(|b| b.index != self.block_of(first))
        {
            self.flush_block(sink)?;
        }
        let first = self.next_free;
        let end = first.checked_add(n).ok_or_else(overflow)?;
        self.host_bytes(end)?;
        self.next_free = end;
        if let Some(b) = &mut self.block {
            let lo = b.index * self.rb_entries;
            let hi = lo + self.rb_entries;
            let width = 1u32 << self.refcount_order;
            for c in first.max(lo)..end.min(hi) {
                rc_set(&mut b.bytes, (c - lo) as usize, width, 1);
            }
        }
        Ok(first)
    }

    /// Write the in-memory refcount block at the allocation frontier (which
    /// lies past the block's range, so its own count is the implicit one).
    fn flush_block(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let Some(b) = self.block.take() else {
            return Ok(());
        };
        let at = self.next_free;
        self.next_free += 1;
        let off = self.host_bytes(self.next_free)?;
        sink.write_at(0, off - self.cs, &b.bytes)?;
        let idx = b.index as usize;
        if self.rb_written.len() <= idx {
            self.rb_written.resize(idx + 1, 0);
        }
        self.rb_written[idx] = at;
        Ok(())
    }

    /// Add one reference to the tail cluster (loads its refcount block).
    fn add_ref(&mut self, cluster: u64, count: u64) {
        let index = self.block_of(cluster);
        let width = 1u32 << self.refcount_order;
        if self.block.is_none() {
            let mut bytes = vec![0u8; self.cs as usize];
            let lo = index * self.rb_entries;
            let hi = (lo + self.rb_entries).min(self.next_free);
            fill_ones(&mut bytes, 0, (hi - lo) as usize, width);
            self.block = Some(Block { index, bytes });
        }
        if let Some(b) = &mut self.block {
            let lo = b.index * self.rb_entries;
            rc_set(&mut b.bytes, (cluster - lo) as usize, width, count);
        }
    }

    /// Make L1 index `index` the loaded L2 table, writing out the previous.
    fn load_l2(&mut self, sink: &mut dyn Sink, index: u64) -> Result<()> {
        if self.l2_index == Some(index) {
            return Ok(());
        }
        self.write_l2(sink)?;
        self.l2.clear();
        self.l2.resize(self.cs as usize, 0);
        if self.preallocated() {
            let mut t = core::mem::take(&mut self.l2);
            self.prealloc_table(index, &mut t)?;
            self.l2 = t;
            self.l2_host = self.prealloc_l2 + index;
        } else {
            self.l2_host = 0;
        }
        self.l2_index = Some(index);
        self.l2_dirty = false;
        Ok(())
    }

    fn write_l2(&mut self, sink: &mut dyn Sink) -> Result<()> {
        if self.l2_dirty && self.l2_host != 0 {
            sink.write_at(0, self.host_bytes(self.l2_host)?, &self.l2)?;
        }
        self.l2_dirty = false;
        Ok(())
    }

    /// Give the loaded L2 table a host cluster (before the data it maps).
    fn l2_for(&mut self, sink: &mut dyn Sink, g: u64) -> Result<()> {
        let index = g / self.l2_entries;
        self.load_l2(sink, index)?;
        if self.l2_host == 0 {
            let at = self.alloc(sink, 1)?;
            self.l2_host = at;
            self.l1[index as usize] = self.host_bytes(at)? | OFLAG_COPIED;
        }
        Ok(())
    }

    fn set_entry(&mut self, g: u64, word: u64, bitmap: Option<u64>) {
        let e = ((g % self.l2_entries) * self.entry_size) as usize;
        self.l2[e..e + 8].copy_from_slice(&word.to_be_bytes());
        if let Some(b) = bitmap {
            self.l2[e + 8..e + 16].copy_from_slice(&b.to_be_bytes());
        }
        self.l2_dirty = true;
    }

    fn entry(&self, g: u64) -> (u64, u64) {
        let e = ((g % self.l2_entries) * self.entry_size) as usize;
        let word = crate::bytes::be64(&self.l2, e);
        let bitmap = if self.ext_l2 {
            crate::bytes::be64(&self.l2, e + 8)
        } else {
            0
        };
        (word, bitmap)
    }

    /// falloc/full: zero-fill the preallocated data area up to `upto`.
    fn fill_to(&mut self, sink: &mut dyn Sink, upto: u64) -> Result<()> {
        if !self.preallocated()
            || !matches!(
                self.opts.preallocation,
                Preallocation::Falloc | Preallocation::Full
            )
        {
            return Ok(());
        }
        if self.zeros.len() < BULK_WRITE {
            self.zeros.resize(BULK_WRITE, 0);
        }
        while self.filled < upto {
            let n = (upto - self.filled).min(BULK_WRITE as u64) as usize;
            sink.write_at(0, self.filled, &self.zeros[..n])?;
            self.filled += n as u64;
        }
        Ok(())
    }

    /// Store whole clusters of data starting at guest cluster `g`.
    /// `alloc_mask` is the subcluster bitmap to set (extended L2).
    fn store(&mut self, sink: &mut dyn Sink, g: u64, data: &[u8], alloc_mask: u64) -> Result<()> {
        let cs = self.cs as usize;
        if self.compressor.is_some() {
            for (i, c) in data.chunks(cs).enumerate() {
                self.store_compressed(sink, g + i as u64, c)?;
            }
            return Ok(());
        }
        let mut g = g;
        let mut data = data;
        while !data.is_empty() {
            // One L2 table's worth at a time: contiguous host clusters.
            let in_table = self.l2_entries - g % self.l2_entries;
            let n = (data.len() / cs).min(in_table as usize).max(1);
            let (chunk, rest) = data.split_at((n * cs).min(data.len()));
            self.l2_for(sink, g)?;
            let host = if self.preallocated() {
                self.prealloc_data + g
            } else {
                self.alloc(sink, n as u64)?
            };
            let at = self.host_bytes(host)?;
            self.fill_to(sink, at)?;
            sink.write_at(0, at, chunk)?;
            if self.preallocated() {
                self.filled = self.filled.max(at + (n as u64) * self.cs);
            }
            for i in 0..n as u64 {
                let word = self.host_bytes(host + i)? | OFLAG_COPIED;
                let bitmap = if self.ext_l2 {
                    let (_, old) = self.entry(g + i);
                    Some((old | alloc_mask) & 0xffff_ffff)
                } else {
                    None
                };
                self.set_entry(g + i, word, bitmap);
            }
            g += n as u64;
            data = rest;
        }
        Ok(())
    }

    /// `-c`: one cluster compressed, packed after the previous compressed
    /// stream as qemu's `qcow2_alloc_bytes` does; kept uncompressed when
    /// compression does not make it smaller than a cluster.
    fn store_compressed(&mut self, sink: &mut dyn Sink, g: u64, data: &[u8]) -> Result<()> {
        let mut full;
        let data = if (data.len() as u64) < self.cs {
            // The image's last cluster: qemu pads it with zeros.
            full = core::mem::take(&mut self.buf);
            full.clear();
            full.extend_from_slice(data);
            full.resize(self.cs as usize, 0);
            &full[..]
        } else {
            full = Vec::new();
            data
        };
        let mut out = core::mem::take(&mut self.comp_out);
        let fits = match &mut self.compressor {
            Some(c) => c.compress(data, &mut out),
            None => false,
        };
        let r = if fits {
            self.place_compressed(sink, g, &out)
        } else {
            let mut c = self.compressor.take();
            let r = self.store(sink, g, data, 0xffff_ffff);
            core::mem::swap(&mut self.compressor, &mut c);
            r
        };
        self.comp_out = out;
        if !full.is_empty() {
            self.buf = full;
        }
        r
    }

    fn place_compressed(&mut self, sink: &mut dyn Sink, g: u64, comp: &[u8]) -> Result<()> {
        self.l2_for(sink, g)?;
        let len = comp.len() as u64;
        let cs = self.cs;
        let mut start = None;
        if let Some(t) = self.tail {
            let used = t.end % cs;
            if used != 0 && t.count < self.refcount_max {
                if len <= cs - used {
                    self.add_ref(t.cluster, t.count + 1);
                    self.tail = Some(Tail {
                        end: t.end + len,
                        count: t.count + 1,
                        ..t
                    });
                    start = Some(t.end);
                } else if t.cluster + 1 == self.next_free
                    && self.block_of(self.next_free) == self.block_of(t.cluster)
                {
                    // Spill into the next host cluster.
                    self.add_ref(t.cluster, t.count + 1);
                    let c = self.alloc(sink, 1)?;
                    self.tail = Some(Tail {
                        cluster: c,
                        end: t.end + len,
                        count: 1,
                    });
                    start = Some(t.end);
                }
            }
        }
        let start = match start {
            Some(s) => s,
            None => {
                let c = self.alloc(sink, 1)?;
                let s = self.host_bytes(c)?;
                self.tail = Some(Tail {
                    cluster: c,
                    end: s + len,
                    count: 1,
                });
                s
            }
        };
        sink.write_at(0, start, comp)?;
        let csize_shift = 62 - (self.cluster_bits - 8);
        if start >= 1u64 << csize_shift {
            return Err(overflow());
        }
        let sectors = ((start + len - 1) >> 9) - (start >> 9);
        let word = OFLAG_COMPRESSED | (sectors << csize_shift) | start;
        self.set_entry(g, word, self.ext_l2.then_some(0));
        Ok(())
    }

    /// Mark guest cluster `g` as reading zeros in the subclusters of `mask`
    /// (whole cluster without extended L2), hiding the backing file.
    fn store_zero(&mut self, sink: &mut dyn Sink, g: u64, mask: u64) -> Result<()> {
        if self.version < 3 {
            // No zero flag: write zeros.
            if self.zeros.len() < self.cs as usize {
                self.zeros.resize(self.cs as usize, 0);
            }
            let z = core::mem::take(&mut self.zeros);
            let r = self.store(sink, g, &z[..self.cs as usize], 0);
            self.zeros = z;
            return r;
        }
        self.l2_for(sink, g)?;
        if self.preallocated() {
            // The preallocated cluster reads zeros: mark it allocated.
            let (word, old) = self.entry(g);
            self.set_entry(g, word, Some((old | mask) & 0xffff_ffff));
        } else if self.ext_l2 {
            let (word, old) = self.entry(g);
            self.set_entry(g, word, Some(old | (mask << 32)));
        } else {
            self.set_entry(g, OFLAG_ZERO, None);
        }
        Ok(())
    }

    fn all_sc(&self) -> u64 {
        if self.nsc == 32 {
            0xffff_ffff
        } else {
            1
        }
    }

    fn begin(&mut self, g: u64) {
        self.buf.clear();
        self.buf.resize(self.cs as usize, 0);
        let mut p = Pending {
            cluster: g,
            named: [0; EXTL2_SUBCLUSTERS as usize],
            data: 0,
        };
        // Bytes past the end of what the caller writes count as named.
        let len = self.asked.saturating_sub(g * self.cs).min(self.cs);
        if len < self.cs {
            mark(&mut p, self.sc_size, len, self.cs - len, false);
        }
        self.pending = Some(p);
    }

    /// Emit the cluster being assembled.
    fn flush_pending(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut full = 0u64;
        let mut any = 0u64;
        for i in 0..self.nsc as usize {
            if u64::from(p.named[i]) == self.sc_size {
                full |= 1 << i;
            }
            if p.named[i] != 0 {
                any |= 1 << i;
            }
        }
        if self.backing && any & !full != 0 {
            return Err(limit(
                "convert to qcow2 with a backing file of data that does not cover whole clusters is not implemented yet",
            ));
        }
        if p.data == 0 {
            if self.backing {
                self.store_zero(sink, p.cluster, full)?;
            }
            return Ok(());
        }
        let buf = core::mem::take(&mut self.buf);
        let r = self.store(sink, p.cluster, &buf, any);
        self.buf = buf;
        r
    }

    fn named_full(&self, p: &Pending) -> bool {
        p.named[..self.nsc as usize]
            .iter()
            .all(|&n| u64::from(n) == self.sc_size)
    }

    /// The engine's contract: ascending, non-overlapping, inside the image.
    fn check_range(&mut self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.vsize && offset >= self.done => {
                self.done = end;
                Ok(())
            }
            _ => Err(ImageError::operation(
                "internal error: qcow2 writes out of order or beyond the end of the image",
            )),
        }
    }
}

/// Count `len` bytes at `off` of the pending cluster as named.
fn mark(p: &mut Pending, sc_size: u64, off: u64, len: u64, data: bool) {
    let mut at = off;
    let end = off + len;
    while at < end {
        let sc = at / sc_size;
        let sc_end = ((sc + 1) * sc_size).min(end);
        p.named[sc as usize] += (sc_end - at) as u32;
        if data {
            p.data |= 1 << sc;
        }
        at = sc_end;
    }
}

/// Set refcount entry `i` of a block of `width`-bit entries.
fn rc_set(block: &mut [u8], i: usize, width: u32, v: u64) {
    match width {
        1 | 2 | 4 => {
            let w = width as usize;
            let shift = i * w % 8;
            let mask = ((1u16 << w) - 1) as u8;
            let b = &mut block[i * w / 8];
            *b = (*b & !(mask << shift)) | (((v as u8) & mask) << shift);
        }
        _ => {
            let n = width as usize / 8;
            let bytes = v.to_be_bytes();
            block[i * n..(i + 1) * n].copy_from_slice(&bytes[8 - n..]);
        }
    }
}

/// Set entries `from..to` of a refcount block to 1.
fn fill_ones(block: &mut [u8], from: usize, to: usize, width: u32) {
    if from >= to {
        return;
    }
    if width >= 8 {
        let n = width as usize / 8;
        for e in block[from * n..to * n].chunks_exact_mut(n) {
            e.fill(0);
            e[n - 1] = 1;
        }
        return;
    }
    let per_byte = 8 / width as usize;
    let pattern = match width {
        1 => 0xff,
        2 => 0x55,
        _ => 0x11,
    };
    let mut i = from;
    while i < to && !i.is_multiple_of(per_byte) {
        rc_set(block, i, width, 1);
        i += 1;
    }
    let whole = (to - i) / per_byte;
    block[i / per_byte..i / per_byte + whole].fill(pattern);
    i += whole * per_byte;
    while i < to {
        rc_set(block, i, width, 1);
        i += 1;
    }
}

impl ImageWriter for Qcow2Writer {
    fn granularity(&self) -> u64 {
        self.cs.max(64 << 10)
    }

    fn write(&mut self, sink: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let cs = self.cs;
        let mut pos = offset;
        let mut d = data;
        while !d.is_empty() {
            let g = pos / cs;
            let within = pos % cs;
            if self.pending.as_ref().is_some_and(|p| p.cluster != g) {
                self.flush_pending(sink)?;
            }
            if within == 0 && self.pending.is_none() && d.len() as u64 >= cs {
                // Whole clusters straight from the caller's buffer.
                let n = d.len() as u64 / cs;
                let (run, rest) = d.split_at((n * cs) as usize);
                let all = self.all_sc();
                self.store(sink, g, run, all)?;
                pos += n * cs;
                d = rest;
                continue;
            }
            if self.pending.is_none() {
                self.begin(g);
            }
            let take = (d.len() as u64).min(cs - within);
            let (part, rest) = d.split_at(take as usize);
            self.buf[within as usize..(within + take) as usize].copy_from_slice(part);
            let sc = self.sc_size;
            if let Some(p) = &mut self.pending {
                mark(p, sc, within, take, true);
            }
            if self.pending.as_ref().is_some_and(|p| self.named_full(p)) {
                self.flush_pending(sink)?;
            }
            pos += take;
            d = rest;
        }
        Ok(())
    }

    fn zero(&mut self, sink: &mut dyn Sink, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if !self.backing {
            // Unnamed ranges read as zeros already.
            return Ok(());
        }
        let cs = self.cs;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let g = pos / cs;
            let within = pos % cs;
            if self.pending.as_ref().is_some_and(|p| p.cluster != g) {
                self.flush_pending(sink)?;
            }
            let cl_end = (g * cs + cs).min(end);
            let whole = cl_end == g * cs + cs || cl_end >= self.asked;
            if within == 0 && self.pending.is_none() && whole {
                let all = self.all_sc();
                self.store_zero(sink, g, all)?;
                pos = g * cs + cs;
                continue;
            }
            if self.pending.is_none() {
                self.begin(g);
            }
            let take = cl_end - pos;
            let sc = self.sc_size;
            if let Some(p) = &mut self.pending {
                mark(p, sc, within, take, false);
            }
            if self.pending.as_ref().is_some_and(|p| self.named_full(p)) {
                self.flush_pending(sink)?;
            }
            pos += take;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, sink: &mut dyn Sink) -> Result<()> {
        self.flush_pending(sink)?;
        self.write_l2(sink)?;
        self.tail = None;
        let data_end = self.host_bytes(self.next_free)?;
        self.fill_to(sink, data_end)?;

        // Refcount blocks not yet written and the refcount table go at the
        // end; they count themselves, so iterate to the fixed point.
        let r = self.rb_entries;
        let base = self.next_free;
        let unwritten = |blocks: u64, w: &Self| -> u64 {
            (0..blocks)
                .filter(|&b| w.rb_written.get(b as usize).is_none_or(|&o| o == 0))
                .count() as u64
        };
        let mut total = base;
        let (blocks, table_clusters) = loop {
            let blocks = total.div_ceil(r);
            let table_clusters = (blocks * 8).div_ceil(self.cs).max(1);
            let next = base + unwritten(blocks, &self) + table_clusters;
            if next <= total {
                break (blocks, table_clusters);
            }
            total = next;
        };
        if table_clusters * self.cs > QCOW2_MAX_REFTABLE_BYTES {
            return Err(limit("qcow2 target: refcount table too large"));
        }
        self.host_bytes(total)?;
        self.next_free = total;

        // Block offsets: the early ones, then the rest in index order.
        let mut table = vec![0u8; (table_clusters * self.cs) as usize];
        let mut at = base;
        let width = 1u32 << self.refcount_order;
        let kept = self.block.take();
        let mut out: Vec<u8> = Vec::new();
        let mut out_at = self.host_bytes(base)?;
        for b in 0..blocks {
            let early = self.rb_written.get(b as usize).copied().unwrap_or(0);
            let host = if early != 0 {
                early
            } else {
                let lo = b * r;
                let hi = (lo + r).min(total);
                let start = out.len();
                match &kept {
                    Some(k) if k.index == b => {
                        out.extend_from_slice(&k.bytes);
                        // Clusters allocated since the block was loaded.
                        let from = (base.max(lo) - lo) as usize;
                        fill_ones(&mut out[start..], from, (hi - lo) as usize, width);
                    }
                    _ => {
                        out.resize(start + self.cs as usize, 0);
                        fill_ones(&mut out[start..], 0, (hi - lo) as usize, width);
                    }
                }
                if out.len() >= BULK_WRITE {
                    sink.write_at(0, out_at, &out)?;
                    out_at += out.len() as u64;
                    out.clear();
                }
                at += 1;
                at - 1
            };
            let e = (b * 8) as usize;
            table[e..e + 8].copy_from_slice(&self.host_bytes(host)?.to_be_bytes());
        }
        if !out.is_empty() {
            sink.write_at(0, out_at, &out)?;
        }
        let table_offset = self.host_bytes(at)?;
        sink.write_at(0, table_offset, &table)?;

        if !self.l1.is_empty() {
            let mut l1 = Vec::with_capacity(self.l1.len() * 8);
            for e in &self.l1 {
                l1.extend_from_slice(&e.to_be_bytes());
            }
            sink.write_at(0, self.l1_offset, &l1)?;
        }
        sink.set_len(0, self.host_bytes(total)?)?;
        let header = self.header(self.l1.len() as u64, table_offset, table_clusters)?;
        sink.write_at(0, 0, &header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{MapImage, Mapping};
    use crate::qcow2::map::Qcow2Map;
    use crate::qcow2::tables::{L2Entry, L1E_OFFSET_MASK, REFT_OFFSET_MASK};
    use crate::qcow2::Qcow2Image;
    use crate::write::MemSink;
    use crate::MemFiles;
    use alloc::string::String;

    fn opts() -> Qcow2Options {
        Qcow2Options {
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: Compression::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
        }
    }

    /// Deterministic guest data: runs of noise and of repeated text.
    fn content(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                v.extend_from_slice(b"qcow2 writer test text ");
            } else {
                v.extend_from_slice(&x.to_le_bytes());
            }
        }
        v.truncate(len);
        v
    }

    enum Op {
        Data(u64, usize),
        Zero(u64, u64),
    }

    /// Write `ops` (ascending) and return the image and the guest content
    /// it must read as (`under` is the backing file's content).
    fn build(
        o: &Qcow2Options,
        compress: bool,
        size: u64,
        ops: &[Op],
        under: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
        let mut sink = MemSink::new(&["out.qcow2"]);
        let mut w: Box<dyn ImageWriter> =
            Box::new(Qcow2Writer::create(&mut sink, o, compress, size).unwrap());
        let mut expect = vec![0u8; size as usize];
        let n = under.len().min(expect.len());
        expect[..n].copy_from_slice(&under[..n]);
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Data(off, len) => {
                    let d = content(i as u64 + 1, len);
                    w.write(&mut sink, off, &d).unwrap();
                    expect[off as usize..off as usize + len].copy_from_slice(&d);
                }
                Op::Zero(off, len) => {
                    w.zero(&mut sink, off, len).unwrap();
                    expect[off as usize..(off + len) as usize].fill(0);
                }
            }
        }
        w.finish(&mut sink).unwrap();
        (sink.files.remove(0), expect)
    }

    fn decompress(h: &crate::qcow2::header::Qcow2Header, raw: &[u8], cs: usize) -> Vec<u8> {
        if h.compression_type == COMPRESSION_ZSTD {
            use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
            use ruzstd::io::Read;
            let mut input = raw;
            let mut d = FrameDecoder::new();
            d.init(&mut input).unwrap();
            d.decode_blocks(&mut input, BlockDecodingStrategy::All)
                .unwrap();
            let mut out = vec![0u8; cs];
            let mut got = 0;
            while got < cs {
                let n = d.read(&mut out[got..]).unwrap();
                assert!(n > 0, "zstd stream too short");
                got += n;
            }
            out
        } else {
            let mut out = miniz_oxide::inflate::decompress_to_vec(raw).unwrap();
            out.truncate(cs);
            assert_eq!(out.len(), cs);
            out
        }
    }

    /// The guest content as this crate's reader sees it (compressed
    /// clusters decoded through the L2 entries).
    fn read_back(img: &[u8], under: &[u8]) -> Vec<u8> {
        let mut files = MemFiles::new(img.to_vec());
        let image = Qcow2Image::open(&mut files, 0).unwrap();
        let h = image.header.clone();
        let cs = h.cluster_size();
        let mut map = Qcow2Map::open(&mut files, 0).unwrap();
        let size = map.virtual_size();
        let mut out = vec![0u8; size as usize];
        let mut off = 0;
        while off < size {
            let e = map.block_status(&mut files, off, size - off).unwrap();
            let (a, b) = (off as usize, (off + e.length) as usize);
            match e.mapping {
                Mapping::Data { at } => out[a..b]
                    .copy_from_slice(&img[at.offset as usize..at.offset as usize + (b - a)]),
                Mapping::Zero { .. } => {}
                Mapping::Unallocated { .. } => {
                    let e = b.min(under.len());
                    if a < e {
                        out[a..e].copy_from_slice(&under[a..e]);
                    }
                }
                Mapping::Compressed => {
                    let mut g = off;
                    while g < off + e.length {
                        let cl = g / cs;
                        let l2 =
                            be64_at(img, h.l1_table_offset + cl / (cs / h.l2_entry_size()) * 8)
                                & L1E_OFFSET_MASK;
                        let word =
                            be64_at(img, l2 + cl % (cs / h.l2_entry_size()) * h.l2_entry_size());
                        let L2Entry::Compressed { offset, sectors } = h.decode_l2(word) else {
                            panic!("not compressed")
                        };
                        let end = (offset + sectors * 512 - (offset & 511)).min(img.len() as u64);
                        let data = decompress(&h, &img[offset as usize..end as usize], cs as usize);
                        let within = (g % cs) as usize;
                        let n = ((cs - g % cs).min(off + e.length - g)) as usize;
                        out[g as usize..g as usize + n].copy_from_slice(&data[within..within + n]);
                        g += n as u64;
                    }
                }
                Mapping::Opaque => panic!("opaque"),
            }
            off += e.length;
        }
        out
    }

    /// `got` may be longer by the sector rounding, which reads as zeros.
    fn same(got: &[u8], want: &[u8]) {
        assert_eq!(got.len(), want.len().next_multiple_of(512));
        assert!(got[want.len()..].iter().all(|&b| b == 0));
        let got = &got[..want.len()];
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "guest byte {i} ({:#x}) differs: {} != {}",
                i, got[i], want[i]
            );
        }
    }

    fn be64_at(img: &[u8], at: u64) -> u64 {
        crate::bytes::be64(img, at as usize)
    }

    /// qemu-img check's refcount comparison: every cluster's refcount equals
    /// the references to it; COPIED set exactly where the count is 1.
    fn check_refcounts(img: &[u8]) {
        let mut files = MemFiles::new(img.to_vec());
        let h = Qcow2Image::open(&mut files, 0).unwrap().header;
        let cs = h.cluster_size();
        let clusters = (img.len() as u64).div_ceil(cs);
        let mut refs = vec![0u64; clusters as usize];
        let mut inc = |off: u64, len: u64| {
            for c in off / cs..=(off + len - 1) / cs {
                refs[c as usize] += 1;
            }
        };
        inc(0, cs);
        if h.l1_size > 0 {
            inc(h.l1_table_offset, u64::from(h.l1_size) * 8);
        }
        let es = h.l2_entry_size();
        for i in 0..u64::from(h.l1_size) {
            let e = be64_at(img, h.l1_table_offset + i * 8);
            if e == 0 {
                continue;
            }
            assert!(e & OFLAG_COPIED != 0);
            let l2 = e & L1E_OFFSET_MASK;
            inc(l2, cs);
            for j in 0..cs / es {
                let word = be64_at(img, l2 + j * es);
                match h.decode_l2(word) {
                    L2Entry::Normal { offset, copied } => {
                        assert!(copied);
                        inc(offset, cs)
                    }
                    L2Entry::Zero {
                        preallocated: Some(o),
                    } => inc(o, cs),
                    L2Entry::Compressed { offset, sectors } => {
                        if es == 16 {
                            assert_eq!(be64_at(img, l2 + j * es + 8), 0);
                        }
                        inc(offset, sectors * 512 - (offset & 511))
                    }
                    _ => {}
                }
            }
        }
        inc(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        let width = h.refcount_bits() as u32;
        let per = cs * 8 / u64::from(width);
        let mut blocks = Vec::new();
        for i in 0..u64::from(h.refcount_table_clusters) * cs / 8 {
            let e = be64_at(img, h.refcount_table_offset + i * 8) & REFT_OFFSET_MASK;
            if e != 0 {
                inc(e, cs);
            }
            blocks.push(e);
        }
        for c in 0..clusters {
            let b = blocks[(c / per) as usize];
            assert!(b != 0, "no refcount block for cluster {c}");
            let blk = &img[b as usize..(b + cs) as usize];
            let i = (c % per) as usize;
            let got = match width {
                1 | 2 | 4 => {
                    let w = width as usize;
                    u64::from((blk[i * w / 8] >> (i * w % 8)) & ((1u16 << w) - 1) as u8)
                }
                _ => {
                    let n = width as usize / 8;
                    let mut v = 0u64;
                    for &x in &blk[i * n..(i + 1) * n] {
                        v = v << 8 | u64::from(x);
                    }
                    v
                }
            };
            assert_eq!(got, refs[c as usize], "refcount of cluster {c}");
        }
    }

    fn roundtrip(o: &Qcow2Options, compress: bool, size: u64, ops: &[Op]) -> Vec<u8> {
        let (img, expect) = build(o, compress, size, ops, &[]);
        same(&read_back(&img, &[]), &expect);
        check_refcounts(&img);
        img
    }

    /// Unaligned writes, zero ranges, whole-cluster runs, a tail cluster.
    fn mixed_ops(cs: u64, size: u64) -> Vec<Op> {
        vec![
            Op::Data(100, cs.min(1000) as usize),
            Op::Data(cs * 2 + 7, 3),
            Op::Zero(cs * 2 + 50, 10),
            Op::Data(cs * 3, (cs * 5) as usize),
            Op::Data(cs * 8 + 17, (cs * 2) as usize),
            Op::Zero(cs * 11, cs * 3),
            Op::Data(cs * 40 + cs / 2, (cs / 4) as usize),
            Op::Data(cs * 41, (cs * 3 / 2) as usize),
            Op::Data(size - 700, 700),
        ]
    }

    #[test]
    fn matrix_reads_back_with_exact_refcounts() {
        for cs in [512u64, 4096, 65536, 1 << 21] {
            let widths: &[u32] = if cs > 65536 {
                &[1, 16]
            } else {
                &[1, 2, 8, 16, 64]
            };
            for &rb in widths {
                for compress in [false, true] {
                    let o = Qcow2Options {
                        cluster_size: cs,
                        refcount_bits: rb,
                        ..opts()
                    };
                    if cs > 65536 {
                        // 2 MiB clusters: a few, to keep debug builds quick.
                        let size = cs * 3 + 1234;
                        let ops = [
                            Op::Data(100, 1000),
                            Op::Data(cs + 5, cs as usize),
                            Op::Zero(cs * 2 + 5, 100),
                            Op::Data(size - 700, 700),
                        ];
                        roundtrip(&o, compress, size, &ops);
                        continue;
                    }
                    // Several L2 tables for small clusters.
                    let size = if cs <= 4096 { cs * 600 } else { cs * 45 };
                    roundtrip(&o, compress, size, &mixed_ops(cs, size));
                }
            }
        }
    }

    #[test]
    fn variants_read_back() {
        let cs = 65536;
        let size = cs * 45 - 300;
        let mut list = vec![
            (
                Qcow2Options {
                    version: 2,
                    ..opts()
                },
                false,
            ),
            (
                Qcow2Options {
                    version: 2,
                    ..opts()
                },
                true,
            ),
            (
                Qcow2Options {
                    extended_l2: true,
                    ..opts()
                },
                false,
            ),
            (
                Qcow2Options {
                    extended_l2: true,
                    ..opts()
                },
                true,
            ),
            (
                Qcow2Options {
                    compression: Compression::Zstd,
                    ..opts()
                },
                true,
            ),
            (
                Qcow2Options {
                    lazy_refcounts: true,
                    ..opts()
                },
                false,
            ),
        ];
        for p in [
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ] {
            list.push((
                Qcow2Options {
                    preallocation: p,
                    ..opts()
                },
                false,
            ));
            list.push((
                Qcow2Options {
                    preallocation: p,
                    extended_l2: true,
                    ..opts()
                },
                false,
            ));
        }
        for (o, c) in list {
            let ops = mixed_ops(cs, size);
            roundtrip(&o, c, size, &ops);
        }
    }

    #[test]
    fn preallocation_maps_every_cluster() {
        let o = Qcow2Options {
            preallocation: Preallocation::Metadata,
            ..opts()
        };
        let img = roundtrip(&o, false, 10 << 20, &[Op::Data(1 << 20, 4096)]);
        let mut files = MemFiles::new(img.clone());
        let mut map = Qcow2Map::open(&mut files, 0).unwrap();
        let e = map.block_status(&mut files, 0, 10 << 20).unwrap();
        assert!(matches!(e.mapping, Mapping::Data { .. }), "{e:?}");
        assert!(img.len() as u64 >= 10 << 20);
    }

    #[test]
    fn backing_shows_through_unnamed_ranges_and_zero_hides_it() {
        let cs = 65536u64;
        let size = cs * 20;
        let under = content(99, size as usize);
        for (version, ext) in [(3, false), (2, false), (3, true)] {
            let o = Qcow2Options {
                version,
                extended_l2: ext,
                backing_file: Some(String::from("base.raw")),
                backing_format: Some(String::from("raw")),
                ..opts()
            };
            let mut ops = vec![
                Op::Data(cs, cs as usize),
                Op::Zero(cs * 3, cs * 2),
                Op::Data(cs * 5, cs as usize / 2),
                Op::Zero(cs * 5 + cs / 2, cs / 2),
            ];
            if ext {
                // Whole subclusters may be left to the backing file.
                ops.push(Op::Data(cs * 8 + cs / 32, (cs / 32) as usize));
            }
            let (img, expect) = build(&o, false, size, &ops, &under);
            same(&read_back(&img, &under), &expect);
            check_refcounts(&img);
            let mut files = MemFiles::new(img.clone());
            let image = Qcow2Image::open(&mut files, 0).unwrap();
            assert_eq!(image.backing_file.as_deref(), Some("base.raw"));
            assert_eq!(image.extensions.backing_format.as_deref(), Some("raw"));
        }
    }

    #[test]
    fn partial_cluster_over_a_backing_file_is_refused() {
        let o = Qcow2Options {
            backing_file: Some(String::from("base.raw")),
            ..opts()
        };
        let mut sink = MemSink::new(&["out.qcow2"]);
        let mut w = Qcow2Writer::create(&mut sink, &o, false, 1 << 20).unwrap();
        w.write(&mut sink, 0, &[1; 100]).unwrap();
        let e = w.write(&mut sink, 65536 * 3, &[1; 100]).unwrap_err();
        assert!(e.message.contains("not implemented yet"), "{}", e.message);
    }

    #[test]
    fn header_fields_and_extensions_as_qemu_writes_them() {
        let o = Qcow2Options {
            lazy_refcounts: true,
            extended_l2: true,
            compression: Compression::Zstd,
            backing_file: Some(String::from("b.qcow2")),
            backing_format: Some(String::from("qcow2")),
            ..opts()
        };
        let (img, _) = build(&o, false, 1 << 20, &[], &[]);
        assert_eq!(crate::bytes::be32(&img, 100), 112);
        assert_eq!(be64_at(&img, 72), INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION);
        assert_eq!(be64_at(&img, 80), COMPAT_LAZY_REFCOUNTS);
        assert_eq!(img[104], COMPRESSION_ZSTD);
        // Backing format first, then the feature table, as qemu orders them.
        assert_eq!(crate::bytes::be32(&img, 112), EXT_BACKING_FORMAT);
        assert_eq!(crate::bytes::be32(&img, 128), EXT_FEATURE_TABLE);
        assert_eq!(crate::bytes::be32(&img, 132), 384);
        // No feature table with clusters of 4 KiB and less (qemu 10.0.2).
        let (img, _) = build(
            &Qcow2Options {
                cluster_size: 4096,
                ..opts()
            },
            false,
            1 << 20,
            &[],
            &[],
        );
        assert_eq!(crate::bytes::be32(&img, 112), 0);
        // v2: a 72-byte header.
        let (img, _) = build(
            &Qcow2Options {
                version: 2,
                ..opts()
            },
            false,
            1 << 20,
            &[],
            &[],
        );
        assert_eq!(crate::bytes::be32(&img, 4), 2);
        assert_eq!(be64_at(&img, 72), 0);
    }

    #[test]
    fn empty_image() {
        let img = roundtrip(&opts(), false, 0, &[]);
        assert_eq!(be64_at(&img, 40), 0);
        assert_eq!(crate::bytes::be32(&img, 36), 0);
    }

    #[test]
    fn huge_sparse_image_stays_small() {
        // 1 TiB with data at both ends: only the clusters written, their two
        // L2 tables, a 16 KiB L1 table and the refcount structures.
        let size = 1u64 << 40;
        let o = opts();
        let mut sink = MemSink::new(&["out.qcow2"]);
        let mut w: Box<dyn ImageWriter> =
            Box::new(Qcow2Writer::create(&mut sink, &o, false, size).unwrap());
        w.write(&mut sink, 0, &content(1, 70000)).unwrap();
        w.zero(&mut sink, 70000, size - 80000).unwrap();
        w.write(&mut sink, size - 10000, &content(2, 10000))
            .unwrap();
        w.finish(&mut sink).unwrap();
        let img = sink.files.remove(0);
        assert!(img.len() < 1 << 20, "{}", img.len());
        check_refcounts(&img);
        let mut files = MemFiles::new(img.clone());
        let mut map = Qcow2Map::open(&mut files, 0).unwrap();
        let e = map.block_status(&mut files, 1 << 20, 1 << 30).unwrap();
        assert_eq!(e.mapping, Mapping::Unallocated { at: None });
    }

    #[test]
    fn incompressible_clusters_are_stored_plainly() {
        let mut x = 1u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let mut t = vec![0; 1 << PROBE_BITS];
        assert!(incompressible(&noise, &mut t));
        // Repeats farther apart than deflate's 32 KiB window would not
        // shrink; these are 16 KiB apart.
        let twice = noise[..16384].repeat(4);
        assert!(!incompressible(&twice, &mut t));
        assert!(!incompressible(&content(3, 65536), &mut t));
        let (img, expect) = build(&opts(), true, 1 << 20, &[], &[]);
        same(&read_back(&img, &[]), &expect);
        let mut sink = MemSink::new(&["o"]);
        let mut w: Box<dyn ImageWriter> =
            Box::new(Qcow2Writer::create(&mut sink, &opts(), true, 1 << 20).unwrap());
        w.write(&mut sink, 0, &noise).unwrap();
        w.write(&mut sink, 65536, &twice).unwrap();
        w.finish(&mut sink).unwrap();
        let img = sink.files.remove(0);
        let mut files = MemFiles::new(img.clone());
        let mut map = Qcow2Map::open(&mut files, 0).unwrap();
        assert!(matches!(
            map.block_status(&mut files, 0, 65536).unwrap().mapping,
            Mapping::Data { .. }
        ));
        assert_eq!(
            map.block_status(&mut files, 65536, 65536).unwrap().mapping,
            Mapping::Compressed
        );
        check_refcounts(&img);
    }

    #[test]
    fn options_qemu_refuses_are_refused() {
        let mut sink = MemSink::new(&["o"]);
        for (o, c) in [
            (
                Qcow2Options {
                    version: 2,
                    refcount_bits: 8,
                    ..opts()
                },
                false,
            ),
            (
                Qcow2Options {
                    extended_l2: true,
                    cluster_size: 8192,
                    ..opts()
                },
                false,
            ),
            (
                Qcow2Options {
                    preallocation: Preallocation::Metadata,
                    ..opts()
                },
                true,
            ),
            (
                Qcow2Options {
                    preallocation: Preallocation::Metadata,
                    backing_file: Some(String::from("b")),
                    ..opts()
                },
                false,
            ),
            (
                Qcow2Options {
                    cluster_size: 512,
                    backing_file: Some("x".repeat(420)),
                    backing_format: Some(String::from("raw")),
                    ..opts()
                },
                false,
            ),
            (
                Qcow2Options {
                    cluster_size: 256,
                    ..opts()
                },
                false,
            ),
        ] {
            assert!(Qcow2Writer::create(&mut sink, &o, c, 1 << 20).is_err());
        }
    }
}
