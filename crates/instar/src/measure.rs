//! `measure`: `--size N` is arithmetic on the host (no image, no VM);
//! with a file, the guest opens it and learns its allocation, and the host
//! only renders. The grammar is here too (qemu-img's `img_measure` option
//! loop and argument checks, with its messages per version).

use crate::cli::{OutputFormat, UsageError};
use crate::cli::{OPT_IMAGE_OPTS, OPT_OBJECT, OPT_OUTPUT};
use crate::config::Config;
use crate::error::CliError;
use crate::getopt::{self, c, long, HasArg, LongOpt, Spec};
use crate::info::{command_line_image, could_not_open, open_plain, vmm_error};
use crate::profile::{OutputProfile, QemuVersion, UsageStyle};
use crate::qobject::QDict;
use instar_engine::measure::{self as engine, MeasureError, SizeError};
use instar_vmm::OpenedFile;
use instar_wire::{ErrorKind, MeasureInfo, Request, Response};
use std::ffi::OsString;
use std::time::Duration;

/// Parsed `measure` arguments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MeasureArgs {
    /// `-f`.
    pub format: Option<String>,
    /// `-O` (qemu's default is raw).
    pub target: Option<String>,
    /// `-o` values joined with `,`, as qemu accumulates them.
    pub options: Option<String>,
    /// `-l`.
    pub snapshot: Option<String>,
    /// `--output`.
    pub output: Option<OutputFormat>,
    /// `--size`, as typed.
    pub size: Option<String>,
    /// The option loop stopped at this unparsable `--size` value.
    pub bad_size: Option<(String, SizeError)>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `--object` values.
    pub objects: Vec<String>,
    /// Indices of the operands in the argument vector.
    pub operands: Vec<usize>,
}

const OPT_SIZE: u32 = 261;

/// qemu-img up to 9.x (and 10.0 without Debian's patch): `img_measure`'s
/// table.
const LONG_CLASSIC: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("object", HasArg::Required, OPT_OBJECT),
    long("output", HasArg::Required, OPT_OUTPUT),
    long("size", HasArg::Required, OPT_SIZE),
    long("force-share", HasArg::No, c('U')),
];
/// Debian's 10.0.2 (the options rework backport): its ambiguity lists
/// (`--s`: snapshot, size; `--o`: options, object, output) give the order.
const LONG_REWORKED: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("target-format", HasArg::Required, c('O')),
    long("format", HasArg::Required, c('f')),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("options", HasArg::Required, c('o')),
    long("snapshot", HasArg::Required, c('l')),
    long("object", HasArg::Required, OPT_OBJECT),
    long("output", HasArg::Required, OPT_OUTPUT),
    long("size", HasArg::Required, OPT_SIZE),
    long("force-share", HasArg::No, c('U')),
];
/// Upstream 10.1+ (from qemu's source; not verified against a binary).
const LONG_UPSTREAM: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("source-format", HasArg::Required, c('f')),
    long("format", HasArg::Required, c('f')),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("source-image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("snapshot", HasArg::Required, c('l')),
    long("target-format", HasArg::Required, c('O')),
    long("target-format-options", HasArg::Required, c('o')),
    long("options", HasArg::Required, c('o')),
    long("force-share", HasArg::No, c('U')),
    long("output", HasArg::Required, OPT_OUTPUT),
    long("object", HasArg::Required, OPT_OBJECT),
    long("size", HasArg::Required, c('s')),
];

fn spec(style: UsageStyle) -> Spec {
    match style {
        UsageStyle::Classic => Spec {
            short: "hf:O:o:l:U",
            long: LONG_CLASSIC,
            stop_at_operand: false,
        },
        // Debian's table has `-s` in its help but not in its option string.
        UsageStyle::Reworked => Spec {
            short: "hf:O:o:l:U",
            long: LONG_REWORKED,
            stop_at_operand: false,
        },
        UsageStyle::Upstream => Spec {
            short: "hf:l:O:o:Us:",
            long: LONG_UPSTREAM,
            stop_at_operand: false,
        },
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

/// `measure` after the command name. `error_exit(msg)` builds qemu-img's
/// usage error with its Try line; `getopt_error` a getopt failure's.
pub fn parse(
    sub: &[String],
    base: usize,
    style: UsageStyle,
    error_exit: &dyn Fn(&str) -> UsageError,
    getopt_error: &dyn Fn(&getopt::Failure) -> UsageError,
    help: &dyn Fn() -> String,
) -> Result<Result<MeasureArgs, String>, UsageError> {
    let spec = spec(style);
    let parsed = getopt::parse(&spec, sub).map_err(|f| getopt_error(&f))?;
    let mut a = MeasureArgs::default();
    for (id, value) in parsed.options {
        let value = value.unwrap_or_default();
        match id {
            x if x == c('h') => return Ok(Err(help())),
            x if x == c('f') => a.format = Some(value),
            x if x == c('O') => a.target = Some(value),
            x if x == c('o') => {
                if !valid_option_list(&value) {
                    return Err(UsageError(format!(
                        "qemu-img: Invalid option list: {value}\n"
                    )));
                }
                a.options = Some(match a.options.take() {
                    Some(prev) => format!("{prev},{value}"),
                    None => value,
                });
            }
            x if x == c('l') => a.snapshot = Some(value),
            x if x == c('U') => {}
            OPT_OBJECT => a.objects.push(value),
            OPT_IMAGE_OPTS => a.image_opts = true,
            OPT_OUTPUT => {
                a.output =
                    Some(match value.as_str() {
                        "human" => OutputFormat::Human,
                        "json" => OutputFormat::Json,
                        _ => return Err(match style {
                            UsageStyle::Classic => UsageError(
                                "qemu-img: --output must be used with human or json as argument.\n"
                                    .into(),
                            ),
                            UsageStyle::Reworked => error_exit(&format!(
                                "--output expects 'human' or 'json' not '{value}'"
                            )),
                            UsageStyle::Upstream => error_exit(&format!(
                                "--output expects 'human' or 'json', not '{value}'"
                            )),
                        }),
                    });
            }
            _ => {
                // --size (and 10.1's -s): qemu stops at a bad value.
                match engine::parse_size(&value) {
                    Ok(v) if v <= i64::MAX as u64 => a.size = Some(value),
                    Ok(_) => {
                        a.bad_size = Some((value, SizeError::Range));
                        return Ok(Ok(a));
                    }
                    Err(e) => {
                        a.bad_size = Some((value, e));
                        return Ok(Ok(a));
                    }
                }
            }
        }
    }
    a.operands = parsed.operands.iter().map(|i| base + i).collect();
    Ok(Ok(a))
}

/// `measure --help` in instar's own words (scripts do not parse help).
pub fn help() -> String {
    "Usage: qemu-img measure [-f FMT] [-O OUTPUT_FMT] [-o OPTIONS]
                        [--output human|json] (--size SIZE | FILENAME)

Print the file size a new image of OUTPUT_FMT (default raw) needs, for a
virtual size of SIZE or to hold the contents of FILENAME, exactly as the
installed qemu-img would. instar reads FILENAME inside a sandbox.

  -h, --help            this help
  -f, --format FMT      treat FILENAME as FMT instead of probing
  -O, --target-format FMT
                        the format to measure for (raw, qcow2)
  -o, --options OPTIONS creation options of the target (cluster_size,
                        refcount_bits, extended_l2, preallocation, compat...)
  --size SIZE           measure for this virtual size (no image needed)
  --output human|json   output format (default human)
  -U, --force-share     accepted (instar opens images read-only, unlocked)
  -l, --image-opts, --object: not supported.

"
    .to_string()
}

/// Settings of one `measure` call.
pub struct MeasureCall<'a> {
    /// Parsed arguments.
    pub args: &'a MeasureArgs,
    /// The file name exactly as given, if any.
    pub filename: Option<OsString>,
    /// Settings.
    pub config: &'a Config,
    /// Guest deadline.
    pub timeout: Duration,
    /// Output profile.
    pub profile: &'a OutputProfile,
}

fn qemu_lines(lines: Vec<String>) -> CliError {
    // CliError::Qemu prints one `qemu-img: ` prefix; earlier lines get
    // theirs here.
    let mut text = String::new();
    let n = lines.len();
    for (i, l) in lines.into_iter().enumerate() {
        if i + 1 < n {
            text.push_str(&l);
            text.push_str("\nqemu-img: ");
        } else {
            text.push_str(&l);
        }
    }
    CliError::Qemu(text)
}

fn measure_error(e: MeasureError) -> CliError {
    match e {
        MeasureError::Qemu(lines) => qemu_lines(lines),
        MeasureError::Unsupported(m) => CliError::Instar(m),
    }
}

/// qemu-img's message for a bad `--size`, per version.
fn size_error(text: &str, e: SizeError, v: QemuVersion) -> CliError {
    let v = v.effective();
    let ge = |maj: u32, min: u32| (v.major, v.minor) >= (maj, min);
    let lines: Vec<String> = match e {
        SizeError::Range if !ge(5, 0) => vec!["Image size must be less than 8 EiB!".into()],
        SizeError::Range if ge(10, 1) => {
            vec!["Invalid image size specified. Must be between 0 and 9223372036854775807".into()]
        }
        SizeError::Range => {
            vec!["Invalid image size specified. Must be between 0 and 9223372036854775807.".into()]
        }
        SizeError::Invalid if !ge(5, 0) => vec![
            "Invalid image size specified! You may use k, M, G, T, P or E suffixes for ".into(),
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.".into(),
        ],
        SizeError::Invalid if !ge(9, 0) => vec![
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for".into(),
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.".into(),
        ],
        SizeError::Invalid if ge(10, 1) => {
            vec![format!("Invalid image size specified: '{text}'")]
        }
        SizeError::Invalid => vec![format!("Invalid image size specified: '{text}'.")],
    };
    qemu_lines(lines)
}

/// `bitmaps` exists in qemu's BlockMeasureInfo from 5.1.
fn reports_bitmaps(v: QemuVersion) -> bool {
    let v = v.effective();
    (v.major, v.minor) >= (5, 1)
}

/// Render `info` as qemu-img prints it.
pub fn render(info: &MeasureInfo, output: OutputFormat) -> Vec<u8> {
    match output {
        OutputFormat::Human => {
            let mut s = format!(
                "required size: {}\nfully allocated size: {}\n",
                info.required, info.fully_allocated
            );
            if let Some(b) = info.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            s.into_bytes()
        }
        OutputFormat::Json => {
            let mut d = QDict::new();
            d.put_uint("required", info.required);
            d.put_uint("fully-allocated", info.fully_allocated);
            if let Some(b) = info.bitmaps {
                d.put_uint("bitmaps", b);
            }
            crate::render::json_one(d)
        }
    }
}

/// Run `measure` and return what goes to stdout.
pub fn run(call: &MeasureCall) -> Result<Vec<u8>, CliError> {
    let a = call.args;
    let version = call.profile.version;
    if let Some((text, e)) = &a.bad_size {
        return Err(size_error(text, *e, version));
    }
    if !a.objects.is_empty() {
        return Err(CliError::Instar(
            "--object is not supported (instar reads no secrets)".into(),
        ));
    }
    if a.operands.len() > 1 {
        return Err(CliError::Qemu(
            "At most one filename argument is allowed.".into(),
        ));
    }
    let has_file = call.filename.is_some();
    if !has_file && (a.image_opts || a.format.is_some() || a.snapshot.is_some()) {
        return Err(CliError::Qemu(
            "--image-opts, -f, and -l require a filename argument.".into(),
        ));
    }
    if has_file && a.size.is_some() {
        return Err(CliError::Qemu(
            "--size N cannot be used together with a filename.".into(),
        ));
    }
    if !has_file && a.size.is_none() {
        return Err(CliError::Qemu(
            "Either --size N or one filename must be specified.".into(),
        ));
    }
    let output = a.output.unwrap_or(OutputFormat::Human);
    let target_fmt = a.target.as_deref().unwrap_or("raw");
    let bitmaps = reports_bitmaps(version);
    let Some(filename) = &call.filename else {
        // --size: pure arithmetic, no image and no VM.
        let size = a
            .size
            .as_deref()
            .and_then(|s| engine::parse_size(s).ok())
            .unwrap_or(0);
        let p = engine::parse_target(target_fmt, a.options.as_deref()).map_err(measure_error)?;
        let t = engine::target(&p, Some(size), bitmaps).map_err(measure_error)?;
        return Ok(render(&engine::compute(&t, None), output));
    };
    if a.image_opts {
        return Err(CliError::Instar(
            "--image-opts is not supported (instar opens plain image files only)".into(),
        ));
    }
    if a.snapshot.is_some() {
        return Err(CliError::Instar(
            "measure -l (a snapshot as the source) is not supported".into(),
        ));
    }
    // Everything about the target except the source's size; qemu reports
    // open errors first, so a bad target only after a good open.
    let target = engine::parse_target(target_fmt, a.options.as_deref())
        .and_then(|p| engine::target(&p, Some(0), bitmaps))
        .map(|mut t| {
            t.size = None;
            // Between 7.2 and 8.2 (tests/evidence); 8.1 assumed.
            let v = version.effective();
            t.parallels_bitmaps = (v.major, v.minor) >= (8, 1);
            t
        });
    run_file(call, filename, target, output)
}

fn run_file(
    call: &MeasureCall,
    filename: &OsString,
    target: Result<instar_wire::MeasureTarget, MeasureError>,
    output: OutputFormat,
) -> Result<Vec<u8>, CliError> {
    let (name, path, sandbox) = command_line_image(filename, call.config, call.timeout)?;
    let file = open_plain(&name, &path, call.profile)?;
    let root = OpenedFile {
        display_name: name.clone(),
        file,
    };
    let request = match &target {
        Ok(t) => Request::Measure {
            format: call.args.format.clone(),
            filename: name.clone(),
            target: t.clone(),
            // The image itself is one level of the chain.
            max_chain_depth: u32::try_from(call.config.max_chain_depth.saturating_sub(1))
                .unwrap_or(u32::MAX),
        },
        // Only the open matters: qemu-img opens before it looks at -O/-o.
        Err(_) => Request::Info {
            format: call.args.format.clone(),
            filename: name.clone(),
        },
    };
    let outcome = instar_vmm::run(&sandbox, root, &request).map_err(vmm_error)?;
    let (warnings, result) = match outcome.response {
        Response::Measure(m) => (m.warnings, Ok(Some(m.info))),
        Response::Info(i) => (i.warnings, Ok(None)),
        Response::Error(e) => (e.warnings.clone(), Err(e)),
        _ => {
            return Err(CliError::Instar(
                "internal error: the guest answered measure with another result".into(),
            ))
        }
    };
    for line in &warnings {
        // A format driver's own line (qcow2's corruption report) has no
        // qemu-img prefix.
        if line.starts_with("qcow2: ") {
            eprintln!("{line}");
        } else {
            eprintln!("qemu-img: {line}");
        }
    }
    match result {
        Err(e) => Err(match e.kind {
            ErrorKind::Operation => CliError::Qemu(e.message),
            ErrorKind::Limit => CliError::Instar(e.message),
            ErrorKind::Open | ErrorKind::Refused => could_not_open(&name, &e.message),
        }),
        Ok(Some(info)) => Ok(render(&info, output)),
        Ok(None) => {
            Err(measure_error(target.err().unwrap_or(MeasureError::Qemu(
                vec!["internal error".into()],
            ))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_key_order_is_qdict_order() {
        let i = MeasureInfo {
            required: 393216,
            fully_allocated: 1074135040,
            bitmaps: Some(0),
        };
        // qemu-img 10.0.2, `measure --output=json -O qcow2` of a v3 qcow2.
        assert_eq!(
            String::from_utf8(render(&i, OutputFormat::Json)).unwrap(),
            "{\n    \"bitmaps\": 0,\n    \"required\": 393216,\n    \"fully-allocated\": 1074135040\n}\n"
        );
        assert_eq!(
            String::from_utf8(render(&i, OutputFormat::Human)).unwrap(),
            "required size: 393216\nfully allocated size: 1074135040\nbitmaps size: 0\n"
        );
    }

    #[test]
    fn size_errors_per_version() {
        let t = |v: &str, s: &str, e| size_error(s, e, QemuVersion::parse_short(v).unwrap()).text();
        // tests/evidence: 10.0.2 / 9.2.1 and, for create, 5.2-8.2 and 4.2.
        assert_eq!(
            t("10.0.2", "1Q", SizeError::Invalid),
            "qemu-img: Invalid image size specified: '1Q'.\n"
        );
        assert_eq!(
            t("10.0.2", "-1", SizeError::Range),
            "qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.\n"
        );
        assert_eq!(
            t("8.2.2", "1Q", SizeError::Invalid),
            "qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"
        );
        assert_eq!(
            t("10.1.0", "1Q", SizeError::Invalid),
            "qemu-img: Invalid image size specified: '1Q'\n"
        );
    }

    #[test]
    fn option_lists() {
        assert!(valid_option_list("a=1,b=2"));
        assert!(valid_option_list("a=1,,2"));
        assert!(!valid_option_list(""));
        assert!(!valid_option_list("a=1,"));
        assert!(valid_option_list("a=1,,"));
        assert!(!valid_option_list(",a=1"));
    }
}
