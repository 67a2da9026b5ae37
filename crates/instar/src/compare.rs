//! `compare`: the host opens both images, the guest walks them (and their
//! backing chains) and returns what qemu-img's `img_compare` prints and its
//! exit code: 0 identical, 1 different, 2 an image did not open, 3 block
//! status failed, 4 a read failed. The grammar is here too (its option loop
//! and messages per usage style).

use crate::cli::UsageError;
use crate::cli::{OPT_IMAGE_OPTS, OPT_OBJECT};
use crate::config::Config;
use crate::error::CliError;
use crate::getopt::{self, c, long, HasArg, LongOpt, Spec};
use crate::info::{command_line_image, open_plain, vmm_error};
use crate::profile::{OutputProfile, UsageStyle};
use instar_vmm::{OpenedFile, RunFiles};
use instar_wire::{CompareResult, Request, Response};
use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

/// Parsed `compare` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareArgs {
    /// `-f`.
    pub format_a: Option<String>,
    /// `-F`.
    pub format_b: Option<String>,
    /// `-s`.
    pub strict: bool,
    /// `-p`.
    pub progress: bool,
    /// `-q`.
    pub quiet: bool,
    /// `-T` (checked like qemu-img, then unused).
    pub cache: Option<String>,
    /// `-U`.
    pub force_share: bool,
    /// `--image-opts` (refused later).
    pub image_opts: bool,
    /// `--object` values (refused later).
    pub objects: Vec<String>,
    /// Indices of the two file names in the argument vector.
    pub filename_index: [usize; 2],
}

/// `img_compare`'s long options before the rework, in qemu's table order.
const LONG_CLASSIC: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("object", HasArg::Required, OPT_OBJECT),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("force-share", HasArg::No, c('U')),
];

/// After the rework (Debian 10.0.2, upstream 10.1).
const LONG_REWORKED: &[LongOpt] = &[
    long("help", HasArg::No, c('h')),
    long("a-format", HasArg::Required, c('f')),
    long("b-format", HasArg::Required, c('F')),
    long("image-opts", HasArg::No, OPT_IMAGE_OPTS),
    long("strict", HasArg::No, c('s')),
    long("cache", HasArg::Required, c('T')),
    long("force-share", HasArg::No, c('U')),
    long("progress", HasArg::No, c('p')),
    long("quiet", HasArg::No, c('q')),
    long("object", HasArg::Required, OPT_OBJECT),
];

fn spec(style: UsageStyle) -> Spec {
    match style {
        UsageStyle::Classic => Spec {
            short: "hf:F:T:pqsU",
            long: LONG_CLASSIC,
            stop_at_operand: false,
        },
        UsageStyle::Reworked | UsageStyle::Upstream => Spec {
            short: "hf:F:sT:Upq",
            long: LONG_REWORKED,
            stop_at_operand: false,
        },
    }
}

/// Parse `compare`'s arguments (`sub[0]` is `compare`). `Ok(Err(text))`
/// is help to print.
pub fn parse(
    sub: &[String],
    base: usize,
    style: UsageStyle,
    error_exit: &dyn Fn(&str) -> UsageError,
    getopt_error: &dyn Fn(&getopt::Failure) -> UsageError,
    help: &dyn Fn() -> String,
) -> Result<Result<CompareArgs, String>, UsageError> {
    let parsed = getopt::parse(&spec(style), sub).map_err(|f| getopt_error(&f))?;
    let mut a = CompareArgs {
        format_a: None,
        format_b: None,
        strict: false,
        progress: false,
        quiet: false,
        cache: None,
        force_share: false,
        image_opts: false,
        objects: Vec::new(),
        filename_index: [0, 0],
    };
    for (id, value) in parsed.options {
        let value = value.unwrap_or_default();
        match id {
            x if x == c('h') => return Ok(Err(help())),
            x if x == c('f') => a.format_a = Some(value),
            x if x == c('F') => a.format_b = Some(value),
            x if x == c('s') => a.strict = true,
            x if x == c('p') => a.progress = true,
            x if x == c('q') => a.quiet = true,
            x if x == c('U') => a.force_share = true,
            x if x == c('T') => a.cache = Some(value),
            OPT_OBJECT => a.objects.push(value),
            OPT_IMAGE_OPTS => a.image_opts = true,
            _ => {}
        }
    }
    // Progress is not shown in quiet mode.
    if a.quiet {
        a.progress = false;
    }
    if parsed.operands.len() != 2 {
        return Err(error_exit("Expecting two image file names"));
    }
    a.filename_index = [base + parsed.operands[0], base + parsed.operands[1]];
    Ok(Ok(a))
}

/// `compare --help`: instar's own words (see `info_help`).
pub fn help() -> String {
    "Usage: qemu-img compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U|--force-share]
                        FILENAME1 FILENAME2

Check whether two images have the same guest contents, whatever their
formats, exactly as the installed qemu-img would, and exit with its code:
0 identical, 1 different, 2 an image cannot be opened, 3 allocation
status failed, 4 a read failed. instar parses both images inside a
sandbox.

  -h, --help            this help
  -f, --a-format FMT    treat FILENAME1 as FMT instead of probing
  -F, --b-format FMT    treat FILENAME2 as FMT instead of probing
  -s, --strict          also fail on different sizes or allocation
  -p, --progress        show progress
  -q, --quiet           no output on stdout
  -U, --force-share     accepted (instar opens images read-only, unlocked)
  -T, --cache MODE      accepted, no effect
  --image-opts, --object, json: file names are not supported.

"
    .to_string()
}

/// Settings of one `compare` call.
pub struct CompareCall<'a> {
    /// Parsed arguments.
    pub args: &'a CompareArgs,
    /// The two file names exactly as given.
    pub filenames: [OsString; 2],
    /// Settings.
    pub config: &'a Config,
    /// Guest deadline.
    pub timeout: Duration,
    /// Output profile.
    pub profile: &'a OutputProfile,
}

/// Print and exit with `code` (compare's codes other than 0 and 1 are
/// not what the shared error type carries).
fn finish(stdout: &str, stderr: &str, code: u8) -> ! {
    {
        let so = std::io::stdout();
        let mut out = so.lock();
        let _ = out.write_all(stdout.as_bytes()).and_then(|()| out.flush());
    }
    let _ = std::io::stderr().write_all(stderr.as_bytes());
    std::process::exit(code.into())
}

/// Run `compare`; returns stdout for exit 0, exits itself otherwise.
pub fn run(call: &CompareCall) -> Result<Vec<u8>, CliError> {
    let args = call.args;
    // qemu_progress_end prints a newline whatever happens after the
    // operands were accepted.
    let tail = if args.progress { "\n" } else { "" };
    let fail = |e: CliError| -> ! { finish(tail, &e.text(), 2) };
    if args.image_opts {
        fail(CliError::Instar(
            "--image-opts is not supported (instar opens plain image files only)".into(),
        ));
    }
    if !args.objects.is_empty() {
        fail(CliError::Instar(
            "--object is not supported (instar reads no secrets)".into(),
        ));
    }
    if let Some(mode) = &args.cache {
        if !crate::cli::CACHE_MODES.contains(&mode.as_str()) {
            finish(
                tail,
                &format!("qemu-img: Invalid source cache option: {mode}\n"),
                2,
            );
        }
    }
    let mut inputs = Vec::new();
    let mut names = Vec::new();
    let mut sandbox: Option<instar_vmm::SandboxConfig> = None;
    for filename in &call.filenames {
        let (name, path, sb) =
            command_line_image(filename, call.config, call.timeout).unwrap_or_else(|e| fail(e));
        let file = open_plain(&name, &path, call.profile).unwrap_or_else(|e| fail(e));
        inputs.push(OpenedFile {
            display_name: name.clone(),
            file,
        });
        names.push(name);
        // Files named inside either image may come from either image's
        // directory or allow_paths.
        sandbox = Some(match sandbox {
            None => sb,
            Some(mut first) => {
                for d in sb.allow_dirs {
                    if !first.allow_dirs.contains(&d) {
                        first.allow_dirs.push(d);
                    }
                }
                first
            }
        });
    }
    let sandbox = sandbox.expect("two file names");
    let request = Request::Compare {
        format_a: args.format_a.clone(),
        format_b: args.format_b.clone(),
        filename_a: names[0].clone(),
        filename_b: names[1].clone(),
        strict: args.strict,
        progress: args.progress,
        // Each image itself is one level of its chain.
        max_chain_depth: u32::try_from(call.config.max_chain_depth.saturating_sub(1))
            .unwrap_or(u32::MAX),
    };
    let files = RunFiles {
        inputs,
        outputs: Vec::new(),
        output_names: Vec::new(),
        output_limit: 0,
    };
    let outcome = instar_vmm::run_files(&sandbox, files, &request, &mut |_, _| {})
        .unwrap_or_else(|e| fail(vmm_error(e)));
    let result: CompareResult = match outcome.response {
        Response::Compare(r) => r,
        Response::Error(e) => fail(CliError::Instar(e.message)),
        _ => fail(CliError::Instar(
            "internal error: the guest answered compare with another result".into(),
        )),
    };
    let (stdout, stderr) = render(&result, args.quiet);
    if result.exit_code == 0 && stderr.is_empty() {
        return Ok(stdout.into_bytes());
    }
    finish(&stdout, &stderr, result.exit_code)
}

/// stdout and stderr text of a result (`-q` keeps stdout empty).
pub fn render(r: &CompareResult, quiet: bool) -> (String, String) {
    let mut stdout = String::new();
    if !quiet {
        for line in &r.stdout {
            stdout.push_str(line);
            stdout.push('\n');
        }
    }
    (stdout, r.stderr.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse as cli_parse, Action};

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn err(style: UsageStyle, s: &[&str]) -> String {
        cli_parse(&args(s), style).unwrap_err().0
    }

    // Expected texts: qemu-img 10.0.2 (Debian, reworked options) run here.
    #[test]
    fn reworked_usage_errors() {
        let r = UsageStyle::Reworked;
        assert_eq!(
            err(r, &["qemu-img", "compare"]),
            "qemu-img: Expecting two image file names\nTry 'qemu-img compare --help' for more info\n"
        );
        assert_eq!(
            err(r, &["qemu-img", "compare", "-x", "a", "b"]),
            "qemu-img compare: invalid option -- 'x'\nTry 'qemu-img compare --help' for more info\n"
        );
        // --f is --force-share, so three operands remain.
        assert_eq!(
            err(r, &["qemu-img", "compare", "--f", "raw", "a", "b"]),
            "qemu-img: Expecting two image file names\nTry 'qemu-img compare --help' for more info\n"
        );
        let Ok(Action::Compare(a)) = cli_parse(
            &args(&[
                "qemu-img", "compare", "-q", "-p", "--strict", "-F", "raw", "a", "b",
            ]),
            r,
        ) else {
            panic!()
        };
        assert!(a.strict && a.quiet && !a.progress);
        assert_eq!(a.format_b.as_deref(), Some("raw"));
        assert_eq!(a.filename_index, [7, 8]);
    }

    #[test]
    fn classic_usage_errors() {
        let c = UsageStyle::Classic;
        assert_eq!(
            err(c, &["qemu-img", "compare", "--strict", "a", "b"]),
            "qemu-img: unrecognized option '--strict'\nTry 'qemu-img --help' for more information\n"
        );
        assert_eq!(
            err(c, &["qemu-img", "compare", "a"]),
            "qemu-img: Expecting two image file names\nTry 'qemu-img --help' for more information\n"
        );
    }

    #[test]
    fn quiet_keeps_stderr() {
        let r = CompareResult {
            stdout: vec!["Content mismatch at offset 0!".into()],
            stderr: vec!["qemu-img: x\n".into()],
            exit_code: 1,
        };
        assert_eq!(render(&r, true), (String::new(), "qemu-img: x\n".into()));
        assert_eq!(render(&r, false).0, "Content mismatch at offset 0!\n");
    }
}
