//! Block status: what each guest byte range of an opened image is made of.
//!
//! One answer type serves `map` now and `compare`/`convert` later: a
//! format's [`MapImage::block_status`] describes one contiguous run from a
//! guest offset, the way qemu's `bdrv_co_block_status` drivers do (each
//! variant of [`Mapping`] is a combination of qemu's BDRV_BLOCK_* bits).
//! Walking a backing chain and merging runs is the engine's job.

use crate::{Files, Result};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use instar_wire::{FileId, ImageError};

/// Where a run's bytes are, when they are somewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRef {
    /// The file that holds them.
    pub file: FileId,
    /// Byte offset in that file of the run's first byte.
    pub offset: u64,
}

/// What a run of guest bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Plain data stored at `at` (BDRV_BLOCK_DATA | OFFSET_VALID).
    Data {
        /// Where.
        at: HostRef,
    },
    /// Data that has no plain host copy: encrypted clusters, or formats
    /// that cannot say where (BDRV_BLOCK_DATA alone).
    Opaque,
    /// Compressed data (BDRV_BLOCK_DATA | COMPRESSED).
    Compressed,
    /// Reads as zeros, allocated at this layer (BDRV_BLOCK_ZERO, with the
    /// host range kept for it if any: preallocated zero clusters, holes of
    /// raw files).
    Zero {
        /// Host range kept for the zeros.
        at: Option<HostRef>,
    },
    /// Not allocated at this layer: the backing file decides, or zeros if
    /// there is none. `at` is a host range already reserved (qcow2's
    /// unallocated subclusters of an allocated cluster).
    Unallocated {
        /// Host range reserved for it.
        at: Option<HostRef>,
    },
}

/// One contiguous run from the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run (at least 1, at most what was asked).
    pub length: u64,
    /// What they are.
    pub mapping: Mapping,
    /// Ask the file holding [`Mapping::Data`] whether it has a hole there
    /// (qemu's BDRV_BLOCK_RECURSE: qcow2 sets it for images preallocated
    /// with metadata only, whose data clusters are mostly holes).
    pub recurse: bool,
}

impl Extent {
    /// A run that needs no look at the file below.
    pub fn new(length: u64, mapping: Mapping) -> Self {
        Self {
            length,
            mapping,
            recurse: false,
        }
    }
}

/// An image opened for block status.
pub trait MapImage {
    /// The format's qemu name.
    fn format(&self) -> &'static str;
    /// Guest size in bytes, as qemu's block layer sees it (whole sectors).
    fn virtual_size(&self) -> u64;
    /// The backing file name as stored, and its format if stored.
    fn backing(&self) -> Option<(&str, Option<&str>)> {
        None
    }
    /// Whether unallocated runs fall through to a backing file (and so
    /// read as zeros when there is none): qemu's `supports_backing`.
    fn supports_backing(&self) -> bool {
        false
    }
    /// Lines qemu prints on stderr while opening.
    fn warnings(&self) -> &[String] {
        &[]
    }
    /// The run starting at guest `offset`, at most `len` bytes long
    /// (`offset + len <= virtual_size`, `len > 0`).
    fn block_status(&mut self, files: &mut dyn Files, offset: u64, len: u64) -> Result<Extent>;
    /// Read internal snapshot `id_or_name` instead of the active state
    /// from now on (`convert -l`; qemu's
    /// `bdrv_snapshot_load_tmp_by_id_or_name`). The error is qemu-img's
    /// whole message.
    fn load_snapshot(&mut self, files: &mut dyn Files, id_or_name: &str) -> Result<()> {
        let _ = (files, id_or_name);
        Err(ImageError::open(format!(
            "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            self.format()
        )))
    }
    /// Fill `buf` with the guest bytes at `offset` of a run that
    /// [`MapImage::block_status`] reported as [`Mapping::Compressed`] or
    /// [`Mapping::Opaque`] (decompress, decrypt, or whatever the format
    /// needs). `buf` never extends past that run. Plain data is read by the
    /// caller at its [`HostRef`]; zeros are not read at all.
    fn read(&mut self, files: &mut dyn Files, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _ = (files, offset, buf);
        Err(ImageError::limit(format!(
            "reading {} data that is not stored plainly is not implemented yet",
            self.format()
        )))
    }
}

/// What the file layer adds to a [`Mapping::Data`] run with
/// [`Extent::recurse`] (qemu's `bdrv_co_do_block_status` asking the
/// protocol node): whether the run reads as zeros (a hole, or past the
/// file's end) and how long that answer holds (`length` unchanged when the
/// hole runs to the end of the file).
pub fn recurse_into_file(files: &mut dyn Files, at: HostRef, length: u64) -> Result<(bool, u64)> {
    let file_len = files.len(at.file)?;
    // The file node counts whole sectors.
    let total = file_len.saturating_add(511) / 512 * 512;
    if at.offset >= total {
        return Ok((true, length));
    }
    let avail = length.min(total - at.offset);
    let (data, run) = files.data_at(at.file, at.offset)?;
    let run = run.min(avail).max(1);
    let eof = at.offset + run == total;
    Ok(if data {
        (false, run)
    } else if eof {
        (true, length)
    } else {
        (true, run)
    })
}

/// The error for formats whose block status is not written yet: one
/// clear line rather than a wrong map.
pub fn not_implemented(format: &str) -> ImageError {
    ImageError::limit(format!("map is not implemented for {format} images yet"))
}

/// Open `file` as `format` (or probed) for block status.
pub fn open(
    files: &mut dyn Files,
    file: FileId,
    format: Option<&str>,
    filename: &str,
) -> Result<Box<dyn MapImage>> {
    let driver = match format {
        Some(name) => crate::probe::find_or_err(name)?,
        None => crate::probe::probe(files, file, filename)?,
    };
    match driver.name {
        "raw" => Ok(Box::new(crate::raw::RawMap::open(files, file)?)),
        "qcow2" => Ok(Box::new(crate::qcow2::map::Qcow2Map::open(files, file)?)),
        "vdi" => Ok(Box::new(crate::vdi::map::VdiMap::open(
            files, file, filename,
        )?)),
        "vpc" => Ok(Box::new(crate::vpc::map::VpcMap::open(
            files, file, filename,
        )?)),
        "vmdk" => Ok(Box::new(crate::vmdk::map::VmdkMap::open(
            files, file, filename,
        )?)),
        "vhdx" => Ok(Box::new(crate::vhdx::map::VhdxMap::open(
            files, file, filename,
        )?)),
        "qed" => Ok(Box::new(crate::qed::QedMap::open(files, file)?)),
        "qcow" => Ok(Box::new(crate::qcow::QcowMap::open(files, file, filename)?)),
        "parallels" => Ok(Box::new(crate::parallels::ParallelsMap::open(
            files, file, filename,
        )?)),
        "bochs" => Ok(Box::new(crate::bochs::BochsMap::open(
            files, file, filename,
        )?)),
        "cloop" => Ok(Box::new(crate::cloop::CloopMap::open(
            files, file, filename,
        )?)),
        "dmg" => Ok(Box::new(crate::dmg::DmgMap::open(files, file, filename)?)),
        "luks" => Err(crate::luks::key_required()),
        other => {
            // Open as info does first: a broken image gets qemu's open
            // error, not "not implemented".
            (driver.info)(files, file, filename)?;
            Err(not_implemented(other))
        }
    }
}

/// qemu's file driver's block status (`raw_co_block_status` over
/// SEEK_DATA/SEEK_HOLE) for `len` bytes of `file` at `offset`: data or a
/// hole, and how long the run is. The file's block-layer length is its
/// size rounded up to whole sectors; past the real end is a hole.
pub fn file_status(
    files: &mut dyn Files,
    file: FileId,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let (data, run) = files.data_at(file, offset)?;
    Ok((data, run.min(len).max(1)))
}
