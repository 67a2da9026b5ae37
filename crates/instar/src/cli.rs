//! qemu-img's command line, as a mirror that only validates (step one of
//! two; `main` then resolves version, config and the chain).
//!
//! instar's own options (`--qemu-version`, `--timeout`, `--config`) are
//! taken out first, wherever they stand before a `--`, so the rest is
//! exactly qemu-img's grammar and its errors read exactly like qemu-img's.

use crate::getopt::{self, c, Failure, HasArg, LongOpt, Spec};
use crate::profile::UsageStyle;

/// instar's own options, accepted before or after the command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnOptions {
    /// `--qemu-version X.Y[.Z]`.
    pub qemu_version: Option<String>,
    /// `--timeout SECONDS`.
    pub timeout: Option<String>,
    /// `--config PATH`.
    pub config: Option<String>,
}

const OWN: [&str; 3] = ["--qemu-version", "--timeout", "--config"];

/// Split instar's options from the rest. Returns the options and the
/// indices of the remaining arguments (index 0, the program, is kept).
pub fn take_own_options(args: &[String]) -> Result<(OwnOptions, Vec<usize>), String> {
    let mut own = OwnOptions::default();
    let mut keep = vec![0usize];
    let mut i = 1usize;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            keep.extend(i..args.len());
            break;
        }
        let hit = OWN.iter().find_map(|name| {
            if arg == name {
                Some((*name, None))
            } else {
                arg.strip_prefix(name)
                    .and_then(|r| r.strip_prefix('='))
                    .map(|v| (*name, Some(v.to_string())))
            }
        });
        let Some((name, inline)) = hit else {
            keep.push(i);
            i += 1;
            continue;
        };
        let value = match inline {
            Some(v) => {
                i += 1;
                v
            }
            None => {
                let v = args
                    .get(i + 1)
                    .ok_or_else(|| format!("option '{name}' requires an argument"))?;
                i += 2;
                v.clone()
            }
        };
        match name {
            "--qemu-version" => own.qemu_version = Some(value),
            "--timeout" => own.timeout = Some(value),
            _ => own.config = Some(value),
        }
    }
    Ok((own, keep))
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Default.
    Human,
    /// `--output=json`.
    Json,
}

/// Parsed `info` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct InfoArgs {
    /// `-f`.
    pub format: Option<String>,
    /// `--output`.
    pub output: OutputFormat,
    /// `--backing-chain` / `-b`.
    pub backing_chain: bool,
    /// `-U` (accepted; instar opens read-only and takes no locks).
    pub force_share: bool,
    /// `--image-opts` (refused later).
    pub image_opts: bool,
    /// `--object` values (refused later).
    pub objects: Vec<String>,
    /// `--limits` (10.2; refused later).
    pub limits: bool,
    /// Index of the file name in the argument vector.
    pub filename_index: usize,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Print this on stdout, exit 0.
    Print(String),
    /// `--version` / `-V`.
    Version,
    /// `info`.
    Info(InfoArgs),
    /// `map`.
    Map(MapArgs),
    /// `measure`.
    Measure(crate::measure::MeasureArgs),
    /// `check`.
    Check(crate::check::CheckArgs),
    /// `compare`.
    Compare(crate::compare::CompareArgs),
    /// `convert`.
    Convert(crate::convert::ConvertArgs),
    /// A qemu-img command instar does not have yet.
    NotImplemented(String),
}

/// Parsed `map` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct MapArgs {
    /// `-f`.
    pub format: Option<String>,
    /// `--output`.
    pub output: OutputFormat,
    /// `--start-offset` / `-s`.
    pub start: u64,
    /// `--max-length` / `-l`.
    pub max_length: Option<u64>,
    /// `-U` (accepted; instar opens read-only and takes no locks).
    pub force_share: bool,
    /// `--image-opts` (refused later).
    pub image_opts: bool,
    /// `--object` values (refused later).
    pub objects: Vec<String>,
    /// Index of the file name in the argument vector.
    pub filename_index: usize,
}

/// A usage error: the exact stderr text, exit code 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

/// qemu-img's commands (10.0), for "Command not found" versus "not yet
/// implemented by instar".
pub const QEMU_IMG_COMMANDS: &[(&str, &str)] = &[
    ("amend", "Update format-specific options of the image"),
    ("bench", "Run simple image benchmark"),
    (
        "bitmap",
        "Perform modifications of the persistent bitmap in the image",
    ),
    ("check", "Check basic image integrity"),
    ("commit", "Commit image to its backing file"),
    ("compare", "Check if two images have the same contents"),
    (
        "convert",
        "Copy one image to another with optional format conversion",
    ),
    ("create", "Create and format new image file"),
    ("dd", "Copy input to output with optional format conversion"),
    ("info", "Display information about image"),
    ("map", "Dump image metadata"),
    ("measure", "Calculate file size requred for a new image"),
    ("rebase", "Change backing file of the image"),
    ("resize", "Resize the image to the new size"),
    ("snapshot", "List or manipulate snapshots within image"),
];

/// qemu's cache mode names for `-t`/`-T` (`bdrv_parse_cache_mode`; `off`
/// is its alias of `none`).
pub const CACHE_MODES: &[&str] = &[
    "none",
    "off",
    "directsync",
    "writeback",
    "unsafe",
    "writethrough",
];

/// Ids of long options without a short letter; the ones several commands
/// share are defined once here (command modules number theirs from 261).
pub(crate) const OPT_OUTPUT: u32 = 256;
const OPT_BACKING_CHAIN: u32 = 257;
pub(crate) const OPT_OBJECT: u32 = 258;
pub(crate) const OPT_IMAGE_OPTS: u32 = 259;
const OPT_LIMITS: u32 = 260;

/// qemu-img main's options.
const MAIN_LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: HasArg::No,
        id: c('h'),
    },
    LongOpt {
        name: "version",
        has_arg: HasArg::No,
        id: c('V'),
    },
    LongOpt {
        name: "trace",
        has_arg: HasArg::Required,
        id: c('T'),
    },
];
const MAIN_SPEC: Spec = Spec {
    short: "hVT:",
    long: MAIN_LONG,
    stop_at_operand: true,
};

/// `img_info`'s long options, in qemu's table order.
const INFO_LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: HasArg::No,
        id: c('h'),
    },
    LongOpt {
        name: "format",
        has_arg: HasArg::Required,
        id: c('f'),
    },
    LongOpt {
        name: "output",
        has_arg: HasArg::Required,
        id: OPT_OUTPUT,
    },
    LongOpt {
        name: "backing-chain",
        has_arg: HasArg::No,
        id: OPT_BACKING_CHAIN,
    },
    LongOpt {
        name: "object",
        has_arg: HasArg::Required,
        id: OPT_OBJECT,
    },
    LongOpt {
        name: "image-opts",
        has_arg: HasArg::No,
        id: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "force-share",
        has_arg: HasArg::No,
        id: c('U'),
    },
];
/// Before the rework `info` had no `-b`.
const INFO_SPEC_CLASSIC: Spec = Spec {
    short: "f:hU",
    long: INFO_LONG,
    stop_at_operand: false,
};
const INFO_SPEC_REWORKED: Spec = Spec {
    short: "hf:bU",
    long: INFO_LONG,
    stop_at_operand: false,
};

/// 10.1's `info` options, in the order its help lists them (the table
/// order decides the "possibilities" of an ambiguous prefix; not verified
/// against a 10.1 binary). 10.1 lists no `-b`.
const INFO_LONG_UPSTREAM: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: HasArg::No,
        id: c('h'),
    },
    LongOpt {
        name: "format",
        has_arg: HasArg::Required,
        id: c('f'),
    },
    LongOpt {
        name: "image-opts",
        has_arg: HasArg::No,
        id: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "backing-chain",
        has_arg: HasArg::No,
        id: OPT_BACKING_CHAIN,
    },
    LongOpt {
        name: "force-share",
        has_arg: HasArg::No,
        id: c('U'),
    },
    LongOpt {
        name: "output",
        has_arg: HasArg::Required,
        id: OPT_OUTPUT,
    },
    LongOpt {
        name: "object",
        has_arg: HasArg::Required,
        id: OPT_OBJECT,
    },
];
const INFO_SPEC_UPSTREAM: Spec = Spec {
    short: "hf:U",
    long: INFO_LONG_UPSTREAM,
    stop_at_operand: false,
};
/// 10.2 adds `-t/--cache` and `--limits` (tests/evidence/10.2.1/info-help).
const INFO_LONG_UPSTREAM_102: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: HasArg::No,
        id: c('h'),
    },
    LongOpt {
        name: "format",
        has_arg: HasArg::Required,
        id: c('f'),
    },
    LongOpt {
        name: "image-opts",
        has_arg: HasArg::No,
        id: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "backing-chain",
        has_arg: HasArg::No,
        id: OPT_BACKING_CHAIN,
    },
    LongOpt {
        name: "cache",
        has_arg: HasArg::Required,
        id: c('t'),
    },
    LongOpt {
        name: "force-share",
        has_arg: HasArg::No,
        id: c('U'),
    },
    LongOpt {
        name: "limits",
        has_arg: HasArg::No,
        id: OPT_LIMITS,
    },
    LongOpt {
        name: "output",
        has_arg: HasArg::Required,
        id: OPT_OUTPUT,
    },
    LongOpt {
        name: "object",
        has_arg: HasArg::Required,
        id: OPT_OBJECT,
    },
];
const INFO_SPEC_UPSTREAM_102: Spec = Spec {
    short: "hf:t:U",
    long: INFO_LONG_UPSTREAM_102,
    stop_at_operand: false,
};

/// What of qemu-img's grammar depends on the imitated version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grammar {
    /// Wording of usage errors.
    pub style: UsageStyle,
    /// `info` has `-t/--cache` and `--limits` (10.2).
    pub info_cache_limits: bool,
    /// The imitated version (`convert`'s options and messages changed
    /// release by release).
    pub version: crate::profile::QemuVersion,
}

impl From<UsageStyle> for Grammar {
    fn from(style: UsageStyle) -> Self {
        Grammar {
            style,
            info_cache_limits: false,
            version: crate::profile::NEWEST,
        }
    }
}

/// Builds the error texts of one usage style.
struct Usage<'a> {
    style: UsageStyle,
    argv0: &'a str,
}

impl Usage<'_> {
    fn try_line(&self, cmd: Option<&str>) -> String {
        let more = match self.style {
            UsageStyle::Reworked => "info",
            _ => "information",
        };
        match (self.style, cmd) {
            (UsageStyle::Classic, _) => format!("Try 'qemu-img --help' for more {more}\n"),
            (_, Some(cmd)) => format!("Try '{} {cmd} --help' for more {more}\n", self.argv0),
            (_, None) => format!("Try '{} --help' for more {more}\n", self.argv0),
        }
    }

    /// `error_exit`: `qemu-img: MSG` and the Try line.
    fn error_exit(&self, cmd: Option<&str>, msg: &str) -> UsageError {
        UsageError(format!("qemu-img: {msg}\n{}", self.try_line(cmd)))
    }

    /// A getopt failure.
    fn getopt(&self, cmd: Option<&str>, f: &Failure) -> UsageError {
        match self.style {
            UsageStyle::Classic => {
                // qemu reports `argv[optind - 1]` itself.
                let msg = if f.error.is_missing_argument() {
                    format!("missing argument for option '{}'", f.prev_arg)
                } else {
                    format!("unrecognized option '{}'", f.prev_arg)
                };
                self.error_exit(cmd, &msg)
            }
            UsageStyle::Reworked | UsageStyle::Upstream => {
                // glibc prints with argv[0] = "ARGV0 COMMAND".
                let who = match cmd {
                    Some(cmd) => format!("{} {cmd}", self.argv0),
                    None => self.argv0.to_string(),
                };
                UsageError(format!(
                    "{who}: {}\n{}",
                    f.error.glibc_message(),
                    self.try_line(cmd)
                ))
            }
        }
    }
}

/// Parse qemu-img's grammar. `args[0]` is the program name as invoked.
pub fn parse(args: &[String], grammar: impl Into<Grammar>) -> Result<Action, UsageError> {
    let grammar = grammar.into();
    let argv0 = args.first().map(String::as_str).unwrap_or("qemu-img");
    let usage = Usage {
        style: grammar.style,
        argv0,
    };
    if args.len() < 2 {
        return Err(usage.error_exit(None, "Not enough arguments"));
    }
    let main = getopt::parse(&MAIN_SPEC, args).map_err(|f| usage.getopt(None, &f))?;
    for (id, _) in &main.options {
        match char::from_u32(*id) {
            Some('h') => return Ok(Action::Print(main_help())),
            Some('V') => return Ok(Action::Version),
            _ => {} // -T: tracing is meaningless for instar; accepted.
        }
    }
    let Some(&cmd_index) = main.operands.first() else {
        // qemu-img with only global options exits 0 silently.
        return Ok(Action::Print(String::new()));
    };
    let cmd = args[cmd_index].as_str();
    let sub: Vec<String> = args[cmd_index..].to_vec();
    match cmd {
        "info" => parse_info(&sub, cmd_index, &usage, grammar),
        "measure" => crate::measure::parse(
            &sub,
            cmd_index,
            usage.style,
            &|m| usage.error_exit(Some("measure"), m),
            &|f| usage.getopt(Some("measure"), f),
            &|| match usage.style {
                UsageStyle::Classic => main_help(),
                _ => crate::measure::help(),
            },
        )
        .map(|r| match r {
            Ok(a) => Action::Measure(a),
            Err(help) => Action::Print(help),
        }),
        "map" => parse_map(&sub, cmd_index, &usage),
        "check" => crate::check::parse(
            &sub,
            cmd_index,
            usage.style,
            &|m| usage.error_exit(Some("check"), m),
            &|f| usage.getopt(Some("check"), f),
            &|| match usage.style {
                UsageStyle::Classic => main_help(),
                _ => crate::check::help(),
            },
        )
        .map(|r| match r {
            Ok(a) => Action::Check(a),
            Err(help) => Action::Print(help),
        }),
        "compare" => crate::compare::parse(
            &sub,
            cmd_index,
            usage.style,
            &|m| usage.error_exit(Some("compare"), m),
            &|f| usage.getopt(Some("compare"), f),
            &|| match usage.style {
                UsageStyle::Classic => main_help(),
                _ => crate::compare::help(),
            },
        )
        .map(|r| match r {
            Ok(a) => Action::Compare(a),
            Err(help) => Action::Print(help),
        }),
        "convert" => crate::convert::parse(
            &sub,
            cmd_index,
            usage.style,
            grammar.version,
            &|f| usage.getopt(Some("convert"), f),
            &|| match usage.style {
                UsageStyle::Classic => main_help(),
                _ => crate::convert::help(),
            },
        )
        .map(|r| match r {
            Ok(a) => Action::Convert(a),
            Err(help) => Action::Print(help),
        }),
        _ if QEMU_IMG_COMMANDS.iter().any(|(n, _)| *n == cmd) => {
            Ok(Action::NotImplemented(cmd.to_string()))
        }
        _ => Err(usage.error_exit(None, &format!("Command not found: {cmd}"))),
    }
}

fn parse_info(
    sub: &[String],
    base: usize,
    usage: &Usage,
    grammar: Grammar,
) -> Result<Action, UsageError> {
    let spec = match (usage.style, grammar.info_cache_limits) {
        (UsageStyle::Classic, _) => &INFO_SPEC_CLASSIC,
        (UsageStyle::Reworked, _) => &INFO_SPEC_REWORKED,
        (UsageStyle::Upstream, false) => &INFO_SPEC_UPSTREAM,
        (UsageStyle::Upstream, true) => &INFO_SPEC_UPSTREAM_102,
    };
    let parsed = getopt::parse(spec, sub).map_err(|f| usage.getopt(Some("info"), &f))?;
    let mut format = None;
    let mut output: Option<String> = None;
    let mut a = InfoArgs {
        format: None,
        output: OutputFormat::Human,
        backing_chain: false,
        force_share: false,
        image_opts: false,
        objects: Vec::new(),
        limits: false,
        filename_index: 0,
    };
    for (id, value) in parsed.options {
        match id {
            x if x == c('h') => {
                return Ok(Action::Print(match usage.style {
                    UsageStyle::Classic => main_help(),
                    UsageStyle::Reworked | UsageStyle::Upstream => info_help(),
                }))
            }
            x if x == c('f') => format = value,
            x if x == c('U') => a.force_share = true,
            x if x == c('b') || x == OPT_BACKING_CHAIN => a.backing_chain = true,
            OPT_OUTPUT => {
                let v = value.unwrap_or_default();
                if v != "human" && v != "json" {
                    let comma = match usage.style {
                        UsageStyle::Classic => None,
                        UsageStyle::Reworked => Some(""),
                        UsageStyle::Upstream => Some(","),
                    };
                    if let Some(comma) = comma {
                        return Err(usage.error_exit(
                            Some("info"),
                            &format!("--output expects 'human' or 'json'{comma} not '{v}'"),
                        ));
                    }
                }
                output = Some(v);
            }
            OPT_OBJECT => a.objects.push(value.unwrap_or_default()),
            OPT_IMAGE_OPTS => a.image_opts = true,
            OPT_LIMITS => a.limits = true,
            _ => {} // -t CACHE: instar reads through its own sandbox.
        }
    }
    if parsed.operands.len() != 1 {
        return Err(usage.error_exit(Some("info"), "Expecting one image file name"));
    }
    a.filename_index = base + parsed.operands[0];
    a.format = format;
    a.output = match output.as_deref() {
        None | Some("human") => OutputFormat::Human,
        Some("json") => OutputFormat::Json,
        Some(_) => {
            // Classic qemu checks after the file name, with no Try line.
            return Err(UsageError(
                "qemu-img: --output must be used with human or json as argument.\n".to_string(),
            ));
        }
    };
    Ok(Action::Info(a))
}

const OPT_START_OFFSET: u32 = 261;
const OPT_MAX_LENGTH: u32 = 262;

/// `img_map`'s long options, in qemu's table order.
const MAP_LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: HasArg::No,
        id: c('h'),
    },
    LongOpt {
        name: "format",
        has_arg: HasArg::Required,
        id: c('f'),
    },
    LongOpt {
        name: "output",
        has_arg: HasArg::Required,
        id: OPT_OUTPUT,
    },
    LongOpt {
        name: "object",
        has_arg: HasArg::Required,
        id: OPT_OBJECT,
    },
    LongOpt {
        name: "image-opts",
        has_arg: HasArg::No,
        id: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "force-share",
        has_arg: HasArg::No,
        id: c('U'),
    },
    LongOpt {
        name: "start-offset",
        has_arg: HasArg::Required,
        id: OPT_START_OFFSET,
    },
    LongOpt {
        name: "max-length",
        has_arg: HasArg::Required,
        id: OPT_MAX_LENGTH,
    },
];
/// Before the rework `map` had no `-s`/`-l`.
const MAP_SPEC_CLASSIC: Spec = Spec {
    short: "f:hU",
    long: MAP_LONG,
    stop_at_operand: false,
};
/// The rework (Debian 10.0.2 here) adds `-s` and `-l`.
const MAP_SPEC_REWORKED: Spec = Spec {
    short: "hf:s:l:U",
    long: MAP_LONG,
    stop_at_operand: false,
};

/// qemu's `cvtnum`: a size as `qemu_strtosz` reads it (`1.5k`, `0x10`,
/// `2M`), or its error line.
fn cvtnum(name: &str, value: &str) -> Result<u64, UsageError> {
    let invalid = || UsageError(format!("qemu-img: Invalid {name} specified: '{value}'.\n"));
    let range = || {
        UsageError(format!(
            "qemu-img: Invalid {name} specified. Must be between 0 and {}.\n",
            i64::MAX
        ))
    };
    let s = value.trim_start();
    if s.starts_with('-') {
        return Err(range());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let (int_part, rest, hex) = if let Some(h) = s.strip_prefix("0x").or(s.strip_prefix("0X")) {
        let end = h.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(h.len());
        (&h[..end], &h[end..], true)
    } else {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        (&s[..end], &s[end..], false)
    };
    if int_part.is_empty() {
        return Err(invalid());
    }
    let int = u64::from_str_radix(int_part, if hex { 16 } else { 10 }).map_err(|_| range())?;
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) if !hex => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            let digits = &r[..end];
            let f: f64 = format!("0.{}", if digits.is_empty() { "0" } else { digits })
                .parse()
                .map_err(|_| invalid())?;
            (f, &r[end..])
        }
        Some(_) => return Err(invalid()),
        None => (0.0, rest),
    };
    let mul: u64 = match rest {
        "" => 1,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(invalid()),
    };
    // A fraction needs a unit that makes it whole bytes.
    if frac != 0.0 && mul == 1 {
        return Err(invalid());
    }
    let whole = int.checked_mul(mul).ok_or_else(range)?;
    let part = (frac * mul as f64) as u64;
    let v = whole.checked_add(part).ok_or_else(range)?;
    if v > i64::MAX as u64 {
        return Err(range());
    }
    Ok(v)
}

fn parse_map(sub: &[String], base: usize, usage: &Usage) -> Result<Action, UsageError> {
    let spec = match usage.style {
        UsageStyle::Classic => &MAP_SPEC_CLASSIC,
        UsageStyle::Reworked | UsageStyle::Upstream => &MAP_SPEC_REWORKED,
    };
    let parsed = getopt::parse(spec, sub).map_err(|f| usage.getopt(Some("map"), &f))?;
    let mut output: Option<String> = None;
    let mut a = MapArgs {
        format: None,
        output: OutputFormat::Human,
        start: 0,
        max_length: None,
        force_share: false,
        image_opts: false,
        objects: Vec::new(),
        filename_index: 0,
    };
    for (id, value) in parsed.options {
        let v = value.unwrap_or_default();
        match id {
            x if x == c('h') => {
                return Ok(Action::Print(match usage.style {
                    UsageStyle::Classic => main_help(),
                    UsageStyle::Reworked | UsageStyle::Upstream => map_help(),
                }))
            }
            x if x == c('f') => a.format = Some(v),
            x if x == c('U') => a.force_share = true,
            x if x == c('s') || x == OPT_START_OFFSET => a.start = cvtnum("start offset", &v)?,
            x if x == c('l') || x == OPT_MAX_LENGTH => {
                a.max_length = Some(cvtnum("max length", &v)?)
            }
            OPT_OUTPUT => {
                if v != "human" && v != "json" {
                    let comma = match usage.style {
                        UsageStyle::Classic => None,
                        UsageStyle::Reworked => Some(""),
                        UsageStyle::Upstream => Some(","),
                    };
                    if let Some(comma) = comma {
                        return Err(usage.error_exit(
                            Some("map"),
                            &format!("--output expects 'human' or 'json'{comma} not '{v}'"),
                        ));
                    }
                }
                output = Some(v);
            }
            OPT_OBJECT => a.objects.push(v),
            OPT_IMAGE_OPTS => a.image_opts = true,
            _ => {}
        }
    }
    if parsed.operands.len() != 1 {
        return Err(usage.error_exit(Some("map"), "Expecting one image file name"));
    }
    a.filename_index = base + parsed.operands[0];
    a.output = match output.as_deref() {
        None | Some("human") => OutputFormat::Human,
        Some("json") => OutputFormat::Json,
        Some(_) => {
            return Err(UsageError(
                "qemu-img: --output must be used with human or json as argument.\n".to_string(),
            ));
        }
    };
    Ok(Action::Map(a))
}

/// `map --help`, in instar's words (see [`info_help`]).
pub fn map_help() -> String {
    "Usage: qemu-img map [-f FMT] [--output human|json] [--start-offset OFFSET]
                    [--max-length LENGTH] [-U|--force-share] FILENAME

Show how FILENAME's guest bytes are stored: which runs hold data, zeros or
nothing, in which file and at which offset, through the backing chain,
exactly as the installed qemu-img would print it. instar parses the image
inside a sandbox.

  -h, --help            this help
  -f, --format FMT      treat FILENAME as FMT instead of probing
  -s, --start-offset N  start at guest offset N
  -l, --max-length N    map at most N bytes
  -U, --force-share     accepted (instar opens images read-only, unlocked)
  --output human|json   output format (default human)
  --image-opts, --object, json: file names are not supported.

"
    .to_string()
}

/// `info --help`. instar's own words: help is for people, and scripts do
/// not parse it (they probe `--help` of the program for "Recognized
/// commands", which [`main_help`] keeps).
pub fn info_help() -> String {
    "Usage: qemu-img info [-f FMT] [-b|--backing-chain] [-U|--force-share]
                     [--output human|json] FILENAME

Show what FILENAME is: its format, sizes, backing file, snapshots and
format-specific facts, exactly as the installed qemu-img would print them.
instar parses the image inside a sandbox.

  -h, --help            this help
  -f, --format FMT      treat FILENAME as FMT instead of probing
  -b, --backing-chain   also show every image of the backing chain
                        (backing files only from the image's directory and
                        allow_paths, see docs/configuration.md)
  -U, --force-share     accepted (instar opens images read-only, unlocked)
  --output human|json   output format (default human)
  --image-opts, --object, json: file names are not supported.

"
    .to_string()
}

/// `qemu-img --help`: qemu-img's layout (scripts probe it for "Recognized
/// commands"), listing what instar implements.
pub fn main_help() -> String {
    let mut s = String::from(
        "instar: a sandboxed qemu-img. Usage:

  qemu-img [standard options] COMMAND [--help | command options]

Standard options:
  -h, --help
     display this help and exit
  -V, --version
     display version info and exit
  -T,--trace TRACE
     accepted and ignored

instar options (before or after COMMAND):
  --qemu-version X.Y[.Z]
     imitate this qemu-img version's output (default: the installed one)
  --timeout SECONDS
     deadline for the sandboxed parser
  --config PATH
     configuration file (default $INSTAR_CONFIG or /etc/instar/config.toml)

Recognized commands (run qemu-img COMMAND --help for command-specific help):

",
    );
    for (name, what) in QEMU_IMG_COMMANDS {
        let note = if matches!(
            *name,
            "info" | "map" | "check" | "measure" | "compare" | "convert"
        ) {
            ""
        } else {
            " (not implemented yet)"
        };
        s.push_str(&format!("  {name} - {what}{note}\n"));
    }
    s.push_str(
        "
Supported image formats:

  bochs cloop dmg luks parallels qcow qcow2 qed raw vdi vhdx vmdk vpc

",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn err(style: UsageStyle, s: &[&str]) -> String {
        parse(&args(s), style).unwrap_err().0
    }

    // Expected texts: stderr of qemu-img 10.0.2 (Debian, reworked options)
    // run here with the same arguments.
    #[test]
    fn reworked_usage_errors() {
        let r = UsageStyle::Reworked;
        assert_eq!(
            err(r, &["qemu-img", "info"]),
            "qemu-img: Expecting one image file name\nTry 'qemu-img info --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img", "info", "a", "b"]),
            "qemu-img: Expecting one image file name\nTry 'qemu-img info --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img", "info", "--output=xml", "x"]),
            "qemu-img: --output expects 'human' or 'json' not 'xml'\nTry 'qemu-img info --help' for more info\n"
        );
        assert_eq!(
            err(r, &["/usr/bin/qemu-img", "info", "--bogus", "x"]),
            "/usr/bin/qemu-img info: unrecognized option '--bogus'\nTry '/usr/bin/qemu-img info --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img", "bogus"]),
            "qemu-img: Command not found: bogus\nTry 'qemu-img --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img"]),
            "qemu-img: Not enough arguments\nTry 'qemu-img --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img", "-x"]),
            "qemu-img: invalid option -- 'x'\nTry 'qemu-img --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img", "-T"]),
            "qemu-img: option requires an argument -- 'T'\nTry 'qemu-img --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img", "info", "-t", "x"]),
            "qemu-img info: invalid option -- 't'\nTry 'qemu-img info --help' for more info\n"
        );
        assert!(matches!(
            parse(&args(&["qemu-img", "info", "-b", "x"]), r),
            Ok(Action::Info(InfoArgs {
                backing_chain: true,
                ..
            }))
        ));
        assert_eq!(
            parse(&args(&["qemu-img", "info", "x", "--help"]), r),
            Ok(Action::Print(info_help()))
        );
        assert_eq!(
            parse(&args(&["qemu-img", "--version", "info"]), r),
            Ok(Action::Version)
        );
    }

    // tests/evidence/{10.1.0,10.2.1,11.1.3}.json: the upstream rework.
    #[test]
    fn upstream_usage_errors() {
        let u = UsageStyle::Upstream;
        assert_eq!(
            err(u, &["qemu-img", "info"]),
            "qemu-img: Expecting one image file name\nTry 'qemu-img info --help' for more information\n"
        );
        assert_eq!(
            err(u, &["qemu-img", "info", "--output=xml", "raw.img"]),
            "qemu-img: --output expects 'human' or 'json', not 'xml'\nTry 'qemu-img info --help' for more information\n"
        );
        assert_eq!(
            err(u, &["/usr/bin/qemu-img", "bogus"]),
            "qemu-img: Command not found: bogus\nTry '/usr/bin/qemu-img --help' for more information\n"
        );
        assert_eq!(
            err(u, &["qemu-img", "info", "--limits", "x"]),
            "qemu-img info: unrecognized option '--limits'\nTry 'qemu-img info --help' for more information\n"
        );
        let g = Grammar {
            style: u,
            info_cache_limits: true,
            version: crate::profile::NEWEST,
        };
        assert!(matches!(
            parse(
                &args(&["qemu-img", "info", "--limits", "-t", "none", "x"]),
                g
            ),
            Ok(Action::Info(InfoArgs { limits: true, .. }))
        ));
    }

    // tests/evidence/{4.2.1,...,8.2.2}.json: qemu's own error_exit.
    #[test]
    fn classic_usage_errors() {
        let c = UsageStyle::Classic;
        assert_eq!(
            err(c, &["/usr/bin/qemu-img", "info", "--bogus", "raw.img"]),
            "qemu-img: unrecognized option '--bogus'\nTry 'qemu-img --help' for more information\n"
        );
        assert_eq!(
            err(c, &["qemu-img", "info", "-Z", "raw.img"]),
            "qemu-img: unrecognized option '-Z'\nTry 'qemu-img --help' for more information\n"
        );
        assert_eq!(
            err(c, &["qemu-img", "info", "--output=xml", "raw.img"]),
            "qemu-img: --output must be used with human or json as argument.\n"
        );
        assert_eq!(
            err(c, &["qemu-img"]),
            "qemu-img: Not enough arguments\nTry 'qemu-img --help' for more information\n"
        );
    }

    #[test]
    fn own_options_anywhere() {
        let a = args(&[
            "instar",
            "--qemu-version",
            "9.2",
            "info",
            "--timeout=3",
            "x",
            "--",
            "--config",
        ]);
        let (own, keep) = take_own_options(&a).unwrap();
        assert_eq!(own.qemu_version.as_deref(), Some("9.2"));
        assert_eq!(own.timeout.as_deref(), Some("3"));
        assert_eq!(own.config, None);
        assert_eq!(keep, vec![0, 3, 5, 6, 7]);
    }

    #[test]
    fn info_options() {
        let a = args(&[
            "qemu-img",
            "info",
            "-f",
            "qcow2",
            "--output",
            "json",
            "-U",
            "--backing-chain",
            "img",
        ]);
        let Ok(Action::Info(i)) = parse(&a, UsageStyle::Classic) else {
            panic!()
        };
        assert_eq!(i.format.as_deref(), Some("qcow2"));
        assert_eq!(i.output, OutputFormat::Json);
        assert!(i.force_share && i.backing_chain);
        assert_eq!(i.filename_index, 8);
        assert_eq!(
            parse(&args(&["q", "commit", "x"]), UsageStyle::Classic),
            Ok(Action::NotImplemented("commit".into()))
        );
    }
}
