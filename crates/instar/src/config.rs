//! instar's own settings: a TOML file at `$INSTAR_CONFIG` or
//! /etc/instar/config.toml (absent = defaults). See docs/configuration.md.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default config location.
pub const DEFAULT_PATH: &str = "/etc/instar/config.toml";

/// Default guest wall-clock limit (instar-vmm's default). qemu-img info on
/// a sane image takes milliseconds; a hostile image that makes the guest
/// spin is cut off here.
pub const DEFAULT_TIMEOUT_SECS: f64 = 60.0;

/// Default deadline of `convert`'s copy. A convert moves every byte of
/// the image through the sandbox (a few hundred MB/s), so the 60 s of
/// `timeout` would cut off legitimate converts of a few tens of GiB; one
/// hour covers about 1 TB at 300 MB/s. Opening the sources still runs
/// under `timeout`.
pub const DEFAULT_CONVERT_TIMEOUT_SECS: f64 = 3600.0;

/// Default guest RAM (instar-vmm's default; touched lazily, so only what
/// the guest uses costs host memory).
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// Lower bound for `memory_mib`: the guest image, mailbox and stack need
/// this much (instar-vmm refuses less).
pub const MIN_MEMORY_MIB: u64 = 36;

/// Default backing chain depth limit: deeper chains are rare in practice
/// and each level costs one VM run.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 16;

/// Upper bound for `max_chain_depth`, so a typo cannot make a loop of
/// distinct names run for minutes.
pub const MAX_CHAIN_DEPTH_LIMIT: usize = 1024;

/// Upper bound for `memory_mib` (instar-vmm's limit: the guest maps its
/// RAM below 4 GiB).
pub const MAX_MEMORY_MIB: u64 = 4 * 1024;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    qemu_version: Option<String>,
    qemu_img: Option<PathBuf>,
    timeout: Option<f64>,
    convert_timeout: Option<f64>,
    memory_mib: Option<u64>,
    allow_paths: Option<Vec<PathBuf>>,
    max_chain_depth: Option<usize>,
}

/// Effective settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Imitate this qemu-img version instead of the installed one.
    pub qemu_version: Option<String>,
    /// The qemu-img binary to imitate (default: `qemu-img` on PATH).
    pub qemu_img: Option<PathBuf>,
    /// Guest deadline, seconds.
    pub timeout_secs: f64,
    /// Deadline of a `convert` copy, seconds.
    pub convert_timeout_secs: f64,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Extra directories where files named by an image may be opened.
    pub allow_paths: Vec<PathBuf>,
    /// Longest backing chain followed by `--backing-chain`.
    pub max_chain_depth: usize,
    /// Where the settings came from (for messages).
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            qemu_version: None,
            qemu_img: None,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            convert_timeout_secs: DEFAULT_CONVERT_TIMEOUT_SECS,
            memory_mib: DEFAULT_MEMORY_MIB,
            allow_paths: Vec::new(),
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            source: None,
        }
    }
}

/// Check a timeout value (command line or file).
pub fn check_timeout(secs: f64) -> Result<f64, String> {
    if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 {
        Ok(secs)
    } else {
        Err(format!(
            "timeout must be between 0 and 86400 seconds, not {secs}"
        ))
    }
}

impl Config {
    /// Load from `explicit` (`--config`), else `$INSTAR_CONFIG`, else the
    /// default path. Only the default path may be absent.
    pub fn load(explicit: Option<&Path>) -> Result<Config, String> {
        let (path, must_exist) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => match std::env::var_os("INSTAR_CONFIG") {
                Some(p) if !p.is_empty() => (PathBuf::from(p), true),
                _ => (PathBuf::from(DEFAULT_PATH), false),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default())
            }
            Err(e) => {
                return Err(format!(
                    "cannot read config file '{}': {}",
                    path.display(),
                    crate::info::strerror(&e)
                ))
            }
        };
        Self::parse(&text, &path)
    }

    /// Parse the TOML text of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, String> {
        let bad = |msg: String| format!("config file '{}': {msg}", path.display());
        let raw: RawConfig = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        let mut c = Config {
            source: Some(path.to_path_buf()),
            ..Config::default()
        };
        c.qemu_version = raw.qemu_version;
        c.qemu_img = raw.qemu_img;
        if let Some(t) = raw.timeout {
            c.timeout_secs = check_timeout(t).map_err(bad)?;
        }
        if let Some(t) = raw.convert_timeout {
            c.convert_timeout_secs = check_timeout(t).map_err(bad)?;
        }
        if let Some(m) = raw.memory_mib {
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) {
                return Err(bad(format!(
                    "memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, not {m}"
                )));
            }
            c.memory_mib = m;
        }
        if let Some(d) = raw.max_chain_depth {
            if d == 0 || d > MAX_CHAIN_DEPTH_LIMIT {
                return Err(bad(format!(
                    "max_chain_depth must be between 1 and {MAX_CHAIN_DEPTH_LIMIT}, not {d}"
                )));
            }
            c.max_chain_depth = d;
        }
        if let Some(paths) = raw.allow_paths {
            for p in &paths {
                if !p.is_absolute() {
                    return Err(bad(format!(
                        "allow_paths entry '{}' is not absolute",
                        p.display()
                    )));
                }
            }
            c.allow_paths = paths;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys() {
        let c = Config::parse(
            "qemu_version = \"9.2\"\ntimeout = 5\nmemory_mib = 128\nallow_paths = [\"/srv/images\"]\nmax_chain_depth = 4\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.qemu_version.as_deref(), Some("9.2"));
        assert_eq!(c.timeout_secs, 5.0);
        assert_eq!(c.memory_mib, 128);
        assert_eq!(c.allow_paths, vec![PathBuf::from("/srv/images")]);
        assert_eq!(c.max_chain_depth, 4);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::parse("bogus = 1", Path::new("t")).is_err());
        assert!(Config::parse("allow_paths = [\"rel\"]", Path::new("t")).is_err());
        assert!(Config::parse("max_chain_depth = 0", Path::new("t")).is_err());
        assert!(Config::parse("timeout = -1", Path::new("t")).is_err());
        assert_eq!(
            Config::parse("", Path::new("t")).unwrap().max_chain_depth,
            16
        );
    }
}
