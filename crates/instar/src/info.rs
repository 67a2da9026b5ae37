//! `info`: open the image, run the sandbox, follow the backing chain when
//! asked (the CLI follows it, one VM per image, each file checked against
//! the allowlist), and render.

use crate::cli::{InfoArgs, OutputFormat};
use crate::config::Config;
use crate::error::CliError;
use crate::paths;
use crate::profile::OutputProfile;
use crate::render::{self, FileFacts, ImageView};
use instar_vmm::{OpenedFile, SandboxConfig, VmmError};
use instar_wire::{ErrorKind, ImageError, ImageInfo, Request, Response};
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of one `info` call.
pub struct InfoCall<'a> {
    /// Parsed arguments.
    pub args: &'a InfoArgs,
    /// The file name exactly as given (may not be UTF-8).
    pub filename: OsString,
    /// Settings.
    pub config: &'a Config,
    /// Guest deadline.
    pub timeout: Duration,
    /// Output profile.
    pub profile: &'a OutputProfile,
}

/// The strerror part of an I/O error (`No such file or directory`).
pub fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub(crate) fn could_not_open(name: &str, inner: &str) -> CliError {
    CliError::Qemu(format!("Could not open '{name}': {inner}"))
}

/// Open `path` as qemu's `file` driver would, with its messages.
pub(crate) fn open_plain(
    name: &str,
    path: &Path,
    profile: &OutputProfile,
) -> Result<std::fs::File, CliError> {
    if name.is_empty() {
        return Err(could_not_open(
            name,
            "The 'file' block driver requires a file name",
        ));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| could_not_open(name, &format!("Could not open '{name}': {}", strerror(&e))))?;
    let meta = file
        .metadata()
        .map_err(|e| could_not_open(name, &format!("Could not open '{name}': {}", strerror(&e))))?;
    if meta.is_dir() {
        return Err(could_not_open(
            name,
            &if profile.new_not_a_file_message {
                format!("'file' driver requires '{name}' to be a regular file")
            } else {
                "A regular file was expected by the 'file' driver, but something else was given"
                    .to_string()
            },
        ));
    }
    Ok(file)
}

/// Strip a `file:` prefix and refuse every other protocol.
pub(crate) fn plain_name(name: &str) -> Result<&str, CliError> {
    match paths::protocol(name) {
        None => Ok(name),
        Some("file") => Ok(&name[5..]),
        Some("json") => Err(CliError::Instar(format!(
            "json: file names are not supported (instar opens plain image files only): '{name}'"
        ))),
        Some(p) if paths::QEMU_PROTOCOLS.contains(&p) => Err(CliError::Instar(format!(
            "protocol '{p}' is not supported (instar opens plain image files only): '{name}'"
        ))),
        Some(p) => Err(could_not_open(name, &format!("Unknown protocol '{p}'"))),
    }
}

/// Linux `struct fsxattr` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `FS_IOC_FSGETXATTR` = `_IOR('X', 31, struct fsxattr)`.
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;

/// The extent size hint qemu's file driver reports (XFS sets one on files
/// qemu-img creates; filesystems without the ioctl or hint report none).
fn extent_size_hint(file: &std::fs::File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut attr = FsXattr::default();
    // SAFETY: the fd is open for the duration of the call; the kernel
    // writes at most size_of::<FsXattr>() bytes (the size encoded in the
    // request number) into `attr`, which is exactly that large.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut attr) };
    (ret == 0 && attr.extsize != 0).then_some(u64::from(attr.extsize))
}

fn facts(f: &OpenedFile) -> FileFacts {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = f.file.metadata() else {
        return FileFacts {
            display_name: f.display_name.clone(),
            length: 0,
            allocated: 0,
            protocol: "file",
            extent_size_hint: None,
        };
    };
    let device = m.file_type().is_block_device() || m.file_type().is_char_device();
    // A block device's size is where it ends, not st_size; the sandbox
    // run is over, so moving the shared file offset harms nothing.
    let length = if m.file_type().is_block_device() {
        (&f.file).seek(std::io::SeekFrom::End(0)).unwrap_or(0)
    } else {
        m.len()
    };
    FileFacts {
        display_name: f.display_name.clone(),
        length,
        allocated: m.blocks().saturating_mul(512),
        protocol: if device { "host_device" } else { "file" },
        extent_size_hint: extent_size_hint(&f.file),
    }
}

pub(crate) fn vmm_error(e: VmmError) -> CliError {
    match e {
        // The VMM's messages already name /dev/kvm and what is needed.
        VmmError::NoKvm(m) | VmmError::Failed(m) => CliError::Instar(m),
    }
}

/// A guest's error for check and map: qemu-img's stderr lines first, then
/// the message as qemu-img words it (instar's own limits as `instar:`).
pub(crate) fn guest_error(name: &str, e: ImageError) -> CliError {
    for line in &e.warnings {
        eprintln!("qemu-img: {line}");
    }
    match e.kind {
        ErrorKind::Operation => CliError::Qemu(e.message),
        ErrorKind::Limit => CliError::Instar(e.message),
        ErrorKind::Open | ErrorKind::Refused => could_not_open(name, &e.message),
    }
}

pub(crate) fn canonical_dirs(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter().filter_map(|d| d.canonicalize().ok()).collect()
}

/// The image named on the command line: the name qemu-img shows (a `file:`
/// prefix removed), the path to open (the exact bytes when no prefix was
/// removed; names from inside images are UTF-8 strings), and the sandbox it
/// is parsed in: files it names may be opened only in its own directory and
/// the configured `allow_paths`.
pub(crate) fn command_line_image(
    filename: &OsStr,
    config: &Config,
    timeout: Duration,
) -> Result<(String, PathBuf, SandboxConfig), CliError> {
    let lossy = filename.to_string_lossy().into_owned();
    let name = plain_name(&lossy)?.to_string();
    let path = if name.len() == lossy.len() {
        PathBuf::from(filename)
    } else {
        PathBuf::from(&name)
    };
    let mut allow = Vec::new();
    if let Some(dir) = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        allow.push(dir);
    }
    allow.extend(canonical_dirs(&config.allow_paths));
    let sandbox = SandboxConfig {
        memory_bytes: config.memory_mib.saturating_mul(1024 * 1024),
        timeout,
        allow_dirs: allow,
    };
    Ok((name, path, sandbox))
}

/// Run `info` and return what goes to stdout.
pub fn run(call: &InfoCall) -> Result<Vec<u8>, CliError> {
    let args = call.args;
    if args.image_opts {
        return Err(CliError::Instar(
            "--image-opts is not supported (instar opens plain image files only)".into(),
        ));
    }
    if args.limits {
        return Err(CliError::Instar(
            "--limits is not supported (block limits describe qemu's I/O path, not the image)"
                .into(),
        ));
    }
    if !args.objects.is_empty() {
        return Err(CliError::Instar(
            "--object is not supported (instar reads no secrets and needs none for info)".into(),
        ));
    }
    let (top_name, top_path, sandbox) =
        command_line_image(&call.filename, call.config, call.timeout)?;
    let allow = sandbox.allow_dirs.clone();

    let mut dicts = Vec::new();
    let mut seen_names: HashSet<String> = HashSet::new();
    let mut seen_canon: HashSet<PathBuf> = HashSet::new();
    let mut name = top_name;
    let mut path = top_path;
    let mut format = args.format.clone();
    let mut depth = 0usize;
    loop {
        if !seen_names.insert(name.clone()) {
            return Err(CliError::Qemu(format!(
                "Backing file '{name}' creates an infinite loop."
            )));
        }
        depth += 1;
        if depth > call.config.max_chain_depth {
            return Err(CliError::Instar(format!(
                "backing chain is deeper than max_chain_depth ({}) at '{name}'",
                call.config.max_chain_depth
            )));
        }
        let canon = path.canonicalize().ok();
        if depth > 1 {
            // Backing files only from the allowed directories.
            if let Some(c) = &canon {
                if !allow.iter().any(|d| c.starts_with(d)) {
                    return Err(could_not_open(
                        &name,
                        &format!(
                            "instar refuses '{}': outside the image's directory and allow_paths",
                            c.display()
                        ),
                    ));
                }
            }
        }
        if let Some(c) = canon {
            if !seen_canon.insert(c) {
                return Err(CliError::Qemu(format!(
                    "Backing file '{name}' creates an infinite loop."
                )));
            }
        }
        let file = open_plain(&name, &path, call.profile)?;
        let root = OpenedFile {
            display_name: name.clone(),
            file,
        };
        let request = Request::Info {
            format: format.clone(),
            filename: name.clone(),
        };
        let outcome = instar_vmm::run(&sandbox, root, &request).map_err(vmm_error)?;
        let no_warnings = Vec::new();
        let warnings = match &outcome.response {
            Response::Info(i) => &i.warnings,
            Response::Error(e) => &e.warnings,
            _ => &no_warnings,
        };
        // qemu-img reports these on stderr while opening, before any result.
        for line in warnings {
            eprintln!("qemu-img: {line}");
        }
        let info: ImageInfo = match outcome.response {
            Response::Info(i) => i,
            Response::Error(e) => {
                return Err(match e.kind {
                    ErrorKind::Operation => CliError::Qemu(e.message),
                    ErrorKind::Open | ErrorKind::Refused | ErrorKind::Limit => {
                        could_not_open(&name, &e.message)
                    }
                })
            }
            _ => {
                return Err(CliError::Instar(
                    "internal error: the guest answered info with another result".into(),
                ))
            }
        };
        let files: Vec<FileFacts> = outcome.files.iter().map(facts).collect();
        let backing = info.backing_filename.clone().filter(|b| !b.is_empty());
        let full = backing
            .as_deref()
            .and_then(|b| paths::full_backing_filename(&name, b));
        let view = ImageView {
            filename: &name,
            info: &info,
            files: &files,
            full_backing_filename: full.clone(),
        };
        dicts.push(render::image_dict(&view, call.profile));
        if !args.backing_chain {
            break;
        }
        let Some(backing) = backing else { break };
        let Some(full) = full else {
            return Err(CliError::Qemu(format!(
                "Could not determine absolute backing filename, but backing filename '{backing}' present"
            )));
        };
        format = info.backing_filename_format.clone();
        let plain = plain_name(&full)?.to_string();
        path = PathBuf::from(&plain);
        name = full;
    }

    Ok(match (args.output, args.backing_chain) {
        (OutputFormat::Json, true) => render::json_chain(dicts),
        (OutputFormat::Json, false) => render::json_one(dicts.pop().unwrap_or_default()),
        (OutputFormat::Human, _) => render::human_chain(&dicts, call.profile),
    })
}
