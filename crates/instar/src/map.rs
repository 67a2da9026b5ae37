//! `map`: open the image, run the sandbox (the guest walks the whole
//! backing chain, opening backing and data files through the gate), and
//! print the entries as qemu-img's `img_map` does.

use crate::cli::{MapArgs, OutputFormat};
use crate::config::Config;
use crate::error::CliError;
use crate::info::{command_line_image, guest_error, open_plain, vmm_error};
use crate::profile::OutputProfile;
use instar_vmm::OpenedFile;
use instar_wire::{ErrorKind, MapEntry, MapResult, Request, Response};
use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

/// Most entries one run returns. The guest's response is bounded by the
/// mailbox's 64 MiB message limit and an entry encodes in at most ~42
/// bytes; a million entries is far more than any real image has (a fully
/// fragmented 64 GiB image with 64 KiB clusters). Beyond it instar stops
/// with a limit error naming --start-offset/--max-length.
pub const MAX_MAP_ENTRIES: u64 = 1_000_000;

/// Settings of one `map` call.
pub struct MapCall<'a> {
    /// Parsed arguments.
    pub args: &'a MapArgs,
    /// The file name exactly as given (may not be UTF-8).
    pub filename: OsString,
    /// Settings.
    pub config: &'a Config,
    /// Guest deadline.
    pub timeout: Duration,
    /// Output profile.
    pub profile: &'a OutputProfile,
}

/// `%#-16` PRIx64: `0x` prefix except for zero, left-aligned in 16.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Human lines of `entries` (only data runs are in them).
pub fn render_human(entries: &[MapEntry], name_of: &dyn Fn(Option<u32>) -> String) -> String {
    let mut out = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    for e in entries {
        out.push_str(&hex16(e.start));
        out.push_str(&hex16(e.length));
        out.push_str(&hex16(e.offset.unwrap_or(0)));
        out.push_str(&name_of(e.file));
        out.push('\n');
    }
    out
}

/// One JSON entry as qemu-img prints it.
pub fn json_entry(e: &MapEntry, present_key: bool, compressed_key: bool) -> String {
    let b = |v: bool| if v { "true" } else { "false" };
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}",
        e.start, e.length, e.depth
    );
    if present_key {
        s.push_str(&format!(", \"present\": {}", b(e.present)));
    }
    s.push_str(&format!(
        ", \"zero\": {}, \"data\": {}",
        b(e.zero),
        b(e.data)
    ));
    if compressed_key {
        s.push_str(&format!(", \"compressed\": {}", b(e.compressed)));
    }
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// JSON output; `complete` is false when the walk stopped at an error
/// (qemu-img then leaves the list open).
pub fn render_json(
    entries: &[MapEntry],
    present_key: bool,
    compressed_key: bool,
    complete: bool,
) -> String {
    let mut out = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        out.push_str(&json_entry(e, present_key, compressed_key));
        if i + 1 < entries.len() || !complete {
            out.push_str(",\n");
        }
    }
    if complete {
        out.push_str("]\n");
    }
    out
}

/// Run `map` and return what goes to stdout. When the walk fails part
/// way, what qemu-img would have printed is written here before the error
/// is returned.
pub fn run(call: &MapCall) -> Result<Vec<u8>, CliError> {
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
    let (name, path, sandbox) = command_line_image(&call.filename, call.config, call.timeout)?;
    let file = open_plain(&name, &path, call.profile)?;
    let root = OpenedFile {
        display_name: name.clone(),
        file,
    };
    let human = args.output == OutputFormat::Human;
    let request = Request::Map {
        format: args.format.clone(),
        filename: name.clone(),
        start: args.start,
        max_length: args.max_length,
        // The image itself is one level of the chain.
        max_chain_depth: u32::try_from(call.config.max_chain_depth.saturating_sub(1))
            .unwrap_or(u32::MAX),
        max_entries: MAX_MAP_ENTRIES,
        human,
        split_compressed: call.profile.map_compressed,
    };
    let outcome = instar_vmm::run(&sandbox, root, &request).map_err(vmm_error)?;
    let result: MapResult = match outcome.response {
        Response::Map(m) => m,
        Response::Error(e) => return Err(guest_error(&name, e)),
        _ => {
            return Err(CliError::Instar(
                "internal error: the guest answered map with another result".into(),
            ))
        }
    };
    for line in &result.warnings {
        eprintln!("qemu-img: {line}");
    }
    let names: Vec<String> = outcome
        .files
        .iter()
        .map(|f| f.display_name.clone())
        .collect();
    let name_of = |id: Option<u32>| -> String {
        id.and_then(|i| names.get(i as usize).cloned())
            .unwrap_or_default()
    };
    let complete = result.error.is_none();
    let text = if human {
        render_human(&result.entries, &name_of)
    } else {
        render_json(
            &result.entries,
            call.profile.map_present,
            call.profile.map_compressed,
            complete,
        )
    };
    let Some(error) = result.error else {
        return Ok(text.into_bytes());
    };
    // qemu-img printed this much before failing.
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    // Mid-walk errors carry the driver's own stderr lines, complete.
    for line in &error.warnings {
        eprintln!("{line}");
    }
    Err(match error.kind {
        ErrorKind::Limit | ErrorKind::Refused => CliError::Instar(error.message),
        ErrorKind::Operation | ErrorKind::Open => CliError::Qemu(error.message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
            file: offset.map(|_| 0),
        }
    }

    #[test]
    fn human_columns() {
        // qemu-img 10.0.2 map of a 1 MiB qcow2 with 64 KiB written at 0.
        let text = render_human(&[e(0, 0x10000, Some(0x50000))], &|_| "q.qcow2".into());
        assert_eq!(
            text,
            "Offset          Length          Mapped to       File\n\
             0               0x10000         0x50000         q.qcow2\n"
        );
    }

    #[test]
    fn json_lines() {
        let mut z = e(65536, 983040, None);
        z.present = false;
        z.zero = true;
        z.data = false;
        let text = render_json(&[e(0, 65536, Some(327680)), z], true, true, true);
        assert_eq!(
            text,
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 327680},\n\
             { \"start\": 65536, \"length\": 983040, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
        // Before 8.2 there is no compressed key; an error leaves it open.
        assert_eq!(
            render_json(&[e(0, 1, Some(2))], true, false, false),
            "[{ \"start\": 0, \"length\": 1, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"offset\": 2},\n"
        );
    }

    fn usage_error(args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        crate::cli::parse(&args, crate::profile::UsageStyle::Reworked)
            .unwrap_err()
            .0
    }

    fn parsed(args: &[&str]) -> MapArgs {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match crate::cli::parse(&args, crate::profile::UsageStyle::Reworked) {
            Ok(crate::cli::Action::Map(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    // Expected texts: stderr of qemu-img 10.0.2 (Debian) run here.
    #[test]
    fn usage_errors_like_qemu_img() {
        assert_eq!(
            usage_error(&["qemu-img", "map"]),
            "qemu-img: Expecting one image file name\nTry 'qemu-img map --help' for more info\n"
        );
        assert_eq!(
            usage_error(&["qemu-img", "map", "-x"]),
            "qemu-img map: invalid option -- 'x'\nTry 'qemu-img map --help' for more info\n"
        );
        assert_eq!(
            usage_error(&["qemu-img", "map", "--output=xml", "q.qcow2"]),
            "qemu-img: --output expects 'human' or 'json' not 'xml'\nTry 'qemu-img map --help' for more info\n"
        );
        assert_eq!(
            usage_error(&["qemu-img", "map", "--start-offset=abc", "q"]),
            "qemu-img: Invalid start offset specified: 'abc'.\n"
        );
        assert_eq!(
            usage_error(&["qemu-img", "map", "--max-length=-1", "q"]),
            "qemu-img: Invalid max length specified. Must be between 0 and 9223372036854775807.\n"
        );
        assert_eq!(
            usage_error(&["qemu-img", "map", "--start-offset=8E", "q"]),
            "qemu-img: Invalid start offset specified. Must be between 0 and 9223372036854775807.\n"
        );
        assert_eq!(
            usage_error(&["qemu-img", "map", "--start-offset=1.5", "q"]),
            "qemu-img: Invalid start offset specified: '1.5'.\n"
        );
        assert_eq!(
            usage_error(&["qemu-img", "map", "--start-offset"]),
            "qemu-img map: option '--start-offset' requires an argument\nTry 'qemu-img map --help' for more info\n"
        );
    }

    #[test]
    fn sizes_like_qemu_strtosz() {
        // qemu-img map --start-offset=X printed these starts.
        for (arg, want) in [
            ("1k", 0x400),
            ("1.5k", 0x600),
            ("0x10", 0x10),
            ("1b", 1),
            (" 5", 5),
            ("1K", 0x400),
            ("1.0", 1),
            ("1e", 1 << 60),
        ] {
            assert_eq!(
                parsed(&["qemu-img", "map", "-s", arg, "q"]).start,
                want,
                "{arg}"
            );
        }
        let a = parsed(&["qemu-img", "map", "-l", "0", "--out=json", "q"]);
        assert_eq!((a.max_length, a.output), (Some(0), OutputFormat::Json));
    }
}
