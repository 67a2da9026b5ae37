//! Development aid, not shipped: runs the engine's `info` directly on the
//! host over real files (no sandbox!) and prints the typed result, so format
//! work can be compared with `qemu-img info --output=json` before the VM is
//! involved. Usage: `cargo run -p instar-engine --example host-info -- [-f FMT] FILE`
use instar_formats::{FileId, Files, Result};
use instar_wire::{ImageError, Request};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

struct HostFiles {
    files: Vec<(PathBuf, File)>,
}

impl Files for HostFiles {
    fn len(&mut self, file: FileId) -> Result<u64> {
        let (_, f) = &self.files[file as usize];
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| ImageError::operation(e.to_string()))
    }
    fn read_at(&mut self, file: FileId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (_, f) = &self.files[file as usize];
        buf.fill(0);
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => return Err(ImageError::operation(e.to_string())),
            }
        }
        Ok(())
    }
    fn open(&mut self, relative_to: FileId, path: &str) -> Result<FileId> {
        let base = &self.files[relative_to as usize].0;
        let full = if Path::new(path).is_absolute() {
            PathBuf::from(path)
        } else {
            base.parent().unwrap_or(Path::new("")).join(path)
        };
        let f = File::open(&full)
            .map_err(|e| ImageError::open(format!("Could not open '{}': {}", full.display(), e)))?;
        self.files.push((full, f));
        Ok((self.files.len() - 1) as FileId)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (format, name) = match args.as_slice() {
        [f, fmt, name] if f == "-f" => (Some(fmt.clone()), name.clone()),
        [name] => (None, name.clone()),
        _ => {
            eprintln!("usage: host-info [-f FMT] FILE");
            std::process::exit(2);
        }
    };
    let file = File::open(&name).expect("open");
    let mut files = HostFiles {
        files: vec![(PathBuf::from(&name), file)],
    };
    let response = instar_engine::handle(
        &mut files,
        &mut instar_formats::write::NoOutputs,
        &Request::Info {
            format,
            filename: name,
        },
    );
    println!("{response:#?}");
}
