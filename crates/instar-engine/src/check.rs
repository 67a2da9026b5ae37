//! `check`: qemu's consistency check, without repair.
//!
//! qcow2 follows qemu 10's `qcow2_check_refcounts`: count every reference
//! the metadata makes (header, L1/L2 tables of the active layer and of each
//! snapshot, data and compressed clusters, snapshot table, refcount table
//! and blocks, crypto header, bitmaps), compare with the image's refcounts,
//! then check the COPIED flags. The same conditions are reported with the
//! same stderr lines, in the same order, and counted the same way.
//!
//! Memory and exits stay bounded for large images: the computed references
//! live in one `u16` per host cluster (exact counts above that in a side
//! map), tables are read through a window that grows on sequential reads,
//! and the COPIED checks of the active layer are made during the first walk
//! and printed after the refcount comparison, where qemu prints them, so
//! every L2 table is read once.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use instar_formats::bytes::{be16, be32, be64};
use instar_formats::qcow2::bitmap::{
    TABLE_ENTRY_FLAG_ALL_ONES, TABLE_ENTRY_OFFSET_MASK, TABLE_ENTRY_RESERVED_MASK,
};
use instar_formats::qcow2::header::{Qcow2Header, INCOMPAT_DATA_FILE};
use instar_formats::qcow2::tables::{L1E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use instar_formats::qcow2::Qcow2Image;
use instar_formats::{probe, Files, Result};
use instar_wire::{CheckResult, CheckStatus, FileId, ImageError, ROOT_FILE};

/// Most host clusters a qcow2 file may have for instar to check it: the
/// computed references take two bytes per cluster of the guest's RAM (512
/// MiB by default), so 64 Mi clusters use 128 MiB (a 4 TiB file at 64 KiB
/// clusters, 256 GiB at 4 KiB). qemu's own limit is 2^31 - 1 clusters.
pub const CHECK_MAX_CLUSTERS: u64 = 64 << 20;

/// Bytes of stderr lines one check may report (the response crosses a 2
/// MiB mailbox). A check that finds more refuses with a limit error.
pub const CHECK_MAX_DIAGNOSTIC_BYTES: usize = 1 << 20;

/// Largest read window for tables (L1, L2, refcount blocks): sequential
/// tables (the usual layout) cost one exit per window.
const WINDOW_MAX: usize = 8 << 20;
/// Largest read after a jump (a jump reads only what is asked, up to
/// this; sequential reads then double the window).
const WINDOW_MIN: usize = 256 << 10;

/// L1 entries read per step (a table may be 32 MiB).
const L1_CHUNK: u64 = 64 << 10;

/// Reserved bits of an L1 entry (qemu's L1E_RESERVED_MASK).
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Offset bits of a standard L2 entry.
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard L2 entry (qemu's L2E_STD_RESERVED_MASK).
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Offset bits of a refcount table entry.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// The allocation half of an extended L2 bitmap.
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// qemu's QCOW_MAX_L1_SIZE in bytes (bounds snapshot L1 tables).
const MAX_L1_BYTES: u64 = 0x0200_0000;
/// Size of a snapshot table entry's fixed part.
const SNAPSHOT_HEADER: u64 = 40;

/// qemu's open error for an encrypted qcow/qcow2 image without a key.
const KEY_SECRET_QCOW: &str = "Parameter 'encrypt.key-secret' is required for cipher";

/// Formats whose qemu driver has a check.
const CHECKED_FORMATS: &[&str] = &["qcow2", "qed", "vdi", "vhdx", "vmdk", "parallels"];

/// Check the image in [`ROOT_FILE`]. Open errors are returned as errors;
/// everything after the open is in the result.
pub fn check(files: &mut dyn Files, format: Option<&str>, filename: &str) -> Result<CheckResult> {
    let driver = match format {
        Some(name) => probe::find_or_err(name)?,
        None => probe::probe(files, ROOT_FILE, filename)?,
    };
    if driver.name == "qcow2" {
        let image = Qcow2Image::open(files, ROOT_FILE)?;
        // check opens with I/O: unlike info, the data file must open, and
        // an encrypted image needs its key (instar takes none).
        if image.has_data_file() {
            match &image.extensions.data_file {
                Some(name) => {
                    files.open(ROOT_FILE, name)?;
                }
                None => {
                    return Err(ImageError::open("'data-file' is required for this image"));
                }
            }
        }
        if image.header.crypt_method != 0 {
            return Err(ImageError::open(KEY_SECRET_QCOW));
        }
        // Open-time warnings come first on stderr.
        let warnings = image.info().warnings;
        let mut result = check_qcow2(files, &image)?;
        if !warnings.is_empty() {
            let mut lines: Vec<String> = warnings
                .iter()
                .enumerate()
                // error_report's line, then its hints printed bare (the
                // CLI knows the hint has no newline).
                .map(|(i, w)| {
                    if i == 0 {
                        format!("qemu-img: {w}")
                    } else {
                        w.clone()
                    }
                })
                .collect();
            lines.append(&mut result.diagnostics);
            result.diagnostics = lines;
        }
        return Ok(result);
    }
    // Other formats: the open decides first (its errors are qemu's), then
    // whether qemu has a check at all.
    (driver.info)(files, ROOT_FILE, filename)?;
    match driver.name {
        "luks" => {
            return Err(ImageError::open(
                "Parameter 'key-secret' is required for cipher",
            ))
        }
        "qcow" => {
            // qcow's crypt_method is the big-endian word at byte 36.
            let mut b = [0u8; 4];
            files.read_at(ROOT_FILE, 36, &mut b)?;
            if u32::from_be_bytes(b) != 0 {
                return Err(ImageError::open(KEY_SECRET_QCOW));
            }
        }
        _ => {}
    }
    let status = if CHECKED_FORMATS.contains(&driver.name) {
        CheckStatus::NotImplemented
    } else {
        CheckStatus::Unsupported
    };
    Ok(CheckResult::new(status, driver.name))
}

/// Why a walk stopped early: qemu returns a negative errno and the check
/// fails with its strerror.
enum Stop {
    Errno(&'static str),
    Error(ImageError),
}

impl From<ImageError> for Stop {
    fn from(e: ImageError) -> Self {
        Stop::Error(e)
    }
}

type Walk<T> = core::result::Result<T, Stop>;

/// `%#x` as C prints it (no prefix for zero).
fn hash_x(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// References counted so far, one per host cluster.
struct Refs {
    counts: Vec<u16>,
    /// Exact counts of clusters whose count reached `u16::MAX`.
    big: BTreeMap<u64, u64>,
    /// The image's largest refcount (a reference beyond it is an overflow).
    max: u64,
}

impl Refs {
    fn get(&self, k: u64) -> u64 {
        match self.counts.get(k as usize) {
            Some(&u16::MAX) => self.big.get(&k).copied().unwrap_or(u16::MAX as u64),
            Some(&c) => c as u64,
            None => 0,
        }
    }
    fn len(&self) -> u64 {
        self.counts.len() as u64
    }
    fn set(&mut self, k: u64, v: u64) {
        if v >= u16::MAX as u64 {
            self.counts[k as usize] = u16::MAX;
            self.big.insert(k, v);
        } else {
            self.counts[k as usize] = v as u16;
        }
    }
}

/// A read window over one file that grows while reads are sequential.
struct Window {
    file: FileId,
    start: u64,
    valid: usize,
    buf: Vec<u8>,
    next_size: usize,
}

impl Window {
    fn new(file: FileId) -> Self {
        Self {
            file,
            start: 0,
            valid: 0,
            buf: Vec::new(),
            next_size: WINDOW_MIN,
        }
    }

    /// Copy `out.len()` bytes at `offset` into `out`.
    fn read(&mut self, files: &mut dyn Files, offset: u64, out: &mut [u8]) -> Result<()> {
        let len = out.len();
        if len > WINDOW_MAX {
            return files.read_at(self.file, offset, out);
        }
        let end = offset.checked_add(len as u64);
        let within =
            offset >= self.start && end.is_some_and(|e| e <= self.start + self.valid as u64);
        if !within {
            // Grow only while the walk reads on from the window's end
            // (tables laid out together); a jump reads just what is asked,
            // so tables spread between data cost no extra bytes.
            let sequential = self.valid > 0 && offset == self.start + self.valid as u64;
            self.next_size = if sequential {
                (self.next_size * 2).min(WINDOW_MAX)
            } else {
                WINDOW_MIN.min(len)
            };
            let size = self.next_size.max(len);
            self.next_size = size;
            if self.buf.len() < size {
                // Grown geometrically and never shrunk: the guest's
                // allocator only reuses its most recent block.
                self.buf = vec![0u8; size];
            }
            // Never read past the file's end: those bytes are zeros anyway.
            let file_len = files.len(self.file)?;
            let want = if offset >= file_len {
                0
            } else {
                (file_len - offset).min(size as u64) as usize
            };
            self.buf[want..size].fill(0);
            if want > 0 {
                files.read_at(self.file, offset, &mut self.buf[..want])?;
            }
            self.start = offset;
            self.valid = size;
        }
        let at = (offset - self.start) as usize;
        out.copy_from_slice(&self.buf[at..at + len]);
        Ok(())
    }
}

/// The image's own refcounts, read block by block.
struct ImageRefcounts {
    reftable: Vec<u64>,
    cluster_bits: u32,
    order: u32,
    /// log2 of refcount entries per block.
    block_bits: u32,
    /// Cached block: reftable index and bytes.
    cached: Option<u64>,
    block: Vec<u8>,
}

/// One entry of a refcount block of width `2^order` bits.
fn refcount_entry(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0 => ((block[i / 8] >> (i % 8)) & 1) as u64,
        1 => ((block[i / 4] >> (2 * (i % 4))) & 3) as u64,
        2 => ((block[i / 2] >> (4 * (i % 2))) & 0xf) as u64,
        3 => block[i] as u64,
        4 => be16(block, i * 2) as u64,
        5 => be32(block, i * 4) as u64,
        _ => be64(block, i * 8),
    }
}

/// A refcount lookup failed the way qemu's `qcow2_get_refcount` fails:
/// the block offset is not cluster aligned.
struct Unaligned {
    offset: u64,
    index: u64,
}

impl ImageRefcounts {
    /// Refcount block for reftable index `t`: `Ok(None)` when there is no
    /// block (all refcounts zero).
    fn load(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        t: u64,
    ) -> Result<core::result::Result<bool, Unaligned>> {
        let Some(&entry) = self.reftable.get(t as usize) else {
            return Ok(Ok(false));
        };
        let offset = entry & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(Ok(false));
        }
        if offset & ((1u64 << self.cluster_bits) - 1) != 0 {
            return Ok(Err(Unaligned { offset, index: t }));
        }
        if self.cached != Some(t) {
            self.cached = None;
            files.read_at(file, offset, &mut self.block)?;
            self.cached = Some(t);
        }
        Ok(Ok(true))
    }

    fn get(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        cluster: u64,
    ) -> Result<core::result::Result<u64, Unaligned>> {
        let t = cluster >> self.block_bits;
        Ok(match self.load(files, file, t)? {
            Ok(true) => {
                let i = (cluster & ((1u64 << self.block_bits) - 1)) as usize;
                Ok(refcount_entry(&self.block, self.order, i))
            }
            Ok(false) => Ok(0),
            Err(u) => Err(u),
        })
    }
}

/// A COPIED-flag finding of the first walk, printed after the refcount
/// comparison.
enum Deferred {
    Line(String),
    /// qemu signals a corruption the first time a lookup fails.
    Signal(String),
}

struct Checker<'a> {
    files: &'a mut dyn Files,
    h: &'a Qcow2Header,
    file: FileId,
    file_len: u64,
    cluster_size: u64,
    data_file: bool,
    res: CheckResult,
    diag_bytes: usize,
    refs: Refs,
    window: Window,
    image: ImageRefcounts,
    /// qemu prints its corruption signal once per image.
    signaled: bool,
    deferred: Vec<Deferred>,
    l1: Vec<u8>,
    l2: Vec<u8>,
}

impl Checker<'_> {
    fn diag(&mut self, line: String) -> Walk<()> {
        self.diag_bytes += line.len() + 1;
        if self.diag_bytes > CHECK_MAX_DIAGNOSTIC_BYTES {
            return Err(Stop::Error(ImageError::limit(format!(
                "check found more problems than instar reports: over {CHECK_MAX_DIAGNOSTIC_BYTES} bytes of diagnostics (CHECK_MAX_DIAGNOSTIC_BYTES)"
            ))));
        }
        self.res.diagnostics.push(line);
        Ok(())
    }

    fn defer(&mut self, d: Deferred) -> Walk<()> {
        let n = match &d {
            Deferred::Line(s) | Deferred::Signal(s) => s.len() + 1,
        };
        self.diag_bytes += n;
        if self.diag_bytes > CHECK_MAX_DIAGNOSTIC_BYTES {
            return self.diag(String::new());
        }
        self.deferred.push(d);
        Ok(())
    }

    fn signal_message(u: &Unaligned) -> String {
        format!(
            "qcow2: Image is corrupt: Refblock offset {} unaligned (reftable index: {}); further non-fatal corruption events will be suppressed",
            hash_x(u.offset),
            hash_x(u.index)
        )
    }

    /// qemu's `qcow2_inc_refcounts_imrt`.
    fn inc(&mut self, offset: u64, size: u64) -> Walk<()> {
        if size == 0 || size > i64::MAX as u64 {
            return Ok(());
        }
        let past = (offset as i64)
            .wrapping_add(size as i64)
            .wrapping_sub(self.file_len as i64);
        if past >= self.cluster_size as i64 {
            self.res.corruptions += 1;
            return self.diag(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
        }
        let mask = !(self.cluster_size - 1);
        let start = offset & mask;
        let last = offset.wrapping_add(size).wrapping_sub(1) & mask;
        let mut c = start;
        while c <= last {
            let k = c >> self.h.cluster_bits;
            if k >= self.refs.len() {
                if k >= CHECK_MAX_CLUSTERS {
                    // qemu's array cannot grow this far either.
                    self.res.check_errors += 1;
                    return Err(Stop::Errno("Cannot allocate memory"));
                }
                self.refs.counts.resize(k as usize + 1, 0);
            }
            let r = self.refs.get(k);
            if r == self.refs.max {
                self.res.corruptions += 1;
                self.diag(format!("ERROR: overflow cluster offset={c:#x}"))?;
                self.diag(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                )?;
            } else {
                self.refs.set(k, r + 1);
            }
            match c.checked_add(self.cluster_size) {
                Some(n) => c = n,
                None => break,
            }
        }
        Ok(())
    }

    /// The image's refcount of `cluster` for the COPIED checks; `None`
    /// when the lookup fails (qemu skips the entry silently).
    fn image_refcount(&mut self, cluster: u64) -> Walk<Option<u64>> {
        match self.image.get(self.files, self.file, cluster)? {
            Ok(r) => Ok(Some(r)),
            Err(u) => {
                let m = Self::signal_message(&u);
                self.defer(Deferred::Signal(m))?;
                Ok(None)
            }
        }
    }

    /// qemu's `check_refcounts_l1`; `active` adds the allocation counts
    /// and the COPIED checks of `check_oflag_copied`.
    fn walk_l1(&mut self, l1_offset: u64, l1_size: u64, active: bool) -> Walk<()> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(l1_offset, l1_size * 8)?;
        let mut chunk = core::mem::take(&mut self.l1);
        if chunk.is_empty() {
            chunk = vec![0u8; (L1_CHUNK * 8) as usize];
        }
        let r = self.walk_l1_entries(&mut chunk, l1_offset, l1_size, active);
        self.l1 = chunk;
        r
    }

    fn walk_l1_entries(
        &mut self,
        chunk: &mut [u8],
        l1_offset: u64,
        l1_size: u64,
        active: bool,
    ) -> Walk<()> {
        let mut first = 0u64;
        while first < l1_size {
            let n = (l1_size - first).min(L1_CHUNK);
            let bytes = &mut chunk[..(n * 8) as usize];
            let at = l1_offset.wrapping_add(first * 8);
            self.window.read(self.files, at, bytes)?;
            for j in 0..n as usize {
                let entry = be64(chunk, j * 8);
                if entry == 0 {
                    continue;
                }
                self.l1_entry((first as usize + j) as u64, entry, active)?;
            }
            first += n;
        }
        Ok(())
    }

    fn l1_entry(&mut self, index: u64, entry: u64, active: bool) -> Walk<()> {
        if entry & L1E_RESERVED_MASK != 0 {
            self.res.corruptions += 1;
            self.diag(format!(
                "ERROR found L1 entry with reserved bits set: {entry:x}"
            ))?;
        }
        let l2_offset = entry & L1E_OFFSET_MASK;
        self.inc(l2_offset, self.cluster_size)?;
        if l2_offset & (self.cluster_size - 1) != 0 {
            self.res.corruptions += 1;
            self.diag(format!(
                "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ))?;
        }
        let mut l2 = core::mem::take(&mut self.l2);
        let r = self
            .window
            .read(self.files, l2_offset, &mut l2)
            .map_err(Stop::from)
            .and_then(|()| self.walk_l2(&l2, active));
        let r = r.and_then(|()| {
            if active && l2_offset != 0 {
                self.copied_l2(index, entry, l2_offset, &l2)
            } else {
                Ok(())
            }
        });
        self.l2 = l2;
        r
    }

    /// The entry type qemu's `qcow2_get_cluster_type` gives.
    fn cluster_type(&self, entry: u64) -> Type {
        if entry & OFLAG_COMPRESSED != 0 {
            Type::Compressed
        } else if entry & OFLAG_ZERO != 0 && !self.h.has_subclusters() {
            if entry & L2E_OFFSET_MASK != 0 {
                Type::ZeroAlloc
            } else {
                Type::ZeroPlain
            }
        } else if entry & L2E_OFFSET_MASK == 0 {
            // Offset 0 is valid in a data file; COPIED tells them apart.
            if self.data_file && entry & OFLAG_COPIED != 0 {
                Type::Normal
            } else {
                Type::Unallocated
            }
        } else {
            Type::Normal
        }
    }

    fn entry_at(&self, l2: &[u8], i: usize) -> (u64, u64) {
        if self.h.has_subclusters() {
            (be64(l2, i * 16), be64(l2, i * 16 + 8))
        } else {
            (be64(l2, i * 8), 0)
        }
    }

    /// qemu's `check_refcounts_l2`.
    fn walk_l2(&mut self, l2: &[u8], active: bool) -> Walk<()> {
        let entries = 1usize << self.h.l2_bits();
        let cb = self.h.cluster_bits;
        let csize_shift = 62 - (cb - 8);
        let csize_mask = (1u64 << (cb - 8)) - 1;
        let coffset_mask = (1u64 << csize_shift) - 1;
        let mut next_contiguous = 0u64;
        for i in 0..entries {
            let (mut entry, bitmap) = self.entry_at(l2, i);
            let ty = self.cluster_type(entry);
            if ty != Type::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.diag(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ))?;
            }
            match ty {
                Type::Compressed => {
                    if entry & OFLAG_COPIED != 0 {
                        self.res.corruptions += 1;
                        self.diag(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            entry & coffset_mask
                        ))?;
                        entry &= !OFLAG_COPIED;
                    }
                    if self.data_file {
                        self.res.corruptions += 1;
                        self.diag(format!(
                            "ERROR compressed cluster {i} with data file, entry={}",
                            hash_x(entry)
                        ))?;
                        continue;
                    }
                    if bitmap != 0 {
                        self.res.corruptions += 1;
                        self.diag(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={}",
                            hash_x(entry)
                        ))?;
                        continue;
                    }
                    let coffset = entry & coffset_mask;
                    let sectors = ((entry >> csize_shift) & csize_mask) + 1;
                    let csize = sectors * 512 - (coffset & 511);
                    self.inc(coffset, csize)?;
                    if active {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        self.res.fragmented_clusters += 1;
                    }
                }
                Type::ZeroAlloc | Type::Normal => {
                    let offset = entry & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.res.corruptions += 1;
                        self.diag(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ))?;
                    }
                    if offset & (self.cluster_size - 1) != 0 {
                        self.res.corruptions += 1;
                        let contains_data = if self.h.has_subclusters() {
                            bitmap & L2_BITMAP_ALL_ALLOC != 0
                        } else {
                            entry & OFLAG_ZERO == 0
                        };
                        self.diag(if contains_data {
                            format!("ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
                        } else {
                            format!("ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        })?;
                    }
                    if active {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(self.cluster_size);
                    }
                    if !self.data_file {
                        self.inc(offset, self.cluster_size)?;
                    }
                }
                Type::ZeroPlain => {}
                Type::Unallocated => {
                    if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        self.res.corruptions += 1;
                        self.diag(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// qemu's `check_oflag_copied` for one L1 entry and its L2 table.
    fn copied_l2(&mut self, index: u64, l1_entry: u64, l2_offset: u64, l2: &[u8]) -> Walk<()> {
        if let Some(r) = self.image_refcount(l2_offset >> self.h.cluster_bits)? {
            if (r == 1) != (l1_entry & OFLAG_COPIED != 0) {
                self.res.corruptions += 1;
                self.defer(Deferred::Line(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={l1_entry:x} refcount={r}"
                )))?;
            }
        }
        let entries = 1usize << self.h.l2_bits();
        for j in 0..entries {
            let (entry, _) = self.entry_at(l2, j);
            if !matches!(self.cluster_type(entry), Type::Normal | Type::ZeroAlloc) {
                continue;
            }
            let r = if self.data_file {
                1
            } else {
                match self.image_refcount((entry & L2E_OFFSET_MASK) >> self.h.cluster_bits)? {
                    Some(r) => r,
                    None => continue,
                }
            };
            if (r == 1) != (entry & OFLAG_COPIED != 0) {
                self.res.corruptions += 1;
                self.defer(Deferred::Line(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={r}"
                )))?;
            }
        }
        Ok(())
    }

    /// qemu's `check_refblocks`.
    fn refblocks(&mut self) -> Walk<()> {
        for i in 0..self.image.reftable.len() {
            let e = self.image.reftable[i];
            let offset = e & REFT_OFFSET_MASK;
            let cluster = offset >> self.h.cluster_bits;
            if e & REFT_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.diag(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ))?;
                continue;
            }
            if offset & (self.cluster_size - 1) != 0 {
                self.res.corruptions += 1;
                self.diag(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ))?;
                continue;
            }
            if cluster >= self.refs.len() {
                self.res.corruptions += 1;
                self.diag(format!("ERROR refcount block {i} is outside image"))?;
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cluster_size)?;
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.res.corruptions += 1;
                    self.diag(format!("ERROR refcount block {i} refcount={r}"))?;
                }
            }
        }
        Ok(())
    }

    /// qemu's `compare_refcounts`; gives the highest cluster in use.
    fn compare(&mut self) -> Walk<u64> {
        let n = self.refs.len();
        let per_block = 1u64 << self.image.block_bits;
        let mut highest = 0u64;
        let mut t = 0u64;
        while t * per_block < n {
            let lo = t * per_block;
            let hi = (lo + per_block).min(n);
            let state = self.image.load(self.files, self.file, t)?;
            match state {
                Err(u) => {
                    if !self.signaled {
                        self.signaled = true;
                        self.diag(Self::signal_message(&u))?;
                    }
                    for i in lo..hi {
                        self.res.check_errors += 1;
                        self.diag(format!(
                            "Can't get refcount for cluster {i}: Input/output error"
                        ))?;
                    }
                }
                Ok(present) => {
                    for i in lo..hi {
                        let r1 = if present {
                            refcount_entry(&self.image.block, self.image.order, (i - lo) as usize)
                        } else {
                            0
                        };
                        let r2 = self.refs.get(i);
                        if r1 > 0 || r2 > 0 {
                            highest = i;
                        }
                        if r1 != r2 {
                            let what = if r1 < r2 { "ERROR" } else { "Leaked" };
                            if r1 < r2 {
                                self.res.corruptions += 1;
                            } else {
                                self.res.leaks += 1;
                            }
                            self.diag(format!("{what} cluster {i} refcount={r1} reference={r2}"))?;
                        }
                    }
                }
            }
            t += 1;
        }
        Ok(highest)
    }

    /// qemu's `qcow2_check_bitmaps_refcounts`.
    fn bitmaps(&mut self, image: &Qcow2Image) -> Walk<()> {
        let Some(ext) = &image.extensions.bitmaps else {
            return Ok(());
        };
        if ext.nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc(ext.directory_offset, ext.directory_size)?;
        let mut buf = vec![0u8; 64 << 10];
        for bm in &image.bitmaps {
            let size = bm.table_size as u64;
            self.inc(bm.table_offset, size * 8)?;
            // qemu loads (and validates) the whole table first.
            let mut entries = Vec::new();
            let mut done = 0u64;
            while done < size {
                let n = (size - done).min(8192);
                let bytes = &mut buf[..(n * 8) as usize];
                self.window
                    .read(self.files, bm.table_offset + done * 8, bytes)?;
                for j in 0..n as usize {
                    let e = be64(bytes, j * 8);
                    let offset = e & TABLE_ENTRY_OFFSET_MASK;
                    let bad = e & TABLE_ENTRY_RESERVED_MASK != 0
                        || offset & (self.cluster_size - 1) != 0
                        || (e & TABLE_ENTRY_FLAG_ALL_ONES != 0 && offset != 0);
                    if bad {
                        self.res.corruptions += 1;
                        return Err(Stop::Errno("Invalid argument"));
                    }
                    if offset != 0 {
                        entries.push(offset);
                    }
                }
                done += n;
            }
            for offset in entries {
                self.inc(offset, self.cluster_size)?;
            }
        }
        Ok(())
    }

    /// The snapshot table's length in bytes as qemu computes it while
    /// reading it (entries are 8-byte aligned; the last is not padded).
    fn snapshots_size(&mut self) -> Result<u64> {
        let start = self.h.snapshots_offset;
        let mut offset = start;
        for _ in 0..self.h.nb_snapshots {
            offset = offset.next_multiple_of(8);
            let mut b = [0u8; SNAPSHOT_HEADER as usize];
            self.files.read_at(self.file, offset, &mut b)?;
            offset +=
                SNAPSHOT_HEADER + be32(&b, 36) as u64 + be16(&b, 12) as u64 + be16(&b, 14) as u64;
        }
        Ok(offset - start)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

/// qemu's `qcow2_co_check` without repair.
pub fn check_qcow2(files: &mut dyn Files, image: &Qcow2Image) -> Result<CheckResult> {
    let h = &image.header;
    let file = image.file;
    let mut res = CheckResult::new(CheckStatus::Done, "qcow2");
    let file_len = files.len(file)?;
    let cluster_size = h.cluster_size();
    let nb_clusters = file_len.div_ceil(cluster_size);
    if nb_clusters > i32::MAX as u64 {
        res.check_errors += 1;
        res.status = CheckStatus::Failed("File too large".into());
        return Ok(res);
    }
    if nb_clusters >= CHECK_MAX_CLUSTERS {
        return Err(ImageError::limit(format!(
            "checking an image file of {nb_clusters} clusters needs more memory than instar allows: the limit is {CHECK_MAX_CLUSTERS} clusters (CHECK_MAX_CLUSTERS)"
        )));
    }
    res.total_clusters = h
        .virtual_size()
        .div_ceil(512)
        .saturating_mul(512)
        .div_ceil(cluster_size);

    let order = h.refcount_order;
    let max = if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    };
    let mut counts = Vec::with_capacity(nb_clusters as usize + 1);
    counts.resize(nb_clusters as usize, 0u16);
    let reftable_entries = (h.refcount_table_clusters as u64) << (h.cluster_bits - 3);
    let mut reftable = vec![0u64; reftable_entries as usize];
    {
        let mut raw = vec![0u8; (reftable_entries * 8) as usize];
        files.read_at(file, h.refcount_table_offset, &mut raw)?;
        for (i, e) in reftable.iter_mut().enumerate() {
            *e = be64(&raw, i * 8);
        }
    }
    let mut c = Checker {
        files,
        h,
        file,
        file_len,
        cluster_size,
        data_file: h.incompatible_features & INCOMPAT_DATA_FILE != 0,
        res,
        diag_bytes: 0,
        refs: Refs {
            counts,
            big: BTreeMap::new(),
            max,
        },
        window: Window::new(file),
        image: ImageRefcounts {
            reftable,
            cluster_bits: h.cluster_bits,
            order,
            block_bits: h.cluster_bits + 3 - order,
            cached: None,
            block: vec![0u8; cluster_size as usize],
        },
        signaled: false,
        deferred: Vec::new(),
        l1: Vec::new(),
        l2: vec![0u8; cluster_size as usize],
    };
    match run(&mut c, image) {
        Ok(()) => {}
        Err(Stop::Errno(e)) => c.res.status = CheckStatus::Failed(e.into()),
        Err(Stop::Error(e)) => return Err(e),
    }
    Ok(c.res)
}

fn run(c: &mut Checker, image: &Qcow2Image) -> Walk<()> {
    let h = c.h;
    c.inc(0, c.cluster_size)?;
    c.walk_l1(h.l1_table_offset, h.l1_size as u64, true)?;
    if c.data_file && h.nb_snapshots != 0 {
        c.res.corruptions += 1;
        c.diag(format!(
            "ERROR {} snapshots in image with data file",
            h.nb_snapshots
        ))?;
    }
    for sn in &image.snapshots {
        if sn.l1_table_offset & (c.cluster_size - 1) != 0 {
            c.res.corruptions += 1;
            c.diag(format!(
                "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                sn.id,
                sn.name,
                hash_x(sn.l1_table_offset)
            ))?;
            continue;
        }
        if sn.l1_size as u64 > MAX_L1_BYTES / 8 {
            c.res.corruptions += 1;
            c.diag(format!(
                "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                sn.id,
                sn.name,
                hash_x(sn.l1_size as u64)
            ))?;
            continue;
        }
        c.walk_l1(sn.l1_table_offset, sn.l1_size as u64, false)?;
    }
    let snapshots_size = c.snapshots_size()?;
    c.inc(h.snapshots_offset, snapshots_size)?;
    c.inc(
        h.refcount_table_offset,
        (h.refcount_table_clusters as u64) << h.cluster_bits,
    )?;
    if let Some(crypto) = &image.extensions.crypto_header {
        c.inc(crypto.offset, crypto.length)?;
    }
    c.bitmaps(image)?;
    c.refblocks()?;
    let highest = c.compare()?;
    for d in core::mem::take(&mut c.deferred) {
        match d {
            Deferred::Line(s) => c.res.diagnostics.push(s),
            Deferred::Signal(s) => {
                if !c.signaled {
                    c.signaled = true;
                    c.res.diagnostics.push(s);
                }
            }
        }
    }
    c.res.image_end_offset = (highest + 1) * c.cluster_size;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Hand-built 512-byte-cluster images (header, reftable, refblock, L1,
    //! L2, one data cluster), each edited one way. Every expectation is
    //! what qemu-img 10.0.2 `check` printed for the same bytes.
    use super::*;
    use instar_formats::MemFiles;

    const CS: usize = 512;

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn image(clusters: usize, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = vec![0u8; clusters * CS];
        let words: [(usize, u64, usize); 18] = [
            (0, 0x5146_49fb, 4),
            (4, 3, 4),
            (8, 0, 8),
            (16, 0, 4),
            (20, 9, 4),
            (24, 65536, 8),
            (32, 0, 4),
            (36, 2, 4),
            (40, 3 * CS as u64, 8),
            (48, CS as u64, 8),
            (56, 1, 4),
            (60, 0, 4),
            (64, 0, 8),
            (72, 0, 8),
            (80, 0, 8),
            (88, 0, 8),
            (96, 4, 4),
            (100, 104, 4),
        ];
        for (at, v, n) in words {
            b[at..at + n].copy_from_slice(&v.to_be_bytes()[8 - n..]);
        }
        put64(&mut b, CS, 2 * CS as u64);
        for k in 0..clusters {
            b[2 * CS + 2 * k + 1] = 1;
        }
        put64(&mut b, 3 * CS, 4 * CS as u64 | OFLAG_COPIED);
        put64(&mut b, 4 * CS, 5 * CS as u64 | OFLAG_COPIED);
        edit(&mut b);
        b
    }

    fn run(bytes: Vec<u8>) -> CheckResult {
        check(&mut MemFiles::new(bytes), None, "x").unwrap()
    }

    fn counts(r: &CheckResult) -> (u64, u64, u64, u64, u64) {
        (
            r.corruptions,
            r.leaks,
            r.allocated_clusters,
            r.fragmented_clusters,
            r.image_end_offset,
        )
    }

    #[test]
    fn clean() {
        let r = run(image(6, |_| {}));
        assert!(r.diagnostics.is_empty());
        assert_eq!(r.total_clusters, 128);
        assert_eq!(counts(&r), (0, 0, 1, 0, 3072));
    }

    #[test]
    fn leak() {
        let r = run(image(7, |_| {}));
        assert_eq!(r.diagnostics, ["Leaked cluster 6 refcount=1 reference=0"]);
        assert_eq!(counts(&r), (0, 1, 1, 0, 3584));
    }

    #[test]
    fn double_reference() {
        let r = run(image(6, |b| {
            put64(b, 4 * CS + 8, 5 * CS as u64 | OFLAG_COPIED)
        }));
        assert_eq!(r.diagnostics, ["ERROR cluster 5 refcount=1 reference=2"]);
        assert_eq!(counts(&r), (1, 0, 2, 1, 3072));
    }

    #[test]
    fn refcount_zero_with_reference() {
        let r = run(image(6, |b| b[2 * CS + 11] = 0));
        assert_eq!(
            r.diagnostics,
            [
                "ERROR cluster 5 refcount=0 reference=1",
                "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000000a00 refcount=0"
            ]
        );
        assert_eq!(counts(&r), (2, 0, 1, 0, 3072));
    }

    #[test]
    fn copied_flag_wrong() {
        let r = run(image(6, |b| put64(b, 4 * CS, 5 * CS as u64)));
        assert_eq!(
            r.diagnostics,
            ["ERROR OFLAG_COPIED data cluster: l2_entry=a00 refcount=1"]
        );
        assert_eq!(counts(&r), (1, 0, 1, 0, 3072));
    }

    #[test]
    fn l2_past_eof() {
        let r = run(image(6, |b| {
            put64(b, 3 * CS, 100 * CS as u64 | OFLAG_COPIED)
        }));
        assert_eq!(
            r.diagnostics,
            [
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0xc800 size 0x200",
                "Leaked cluster 4 refcount=1 reference=0",
                "Leaked cluster 5 refcount=1 reference=0",
                "ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=800000000000c800 refcount=0",
            ]
        );
        assert_eq!(counts(&r), (2, 2, 0, 0, 3072));
    }

    #[test]
    fn refblock_outside_image() {
        let r = run(image(6, |b| put64(b, CS, 1 << 55)));
        assert_eq!(r.diagnostics.len(), 8);
        assert_eq!(r.diagnostics[0], "ERROR refcount block 0 is outside image");
        assert_eq!(r.diagnostics[5], "ERROR cluster 5 refcount=0 reference=1");
        assert_eq!(counts(&r), (8, 0, 1, 0, 3072));
    }

    #[test]
    fn l1_reserved_bits() {
        let r = run(image(6, |b| {
            put64(b, 3 * CS, 4 * CS as u64 | OFLAG_COPIED | 1 << 56)
        }));
        assert_eq!(
            r.diagnostics,
            ["ERROR found L1 entry with reserved bits set: 8100000000000800"]
        );
        assert_eq!(counts(&r), (1, 0, 1, 0, 3072));
    }

    /// A file that claims a huge length and reads as the image then zeros.
    struct Huge(Vec<u8>, u64);
    impl Files for Huge {
        fn len(&mut self, _: FileId) -> Result<u64> {
            Ok(self.1)
        }
        fn read_at(&mut self, _: FileId, off: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0);
            let s = (off.min(self.0.len() as u64)) as usize;
            let n = (self.0.len() - s).min(buf.len());
            buf[..n].copy_from_slice(&self.0[s..s + n]);
            Ok(())
        }
        fn open(&mut self, _: FileId, _: &str) -> Result<FileId> {
            Err(ImageError::open("no"))
        }
    }

    #[test]
    fn hostile_sizes_are_refused_not_allocated() {
        // Past qemu's INT_MAX clusters: qemu's own failure.
        let r = check(&mut Huge(image(6, |_| {}), 1 << 45), None, "x").unwrap();
        assert_eq!(r.status, CheckStatus::Failed("File too large".into()));
        // Below qemu's limit but above instar's: a limit error naming it.
        let e = check(&mut Huge(image(6, |_| {}), 1 << 36), None, "x").unwrap_err();
        assert!(e.message.contains("CHECK_MAX_CLUSTERS"), "{}", e.message);
        // Every L1 entry pointing at the same absurd L2 offset: bounded work.
        let r = run(image(6, |b| {
            put64(b, 3 * CS, 0x00ff_ffff_ffff_fe00);
            put64(b, 3 * CS + 8, 0x00ff_ffff_ffff_fe00);
        }));
        assert!(r.corruptions >= 2);
    }
}
