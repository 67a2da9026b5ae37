//! `check`: the guest walks the image; the host prints the driver's stderr
//! lines, renders qemu-img's summary (human or JSON) and exits with
//! qemu-img's code (0 clean, 1 failure, 2 corruptions, 3 leaks only, 63 no
//! check for the format). The grammar is here too (`img_check`'s option
//! loop and messages per usage style). Repair (`-r`) is refused: instar
//! never writes images.

use crate::cli::{OutputFormat, UsageError};
use crate::cli::{OPT_IMAGE_OPTS, OPT_OBJECT, OPT_OUTPUT};
use crate::config::Config;
use crate::error::CliError;
use crate::getopt::{self, c, long, HasArg, LongOpt, Spec};
use crate::info::{command_line_image, guest_error, open_plain, vmm_error};
use crate::profile::{OutputProfile, UsageStyle};
use crate::qobject::{QDict, QValue};
use instar_vmm::OpenedFile;
use instar_wire::{CheckResult, CheckStatus, Request, Response};
use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

/// Parsed `check` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckArgs {
    /// `-f`.
    pub format: Option<String>,
    /// `--output`.
    pub output: OutputFormat,
    /// `-q`.
    pub quiet: bool,
    /// `-r` value, already validated (`leaks` or `all`); refused later.
    pub repair: Option<String>,
    /// `-U`.
    pub force_share: bool,
    /// `--image-opts` (refused later).
    pub image_opts: bool,
    /// `--object` values (refused later).
    pub objects: Vec<String>,
    /// Index of the file name in the argument vector.
    pub filename_index: usize,
}

/// `img_check`'s long options before the rework, in qemu's table order.
const LONG_CLASSIC: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("format", HasArg::Required, c('f')),
    long("repair", HasArg::Required, c('r')),
    long("output", HasArg::Required, OPT_OUTPUT),
    long("object", HasArg::Required, OPT_OBJECT),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("force-share", HasArg::No, c('U')),
];

/// After the rework (Debian 10.0.2: `--o` is ambiguous between
/// `--output` and `--object`, listed in that order).
const LONG_REWORKED: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("quiet", HasArg::No, c('q')),
    long("format", HasArg::Required, c('f')),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("cache", HasArg::Required, c('T')),
    long("force-share", HasArg::No, c('U')),
    long("output", HasArg::Required, OPT_OUTPUT),
    long("repair", HasArg::Required, c('r')),
    long("object", HasArg::Required, OPT_OBJECT),
];

fn spec(style: UsageStyle) -> Spec {
    match style {
        UsageStyle::Classic => Spec {
            short: "hf:r:T:qU",
            long: LONG_CLASSIC,
            stop_at_operand: false,
        },
        UsageStyle::Reworked | UsageStyle::Upstream => Spec {
            short: "hf:r:T:qU",
            long: LONG_REWORKED,
            stop_at_operand: false,
        },
    }
}

/// Parse `check`'s arguments (`sub[0]` is `check`). `Ok(Err(text))` is
/// help to print.
pub fn parse(
    sub: &[String],
    base: usize,
    style: UsageStyle,
    error_exit: &dyn Fn(&str) -> UsageError,
    getopt_error: &dyn Fn(&getopt::Failure) -> UsageError,
    help: &dyn Fn() -> String,
) -> Result<Result<CheckArgs, String>, UsageError> {
    let parsed = getopt::parse(&spec(style), sub).map_err(|f| getopt_error(&f))?;
    let mut a = CheckArgs {
        format: None,
        output: OutputFormat::Human,
        quiet: false,
        repair: None,
        force_share: false,
        image_opts: false,
        objects: Vec::new(),
        filename_index: 0,
    };
    let mut output: Option<String> = None;
    let mut cache: Option<String> = None;
    for (id, value) in parsed.options {
        let value = value.unwrap_or_default();
        match id {
            x if x == c('h') => return Ok(Err(help())),
            x if x == c('f') => a.format = Some(value),
            x if x == c('q') => a.quiet = true,
            x if x == c('U') => a.force_share = true,
            x if x == c('T') => cache = Some(value),
            x if x == c('r') => {
                if value != "leaks" && value != "all" {
                    return Err(match style {
                        UsageStyle::Classic => error_exit(&format!(
                            "Unknown option value for -r (expecting 'leaks' or 'all'): {value}"
                        )),
                        _ => error_exit(&format!(
                            "--repair (-r) expects 'leaks' or 'all' not '{value}'"
                        )),
                    });
                }
                a.repair = Some(value);
            }
            OPT_OUTPUT => {
                if style != UsageStyle::Classic && value != "human" && value != "json" {
                    let comma = if style == UsageStyle::Upstream {
                        ","
                    } else {
                        ""
                    };
                    return Err(error_exit(&format!(
                        "--output expects 'human' or 'json'{comma} not '{value}'"
                    )));
                }
                output = Some(value);
            }
            OPT_OBJECT => a.objects.push(value),
            OPT_IMAGE_OPTS => a.image_opts = true,
            _ => {}
        }
    }
    if parsed.operands.len() != 1 {
        return Err(error_exit("Expecting one image file name"));
    }
    a.filename_index = base + parsed.operands[0];
    a.output = match output.as_deref() {
        None | Some("human") => OutputFormat::Human,
        Some("json") => OutputFormat::Json,
        Some(_) => {
            return Err(UsageError(
                "qemu-img: --output must be used with human or json as argument.\n".into(),
            ))
        }
    };
    if let Some(mode) = cache {
        if !crate::cli::CACHE_MODES.contains(&mode.as_str()) {
            return Err(UsageError(format!(
                "qemu-img: Invalid source cache option: {mode}\n"
            )));
        }
    }
    Ok(Ok(a))
}

/// `check --help`: instar's own words (see `info_help`).
pub fn help() -> String {
    "Usage: qemu-img check [-f FMT] [-q] [-U|--force-share]
                      [--output human|json] FILENAME

Check the consistency of FILENAME's metadata (reference counts, tables,
flags) exactly as the installed qemu-img would, and exit with its code:
0 clean, 1 check failed, 2 corruptions, 3 leaked clusters only, 63 the
format has no check. instar parses the image inside a sandbox and never
writes it.

  -h, --help            this help
  -f, --format FMT      treat FILENAME as FMT instead of probing
  -q, --quiet           no summary (per-cluster lines still go to stderr)
  -U, --force-share     accepted (instar opens images read-only, unlocked)
  -T, --cache MODE      accepted, no effect
  --output human|json   output format (default human)
  -r, --repair          refused: instar does not modify images
  --image-opts, --object, json: file names are not supported.

"
    .to_string()
}

/// Settings of one `check` call.
pub struct CheckCall<'a> {
    /// Parsed arguments.
    pub args: &'a CheckArgs,
    /// The file name exactly as given.
    pub filename: OsString,
    /// Settings.
    pub config: &'a Config,
    /// Guest deadline.
    pub timeout: Duration,
    /// Output profile.
    pub profile: &'a OutputProfile,
}

/// qemu-img's human summary (`dump_human_image_check`).
pub fn render_human(r: &CheckResult) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc,
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

/// qemu-img's JSON (`ImageCheck`; optional counters only when nonzero).
pub fn render_json(r: &CheckResult, filename: &str) -> Vec<u8> {
    let mut d = QDict::new();
    d.put_str("filename", filename);
    d.put_str("format", &r.format);
    d.put_int("check-errors", r.check_errors as i64);
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (key, v) in optional {
        if v != 0 {
            d.put_int(key, v as i64);
        }
    }
    crate::qobject::to_json_pretty(&QValue::Dict(d))
}

/// The hint qemu prints after a stale-bitmaps warning.
const STALE_BITMAPS_HINT: &str =
    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";

fn exit_now(stdout: &[u8], code: u8) -> ! {
    let so = std::io::stdout();
    let mut out = so.lock();
    let _ = out.write_all(stdout).and_then(|()| out.flush());
    std::process::exit(code.into())
}

/// Run `check`. Exit 0 and 1 return normally; 2, 3 and 63 (which the
/// shared error type does not carry) print and exit here.
pub fn run(call: &CheckCall) -> Result<Vec<u8>, CliError> {
    let args = call.args;
    if args.image_opts {
        return Err(CliError::Instar(
            "--image-opts is not supported (instar opens plain image files only)".into(),
        ));
    }
    if !args.objects.is_empty() {
        return Err(CliError::Instar(
            "--object is not supported (instar reads no secrets)".into(),
        ));
    }
    if let Some(mode) = &args.repair {
        return Err(CliError::Instar(format!(
            "check -r {mode} (repair) is not supported: instar never modifies images; nothing was changed"
        )));
    }
    let (name, path, sandbox) = command_line_image(&call.filename, call.config, call.timeout)?;
    let file = open_plain(&name, &path, call.profile)?;
    let root = OpenedFile {
        display_name: name.clone(),
        file,
    };
    let request = Request::Check {
        format: args.format.clone(),
        filename: name.clone(),
    };
    let outcome = instar_vmm::run(&sandbox, root, &request).map_err(vmm_error)?;
    let result = match outcome.response {
        Response::Check(c) => c,
        Response::Error(e) => return Err(guest_error(&name, e)),
        _ => {
            return Err(CliError::Instar(
                "internal error: the guest answered check with another result".into(),
            ))
        }
    };
    match &result.status {
        CheckStatus::Unsupported => {
            eprintln!("qemu-img: This image format does not support checks");
            exit_now(b"", 63);
        }
        CheckStatus::NotImplemented => {
            return Err(CliError::Instar(format!(
                "check is not implemented for {} images yet",
                result.format
            )));
        }
        CheckStatus::Failed(_) | CheckStatus::Done => {}
    }
    {
        let stderr = std::io::stderr();
        let mut err = stderr.lock();
        for line in &result.diagnostics {
            // qemu appends this hint to an error_report without a newline,
            // so the next stderr output follows on the same line.
            if line == STALE_BITMAPS_HINT {
                let _ = write!(err, "{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
        }
    }
    if let CheckStatus::Failed(e) = &result.status {
        return Err(CliError::Qemu(format!("Check failed: {e}")));
    }
    let stdout = if args.quiet {
        Vec::new()
    } else {
        match args.output {
            OutputFormat::Human => render_human(&result).into_bytes(),
            OutputFormat::Json => render_json(&result, &name),
        }
    };
    if result.check_errors != 0 {
        exit_now_err(&stdout, "qemu-img: Check failed\n");
    }
    if result.corruptions != 0 {
        exit_now(&stdout, 2);
    }
    if result.leaks != 0 {
        exit_now(&stdout, 3);
    }
    Ok(stdout)
}

fn exit_now_err(stdout: &[u8], err: &str) -> ! {
    {
        let so = std::io::stdout();
        let mut out = so.lock();
        let _ = out.write_all(stdout).and_then(|()| out.flush());
    }
    let _ = std::io::stderr().write_all(err.as_bytes());
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> CheckResult {
        CheckResult::new(CheckStatus::Done, "qcow2")
    }

    #[test]
    fn human_both_problems() {
        // qemu-img 10.0.2 on qcow2-refcount-high.qcow2 (corpus).
        let mut r = result();
        r.corruptions = 1;
        r.leaks = 1;
        r.total_clusters = 128;
        r.allocated_clusters = 1;
        r.image_end_offset = 393216;
        assert_eq!(
            render_human(&r),
            "\n1 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n1/128 = 0.78% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 393216\n"
        );
    }

    #[test]
    fn json_leak() {
        // qemu-img 10.0.2 check --output=json of the corpus's qcow2-leak.
        let mut r = result();
        r.leaks = 1;
        r.total_clusters = 128;
        r.allocated_clusters = 1;
        r.image_end_offset = 458752;
        assert_eq!(
            String::from_utf8(render_json(&r, "/tmp/chk/leak.qcow2")).unwrap(),
            "{\n    \"image-end-offset\": 458752,\n    \"total-clusters\": 128,\n    \"check-errors\": 0,\n    \"leaks\": 1,\n    \"allocated-clusters\": 1,\n    \"filename\": \"/tmp/chk/leak.qcow2\",\n    \"format\": \"qcow2\"\n}\n"
        );
    }
}
