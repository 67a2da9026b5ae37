//! Guest bytes assembled from block status (plain data at its host offset,
//! zeros, and `MapImage::read` for compressed or opaque runs) equal what
//! the local qemu-img converts the image to. Needs the corpus
//! (`.cache/corpus`) and qemu-img; without them the test says so and passes.

use instar_formats::map::{self, Mapping};
use instar_formats::{Files, MemFiles};
use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/corpus");
    let have_qemu = Command::new("qemu-img").arg("--version").output().is_ok();
    (root.is_dir() && have_qemu).then_some(root)
}

/// The image and the small files of its directory, by name (vmdk
/// extents).
fn files_for(path: &Path) -> MemFiles {
    let mut f = MemFiles::new(std::fs::read(path).unwrap());
    for e in std::fs::read_dir(path.parent().unwrap()).unwrap() {
        let e = e.unwrap();
        // Extents of the test images are small; the directories also hold
        // multi-GiB fixed images that no test image names.
        let small = e.metadata().unwrap().len() < 64 << 20;
        if e.file_type().unwrap().is_file() && e.path() != path && small {
            let name = e.file_name().to_string_lossy().into_owned();
            f.named.push((name, std::fs::read(e.path()).unwrap()));
        }
    }
    f
}

fn check(root: &Path, rel: &str) {
    eprintln!("checking {rel}");
    let path = root.join(rel);
    let out = std::env::temp_dir().join(format!("instar-map-content-{}.raw", std::process::id()));
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&path)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {rel}");
    let want = std::fs::File::open(&out).unwrap();
    let want_len = want.metadata().unwrap().len();
    let _ = std::fs::remove_file(&out);
    let mut files = files_for(&path);
    let mut image = map::open(&mut files, 0, None, rel).unwrap();
    let size = image.virtual_size();
    assert_eq!(size, want_len, "{rel}: size");
    // Runs are compared in pieces: some images are many GiB of zeros.
    const PIECE: u64 = 16 << 20;
    let (mut got, mut expect) = (Vec::new(), Vec::new());
    let mut at = 0u64;
    while at < size {
        let e = image.block_status(&mut files, at, size - at).unwrap();
        let mut done = 0u64;
        while done < e.length {
            let n = (e.length - done).min(PIECE) as usize;
            let (pos, sub) = (at + done, done);
            got.resize(n, 0);
            expect.resize(n, 0);
            match e.mapping {
                Mapping::Data { at: h } => files.read_at(h.file, h.offset + sub, &mut got).unwrap(),
                Mapping::Compressed | Mapping::Opaque => {
                    image.read(&mut files, pos, &mut got).unwrap()
                }
                Mapping::Zero { .. } | Mapping::Unallocated { .. } => got.fill(0),
            }
            std::os::unix::fs::FileExt::read_exact_at(&want, &mut expect, pos).unwrap();
            assert!(
                got == expect,
                "{rel}: content at {pos} differs from qemu-img convert"
            );
            done += n as u64;
        }
        at += e.length;
    }
}

#[test]
fn content_matches_qemu_img_convert() {
    let Some(root) = corpus() else {
        eprintln!("no corpus or qemu-img: skipped");
        return;
    };
    for rel in [
        "safe/vmdk/subformats/vmdk-so-ide.vmdk",
        "safe/vmdk/subformats/vmdk-ms-ide.vmdk",
        "safe/vmdk/subformats/vmdk-2gs-ide.vmdk",
        "safe/vmdk/subformats/vmdk-2gf-ide.vmdk",
        "safe/vmdk/subformats/vmdk-mf-ide.vmdk",
        "safe/vmdk/options/vmdk-zeroed-grain-z.vmdk",
        "safe/vmdk/options/vmdk-ms-odd-size.vmdk",
        "safe/convert/convert-to-vmdk-c.vmdk",
        "safe/convert/convert-to-vmdk-so.vmdk",
        "safe/convert/convert-to-vmdk.vmdk",
        "safe/convert/convert-to-vhdx.vhdx",
        "safe/convert/convert-to-vpc.vpc",
        "safe/convert/convert-to-vdi.vdi",
        "real-world/iotest-version3.vmdk",
        "safe/vhdx/vhdx-dynamic-many.vhdx",
        "safe/vhdx/vhdx-fixed.vhdx",
        "safe/vhdx/vhdx-bsz-off.vhdx",
        "safe/vpc/vpc-fixed-forceon-10M.vhd",
        "safe/vpc/vpc-dynamic-forceoff-10M.vhd",
        "safe/vdi/vdi-staticon-4M.vdi",
        "safe/vdi/vdi-staticoff-4M.vdi",
    ] {
        if root.join(rel).exists() {
            check(&root, rel);
        } else {
            eprintln!("{rel}: not in this corpus");
        }
    }
}
