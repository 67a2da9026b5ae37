//! What the older read-mostly drivers (qed, qcow, parallels, bochs, cloop,
//! dmg) share for block status and reads: the block layer's request
//! alignment around a driver's answer, a table-entry window that is
//! allocated once (the guest's heap never frees), and zlib inflation with
//! qemu's two acceptance rules.

use crate::block::{strerror, EIO};
use crate::map::{Extent, Mapping};
use crate::{Files, Result};
use alloc::boxed::Box;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// qemu's `bdrv_co_do_block_status` around a driver whose
/// `request_alignment` is `align`: the driver sees the query rounded out to
/// `align`, and its answer is cut back to the bytes asked for (host offsets
/// moved along).
pub(crate) fn aligned(
    offset: u64,
    len: u64,
    align: u64,
    f: impl FnOnce(u64, u64) -> Result<Extent>,
) -> Result<Extent> {
    let head = offset % align;
    let start = offset - head;
    let end = offset
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(align))
        .ok_or_else(|| metadata_error(EIO))?;
    let mut ext = f(start, end - start)?;
    if ext.length <= head {
        return Err(metadata_error(EIO));
    }
    ext.length = (ext.length - head).min(len);
    let shift = |at: Option<crate::map::HostRef>| {
        at.map(|mut a| {
            a.offset = a.offset.wrapping_add(head);
            a
        })
    };
    ext.mapping = match ext.mapping {
        Mapping::Data { mut at } => {
            at.offset = at.offset.wrapping_add(head);
            Mapping::Data { at }
        }
        Mapping::Zero { at } => Mapping::Zero { at: shift(at) },
        Mapping::Unallocated { at } => Mapping::Unallocated { at: shift(at) },
        other => other,
    };
    Ok(ext)
}

/// A block-status failure as qemu-img's map reports it.
pub(crate) fn metadata_error(errno: i32) -> ImageError {
    ImageError::operation(format!("Could not read file metadata: {}", strerror(errno)))
}

/// A failed guest read as the block layer returns it (qemu-img words the
/// context: "error while reading at byte N: ...").
pub(crate) fn read_error(errno: i32) -> ImageError {
    ImageError::operation(strerror(errno))
}

/// A reusable window over a table of fixed-size little- or big-endian
/// entries in a file: one host read per [`crate::limits::TABLE_CHUNK`], one
/// buffer for the life of the image.
pub(crate) struct TableWindow {
    buf: Vec<u8>,
    /// File offset of `buf[0]`, or `None` when empty.
    at: Option<(FileId, u64)>,
}

impl TableWindow {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0u8; crate::limits::TABLE_CHUNK],
            at: None,
        }
    }

    /// The `width` bytes at `offset` of `file` (past the end: zeros).
    pub(crate) fn get(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        offset: u64,
        width: usize,
    ) -> Result<&[u8]> {
        let hit = match self.at {
            Some((f, base)) => {
                f == file
                    && offset >= base
                    && offset
                        .checked_add(width as u64)
                        .is_some_and(|e| e <= base + self.buf.len() as u64)
            }
            None => false,
        };
        if !hit {
            files.read_at(file, offset, &mut self.buf)?;
            self.at = Some((file, offset));
        }
        let base = self.at.map_or(0, |(_, b)| b);
        let i = (offset - base) as usize;
        Ok(&self.buf[i..i + width])
    }
}

/// How a compressed stream must end for qemu to accept it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inflate {
    /// qcow: raw deflate; fine when the output is full and no error was
    /// seen (`Z_STREAM_END` or `Z_BUF_ERROR` with every byte written).
    RawFill,
    /// cloop and dmg: a zlib stream that ends (checksum included) exactly
    /// when the output is full.
    ZlibExact,
}

/// One decompressor for the life of an image (its state is ~11 KiB) and
/// one input chunk: compressed input is streamed from the file, so memory
/// is the output buffer whatever length the image claims for its input.
pub(crate) struct Inflater {
    state: Box<DecompressorOxide>,
    chunk: Vec<u8>,
}

impl Inflater {
    pub(crate) fn new() -> Self {
        Self {
            state: Box::default(),
            chunk: Vec::new(),
        }
    }

    fn flags(rule: Inflate) -> u32 {
        let mut flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        if rule == Inflate::ZlibExact {
            flags |= inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER
                | inflate_flags::TINFL_FLAG_COMPUTE_ADLER32;
        }
        flags
    }

    fn accepted(rule: Inflate, status: TINFLStatus, written: usize, want: usize) -> bool {
        match rule {
            Inflate::RawFill => {
                written == want && !matches!(status, TINFLStatus::Failed | TINFLStatus::BadParam)
            }
            Inflate::ZlibExact => status == TINFLStatus::Done && written == want,
        }
    }

    /// Inflate `input` into all of `out` under `rule`; false when qemu's
    /// inflate would have failed.
    #[cfg(test)]
    pub(crate) fn inflate(&mut self, rule: Inflate, input: &[u8], out: &mut [u8]) -> bool {
        self.state.init();
        let (status, _, written) = decompress(&mut self.state, input, out, 0, Self::flags(rule));
        Self::accepted(rule, status, written, out.len())
    }

    /// Inflate the `len` bytes at `offset` of `file` into all of `out`
    /// under `rule`: `Ok(false)` when qemu's inflate would have failed.
    /// Output never grows past `out`, so the work is bounded by its length
    /// and by `len`.
    pub(crate) fn inflate_file(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        offset: u64,
        len: u64,
        rule: Inflate,
        out: &mut [u8],
    ) -> Result<bool> {
        if self.chunk.is_empty() {
            self.chunk = vec![0u8; crate::limits::TABLE_CHUNK];
        }
        self.state.init();
        let (mut in_done, mut out_pos) = (0u64, 0usize);
        loop {
            let n = (len - in_done).min(self.chunk.len() as u64) as usize;
            files.read_at(file, offset + in_done, &mut self.chunk[..n])?;
            let more = in_done + (n as u64) < len;
            let mut flags = Self::flags(rule);
            if more {
                flags |= inflate_flags::TINFL_FLAG_HAS_MORE_INPUT;
            }
            let (status, used, written) =
                decompress(&mut self.state, &self.chunk[..n], out, out_pos, flags);
            in_done += used as u64;
            out_pos += written;
            match status {
                TINFLStatus::NeedsMoreInput if more && (used > 0 || written > 0) => continue,
                _ => return Ok(Self::accepted(rule, status, out_pos, out.len())),
            }
        }
    }
}

/// Open `file` as `format` for map and walk it the way map and convert
/// do: block status from the start (at most 16 runs), reading the
/// first bytes of runs that need the driver. For hostile sweeps: every
/// answer is an extent inside the query or an error with a message.
#[cfg(test)]
pub(crate) fn walk_map(
    files: &mut dyn Files,
    file: FileId,
    format: &str,
) -> Result<instar_wire::ImageInfo> {
    let mut m = crate::map::open(files, file, Some(format), "x")?;
    let size = m.virtual_size();
    let mut buf = vec![0u8; 4096];
    let (mut off, mut steps) = (0u64, 0);
    while off < size && steps < 16 {
        let len = (size - off).min(1 << 30);
        let e = m.block_status(files, off, len)?;
        assert!(e.length > 0 && e.length <= len, "{format}: run {e:?}");
        if matches!(e.mapping, Mapping::Opaque | Mapping::Compressed) {
            let n = e.length.min(4096) as usize;
            if let Err(err) = m.read(files, off, &mut buf[..n]) {
                assert!(!err.message.is_empty());
            }
        }
        off += e.length;
        steps += 1;
    }
    Ok(instar_wire::ImageInfo::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::HostRef;

    #[test]
    fn alignment_rounds_out_and_cuts_back() {
        let ext = aligned(700, 100, 512, |o, l| {
            assert_eq!((o, l), (512, 512));
            Ok(Extent::new(
                512,
                Mapping::Data {
                    at: HostRef {
                        file: 0,
                        offset: 4096,
                    },
                },
            ))
        })
        .unwrap();
        assert_eq!(ext.length, 100);
        assert_eq!(
            ext.mapping,
            Mapping::Data {
                at: HostRef {
                    file: 0,
                    offset: 4096 + 188
                }
            }
        );
        // An answer that does not reach the asked offset is an error.
        assert!(aligned(700, 100, 512, |_, _| Ok(Extent::new(100, Mapping::Opaque))).is_err());
        assert!(aligned(u64::MAX - 10, 5, 512, |_, _| unreachable!()).is_err());
    }

    #[test]
    fn inflate_rules() {
        let data = [7u8; 4096];
        let raw = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let zlib = miniz_oxide::deflate::compress_to_vec_zlib(&data, 6);
        let mut inf = Inflater::new();
        let mut out = [0u8; 4096];
        assert!(inf.inflate(Inflate::RawFill, &raw, &mut out));
        assert_eq!(out, data);
        assert!(inf.inflate(Inflate::ZlibExact, &zlib, &mut out));
        // Short output: the raw rule takes a full buffer, the zlib rule
        // wants the stream to end exactly there.
        let mut small = [0u8; 1000];
        assert!(inf.inflate(Inflate::RawFill, &raw, &mut small));
        assert!(!inf.inflate(Inflate::ZlibExact, &zlib, &mut small));
        // Too much room: neither fills it.
        let mut big = [0u8; 8192];
        assert!(!inf.inflate(Inflate::RawFill, &raw, &mut big));
        assert!(!inf.inflate(Inflate::ZlibExact, &zlib, &mut big));
        // A corrupt checksum fails the zlib rule.
        let mut bad = zlib.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(!inf.inflate(Inflate::ZlibExact, &bad, &mut out));
        assert!(!inf.inflate(Inflate::RawFill, &[0xff; 16], &mut out));
    }
}
