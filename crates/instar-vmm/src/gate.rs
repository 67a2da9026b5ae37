//! The gate: the only way a name stored in an image becomes an open file.
//!
//! A name is combined with the referring file's display name the way qemu's
//! `path_combine` does (absolute names as they are, others relative to the
//! directory part of the referrer's name), canonicalized (symlinks and `..`
//! resolved), and must then lie inside one of the allowed directories. Only
//! regular files are opened, read-only. Landlock repeats the directory check
//! in the kernel (see `sandbox`).

use crate::{os_error, OpenedFile};
use instar_wire::{ErrorKind, ImageError};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Opens files named by images, inside an allowlist.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    allow: Vec<PathBuf>,
}

/// True when `path` starts with a protocol prefix (`proto:...` before any
/// `/`), as qemu's `path_has_protocol` decides it.
fn has_protocol(path: &str) -> bool {
    path.find([':', '/'])
        .is_some_and(|i| path.as_bytes()[i] == b':')
}

/// qemu's `path_combine`: `filename` as is when absolute, otherwise
/// appended to the directory part of `base` (text up to and including its
/// last `/`, or after a protocol prefix). Pure text: nothing is resolved.
pub fn combine(base: &str, filename: &str) -> String {
    if filename.starts_with('/') {
        return filename.to_string();
    }
    let mut keep = 0;
    if has_protocol(base) {
        if let Some(colon) = base.find(':') {
            keep = colon + 1;
        }
    }
    if let Some(slash) = base.rfind('/') {
        keep = keep.max(slash + 1);
    }
    let mut out = String::with_capacity(keep + filename.len());
    out.push_str(&base[..keep]);
    out.push_str(filename);
    out
}

impl Gate {
    /// A gate for `dirs`; each is canonicalized, those that do not exist are
    /// dropped (nothing can be inside them).
    pub fn new(dirs: &[PathBuf]) -> Self {
        let allow = dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        Self { allow }
    }

    /// The canonical allowed directories.
    pub fn allowed(&self) -> &[PathBuf] {
        &self.allow
    }

    /// True when canonical `path` lies inside an allowed directory.
    pub fn permits(&self, path: &Path) -> bool {
        self.allow.iter().any(|dir| path.starts_with(dir))
    }

    /// Open `stored` (a name found in the file shown as `base`).
    pub fn open(&self, base: &str, stored: &str) -> Result<OpenedFile, ImageError> {
        let display = combine(base, stored);
        let could_not = |e: std::io::Error| {
            ImageError::open(format!("Could not open '{display}': {}", os_error(e)))
        };
        let canonical = std::fs::canonicalize(&display).map_err(could_not)?;
        if !self.permits(&canonical) {
            return Err(ImageError {
                kind: ErrorKind::Refused,
                warnings: Vec::new(),
                message: format!(
                    "instar refuses '{}': outside the image's directory and allow_paths",
                    canonical.display()
                ),
            });
        }
        // O_NOFOLLOW: the canonical path has no symlinks, so one appearing
        // now is a swap under us. O_NONBLOCK: a FIFO must not block the
        // open; it is refused just below anyway.
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&canonical)
            .map_err(could_not)?;
        let meta = file.metadata().map_err(could_not)?;
        if !meta.is_file() {
            return Err(ImageError {
                kind: ErrorKind::Refused,
                warnings: Vec::new(),
                message: format!(
                    "instar refuses '{}': not a regular file",
                    canonical.display()
                ),
            });
        }
        Ok(OpenedFile {
            display_name: display,
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn combine_like_qemu() {
        assert_eq!(combine("a.qcow2", "b.qcow2"), "b.qcow2");
        assert_eq!(combine("dir/a.qcow2", "b.qcow2"), "dir/b.qcow2");
        assert_eq!(combine("/x/y/a.qcow2", "../b"), "/x/y/../b");
        assert_eq!(combine("/x/y/a.qcow2", "/abs/b"), "/abs/b");
        assert_eq!(combine("dir/", "b"), "dir/b");
        assert_eq!(combine("file:a.qcow2", "b"), "file:b");
        assert_eq!(combine("file:d/a.qcow2", "b"), "file:d/b");
        // A colon after a slash is not a protocol.
        assert_eq!(combine("d/x:a", "b"), "d/b");
        assert_eq!(combine("", "b"), "b");
    }

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmpdir(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("instar-gate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(std::fs::canonicalize(&p).unwrap())
    }

    fn setup(tag: &str) -> (Tmp, Gate, String) {
        let t = tmpdir(tag);
        let root = &t.0;
        std::fs::create_dir_all(root.join("allowed/sub")).unwrap();
        std::fs::create_dir_all(root.join("secret")).unwrap();
        std::fs::write(root.join("allowed/base.img"), b"base").unwrap();
        std::fs::write(root.join("allowed/sub/deep.img"), b"deep").unwrap();
        std::fs::write(root.join("secret/key"), b"key").unwrap();
        let gate = Gate::new(&[root.join("allowed")]);
        let top = root.join("allowed/top.img").to_string_lossy().into_owned();
        (t, gate, top)
    }

    #[test]
    fn opens_inside() {
        let (_t, gate, top) = setup("inside");
        let f = gate.open(&top, "base.img").unwrap();
        assert!(f.display_name.ends_with("allowed/base.img"));
        assert_eq!(f.file.metadata().unwrap().len(), 4);
        assert!(gate.open(&top, "sub/deep.img").is_ok());
        assert!(gate.open(&top, "sub/../base.img").is_ok());
    }

    #[test]
    fn refuses_dotdot_escape() {
        let (_t, gate, top) = setup("dotdot");
        let e = gate.open(&top, "../secret/key").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(e.message.contains("allow_paths"), "{}", e.message);
        assert!(e.message.contains("/secret/key'"), "{}", e.message);
        assert!(!e.message.contains(".."), "{}", e.message);
        assert!(!e.message.contains('\n'));
        let e = gate.open(&top, "/etc/passwd").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
    }

    #[test]
    fn refuses_symlink_out() {
        let (t, gate, top) = setup("symlink");
        symlink(t.0.join("secret/key"), t.0.join("allowed/link.img")).unwrap();
        let e = gate.open(&top, "link.img").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused, "{}", e.message);
        // A directory symlink pointing out is refused the same way.
        symlink(t.0.join("secret"), t.0.join("allowed/dirlink")).unwrap();
        assert_eq!(
            gate.open(&top, "dirlink/key").unwrap_err().kind,
            ErrorKind::Refused
        );
        // A symlink staying inside is fine.
        symlink("base.img", t.0.join("allowed/inner.img")).unwrap();
        assert!(gate.open(&top, "inner.img").is_ok());
    }

    #[test]
    fn symlink_loop_is_an_open_error() {
        let (t, gate, top) = setup("loop");
        symlink("b", t.0.join("allowed/a")).unwrap();
        symlink("a", t.0.join("allowed/b")).unwrap();
        let e = gate.open(&top, "a").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Open);
        assert!(
            e.message.contains("Too many levels of symbolic links"),
            "{}",
            e.message
        );
    }

    #[test]
    fn missing_and_non_regular() {
        let (_t, gate, top) = setup("missing");
        let e = gate.open(&top, "nope.img").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Open);
        assert!(
            e.message.ends_with("nope.img': No such file or directory"),
            "{}",
            e.message
        );
        let e = gate.open(&top, "sub").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(e.message.contains("not a regular file"));
    }

    #[test]
    fn empty_allowlist_refuses_everything() {
        let (_t, _gate, top) = setup("empty");
        let gate = Gate::new(&[]);
        assert_eq!(
            gate.open(&top, "base.img").unwrap_err().kind,
            ErrorKind::Refused
        );
    }
}
