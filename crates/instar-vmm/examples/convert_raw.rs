//! `cargo run --release -p instar-vmm --example convert_raw -- SRC DST
//! [SPARSE_BYTES]`: convert SRC (probed) to a raw DST through the sandbox,
//! without the CLI. For measuring the engine and sandbox alone.

use instar_vmm::{run_files, OpenedFile, RunFiles, SandboxConfig};
use instar_wire::convert::{Preallocation, TargetOptions};
use instar_wire::{ConvertSource, ConvertTarget, Request, Response};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: convert_raw SRC DST [SPARSE_BYTES]");
        std::process::exit(2);
    }
    let (src, dst) = (&args[1], &args[2]);
    let sparse_size = args.get(3).map_or(4096, |s| s.parse().expect("a number"));
    let input = OpenedFile {
        display_name: src.clone(),
        file: std::fs::File::open(src).expect("open source"),
    };
    let output = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dst)
        .expect("create destination");
    let dir = std::path::Path::new(src)
        .parent()
        .map(|p| p.to_path_buf())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| ".".into());
    let config = SandboxConfig {
        timeout: Duration::from_secs(3600),
        allow_dirs: vec![dir],
        ..Default::default()
    };
    let request = Request::Convert {
        sources: vec![ConvertSource {
            format: None,
            filename: src.clone(),
        }],
        target: ConvertTarget {
            options: TargetOptions::Raw {
                preallocation: Preallocation::Off,
            },
            compress: false,
            size: None,
        },
        outputs: vec![dst.clone()],
        sparse_size,
        snapshot: None,
        target_has_backing: false,
        max_chain_depth: 16,
        progress: false,
    };
    let files = RunFiles {
        inputs: vec![input],
        outputs: vec![output],
        output_names: vec![dst.clone()],
        output_limit: 1 << 50,
    };
    match run_files(&config, files, &request, &mut |_, _| {}) {
        Ok(outcome) => match outcome.response {
            Response::Convert(r) => {
                eprintln!(
                    "virtual size {} written {} ({:?})",
                    r.virtual_size, r.bytes_written, outcome.stats
                );
            }
            Response::Error(e) => {
                eprintln!("instar: {}", e.message);
                std::process::exit(1);
            }
            other => panic!("unexpected response {other:?}"),
        },
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
