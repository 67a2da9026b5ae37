//! `measure`: the size a new image needs, as qemu's `bdrv_measure` drivers
//! compute it (block/qcow2.c `qcow2_measure`, block/raw-format.c
//! `raw_measure`).
//!
//! Three stages, in qemu-img's order: [`parse_target`] (the `-O` driver
//! lookup and the `-o` option parse, pure), then [`target`] (the driver's
//! own option checks, pure), then [`compute`] (arithmetic over the source's
//! allocation). With `--size` everything runs on the host; with a file the
//! guest learns the allocation in [`measure_image`] and calls [`compute`].

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use instar_formats::qcow2::Qcow2Image;
use instar_formats::{probe, Files, Result};
use instar_wire::{
    ImageError, MeasureFormat, MeasureInfo, MeasureResult, MeasureTarget, ROOT_FILE,
};

/// qcow2's default cluster size.
const DEFAULT_CLUSTER_SIZE: u64 = 65536;
/// qcow2 cluster sizes are powers of two from 2^9 ...
const MIN_CLUSTER_BITS: u32 = 9;
/// ... to 2^21.
const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's QCOW_MAX_L1_SIZE (32 MiB of L1 entries).
const QCOW_MAX_L1_SIZE: u64 = 0x0200_0000;
/// Subclusters per cluster with extended L2 entries.
const EXTL2_SUBCLUSTERS: u64 = 32;

/// Why a size string was refused (qemu's `qemu_strtosz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all (EINVAL).
    Invalid,
    /// Out of range (ERANGE), including negative numbers.
    Range,
}

fn suffix_mul(c: u8) -> Option<u64> {
    Some(match c {
        b'B' | b'b' => 1,
        b'K' | b'k' => 1 << 10,
        b'M' | b'm' => 1 << 20,
        b'G' | b'g' => 1 << 30,
        b'T' | b't' => 1 << 40,
        b'P' | b'p' => 1 << 50,
        b'E' | b'e' => 1 << 60,
        _ => return None,
    })
}

/// Parse a size the way qemu's `qemu_strtosz` does: decimal (or `0x` hex
/// without fraction or suffix), an optional fraction that needs a suffix,
/// an optional binary suffix (`k`, `M`, ... `E`, or `B`), nothing after.
pub fn parse_size(s: &str) -> core::result::Result<u64, SizeError> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && (b[i] == b' ' || (b'\t'..=b'\r').contains(&b[i])) {
        i += 1;
    }
    if i < b.len() && b[i] == b'-' {
        return Err(SizeError::Range);
    }
    if i < b.len() && b[i] == b'+' {
        i += 1;
    }
    let start = i;
    let mut val: u64 = 0;
    let mut range = false;
    while i < b.len() && b[i].is_ascii_digit() {
        match val
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b[i] - b'0')))
        {
            Some(v) => val = v,
            None => range = true,
        }
        i += 1;
    }
    if range {
        return Err(SizeError::Range);
    }
    let digits = i > start;
    if digits && val == 0 && i < b.len() && (b[i] == b'x' || b[i] == b'X') && i == start + 1 {
        // Hex: no fraction and no suffix allowed.
        i += 1;
        let hs = i;
        let mut hv: u64 = 0;
        while i < b.len() && b[i].is_ascii_hexdigit() {
            let d = (b[i] as char).to_digit(16).unwrap_or(0) as u64;
            hv = hv
                .checked_mul(16)
                .and_then(|v| v.checked_add(d))
                .ok_or(SizeError::Range)?;
            i += 1;
        }
        if i == hs || i != b.len() {
            return Err(SizeError::Invalid);
        }
        return Ok(hv);
    }
    // The fraction as numerator / 10^k (exact, then truncated like qemu's
    // `fraction * mul` cast).
    let mut frac_num: u64 = 0;
    let mut frac_den: u64 = 1;
    let mut has_fraction = false;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let fs = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if frac_den < 1_000_000_000_000_000 {
                frac_num = frac_num * 10 + u64::from(b[i] - b'0');
                frac_den *= 10;
            }
            i += 1;
        }
        if !digits && i == fs {
            return Err(SizeError::Invalid);
        }
        has_fraction = frac_num != 0;
    } else if !digits {
        return Err(SizeError::Invalid);
    }
    let mul = match b.get(i).and_then(|&c| suffix_mul(c)) {
        Some(m) => {
            i += 1;
            m
        }
        None => 1,
    };
    if i != b.len() {
        return Err(SizeError::Invalid);
    }
    if mul == 1 && has_fraction {
        return Err(SizeError::Invalid);
    }
    let valf = ((frac_num as u128 * mul as u128) / frac_den as u128) as u64;
    if val > (u64::MAX - valf) / mul {
        return Err(SizeError::Range);
    }
    Ok(val * mul + valf)
}

/// The kind of one creation option (qemu's `QemuOptType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptKind {
    /// Any string.
    Str,
    /// `on`/`off` (and qemu's other spellings).
    Bool,
    /// An unsigned number (`qemu_strtou64`, base 0).
    Number,
    /// A size with an optional suffix (`qemu_strtosz`).
    Size,
}

/// qcow2's creation options plus the file driver's (qemu appends both
/// lists for `measure`).
const QCOW2_OPTS: &[(&str, OptKind)] = &[
    ("size", OptKind::Size),
    ("compat", OptKind::Str),
    ("backing_file", OptKind::Str),
    ("backing_fmt", OptKind::Str),
    ("data_file", OptKind::Str),
    ("data_file_raw", OptKind::Bool),
    ("encryption", OptKind::Bool),
    ("encrypt.format", OptKind::Str),
    ("encrypt.key-secret", OptKind::Str),
    ("encrypt.cipher-alg", OptKind::Str),
    ("encrypt.cipher-mode", OptKind::Str),
    ("encrypt.ivgen-alg", OptKind::Str),
    ("encrypt.ivgen-hash-alg", OptKind::Str),
    ("encrypt.hash-alg", OptKind::Str),
    ("encrypt.iter-time", OptKind::Number),
    ("cluster_size", OptKind::Size),
    ("preallocation", OptKind::Str),
    ("lazy_refcounts", OptKind::Bool),
    ("refcount_bits", OptKind::Number),
    ("compression_type", OptKind::Str),
    ("extended_l2", OptKind::Bool),
    ("nocow", OptKind::Bool),
    ("extent_size_hint", OptKind::Size),
];

/// raw's creation options plus the file driver's.
const RAW_OPTS: &[(&str, OptKind)] = &[
    ("size", OptKind::Size),
    ("preallocation", OptKind::Str),
    ("nocow", OptKind::Bool),
    ("extent_size_hint", OptKind::Size),
];

/// vmdk's creation options plus the file driver's (qemu-img 10.0.2,
/// `convert -O vmdk -o help FILE`).
const VMDK_OPTS: &[(&str, OptKind)] = &[
    ("size", OptKind::Size),
    ("adapter_type", OptKind::Str),
    ("backing_file", OptKind::Str),
    ("backing_fmt", OptKind::Str),
    ("compat6", OptKind::Bool),
    ("hwversion", OptKind::Str),
    ("toolsversion", OptKind::Str),
    ("subformat", OptKind::Str),
    ("zeroed_grain", OptKind::Bool),
    ("preallocation", OptKind::Str),
    ("nocow", OptKind::Bool),
    ("extent_size_hint", OptKind::Size),
];

/// vpc's creation options plus the file driver's.
const VPC_OPTS: &[(&str, OptKind)] = &[
    ("size", OptKind::Size),
    ("subformat", OptKind::Str),
    ("force_size", OptKind::Bool),
    ("preallocation", OptKind::Str),
    ("nocow", OptKind::Bool),
    ("extent_size_hint", OptKind::Size),
];

/// vhdx's creation options plus the file driver's.
const VHDX_OPTS: &[(&str, OptKind)] = &[
    ("size", OptKind::Size),
    ("log_size", OptKind::Size),
    ("block_size", OptKind::Size),
    ("subformat", OptKind::Str),
    ("block_state_zero", OptKind::Bool),
    ("preallocation", OptKind::Str),
    ("nocow", OptKind::Bool),
    ("extent_size_hint", OptKind::Size),
];

/// LUKS's creation options plus the file driver's.
const LUKS_OPTS: &[(&str, OptKind)] = &[
    ("size", OptKind::Size),
    ("key-secret", OptKind::Str),
    ("cipher-alg", OptKind::Str),
    ("cipher-mode", OptKind::Str),
    ("ivgen-alg", OptKind::Str),
    ("ivgen-hash-alg", OptKind::Str),
    ("hash-alg", OptKind::Str),
    ("iter-time", OptKind::Number),
    ("detached-header", OptKind::Bool),
    ("preallocation", OptKind::Str),
    ("nocow", OptKind::Bool),
    ("extent_size_hint", OptKind::Size),
];

/// Drivers qemu-img 10.0.2 knows that have creation options but no
/// `bdrv_measure`.
const NO_MEASURE: &[&str] = &[
    "vmdk",
    "vpc",
    "vhdx",
    "vdi",
    "qed",
    "qcow",
    "parallels",
    "file",
    "host_device",
    "host_cdrom",
    "nbd",
    "nvme",
];

/// Drivers qemu-img 10.0.2 knows that cannot create images.
const NO_CREATE: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "blkdebug",
    "blkverify",
    "null-co",
    "null-aio",
    "throttle",
    "copy-on-read",
    "quorum",
    "compress",
    "replication",
    "vvfat",
    "snapshot-access",
    "preallocate",
    "copy-before-write",
    "blklogwrites",
];

/// Drivers Debian builds as modules (qemu-block-extra): without the
/// package, qemu-img names the module before "Unknown file format".
const MODULES: &[(&str, &str)] = &[
    ("ssh", "ssh"),
    ("iscsi", "iscsi"),
    ("rbd", "rbd"),
    ("gluster", "gluster"),
    ("nfs", "nfs"),
    ("http", "curl"),
    ("https", "curl"),
    ("ftp", "curl"),
    ("ftps", "curl"),
];

/// A failure before measuring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeasureError {
    /// qemu-img's lines, each printed as `qemu-img: LINE` (a line may
    /// itself contain newlines: qemu's hints).
    Qemu(Vec<String>),
    /// Something instar does not model: one `instar:` line.
    Unsupported(String),
}

impl MeasureError {
    fn one(m: impl Into<String>) -> Self {
        MeasureError::Qemu(alloc::vec![m.into()])
    }
}

/// A target driver with its parsed `-o` options (last occurrence wins, as
/// `qemu_opt_get` finds it).
#[derive(Debug, Clone)]
pub struct ParsedTarget {
    /// The driver.
    pub driver: Driver,
    /// `(name, raw value)` in order given.
    opts: Vec<(String, String)>,
}

/// Target drivers that measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// raw.
    Raw,
    /// qcow2.
    Qcow2,
    /// LUKS.
    Luks,
}

impl ParsedTarget {
    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn get_bool(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| parse_bool(v) == Some(true))
    }
}

/// A qemu bool option value (`on`, `yes`, `true`, `y` and their negatives).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// How C's `strto*(s, &end, 0)` reads `v`: leading white space skipped,
/// an optional sign (true: minus), then `0x` hex, `0` octal or decimal.
/// Gives the sign, the radix and the digits (not checked); `None` when
/// no digits follow.
pub fn c_number_parts(v: &str) -> Option<(bool, u32, &str)> {
    let t = v.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    (!digits.is_empty()).then_some((neg, radix, digits))
}

/// qemu's `qemu_strtou64(.., base 0)`: decimal, `0x` hex or `0` octal;
/// a leading minus wraps around as strtoull does.
pub fn parse_number(v: &str) -> Option<u64> {
    let (neg, radix, digits) = c_number_parts(v)?;
    let n = u64::from_str_radix(digits, radix).ok()?;
    Some(if neg { n.wrapping_neg() } else { n })
}

/// Split `-o` text into options as `qemu_opts_do_parse` does: `,,` is a
/// literal comma, a bare `name` means `name=on`, `noname` means
/// `name=off`.
fn split_options(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        // Name: up to '=' or ','.
        let ns = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let name = &s[ns..i];
        if i < b.len() && b[i] == b'=' {
            i += 1;
            let mut value = String::new();
            while i < b.len() {
                if b[i] == b',' {
                    if i + 1 < b.len() && b[i + 1] == b',' {
                        value.push(',');
                        i += 2;
                        continue;
                    }
                    break;
                }
                let ch_len = s[i..].chars().next().map_or(1, char::len_utf8);
                value.push_str(&s[i..i + ch_len]);
                i += ch_len;
            }
            out.push((name.to_string(), value));
        } else if let Some(stripped) = name.strip_prefix("no") {
            out.push((stripped.to_string(), "off".to_string()));
        } else {
            out.push((name.to_string(), "on".to_string()));
        }
        if i < b.len() && b[i] == b',' {
            i += 1;
        }
    }
    out
}

/// `-O FMT` and `-o OPTIONS` (several `-o` joined with `,`): qemu-img's
/// driver lookup and option parse, with its messages.
pub fn parse_target(
    format: &str,
    options: Option<&str>,
) -> core::result::Result<ParsedTarget, MeasureError> {
    let (driver, table) = match format {
        "raw" => (Driver::Raw, RAW_OPTS),
        "qcow2" => (Driver::Qcow2, QCOW2_OPTS),
        "luks" => (Driver::Luks, LUKS_OPTS),
        f if NO_MEASURE.contains(&f) => {
            return Err(MeasureError::one(format!(
                "Block driver '{f}' does not support size measurement"
            )))
        }
        f if NO_CREATE.contains(&f) => {
            return Err(MeasureError::one(format!(
                "Format driver '{f}' does not support image creation"
            )))
        }
        f => {
            let mut lines = Vec::new();
            if let Some((_, module)) = MODULES.iter().find(|(n, _)| *n == f) {
                lines.push(format!(
                    "Unable to load module {module}. Perhaps you want to install qemu-block-extra or qemu-block-supplemental package?"
                ));
            }
            lines.push(format!("Unknown file format '{f}'"));
            return Err(MeasureError::Qemu(lines));
        }
    };
    let opts = match options {
        Some(text) => check_options(table, text).map_err(|first| {
            MeasureError::Qemu(alloc::vec![
                first,
                format!("Invalid options for file format '{format}'"),
            ])
        })?,
        None => Vec::new(),
    };
    Ok(ParsedTarget { driver, opts })
}

/// Split `-o` text (several `-o` joined with `,`) and check every option
/// against `table` as `qemu_opts_do_parse` does: unknown names and values
/// of the wrong type are refused with qemu's message (the first line only:
/// `measure` and `convert` word what follows differently). Returns
/// `(name, value)` in the order given; the last occurrence wins.
pub fn check_options(
    table: &[(&str, OptKind)],
    text: &str,
) -> core::result::Result<Vec<(String, String)>, String> {
    let mut opts = Vec::new();
    for (name, value) in split_options(text) {
        let Some((_, kind)) = table.iter().find(|(n, _)| *n == name) else {
            return Err(format!("Invalid parameter '{name}'"));
        };
        match kind {
            OptKind::Str => {}
            OptKind::Bool => {
                if parse_bool(&value).is_none() {
                    return Err(format!("Parameter '{name}' expects 'on' or 'off'"));
                }
            }
            OptKind::Number => {
                if parse_number(&value).is_none() {
                    return Err(format!("Parameter '{name}' expects a number"));
                }
            }
            OptKind::Size => match parse_size(&value) {
                Ok(_) => {}
                Err(SizeError::Range) => {
                    return Err(format!(
                        "Value '{value}' is out of range for parameter '{name}'"
                    ))
                }
                Err(SizeError::Invalid) => {
                    return Err(format!(
                        "Parameter '{name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                    ))
                }
            },
        }
        opts.push((name, value));
    }
    Ok(opts)
}

/// The creation options `convert` and `measure` accept for `format` with a
/// target file name (the driver's list plus the file protocol's, as qemu
/// appends them), or `None` for formats instar cannot create.
pub fn create_option_table(format: &str) -> Option<&'static [(&'static str, OptKind)]> {
    Some(match format {
        "raw" => RAW_OPTS,
        "qcow2" => QCOW2_OPTS,
        "luks" => LUKS_OPTS,
        "vmdk" => VMDK_OPTS,
        "vpc" => VPC_OPTS,
        "vhdx" => VHDX_OPTS,
        _ => return None,
    })
}

/// The driver's own checks (qemu's `qcow2_measure` / `raw_measure` before
/// they look at the source), in qemu's order. `size` is `--size` or the
/// source's length, which qemu-img sets as the `size` option.
/// `report_bitmaps`: the imitated qemu-img has `bitmaps` (5.1+).
pub fn target(
    p: &ParsedTarget,
    size: Option<u64>,
    report_bitmaps: bool,
) -> core::result::Result<MeasureTarget, MeasureError> {
    let opt_size = size.or_else(|| p.get("size").and_then(|v| parse_size(v).ok()));
    let mut t = MeasureTarget {
        format: MeasureFormat::Raw,
        cluster_size: 512,
        refcount_bits: 16,
        extended_l2: false,
        version: 3,
        prealloc_all: false,
        has_backing_file: false,
        luks_payload: 0,
        size: opt_size,
        report_bitmaps,
        parallels_bitmaps: false,
    };
    match p.driver {
        Driver::Raw => Ok(t),
        Driver::Luks => Err(luks_error(p, "")),
        Driver::Qcow2 => {
            t.format = MeasureFormat::Qcow2;
            t.extended_l2 = p.get_bool("extended_l2");
            let cs = p
                .get("cluster_size")
                .and_then(|v| parse_size(v).ok())
                .unwrap_or(DEFAULT_CLUSTER_SIZE);
            let bits = cs.trailing_zeros();
            if cs == 0 || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) || cs != 1 << bits
            {
                return Err(MeasureError::one(format!(
                    "Cluster size must be a power of two between {} and {}k",
                    1u32 << MIN_CLUSTER_BITS,
                    1u32 << (MAX_CLUSTER_BITS - 10)
                )));
            }
            let min_ext = (1u64 << MIN_CLUSTER_BITS) * EXTL2_SUBCLUSTERS;
            if t.extended_l2 && cs < min_ext {
                return Err(MeasureError::one(format!(
                    "Extended L2 entries are only supported with cluster sizes of at least {min_ext} bytes"
                )));
            }
            t.cluster_size = cs;
            t.version = match p.get("compat") {
                None | Some("1.1") => 3,
                Some("0.10") => 2,
                Some(other) => {
                    return Err(MeasureError::one(format!(
                        "Invalid compatibility level: '{other}'"
                    )))
                }
            };
            let rb = p.get("refcount_bits").and_then(parse_number).unwrap_or(16);
            if rb > 64 || !rb.is_power_of_two() {
                return Err(MeasureError::one(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ));
            }
            if t.version < 3 && rb != 16 {
                return Err(MeasureError::one(
                    "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            t.refcount_bits = rb;
            t.prealloc_all = match p.get("preallocation") {
                None | Some("off") | Some("metadata") => false,
                Some("falloc") | Some("full") => true,
                Some(other) => {
                    return Err(MeasureError::one(format!(
                        "invalid parameter value: {other}"
                    )))
                }
            };
            t.has_backing_file = p.get("backing_file").is_some();
            if p.get("encrypt.format") == Some("luks") {
                return Err(luks_error(p, "encrypt."));
            }
            check_l1(&t, opt_size.unwrap_or(0))?;
            Ok(t)
        }
    }
}

/// LUKS targets need a secret object, which instar never takes: qemu's
/// message when none is named or the named one does not exist. qemu checks
/// the other LUKS options first; their values are not modelled, so
/// instar refuses when any is given.
fn luks_error(p: &ParsedTarget, prefix: &str) -> MeasureError {
    const LUKS_ONLY: &[&str] = &[
        "cipher-alg",
        "cipher-mode",
        "ivgen-alg",
        "ivgen-hash-alg",
        "hash-alg",
        "iter-time",
        "detached-header",
    ];
    let other = p.opts.iter().any(|(n, _)| {
        n.strip_prefix(prefix)
            .is_some_and(|rest| LUKS_ONLY.contains(&rest))
    });
    if other {
        return MeasureError::Unsupported(String::from(
            "measure for LUKS-encrypted targets with LUKS options is not supported",
        ));
    }
    match p.get(&format!("{prefix}key-secret")) {
        None => MeasureError::one(format!(
            "Parameter '{prefix}key-secret' is required for cipher"
        )),
        Some(id) => MeasureError::one(format!("No secret with id '{id}'")),
    }
}

/// qemu's "Check that virtual disk size is valid": the L1 table of a
/// `size`-byte image must fit QCOW_MAX_L1_SIZE.
fn check_l1(t: &MeasureTarget, size: u64) -> core::result::Result<(), MeasureError> {
    let cs = t.cluster_size;
    let vs = round_up(size, cs).ok_or_else(too_large)?;
    let l2e = if t.extended_l2 { 16 } else { 8 };
    let l2_tables = (vs / cs).div_ceil(cs / l2e);
    if l2_tables.saturating_mul(8) > QCOW_MAX_L1_SIZE {
        return Err(too_large());
    }
    Ok(())
}

fn too_large() -> MeasureError {
    MeasureError::one("The image size is too large (try using a larger cluster size)")
}

fn round_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x / align * align)
}

/// qemu's `qcow2_refcount_metadata_size` without the generous increase:
/// refcount blocks and table clusters for `clusters` clusters, found as
/// the fixed point where they also count themselves.
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_bits: u64) -> u64 {
    let blocks_per_table_cluster = cluster_size / 8;
    let refcounts_per_block = cluster_size * 8 / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

/// qemu's `qcow2_calc_prealloc_size`: a fully allocated image of
/// `total_size` bytes, metadata included.
pub fn qcow2_prealloc_size(total_size: u64, cs: u64, refcount_bits: u64, extended_l2: bool) -> u64 {
    let aligned = round_up(total_size, cs).unwrap_or(u64::MAX / cs * cs);
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = round_up(aligned / cs, cs / l2e).unwrap_or(0);
    meta += nl2e * l2e;
    let nl1e = round_up(nl2e * l2e / cs, cs / 8).unwrap_or(0);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_bits);
    meta + aligned
}

/// What the guest learned about the source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFacts {
    /// `bdrv_getlength` of the source.
    pub length: u64,
    /// Guest byte ranges that are data (allocated and not zero somewhere in
    /// the chain), ascending, non-overlapping.
    pub data: Vec<(u64, u64)>,
    /// The source keeps persistent bitmaps (qcow2 v3): `(name length,
    /// granularity)` of each.
    pub bitmaps: Option<Vec<(usize, u64)>>,
}

/// Target clusters of `cs` bytes touched by `data`, in bytes (qemu rounds
/// every data run out to whole clusters and counts each cluster once).
fn data_clusters_bytes(data: &[(u64, u64)], cs: u64) -> u64 {
    let mut total = 0u64;
    let mut covered_to = 0u64; // end of the last counted cluster
    for &(start, end) in data {
        if end <= start {
            continue;
        }
        let first = (start / cs * cs).max(covered_to);
        let last = round_up(end, cs).unwrap_or(u64::MAX / cs * cs);
        if last > first {
            total = total.saturating_add(last - first);
            covered_to = last;
        }
    }
    total
}

/// qemu's `qcow2_get_persistent_dirty_bitmap_size` for a new image with
/// `cs`-byte clusters.
fn bitmaps_size(length: u64, bitmaps: &[(usize, u64)], cs: u64) -> u64 {
    let mut size = 0u64;
    let mut dir = 0u64;
    for &(name_len, granularity) in bitmaps {
        let bits = length.div_ceil(granularity.max(1));
        let bytes = bits.div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        size += clusters * cs;
        size += round_up(clusters * 8, cs).unwrap_or(0);
        // Directory entry: 24-byte fixed part plus the name, 8-aligned.
        dir += round_up(24 + name_len as u64, 8).unwrap_or(0);
    }
    size + round_up(dir, cs).unwrap_or(0)
}

/// The measure itself: `--size` when `source` is `None`.
pub fn compute(t: &MeasureTarget, source: Option<&SourceFacts>) -> MeasureInfo {
    match t.format {
        MeasureFormat::Raw => {
            let required = match source {
                Some(s) => s.length,
                None => round_up(t.size.unwrap_or(0), 512).unwrap_or(u64::MAX),
            };
            MeasureInfo {
                required,
                fully_allocated: required,
                bitmaps: None,
            }
        }
        MeasureFormat::Qcow2 => {
            let cs = t.cluster_size;
            let mut virtual_size = round_up(t.size.unwrap_or(0), cs).unwrap_or(0);
            let mut required = 0u64;
            if let Some(s) = source {
                virtual_size = round_up(s.length, cs).unwrap_or(0);
                required = if t.has_backing_file {
                    virtual_size
                } else {
                    data_clusters_bytes(&s.data, cs)
                };
            }
            if t.prealloc_all {
                required = virtual_size;
            }
            let fully = t.luks_payload
                + qcow2_prealloc_size(virtual_size, cs, t.refcount_bits, t.extended_l2);
            let bitmaps = match source {
                Some(SourceFacts {
                    bitmaps: Some(b),
                    length,
                    ..
                }) if t.version >= 3 && t.report_bitmaps => Some(bitmaps_size(*length, b, cs)),
                _ => None,
            };
            MeasureInfo {
                required: fully - virtual_size + required,
                fully_allocated: fully,
                bitmaps,
            }
        }
    }
}

/// instar's own line for sources whose allocation it cannot learn yet
/// (the CLI prints it as `instar: ...`, exit 1).
fn not_implemented(what: &str) -> ImageError {
    ImageError::limit(format!("measure is not implemented for {what} sources yet"))
}

/// In the guest: open the source as qemu-img does (backing chain
/// included, at most `max_chain_depth` files below it) and measure it
/// for `t`.
pub fn measure_image(
    files: &mut dyn Files,
    format: Option<&str>,
    filename: &str,
    t: &MeasureTarget,
    max_chain_depth: u32,
) -> Result<MeasureResult> {
    let driver = match format {
        Some(name) => probe::find_or_err(name)?,
        None => probe::probe(files, ROOT_FILE, filename)?,
    };
    // The open qemu-img does first: every format's own checks and errors.
    let info =
        (driver.info)(files, ROOT_FILE, filename).map_err(|e| length_error(e, filename, t))?;
    // qemu-img measure opens for I/O (info does not), so an encrypted
    // source needs its secret, which instar never takes.
    if info.encrypted {
        let prefix = if driver.name == "luks" {
            ""
        } else {
            "encrypt."
        };
        return Err(ImageError::open(format!(
            "Parameter '{prefix}key-secret' is required for cipher"
        ))
        .with_warnings(info.warnings.clone()));
    }
    let warnings = info.warnings.clone();
    let length = info.virtual_size;
    let needs_walk = t.format == MeasureFormat::Qcow2 && !t.has_backing_file && !t.prealloc_all;
    let needs_bitmaps = t.format == MeasureFormat::Qcow2 && t.version >= 3 && t.report_bitmaps;
    let bitmaps = if needs_bitmaps && driver.name == "qcow2" {
        let img = Qcow2Image::open(files, ROOT_FILE)?;
        (img.header.version >= 3).then(|| {
            img.bitmaps
                .iter()
                .map(|b| (b.name.len(), 1u64 << b.granularity_bits))
                .collect()
        })
    } else if needs_bitmaps && driver.name == "parallels" && t.parallels_bitmaps {
        // qemu's parallels driver keeps persistent bitmaps (8.x on), but
        // none it loads read-only counts.
        Some(Vec::new())
    } else {
        None
    };
    if t.format == MeasureFormat::Qcow2 {
        check_l1(t, length).map_err(|_| {
            ImageError::operation("The image size is too large (try using a larger cluster size)")
        })?;
    }
    let mut data = Vec::new();
    if needs_walk {
        data = data_runs(files, driver.name, filename, max_chain_depth)?;
    } else {
        // qemu-img's open is a full one even when it reads nothing: the
        // data file of a qcow2 opens too, and the whole backing chain.
        if matches!(driver.name, "raw" | "qcow2") {
            instar_formats::map::open(files, ROOT_FILE, Some(driver.name), filename)?;
        }
        open_chain(files, &info, filename, max_chain_depth)?;
    }
    let facts = SourceFacts {
        length,
        data,
        bitmaps,
    };
    Ok(MeasureResult {
        info: compute(t, Some(&facts)),
        warnings,
    })
}

/// bdrv_getlength failing after a good open: qemu-img measure lets the
/// driver say it (raw: "image size", qcow2: "image virtual_size").
fn length_error(e: ImageError, filename: &str, t: &MeasureTarget) -> ImageError {
    let prefix = format!("Can't get image size '{filename}'");
    match e.message.strip_prefix(prefix.as_str()) {
        Some(rest) if e.kind == instar_wire::ErrorKind::Operation => {
            let what = match t.format {
                MeasureFormat::Raw => "image size",
                MeasureFormat::Qcow2 => "image virtual_size",
            };
            ImageError {
                message: format!("Unable to get {what}{rest}"),
                ..e
            }
        }
        _ => e,
    }
}

/// qemu's `path_combine`: a backing name relative to its image's name.
fn combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.into();
    }
    let mut keep = 0;
    if let Some(i) = base.find([':', '/']) {
        if base.as_bytes()[i] == b':' {
            keep = i + 1;
        }
    }
    if let Some(slash) = base.rfind('/') {
        keep = keep.max(slash + 1);
    }
    let mut out = String::from(&base[..keep]);
    out.push_str(name);
    out
}

/// Open every backing file below the source as qemu-img's open does, with
/// its nested "Could not open backing file: " per level.
fn open_chain(
    files: &mut dyn Files,
    top: &instar_wire::ImageInfo,
    filename: &str,
    max_chain_depth: u32,
) -> Result<()> {
    let mut parent = ROOT_FILE;
    let mut name = String::from(filename);
    let mut backing = top
        .backing_filename
        .clone()
        .filter(|b| !b.is_empty())
        .map(|b| (b, top.backing_filename_format.clone()));
    let mut depth = 0u32;
    while let Some((stored, fmt)) = backing.take() {
        depth += 1;
        if depth > max_chain_depth {
            return Err(ImageError::limit(format!(
                "backing chain is deeper than max_chain_depth ({max_chain_depth}) at '{stored}'"
            )));
        }
        let wrap = |e: ImageError| -> ImageError {
            if e.kind != instar_wire::ErrorKind::Open {
                return e;
            }
            let mut m = String::new();
            for _ in 0..depth {
                m.push_str("Could not open backing file: ");
            }
            m.push_str(&e.message);
            ImageError { message: m, ..e }
        };
        let display = combine(&name, &stored);
        let file = files.open(parent, &stored).map_err(wrap)?;
        let driver = match fmt.as_deref() {
            Some(f) => probe::find_or_err(f).map_err(wrap)?,
            None => probe::probe(files, file, &display).map_err(wrap)?,
        };
        let info = (driver.info)(files, file, &display).map_err(wrap)?;
        backing = info
            .backing_filename
            .clone()
            .filter(|b| !b.is_empty())
            .map(|b| (b, info.backing_filename_format.clone()));
        parent = file;
        name = display;
    }
    Ok(())
}

/// Entries of the map walk measure keeps at most (one merged run each; a
/// run is 80 bytes, so this bounds the guest's memory to about 80 MiB).
const MAX_RUNS: u64 = 1 << 20;

/// qemu's `bdrv_block_status_above(in_bs, NULL, ...)` loop, through the
/// map walk: runs that are data somewhere in the chain (zeros, and runs
/// unallocated in every layer, are not).
fn data_runs(
    files: &mut dyn Files,
    format: &str,
    filename: &str,
    max_chain_depth: u32,
) -> Result<Vec<(u64, u64)>> {
    let params = crate::map::MapParams {
        format: Some(format),
        filename,
        start: 0,
        max_length: None,
        max_chain_depth,
        max_entries: MAX_RUNS,
        human: false,
        split_compressed: false,
    };
    let m = crate::map::map(files, &params).map_err(walk_error)?;
    if let Some(e) = m.error {
        return Err(walk_error(e));
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in m.entries.iter().filter(|e| e.data && !e.zero && e.present) {
        let end = e.start.saturating_add(e.length);
        match out.last_mut() {
            Some(last) if last.1 == e.start => last.1 = end,
            _ => out.push((e.start, end)),
        }
    }
    Ok(out)
}

/// The map walk's errors in measure's words: qemu-img measure says
/// "Unable to get block status" where map says "Could not read file
/// metadata"; formats without block status get measure's own line.
fn walk_error(e: ImageError) -> ImageError {
    if e.kind == instar_wire::ErrorKind::Limit {
        if let Some(rest) = e.message.strip_prefix("map is not implemented for ") {
            return not_implemented(rest.trim_end_matches(" images yet"));
        }
    }
    match e.message.strip_prefix("Could not read file metadata: ") {
        Some(errno) => ImageError {
            message: format!("Unable to get block status: {errno}"),
            ..e
        },
        None => e,
    }
}

#[cfg(test)]
mod tests;
