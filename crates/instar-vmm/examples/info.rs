//! Runs one `info` request in the sandbox and prints the typed response and
//! the run's counters: `cargo run -p instar-vmm --example info -- FILE
//! [ALLOWED_DIR...]` (the file's own directory is always allowed).

use instar_vmm::{run, OpenedFile, SandboxConfig};
use instar_wire::Request;
use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: info FILE [ALLOWED_DIR...]");
        std::process::exit(2);
    };
    let dir = std::fs::canonicalize(&path)
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut allow_dirs = vec![dir];
    allow_dirs.extend(args.map(PathBuf::from));
    let config = SandboxConfig {
        allow_dirs,
        ..Default::default()
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    let request = Request::Info {
        format: std::env::var("INSTAR_FORMAT").ok(),
        filename: path.clone(),
    };
    match run(
        &config,
        OpenedFile {
            display_name: path,
            file,
        },
        &request,
    ) {
        Ok(o) => {
            println!("{:?}", o.response);
            for (i, f) in o.files.iter().enumerate() {
                println!("file {i}: {}", f.display_name);
            }
            println!("{:?}", o.stats);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
