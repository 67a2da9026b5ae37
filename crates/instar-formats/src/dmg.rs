//! Apple disk images (UDIF, qemu's `dmg` driver, read-only): a 512-byte
//! "koly" trailer near the end of the file points at the chunk tables
//! ("mish" blocks), stored either in a classic resource fork or base64
//! encoded in an XML property list. The trailer holds the disk size.
//!
//! qemu probes dmg by file name only (a name ending in `.dmg` scores 2). At
//! open it parses every mish block and refuses chunks whose sizes pass its
//! limits; `info` does the same walk, without keeping the tables (nothing
//! in them shows in `info`). Most of qemu's refusals here set no message:
//! qemu-img then prints `Could not open 'F': Invalid argument`. Some are
//! preceded by a line qemu prints to stderr itself (chunk limits, missing
//! decompressor modules); [`info_with_diagnostics`] returns those lines.

use crate::block::{self, check_read, open_errno, EINVAL, EIO, SECTOR};
use crate::bytes::{be32, be64, find, until_nul, Window};
use crate::limits::DMG_ENTRIES_PER_READ;
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageInfo};

/// Largest chunk length in the data fork qemu accepts (DMG_LENGTHS_MAX,
/// 64 MiB: it buffers one chunk).
pub const MAX_CHUNK_LENGTH: u64 = 64 * 1024 * 1024;

/// Largest sector count of a decompressed chunk (DMG_SECTORCOUNTS_MAX).
pub const MAX_CHUNK_SECTORS: u64 = MAX_CHUNK_LENGTH / 512;

/// Largest XML property list qemu reads (16 MiB, its own cap). instar holds
/// the list in memory, as qemu does.
pub const MAX_PLIST: u64 = 16 * 1024 * 1024;

/// Whether the qemu-img being mimicked can decompress bzip2 and lzfse
/// chunks. Debian's qemu-utils 10.0.2 ships neither block module, so qemu
/// warns about such chunks and leaves them out of its tables.
pub const HAVE_BZIP2: bool = false;
/// See [`HAVE_BZIP2`].
pub const HAVE_LZFSE: bool = false;

const KOLY: &[u8] = b"koly";
const MISH: u32 = 0x6d69_7368;
/// A mish block's fixed part; chunk entries follow.
const MISH_HEADER: u32 = 204;
/// Smallest mish block qemu reads chunks from.
const MISH_MIN: u32 = 244;
const CHUNK_ENTRY: u32 = 40;

const UDZE: u32 = 0;
const UDRW: u32 = 1;
const UDIG: u32 = 2;
const UDZO: u32 = 0x8000_0005;
const UDBZ: u32 = 0x8000_0006;
const ULFO: u32 = 0x8000_0007;
const UDCM: u32 = 0x7fff_fffe;
const UDLE: u32 = 0xffff_ffff;

/// The trailer fields qemu uses (big-endian on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Koly {
    /// DataForkOffset (0x18).
    pub data_fork_offset: u64,
    /// RsrcForkOffset (0x28).
    pub rsrc_fork_offset: u64,
    /// RsrcForkLength (0x30).
    pub rsrc_fork_length: u64,
    /// XMLOffset (0xd8).
    pub plist_offset: u64,
    /// XMLLength (0xe0).
    pub plist_length: u64,
    /// SectorCount (0x1ec).
    pub sectors: u64,
}

/// Size of the trailer.
pub const KOLY_SIZE: usize = 512;

impl Koly {
    /// Decode the fields from the 512-byte trailer.
    pub fn parse(b: &[u8; KOLY_SIZE]) -> Self {
        Koly {
            data_fork_offset: be64(b, 0x18),
            rsrc_fork_offset: be64(b, 0x28),
            rsrc_fork_length: be64(b, 0x30),
            plist_offset: be64(b, 0xd8),
            plist_length: be64(b, 0xe0),
            sectors: be64(b, 0x1ec),
        }
    }

    /// Encode a trailer with these fields (for tests and tools).
    pub fn to_bytes(&self) -> [u8; KOLY_SIZE] {
        let mut b = [0u8; KOLY_SIZE];
        b[..4].copy_from_slice(KOLY);
        b[4..8].copy_from_slice(&4u32.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        for (at, v) in [
            (0x18, self.data_fork_offset),
            (0x28, self.rsrc_fork_offset),
            (0x30, self.rsrc_fork_length),
            (0xd8, self.plist_offset),
            (0xe0, self.plist_length),
            (0x1ec, self.sectors),
        ] {
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }
}

/// qemu's probe looks only at the name: longer than 4 and ending `.dmg`.
pub fn probe(_buf: &[u8], filename: &str) -> u32 {
    if filename.len() > 4 && filename.ends_with(".dmg") {
        2
    } else {
        0
    }
}

/// Open the image as qemu does and describe it. The lines qemu prints on
/// stderr on the way ride along: in [`ImageInfo::warnings`], or in the
/// error's `warnings` when qemu then refuses the image.
pub fn info(files: &mut dyn Files, file: FileId, filename: &str) -> Result<ImageInfo> {
    let mut diagnostics = Vec::new();
    match info_with_diagnostics(files, file, filename, &mut diagnostics) {
        Ok(mut info) => {
            info.warnings = diagnostics;
            Ok(info)
        }
        // qemu printed these lines before giving up on the image.
        Err(e) => Err(e.with_warnings(diagnostics)),
    }
}

/// [`info`], also giving the lines qemu-img prints to stderr on the way
/// (without the `qemu-img: ` prefix; warnings start `warning: `), in order.
/// They come before the result or the error message.
pub fn info_with_diagnostics(
    files: &mut dyn Files,
    file: FileId,
    filename: &str,
    diagnostics: &mut Vec<String>,
) -> Result<ImageInfo> {
    walk(files, file, filename, diagnostics, None).map(|(info, _)| info)
}

/// qemu's open: the trailer, then every mish block; the chunks qemu keeps
/// go to `chunks` when given.
fn walk(
    files: &mut dyn Files,
    file: FileId,
    filename: &str,
    diagnostics: &mut Vec<String>,
    chunks: Option<&mut Vec<Chunk>>,
) -> Result<(ImageInfo, u32)> {
    let einval = || open_errno(filename, EINVAL);
    let koly_at = find_koly(files, file)?;
    let mut t = [0u8; KOLY_SIZE];
    files.read_at(file, koly_at, &mut t)?;
    let k = Koly::parse(&t);

    if k.data_fork_offset > koly_at {
        return Err(einval());
    }
    if k.rsrc_fork_offset >= koly_at || k.rsrc_fork_length > koly_at - k.rsrc_fork_offset {
        return Err(einval());
    }
    if k.plist_offset >= koly_at || k.plist_length > koly_at - k.plist_offset {
        return Err(einval());
    }
    let total_sectors = k.sectors as i64;
    if total_sectors < 0 {
        return Err(einval());
    }

    let mut tables = Tables {
        n_chunks: 0,
        warned_bzip2: false,
        warned_lzfse: false,
        warned_unknown: false,
        diagnostics,
        data_fork_offset: k.data_fork_offset,
        out_offset: 0,
        in_offset: 0,
        chunks,
    };
    let walked = if k.rsrc_fork_length != 0 {
        tables.resource_fork(files, file, k.rsrc_fork_offset, k.rsrc_fork_length)
    } else if k.plist_length != 0 {
        tables.plist(files, file, k.plist_offset, k.plist_length)
    } else {
        Err(Fail::Errno(EINVAL))
    };
    match walked {
        Ok(()) => {}
        Err(Fail::Errno(errno)) => return Err(open_errno(filename, errno)),
        Err(Fail::Other(e)) => return Err(e),
    }

    let n_chunks = tables.n_chunks;
    let virtual_size = block::virtual_size(total_sectors, filename)?;
    let info = ImageInfo {
        format: "dmg".into(),
        virtual_size,
        children: block::single_child(file),
        ..ImageInfo::default()
    };
    Ok((info, n_chunks))
}

/// The trailer's offset: qemu looks for "koly" in the 515 bytes ending 511
/// bytes before the file's length rounded up to a sector (dmg files need
/// not be sector-sized, and qemu's file length is).
fn find_koly(files: &mut dyn Files, file: FileId) -> Result<u64> {
    let length = files.len(file)?.div_ceil(SECTOR).saturating_mul(SECTOR);
    if length < 512 {
        return Err(crate::ImageError::open(
            "dmg file must be at least 512 bytes long",
        ));
    }
    let offset = if length > 511 + 512 {
        length - 511 - 512
    } else {
        0
    };
    let n = length.min(515) as usize;
    let mut window = [0u8; 515];
    files.read_at(file, offset, &mut window[..n])?;
    match window[..n].windows(4).position(|w| w == KOLY) {
        Some(i) => Ok(offset + i as u64),
        None => Err(crate::ImageError::open(
            "Could not locate UDIF trailer in dmg file",
        )),
    }
}

/// The chunk-table walk: what qemu's open checks, without the tables.
struct Tables<'d> {
    /// Chunks accepted so far (qemu's `n_chunks`, which numbers chunks in
    /// its messages).
    n_chunks: u32,
    /// qemu warns once per kind of unreadable chunk.
    warned_bzip2: bool,
    warned_lzfse: bool,
    warned_unknown: bool,
    diagnostics: &'d mut Vec<String>,
    data_fork_offset: u64,
    /// The current mish block's first sector and data fork offset.
    out_offset: u64,
    in_offset: u64,
    /// Where the kept chunks go, for reads.
    chunks: Option<&'d mut Vec<Chunk>>,
}

/// One chunk as qemu keeps it: type, first sector, sector count, and the
/// bytes in the file that hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// UDZE, UDRW, UDIG or UDZO.
    pub kind: u32,
    /// First guest sector.
    pub sector: u64,
    /// Guest sectors.
    pub count: u64,
    /// File offset of the (compressed) data.
    pub offset: u64,
    /// Bytes of it.
    pub length: u64,
}

/// Where a mish block's bytes are.
enum Source<'a> {
    /// Decoded from the XML property list.
    Memory(&'a [u8]),
    /// In the resource fork, at this file offset.
    File(u64),
}

impl Source<'_> {
    /// Fill `buf` from byte `at` of the block; callers stay inside it.
    fn read(&self, files: &mut dyn Files, file: FileId, at: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Memory(m) => {
                buf.fill(0);
                let start = (at as usize).min(m.len());
                let n = (m.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&m[start..start + n]);
                Ok(())
            }
            Source::File(base) => files.read_at(file, base + at, buf),
        }
    }
}

/// A walk step's failure: an errno for qemu's generic message, or an
/// instar error (I/O through [`Files`]) to pass on as is.
enum Fail {
    Errno(i32),
    Other(crate::ImageError),
}

impl From<crate::ImageError> for Fail {
    fn from(e: crate::ImageError) -> Self {
        Fail::Other(e)
    }
}

type Walk = core::result::Result<(), Fail>;

impl Tables<'_> {
    /// qemu's dmg_read_resource_fork: the resource data is a sequence of
    /// (big-endian u32 length, mish block).
    fn resource_fork(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        begin: u64,
        length: u64,
    ) -> Walk {
        let data_offset = u64::from(read_u32(files, file, begin)?);
        if data_offset > length {
            return Err(Fail::Errno(EINVAL));
        }
        let count = read_u32(files, file, begin + 8)?;
        // qemu adds the two 32-bit values in 32 bits.
        if count == 0 || u64::from((data_offset as u32).wrapping_add(count)) > length {
            return Err(Fail::Errno(EINVAL));
        }
        let mut offset = begin + data_offset;
        let end = offset + u64::from(count);
        // A fork of tiny resources means one length read per few bytes:
        // read the lengths through a window instead of one request each.
        let mut window = Window::new();
        while offset < end {
            let mut count = [0u8; 4];
            window.read(files, file, offset, &mut count)?;
            let count = be32(&count, 0);
            if count == 0 || u64::from(count) > end - offset {
                return Err(Fail::Errno(EINVAL));
            }
            offset += 4;
            if check_read(offset as i64, u64::from(count)).is_err() {
                return Err(Fail::Errno(EIO));
            }
            self.mish(files, file, &Source::File(offset), count)?;
            offset += u64::from(count);
        }
        Ok(())
    }

    /// qemu's dmg_read_plist_xml: every `<data>...</data>` element of the
    /// list (read as a C string: it ends at the first NUL) is a base64
    /// mish block.
    fn plist(&mut self, files: &mut dyn Files, file: FileId, begin: u64, length: u64) -> Walk {
        if length == 0 || length > MAX_PLIST {
            return Err(Fail::Errno(EINVAL));
        }
        if check_read(begin as i64, length).is_err() {
            return Err(Fail::Errno(EINVAL));
        }
        let mut xml = vec![0u8; length as usize];
        files.read_at(file, begin, &mut xml)?;
        let text = until_nul(&xml);
        let mut from = 0;
        while let Some(open) = find(&text[from..], b"<data>") {
            let start = from + open + 6;
            let Some(close) = find(&text[start..], b"</data>") else {
                return Err(Fail::Errno(EINVAL));
            };
            let mish = base64_decode(&text[start..start + close]);
            self.mish(files, file, &Source::Memory(&mish), mish.len() as u32)?;
            // qemu resumes just after the '<' of "</data>".
            from = start + close + 1;
        }
        Ok(())
    }

    /// qemu's dmg_read_mish_block on a block of `count` bytes.
    fn mish(&mut self, files: &mut dyn Files, file: FileId, src: &Source<'_>, count: u32) -> Walk {
        // Too-small blocks and other resources are skipped.
        if count < MISH_MIN {
            return Ok(());
        }
        let mut h = [0u8; 0x20];
        src.read(files, file, 0, &mut h)?;
        if be32(&h, 0) != MISH {
            return Ok(());
        }
        // Chunk sectors count from the block's first sector, chunk data
        // from the block's place in the data fork (qemu adds unchecked).
        self.out_offset = be64(&h, 8);
        self.in_offset = self.data_fork_offset.wrapping_add(be64(&h, 0x18));
        let chunk_count = (count - MISH_HEADER) / CHUNK_ENTRY;
        let mut buf = vec![0u8; DMG_ENTRIES_PER_READ * CHUNK_ENTRY as usize];
        let mut j = 0u32;
        while j < chunk_count {
            let n = (chunk_count - j).min(DMG_ENTRIES_PER_READ as u32) as usize;
            let at = u64::from(MISH_HEADER) + u64::from(j) * u64::from(CHUNK_ENTRY);
            src.read(files, file, at, &mut buf[..n * CHUNK_ENTRY as usize])?;
            for e in buf[..n * CHUNK_ENTRY as usize].chunks_exact(CHUNK_ENTRY as usize) {
                self.chunk(e)?;
            }
            j += n as u32;
        }
        Ok(())
    }

    /// One 40-byte chunk entry: type, sector number, sector count, data
    /// offset, data length.
    fn chunk(&mut self, e: &[u8]) -> Walk {
        let ty = be32(e, 0);
        let known = match ty {
            UDZE | UDRW | UDIG | UDZO => true,
            UDBZ => HAVE_BZIP2,
            ULFO => HAVE_LZFSE,
            _ => false,
        };
        if !known {
            match ty {
                UDBZ if !self.warned_bzip2 => {
                    self.warned_bzip2 = true;
                    self.diagnostics.push(
                        "warning: dmg-bzip2 module is missing, accessing bzip2 compressed blocks will result in I/O errors".into(),
                    );
                }
                ULFO if !self.warned_lzfse => {
                    self.warned_lzfse = true;
                    self.diagnostics.push(
                        "warning: dmg-lzfse module is missing, accessing lzfse compressed blocks will result in I/O errors".into(),
                    );
                }
                UDBZ | ULFO | UDCM | UDLE => {}
                _ if !self.warned_unknown => {
                    self.warned_unknown = true;
                    self.diagnostics.push(format!(
                        "warning: Image contains chunks of unknown type {ty:x}, accessing them will result in I/O errors"
                    ));
                }
                _ => {}
            }
            return Ok(());
        }
        let index = self.n_chunks;
        let sector_count = be64(e, 0x10);
        if ty != UDZE && ty != UDIG && sector_count > MAX_CHUNK_SECTORS {
            self.diagnostics.push(format!(
                "sector count {sector_count} for chunk {index} is larger than max ({MAX_CHUNK_SECTORS})"
            ));
            return Err(Fail::Errno(EINVAL));
        }
        let length = be64(e, 0x20);
        if length > MAX_CHUNK_LENGTH {
            self.diagnostics.push(format!(
                "length {length} for chunk {index} is larger than max ({MAX_CHUNK_LENGTH})"
            ));
            return Err(Fail::Errno(EINVAL));
        }
        if let Some(chunks) = self.chunks.as_deref_mut() {
            if chunks.len() >= crate::limits::DMG_MAX_CHUNKS {
                return Err(Fail::Other(crate::ImageError::limit(format!(
                    "dmg: more than {} chunks (instar limit DMG_MAX_CHUNKS)",
                    crate::limits::DMG_MAX_CHUNKS
                ))));
            }
            chunks.push(Chunk {
                kind: ty,
                sector: be64(e, 8).wrapping_add(self.out_offset),
                count: sector_count,
                offset: be64(e, 0x18).wrapping_add(self.in_offset),
                length,
            });
        }
        self.n_chunks = self.n_chunks.wrapping_add(1);
        Ok(())
    }
}

/// A dmg image opened for reads. qemu's driver has no block status, so
/// the block layer calls every byte data without an offset
/// ([`crate::map::Mapping::Opaque`]). The chunk tables are built on the
/// first read (map never needs them); reads find chunks as qemu's
/// `search_chunk` does and inflate whole chunks, the last one kept.
/// bzip2 and lzfse chunks are not in the tables, as in a qemu without
/// those modules (no pure-Rust no_std decoder is used): reading them fails
/// with EIO, as there.
pub struct DmgMap {
    file: FileId,
    filename: String,
    size: u64,
    warnings: Vec<String>,
    chunks: Option<Vec<Chunk>>,
    inflater: crate::sectored::Inflater,
    /// The current chunk's bytes, sized once for the largest chunk.
    data: Vec<u8>,
    current: Option<usize>,
}

impl DmgMap {
    /// Open as qemu does (the same walk as `info`).
    pub fn open(files: &mut dyn Files, file: FileId, filename: &str) -> Result<Self> {
        let mut warnings = Vec::new();
        let info = match info_with_diagnostics(files, file, filename, &mut warnings) {
            Ok(i) => i,
            Err(e) => return Err(e.with_warnings(warnings)),
        };
        Ok(Self {
            file,
            filename: filename.into(),
            size: info.virtual_size,
            warnings,
            chunks: None,
            inflater: crate::sectored::Inflater::new(),
            data: Vec::new(),
            current: None,
        })
    }

    fn tables(&mut self, files: &mut dyn Files) -> Result<()> {
        if self.chunks.is_none() {
            // Count first so that the table is one allocation (the guest's
            // heap does not free what a growing Vec leaves behind).
            let mut diag = Vec::new();
            let (_, n) = walk(files, self.file, &self.filename, &mut diag, None)?;
            if n as usize > crate::limits::DMG_MAX_CHUNKS {
                return Err(crate::ImageError::limit(format!(
                    "dmg: more than {} chunks (instar limit DMG_MAX_CHUNKS)",
                    crate::limits::DMG_MAX_CHUNKS
                )));
            }
            let mut chunks = Vec::with_capacity(n as usize);
            walk(
                files,
                self.file,
                &self.filename,
                &mut diag,
                Some(&mut chunks),
            )?;
            let mut buf = 0u64;
            for c in &chunks {
                let need = match c.kind {
                    UDZO => c.count * 512,
                    UDRW => c.length.next_multiple_of(512).max(c.count * 512),
                    _ => 0,
                };
                buf = buf.max(need);
            }
            // Both bounded by qemu's chunk limits (64 MiB).
            self.data = vec![0u8; buf as usize];
            self.chunks = Some(chunks);
        }
        Ok(())
    }

    /// qemu's search_chunk (a binary search that trusts the order).
    fn search(chunks: &[Chunk], sector: u64) -> Option<usize> {
        let (mut lo, mut hi) = (0usize, chunks.len());
        while lo <= hi {
            let mid = (lo + hi) / 2;
            // qemu reads one past its arrays here; nothing is there.
            let c = chunks.get(mid)?;
            if c.sector > sector {
                if mid == 0 {
                    return None;
                }
                hi = mid - 1;
            } else if c.sector.wrapping_add(c.count) > sector {
                return Some(mid);
            } else {
                lo = mid + 1;
            }
        }
        None
    }

    /// dmg_read_chunk: make the chunk holding `sector` current.
    fn load(&mut self, files: &mut dyn Files, sector: u64) -> Result<Chunk> {
        use crate::block::check_read;
        let eio = || crate::sectored::read_error(EIO);
        self.tables(files)?;
        let chunks = self.chunks.as_deref().unwrap_or(&[]);
        if let Some(i) = self.current {
            let c = chunks[i];
            if c.sector <= sector && c.sector.wrapping_add(c.count) > sector {
                return Ok(c);
            }
        }
        let i = Self::search(chunks, sector).ok_or_else(eio)?;
        let c = chunks[i];
        self.current = None;
        match c.kind {
            UDZO => {
                if check_read(c.offset as i64, c.length).is_err() {
                    return Err(eio());
                }
                let out = &mut self.data[..(c.count * 512) as usize];
                let ok = self.inflater.inflate_file(
                    files,
                    self.file,
                    c.offset,
                    c.length,
                    crate::sectored::Inflate::ZlibExact,
                    out,
                )?;
                if !ok {
                    return Err(eio());
                }
            }
            UDRW => {
                if check_read(c.offset as i64, c.length).is_err() {
                    return Err(eio());
                }
                // qemu leaves whatever an earlier chunk left past `length`;
                // instar reads zeros there.
                self.data.fill(0);
                files.read_at(self.file, c.offset, &mut self.data[..c.length as usize])?;
            }
            _ => {}
        }
        self.current = Some(i);
        Ok(c)
    }
}

impl crate::map::MapImage for DmgMap {
    fn format(&self) -> &'static str {
        "dmg"
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn warnings(&self) -> &[String] {
        &self.warnings
    }
    fn block_status(
        &mut self,
        _files: &mut dyn Files,
        _offset: u64,
        len: u64,
    ) -> Result<crate::map::Extent> {
        Ok(crate::map::Extent::new(len, crate::map::Mapping::Opaque))
    }
    fn read(&mut self, files: &mut dyn Files, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / 512;
            let into = (pos % 512) as usize;
            let c = self.load(files, sector)?;
            // The rest of this chunk, at most what is asked.
            let left = (c.sector.wrapping_add(c.count) - sector).saturating_mul(512) - into as u64;
            let n = (left.min((buf.len() - done) as u64)) as usize;
            if c.kind == UDZE || c.kind == UDIG {
                buf[done..done + n].fill(0);
            } else {
                let at = ((sector - c.sector) * 512) as usize + into;
                buf[done..done + n].copy_from_slice(&self.data[at..at + n]);
            }
            done += n;
        }
        Ok(())
    }
}

fn read_u32(files: &mut dyn Files, file: FileId, at: u64) -> core::result::Result<u32, Fail> {
    let mut b = [0u8; 4];
    files.read_at(file, at, &mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// glib's g_base64_decode: characters outside the alphabet are skipped,
/// '=' counts as a zero digit, each group of four digits gives three bytes
/// minus one per '=' among its last two, and a trailing partial group is
/// dropped.
fn base64_decode(text: &[u8]) -> Vec<u8> {
    let rank = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => 0,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 1);
    let (mut v, mut i) = (0u32, 0);
    let mut last = [0u8; 2];
    for &c in text {
        let Some(r) = rank(c) else { continue };
        last[1] = last[0];
        last[0] = c;
        v = (v << 6) | r;
        i += 1;
        if i == 4 {
            out.push((v >> 16) as u8);
            if last[1] != b'=' {
                out.push((v >> 8) as u8);
            }
            if last[0] != b'=' {
                out.push(v as u8);
            }
            i = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;
    use instar_wire::ErrorKind;

    type Chunk = (u32, u64, u64, u64, u64);

    fn mish(chunks: &[Chunk]) -> Vec<u8> {
        let mut h = vec![0u8; MISH_HEADER as usize];
        h[..4].copy_from_slice(b"mish");
        h[4..8].copy_from_slice(&1u32.to_be_bytes());
        h[200..204].copy_from_slice(&(chunks.len() as u32).to_be_bytes());
        for &(ty, sector, count, off, len) in chunks {
            h.extend_from_slice(&ty.to_be_bytes());
            h.extend_from_slice(&0u32.to_be_bytes());
            for v in [sector, count, off, len] {
                h.extend_from_slice(&v.to_be_bytes());
            }
        }
        h
    }

    fn base64(data: &[u8]) -> Vec<u8> {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        for c in data.chunks(3) {
            let v = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                out.push(if i <= c.len() {
                    A[(v >> (18 - 6 * i) & 63) as usize]
                } else {
                    b'='
                });
            }
        }
        out
    }

    /// 512 bytes of data fork, the XML list, the trailer.
    fn xml_image(xml: &[u8], sectors: u64) -> Vec<u8> {
        let mut v = vec![0u8; 512];
        v.extend_from_slice(xml);
        let k = Koly {
            plist_offset: 512,
            plist_length: xml.len() as u64,
            sectors,
            ..koly0()
        };
        v.extend_from_slice(&k.to_bytes());
        v
    }

    fn plist(mishes: &[Vec<u8>]) -> Vec<u8> {
        let mut x = b"<plist><dict>".to_vec();
        for m in mishes {
            x.extend_from_slice(b"<data>\n\t");
            x.extend_from_slice(&base64(m));
            x.extend_from_slice(b"\n</data>");
        }
        x.extend_from_slice(b"</dict></plist>\n");
        x
    }

    /// 512 bytes of data fork, a resource fork holding `mishes`, the trailer.
    fn rsrc_image(mishes: &[Vec<u8>], sectors: u64) -> Vec<u8> {
        let mut res = Vec::new();
        for m in mishes {
            res.extend_from_slice(&(m.len() as u32).to_be_bytes());
            res.extend_from_slice(m);
        }
        let mut fork = Vec::new();
        for w in [16u32, 0, res.len() as u32, 0] {
            fork.extend_from_slice(&w.to_be_bytes());
        }
        fork.extend_from_slice(&res);
        let mut v = vec![0u8; 512];
        v.extend_from_slice(&fork);
        let k = Koly {
            rsrc_fork_offset: 512,
            rsrc_fork_length: fork.len() as u64,
            sectors,
            ..koly0()
        };
        v.extend_from_slice(&k.to_bytes());
        v
    }

    fn koly0() -> Koly {
        Koly {
            data_fork_offset: 0,
            rsrc_fork_offset: 0,
            rsrc_fork_length: 0,
            plist_offset: 0,
            plist_length: 0,
            sectors: 0,
        }
    }

    const OK: [Chunk; 3] = [(UDRW, 0, 1, 0, 512), (UDZE, 1, 7, 0, 0), (UDLE, 8, 0, 0, 0)];

    fn run(data: Vec<u8>, name: &str) -> (Result<ImageInfo>, Vec<String>) {
        let mut d = Vec::new();
        let r = info_with_diagnostics(&mut MemFiles::new(data), 0, name, &mut d);
        (r, d)
    }

    fn einval(data: Vec<u8>, name: &str) -> Vec<String> {
        let (r, d) = run(data, name);
        let e = r.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Open);
        assert_eq!(
            e.message,
            format!("Could not open '{name}': Invalid argument")
        );
        d
    }

    #[test]
    fn koly_round_trip() {
        let k = Koly {
            data_fork_offset: 1,
            rsrc_fork_offset: 2,
            rsrc_fork_length: 3,
            plist_offset: 0x2a_ba00,
            plist_length: 0x1f_5d00,
            sectors: 0xdba,
        };
        let b = k.to_bytes();
        assert_eq!(Koly::parse(&b), k);
        assert_eq!(&b[..4], b"koly");
        assert_eq!(&b[0x1ec..0x1f4], &[0, 0, 0, 0, 0, 0, 0x0d, 0xba]);
    }

    #[test]
    fn probe_by_name_only() {
        assert_eq!(probe(&[0; 2048], "simple-dmg.dmg"), 2);
        assert_eq!(probe(&[0; 2048], "a.dmg"), 2);
        assert_eq!(probe(&[0; 2048], ".dmg"), 0);
        assert_eq!(probe(&[0; 2048], "x.DMG"), 0);
        assert_eq!(probe(b"koly", "x.img"), 0);
    }

    #[test]
    fn both_table_forms() {
        // qemu-img: 8 sectors = 4096 bytes, by XML list and by resource fork.
        for img in [
            xml_image(&plist(&[mish(&OK)]), 8),
            rsrc_image(&[mish(&OK)], 8),
        ] {
            let (r, d) = run(img, "d0.dmg");
            let i = r.unwrap();
            assert_eq!(
                (i.format.as_str(), i.virtual_size, i.cluster_size),
                ("dmg", 4096, None)
            );
            assert_eq!(i.children, block::single_child(0));
            assert!(d.is_empty());
        }
        // Padding the file to an odd length keeps the trailer in the window.
        let mut v = xml_image(&plist(&[mish(&OK)]), 3513);
        v.extend_from_slice(&[0; 7]);
        assert_eq!(run(v, "o.dmg").0.unwrap().virtual_size, 1798656);
    }

    #[test]
    fn trailer_refusals() {
        // Messages recorded from qemu-img 10.0.2.
        let (r, _) = run(vec![], "r0");
        assert_eq!(
            r.unwrap_err().message,
            "dmg file must be at least 512 bytes long"
        );
        let (r, _) = run(vec![0; 2000], "d1.dmg");
        assert_eq!(
            r.unwrap_err().message,
            "Could not locate UDIF trailer in dmg file"
        );
        // The window ends 511 bytes before the rounded length.
        let mut v = xml_image(&plist(&[mish(&OK)]), 8);
        v.extend_from_slice(&[0; 511]);
        assert_eq!(
            run(v, "d17.dmg").0.unwrap_err().message,
            "Could not locate UDIF trailer in dmg file"
        );
        // A trailer with no tables, or one alone in the file.
        let k = Koly {
            sectors: 5,
            ..koly0()
        }
        .to_bytes()
        .to_vec();
        einval(k, "e14.dmg");
        let good = xml_image(&plist(&[mish(&OK)]), 8);
        let at = good.len() - KOLY_SIZE;
        let edit = |field: usize, v: u64| {
            let mut g = good.clone();
            g[at + field..at + field + 8].copy_from_slice(&v.to_be_bytes());
            g
        };
        einval(edit(0x18, 1_000_000), "d2.dmg");
        einval(edit(0x28, 1_000_000), "d3.dmg");
        einval(edit(0xe0, 1_000_000), "x.dmg");
        einval(edit(0xe0, 0), "d5.dmg");
        einval(edit(0x1ec, 1 << 63), "d4.dmg");
        let (r, _) = run(edit(0x1ec, 1 << 54), "d4b.dmg");
        assert_eq!(
            r.unwrap_err().message,
            "Could not refresh total sector count: File too large"
        );
        let (r, _) = run(edit(0x1ec, 1 << 62), "d4c.dmg");
        let e = r.unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (
                ErrorKind::Operation,
                "Can't get image size 'd4c.dmg': File too large"
            )
        );
        // Truncated inside the trailer.
        einval(good[..good.len() - 400].to_vec(), "d16.dmg");
    }

    #[test]
    fn chunk_limits() {
        let big_sectors = [(UDRW, 0, MAX_CHUNK_SECTORS + 1, 0, 512)];
        for img in [
            xml_image(&plist(&[mish(&big_sectors)]), 8),
            rsrc_image(&[mish(&big_sectors)], 8),
        ] {
            assert_eq!(
                einval(img, "d7.dmg"),
                ["sector count 131073 for chunk 0 is larger than max (131072)"]
            );
        }
        // Zero and ignore chunks may be any size; chunk numbers count only
        // known types, across blocks.
        let d = einval(
            xml_image(
                &plist(&[
                    mish(&OK),
                    mish(&[(0x8000_0004, 0, 1, 0, 1), (UDZO, 0, 131073, 0, 1)]),
                ]),
                8,
            ),
            "e5.dmg",
        );
        assert_eq!(d, [
            "warning: Image contains chunks of unknown type 80000004, accessing them will result in I/O errors",
            "sector count 131073 for chunk 2 is larger than max (131072)",
        ]);
        let huge = [(UDZE, 0, 1 << 60, 0, 0), (UDIG, 0, 1 << 60, 0, 0)];
        assert!(run(xml_image(&plist(&[mish(&huge)]), 8), "e8.dmg")
            .0
            .is_ok());
        let d = einval(
            xml_image(&plist(&[mish(&[(UDZE, 0, 1, 0, 1 << 40)])]), 8),
            "e13.dmg",
        );
        assert_eq!(
            d,
            ["length 1099511627776 for chunk 0 is larger than max (67108864)"]
        );
        // Blocks under 244 bytes are skipped.
        let m = mish(&big_sectors);
        assert!(run(xml_image(&plist(&[m[..243].to_vec()]), 8), "e10.dmg")
            .0
            .is_ok());
        einval(xml_image(&plist(&[m[..244].to_vec()]), 8), "e11.dmg");
        assert!(run(xml_image(&plist(&[b"junk".to_vec()]), 8), "d15.dmg")
            .0
            .is_ok());
    }

    #[test]
    fn warnings_once_each() {
        let img = xml_image(
            &plist(&[
                mish(&[
                    (0x8000_0004, 0, 1, 0, 1),
                    (5, 0, 1, 0, 1),
                    (UDCM, 0, 1, 0, 1),
                ]),
                mish(&[(UDBZ, 0, 1, 0, 1), (UDBZ, 0, 1, 0, 1), (ULFO, 0, 1, 0, 1)]),
            ]),
            8,
        );
        let (r, d) = run(img, "e12.dmg");
        assert_eq!(r.unwrap().virtual_size, 4096);
        assert_eq!(d, [
            "warning: Image contains chunks of unknown type 80000004, accessing them will result in I/O errors",
            "warning: dmg-bzip2 module is missing, accessing bzip2 compressed blocks will result in I/O errors",
            "warning: dmg-lzfse module is missing, accessing lzfse compressed blocks will result in I/O errors",
        ]);
    }

    #[test]
    fn lines_precede_errors() {
        // qemu-img 10.0.2 on the same bytes (w-*.dmg in the report's
        // verification set): warnings and the limit line, then the error.
        let img = xml_image(
            &plist(&[mish(&[(UDBZ, 0, 1, 0, 1), (UDRW, 0, 131073, 0, 512)])]),
            8,
        );
        let e = info(&mut MemFiles::new(img), 0, "b.dmg").unwrap_err();
        assert_eq!(e.message, "Could not open 'b.dmg': Invalid argument");
        assert_eq!(e.warnings, [
            "warning: dmg-bzip2 module is missing, accessing bzip2 compressed blocks will result in I/O errors",
            "sector count 131073 for chunk 0 is larger than max (131072)",
        ]);
        let img = xml_image(
            &plist(&[mish(&[
                (ULFO, 0, 1, 0, 1),
                (0x8000_0004, 0, 1, 0, 1),
                (UDRW, 0, 1, 0, (64 << 20) + 1),
            ])]),
            8,
        );
        let e = info(&mut MemFiles::new(img), 0, "l.dmg").unwrap_err();
        assert_eq!(e.warnings, [
            "warning: dmg-lzfse module is missing, accessing lzfse compressed blocks will result in I/O errors",
            "warning: Image contains chunks of unknown type 80000004, accessing them will result in I/O errors",
            "length 67108865 for chunk 0 is larger than max (67108864)",
        ]);
        let img = xml_image(
            &plist(&[mish(&[(UDRW, 0, 1, 0, 512), (UDZO, 1, 131073, 0, 512)])]),
            8,
        );
        let e = info(&mut MemFiles::new(img), 0, "n.dmg").unwrap_err();
        assert_eq!(
            e.warnings,
            ["sector count 131073 for chunk 1 is larger than max (131072)"]
        );
        // On success the lines ride on the info.
        let img = xml_image(
            &plist(&[mish(&[(UDBZ, 0, 1, 0, 1), (UDRW, 0, 1, 0, 512)])]),
            8,
        );
        let i = info(&mut MemFiles::new(img), 0, "ok.dmg").unwrap();
        assert_eq!(i.virtual_size, 4096);
        assert_eq!(i.warnings, [
            "warning: dmg-bzip2 module is missing, accessing bzip2 compressed blocks will result in I/O errors",
        ]);
    }

    #[test]
    fn plist_text_rules() {
        let bad = base64(&mish(&[(UDRW, 0, 131073, 0, 512)]));
        let wrap = |body: &[u8]| xml_image(&[b"<data>".as_slice(), body, b"</data>"].concat(), 8);
        // Text after a NUL is invisible (qemu uses C strings).
        assert!(run(
            xml_image(
                &[b"<plist>\0<data>".as_slice(), &bad, b"</data>"].concat(),
                8
            ),
            "e1.dmg"
        )
        .0
        .is_ok());
        // Characters outside the alphabet are skipped.
        let junk: Vec<u8> = bad.chunks(3).flat_map(|c| [c, b"!"].concat()).collect();
        einval(wrap(&junk), "e2.dmg");
        // A cut stream drops the partial group and the last entry.
        assert!(run(wrap(&bad[..bad.len() - 5]), "e4.dmg").0.is_ok());
        // Unterminated elements.
        einval(xml_image(b"<data>AAAA", 8), "d11.dmg");
        einval(xml_image(b"<data>AAAA</data><data>", 8), "d11b.dmg");
        // Over qemu's 16 MiB cap: refused before reading.
        let mut v = vec![0u8; 17 << 20];
        v.extend_from_slice(
            &Koly {
                plist_offset: 0,
                plist_length: (16 << 20) + 1,
                sectors: 8,
                ..koly0()
            }
            .to_bytes(),
        );
        einval(v, "e9.dmg");
    }

    #[test]
    fn glib_base64() {
        assert_eq!(base64_decode(b"aGVsbG8="), b"hello");
        assert_eq!(base64_decode(b"aGVs\nbG8=\n"), b"hello");
        assert_eq!(base64_decode(b"aGVsbG"), b"hel");
        // '=' is a zero digit; only the last two of a group drop bytes.
        assert_eq!(base64_decode(b"a=Vs"), [0x68, 0x05, 0x6c]);
        assert_eq!(base64_decode(b"aG=="), [0x68]);
        assert_eq!(base64_decode(b""), b"");
    }

    #[test]
    fn resource_fork_refusals() {
        let good = rsrc_image(&[mish(&OK)], 8);
        // data offset + count wrapping in 32 bits passes the first check,
        // then the walk runs into zeros.
        let mut v = good.clone();
        v[520..524].copy_from_slice(&0xffff_fff8u32.to_be_bytes());
        einval(v, "e16.dmg");
        // Fork length too short for its own count.
        let at = good.len() - KOLY_SIZE;
        let mut v = good.clone();
        v[at + 0x30..at + 0x38].copy_from_slice(&10u64.to_be_bytes());
        einval(v, "d12.dmg");
        // A resource length of zero.
        let mut v = good.clone();
        v[528..532].copy_from_slice(&0u32.to_be_bytes());
        einval(v, "z.dmg");
    }

    #[test]
    fn many_tiny_resources() {
        // Resources under 244 bytes are skipped; qemu-img accepts a fork of
        // 200000 one-byte resources (and takes 8 s over it).
        let v = rsrc_image(&vec![b"x".to_vec(); 20000], 8);
        assert_eq!(run(v, "tiny.dmg").0.unwrap().virtual_size, 4096);
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on simple-dmg.dmg cut short: an empty file is
        // refused by size, any other cut loses the trailer.
        let img = rsrc_image(&[mish(&OK)], 8);
        assert_eq!(
            run(Vec::new(), "t.dmg").0.unwrap_err().message,
            "dmg file must be at least 512 bytes long"
        );
        for n in [1, 100, 511, 512] {
            assert_eq!(
                run(img[..n].to_vec(), "t.dmg").0.unwrap_err().message,
                "Could not locate UDIF trailer in dmg file"
            );
        }
        crate::hostile::truncations(info, &img, "t.dmg", 64);
        // The trailer's fields, then the resource fork and its mish block.
        let koly = img.len() - KOLY_SIZE;
        crate::hostile::absurd_fields(
            info,
            &img,
            "t.dmg",
            koly..img.len(),
            &crate::hostile::no_fix,
        );
        crate::hostile::absurd_fields(info, &img, "t.dmg", 512..koly, &crate::hostile::no_fix);
        let xml = xml_image(&plist(&[mish(&OK)]), 8);
        let koly = xml.len() - KOLY_SIZE;
        crate::hostile::absurd_fields(
            info,
            &xml,
            "t.dmg",
            koly..xml.len(),
            &crate::hostile::no_fix,
        );
    }

    #[test]
    fn reads_find_and_inflate_chunks() {
        use crate::map::{MapImage, Mapping};
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i / 128) as u8).collect();
        let packed = miniz_oxide::deflate::compress_to_vec_zlib(&pattern, 6);
        assert!(packed.len() < 256);
        let chunks: [Chunk; 5] = [
            (UDRW, 0, 1, 0, 256),
            (UDZO, 1, 2, 256, packed.len() as u64),
            (UDBZ, 3, 1, 0, 0),
            (UDZE, 4, 4, 0, 0),
            (UDLE, 8, 0, 0, 0),
        ];
        let mut img = rsrc_image(&[mish(&chunks)], 8);
        img[..256].fill(0x5a);
        img[256..256 + packed.len()].copy_from_slice(&packed);
        let orig = img.clone();
        let mut f = MemFiles::new(img);
        let mut m = DmgMap::open(&mut f, 0, "x.dmg").unwrap();
        assert_eq!(m.warnings().len(), 1, "{:?}", m.warnings());
        let e = m.block_status(&mut f, 0, 4096).unwrap();
        assert_eq!((e.length, e.mapping), (4096, Mapping::Opaque));
        let mut buf = vec![1u8; 3 * 512];
        m.read(&mut f, 0, &mut buf).unwrap();
        assert!(buf[..256].iter().all(|&b| b == 0x5a));
        assert!(buf[256..512].iter().all(|&b| b == 0));
        assert_eq!(buf[512..], pattern[..]);
        let mut z = vec![1u8; 2048];
        m.read(&mut f, 4 * 512, &mut z).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        // The bzip2 chunk is not in qemu's tables without its module.
        let e = m.read(&mut f, 3 * 512, &mut z[..512]).unwrap_err();
        assert_eq!(e.message, "Input/output error");
        // Map and reads of the image cut short or with absurd chunk
        // entries: answers or errors, never a panic.
        fn walk(f: &mut dyn Files, file: FileId, _: &str) -> Result<ImageInfo> {
            crate::sectored::walk_map(f, file, "dmg")
        }
        crate::hostile::truncations(walk, &orig, "x", 0);
        crate::hostile::absurd_fields(walk, &orig, "x", 532..936, &crate::hostile::no_fix);
    }
}
