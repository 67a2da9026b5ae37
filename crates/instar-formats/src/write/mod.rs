//! Writing images: one writer per target format, fed guest data in
//! ascending order by the engine's `convert`, writing through a [`Sink`]
//! (the output files the host created; the guest cannot name others).
//!
//! Writers never read image bytes of the source: they get plain guest data
//! and lengths. Everything they write is computed from the validated
//! [`ConvertTarget`] and the virtual size, so a hostile source can make a
//! writer write at most what a benign source of the same size could.

use crate::Result;
use alloc::boxed::Box;
use alloc::string::String;
use instar_wire::convert::TargetOptions;
use instar_wire::{ConvertTarget, OutId};

mod ident;
pub mod qcow2;
pub mod raw;
mod table;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

/// Where a writer's bytes go: output files by [`OutId`] (0 = the
/// destination as named on the command line).
pub trait Sink {
    /// Write `data` at `offset` of output `file`.
    fn write_at(&mut self, file: OutId, offset: u64, data: &[u8]) -> Result<()>;
    /// Set the length of output `file` (extends with a hole or truncates).
    fn set_len(&mut self, file: OutId, length: u64) -> Result<()>;
    /// The names of the output files as the host created them (for
    /// descriptors that name their extents), by [`OutId`].
    fn output_name(&self, file: OutId) -> Option<&str>;
    /// `-p`: `done` of `total` units are converted.
    fn progress(&mut self, done: u64, total: u64) -> Result<()> {
        let _ = (done, total);
        Ok(())
    }
}

/// A target image being written. The engine calls [`ImageWriter::write`]
/// and [`ImageWriter::zero`] with ranges in strictly ascending guest order
/// that never overlap; ranges it names in neither read as zeros (or come
/// from the target's backing file, when it has one). Then
/// [`ImageWriter::finish`] once.
pub trait ImageWriter {
    /// Bytes the writer prefers per call, and the alignment at which data
    /// ranges should start and end where possible (cluster, grain, block).
    /// Writers must still accept any range.
    fn granularity(&self) -> u64;
    /// `data` is the guest content at `offset`.
    fn write(&mut self, sink: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()>;
    /// `len` bytes at `offset` read as zeros and must, when the target has a
    /// backing file, hide the backing file's data there (qcow2 zero
    /// clusters). Without a backing file writers may do nothing.
    fn zero(&mut self, sink: &mut dyn Sink, offset: u64, len: u64) -> Result<()>;
    /// Write the remaining metadata. The image is complete afterwards.
    fn finish(self: Box<Self>, sink: &mut dyn Sink) -> Result<()>;
}

/// Names of the files a target consists of, the first being `dst` itself
/// (vmdk's flat and split subformats write extents beside the descriptor).
/// The host creates them before the run and hands them over as outputs.
pub fn output_files(
    target: &ConvertTarget,
    dst: &str,
    virtual_size: u64,
) -> alloc::vec::Vec<String> {
    match &target.options {
        TargetOptions::Vmdk(o) => vmdk::output_files(o, dst, virtual_size),
        _ => alloc::vec![String::from(dst)],
    }
}

/// Start writing a `virtual_size`-byte image of `target` into `sink`.
pub fn create(
    sink: &mut dyn Sink,
    target: &ConvertTarget,
    virtual_size: u64,
) -> Result<Box<dyn ImageWriter>> {
    match &target.options {
        TargetOptions::Raw { preallocation } => Ok(Box::new(raw::RawWriter::create(
            sink,
            virtual_size,
            *preallocation,
        )?)),
        TargetOptions::Qcow2(o) => Ok(Box::new(qcow2::Qcow2Writer::create(
            sink,
            o,
            target.compress,
            virtual_size,
        )?)),
        TargetOptions::Vmdk(o) => Ok(Box::new(vmdk::VmdkWriter::create(
            sink,
            o,
            target.compress,
            virtual_size,
            None,
        )?)),
        TargetOptions::Vpc(_) | TargetOptions::Vhdx(_) if target.compress => Err(
            instar_wire::ImageError::operation("Compression not supported for this file format"),
        ),
        TargetOptions::Vpc(o) => Ok(Box::new(vpc::VpcWriter::create(sink, o, virtual_size)?)),
        TargetOptions::Vhdx(o) => Ok(Box::new(vhdx::VhdxWriter::create(sink, o, virtual_size)?)),
    }
}

/// Whether `data` is all zeros (OR-folded in pages, which vectorizes).
/// Sparse writers use it to leave blocks that would get only zeros
/// unallocated, whatever sizes the engine cuts its writes to.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// An in-memory [`Sink`] for tests: one growable buffer per output.
#[derive(Default)]
pub struct MemSink {
    /// Output contents by [`OutId`].
    pub files: alloc::vec::Vec<alloc::vec::Vec<u8>>,
    /// Output names by [`OutId`].
    pub names: alloc::vec::Vec<String>,
}

impl MemSink {
    /// Outputs with these names, all empty.
    pub fn new(names: &[&str]) -> Self {
        Self {
            files: names.iter().map(|_| alloc::vec::Vec::new()).collect(),
            names: names.iter().map(|n| String::from(*n)).collect(),
        }
    }
    fn get(&mut self, file: OutId) -> Result<&mut alloc::vec::Vec<u8>> {
        self.files
            .get_mut(file as usize)
            .ok_or_else(|| instar_wire::ImageError::operation("no such output"))
    }
}

impl Sink for MemSink {
    fn write_at(&mut self, file: OutId, offset: u64, data: &[u8]) -> Result<()> {
        let f = self.get(file)?;
        let end = offset as usize + data.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn set_len(&mut self, file: OutId, length: u64) -> Result<()> {
        self.get(file)?.resize(length as usize, 0);
        Ok(())
    }
    fn output_name(&self, file: OutId) -> Option<&str> {
        self.names.get(file as usize).map(String::as_str)
    }
}

/// A [`Sink`] with no outputs, for requests that write nothing.
pub struct NoOutputs;

impl Sink for NoOutputs {
    fn write_at(&mut self, _file: OutId, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(instar_wire::ImageError::operation(
            "internal error: no output files",
        ))
    }
    fn set_len(&mut self, _file: OutId, _length: u64) -> Result<()> {
        Err(instar_wire::ImageError::operation(
            "internal error: no output files",
        ))
    }
    fn output_name(&self, _file: OutId) -> Option<&str> {
        None
    }
}
