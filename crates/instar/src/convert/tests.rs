use super::*;
use crate::cli::{self, Action, Grammar};

fn v(s: &str) -> QemuVersion {
    QemuVersion::parse_short(s).unwrap()
}

fn grammar(ver: &str, style: UsageStyle) -> Grammar {
    Grammar {
        style,
        info_cache_limits: false,
        version: v(ver),
    }
}

fn run(ver: &str, style: UsageStyle, args: &[&str]) -> Result<Action, String> {
    let mut a = vec!["qemu-img".to_string(), "convert".to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    cli::parse(&a, grammar(ver, style)).map_err(|e| e.0)
}

fn err(ver: &str, style: UsageStyle, args: &[&str]) -> String {
    run(ver, style, args).unwrap_err()
}

const C: UsageStyle = UsageStyle::Classic;
const R: UsageStyle = UsageStyle::Reworked;
const U: UsageStyle = UsageStyle::Upstream;

// Expected texts: stderr of the real binaries (4.2.1 focal, 5.2.0
// bullseye, 6.2.0 jammy, 7.2 bookworm, 8.2.2 noble, 9.2.1 plucky, 10.0.2,
// 10.1.0 questing, 11.1.3 sid) with the same arguments.
#[test]
fn sparse_size_messages() {
    let a = ["-S", "1Q", "s", "d"];
    assert_eq!(
        err("4.2.1", C, &a),
        "qemu-img: Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).\n"
    );
    assert_eq!(
        err("8.2.2", C, &a),
        "qemu-img: Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"
    );
    assert_eq!(
        err("10.0.2", R, &a),
        "qemu-img: Invalid buffer size for sparse output specified: '1Q'.\n"
    );
    assert_eq!(
        err("10.1.0", U, &a),
        "qemu-img: Invalid buffer size for sparse output specified: '1Q'\n"
    );
    let neg = ["-S", "-1", "s", "d"];
    assert!(err("7.2.0", C, &neg).contains("You may use k, M"));
    assert!(err("5.2.0", C, &neg).contains("Must be between 0 and 9223372036854775807."));
    assert!(err("8.2.2", C, &neg).contains("Must be between 0 and 9223372036854775807."));
    assert!(
        err("10.0.2", R, &["-S", "1000", "s", "d"]).contains("Valid sizes are multiples of 512")
    );
    let Ok(Action::Convert(c)) = run("10.0.2", R, &["-S", "64k", "s", "d"]) else {
        panic!()
    };
    assert_eq!(c.sparse_size, Some(65536));
}

#[test]
fn coroutines_and_rate() {
    assert_eq!(
        err("8.2.2", C, &["-m", "17", "s", "d"]),
        "qemu-img: Invalid number of coroutines. Allowed number of coroutines is between 1 and 16\n"
    );
    assert_eq!(
        err("10.0.2", R, &["-m", "0", "s", "d"]),
        "qemu-img: Invalid number of coroutines specified. Must be between 1 and 16.\n"
    );
    assert_eq!(
        err("10.0.2", R, &["-m", "2x", "s", "d"]),
        "qemu-img: Invalid number of coroutines specified: '2x'.\n"
    );
    assert_eq!(
        err("11.1.3", U, &["-m", "1k", "s", "d"]),
        "qemu-img: Invalid number of coroutines specified: '1k'\n"
    );
    assert!(run("10.0.2", R, &["-m", "0x2", "s", "d"]).is_ok());
    assert!(run("8.2.2", C, &["-m", " 3", "s", "d"]).is_ok());
    assert_eq!(
        err("4.2.1", C, &["-r", "x", "s", "d"]),
        "qemu-img: unrecognized option '-r'\nTry 'qemu-img --help' for more information\n"
    );
    assert_eq!(
        err("10.0.2", R, &["-r", "x", "s", "d"]),
        "qemu-img: Invalid rate limit specified: 'x'.\n"
    );
}

#[test]
fn checks_before_opening() {
    assert_eq!(
        err("10.0.2", R, &[]),
        "qemu-img: Must specify image file name\n"
    );
    assert_eq!(
        err("10.0.2", R, &["s"]),
        "qemu-img: Must specify image file name\n"
    );
    assert_eq!(
        err("10.0.2", R, &["-T", "bogus", "s", "d"]),
        "qemu-img: Invalid source cache option: bogus\n"
    );
    assert_eq!(
        err("10.0.2", R, &["--skip-broken-bitmaps", "s", "d"]),
        "qemu-img: Use of --skip-broken-bitmaps requires --bitmaps\n"
    );
    assert_eq!(
        err("5.2.0", C, &["--skip-broken-bitmaps", "s", "d"]),
        "qemu-img: unrecognized option '--skip-broken-bitmaps'\nTry 'qemu-img --help' for more information\n"
    );
    assert_eq!(
        err("10.0.2", R, &["-c", "-C", "s", "d"]),
        "qemu-img: Cannot enable copy offloading when -c is used\n"
    );
    assert_eq!(
        err("10.0.2", R, &["--target-is-zero", "s", "d"]),
        "qemu-img: --target-is-zero requires use of -n flag\n"
    );
    assert_eq!(
        err("10.0.2", R, &["-n", "-o", "x=1", "s", "d"]),
        "qemu-img: -o has no effect when skipping image creation\n"
    );
    assert_eq!(
        err("10.0.2", R, &["-o", "a=1,", "s", "d"]),
        "qemu-img: Invalid option list: a=1,\n"
    );
    // -t is checked only after the target is created.
    let Ok(Action::Convert(c)) = run("10.0.2", R, &["-t", "bogus", "s", "d"]) else {
        panic!()
    };
    assert_eq!(c.target_cache_error.as_deref(), Some("bogus"));
}

#[test]
fn grammar_per_style() {
    assert_eq!(
        err("10.0.2", R, &["--s", "s", "d"]),
        "qemu-img convert: option '--s' is ambiguous; possibilities: '--source-image-opts' '--source-format' '--source-cache' '--snapshot' '--sparse-size' '--salvage' '--skip-broken-bitmaps'\nTry 'qemu-img convert --help' for more info\n"
    );
    assert_eq!(
        err("10.0.2", R, &["--o", "s", "d"]),
        "qemu-img convert: option '--o' is ambiguous; possibilities: '--object' '--output-format' '--options' '--output-cache' '--oob-writes'\nTry 'qemu-img convert --help' for more info\n"
    );
    assert_eq!(
        err("10.0.2", R, &["--progress", "s", "d"]),
        "qemu-img convert: unrecognized option '--progress'\nTry 'qemu-img convert --help' for more info\n"
    );
    assert_eq!(
        err("8.2.2", C, &["--t", "s", "d"]),
        "qemu-img: unrecognized option '--t'\nTry 'qemu-img --help' for more information\n"
    );
    assert_eq!(
        err("8.2.2", C, &["s", "d", "-f"]),
        "qemu-img: missing argument for option '-f'\nTry 'qemu-img --help' for more information\n"
    );
    // 4.2 has --salvage but neither --skip-broken-bitmaps nor
    // --target-is-zero, so both prefixes are unique there.
    assert!(matches!(
        run("4.2.1", C, &["--s", "s", "d"]),
        Ok(Action::Convert(ConvertArgs { salvage: true, .. }))
    ));
    assert!(matches!(
        run("4.2.1", C, &["--t", "s", "d"]),
        Ok(Action::Convert(ConvertArgs {
            target_image_opts: true,
            ..
        })) | Err(_)
    ));
    let Ok(Action::Convert(c)) = run("10.1.0", U, &["-b", "base", "-F", "raw", "s", "d"]) else {
        panic!()
    };
    assert_eq!(c.backing.as_deref(), Some("base"));
    assert_eq!(
        err("5.2.0", C, &["-F", "raw", "s", "d"]),
        "qemu-img: unrecognized option '-F'\nTry 'qemu-img --help' for more information\n"
    );
    let Ok(Action::Convert(c)) = run(
        "10.0.2",
        R,
        &[
            "-p",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "compat=0.10",
            "a",
            "b",
            "c",
        ],
    ) else {
        panic!()
    };
    assert!(c.progress);
    assert_eq!(c.options.as_deref(), Some("cluster_size=4k,compat=0.10"));
    assert_eq!(c.operands, vec![9, 10, 11]);
}

#[test]
fn option_help_text() {
    let Ok(Action::Print(t)) = run("10.0.2", R, &["-O", "vpc", "-o", "help"]) else {
        panic!()
    };
    assert!(t.starts_with("Supported vpc options:\n  force_size=<bool (on/off)>"));
    assert!(t.ends_with("Specify the target filename to include those options.\n"));
    let Ok(Action::Print(t)) = run("10.0.2", R, &["-o", "help", "s", "d"]) else {
        panic!()
    };
    assert!(t.starts_with("Supported options:\n  extent_size_hint="));
    assert_eq!(
        err("10.0.2", R, &["-O", "bogus", "-o", "help"]),
        "qemu-img: Unknown file format 'bogus'\n"
    );
}

fn plan_for(args: &[&str]) -> Result<Plan, String> {
    let Ok(Action::Convert(a)) = run("10.0.2", R, args) else {
        panic!("{args:?}")
    };
    let config = Config::default();
    let profile = OutputProfile::for_version(v("10.0.2"), Some(true));
    let call = ConvertCall {
        args: &a,
        operands: Vec::new(),
        config: &config,
        timeout: Duration::from_secs(1),
        convert_timeout: Duration::from_secs(1),
        profile: &profile,
    };
    let n = a.operands.len() - 1;
    plan(&call, "dst", n).map_err(|e| e.text())
}

// qemu-img 10.0.2, `convert ARGS src.raw dst` of a 1 MiB raw image.
#[test]
fn target_errors() {
    let e = |args: &[&str]| plan_for(args).err().unwrap();
    assert_eq!(
        e(&["-O", "bogus", "s", "dst"]),
        "qemu-img: Unknown file format 'bogus'\n"
    );
    assert_eq!(
        e(&["-c", "s", "dst"]),
        "qemu-img: Compression not supported for this file format\n"
    );
    assert_eq!(
        e(&["-O", "qcow2", "-o", "bogus=1", "s", "dst"]),
        "qemu-img: Invalid parameter 'bogus'\n"
    );
    assert_eq!(
        e(&["-O", "qcow2", "-o", "lazy_refcounts=maybe", "s", "dst"]),
        "qemu-img: Parameter 'lazy_refcounts' expects 'on' or 'off'\n"
    );
    assert_eq!(
        e(&["-O", "qcow2", "-B", "base", "s", "dst"]),
        "qemu-img: Use of backing file requires explicit backing format\n"
    );
    assert_eq!(
        e(&["-O", "raw", "-B", "b", "-F", "raw", "s", "dst"]),
        "qemu-img: Backing file not supported for file format 'raw'\n"
    );
    assert_eq!(
        e(&["-O", "raw", "-F", "raw", "s", "dst"]),
        "qemu-img: Backing file format not supported for file format 'raw'\n"
    );
    let q = |o: &str| e(&["-O", "qcow2", "-o", o, "s", "dst"]);
    assert_eq!(
        q("cluster_size=1000"),
        "qemu-img: dst: error while converting qcow2: Cluster size must be a power of two between 512 and 2048k\n"
    );
    assert_eq!(
        q("compat=0.9"),
        "qemu-img: dst: error while converting qcow2: Parameter 'version' does not accept value '0.9'\n"
    );
    assert_eq!(
        q("refcount_bits=3"),
        "qemu-img: dst: error while converting qcow2: Refcount width must be a power of two and may not exceed 64 bits\n"
    );
    assert_eq!(
        q("preallocation=bogus"),
        "qemu-img: dst: error while converting qcow2: Parameter 'preallocation' does not accept value 'bogus'\n"
    );
    assert_eq!(
        q("compression_type=lz4"),
        "qemu-img: dst: error while converting qcow2: Parameter 'compression-type' does not accept value 'lz4'\n"
    );
    assert_eq!(
        q("compat=0.10,compression_type=zstd"),
        "qemu-img: dst: error while converting qcow2: Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)\n"
    );
    assert_eq!(
        q("extended_l2=on,cluster_size=4k"),
        "qemu-img: dst: error while converting qcow2: Extended L2 entries are only supported with cluster sizes of at least 16384 bytes\n"
    );
    assert_eq!(
        q("backing_fmt=raw"),
        "qemu-img: dst: error while converting qcow2: Backing format cannot be used without backing file\n"
    );
    assert_eq!(
        q("encrypt.format=luks"),
        "qemu-img: dst: error while converting qcow2: Parameter 'encrypt.key-secret' is required for cipher\n"
    );
    assert_eq!(
        e(&["-O", "raw", "-o", "preallocation=metadata", "s", "dst"]),
        "qemu-img: dst: error while converting raw: Unsupported preallocation mode: metadata\n"
    );
    assert_eq!(
        e(&["-O", "vmdk", "-o", "subformat=bogus", "s", "dst"]),
        "qemu-img: dst: error while converting vmdk: invalid parameter value: bogus\n"
    );
    assert_eq!(
        e(&["-O", "vmdk", "-o", "compat6=on,hwversion=7", "s", "dst"]),
        "qemu-img: dst: error while converting vmdk: compat6 cannot be enabled with hwversion set\n"
    );
    assert_eq!(
        e(&["-O", "vpc", "-o", "subformat=bogus", "s", "dst"]),
        "qemu-img: dst: error while converting vpc: Parameter 'subformat' does not accept value 'bogus'\n"
    );
    assert_eq!(
        e(&["-O", "vhdx", "-o", "block_size=0x1000001", "s", "dst"]),
        "qemu-img: dst: error while converting vhdx: Block size must be a power of two\n"
    );
    assert_eq!(
        e(&["-O", "qcow2", "-B", "b", "-F", "raw", "s1", "s2", "dst"]),
        "qemu-img: Having a backing file for the target makes no sense when concatenating multiple input images\n"
    );
    assert!(
        e(&["-O", "vdi", "s", "dst"]).starts_with("instar: convert -O vdi is not implemented yet")
    );
}

#[test]
fn target_options() {
    let p = plan_for(&[
        "-O",
        "qcow2",
        "-c",
        "-o",
        "cluster_size=4k,compat=0.10,size=1G",
        "-B",
        "b",
        "-F",
        "qcow2",
        "s",
        "dst",
    ])
    .unwrap();
    assert!(p.target.compress);
    assert_eq!(p.target.size, None);
    let TargetOptions::Qcow2(q) = p.target.options else {
        panic!()
    };
    assert_eq!((q.version, q.cluster_size, q.refcount_bits), (2, 4096, 16));
    assert_eq!(q.backing_file.as_deref(), Some("b"));
    assert_eq!(q.backing_format.as_deref(), Some("qcow2"));
    // -B and -F win over -o.
    let p = plan_for(&[
        "-O",
        "qcow2",
        "-o",
        "backing_file=x,backing_fmt=raw",
        "-B",
        "y",
        "-F",
        "qcow2",
        "s",
        "dst",
    ])
    .unwrap();
    assert_eq!(p.backing.as_deref(), Some("y"));
    assert_eq!(p.backing_format.as_deref(), Some("qcow2"));
    let p = plan_for(&["-O", "vhdx", "-o", "subformat=fixed", "s", "dst"]).unwrap();
    assert_eq!(
        p.target.options,
        TargetOptions::Vhdx(VhdxOptions {
            subformat: VhdSubformat::Fixed,
            block_size: 0,
            log_size: 1 << 20,
            block_state_zero: true
        })
    );
    let p = plan_for(&["s", "dst"]).unwrap();
    assert_eq!(
        p.target.options,
        TargetOptions::Raw {
            preallocation: Preallocation::Off
        }
    );
}

#[test]
fn progress_lines() {
    // qemu's float arithmetic: 2 MiB of 64 MiB is 3.125, printed 3.12.
    let mut p = Progress::new(false);
    p.set(0.0);
    assert_eq!(p.last_print, 0.0);
    p.report(1, 200);
    assert_eq!(p.last_print, 0.0, "a move of 0.5 is not printed");
    p.report(3, 200);
    assert_eq!(p.last_print, 1.5);
    p.report(200, 200);
    assert_eq!(p.last_print, 100.0);
    assert_eq!(format!("{:3.2}", f64::from(3.125f32)), "3.12");
}

#[test]
fn temp_names() {
    assert_eq!(
        temp_path(Path::new("a/b.qcow2")),
        PathBuf::from(format!("a/.b.qcow2.instar-partial-{}", std::process::id()))
    );
    assert_eq!(
        temp_path(Path::new("b")),
        PathBuf::from(format!(".b.instar-partial-{}", std::process::id()))
    );
}
