//! Typed request and result of `convert` (and the target description that
//! `create`-style writers share): what the CLI validated from `-O`/`-o`/`-c`
//! before any file was touched, and the output files the host created.
//!
//! The guest reads the sources, decides what goes where and writes the
//! target through [`crate::mailbox::PORT_WRITE`] into the output files the
//! host opened for it; it cannot name any other file.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Index of an output file of one run (0 = the destination as named on the
/// command line; more for formats that write extents beside it).
pub type OutId = u32;

/// qcow2 `preallocation` (and raw's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preallocation {
    /// `off`.
    Off,
    /// `metadata` (qcow2 only).
    Metadata,
    /// `falloc`.
    Falloc,
    /// `full`.
    Full,
}

/// qcow2 `compression_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// `zlib` (raw deflate, as qemu writes it).
    Zlib,
    /// `zstd`.
    Zstd,
}

/// Creation options of a qcow2 target, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2Options {
    /// `compat`: 2 (0.10) or 3 (1.1).
    pub version: u32,
    /// `cluster_size` in bytes (power of two, 512 to 2 MiB).
    pub cluster_size: u64,
    /// `refcount_bits` (1 to 64, power of two; 16 for compat 0.10).
    pub refcount_bits: u32,
    /// `lazy_refcounts`.
    pub lazy_refcounts: bool,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `compression_type` (used by `-c`; zstd needs compat 1.1).
    pub compression: Compression,
    /// `preallocation`.
    pub preallocation: Preallocation,
    /// `backing_file` (from `-B` or `-o`), stored as given.
    pub backing_file: Option<String>,
    /// `backing_fmt` (from `-F` or `-o`).
    pub backing_format: Option<String>,
}

/// vmdk `subformat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmdkSubformat {
    /// `monolithicSparse`.
    MonolithicSparse,
    /// `monolithicFlat` (descriptor plus `NAME-flat.vmdk`).
    MonolithicFlat,
    /// `streamOptimized` (compressed grains).
    StreamOptimized,
    /// `twoGbMaxExtentSparse` (`NAME-s001.vmdk`...).
    TwoGbMaxExtentSparse,
    /// `twoGbMaxExtentFlat` (`NAME-f001.vmdk`...).
    TwoGbMaxExtentFlat,
}

/// vmdk `adapter_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmdkAdapter {
    /// `ide` (the default).
    Ide,
    /// `buslogic`.
    Buslogic,
    /// `lsilogic`.
    Lsilogic,
    /// `legacyESX`.
    LegacyEsx,
}

/// Creation options of a vmdk target, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmdkOptions {
    /// `subformat`.
    pub subformat: VmdkSubformat,
    /// `adapter_type`.
    pub adapter: VmdkAdapter,
    /// `compat6` (virtualHWVersion 6).
    pub compat6: bool,
    /// `hwversion`, when given (overrides compat6's 6).
    pub hwversion: Option<String>,
    /// `toolsversion`, when given.
    pub toolsversion: Option<String>,
    /// `zeroed_grain`.
    pub zeroed_grain: bool,
    /// `backing_file`, stored as given in the descriptor's parentFileNameHint.
    pub backing_file: Option<String>,
}

/// vpc / vhdx `subformat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhdSubformat {
    /// `dynamic` (the default).
    Dynamic,
    /// `fixed`.
    Fixed,
}

/// Creation options of a vpc target, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpcOptions {
    /// `subformat`.
    pub subformat: VhdSubformat,
    /// `force_size`: keep the size exactly instead of rounding to CHS.
    pub force_size: bool,
}

/// Creation options of a vhdx target, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhdxOptions {
    /// `subformat`.
    pub subformat: VhdSubformat,
    /// `block_size` in bytes (0: qemu's choice from the size).
    pub block_size: u64,
    /// `log_size` in bytes.
    pub log_size: u64,
    /// `block_state_zero`.
    pub block_state_zero: bool,
}

/// The target format and its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetOptions {
    /// `raw`.
    Raw {
        /// `preallocation`.
        preallocation: Preallocation,
    },
    /// `qcow2`.
    Qcow2(Qcow2Options),
    /// `vmdk`.
    Vmdk(VmdkOptions),
    /// `vpc`.
    Vpc(VpcOptions),
    /// `vhdx`.
    Vhdx(VhdxOptions),
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvertTarget {
    /// Format and options.
    pub options: TargetOptions,
    /// `-c`: write compressed clusters/grains.
    pub compress: bool,
    /// `-o size=`: a size for the target other than the sources' total.
    pub size: Option<u64>,
}

/// One source image of `convert` (file id = its index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvertSource {
    /// `-f FMT`, or `None` to probe.
    pub format: Option<String>,
    /// The name as given on the command line.
    pub filename: String,
}

/// Result of [`crate::Request::Convert`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvertResult {
    /// Guest bytes of the target.
    pub virtual_size: u64,
    /// Bytes the guest asked the host to write (data and metadata).
    pub bytes_written: u64,
    /// Lines qemu-img prints on stderr while opening the sources.
    pub warnings: Vec<String>,
}

/// Result of [`crate::Request::Compare`]: what qemu-img prints and its exit
/// code (0 identical, 1 different, 2 error opening or reading; the CLI adds
/// 3/4 for its own failures).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareResult {
    /// Lines for stdout, without newlines (with `-p`, progress text
    /// ending in `\r` leads the line printed after it).
    pub stdout: Vec<String>,
    /// Text for stderr in the order printed, each piece as it is (lines
    /// end in their newline; qcow2's leak hint has none): `qemu-img: ...`,
    /// a driver's own lines, or `instar: ...` for instar's limits.
    pub stderr: Vec<String>,
    /// qemu-img's exit code.
    pub exit_code: u8,
}
