//! VMDK: sparse extents (VMDK4 `KDMV`, VMDK3/vmfsSparse `COWD`, ESXi
//! seSparse), text descriptors naming extent files, embedded descriptors,
//! and the descriptor's CID/parentCID/parentFileNameHint.
//!
//! `info` only needs the extents' sizes and kinds, so the grain directories
//! are never read: only the request bounds qemu checks when it reads them
//! are reproduced (an out-of-range table is an I/O error in qemu).

use crate::block::single_child;
use crate::block::{open_errno, request_fails, with_errno, EINVAL, EIO};
use crate::bytes::{be32, find, le16, le32, le64, until_nul};
use crate::limits::{VMDK_MAX_DESC_NESTING, VMDK_MAX_EXTENTS};
use crate::{Files, Result};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::{
    ChildFile, FileId, FormatSpecific, ImageError, ImageInfo, VmdkExtentInfo, VmdkInfo,
};

pub mod map;

const VMDK3_MAGIC: u32 = u32::from_be_bytes(*b"COWD");
const VMDK4_MAGIC: u32 = u32::from_be_bytes(*b"KDMV");
const SESPARSE_CONST_MAGIC: u64 = 0xcafe_babe;
const SESPARSE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VMDK4_FLAG_RGD: u32 = 1 << 1;
const VMDK4_FLAG_ZERO_GRAIN: u32 = 1 << 2;
const VMDK4_FLAG_MARKER: u32 = 1 << 16;
const VMDK4_GD_AT_END: u64 = u64::MAX;
const VMDK4_COMPRESSION_DEFLATE: u16 = 1;
/// qemu reads at most this much of a descriptor (it caps the allocation).
const DESC_READ_MAX: u64 = (1 << 20) - 1;
/// The window qemu searches for CID, parentCID and parentFileNameHint.
const DESC_SIZE: usize = 20 * 512;
/// qemu's PATH_MAX-sized backing name buffer.
const BACKING_NAME_MAX: usize = 4095;

/// qemu's probe: binary magic, or a text descriptor whose first
/// non-comment, non-blank line is `version=1|2|3`.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() < 4 {
        return 0;
    }
    let magic = be32(buf, 0);
    if magic == VMDK3_MAGIC || magic == VMDK4_MAGIC {
        return 100;
    }
    let end = buf.len();
    let mut p = 0;
    while p < end {
        if buf[p] == b'#' {
            while p < end && buf[p] != b'\n' {
                p += 1;
            }
            p += 1;
            continue;
        }
        if buf[p] == b' ' {
            while p < end && buf[p] == b' ' {
                p += 1;
            }
            if p < end && buf[p] == b'\r' {
                p += 1;
            }
            if p == end || buf[p] != b'\n' {
                return 0;
            }
            p += 1;
            continue;
        }
        let rest = &buf[p..];
        for v in [b"version=1", b"version=2", b"version=3"] {
            if rest.len() >= 10 && rest.starts_with(v) && rest[9] == b'\n' {
                return 100;
            }
            if rest.len() >= 11 && rest.starts_with(v) && &rest[9..11] == b"\r\n" {
                return 100;
            }
        }
        return 0;
    }
    0
}

/// Describe the vmdk image in `file`.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    parse(files, file, filename).map(|(info, _)| info)
}

/// Open the image as qemu does: its description and its extents.
fn parse(files: &mut dyn Files, file: FileId, filename: &str) -> Result<(ImageInfo, Vec<Extent>)> {
    let mut st = State {
        files,
        root: file,
        root_name: filename,
        create_type: None,
        extents: Vec::new(),
        children: single_child(file),
        nesting: 0,
    };
    let buf = st.read_desc(file, 0)?;
    let magic = be32(&buf, 0);
    let desc_offset = if magic == VMDK3_MAGIC || magic == VMDK4_MAGIC {
        st.open_sparse(file, filename, magic)?;
        0x200
    } else {
        st.open_desc_file(&buf)?;
        0
    };

    let mut desc = vec![0u8; DESC_SIZE];
    st.files.read_at(file, desc_offset, &mut desc)?;
    let desc = until_nul(&desc);
    let backing = parent_file_name_hint(desc).ok_or_else(|| open_errno(st.root_name, EINVAL))?;
    let cid = read_cid(desc, b"CID").ok_or_else(|| open_errno(st.root_name, EINVAL))?;
    let parent_cid =
        read_cid(desc, b"parentCID").ok_or_else(|| open_errno(st.root_name, EINVAL))?;

    // qemu-img info asserts at least one extent (vmdk_co_get_info); a
    // descriptor without usable extent lines aborts qemu-img.
    let first = st.extents.first().ok_or_else(|| {
        ImageError::open("VMDK descriptor names no usable extent (qemu-img aborts on this image)")
    })?;
    let same_kind = st.extents.iter().all(|e| {
        e.flat == first.flat
            && e.compressed == first.compressed
            && (e.flat || e.cluster_sectors == first.cluster_sectors)
    });
    // Mixed extent kinds make vmdk_co_get_info fail: no cluster size and
    // no dirty flag then.
    let cluster_size = if same_kind && !first.flat {
        Some(first.cluster_sectors.wrapping_mul(512))
    } else {
        None
    };
    let dirty_flag = same_kind.then_some(false);

    let total_sectors = st.extents.last().map(|e| e.end_sector).unwrap_or(0);
    if !(0..=i64::MAX / 512).contains(&total_sectors) {
        // qemu hands a negative sector count on as an errno (truncated to
        // int); strerror of those is "Unknown error N".
        let why = if total_sectors < 0 {
            format!("Unknown error {}", total_sectors.wrapping_neg() as i32)
        } else {
            "File too large".to_string()
        };
        return Err(ImageError::operation(format!(
            "Can't get image size '{}': {why}",
            filename
        )));
    }

    let extents = st
        .extents
        .iter()
        .map(|e| VmdkExtentInfo {
            filename: e.display.clone(),
            format: e.kind.clone().unwrap_or_default(),
            virtual_size: (e.sectors as u64).wrapping_mul(512),
            cluster_size: if e.flat {
                None
            } else {
                Some(e.cluster_sectors.wrapping_mul(512))
            },
            compressed: if e.compressed { Some(true) } else { None },
        })
        .collect();
    let mut children = core::mem::take(&mut st.children);
    children.reverse();
    let info = ImageInfo {
        format: "vmdk".into(),
        virtual_size: (total_sectors as u64) * 512,
        cluster_size,
        dirty_flag,
        backing_filename_format: backing.as_ref().map(|_| "vmdk".to_string()),
        backing_filename: backing,
        format_specific: Some(FormatSpecific::Vmdk(VmdkInfo {
            create_type: st.create_type.take().unwrap_or_default(),
            cid: u64::from(cid),
            parent_cid: u64::from(parent_cid),
            extents,
        })),
        children,
        ..Default::default()
    };
    Ok((info, st.extents))
}

/// One extent as qemu's `VmdkExtent` holds it (block status needs the
/// table geometry that `info` does not print).
struct Extent {
    display: String,
    flat: bool,
    compressed: bool,
    sectors: i64,
    end_sector: i64,
    cluster_sectors: u64,
    kind: Option<String>,
    /// The file holding the extent's data and tables.
    file: FileId,
    /// Flat extents: byte offset of the extent in its file.
    flat_offset: u64,
    /// Sparse extents: the grain directory (L1 table), its entry count,
    /// entries per grain table, and guest sectors per directory entry
    /// (qemu keeps this product in 32 bits).
    l1_offset: u64,
    l1_size: u32,
    l2_size: u32,
    l1_entry_sectors: u32,
    /// Compressed grains start with a marker (VMDK4_FLAG_MARKER).
    has_marker: bool,
    /// Grain table entry 1 means zeros (VMDK4_FLAG_ZERO_GRAIN).
    has_zero_grain: bool,
    /// seSparse: grain tables' and grains' offsets, in sectors.
    sesparse: Option<(u64, u64)>,
}

struct State<'a> {
    files: &'a mut dyn Files,
    root: FileId,
    root_name: &'a str,
    create_type: Option<String>,
    extents: Vec<Extent>,
    /// Attachment order; `info` reverses it (qemu lists newest first).
    children: Vec<ChildFile>,
    nesting: u32,
}

impl State<'_> {
    /// `vmdk_read_desc`: up to 1 MiB from `offset` (text users stop at the
    /// first NUL themselves).
    fn read_desc(&mut self, file: FileId, offset: u64) -> Result<Vec<u8>> {
        let size = sector_len(self.files.len(file)?);
        if size < 4 {
            return Err(ImageError::open("File is too small, not a valid image"));
        }
        let size = size.min(DESC_READ_MAX);
        if request_fails(offset, size) {
            return Err(ImageError::open(with_errno(
                "Could not read from file",
                EIO,
            )));
        }
        let mut buf = vec![0u8; size as usize];
        self.files.read_at(file, offset, &mut buf)?;
        Ok(buf)
    }

    /// `vmdk_open_sparse`: dispatch on the extent's magic.
    fn open_sparse(&mut self, file: FileId, display: &str, magic: u32) -> Result<()> {
        match magic {
            VMDK3_MAGIC => self.open_vmfs_sparse(file, display),
            VMDK4_MAGIC => self.open_vmdk4(file, display),
            _ => Err(ImageError::open("Image not in VMDK format")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add_extent(
        &mut self,
        file: FileId,
        display: &str,
        flat: bool,
        sectors: i64,
        l1_offset: u64,
        l1_size: u32,
        l2_size: u32,
        cluster_sectors: u64,
    ) -> Result<()> {
        if cluster_sectors > 0x20_0000 {
            return Err(ImageError::open(
                "Invalid granularity, image may be corrupt",
            ));
        }
        if l1_size > 32 * 1024 * 1024 {
            return Err(ImageError::open("L1 size too big"));
        }
        if self.extents.len() >= VMDK_MAX_EXTENTS {
            return Err(ImageError::limit(format!(
                "VMDK image has more than {VMDK_MAX_EXTENTS} extents (VMDK_MAX_EXTENTS)"
            )));
        }
        let end_sector = self
            .extents
            .last()
            .map_or(0, |e| e.end_sector)
            .wrapping_add(sectors);
        self.extents.push(Extent {
            display: display.to_string(),
            flat,
            compressed: false,
            sectors,
            end_sector,
            cluster_sectors: if flat {
                sectors as u64
            } else {
                cluster_sectors
            },
            kind: None,
            file,
            flat_offset: 0,
            l1_offset,
            l1_size,
            l2_size,
            l1_entry_sectors: u64::from(l2_size).wrapping_mul(cluster_sectors) as u32,
            has_marker: false,
            has_zero_grain: false,
            sesparse: None,
        });
        Ok(())
    }

    /// `vmdk_init_tables`, reduced to the request checks that can fail.
    fn check_tables(&self, display: &str, l1: u64, backup: u64, bytes: u64) -> Result<()> {
        if request_fails(l1, bytes) {
            return Err(ImageError::open(with_errno(
                &format!("Could not read l1 table from extent '{display}'"),
                EIO,
            )));
        }
        if backup != 0 && request_fails(backup, bytes) {
            return Err(ImageError::open(with_errno(
                &format!("Could not read l1 backup table from extent '{display}'"),
                EIO,
            )));
        }
        Ok(())
    }

    fn open_vmfs_sparse(&mut self, file: FileId, display: &str) -> Result<()> {
        let mut h = [0u8; 44];
        self.files.read_at(file, 0, &mut h)?;
        let disk_sectors = le32(&h, 12);
        let granularity = le32(&h, 16);
        let l1dir_offset = u64::from(le32(&h, 20)) << 9;
        let l1dir_size = le32(&h, 24);
        self.add_extent(
            file,
            display,
            false,
            i64::from(disk_sectors),
            l1dir_offset,
            l1dir_size,
            4096,
            u64::from(granularity),
        )?;
        self.check_tables(display, l1dir_offset, 0, u64::from(l1dir_size) * 4)
    }

    fn open_vmdk4(&mut self, file: FileId, display: &str) -> Result<()> {
        let mut sector = [0u8; 512];
        self.files.read_at(file, 0, &mut sector)?;
        let mut h = Vmdk4Header::parse(&sector);
        if h.capacity == 0 && h.desc_offset != 0 {
            if self.nesting >= VMDK_MAX_DESC_NESTING {
                return Err(ImageError::limit(format!(
                    "VMDK embedded descriptors nest deeper than {VMDK_MAX_DESC_NESTING} \
                     (VMDK_MAX_DESC_NESTING)"
                )));
            }
            let buf = self.read_desc(file, h.desc_offset.wrapping_shl(9))?;
            self.nesting += 1;
            let r = self.open_desc_file(&buf);
            self.nesting -= 1;
            return r;
        }
        if self.create_type.is_none() {
            self.create_type = Some("monolithicSparse".into());
        }
        if h.gd_offset == VMDK4_GD_AT_END {
            // The footer (header copy) sits one sector before the
            // end-of-stream marker, which is the last sector.
            let len = self.files.len(file)?;
            let sectors = len.div_ceil(512);
            let at = sectors.wrapping_mul(512).wrapping_sub(1536);
            if (at as i64) < 0 || request_fails(at, 1536) {
                return Err(ImageError::open(with_errno("Failed to read footer", EIO)));
            }
            let mut f = [0u8; 1536];
            self.files.read_at(file, at, &mut f)?;
            if be32(&f, 512) != VMDK4_MAGIC
                || le32(&f, 8) != 0
                || le32(&f, 12) != 3
                || le64(&f, 1024) != 0
                || le32(&f, 1032) != 0
                || le32(&f, 1036) != 0
            {
                return Err(ImageError::open("Invalid footer"));
            }
            h = Vmdk4Header::parse(&f[512..1024]);
        }
        let compressed = h.compress_algorithm == VMDK4_COMPRESSION_DEFLATE;
        if h.version > 3 {
            return Err(ImageError::open(format!(
                "Unsupported VMDK version {}",
                h.version
            )));
        }
        if h.num_gtes_per_gt > 512 {
            return Err(ImageError::open("L2 table size too big"));
        }
        let l1_entry_sectors = u64::from(h.num_gtes_per_gt).wrapping_mul(h.granularity) as u32;
        if l1_entry_sectors == 0 {
            return Err(ImageError::open("L1 entry size is invalid"));
        }
        // C wraps the sum before dividing.
        let l1_size = (h
            .capacity
            .wrapping_add(u64::from(l1_entry_sectors))
            .wrapping_sub(1)
            / u64::from(l1_entry_sectors)) as u32;
        let backup = if h.flags & VMDK4_FLAG_RGD != 0 {
            h.rgd_offset.wrapping_shl(9)
        } else {
            0
        };
        let nb_sectors = self.files.len(file)?.div_ceil(512);
        if nb_sectors < h.grain_offset {
            return Err(ImageError::open(format!(
                "File truncated, expecting at least {} bytes",
                h.grain_offset.wrapping_mul(512) as i64
            )));
        }
        self.add_extent(
            file,
            display,
            false,
            h.capacity as i64,
            h.gd_offset.wrapping_shl(9),
            l1_size,
            h.num_gtes_per_gt,
            h.granularity,
        )?;
        if let Some(e) = self.extents.last_mut() {
            e.has_marker = h.flags & VMDK4_FLAG_MARKER != 0;
            e.has_zero_grain = h.flags & VMDK4_FLAG_ZERO_GRAIN != 0;
        }
        if compressed {
            if let Some(e) = self.extents.last_mut() {
                e.compressed = true;
            }
            self.create_type = Some("streamOptimized".into());
        }
        self.check_tables(
            display,
            h.gd_offset.wrapping_shl(9),
            backup,
            u64::from(l1_size) * 4,
        )
    }

    fn open_se_sparse(&mut self, file: FileId, display: &str) -> Result<()> {
        let mut c = [0u8; 512];
        self.files.read_at(file, 0, &mut c)?;
        let q = |i: usize| le64(&c, i * 8);
        let (magic, version, capacity, grain_size, gt_size, flags) =
            (q(0), q(1), q(2), q(3), q(4), q(5));
        if magic != SESPARSE_CONST_MAGIC {
            return Err(ImageError::open(format!(
                "Bad const header magic: 0x{magic:016x}"
            )));
        }
        if version != 0x0000_0002_0000_0001 {
            return Err(ImageError::open(format!(
                "Unsupported version: 0x{version:016x}"
            )));
        }
        if grain_size != 8 {
            return Err(ImageError::open(format!(
                "Unsupported grain size: {grain_size}"
            )));
        }
        if gt_size != 64 {
            return Err(ImageError::open(format!(
                "Unsupported grain table size: {gt_size}"
            )));
        }
        if flags != 0 {
            return Err(ImageError::open(format!(
                "Unsupported flags: 0x{flags:016x}"
            )));
        }
        let (r1, r2, r3, r4) = (q(6), q(7), q(8), q(9));
        if r1 != 0 || r2 != 0 || r3 != 0 || r4 != 0 {
            return Err(ImageError::open(format!(
                "Unsupported reserved bits: 0x{r1:016x} 0x{r2:016x} 0x{r3:016x} 0x{r4:016x}"
            )));
        }
        if c[208..].iter().any(|&b| b != 0) {
            return Err(ImageError::open(
                "Unsupported non-zero const header padding",
            ));
        }
        let vol_at = q(10).wrapping_mul(512);
        if request_fails(vol_at, 512) {
            return Err(ImageError::open(with_errno(
                &format!("Could not read volatile header from file '{display}'"),
                EIO,
            )));
        }
        let mut v = [0u8; 512];
        self.files.read_at(file, vol_at, &mut v)?;
        let vmagic = le64(&v, 0);
        if vmagic != SESPARSE_VOLATILE_MAGIC {
            return Err(ImageError::open(format!(
                "Bad volatile header magic: 0x{vmagic:016x}"
            )));
        }
        if le64(&v, 24) != 0 {
            return Err(ImageError::open(
                "Image is dirty, Replaying journal not supported",
            ));
        }
        if v[32..].iter().any(|&b| b != 0) {
            return Err(ImageError::open(
                "Unsupported non-zero volatile header padding",
            ));
        }
        let gd_offset = q(16).wrapping_mul(512);
        let l1_size = (q(17).wrapping_mul(512) / 8) as u32;
        // gt_size is 64 sectors of 8-byte entries.
        self.add_extent(
            file,
            display,
            false,
            capacity as i64,
            gd_offset,
            l1_size,
            4096,
            grain_size,
        )?;
        if let Some(e) = self.extents.last_mut() {
            e.sesparse = Some((q(18), q(24)));
        }
        self.check_tables(display, gd_offset, 0, u64::from(l1_size) * 8)
    }

    /// `vmdk_open_desc_file`: createType, then the extent lines.
    fn open_desc_file(&mut self, buf: &[u8]) -> Result<()> {
        let desc = until_nul(buf);
        let ct = parse_description(desc, b"createType", 128)
            .ok_or_else(|| ImageError::open("invalid VMDK image descriptor"))?;
        let ct = String::from_utf8_lossy(ct).into_owned();
        const SUPPORTED: [&str; 6] = [
            "monolithicFlat",
            "vmfs",
            "vmfsSparse",
            "seSparse",
            "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat",
        ];
        if !SUPPORTED.contains(&ct.as_str()) {
            return Err(ImageError::open(format!("Unsupported image type '{ct}'")));
        }
        self.create_type = Some(ct);
        self.parse_extents(desc)
    }

    fn parse_extents(&mut self, desc: &[u8]) -> Result<()> {
        // qemu's sscanf from every line start skips white space across
        // lines, so blank lines all rescan the same text: quadratic on a
        // crafted 1 MiB descriptor. Each white-space run is skipped once and
        // the scan from its end reused while line starts stay inside it.
        let mut run = (usize::MAX, 0usize);
        let mut last: Option<(usize, ExtentLine)> = None;
        let mut p = 0;
        while p < desc.len() {
            let line_start = p;
            p = next_line(desc, p);
            let q = if (run.0..=run.1).contains(&line_start) {
                run.1
            } else {
                let q = skip_space(desc, line_start);
                run = (line_start, q);
                q
            };
            let m = match &last {
                Some((at, m)) if *at == q => m.clone(),
                _ => {
                    let m = scan_extent_line(&desc[q..]);
                    last = Some((q, m.clone()));
                    m
                }
            };
            if m.matches < 4 || m.access != b"RW" {
                continue;
            }
            let ty = m.kind.as_slice();
            let invalid = match ty {
                b"FLAT" => m.matches != 5 || m.flat_offset < 0,
                b"VMFS" => m.matches != 4,
                _ => m.matches != 4,
            };
            if invalid {
                let mut end = p;
                if end > line_start && desc[end - 1] == b'\n' {
                    end -= 1;
                }
                return Err(ImageError::open(format!(
                    "Invalid extent line: {}",
                    String::from_utf8_lossy(&desc[line_start..end])
                )));
            }
            const KNOWN: [&[u8]; 5] = [b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE"];
            if m.sectors <= 0 || !KNOWN.contains(&ty) {
                continue;
            }
            let fname = String::from_utf8_lossy(&m.fname).into_owned();
            let display = if fname.starts_with('/') {
                fname.clone()
            } else {
                let dir = match self.root_name.rfind('/') {
                    Some(i) => &self.root_name[..=i],
                    None => "",
                };
                format!("{dir}{fname}")
            };
            let child_name = format!("extents.{}", self.extents.len());
            let file = self.files.open(self.root, &fname)?;
            self.children.push(ChildFile {
                name: child_name,
                file,
                counts_in_disk_size: true,
            });
            match ty {
                b"FLAT" | b"VMFS" => {
                    self.add_extent(file, &display, true, m.sectors, 0, 0, 0, 0)?;
                    if let Some(e) = self.extents.last_mut() {
                        // VMFS extents start at 0; C shifts the sector
                        // count without overflow checks.
                        e.flat_offset = if ty == b"FLAT" {
                            (m.flat_offset as u64).wrapping_shl(9)
                        } else {
                            0
                        };
                    }
                }
                b"SPARSE" | b"VMFSSPARSE" => {
                    let len = sector_len(self.files.len(file)?);
                    if len < 4 {
                        return Err(ImageError::open("File is too small, not a valid image"));
                    }
                    let mut magic = [0u8; 4];
                    self.files.read_at(file, 0, &mut magic)?;
                    self.open_sparse(file, &display, u32::from_be_bytes(magic))?;
                }
                _ => self.open_se_sparse(file, &display)?,
            }
            if let Some(e) = self.extents.last_mut() {
                e.kind = Some(String::from_utf8_lossy(ty).into_owned());
            }
        }
        Ok(())
    }
}

struct Vmdk4Header {
    version: u32,
    flags: u32,
    capacity: u64,
    granularity: u64,
    desc_offset: u64,
    num_gtes_per_gt: u32,
    rgd_offset: u64,
    gd_offset: u64,
    grain_offset: u64,
    compress_algorithm: u16,
}

impl Vmdk4Header {
    /// `s` starts at the magic.
    fn parse(s: &[u8]) -> Self {
        Self {
            version: le32(s, 4),
            flags: le32(s, 8),
            capacity: le64(s, 12),
            granularity: le64(s, 20),
            desc_offset: le64(s, 28),
            num_gtes_per_gt: le32(s, 44),
            rgd_offset: le64(s, 48),
            gd_offset: le64(s, 56),
            grain_offset: le64(s, 64),
            compress_algorithm: le16(s, 77),
        }
    }
}

/// File nodes report their length rounded up to whole sectors.
fn sector_len(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

fn next_line(s: &[u8], p: usize) -> usize {
    match s[p..].iter().position(|&c| c == b'\n') {
        Some(i) => p + i + 1,
        None => s.len(),
    }
}

/// `vmdk_parse_description`: the text between `NAME="` (skipping any two
/// bytes after the first occurrence of NAME) and the next quote.
fn parse_description<'a>(desc: &'a [u8], name: &[u8], buf_size: usize) -> Option<&'a [u8]> {
    let pos = find(desc, name)? + name.len() + 2;
    if pos >= desc.len() {
        return None;
    }
    let len = desc[pos..].iter().position(|&c| c == b'"')?;
    if buf_size < len + 1 {
        return None;
    }
    Some(&desc[pos..pos + len])
}

/// `vmdk_parent_open`: `Ok(None)` without a hint, `None` when qemu fails
/// with EINVAL.
fn parent_file_name_hint(desc: &[u8]) -> Option<Option<String>> {
    let Some(pos) = find(desc, b"parentFileNameHint") else {
        return Some(None);
    };
    let p = pos + b"parentFileNameHint".len() + 2;
    if p > desc.len() {
        return None;
    }
    let len = desc[p..].iter().position(|&c| c == b'"')?;
    if len > BACKING_NAME_MAX {
        return None;
    }
    Some(Some(
        String::from_utf8_lossy(&desc[p..p + len]).into_owned(),
    ))
}

/// `vmdk_read_cid`: the first `NAME` anywhere, one byte skipped, then
/// `sscanf("%x")`.
fn read_cid(desc: &[u8], name: &[u8]) -> Option<u32> {
    let window = &desc[..desc.len().min(DESC_SIZE - 1)];
    let p = find(window, name)? + name.len() + 1;
    scan_hex(window.get(p..).unwrap_or(&[]))
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn skip_space(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    i
}

/// glibc `%x` into an unsigned int: strtoul semantics, then truncation.
fn scan_hex(s: &[u8]) -> Option<u32> {
    let mut i = skip_space(s, 0);
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    if i + 2 < s.len() + 1
        && s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
    }
    let start = i;
    let mut v: u64 = 0;
    let mut overflow = false;
    while i < s.len() && s[i].is_ascii_hexdigit() {
        let d = u64::from((s[i] as char).to_digit(16).unwrap_or(0));
        match v.checked_mul(16).and_then(|x| x.checked_add(d)) {
            Some(x) => v = x,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return None;
    }
    if overflow {
        v = u64::MAX;
    } else if neg {
        v = v.wrapping_neg();
    }
    Some(v as u32)
}

/// glibc `%ld` (strtoll saturation).
fn scan_i64(s: &[u8], i: usize) -> Option<(i64, usize)> {
    let mut i = skip_space(s, i);
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let start = i;
    let mut v: i128 = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        v = (v * 10 + i128::from(s[i] - b'0')).min(i128::from(u64::MAX) + 1);
        i += 1;
    }
    if i == start {
        return None;
    }
    let v = if neg { -v } else { v };
    Some((
        v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
        i,
    ))
}

/// `%Ns`: skip white space, then up to `max` non-space bytes.
fn scan_word(s: &[u8], i: usize, max: usize) -> Option<(Vec<u8>, usize)> {
    let mut i = skip_space(s, i);
    let start = i;
    while i < s.len() && i - start < max && !is_space(s[i]) {
        i += 1;
    }
    if i == start {
        return None;
    }
    Some((s[start..i].to_vec(), i))
}

#[derive(Default, Clone)]
struct ExtentLine {
    matches: u32,
    access: Vec<u8>,
    sectors: i64,
    kind: Vec<u8>,
    fname: Vec<u8>,
    flat_offset: i64,
}

/// qemu's `sscanf(p, "%10s %ld %10s \"%511[^\n\r\"]\" %ld", ...)`, which
/// reads from the line start on through the rest of the descriptor.
fn scan_extent_line(s: &[u8]) -> ExtentLine {
    let mut m = ExtentLine {
        flat_offset: -1,
        ..Default::default()
    };
    let Some((access, i)) = scan_word(s, 0, 10) else {
        return m;
    };
    m.access = access;
    m.matches = 1;
    let Some((sectors, i)) = scan_i64(s, i) else {
        return m;
    };
    m.sectors = sectors;
    m.matches = 2;
    let Some((kind, i)) = scan_word(s, i, 10) else {
        return m;
    };
    m.kind = kind;
    m.matches = 3;
    let i = skip_space(s, i);
    if s.get(i) != Some(&b'"') {
        return m;
    }
    let start = i + 1;
    let mut j = start;
    while j < s.len() && j - start < 511 && !matches!(s[j], b'\n' | b'\r' | b'"') {
        j += 1;
    }
    if j == start {
        return m;
    }
    m.fname = s[start..j].to_vec();
    m.matches = 4;
    if s.get(j) != Some(&b'"') {
        return m;
    }
    if let Some((off, _)) = scan_i64(s, j + 1) {
        m.flat_offset = off;
        m.matches = 5;
    }
    m
}

#[cfg(test)]
mod tests {
    //! Expected texts and values come from qemu-img 10.0.2 on the same
    //! bytes (see the lead's notes for the generator scripts).
    use super::*;
    use crate::MemFiles;
    use instar_wire::ErrorKind;

    fn desc(ct: &str, extents: &str, extra: &str) -> Vec<u8> {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
             createType=\"{ct}\"\n{extra}\n# Extent description\n{extents}\n\n# The Disk Data Base\n#DDB\n"
        )
        .into_bytes()
    }

    fn with(root: Vec<u8>, named: &[(&str, Vec<u8>)]) -> MemFiles {
        let mut f = MemFiles::new(root);
        f.named = named
            .iter()
            .map(|(n, d)| (n.to_string(), d.clone()))
            .collect();
        f
    }

    fn run(files: &mut MemFiles, name: &str) -> Result<ImageInfo> {
        info(files, 0, name)
    }

    fn err(files: &mut MemFiles, name: &str) -> String {
        run(files, name).unwrap_err().message
    }

    fn vmdk_of(i: &ImageInfo) -> &VmdkInfo {
        match &i.format_specific {
            Some(FormatSpecific::Vmdk(v)) => v,
            _ => panic!("no vmdk section"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sparse(
        capacity: u64,
        gran: u64,
        gtes: u32,
        gd: u64,
        rgd: u64,
        grain_off: u64,
        version: u32,
        comp: u16,
    ) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"KDMV");
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&3u32.to_le_bytes());
        for v in [capacity, gran, 1, 20] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(&gtes.to_le_bytes());
        for v in [rgd, gd, grain_off] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(b"\0\n \r\n");
        h.extend_from_slice(&comp.to_le_bytes());
        h.resize(512, 0);
        h.extend_from_slice(&desc("monolithicSparse", "RW 2048 SPARSE \"x.vmdk\"", ""));
        h.resize(128 * 512, 0);
        h
    }

    fn plain_sparse() -> Vec<u8> {
        sparse(2048, 128, 512, 21, 0, 128, 1, 0)
    }

    #[test]
    fn probe_magic_and_descriptor() {
        assert_eq!(probe(b"KDMV\0\0\0\0", "x"), 100);
        assert_eq!(probe(b"COWD\0\0\0\0", "x"), 100);
        assert_eq!(probe(b"# c\n  \nversion=1\n", "x"), 100);
        assert_eq!(probe(b"   \r\nversion=3\r\n", "x"), 100);
        assert_eq!(probe(b" x\nversion=1\n", "x"), 0);
        assert_eq!(probe(b"version=4\n", "x"), 0);
        assert_eq!(probe(b"KDM", "x"), 0);
        assert_eq!(probe(b"version=1", "x"), 0);
    }

    #[test]
    fn monolithic_sparse() {
        let mut f = MemFiles::new(plain_sparse());
        let i = run(&mut f, "dir/a.vmdk").unwrap();
        assert_eq!(i.virtual_size, 2048 * 512);
        assert_eq!(i.cluster_size, Some(65536));
        let v = vmdk_of(&i);
        assert_eq!(
            (v.create_type.as_str(), v.cid, v.parent_cid),
            ("monolithicSparse", 0x12345678, 0xffff_ffff)
        );
        assert_eq!(v.extents.len(), 1);
        assert_eq!(v.extents[0].filename, "dir/a.vmdk");
        assert_eq!(v.extents[0].format, "");
        assert_eq!(v.extents[0].cluster_size, Some(65536));
        assert_eq!(v.extents[0].compressed, None);
        let names: Vec<_> = i.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["file"]);
        assert_eq!(i.backing_filename, None);
    }

    #[test]
    fn stream_optimized_and_version3() {
        let mut f = MemFiles::new(sparse(2048, 128, 512, 21, 0, 128, 3, 1));
        let i = run(&mut f, "s.vmdk").unwrap();
        let v = vmdk_of(&i);
        assert_eq!(v.create_type, "streamOptimized");
        assert_eq!(v.extents[0].compressed, Some(true));
    }

    #[test]
    fn backing_hint() {
        let mut img = plain_sparse();
        let d = desc(
            "monolithicSparse",
            "RW 2048 SPARSE \"x.vmdk\"",
            "parentFileNameHint=\"base.vmdk\"",
        );
        img[512..512 + d.len()].copy_from_slice(&d);
        let i = run(&mut MemFiles::new(img), "c.vmdk").unwrap();
        assert_eq!(i.backing_filename.as_deref(), Some("base.vmdk"));
        assert_eq!(i.backing_filename_format.as_deref(), Some("vmdk"));
    }

    #[test]
    fn flat_descriptor_with_two_extents() {
        let d = desc(
            "twoGbMaxExtentFlat",
            "RW 2048 FLAT \"a-f001.vmdk\" 0\nRW 100 FLAT \"a-f002.vmdk\" 0",
            "",
        );
        let mut f = with(
            d,
            &[
                ("a-f001.vmdk", vec![0; 1024]),
                ("a-f002.vmdk", vec![0; 1024]),
            ],
        );
        let i = run(&mut f, "/tmp/x/a.vmdk").unwrap();
        assert_eq!(i.virtual_size, 2148 * 512);
        assert_eq!(i.cluster_size, None);
        let v = vmdk_of(&i);
        assert_eq!(v.extents[0].filename, "/tmp/x/a-f001.vmdk");
        assert_eq!(v.extents[1].format, "FLAT");
        assert_eq!(v.extents[1].virtual_size, 100 * 512);
        let names: Vec<_> = i.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["extents.1", "extents.0", "file"]);
    }

    #[test]
    fn sparse_extents_in_descriptor() {
        let d = desc(
            "twoGbMaxExtentSparse",
            "RW 2048 SPARSE \"s1.vmdk\"\nRW 2048 SPARSE \"s2.vmdk\"",
            "",
        );
        let mut f = with(
            d,
            &[("s1.vmdk", plain_sparse()), ("s2.vmdk", plain_sparse())],
        );
        let i = run(&mut f, "t.vmdk").unwrap();
        assert_eq!(i.cluster_size, Some(65536));
        assert_eq!(vmdk_of(&i).create_type, "twoGbMaxExtentSparse");
        assert_eq!(vmdk_of(&i).extents[1].format, "SPARSE");
    }

    #[test]
    fn ignored_lines_and_scanf_quirks() {
        // Non-RW access and non-positive sizes are skipped; a blank line
        // before an extent makes qemu's sscanf read that extent twice.
        let d = b"version=1\nCID=1\nparentCID=2\ncreateType=\"monolithicFlat\"\n\nRDONLY 9 FLAT \"f\" 0\nRW -5 FLAT \"f\" 0\n\nRW 7 FLAT \"f\" 0\n".to_vec();
        let mut f = with(d, &[("f", vec![0; 512])]);
        let i = run(&mut f, "d.vmdk").unwrap();
        assert_eq!(i.virtual_size, 14 * 512);
        assert_eq!(vmdk_of(&i).cid, 1);
    }

    #[test]
    fn descriptor_errors() {
        let cases: [(Vec<u8>, &str); 6] = [
            (
                b"version=1\nCID=1\nparentCID=2\nRW 2048 FLAT \"f\" 0\n".to_vec(),
                "invalid VMDK image descriptor",
            ),
            (
                desc("monolithicSparse", "RW 1 FLAT \"f\" 0", ""),
                "Unsupported image type 'monolithicSparse'",
            ),
            (
                desc("monolithicFlat", "RW 2048 FLAT \"f\"", ""),
                "Invalid extent line: RW 2048 FLAT \"f\"",
            ),
            (
                desc("monolithicFlat", "RW 2048 FLAT \"f\" -5", ""),
                "Invalid extent line: RW 2048 FLAT \"f\" -5",
            ),
            (
                desc("vmfs", "RW 2048 VMFS \"f\" 0", ""),
                "Invalid extent line: RW 2048 VMFS \"f\" 0",
            ),
            (
                desc("monolithicFlat", "RW 2048 FLAT \"f\" 0", "")
                    .split(|&c| c == b'C')
                    .next()
                    .unwrap()
                    .to_vec(),
                "invalid VMDK image descriptor",
            ),
        ];
        for (d, want) in cases {
            let mut f = with(d, &[("f", vec![0; 512])]);
            assert_eq!(err(&mut f, "d.vmdk"), want);
        }
        let long = format!("RW 2048 FLAT \"{}\" 0", "a".repeat(600));
        let mut f = with(desc("monolithicFlat", &long, ""), &[]);
        assert_eq!(
            err(&mut f, "d.vmdk"),
            format!("Invalid extent line: {long}")
        );
        // "CID" is found inside "parentCID" when the CID line is missing;
        // without parentCID the lookup fails.
        let no_cid = String::from_utf8(desc("monolithicFlat", "RW 1 FLAT \"f\" 0", ""))
            .unwrap()
            .replace("parentCID=ffffffff\n", "");
        let mut f = with(no_cid.into_bytes(), &[("f", vec![0; 512])]);
        assert_eq!(
            err(&mut f, "d.vmdk"),
            "Could not open 'd.vmdk': Invalid argument"
        );
        // An unclosed hint runs to the next quote anywhere; with none left,
        // qemu fails.
        let mut open_hint = desc("monolithicFlat", "RW 1 FLAT \"f\" 0", "");
        open_hint.extend_from_slice(b"parentFileNameHint=\"abc\n");
        let mut f = with(open_hint, &[("f", vec![0; 512])]);
        assert_eq!(
            err(&mut f, "d.vmdk"),
            "Could not open 'd.vmdk': Invalid argument"
        );
        assert_eq!(
            err(&mut MemFiles::new(Vec::new()), "e.vmdk"),
            "File is too small, not a valid image"
        );
        assert_eq!(
            err(&mut MemFiles::new(b"ab".to_vec()), "e.vmdk"),
            "invalid VMDK image descriptor"
        );
    }

    #[test]
    fn extent_paths_go_through_open() {
        for path in ["/etc/passwd", "../../secret.img"] {
            let d = desc("monolithicFlat", &format!("RW 1 FLAT \"{path}\" 0"), "");
            let mut f = with(d, &[]);
            // MemFiles refuses unknown names; the host's error passes as is.
            assert_eq!(
                err(&mut f, "d.vmdk"),
                format!("Could not open '{path}': No such file or directory")
            );
        }
        let d = desc("monolithicFlat", "RW 1 FLAT \"../up.bin\" 0", "");
        let i = run(&mut with(d, &[("../up.bin", vec![0; 512])]), "a/b.vmdk").unwrap();
        assert_eq!(vmdk_of(&i).extents[0].filename, "a/../up.bin");
    }

    #[test]
    fn sparse_header_errors() {
        let cases: [(Vec<u8>, &str); 8] = [
            (
                sparse(2048, 128, 512, 21, 0, 128, 4, 0),
                "Unsupported VMDK version 4",
            ),
            (
                sparse(2048, 128, 1000, 21, 0, 128, 1, 0),
                "L2 table size too big",
            ),
            (
                sparse(2048, 0, 512, 21, 0, 128, 1, 0),
                "L1 entry size is invalid",
            ),
            (
                sparse(2048, 0x30_0000, 512, 21, 0, 128, 1, 0),
                "Invalid granularity, image may be corrupt",
            ),
            (
                sparse(2048, 128, 512, 21, 0, 100_000, 1, 0),
                "File truncated, expecting at least 51200000 bytes",
            ),
            (sparse(1 << 40, 8, 512, 21, 0, 128, 1, 0), "L1 size too big"),
            (
                sparse(2048, 128, 512, 0x7f_ffff_ffff_ffff, 0, 128, 1, 0),
                "Could not read l1 table from extent 's.vmdk': Input/output error",
            ),
            (
                sparse(2048, 128, 512, u64::MAX, 0, 128, 1, 0),
                "Invalid footer",
            ),
        ];
        for (img, want) in cases {
            assert_eq!(err(&mut MemFiles::new(img), "s.vmdk"), want);
        }
        let mut small = sparse(2048, 128, 512, u64::MAX, 0, 128, 1, 0);
        small.truncate(1024);
        assert_eq!(
            err(&mut MemFiles::new(small), "s.vmdk"),
            "Failed to read footer: Input/output error"
        );
        let huge = sparse(1 << 62, 1, 1, 21, 0, 128, 1, 0);
        let e = run(&mut MemFiles::new(huge), "s.vmdk").unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (
                ErrorKind::Operation,
                "Can't get image size 's.vmdk': File too large"
            )
        );
    }

    #[test]
    fn sizes_past_qemus_range() {
        let d = desc(
            "monolithicFlat",
            "RW 9223372036854775807 FLAT \"f\" 0\nRW 100 FLAT \"f\" 0",
            "",
        );
        let e = run(&mut with(d, &[("f", vec![0; 512])]), "d13.vmdk").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Operation);
        assert_eq!(
            e.message,
            "Can't get image size 'd13.vmdk': Unknown error -99"
        );
    }

    #[test]
    fn hostile_limits() {
        // More extents than VMDK_MAX_EXTENTS: refused, not opened forever.
        let lines: String = (0..VMDK_MAX_EXTENTS + 1)
            .map(|_| "RW 1 FLAT \"f\" 0\n")
            .collect();
        let e = run(
            &mut with(desc("monolithicFlat", &lines, ""), &[("f", vec![0; 512])]),
            "d.vmdk",
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Limit);
        // A sparse extent whose embedded descriptor names itself: qemu
        // recurses until it crashes; we stop at VMDK_MAX_DESC_NESTING.
        let mut me = sparse(0, 128, 512, 21, 0, 128, 1, 0);
        let d = desc("twoGbMaxExtentSparse", "RW 2048 SPARSE \"me.vmdk\"", "");
        me[512..512 + d.len()].copy_from_slice(&d);
        let e = run(&mut with(me.clone(), &[("me.vmdk", me)]), "me.vmdk").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Limit);
        // A descriptor larger than qemu's 1 MiB read window: the tail is
        // never seen, so the extent after it does not count.
        let mut big = desc("monolithicFlat", "RW 1 FLAT \"f\" 0", "");
        big.resize(2 << 20, b'#');
        big.extend_from_slice(b"\nRW 5 FLAT \"f\" 0\n");
        let i = run(&mut with(big, &[("f", vec![0; 512])]), "d.vmdk").unwrap();
        assert_eq!(i.virtual_size, 512);
    }

    #[test]
    fn vmfs_sparse_and_sesparse() {
        let mut c = b"COWD".to_vec();
        for v in [1u32, 3, 4096, 16, 4, 8, 100, 0, 0] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.resize(8192, 0);
        let d = desc("vmfsSparse", "RW 4096 VMFSSPARSE \"c.vmdk\"", "");
        let i = run(&mut with(d, &[("c.vmdk", c.clone())]), "v.vmdk").unwrap();
        assert_eq!(vmdk_of(&i).extents[0].cluster_size, Some(16 * 512));
        assert_eq!(vmdk_of(&i).extents[0].format, "VMFSSPARSE");
        c[16..20].copy_from_slice(&0x30_0000u32.to_le_bytes());
        let d = desc("vmfsSparse", "RW 4096 VMFSSPARSE \"c.vmdk\"", "");
        assert_eq!(
            err(&mut with(d, &[("c.vmdk", c)]), "v.vmdk"),
            "Invalid granularity, image may be corrupt"
        );
        let d = desc("seSparse", "RW 2048 SESPARSE \"z\"", "");
        assert_eq!(
            err(&mut with(d, &[("z", vec![0; 4096])]), "v.vmdk"),
            "Bad const header magic: 0x0000000000000000"
        );
        let d = desc("twoGbMaxExtentSparse", "RW 2048 SPARSE \"z\"", "");
        assert_eq!(
            err(&mut with(d, &[("z", vec![0; 4096])]), "v.vmdk"),
            "Image not in VMDK format"
        );
    }

    #[test]
    fn mixed_extents_have_no_cluster_size_or_dirty_flag() {
        let d = desc(
            "twoGbMaxExtentSparse",
            "RW 2048 FLAT \"f\" 0\nRW 2048 SPARSE \"s.vmdk\"",
            "",
        );
        let mut f = with(d, &[("f", vec![0; 512]), ("s.vmdk", plain_sparse())]);
        let i = run(&mut f, "m.vmdk").unwrap();
        assert_eq!((i.cluster_size, i.dirty_flag), (None, None));
        assert_eq!(vmdk_of(&i).extents[1].cluster_size, Some(65536));
        let i = run(&mut MemFiles::new(plain_sparse()), "p.vmdk").unwrap();
        assert_eq!(i.dirty_flag, Some(false));
    }

    #[test]
    fn sesparse_extent() {
        let mut c = Vec::new();
        for v in [
            0xcafe_babe_u64,
            0x2_0000_0001,
            8192,
            8,
            64,
            0,
            0,
            0,
            0,
            0,
            1,
            1,
            2,
            1,
            3,
            8,
            11,
            1,
            12,
            64,
            0,
            0,
            0,
            0,
            76,
            0,
        ] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.resize(512, 0);
        c.extend_from_slice(&0xcafe_cafe_u64.to_le_bytes());
        c.resize(80 * 512, 0);
        let d = desc("seSparse", "RW 8192 SESPARSE \"se.bin\"", "");
        let i = run(&mut with(d.clone(), &[("se.bin", c.clone())]), "se.vmdk").unwrap();
        assert_eq!((i.virtual_size, i.cluster_size), (8192 * 512, Some(4096)));
        assert_eq!(vmdk_of(&i).extents[0].format, "SESPARSE");
        c[512 + 24] = 1;
        assert_eq!(
            err(&mut with(d, &[("se.bin", c)]), "se.vmdk"),
            "Image is dirty, Replaying journal not supported"
        );
    }

    #[test]
    fn blank_line_floods_stay_linear() {
        // 1 MiB of newlines then spaces: qemu rescans the rest of the text
        // from every line start; this must finish promptly.
        let mut d = desc("monolithicFlat", "RW 1 FLAT \"f\" 0", "");
        d.extend(core::iter::repeat_n(b'\n', 600_000));
        d.extend_from_slice(b"RW");
        d.extend(core::iter::repeat_n(b' ', 400_000));
        let i = run(&mut with(d, &[("f", vec![0; 512])]), "d.vmdk").unwrap();
        assert_eq!(i.virtual_size, 512);
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on a qemu-img-created monolithicSparse image cut
        // short.
        let cut = |n: usize| {
            let mut f = with(plain_sparse()[..n].to_vec(), &[]);
            err(&mut f, "x.vmdk")
        };
        assert_eq!(cut(1), "invalid VMDK image descriptor");
        for n in [4, 16, 32] {
            assert_eq!(cut(n), "L1 entry size is invalid");
        }
        for n in [100, 4096] {
            assert_eq!(cut(n), "File truncated, expecting at least 65536 bytes");
        }
        let run_root = |files: &mut dyn Files, file: FileId, name: &str| info(files, file, name);
        let img = plain_sparse();
        crate::hostile::truncations(run_root, &img, "x.vmdk", 96);
        crate::hostile::absurd_fields(run_root, &img, "x.vmdk", 0..96, &crate::hostile::no_fix);
    }
}
