//! instar: the qemu-img command line over a sandboxed engine.
//!
//! This crate is the only place that knows qemu-img's grammar, its output
//! layouts per version ([`profile::OutputProfile`]), and its exit codes. It
//! never reads image bytes: the guest does, inside the VM that `instar-vmm`
//! runs, and returns typed results that this crate renders.
#![deny(missing_docs)]

mod check;
mod cli;
mod compare;
mod config;
mod convert;
mod error;
mod getopt;
mod info;
mod map;
mod measure;
mod paths;
mod profile;
mod qobject;
mod render;
mod sizefmt;

use error::CliError;
use profile::{OutputProfile, QemuVersion};
use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// What to print on stdout when the command succeeds.
type Output = Vec<u8>;

fn resolve_profile(
    own: &cli::OwnOptions,
    config: &config::Config,
) -> Result<OutputProfile, CliError> {
    let given = own
        .qemu_version
        .as_deref()
        .or(config.qemu_version.as_deref());
    if let Some(v) = given {
        // `+rework` / `+classic` say how a distro build words usage errors
        // (probed from the real binary otherwise).
        let (num, usage) = match v.split_once('+') {
            Some((n, "rework")) => (n, Some(true)),
            Some((n, "classic")) => (n, Some(false)),
            Some(_) => ("", None),
            None => (v, None),
        };
        let version = QemuVersion::parse_short(num).ok_or_else(|| {
            CliError::Instar(format!(
                "invalid qemu version '{v}': expected X.Y or X.Y.Z, optionally +rework or +classic"
            ))
        })?;
        return Ok(OutputProfile::for_version(version, usage));
    }
    let probe =
        profile::find_qemu_img(config.qemu_img.as_deref()).and_then(|p| profile::probe_cached(&p));
    // A qemu-img named in the config must work: silently imitating the
    // newest version instead would hide a typo until outputs differ.
    if let (None, Some(named)) = (&probe, &config.qemu_img) {
        if !profile::probing_self() {
            return Err(CliError::Instar(format!(
                "cannot get the version of qemu_img '{}' (config): set qemu_version instead",
                named.display()
            )));
        }
    }
    Ok(match probe {
        Some(p) => OutputProfile::for_version(p.version, Some(p.reworked_usage)),
        None => OutputProfile::for_version(profile::NEWEST, None),
    })
}

fn real_main(args_os: Vec<OsString>) -> Result<Output, CliError> {
    let args: Vec<String> = args_os
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (own, keep) = cli::take_own_options(&args).map_err(CliError::Instar)?;
    let config =
        config::Config::load(own.config.as_deref().map(Path::new)).map_err(CliError::Instar)?;
    let profile = resolve_profile(&own, &config)?;
    let timeout_secs = match &own.timeout {
        Some(t) => t
            .parse::<f64>()
            .map_err(|_| format!("invalid --timeout '{t}': expected seconds"))
            .and_then(config::check_timeout)
            .map_err(CliError::Instar)?,
        None => config.timeout_secs,
    };
    let qargs: Vec<String> = keep.iter().map(|&i| args[i].clone()).collect();
    let grammar = cli::Grammar {
        style: profile.usage,
        info_cache_limits: profile.info_cache_limits,
        version: profile.version,
    };
    let action = cli::parse(&qargs, grammar).map_err(|e| CliError::Usage(e.0))?;
    match action {
        cli::Action::Print(text) => Ok(text.into_bytes()),
        cli::Action::Version => Ok(profile.version_text().into_bytes()),
        cli::Action::NotImplemented(cmd) => Err(CliError::NotImplemented(cmd)),
        cli::Action::Info(a) => {
            let filename = args_os[keep[a.filename_index]].clone();
            let call = info::InfoCall {
                args: &a,
                filename,
                config: &config,
                timeout: Duration::from_secs_f64(timeout_secs),
                profile: &profile,
            };
            info::run(&call)
        }
        cli::Action::Measure(a) => {
            let filename = a.operands.first().map(|&i| args_os[keep[i]].clone());
            let call = measure::MeasureCall {
                args: &a,
                filename,
                config: &config,
                timeout: Duration::from_secs_f64(timeout_secs),
                profile: &profile,
            };
            measure::run(&call)
        }
        cli::Action::Check(a) => {
            let filename = args_os[keep[a.filename_index]].clone();
            let call = check::CheckCall {
                args: &a,
                filename,
                config: &config,
                timeout: Duration::from_secs_f64(timeout_secs),
                profile: &profile,
            };
            check::run(&call)
        }
        cli::Action::Compare(a) => {
            let filenames = a.filename_index.map(|i| args_os[keep[i]].clone());
            let call = compare::CompareCall {
                args: &a,
                filenames,
                config: &config,
                timeout: Duration::from_secs_f64(timeout_secs),
                profile: &profile,
            };
            compare::run(&call)
        }
        cli::Action::Convert(a) => {
            let call = convert::ConvertCall {
                args: &a,
                operands: a
                    .operands
                    .iter()
                    .map(|&i| args_os[keep[i]].clone())
                    .collect(),
                config: &config,
                timeout: Duration::from_secs_f64(timeout_secs),
                // An explicit --timeout bounds the copy too.
                convert_timeout: Duration::from_secs_f64(match &own.timeout {
                    Some(_) => timeout_secs,
                    None => config.convert_timeout_secs,
                }),
                profile: &profile,
            };
            convert::run(&call)
        }
        cli::Action::Map(a) => {
            let filename = args_os[keep[a.filename_index]].clone();
            let call = map::MapCall {
                args: &a,
                filename,
                config: &config,
                timeout: Duration::from_secs_f64(timeout_secs),
                profile: &profile,
            };
            map::run(&call)
        }
    }
}

fn main() -> ExitCode {
    // Anything that slips through becomes one line and exit 1, never a
    // trace (release builds abort on panic, so exit from the hook).
    std::panic::set_hook(Box::new(|p| {
        let msg = p
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let _ = writeln!(
            std::io::stderr(),
            "instar: internal error: {}",
            msg.replace('\n', " ")
        );
        std::process::exit(1);
    }));
    let result = real_main(std::env::args_os().collect());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match result {
        Ok(bytes) => {
            match out.write_all(&bytes).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                // A closed pipe (`| head`) is not an error worth a word.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "instar: cannot write output: {}",
                        info::strerror(&e)
                    );
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            let _ = std::io::stderr().write_all(e.text().as_bytes());
            e.exit_code()
        }
    }
}
