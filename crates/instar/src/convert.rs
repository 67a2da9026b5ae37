//! `convert`: qemu-img's grammar and checks (per version), then the host's
//! half of the copy. The guest reads the sources and writes the target
//! through the output descriptors the host hands it; the host only creates
//! those outputs, and only as temporary files beside the destination
//! (`.NAME.instar-partial-PID`) that become NAME by rename after a
//! successful run and an fsync. On any failure, deadline or
//! SIGINT/SIGTERM/SIGHUP they are removed, so a file named like the
//! destination is always a complete image (or the untouched old one).
//!
//! Errors that need no image bytes are found before any file is created;
//! where qemu-img reports them only after opening the sources, instar opens
//! the sources first (in the sandbox) so the first message is qemu-img's.

use crate::cli::UsageError;
use crate::cli::{OPT_IMAGE_OPTS, OPT_OBJECT};
use crate::config::Config;
use crate::error::CliError;
use crate::getopt::{self, c, long, HasArg, LongOpt, Spec};
use crate::info::{command_line_image, could_not_open, open_plain, plain_name, vmm_error};
use crate::paths;
use crate::profile::{OutputProfile, QemuVersion, UsageStyle};
use instar_engine::measure::{self as opts, SizeError};
use instar_vmm::{OpenedFile, RunFiles, SandboxConfig};
use instar_wire::convert::{
    Compression, Preallocation, Qcow2Options, TargetOptions, VhdSubformat, VhdxOptions,
    VmdkAdapter, VmdkOptions, VmdkSubformat, VpcOptions,
};
use instar_wire::{ConvertSource, ConvertTarget, ErrorKind, ImageError, Request, Response};
use std::ffi::{CString, OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

/// Parsed `convert` arguments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConvertArgs {
    /// `-f`.
    pub format: Option<String>,
    /// `-O` (qemu's default is raw).
    pub target_format: Option<String>,
    /// `-o` values joined with `,`, as qemu accumulates them.
    pub options: Option<String>,
    /// `-c`.
    pub compress: bool,
    /// `-S` in bytes (default 4096; 0 turns zero detection off).
    pub sparse_size: Option<u64>,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `-n`.
    pub no_create: bool,
    /// `-B` (`-b` from 10.1).
    pub backing: Option<String>,
    /// `-F`.
    pub backing_format: Option<String>,
    /// `-l`.
    pub snapshot: Option<String>,
    /// `-C`.
    pub copy_range: bool,
    /// `-t` value that names no cache mode (qemu reports it only after
    /// creating the target).
    pub target_cache_error: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `--target-image-opts`.
    pub target_image_opts: bool,
    /// `--target-is-zero`.
    pub target_is_zero: bool,
    /// `--bitmaps`.
    pub bitmaps: bool,
    /// `--salvage`.
    pub salvage: bool,
    /// `--object` values.
    pub objects: Vec<String>,
    /// Indices of the operands in the argument vector (sources, then the
    /// destination).
    pub operands: Vec<usize>,
}

const OPT_TARGET_IMAGE_OPTS: u32 = 270;
const OPT_SALVAGE: u32 = 271;
const OPT_TARGET_IS_ZERO: u32 = 272;
const OPT_BITMAPS: u32 = 273;
const OPT_SKIP_BROKEN: u32 = 274;

/// qemu's `MAX_COROUTINES` (`-m`).
const MAX_COROUTINES: i64 = 16;
/// qemu's `MAX_BUF_SECTORS` (`-S` upper bound, in 512-byte sectors).
const MAX_BUF_SECTORS: u64 = 32768;
/// qemu's default `-S`: 8 sectors.
const DEFAULT_SPARSE_SIZE: u64 = 4096;

/// `img_convert`'s table up to 10.0 (without a distro's rework). Each
/// release only appended entries: see [`long_classic`].
const LONG_CLASSIC: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("object", HasArg::Required, OPT_OBJECT),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("force-share", HasArg::No, c('U')),
    long("target-image-opts", HasArg::No, OPT_TARGET_IMAGE_OPTS),
    long("salvage", HasArg::No, OPT_SALVAGE),
    long("target-is-zero", HasArg::No, OPT_TARGET_IS_ZERO),
    long("bitmaps", HasArg::No, OPT_BITMAPS),
    long("skip-broken-bitmaps", HasArg::No, OPT_SKIP_BROKEN),
];

/// The classic table of version `v`: `--target-is-zero` came in 5.0,
/// `--bitmaps` in 5.1, `--skip-broken-bitmaps` in 6.1 (4.2.1 and 5.2.0
/// lack the later ones, 6.2.0 has all).
fn long_classic(v: QemuVersion) -> &'static [LongOpt] {
    let at = |maj, min| v >= QemuVersion::new(maj, min, 0);
    let n = if at(6, 1) {
        9
    } else if at(5, 1) {
        8
    } else if at(5, 0) {
        7
    } else {
        6
    };
    &LONG_CLASSIC[..n]
}

/// Debian's backport of the options rework (9.2 and 10.0 packages): the
/// order within each first letter is what its ambiguity messages list
/// (`--s`, `--o`, `--b`, `--t` of qemu-img 10.0.2); across letters it
/// cannot show.
const LONG_REWORKED: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("source-image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("source-format", HasArg::Required, c('f')),
    long("source-cache", HasArg::Required, c('T')),
    long("snapshot", HasArg::Required, c('l')),
    long("object", HasArg::Required, OPT_OBJECT),
    long("output-format", HasArg::Required, c('O')),
    long("options", HasArg::Required, c('o')),
    long("output-cache", HasArg::Required, c('t')),
    long("backing", HasArg::Required, c('B')),
    long("backing-format", HasArg::Required, c('F')),
    long("sparse-size", HasArg::Required, c('S')),
    long("salvage", HasArg::No, OPT_SALVAGE),
    long("skip-broken-bitmaps", HasArg::No, OPT_SKIP_BROKEN),
    long("bitmaps", HasArg::No, OPT_BITMAPS),
    long("target-image-opts", HasArg::No, OPT_TARGET_IMAGE_OPTS),
    long("target-is-zero", HasArg::No, OPT_TARGET_IS_ZERO),
    long("force-share", HasArg::No, c('U')),
    long("rate", HasArg::Required, c('r')),
    long("parallel", HasArg::Required, c('m')),
    long("oob-writes", HasArg::No, c('W')),
    long("copy-range-offloading", HasArg::No, c('C')),
    long("quiet", HasArg::No, c('q')),
];

/// Upstream 10.1 on (qemu-img.c `img_convert`).
const LONG_UPSTREAM: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("source-format", HasArg::Required, c('f')),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("source-cache", HasArg::Required, c('T')),
    long("snapshot", HasArg::Required, c('l')),
    long("bitmaps", HasArg::No, OPT_BITMAPS),
    long("skip-broken-bitmaps", HasArg::No, OPT_SKIP_BROKEN),
    long("salvage", HasArg::No, OPT_SALVAGE),
    long("target-format", HasArg::Required, c('O')),
    long("target-image-opts", HasArg::No, OPT_TARGET_IMAGE_OPTS),
    long("target-format-options", HasArg::Required, c('o')),
    long("target-cache", HasArg::Required, c('t')),
    long("backing", HasArg::Required, c('b')),
    long("backing-format", HasArg::Required, c('F')),
    long("sparse-size", HasArg::Required, c('S')),
    long("no-create", HasArg::No, c('n')),
    long("target-is-zero", HasArg::No, OPT_TARGET_IS_ZERO),
    long("force-share", HasArg::No, c('U')),
    long("rate-limit", HasArg::Required, c('r')),
    long("parallel", HasArg::Required, c('m')),
    long("oob-writes", HasArg::No, c('W')),
    long("copy-range-offloading", HasArg::No, c('C')),
    long("progress", HasArg::No, c('p')),
    long("quiet", HasArg::No, c('q')),
    long("object", HasArg::Required, OPT_OBJECT),
];

/// The option strings, read from the binaries of 4.2.1, 5.2.0, 6.2.0 to
/// 8.2.2 (classic), 9.2.1 and 10.0.x (Debian's rework) and 10.1 on.
fn short_options(style: UsageStyle, v: QemuVersion) -> &'static str {
    match style {
        UsageStyle::Upstream => "hf:O:b:B:CcF:o:l:S:pt:T:nm:WUr:q",
        UsageStyle::Reworked => "hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
        UsageStyle::Classic if v >= QemuVersion::new(6, 1, 0) => ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
        UsageStyle::Classic if v >= QemuVersion::new(5, 0, 0) => ":hf:O:B:Cco:l:S:pt:T:qnm:WUr:",
        UsageStyle::Classic => ":hf:O:B:Cco:l:S:pt:T:qnm:WU",
    }
}

/// qemu's `is_valid_option_list`: not empty, no leading `,`, and no
/// unpaired trailing `,` (`,,` is an escaped comma).
fn valid_option_list(s: &str) -> bool {
    if s.is_empty() || s.starts_with(',') {
        return false;
    }
    let trailing = s.len() - s.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

/// qemu's `cvtnum(name, value)` failure, in the words of version `v`.
fn cvtnum_error(name: &str, value: &str, e: SizeError, v: QemuVersion) -> String {
    let at = |maj, min| v >= QemuVersion::new(maj, min, 0);
    match e {
        SizeError::Range => {
            format!("Invalid {name} specified. Must be between 0 and 9223372036854775807.")
        }
        SizeError::Invalid if !at(9, 0) => format!(
            "Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ),
        SizeError::Invalid if at(10, 1) => format!("Invalid {name} specified: '{value}'"),
        SizeError::Invalid => format!("Invalid {name} specified: '{value}'."),
    }
}

/// qemu's `cvtnum`: a size, at most `i64::MAX`. Between 6.0 and 8.0
/// `qemu_strtosz` called a negative number invalid rather than out of
/// range (6.2.0 and 7.2 say so; 5.2 and 8.2 do not).
fn cvtnum(name: &str, value: &str, v: QemuVersion) -> Result<u64, String> {
    let negative_invalid = v >= QemuVersion::new(6, 0, 0) && v < QemuVersion::new(8, 0, 0);
    match opts::parse_size(value) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) => Err(cvtnum_error(name, value, SizeError::Range, v)),
        Err(SizeError::Range) if negative_invalid && value.trim_start().starts_with('-') => {
            Err(cvtnum_error(name, value, SizeError::Invalid, v))
        }
        Err(e) => Err(cvtnum_error(name, value, e, v)),
    }
}

/// C's `strtoll(s, &end, 0)` over the whole string (qemu_strtoi64):
/// `None` when not a number, `Some(Err(()))` when out of range.
fn strtoll_full(s: &str) -> Option<Result<i64, ()>> {
    let (neg, radix, digits) = opts::c_number_parts(s)?;
    if !digits.chars().all(|ch| ch.is_digit(radix)) {
        return None;
    }
    let n = match i128::from_str_radix(digits, radix) {
        Ok(n) => n,
        Err(_) => return Some(Err(())),
    };
    let n = if neg { -n } else { n };
    Some(i64::try_from(n).map_err(|_| ()))
}

/// `-m N`, with qemu's range check and message per version.
fn check_coroutines(value: &str, v: QemuVersion) -> Result<(), String> {
    let parsed = strtoll_full(value);
    if v < QemuVersion::new(9, 0, 0) {
        return match parsed {
            Some(Ok(n)) if (1..=MAX_COROUTINES).contains(&n) => Ok(()),
            _ => Err(format!(
                "Invalid number of coroutines. Allowed number of coroutines is between 1 and {MAX_COROUTINES}"
            )),
        };
    }
    match parsed {
        Some(Ok(n)) if (1..=MAX_COROUTINES).contains(&n) => Ok(()),
        Some(_) => Err(format!(
            "Invalid number of coroutines specified. Must be between 1 and {MAX_COROUTINES}."
        )),
        None if v >= QemuVersion::new(10, 1, 0) => {
            Err(format!("Invalid number of coroutines specified: '{value}'"))
        }
        None => Err(format!(
            "Invalid number of coroutines specified: '{value}'."
        )),
    }
}

/// `-S SIZE`: a multiple of 512 up to 16 MiB.
fn check_sparse(value: &str, v: QemuVersion) -> Result<u64, String> {
    let range = || {
        format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {}. Select 0 to disable sparse detection (fully allocates output).",
            MAX_BUF_SECTORS * 512
        )
    };
    let n = if v < QemuVersion::new(5, 0, 0) {
        // 4.2 had one message for every bad value.
        opts::parse_size(value)
            .ok()
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or_else(range)?
    } else {
        cvtnum("buffer size for sparse output", value, v)?
    };
    if !n.is_multiple_of(512) || n / 512 > MAX_BUF_SECTORS {
        return Err(range());
    }
    Ok(n)
}

fn qemu(msg: String) -> UsageError {
    UsageError(format!("qemu-img: {msg}\n"))
}

/// `convert` after the command name, as qemu-img `v` in `style` parses it:
/// the option loop (which stops at the first bad value), then the checks
/// before any file is opened, in qemu's order. `Ok(Err(text))` is text to
/// print (help, `-o help`).
pub fn parse(
    sub: &[String],
    base: usize,
    style: UsageStyle,
    version: QemuVersion,
    getopt_error: &dyn Fn(&getopt::Failure) -> UsageError,
    help: &dyn Fn() -> String,
) -> Result<Result<ConvertArgs, String>, UsageError> {
    let v = version.effective();
    let long_opts: &'static [LongOpt] = match style {
        UsageStyle::Classic => long_classic(v),
        UsageStyle::Reworked => LONG_REWORKED,
        UsageStyle::Upstream => LONG_UPSTREAM,
    };
    let spec = Spec {
        short: short_options(style, v),
        long: long_opts,
        stop_at_operand: false,
    };
    let parsed = getopt::parse(&spec, sub).map_err(|f| getopt_error(&f))?;
    let mut a = ConvertArgs::default();
    let mut src_cache: Option<String> = None;
    let mut skip_broken = false;
    for (id, value) in parsed.options {
        let value = value.unwrap_or_default();
        match id {
            x if x == c('h') => return Ok(Err(help())),
            x if x == c('f') => a.format = Some(value),
            x if x == c('O') => a.target_format = Some(value),
            x if x == c('B') || x == c('b') => a.backing = Some(value),
            x if x == c('F') => a.backing_format = Some(value),
            x if x == c('C') => a.copy_range = true,
            x if x == c('c') => a.compress = true,
            x if x == c('o') => {
                if !valid_option_list(&value) {
                    return Err(qemu(format!("Invalid option list: {value}")));
                }
                a.options = Some(match a.options.take() {
                    Some(prev) => format!("{prev},{value}"),
                    None => value,
                });
            }
            x if x == c('l') => a.snapshot = Some(value),
            x if x == c('S') => a.sparse_size = Some(check_sparse(&value, v).map_err(qemu)?),
            x if x == c('p') => a.progress = true,
            // The last -t counts; checked after the target is created, as
            // qemu does.
            x if x == c('t') => {
                a.target_cache_error =
                    (!crate::cli::CACHE_MODES.contains(&value.as_str())).then_some(value)
            }
            x if x == c('T') => src_cache = Some(value),
            x if x == c('q') => a.quiet = true,
            x if x == c('n') => a.no_create = true,
            x if x == c('m') => check_coroutines(&value, v).map_err(qemu)?,
            x if x == c('r') => {
                cvtnum("rate limit", &value, v).map_err(qemu)?;
            }
            x if x == c('W') || x == c('U') => {}
            OPT_OBJECT => a.objects.push(value),
            OPT_IMAGE_OPTS => a.image_opts = true,
            OPT_TARGET_IMAGE_OPTS => a.target_image_opts = true,
            OPT_SALVAGE => a.salvage = true,
            OPT_TARGET_IS_ZERO => a.target_is_zero = true,
            OPT_BITMAPS => a.bitmaps = true,
            OPT_SKIP_BROKEN => skip_broken = true,
            _ => {}
        }
    }
    if skip_broken && !a.bitmaps {
        return Err(qemu(
            "Use of --skip-broken-bitmaps requires --bitmaps".into(),
        ));
    }
    if a.compress && a.copy_range {
        return Err(qemu("Cannot enable copy offloading when -c is used".into()));
    }
    if a.sparse_size.is_some() && a.copy_range {
        return Err(qemu("Cannot enable copy offloading when -S is used".into()));
    }
    if a.copy_range && a.salvage {
        return Err(qemu("Cannot use copy offloading in salvaging mode".into()));
    }
    if a.target_image_opts && !a.no_create {
        return Err(qemu("--target-image-opts requires use of -n flag".into()));
    }
    if a.no_create && a.options.is_some() {
        if v < QemuVersion::new(5, 0, 0) {
            // 4.2 warned and went on; instar refuses -n anyway.
            eprintln!("qemu-img: warning: -o has no effect when skipping image creation");
            eprintln!("qemu-img: warning: This will become an error in future QEMU versions.");
        } else {
            return Err(qemu("-o has no effect when skipping image creation".into()));
        }
    }
    if a.target_is_zero && !a.no_create {
        return Err(qemu("--target-is-zero requires use of -n flag".into()));
    }
    a.operands = parsed.operands.iter().map(|i| base + i).collect();
    let out_fmt = match (&a.target_format, a.target_image_opts) {
        (Some(f), _) => Some(f.as_str()),
        (None, false) => Some("raw"),
        (None, true) => None,
    };
    if let Some(o) = &a.options {
        if has_help_option(o) {
            let Some(fmt) = out_fmt else {
                return Err(qemu("Option help requires a format be specified".into()));
            };
            let filename = (a.operands.len() >= 2).then(|| sub_operand(sub, base, &a));
            return option_help(fmt, filename.flatten().as_deref(), v).map(Err);
        }
    }
    if a.operands.len() < 2 {
        return Err(qemu("Must specify image file name".into()));
    }
    if let Some(mode) = src_cache {
        if !crate::cli::CACHE_MODES.contains(&mode.as_str()) {
            return Err(qemu(format!("Invalid source cache option: {mode}")));
        }
    }
    Ok(Ok(a))
}

/// The destination operand (the last), from the command's own vector.
fn sub_operand(sub: &[String], base: usize, a: &ConvertArgs) -> Option<String> {
    let last = *a.operands.last()?;
    sub.get(last.checked_sub(base)?).cloned()
}

/// qemu's `has_help_option`: some option of the list is `help` or `?`.
fn has_help_option(list: &str) -> bool {
    list.split(',')
        .any(|o| o == "help" || o == "?" || o.starts_with("help=") || o.starts_with("?="))
}

/// `-o help`: qemu-img's creation option list for `fmt` (with a target
/// file name the file protocol's options are merged in), captured from
/// qemu-img 10.0.2. Compared across 4.2.1, 5.2.0, 6.2.0, 7.2, 8.2.2,
/// 9.2.1, 10.1.0, 10.2.1 and 11.1.3: used only for the versions that print
/// the same text; others get a not-implemented line.
fn option_help(fmt: &str, filename: Option<&str>, v: QemuVersion) -> Result<String, UsageError> {
    let text = match (fmt, filename.is_some()) {
        ("raw", false) => include_str!("convert/help/raw.txt"),
        ("raw", true) => include_str!("convert/help/raw-file.txt"),
        ("qcow2", false) => include_str!("convert/help/qcow2.txt"),
        ("qcow2", true) => include_str!("convert/help/qcow2-file.txt"),
        ("vmdk", false) => include_str!("convert/help/vmdk.txt"),
        ("vmdk", true) => include_str!("convert/help/vmdk-file.txt"),
        ("vpc", false) => include_str!("convert/help/vpc.txt"),
        ("vpc", true) => include_str!("convert/help/vpc-file.txt"),
        ("vhdx", false) => include_str!("convert/help/vhdx.txt"),
        ("vhdx", true) => include_str!("convert/help/vhdx-file.txt"),
        (f, _) => {
            return Err(match target_driver(f) {
                Err(lines) => qemu(lines),
                Ok(()) => instar_usage(&format!("convert -O {f} -o help is not implemented yet")),
            })
        }
    };
    // Where the captured text is known to hold (4.2.1, 5.2.0 and 11.1.3
    // word some of them differently).
    let (from, to) = match (fmt, filename.is_some()) {
        ("raw", false) | ("vpc", false) | ("vhdx", false) => ((0, 0), (99, 0)),
        ("qcow2", _) => ((5, 2), (11, 0)),
        ("vmdk", _) => ((6, 2), (99, 0)),
        _ => ((5, 2), (99, 0)),
    };
    if v < QemuVersion::new(from.0, from.1, 0) || v >= QemuVersion::new(to.0, to.1, 0) {
        return Err(instar_usage(&format!(
            "convert -o help in the words of qemu-img {v} is not implemented yet"
        )));
    }
    Ok(text.to_string())
}

fn instar_usage(msg: &str) -> UsageError {
    UsageError(format!("instar: {msg}\n"))
}

/// qemu's driver lookup for `-O`: `Ok` for a driver that can create
/// images, else its message (module hint lines included).
fn target_driver(fmt: &str) -> Result<(), String> {
    const CREATE: &[&str] = &[
        "raw",
        "qcow2",
        "vmdk",
        "vpc",
        "vhdx",
        "vdi",
        "qed",
        "qcow",
        "parallels",
        "luks",
        "file",
        "host_device",
        "host_cdrom",
        "nbd",
        "nvme",
    ];
    if CREATE.contains(&fmt) {
        return Ok(());
    }
    // measure's lookup knows the drivers without creation and the
    // modules; its wording for those is convert's too.
    match opts::parse_target(fmt, None) {
        Err(opts::MeasureError::Qemu(lines)) => Err(lines.join("\nqemu-img: ")),
        _ => Err(format!("Unknown file format '{fmt}'")),
    }
}

/// `convert --help` in instar's own words (scripts do not parse help).
pub fn help() -> String {
    "Usage: qemu-img convert [-f FMT] [-O OUTPUT_FMT] [-o OPTIONS] [-c] [-S SIZE]
                        [-B BACKING [-F BACKING_FMT]] [-l SNAPSHOT] [-p] [-q]
                        SOURCE [SOURCE2 ...] DESTINATION

Copy SOURCE (several are concatenated) into a new image DESTINATION of
OUTPUT_FMT (raw, qcow2, vmdk, vpc, vhdx), exactly as the installed qemu-img
would. instar reads the sources inside a sandbox that can write only the
output files the host created for it; DESTINATION appears (by rename) only
when the image is complete.

  -h, --help            this help
  -f FMT                treat the sources as FMT instead of probing
  -O FMT                the target format (default raw)
  -o OPTIONS            creation options of the target (-o help lists them)
  -c                    write compressed clusters (qcow2)
  -S SIZE               zeros runs this long are not written (default 4k,
                        0 writes everything)
  -B FILE, -F FMT       the target's backing file and its format: only
                        what differs from the sources' backing is copied
  -l SNAPSHOT           copy an internal snapshot instead of the current state
  -p                    progress on stdout
  -q                    quiet
  -t, -T, -m, -W, -U, -r, -C
                        accepted, no effect (cache modes are checked)
  -n, --target-is-zero, --bitmaps, --salvage, --image-opts, --object:
                        not supported.

"
    .to_string()
}

/// Settings of one `convert` call.
pub struct ConvertCall<'a> {
    /// Parsed arguments.
    pub args: &'a ConvertArgs,
    /// Operands exactly as given (sources, then the destination).
    pub operands: Vec<OsString>,
    /// Settings.
    pub config: &'a Config,
    /// Deadline of the short sandbox runs (opening the sources).
    pub timeout: Duration,
    /// Deadline of the copy itself.
    pub convert_timeout: Duration,
    /// Output profile.
    pub profile: &'a OutputProfile,
}

/// `-p` as qemu-progress.c prints it: `    (P/100%)\r` on stdout whenever
/// the percentage moved by more than 1 (convert's `min_skip`), at 0 and at
/// 100, and a newline at the end.
struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
}

impl Progress {
    const MIN_SKIP: f32 = 1.0;

    fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
        }
    }

    /// `qemu_progress_print(value, 0)`: set the percentage.
    fn set(&mut self, value: f32) {
        let current = value.min(100.0);
        self.current = current;
        if current > self.last_print + Self::MIN_SKIP
            || current < self.last_print - Self::MIN_SKIP
            || current == 100.0
            || current == 0.0
        {
            self.last_print = current;
            if self.enabled {
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "    ({:3.2}/100%)\r", f64::from(current));
                let _ = out.flush();
            }
        }
    }

    /// The guest's report: `done` of `total` units. qemu reports only
    /// finished chunks (its 0 is the initial print).
    fn report(&mut self, done: u64, total: u64) {
        if total > 0 && done > 0 {
            self.set((100.0 * done as f64 / total as f64) as f32);
        }
    }

    fn end(&self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
    }
}

/// One opened source.
struct Source {
    name: String,
    file: std::fs::File,
    virtual_size: u64,
    dev_ino: (u64, u64),
    /// Lines printed when it was opened (the copy opens it again and
    /// reports them again; qemu-img prints them once).
    warnings: Vec<String>,
}

fn dev_ino(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// A guest error in qemu-img's words (the stderr lines before it printed).
fn guest_error(name: &str, e: ImageError) -> CliError {
    for line in &e.warnings {
        print_warning(line);
    }
    match e.kind {
        ErrorKind::Operation => CliError::Qemu(e.message),
        ErrorKind::Limit => CliError::Instar(e.message),
        ErrorKind::Open | ErrorKind::Refused => could_not_open(name, &e.message),
    }
}

fn print_warning(line: &str) {
    // A format driver's own line (qcow2's corruption report) has no
    // qemu-img prefix.
    if line.starts_with("qcow2: ") {
        eprintln!("{line}");
    } else {
        eprintln!("qemu-img: {line}");
    }
}

/// Open one source as qemu-img does before it looks at the target: the
/// host opens the file, the guest probes and opens the image.
fn open_source(
    call: &ConvertCall,
    filename: &OsStr,
    allow: &mut Vec<PathBuf>,
) -> Result<Source, CliError> {
    let (name, path, sandbox) = command_line_image(filename, call.config, call.timeout)?;
    for d in sandbox.allow_dirs.iter() {
        if !allow.contains(d) {
            allow.push(d.clone());
        }
    }
    let file = open_plain(&name, &path, call.profile)?;
    let meta = file
        .metadata()
        .map_err(|e| CliError::Instar(format!("cannot stat '{name}': {e}")))?;
    let probe = file.try_clone().map_err(|e| {
        CliError::Instar(format!("cannot duplicate the descriptor of '{name}': {e}"))
    })?;
    let root = OpenedFile {
        display_name: name.clone(),
        file: probe,
    };
    let request = Request::Info {
        format: call.args.format.clone(),
        filename: name.clone(),
    };
    let outcome = instar_vmm::run(&sandbox, root, &request).map_err(vmm_error)?;
    match outcome.response {
        Response::Info(i) => {
            for w in &i.warnings {
                print_warning(w);
            }
            Ok(Source {
                name,
                file,
                virtual_size: i.virtual_size,
                dev_ino: dev_ino(&meta),
                warnings: i.warnings,
            })
        }
        Response::Error(e) => Err(guest_error(&name, e)),
        _ => Err(CliError::Instar(
            "internal error: the guest answered info with another result".into(),
        )),
    }
}

/// What was decided about the target before anything is created.
struct Plan {
    target: ConvertTarget,
    /// The format name as given to `-O`.
    format: String,
    /// The target's backing file, as stored (from `-B` or `-o`).
    backing: Option<String>,
    backing_format: Option<String>,
}

/// The last value of option `name`, as `qemu_opt_get` finds it.
fn get<'a>(o: &'a [(String, String)], name: &str) -> Option<&'a str> {
    o.iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn get_bool(o: &[(String, String)], name: &str, default: bool) -> bool {
    get(o, name).and_then(opts::parse_bool).unwrap_or(default)
}

fn get_size(o: &[(String, String)], name: &str) -> Option<u64> {
    get(o, name).and_then(|v| opts::parse_size(v).ok())
}

/// The file driver's `preallocation` (raw and the extents of the other
/// formats): off, falloc, full.
fn file_preallocation(o: &[(String, String)]) -> Result<Preallocation, String> {
    match get(o, "preallocation") {
        None | Some("off") => Ok(Preallocation::Off),
        Some("falloc") => Ok(Preallocation::Falloc),
        Some("full") => Ok(Preallocation::Full),
        Some("metadata") => Err("Unsupported preallocation mode: metadata".into()),
        Some(other) => Err(format!("invalid parameter value: {other}")),
    }
}

/// The driver's creation checks (qemu's `bdrv_create` of the format), in
/// qemu's order; a message is printed as `DST: error while converting
/// FMT: MSG`.
fn driver_options(
    fmt: &str,
    o: &[(String, String)],
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    v: QemuVersion,
) -> Result<TargetOptions, String> {
    match fmt {
        "raw" => Ok(TargetOptions::Raw {
            preallocation: file_preallocation(o)?,
        }),
        "qcow2" => qcow2_options(o, backing, backing_fmt, v).map(TargetOptions::Qcow2),
        "vmdk" => {
            let compat6 = get_bool(o, "compat6", false);
            let hwversion = get(o, "hwversion").filter(|h| *h != "undefined");
            if compat6 && hwversion.is_some() {
                return Err("compat6 cannot be enabled with hwversion set".into());
            }
            let adapter = match get(o, "adapter_type") {
                None | Some("ide") => VmdkAdapter::Ide,
                Some("buslogic") => VmdkAdapter::Buslogic,
                Some("lsilogic") => VmdkAdapter::Lsilogic,
                Some("legacyESX") => VmdkAdapter::LegacyEsx,
                Some(other) => return Err(format!("invalid parameter value: {other}")),
            };
            let subformat = match get(o, "subformat") {
                None | Some("monolithicSparse") => VmdkSubformat::MonolithicSparse,
                Some("monolithicFlat") => VmdkSubformat::MonolithicFlat,
                Some("streamOptimized") => VmdkSubformat::StreamOptimized,
                Some("twoGbMaxExtentSparse") => VmdkSubformat::TwoGbMaxExtentSparse,
                Some("twoGbMaxExtentFlat") => VmdkSubformat::TwoGbMaxExtentFlat,
                Some(other) => return Err(format!("invalid parameter value: {other}")),
            };
            if backing_fmt.is_some_and(|f| f != "vmdk") {
                return Err("backing_file must be a vmdk image".into());
            }
            file_preallocation(o)?;
            Ok(TargetOptions::Vmdk(VmdkOptions {
                subformat,
                adapter,
                compat6,
                hwversion: hwversion.map(str::to_string),
                toolsversion: get(o, "toolsversion").map(str::to_string),
                zeroed_grain: get_bool(o, "zeroed_grain", false),
                backing_file: backing.map(str::to_string),
            }))
        }
        "vpc" => {
            let subformat = vhd_subformat(o, v)?;
            file_preallocation(o)?;
            Ok(TargetOptions::Vpc(VpcOptions {
                subformat,
                force_size: get_bool(o, "force_size", false),
            }))
        }
        "vhdx" => {
            let subformat = vhd_subformat(o, v)?;
            let block_size = get_size(o, "block_size").unwrap_or(0);
            if block_size != 0 && !block_size.is_power_of_two() {
                return Err("Block size must be a power of two".into());
            }
            file_preallocation(o)?;
            Ok(TargetOptions::Vhdx(VhdxOptions {
                subformat,
                block_size,
                log_size: get_size(o, "log_size").unwrap_or(1 << 20),
                block_state_zero: get_bool(o, "block_state_zero", true),
            }))
        }
        _ => Err(format!("convert -O {fmt} is not implemented yet")),
    }
}

fn vhd_subformat(o: &[(String, String)], v: QemuVersion) -> Result<VhdSubformat, String> {
    match get(o, "subformat") {
        None | Some("dynamic") => Ok(VhdSubformat::Dynamic),
        Some("fixed") => Ok(VhdSubformat::Fixed),
        Some(other) => Err(enum_error("subformat", other, v)),
    }
}

/// The QAPI visitor's refusal of an enum value (reworded in 6.0; 5.2.0
/// and 4.2.1 name only the value).
fn enum_error(name: &str, value: &str, v: QemuVersion) -> String {
    if v < QemuVersion::new(6, 0, 0) {
        format!("Invalid parameter '{value}'")
    } else {
        format!("Parameter '{name}' does not accept value '{value}'")
    }
}

/// qcow2's `qcow2_co_create_opts` and `qcow2_co_create` checks (10.0).
fn qcow2_options(
    o: &[(String, String)],
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    v: QemuVersion,
) -> Result<Qcow2Options, String> {
    if get(o, "encrypt.format").is_some() || get_bool(o, "encryption", false) {
        return Err(match get(o, "encrypt.key-secret") {
            None => "Parameter 'encrypt.key-secret' is required for cipher".into(),
            Some(id) => format!("No secret with id '{id}'"),
        });
    }
    // The QAPI visitor's checks, in BlockdevCreateOptionsQcow2 order.
    let version = match get(o, "compat") {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => return Err(enum_error("version", other, v)),
    };
    let preallocation = match get(o, "preallocation") {
        None | Some("off") => Preallocation::Off,
        Some("metadata") => Preallocation::Metadata,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(other) => return Err(enum_error("preallocation", other, v)),
    };
    let compression = match get(o, "compression_type") {
        None | Some("zlib") => Compression::Zlib,
        Some("zstd") => Compression::Zstd,
        Some(other) => return Err(enum_error("compression-type", other, v)),
    };
    let extended_l2 = get_bool(o, "extended_l2", false);
    let cluster_size = get_size(o, "cluster_size").unwrap_or(65536);
    let bits = cluster_size.trailing_zeros();
    if !cluster_size.is_power_of_two() || !(9..=21).contains(&bits) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if extended_l2 {
        if version < 3 {
            return Err("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
        }
        if cluster_size < 16384 {
            return Err(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            );
        }
    }
    if backing.is_some() && preallocation != Preallocation::Off && !extended_l2 {
        return Err(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                .into(),
        );
    }
    if backing_fmt.is_some() && backing.is_none() {
        return Err("Backing format cannot be used without backing file".into());
    }
    let lazy_refcounts = get_bool(o, "lazy_refcounts", false);
    if lazy_refcounts && version < 3 {
        return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
    }
    let refcount_bits = get(o, "refcount_bits")
        .and_then(opts::parse_number)
        .unwrap_or(16);
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if version < 3 && refcount_bits != 16 {
        return Err("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)".into());
    }
    if get_bool(o, "data_file_raw", false) && get(o, "data_file").is_none() {
        return Err("data-file-raw requires data-file".into());
    }
    if version < 3 && compression != Compression::Zlib {
        return Err("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
    }
    Ok(Qcow2Options {
        version,
        cluster_size,
        refcount_bits: refcount_bits as u32,
        lazy_refcounts,
        extended_l2,
        compression,
        preallocation,
        backing_file: backing.map(str::to_string),
        backing_format: backing_fmt.map(str::to_string),
    })
}

/// Everything qemu-img checks about the target between opening the
/// sources and creating the image, in its order. Pure: no file is touched.
fn plan(call: &ConvertCall, dst: &str, sources: usize) -> Result<Plan, CliError> {
    let a = call.args;
    let v = call.profile.version.effective();
    if a.snapshot.is_some() && sources > 1 {
        return Err(CliError::Qemu(
            "No support for concatenating multiple snapshot".into(),
        ));
    }
    let fmt = a.target_format.clone().unwrap_or_else(|| "raw".into());
    target_driver(&fmt).map_err(CliError::Qemu)?;
    let Some(table) = opts::create_option_table(&fmt) else {
        return Err(CliError::Instar(format!(
            "convert -O {fmt} is not implemented yet"
        )));
    };
    if fmt == "luks" {
        return Err(CliError::Instar(
            "convert -O luks is not implemented yet".into(),
        ));
    }
    let mut o = match &a.options {
        Some(text) => opts::check_options(table, text).map_err(CliError::Qemu)?,
        None => Vec::new(),
    };
    // add_old_style_options: -B and -F become options (and win over -o).
    let has = |n: &str| table.iter().any(|(t, _)| *t == n);
    if let Some(b) = &a.backing {
        if !has("backing_file") {
            return Err(CliError::Qemu(format!(
                "Backing file not supported for file format '{fmt}'"
            )));
        }
        o.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &a.backing_format {
        if !has("backing_fmt") {
            return Err(CliError::Qemu(format!(
                "Backing file format not supported for file format '{fmt}'"
            )));
        }
        o.push(("backing_fmt".into(), f.clone()));
    }
    let backing = get(&o, "backing_file").map(str::to_string);
    let backing_format = get(&o, "backing_fmt").map(str::to_string);
    if sources > 1 && backing.is_some() {
        return Err(CliError::Qemu("Having a backing file for the target makes no sense when concatenating multiple input images".into()));
    }
    if backing.is_some() && backing_format.is_none() {
        if v >= QemuVersion::new(6, 1, 0) {
            return Err(CliError::Qemu(
                "Use of backing file requires explicit backing format".into(),
            ));
        }
        if v >= QemuVersion::new(5, 1, 0) {
            eprintln!(
                "qemu-img: warning: Deprecated use of backing file without explicit backing format"
            );
        }
    }
    if a.compress {
        if !matches!(fmt.as_str(), "qcow2" | "qcow" | "vmdk") {
            return Err(CliError::Qemu(
                "Compression not supported for this file format".into(),
            ));
        }
        if get_bool(&o, "encryption", false) || get(&o, "encrypt.format").is_some() {
            return Err(CliError::Qemu(
                "Compression and encryption not supported at the same time".into(),
            ));
        }
        if get(&o, "preallocation").is_some_and(|p| p != "off") {
            return Err(CliError::Qemu(
                "Compression and preallocation not supported at the same time".into(),
            ));
        }
    }
    if get(&o, "data_file").is_some() {
        return Err(CliError::Instar(
            "convert -o data_file (an external data file) is not implemented yet".into(),
        ));
    }
    let options = driver_options(&fmt, &o, backing.as_deref(), backing_format.as_deref(), v)
        .map_err(|m| CliError::Qemu(format!("{dst}: error while converting {fmt}: {m}")))?;
    Ok(Plan {
        target: ConvertTarget {
            options,
            compress: a.compress,
            // qemu-img sets `size` to the sources' total after parsing -o,
            // so `-o size=` never changes the target.
            size: None,
        },
        format: fmt,
        backing,
        backing_format,
    })
}

/// The temporary files of one convert, removed on drop unless committed,
/// and by the signal handler if the process is interrupted.
struct Outputs {
    /// (temporary path, final path), in OutId order.
    paths: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

/// Paths the signal handler unlinks: a leaked, immutable list published
/// before the files exist and withdrawn after they are renamed or removed.
struct SignalList {
    ptrs: Vec<*const libc::c_char>,
    _owned: Vec<CString>,
}

static SIGNAL_LIST: AtomicPtr<SignalList> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_signal(sig: libc::c_int) {
    let list = SIGNAL_LIST.load(Ordering::SeqCst);
    if !list.is_null() {
        // SAFETY: the list is leaked while published and never mutated;
        // unlink, signal and raise are async-signal-safe.
        unsafe {
            for p in &(*list).ptrs {
                libc::unlink(*p);
            }
        }
    }
    // SAFETY: restoring the default action and re-raising ends the process
    // with the signal, as it would have without the handler.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

const CLEANUP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn publish_signal_list(paths: &[PathBuf]) {
    let owned: Vec<CString> = paths
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    let list = Box::new(SignalList {
        ptrs: owned.iter().map(|c| c.as_ptr()).collect(),
        _owned: owned,
    });
    let old = SIGNAL_LIST.swap(Box::into_raw(list), Ordering::SeqCst);
    if !old.is_null() {
        // SAFETY: `old` came from Box::into_raw below or above and is no
        // longer published; a handler running on another thread is not
        // possible here (the CLI is single-threaded while converting).
        drop(unsafe { Box::from_raw(old) });
    }
    for sig in CLEANUP_SIGNALS {
        // SAFETY: installing a handler that only calls async-signal-safe
        // functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn withdraw_signal_list() {
    let old = SIGNAL_LIST.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !old.is_null() {
        // SAFETY: see publish_signal_list.
        drop(unsafe { Box::from_raw(old) });
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        if !self.committed {
            for (tmp, _) in &self.paths {
                let _ = std::fs::remove_file(tmp);
            }
        }
        withdraw_signal_list();
    }
}

/// `.NAME.instar-partial-PID` beside `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{name}.instar-partial-{}", std::process::id());
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(tmp),
        _ => PathBuf::from(tmp),
    }
}

/// Where the destination really is: a symbolic link is followed (qemu
/// writes through it), so the rename replaces the file it points to.
fn resolve_destination(dst: &Path) -> PathBuf {
    match std::fs::symlink_metadata(dst) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(dst).unwrap_or_else(|_| {
            // A dangling link: qemu creates its target.
            match std::fs::read_link(dst) {
                Ok(t) if t.is_absolute() => t,
                Ok(t) => dst.parent().unwrap_or(Path::new("")).join(t),
                Err(_) => dst.to_path_buf(),
            }
        }),
        _ => dst.to_path_buf(),
    }
}

fn io_text(e: &std::io::Error) -> String {
    e.raw_os_error()
        .and_then(instar_vmm::strerror)
        .map(str::to_string)
        .unwrap_or_else(|| crate::info::strerror(e))
}

/// The bytes a target of `virtual_size` may occupy in any one file: data,
/// plus metadata that stays far below the data for every writer (qcow2
/// with 512-byte clusters needs about 2%), plus room for vhdx's fixed
/// regions (headers, log and metadata at MiB boundaries, blocks of up to
/// 256 MiB) and slack for small images.
fn output_limit(target: &TargetOptions, virtual_size: u64) -> u64 {
    let fixed = match target {
        TargetOptions::Vhdx(v) => v.log_size.saturating_add(v.block_size.max(256 << 20)),
        _ => 0,
    };
    virtual_size
        .saturating_mul(2)
        .saturating_add(256 << 20)
        .saturating_add(fixed)
}

/// Run `convert`. Progress goes to stdout as it happens; nothing else.
pub fn run(call: &ConvertCall) -> Result<Vec<u8>, CliError> {
    let a = call.args;
    if !a.objects.is_empty() {
        return Err(CliError::Instar(
            "--object is not supported (instar reads no secrets)".into(),
        ));
    }
    if a.image_opts {
        return Err(CliError::Instar(
            "--image-opts is not supported (instar opens plain image files only)".into(),
        ));
    }
    if a.no_create {
        return Err(CliError::Instar(
            "convert -n (writing into an existing image) is not implemented yet: instar only creates new targets".into(),
        ));
    }
    if a.bitmaps {
        return Err(CliError::Instar(
            "convert --bitmaps is not implemented yet".into(),
        ));
    }
    if a.salvage {
        return Err(CliError::Instar(
            "convert --salvage is not implemented yet".into(),
        ));
    }
    if let Some(s) = &a.snapshot {
        if s.starts_with("snapshot.") {
            return Err(CliError::Instar(
                "convert -l snapshot.id=/snapshot.name= is not implemented yet (give the name or id)"
                    .into(),
            ));
        }
    }
    let Some((dst_os, srcs)) = call.operands.split_last() else {
        return Err(CliError::Qemu("Must specify image file name".into()));
    };
    let mut progress = Progress::new(a.progress && !a.quiet);
    progress.set(0.0);
    let result = convert(call, srcs, dst_os, &mut progress);
    progress.end();
    result.map(|()| Vec::new())
}

fn convert(
    call: &ConvertCall,
    srcs: &[OsString],
    dst_os: &OsStr,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let a = call.args;
    let mut allow = Vec::new();
    let mut sources = Vec::new();
    for s in srcs {
        sources.push(open_source(call, s, &mut allow)?);
    }
    let dst_lossy = dst_os.to_string_lossy().into_owned();
    let dst_name = plain_name(&dst_lossy)?.to_string();
    let plan = plan(call, &dst_name, sources.len())?;
    let fmt = plan.format.clone();
    let old_create = call.profile.version.effective() < QemuVersion::new(5, 0, 0);
    let create_error = |what: &str, e: &std::io::Error| {
        let what = if old_create {
            "file".to_string()
        } else {
            format!("'{what}'")
        };
        CliError::Qemu(format!(
            "{dst_name}: error while converting {fmt}: Could not create {what}: {}",
            io_text(e)
        ))
    };
    let dst_path = if dst_name.len() == dst_lossy.len() {
        PathBuf::from(dst_os)
    } else {
        PathBuf::from(&dst_name)
    };
    if dst_name.is_empty() {
        return Err(create_error(
            "",
            &std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
    }
    let real_dst = resolve_destination(&dst_path);
    if let Ok(m) = std::fs::metadata(&real_dst) {
        if m.is_dir() {
            return Err(create_error(
                &dst_name,
                &std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
    }
    if let Some(dir) = real_dst.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = std::fs::metadata(dir) {
            return Err(create_error(&dst_name, &e));
        }
    }
    if let Some(mode) = a.target_cache_error.as_deref() {
        return Err(CliError::Qemu(format!("Invalid cache option: {mode}")));
    }
    // The target's backing file must open (qemu opens the new image with
    // its backing chain before copying); it is named relative to the
    // target and read only in the sandbox.
    if let Some(b) = &plan.backing {
        check_target_backing(
            call,
            &dst_name,
            b,
            plan.backing_format.as_deref(),
            &mut allow,
        )?;
    }
    let virtual_size = sources
        .iter()
        .try_fold(0u64, |acc, s| {
            acc.checked_add(s.virtual_size.next_multiple_of(512))
        })
        .ok_or_else(|| CliError::Instar("the sources' total size overflows".into()))?;
    let names = instar_formats::write::output_files(&plan.target, &dst_name, virtual_size);
    let mut finals = Vec::new();
    for (i, n) in names.iter().enumerate() {
        finals.push(if i == 0 {
            real_dst.clone()
        } else {
            PathBuf::from(n)
        });
    }
    // Never write over a source or a file of its chain (qemu-img would,
    // and read back what it has just overwritten).
    let src_ids: Vec<(u64, u64)> = sources.iter().map(|s| s.dev_ino).collect();
    let mut existing = Vec::new();
    for f in &finals {
        if let Ok(m) = std::fs::metadata(f) {
            if src_ids.contains(&dev_ino(&m)) {
                return Err(refuse_overwrite(&f.to_string_lossy()));
            }
            existing.push((dev_ino(&m), f.clone(), m.permissions().mode()));
        }
    }
    let mut outputs = Outputs {
        paths: finals.iter().map(|f| (temp_path(f), f.clone())).collect(),
        committed: false,
    };
    publish_signal_list(
        &outputs
            .paths
            .iter()
            .map(|(t, _)| t.clone())
            .collect::<Vec<_>>(),
    );
    let mut files = Vec::new();
    for (tmp, fin) in &outputs.paths {
        let mode = existing
            .iter()
            .find(|(_, p, _)| p == fin)
            .map_or(0o644, |(_, _, m)| m & 0o7777);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(tmp)
            .map_err(|e| create_error(&fin.to_string_lossy(), &e))?;
        if existing.iter().any(|(_, p, _)| p == fin) {
            // Keep the replaced file's permissions, as qemu (which
            // truncates it in place) does; the umask applied to `mode`.
            let _ = f.set_permissions(std::fs::Permissions::from_mode(mode));
        }
        files.push(f);
    }
    // qemu's raw creation sizes the file first: a size the filesystem
    // cannot hold fails here, in its words, before anything is copied.
    if let (TargetOptions::Raw { .. }, Some(f)) = (&plan.target.options, files.first()) {
        f.set_len(virtual_size).map_err(|e| {
            CliError::Qemu(format!(
                "{dst_name}: error while converting {fmt}: Could not resize file: {}",
                io_text(&e)
            ))
        })?;
    }
    let inputs: Vec<OpenedFile> = sources
        .iter()
        .map(|s| {
            Ok(OpenedFile {
                display_name: s.name.clone(),
                file: s
                    .file
                    .try_clone()
                    .map_err(|e| CliError::Instar(format!("cannot duplicate a descriptor: {e}")))?,
            })
        })
        .collect::<Result<_, CliError>>()?;
    let request = Request::Convert {
        sources: sources
            .iter()
            .map(|s| ConvertSource {
                format: a.format.clone(),
                filename: s.name.clone(),
            })
            .collect(),
        target: plan.target.clone(),
        outputs: names.clone(),
        sparse_size: a.sparse_size.unwrap_or(DEFAULT_SPARSE_SIZE),
        snapshot: a.snapshot.clone(),
        target_has_backing: plan.backing.is_some(),
        max_chain_depth: u32::try_from(call.config.max_chain_depth.saturating_sub(1))
            .unwrap_or(u32::MAX),
        progress: progress.enabled,
    };
    let sandbox = SandboxConfig {
        memory_bytes: call.config.memory_mib.saturating_mul(1024 * 1024),
        timeout: call.convert_timeout,
        allow_dirs: allow,
    };
    let run_files = RunFiles {
        inputs,
        outputs: files,
        output_names: names.clone(),
        output_limit: output_limit(&plan.target.options, virtual_size),
    };
    let outcome = instar_vmm::run_files(&sandbox, run_files, &request, &mut |done, total| {
        progress.report(done, total)
    })
    .map_err(vmm_error)?;
    let first = sources.first().map_or(String::new(), |s| s.name.clone());
    let printed: Vec<&String> = sources.iter().flat_map(|s| &s.warnings).collect();
    match outcome.response {
        Response::Convert(r) => {
            for w in r.warnings.iter().filter(|w| !printed.contains(w)) {
                print_warning(w);
            }
        }
        Response::Error(mut e) => {
            e.warnings.retain(|w| !printed.contains(&w));
            return Err(guest_error(&first, e));
        }
        _ => {
            return Err(CliError::Instar(
                "internal error: the guest answered convert with another result".into(),
            ))
        }
    }
    // The guest opened the sources' backing files itself: the destination
    // must not be one of them either.
    for f in &outcome.files {
        if let Ok(m) = f.file.metadata() {
            if let Some((_, p, _)) = existing.iter().find(|(id, _, _)| *id == dev_ino(&m)) {
                return Err(refuse_overwrite(&p.to_string_lossy()));
            }
        }
    }
    for f in &outcome.outputs {
        f.sync_all()
            .map_err(|e| CliError::Instar(format!("cannot sync the new image: {}", io_text(&e))))?;
    }
    // Extents first, the descriptor (the name the user gave) last: the
    // destination appears only when everything it names is in place.
    for (tmp, fin) in outputs.paths.iter().rev() {
        std::fs::rename(tmp, fin).map_err(|e| {
            CliError::Instar(format!(
                "cannot rename '{}' to '{}': {}",
                tmp.display(),
                fin.display(),
                io_text(&e)
            ))
        })?;
    }
    outputs.committed = true;
    let mut dirs: Vec<PathBuf> = outputs
        .paths
        .iter()
        .map(|(_, f)| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.dedup();
    for d in dirs {
        if let Ok(dir) = std::fs::File::open(&d) {
            let _ = dir.sync_all();
        }
    }
    progress.set(100.0);
    Ok(())
}

fn refuse_overwrite(name: &str) -> CliError {
    CliError::Instar(format!(
        "refusing to write '{name}': it is a source image or a file of a source's backing chain"
    ))
}

/// Open the target's backing file the way qemu does after creating the
/// target: named relative to the target, probed or opened as `-F`.
fn check_target_backing(
    call: &ConvertCall,
    dst: &str,
    backing: &str,
    format: Option<&str>,
    allow: &mut Vec<PathBuf>,
) -> Result<(), CliError> {
    let name = paths::full_backing_filename(dst, backing).unwrap_or_else(|| backing.to_string());
    let fail = |inner: &str| {
        CliError::Qemu(format!(
            "Could not open '{dst}': Could not open backing file: {inner}"
        ))
    };
    let (shown, path, sandbox) = command_line_image(OsStr::new(&name), call.config, call.timeout)?;
    for d in sandbox.allow_dirs.iter() {
        if !allow.contains(d) {
            allow.push(d.clone());
        }
    }
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return Err(fail(&format!("Could not open '{shown}': {}", io_text(&e)))),
    };
    let root = OpenedFile {
        display_name: shown.clone(),
        file,
    };
    let request = Request::Info {
        format: format.map(str::to_string),
        filename: shown.clone(),
    };
    let outcome = instar_vmm::run(&sandbox, root, &request).map_err(vmm_error)?;
    match outcome.response {
        Response::Info(_) => Ok(()),
        Response::Error(e) => match e.kind {
            ErrorKind::Open | ErrorKind::Refused | ErrorKind::Operation => Err(fail(&e.message)),
            ErrorKind::Limit => Err(CliError::Instar(e.message)),
        },
        _ => Err(CliError::Instar(
            "internal error: the guest answered info with another result".into(),
        )),
    }
}

#[cfg(test)]
mod tests;
