//! Builds the guest (crates/instar-guest, its own workspace) for
//! x86_64-unknown-none with a nested cargo and leaves the ELF in OUT_DIR for
//! `include_bytes!`.
//!
//! `INSTAR_GUEST_ELF=/path/to/instar-guest` embeds a prebuilt guest instead
//! (packaging, or to skip the nested build while iterating on host code).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let crates = manifest_dir
        .parent()
        .expect("crates/instar-vmm has a parent")
        .to_path_buf();
    let guest_dir = crates.join("instar-guest");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out_dir.join("instar-guest.elf");

    println!("cargo:rerun-if-env-changed=INSTAR_GUEST_ELF");
    if let Some(prebuilt) = std::env::var_os("INSTAR_GUEST_ELF") {
        println!("cargo:rerun-if-changed={}", Path::new(&prebuilt).display());
        std::fs::copy(&prebuilt, &dest).expect("INSTAR_GUEST_ELF names a readable file");
        return;
    }

    for dir in [
        guest_dir.join("src"),
        guest_dir.join("Cargo.toml"),
        guest_dir.join("Cargo.lock"),
        guest_dir.join("build.rs"),
        guest_dir.join("link.ld"),
        guest_dir.join(".cargo/config.toml"),
        crates.join("instar-wire/src"),
        crates.join("instar-wire/Cargo.toml"),
        crates.join("instar-formats/src"),
        crates.join("instar-formats/Cargo.toml"),
        crates.join("instar-engine/src"),
        crates.join("instar-engine/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }

    // Share one guest build between the host's profiles and targets:
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out.
    let triple = std::env::var("TARGET").unwrap_or_default();
    let mut target_root = out_dir
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out_dir.join("guest"));
    if target_root
        .file_name()
        .is_some_and(|n| n == triple.as_str())
    {
        if let Some(parent) = target_root.parent() {
            target_root = parent.to_path_buf();
        }
    }
    let guest_target = target_root.join("instar-guest");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir) // so crates/instar-guest/.cargo/config.toml applies
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg("x86_64-unknown-none")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&guest_target);
    // The host build's settings must not leak into the guest build: flags,
    // target dir, wrappers (clippy's RUSTC_WORKSPACE_WRAPPER) and the
    // variables cargo sets for this build script. Registry, network and
    // jobserver settings are kept.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let keep = matches!(key, "CARGO_HOME" | "CARGO_MAKEFLAGS")
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_HTTP_")
            || key.starts_with("CARGO_REGISTRIES_")
            || key.starts_with("CARGO_REGISTRY_");
        if (key.starts_with("CARGO_") && !keep)
            || matches!(
                key,
                "RUSTFLAGS" | "RUSTDOCFLAGS" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTC_WRAPPER"
            )
        {
            cmd.env_remove(key);
        }
    }
    // The same flags as crates/instar-guest/.cargo/config.toml (an
    // environment value replaces, not extends, the config's), plus source
    // paths relative to the repository in guest panic messages.
    let repo = crates.parent().unwrap_or(&crates);
    let flags = [
        "-Crelocation-model=static".to_string(),
        format!("--remap-path-prefix={}/=", repo.display()),
    ];
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}"));
    let status = cmd.status().expect("cannot run cargo to build the guest");
    if !status.success() {
        panic!("building the guest (crates/instar-guest) failed: {status}");
    }
    let elf = guest_target.join("x86_64-unknown-none/release/instar-guest");
    std::fs::copy(&elf, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", elf.display()));
}
