//! Runs the real VM. Skipped (with the reason printed) where /dev/kvm is
//! unusable. Does not depend on the formats being finished: any typed
//! Response proves the round trip.

use instar_vmm::{run, OpenedFile, SandboxConfig, VmmError};
use instar_wire::{Request, Response};
use std::path::PathBuf;
use std::time::Duration;

fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: /dev/kvm is not usable here: {e}");
            false
        }
    }
}

fn temp_image(tag: &str, content: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("instar-vm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::write(&path, content).unwrap();
    path
}

fn open(path: &PathBuf) -> OpenedFile {
    OpenedFile {
        display_name: path.to_string_lossy().into_owned(),
        file: std::fs::File::open(path).unwrap(),
    }
}

fn info_request(path: &std::path::Path) -> Request {
    Request::Info {
        format: None,
        filename: path.to_string_lossy().into_owned(),
    }
}

#[test]
fn round_trip() {
    if !kvm_usable() {
        return;
    }
    let path = temp_image("rt", &vec![0u8; 1 << 20]);
    let config = SandboxConfig {
        allow_dirs: vec![path.parent().unwrap().to_path_buf()],
        ..Default::default()
    };
    let outcome = run(&config, open(&path), &info_request(&path)).unwrap_or_else(|e| panic!("{e}"));
    match &outcome.response {
        Response::Info(_) | Response::Error(_) => {}
        other => panic!("an info request got {other:?}"),
    }
    eprintln!("response: {:?}", outcome.response);
    eprintln!("stats: {:?}", outcome.stats);
    assert_eq!(outcome.files.len(), 1);
    assert_eq!(outcome.files[0].display_name, path.to_string_lossy());
    assert!(outcome.stats.exits >= 1);
}

#[test]
fn many_runs_in_one_process() {
    if !kvm_usable() {
        return;
    }
    let path = temp_image("many", b"QFI\xfb not really");
    let config = SandboxConfig {
        allow_dirs: vec![path.parent().unwrap().to_path_buf()],
        ..Default::default()
    };
    let mut totals = Vec::new();
    for _ in 0..20 {
        let outcome =
            run(&config, open(&path), &info_request(&path)).unwrap_or_else(|e| panic!("{e}"));
        totals.push(outcome.stats.total_us);
    }
    totals.sort_unstable();
    eprintln!(
        "20 runs, total_us min {} median {} max {}",
        totals[0], totals[10], totals[19]
    );
}

#[test]
fn deadline_is_enforced() {
    if !kvm_usable() {
        return;
    }
    let path = temp_image("deadline", b"x");
    let config = SandboxConfig {
        timeout: Duration::from_micros(1),
        ..Default::default()
    };
    let err = run(&config, open(&path), &info_request(&path)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("deadline"), "{text}");
    assert!(!text.contains('\n'));
}

#[test]
fn memory_limits_are_checked() {
    let path = temp_image("mem", b"x");
    for bytes in [0, 1 << 20, 8 << 30] {
        let config = SandboxConfig {
            memory_bytes: bytes,
            ..Default::default()
        };
        match run(&config, open(&path), &info_request(&path)) {
            Err(VmmError::Failed(m)) => assert!(m.contains("outside the supported range"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}

/// A minimal ELF whose one PT_LOAD holds `code` at 0x400000 (the entry).
fn elf(code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x40_0000u64.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    e[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
    e[ph + 16..ph + 24].copy_from_slice(&0x40_0000u64.to_le_bytes());
    e[ph + 24..ph + 32].copy_from_slice(&0x40_0000u64.to_le_bytes());
    e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(code);
    e
}

fn run_bad_guest(tag: &str, code: &[u8], timeout: Duration) -> String {
    let path = temp_image(tag, b"x");
    let config = SandboxConfig {
        timeout,
        ..Default::default()
    };
    match instar_vmm::run_image(&config, open(&path), &info_request(&path), &elf(code)) {
        Ok(o) => panic!("{tag}: expected an error, got {:?}", o.response),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.starts_with("instar: "), "{text}");
            text
        }
    }
}

const OUT_0X99: &[u8] = &[0x66, 0xba, 0x99, 0x00, 0xee]; // mov dx, 0x99; out dx, al

#[test]
fn misbehaving_guests_fail_cleanly() {
    if !kvm_usable() {
        return;
    }
    let t = Duration::from_secs(10);
    // ud2: invalid opcode, no IDT, triple fault.
    assert!(run_bad_guest("ud2", &[0x0f, 0x0b], t).contains("guest fault"));
    // hlt is privileged at ring 3: #GP, then the same.
    assert!(run_bad_guest("hlt", &[0xf4], t).contains("guest fault"));
    // The guest really runs at ring 3: the supervisor-only system page
    // (page tables, GDT) faults on a user read...
    let mut code = vec![0x48, 0x8b, 0x04, 0x25, 0x00, 0x10, 0x00, 0x00]; // mov rax, [0x1000]
    code.extend_from_slice(OUT_0X99);
    assert!(run_bad_guest("system-page", &code, t).contains("guest fault"));
    // ...and so does the stack guard below the stack.
    let mut code = vec![0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x01]; // mov rax, [0x1000000]
    code.extend_from_slice(OUT_0X99);
    assert!(run_bad_guest("guard", &code, t).contains("guest fault"));
    // While the mailbox is readable.
    let mut code = vec![0x48, 0x8b, 0x07]; // mov rax, [rdi]
    code.extend_from_slice(OUT_0X99);
    assert!(run_bad_guest("port", &code, t).contains("unknown port 0x99"));
    // A READ of more than MAX_READ_BYTES.
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&(1u64 << 40).to_le_bytes()); // mov rax, 1 TiB
    code.extend_from_slice(&[0x48, 0x89, 0x47, 0x38]); // mov [rdi+56], rax (length)
    code.extend_from_slice(&[0x66, 0xba, 0x10, 0x00, 0xee]); // out PORT_READ
    assert!(run_bad_guest("bigread", &code, t).contains("MAX_READ_BYTES"));
    // DONE with bytes that are not a Response.
    let mut code = vec![0x48, 0xc7, 0xc0, 0x00, 0x00, 0x40, 0x00]; // mov rax, 0x400000
    code.extend_from_slice(&[0x48, 0x89, 0x47, 0x48]); // mov [rdi+72], rax (msg_addr)
    code.extend_from_slice(&[0x48, 0xc7, 0xc0, 0x08, 0x00, 0x00, 0x00]); // mov rax, 8
    code.extend_from_slice(&[0x48, 0x89, 0x47, 0x50]); // mov [rdi+80], rax (msg_len)
    code.extend_from_slice(&[0x66, 0xba, 0x12, 0x00, 0xee]); // out PORT_DONE
    assert!(run_bad_guest("garbage", &code, t).contains("undecodable response"));
}

#[test]
fn spinning_guest_hits_the_deadline() {
    if !kvm_usable() {
        return;
    }
    let start = std::time::Instant::now();
    let text = run_bad_guest("spin", &[0xeb, 0xfe], Duration::from_millis(300)); // jmp $
    assert!(text.contains("deadline"), "{text}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// A raw-to-raw convert of two concatenated sources through the real VM:
/// the output holds exactly their content (holes stay holes), progress
/// reaches the total, and the outputs come back to the caller.
#[test]
fn run_files_converts_into_the_outputs() {
    use instar_wire::convert::{Preallocation, TargetOptions};
    use instar_wire::{ConvertSource, ConvertTarget};
    if !kvm_usable() {
        return;
    }
    let mut a = vec![0u8; 3 << 20];
    a[..8192].fill(0x11);
    a[(2 << 20) + 512..(2 << 20) + 4096].fill(0x22);
    let b: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    let pa = temp_image("rfa", &a);
    let pb = pa.with_file_name("b.img");
    std::fs::write(&pb, &b).unwrap();
    let out_path = pa.with_file_name("out.raw");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&out_path)
        .unwrap();
    let config = SandboxConfig {
        allow_dirs: vec![pa.parent().unwrap().to_path_buf()],
        ..Default::default()
    };
    let name = |p: &PathBuf| p.to_string_lossy().into_owned();
    let request = Request::Convert {
        sources: vec![
            ConvertSource {
                format: Some("raw".into()),
                filename: name(&pa),
            },
            ConvertSource {
                format: Some("raw".into()),
                filename: name(&pb),
            },
        ],
        target: ConvertTarget {
            options: TargetOptions::Raw {
                preallocation: Preallocation::Off,
            },
            compress: false,
            size: None,
        },
        outputs: vec![name(&out_path)],
        sparse_size: 4096,
        snapshot: None,
        target_has_backing: false,
        max_chain_depth: 4,
        progress: true,
    };
    let files = instar_vmm::RunFiles {
        inputs: vec![open(&pa), open(&pb)],
        outputs: vec![out],
        output_names: vec![name(&out_path)],
        output_limit: 4 << 20,
    };
    let mut seen = Vec::new();
    let outcome = instar_vmm::run_files(&config, files, &request, &mut |d, t| seen.push((d, t)))
        .unwrap_or_else(|e| panic!("{e}"));
    match &outcome.response {
        Response::Convert(r) => assert_eq!(r.virtual_size, 4 << 20),
        other => panic!("convert got {other:?}"),
    }
    assert_eq!(outcome.outputs.len(), 1);
    assert_eq!(seen.last(), Some(&(4 << 20, 4 << 20)));
    let mut want = a.clone();
    want.extend_from_slice(&b);
    assert!(std::fs::read(&out_path).unwrap() == want, "content differs");
    // The zeros of `a` were not written: far less than 3 MiB is allocated.
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&out_path).unwrap().blocks() * 512 < (2 << 20));
    // Output limit: a target larger than it is stopped by the host.
    let out2 = pa.with_file_name("out2.raw");
    let files = instar_vmm::RunFiles {
        inputs: vec![open(&pa), open(&pb)],
        outputs: vec![std::fs::File::create(&out2).unwrap()],
        output_names: vec![name(&out2)],
        output_limit: 1 << 20,
    };
    let err = instar_vmm::run_files(&config, files, &request, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("output limit"), "{err}");
    let _ = std::fs::remove_dir_all(pa.parent().unwrap());
}
