//! instar against real qemu-img outputs captured in tests/evidence/ (one
//! directory per qemu-img build, cases in cases.json). Runs the `info` and
//! usage-error cases through the real binary and sandbox, with the profile
//! of each captured build, and compares stdout, exit code and the first
//! stderr line. Skips (with a note) where the corpus or KVM is missing.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Cases instar answers differently on purpose.
const BY_DESIGN: &[(&str, &str)] = &[
    ("info-help", "help texts are instar's own"),
    ("luks-info-key", "--image-opts is refused"),
    ("info-limits", "--limits is refused"),
    ("info-limits-json", "--limits is refused"),
];

/// Cases that depend on how one build was configured, not on its version
/// (tests/evidence/README.md, "Build configuration, not version").
fn build_specific(version: &str, name: &str) -> bool {
    // Debian's 5.2.0 has no parallels driver and counts a qcow2 data file
    // in disk size.
    version == "5.2.0" && (name.contains("parallels") || name.contains("datafile"))
}

fn wanted(name: &str, argv: &[String]) -> bool {
    argv.first().map(String::as_str) == Some("info")
        || name.starts_with("err-info")
        || name.starts_with("argv0-err-info")
        || name == "err-no-command"
        || name == "err-unknown-command"
        || name == "argv0-err-unknown-command"
}

#[test]
fn evidence_info_cases() {
    let ev = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/evidence");
    let Ok(text) = std::fs::read_to_string(ev.join("cases.json")) else {
        eprintln!("skipped: no tests/evidence/cases.json");
        return;
    };
    let cases: serde_json::Value = serde_json::from_str(&text).expect("cases.json");
    let cwd = PathBuf::from(cases["cwd"].as_str().unwrap_or_default());
    if !cwd.is_dir() {
        eprintln!(
            "skipped: corpus {} not present (made by the evidence tool)",
            cwd.display()
        );
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm not usable");
        return;
    }
    // One `<version>.json` per qemu-img build: {version, root, cases:
    // {name: {rc, stdout, stderr}}}.
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&ev)
        .expect("evidence dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(".json") && name.starts_with(|c: char| c.is_ascii_digit())
        })
        .collect();
    versions.sort();
    let (mut total, mut same) = (0usize, 0usize);
    let mut failures = Vec::new();
    for vfile in &versions {
        let version = vfile
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let build: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(vfile).expect("read")).expect("json");
        let results = &build["cases"];
        // How this build words usage errors, read from its own evidence.
        let bogus = results["err-info-bogus"]["stderr"]
            .as_str()
            .unwrap_or_default();
        let style = if bogus.starts_with("qemu-img info:") {
            "rework"
        } else {
            "classic"
        };
        let profile = format!("{version}+{style}");
        for (name, case) in cases["cases"].as_object().expect("cases") {
            let argv: Vec<String> = case["argv"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if !wanted(name, &argv)
                || BY_DESIGN.iter().any(|(n, _)| n == name)
                || build_specific(&version, name)
            {
                continue;
            }
            let r = &results[name.as_str()];
            let Some(want_rc) = r["rc"].as_i64() else {
                continue;
            };
            let want_out = r["stdout"].as_str().unwrap_or_default().as_bytes();
            let want_err = r["stderr"].as_str().unwrap_or_default();
            let argv0 = case["argv0"].as_str().unwrap_or("qemu-img");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_instar"));
            cmd.arg0(argv0)
                .arg("--qemu-version")
                .arg(&profile)
                .args(&argv)
                .current_dir(&cwd);
            for (k, v) in cases["env"].as_object().into_iter().flatten() {
                cmd.env(k, v.as_str().unwrap_or_default());
            }
            let out = cmd.output().expect("run instar");
            let got_err = String::from_utf8_lossy(&out.stderr);
            total += 1;
            let ok = out.stdout == want_out
                && i64::from(out.status.code().unwrap_or(-1)) == want_rc
                && got_err.lines().next() == want_err.lines().next();
            if ok {
                same += 1;
            } else {
                failures.push(format!(
                    "{version} {name}: rc {:?} (want {want_rc}); stderr {:?} (want {:?}); stdout {}",
                    out.status.code(),
                    got_err.lines().next(),
                    want_err.lines().next(),
                    if out.stdout == want_out { "same" } else { "differs" }
                ));
            }
        }
    }
    eprintln!("{same}/{total} evidence cases identical");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
