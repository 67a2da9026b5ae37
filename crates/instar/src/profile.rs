//! Which qemu-img instar imitates: the version, and the output features that
//! changed between versions (see docs/output-profiles.md for the evidence
//! behind each boundary).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A qemu version as `qemu-img --version` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro (50 = development tree after major.minor, 90+ = release
    /// candidate of the next release).
    pub micro: u32,
}

impl QemuVersion {
    /// A version.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        Self {
            major,
            minor,
            micro,
        }
    }

    /// The release whose behaviour this version has: a release candidate
    /// (X.Y.9N) behaves like the release it precedes, a development snapshot
    /// (X.Y.50) like X.Y, since features land at random points of the cycle
    /// and the previous release is the conservative choice.
    pub fn effective(self) -> QemuVersion {
        if self.micro >= 90 {
            // qemu releases X.0, X.1, X.2, then (X+1).0.
            if self.minor >= 2 {
                QemuVersion::new(self.major + 1, 0, 0)
            } else {
                QemuVersion::new(self.major, self.minor + 1, 0)
            }
        } else {
            self
        }
    }

    /// Parse `X.Y` or `X.Y.Z` (the `--qemu-version` / config syntax).
    pub fn parse_short(s: &str) -> Option<QemuVersion> {
        let mut parts = s.trim().split('.');
        let major = parse_num(parts.next()?)?;
        let minor = parse_num(parts.next()?)?;
        let micro = match parts.next() {
            Some(p) => parse_num(p)?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(QemuVersion::new(major, minor, micro))
    }

    /// Parse the first line of `qemu-img --version`:
    /// `qemu-img version X.Y.Z` with an optional ` (pkgversion)` suffix that
    /// distros fill with their package version, or a bare `X.Y.Z`.
    pub fn parse_version_output(out: &str) -> Option<QemuVersion> {
        let line = out.lines().next()?.trim_end();
        let rest = line.strip_prefix("qemu-img version ").unwrap_or(line);
        let token = rest.split(' ').next()?;
        let mut parts = token.split('.');
        let v = QemuVersion::new(
            parse_num(parts.next()?)?,
            parse_num(parts.next()?)?,
            parse_num(parts.next()?)?,
        );
        if parts.next().is_some() {
            return None;
        }
        let tail = &rest[token.len()..];
        if !(tail.is_empty() || (tail.starts_with(" (") && tail.ends_with(')'))) {
            return None;
        }
        Some(v)
    }
}

fn parse_num(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Column layout of `Snapshot list:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotLayout {
    /// Before 5.2: no ICOUNT column (`%-10s%-20s%11s%20s%15s`).
    Pre52,
    /// 5.2 to 8.x: `VM SIZE`/`VM CLOCK` titles, `HH:MM:SS.mmm` clock, no
    /// icount shown as empty.
    Classic,
    /// 9.0 on: `VM_SIZE`/`VM_CLOCK`, `HHHH:MM:SS.mmm`, missing icount `--`.
    V9,
}

/// How usage errors are worded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageStyle {
    /// qemu's own `error_exit`: `qemu-img: unrecognized option '--x'` and
    /// `Try 'qemu-img --help' for more information`.
    Classic,
    /// Debian's backport of the options rework (Debian/Ubuntu 9.2 and 10.0
    /// packages): glibc's getopt messages prefixed with `ARGV0 COMMAND:`,
    /// and `Try 'ARGV0 COMMAND --help' for more info`.
    Reworked,
    /// The rework as released upstream in 10.1: like `Reworked` but `for
    /// more information`, and `--output expects 'human' or 'json', not
    /// 'xml'` (with a comma).
    Upstream,
}

/// Everything about the output that depends on the qemu-img version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputProfile {
    /// The version imitated (as detected or given; may be X.Y.50/X.Y.9N).
    pub version: QemuVersion,
    /// `Child node '/file':` blocks and JSON `children` (8.0).
    pub child_nodes: bool,
    /// An empty format-specific dump prints nothing, not even its title
    /// (8.0).
    pub hide_empty_format_specific: bool,
    /// qcow2 reports its dirty bit as `dirty-flag` (6.1).
    pub qcow2_dirty_flag: bool,
    /// `Detected format of X.` hint ends with a newline (8.1).
    pub detected_format_newline: bool,
    /// `map --output=json` has `present` (6.1; absent in the captured 5.2.0,
    /// present in 6.2.0: tests/evidence/README.md).
    pub map_present: bool,
    /// `map --output=json` has `compressed` (8.2).
    pub map_compressed: bool,
    /// Snapshot table layout (9.0).
    pub snapshot_layout: SnapshotLayout,
    /// LUKS info has `detached-header` (9.0).
    pub luks_detached_header: bool,
    /// `info` opens a qcow2 external data file and lists it as a child.
    /// Upstream 8.0 up to 9.0.1 did; 9.0.2 and 9.1 stopped (CVE-2024-4467)
    /// and distros backported the fix (Ubuntu's 8.2.2 shows no data-file
    /// child), so no profile turns it on by default.
    pub info_opens_data_file: bool,
    /// Wording of usage errors.
    pub usage: UsageStyle,
    /// `info` accepts `-t/--cache` and `--limits` (10.2).
    pub info_cache_limits: bool,
    /// qcow2 info has `compression-type` (5.1).
    pub qcow2_compression_type: bool,
    /// qcow2 v3 info has `extended-l2` (5.2).
    pub qcow2_extended_l2: bool,
    /// Snapshots have `icount` (5.2).
    pub snapshot_icount: bool,
    /// Opening a directory says `'file' driver requires 'X' to be a
    /// regular file` (6.0); before: `A regular file was expected by the
    /// 'file' driver, but something else was given`.
    pub new_not_a_file_message: bool,
    /// Years of the `Copyright (c)` line of `--version`.
    pub copyright_years: &'static str,
}

/// The newest release instar knows; used when no qemu-img is installed.
pub const NEWEST: QemuVersion = QemuVersion::new(11, 1, 0);

impl OutputProfile {
    /// The profile of `version`. `reworked_usage` is what probing the
    /// installed binary's `--help` said (distros backport the options
    /// rework); `None` means decide by version alone.
    pub fn for_version(version: QemuVersion, reworked_usage: Option<bool>) -> OutputProfile {
        let eff = version.effective();
        let at = |major, minor| eff >= QemuVersion::new(major, minor, 0);
        let usage = if at(10, 1) && reworked_usage != Some(false) {
            UsageStyle::Upstream
        } else if reworked_usage == Some(true) {
            UsageStyle::Reworked
        } else {
            UsageStyle::Classic
        };
        let copyright_years = match (eff.major, eff.minor) {
            (..=4, _) => "2003-2019",
            (5, _) => "2003-2020",
            (6, _) => "2003-2021",
            (7, _) | (8, 0) => "2003-2022",
            (8, _) => "2003-2023",
            (9, _) => "2003-2024",
            (10, _) => "2003-2025",
            _ => "2003-2026",
        };
        OutputProfile {
            version,
            child_nodes: at(8, 0),
            hide_empty_format_specific: at(8, 0),
            qcow2_dirty_flag: at(6, 1),
            detected_format_newline: at(8, 1),
            map_present: at(6, 1),
            map_compressed: at(8, 2),
            snapshot_layout: if at(9, 0) {
                SnapshotLayout::V9
            } else if at(5, 2) {
                SnapshotLayout::Classic
            } else {
                SnapshotLayout::Pre52
            },
            luks_detached_header: at(9, 0),
            info_opens_data_file: false,
            usage,
            info_cache_limits: at(10, 2),
            qcow2_compression_type: at(5, 1),
            qcow2_extended_l2: at(5, 2),
            snapshot_icount: at(5, 2),
            new_not_a_file_message: at(6, 0),
            copyright_years,
        }
    }

    /// `instar --version`: the imitated qemu-img's version line, so scripts
    /// that parse `qemu-img --version` keep working, with instar named in
    /// the package-version slot.
    pub fn version_text(&self) -> String {
        format!(
            "qemu-img version {} (instar {})\nCopyright (c) {} Fabrice Bellard and the QEMU Project developers\n",
            self.version,
            env!("CARGO_PKG_VERSION"),
            self.copyright_years
        )
    }
}

/// What probing the installed qemu-img found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Its version.
    pub version: QemuVersion,
    /// Its `--help` lists "Recognized commands" (options rework).
    pub reworked_usage: bool,
}

/// Environment variable set on the qemu-img we run, so that an instar
/// installed under the name qemu-img does not probe itself forever.
const PROBE_GUARD: &str = "INSTAR_PROBING_QEMU_IMG";

/// True inside a probe run by another instar (instar installed as
/// qemu-img): then nothing is probed.
pub fn probing_self() -> bool {
    std::env::var_os(PROBE_GUARD).is_some()
}

/// Find the qemu-img to imitate: `configured` if given, else `qemu-img` on
/// PATH, skipping this very executable.
pub fn find_qemu_img(configured: Option<&Path>) -> Option<PathBuf> {
    if probing_self() {
        return None;
    }
    let me = std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok());
    let candidates: Vec<PathBuf> = match configured {
        Some(p) => vec![p.to_path_buf()],
        None => std::env::var_os("PATH")
            .map(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("qemu-img"))
                    .collect()
            })
            .unwrap_or_default(),
    };
    candidates.into_iter().find(|c| {
        let Ok(canon) = c.canonicalize() else {
            return false;
        };
        let is_file = std::fs::metadata(&canon)
            .map(|m| m.is_file())
            .unwrap_or(false);
        is_file && Some(&canon) != me.as_ref()
    })
}

fn cache_file() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("instar").join("qemu-img-probe"))
}

/// Identity of a binary for the cache: path, device, inode, size, mtime.
fn cache_key(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}\t{}\t{}\t{}\t{}.{}",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// Probe `qemu_img`, through the cache when its identity is unchanged.
/// Running it costs a few milliseconds on every call otherwise; an
/// unreadable or unwritable cache just means probing every time.
pub fn probe_cached(qemu_img: &Path) -> Option<Probe> {
    let key = cache_key(qemu_img)?;
    let cache = cache_file();
    if let Some(cache) = &cache {
        if let Ok(text) = std::fs::read_to_string(cache) {
            let mut lines = text.lines();
            if lines.next() == Some("instar-probe-v1") && lines.next() == Some(key.as_str()) {
                let version = lines.next().and_then(QemuVersion::parse_short);
                let reworked = lines.next().map(|l| l == "reworked");
                if let (Some(version), Some(reworked_usage)) = (version, reworked) {
                    return Some(Probe {
                        version,
                        reworked_usage,
                    });
                }
            }
        }
    }
    let probe = probe(qemu_img)?;
    if let Some(cache) = &cache {
        let text = format!(
            "instar-probe-v1\n{key}\n{}\n{}\n",
            probe.version,
            if probe.reworked_usage {
                "reworked"
            } else {
                "classic"
            }
        );
        let _ = write_atomically(cache, text.as_bytes());
    }
    Some(probe)
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or(std::io::ErrorKind::NotFound)?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".qemu-img-probe.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn run_capture(qemu_img: &Path, arg: &str) -> Option<String> {
    let out = Command::new(qemu_img)
        .arg(arg)
        .env(PROBE_GUARD, "1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()
}

/// Run `qemu-img --version` (and `--help` where the usage style is in
/// doubt).
pub fn probe(qemu_img: &Path) -> Option<Probe> {
    let version = QemuVersion::parse_version_output(&run_capture(qemu_img, "--version")?)?;
    let eff = version.effective();
    // Only 9.x and 10.0 builds can go either way (Debian's backport).
    let reworked_usage = if eff >= QemuVersion::new(10, 1, 0) {
        true
    } else if eff >= QemuVersion::new(9, 0, 0) {
        run_capture(qemu_img, "--help").is_some_and(|h| h.contains("Recognized commands"))
    } else {
        false
    };
    Some(Probe {
        version,
        reworked_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines() {
        let v = |s| QemuVersion::parse_version_output(s);
        assert_eq!(
            v("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n"),
            Some(QemuVersion::new(10, 0, 2))
        );
        assert_eq!(
            v("qemu-img version 9.2.90\n"),
            Some(QemuVersion::new(9, 2, 90))
        );
        assert_eq!(
            v("qemu-img version 8.2.50"),
            Some(QemuVersion::new(8, 2, 50))
        );
        assert_eq!(v("6.2.0\n"), Some(QemuVersion::new(6, 2, 0)));
        assert_eq!(
            v("qemu-img version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6.22)"),
            Some(QemuVersion::new(6, 2, 0))
        );
        assert_eq!(v("qemu-img version x"), None);
        assert_eq!(v("qemu-img version 1.2"), None);
        assert_eq!(v(""), None);
    }

    #[test]
    fn effective_versions() {
        assert_eq!(
            QemuVersion::new(9, 2, 90).effective(),
            QemuVersion::new(10, 0, 0)
        );
        assert_eq!(
            QemuVersion::new(10, 0, 95).effective(),
            QemuVersion::new(10, 1, 0)
        );
        assert_eq!(
            QemuVersion::new(8, 2, 50).effective(),
            QemuVersion::new(8, 2, 50)
        );
    }

    #[test]
    fn profiles() {
        let p = |a, b, c| OutputProfile::for_version(QemuVersion::new(a, b, c), None);
        assert!(!p(7, 2, 0).child_nodes);
        assert!(p(8, 0, 0).child_nodes);
        // 9.2.90 is 10.0.0-rc0.
        assert_eq!(p(9, 2, 90).snapshot_layout, SnapshotLayout::V9);
        assert_eq!(p(8, 2, 50).snapshot_layout, SnapshotLayout::Classic);
        assert!(p(8, 2, 50).map_compressed);
        assert!(!p(5, 2, 0).qcow2_dirty_flag);
        assert!(p(6, 2, 0).qcow2_dirty_flag);
        // tests/evidence/8.2.2 (Ubuntu): no /data-file child.
        assert!(!p(8, 2, 2).info_opens_data_file);
        assert_eq!(p(10, 0, 2).usage, UsageStyle::Classic);
        assert_eq!(
            OutputProfile::for_version(QemuVersion::new(10, 0, 2), Some(true)).usage,
            UsageStyle::Reworked
        );
        assert_eq!(p(10, 1, 0).usage, UsageStyle::Upstream);
        assert_eq!(p(4, 2, 1).snapshot_layout, SnapshotLayout::Pre52);
        assert!(!p(4, 2, 1).qcow2_extended_l2 && p(5, 2, 0).qcow2_extended_l2);
        assert!(p(10, 2, 1).info_cache_limits && !p(10, 1, 0).info_cache_limits);
        assert_eq!(p(4, 2, 1).copyright_years, "2003-2019");
        assert_eq!(p(10, 0, 2).copyright_years, "2003-2025");
        assert_eq!(p(6, 2, 0).copyright_years, "2003-2021");
    }

    #[test]
    fn short_versions() {
        assert_eq!(
            QemuVersion::parse_short("9.2"),
            Some(QemuVersion::new(9, 2, 0))
        );
        assert_eq!(
            QemuVersion::parse_short("10.0.2"),
            Some(QemuVersion::new(10, 0, 2))
        );
        assert_eq!(QemuVersion::parse_short("10"), None);
        assert_eq!(QemuVersion::parse_short("a.b"), None);
    }
}
