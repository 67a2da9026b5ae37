//! Times `run` for a trivial request: `cargo run --release --example bench
//! -p instar-vmm [RUNS]`. Prints min/median/max of each phase in
//! microseconds (numbers in docs/sandbox.md come from here).

use instar_vmm::{run, OpenedFile, SandboxConfig};
use instar_wire::Request;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let dir = std::env::temp_dir().join(format!("instar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).expect("temp file");
    let mut config = SandboxConfig {
        allow_dirs: vec![dir.clone()],
        ..Default::default()
    };
    if let Some(mib) = std::env::args().nth(2).and_then(|a| a.parse::<u64>().ok()) {
        config.memory_bytes = mib << 20;
    }
    let request = Request::Info {
        format: None,
        filename: path.to_string_lossy().into_owned(),
    };
    // Optional ballast (MiB, touched) to see how the caller's size affects
    // fork: INSTAR_BENCH_BALLAST_MIB=1024.
    let ballast_mib: usize = std::env::var("INSTAR_BENCH_BALLAST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let ballast = vec![1u8; ballast_mib << 20];
    let mut rows: Vec<[u64; 7]> = Vec::new();
    for _ in 0..runs {
        let root = OpenedFile {
            display_name: path.to_string_lossy().into_owned(),
            file: std::fs::File::open(&path).expect("open"),
        };
        match run(&config, root, &request) {
            Ok(o) => {
                let s = o.stats;
                rows.push([
                    s.total_us,
                    s.fork_us,
                    s.setup_us,
                    s.confine_us,
                    s.guest_us,
                    s.exits,
                    s.reads,
                ]);
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let names = [
        "total_us",
        "fork_us",
        "setup_us",
        "confine_us",
        "guest_us",
        "exits",
        "reads",
    ];
    for (i, name) in names.iter().enumerate() {
        let mut v: Vec<u64> = rows.iter().map(|r| r[i]).collect();
        v.sort_unstable();
        println!(
            "{name:>10}: min {:>6} median {:>6} max {:>6}",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
    std::hint::black_box(&ballast);
    let _ = std::fs::remove_dir_all(&dir);
}
