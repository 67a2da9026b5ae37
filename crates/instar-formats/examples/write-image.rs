//! Drive a writer of `instar_formats::write` from a raw host file, without
//! the sandbox, so that its output can be checked with the real qemu-img:
//!
//! ```text
//! cargo run --release -p instar-formats --example write-image -- \
//!     [--chunk N] FORMAT [-o key=value,...] SRC.raw DST
//! ```
//!
//! The source is read in ascending order in buffers of at least the
//! writer's granularity, looked at in pieces of `--chunk` bytes (default
//! 4 KiB, qemu-img convert's `-S`; any size, to test unaligned writes):
//! all-zero pieces become `zero` calls, runs of data pieces one `write`
//! each, as the engine's convert drives a writer. Formats: raw, vpc, vhdx,
//! vmdk
//! (add yours to `target`).

use instar_formats::write::{self, Sink};
use instar_formats::Result;
use instar_wire::convert::{
    Compression, Preallocation, Qcow2Options, TargetOptions, VhdSubformat, VhdxOptions,
    VmdkAdapter, VmdkOptions, VmdkSubformat, VpcOptions,
};
use instar_wire::{ConvertTarget, ImageError, OutId};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::exit;

struct HostSink {
    files: Vec<File>,
    names: Vec<String>,
}

fn io(e: std::io::Error) -> ImageError {
    ImageError::operation(e.to_string())
}

impl Sink for HostSink {
    fn write_at(&mut self, file: OutId, offset: u64, data: &[u8]) -> Result<()> {
        self.files[file as usize]
            .write_all_at(data, offset)
            .map_err(io)
    }
    fn set_len(&mut self, file: OutId, length: u64) -> Result<()> {
        self.files[file as usize].set_len(length).map_err(io)
    }
    fn output_name(&self, file: OutId) -> Option<&str> {
        self.names.get(file as usize).map(String::as_str)
    }
}

/// `1M`, `512k`, `4096`.
fn size(s: &str) -> u64 {
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => die(&format!("bad size suffix in {s}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| die(&format!("bad size {s}")))
        * mul
}

fn onoff(s: &str) -> bool {
    match s {
        "on" | "true" => true,
        "off" | "false" => false,
        _ => die(&format!("bad bool {s}")),
    }
}

fn subformat(s: &str) -> VhdSubformat {
    match s {
        "dynamic" => VhdSubformat::Dynamic,
        "fixed" => VhdSubformat::Fixed,
        _ => die(&format!("bad subformat {s}")),
    }
}

/// The target for `-O format -o opts`, with qemu-img's defaults.
fn target(format: &str, opts: &[(String, String)]) -> ConvertTarget {
    let mut options = match format {
        "raw" => TargetOptions::Raw {
            preallocation: Preallocation::Off,
        },
        "vpc" => TargetOptions::Vpc(VpcOptions {
            subformat: VhdSubformat::Dynamic,
            force_size: false,
        }),
        "vhdx" => TargetOptions::Vhdx(VhdxOptions {
            subformat: VhdSubformat::Dynamic,
            block_size: 0,
            log_size: 1 << 20,
            block_state_zero: true,
        }),
        "qcow2" => TargetOptions::Qcow2(Qcow2Options {
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: Compression::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
        }),
        "vmdk" => TargetOptions::Vmdk(VmdkOptions {
            subformat: VmdkSubformat::MonolithicSparse,
            adapter: VmdkAdapter::Ide,
            compat6: false,
            hwversion: None,
            toolsversion: None,
            zeroed_grain: false,
            backing_file: None,
        }),
        _ => die(&format!(
            "format {format}: add it to write-image's target()"
        )),
    };
    // `-o compress=on` stands for convert's -c.
    let mut compress = false;
    for (k, v) in opts {
        match (&mut options, k.as_str()) {
            (TargetOptions::Vpc(o), "subformat") => o.subformat = subformat(v),
            (TargetOptions::Vpc(o), "force_size") => o.force_size = onoff(v),
            (TargetOptions::Vhdx(o), "subformat") => o.subformat = subformat(v),
            (TargetOptions::Vhdx(o), "block_size") => o.block_size = size(v),
            (TargetOptions::Vhdx(o), "log_size") => o.log_size = size(v),
            (TargetOptions::Vhdx(o), "block_state_zero") => o.block_state_zero = onoff(v),
            (_, "compress") => compress = onoff(v),
            (TargetOptions::Qcow2(o), "compat") => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => die(&format!("bad compat {v}")),
                }
            }
            (TargetOptions::Qcow2(o), "cluster_size") => o.cluster_size = size(v),
            (TargetOptions::Qcow2(o), "refcount_bits") => o.refcount_bits = size(v) as u32,
            (TargetOptions::Qcow2(o), "lazy_refcounts") => o.lazy_refcounts = onoff(v),
            (TargetOptions::Qcow2(o), "extended_l2") => o.extended_l2 = onoff(v),
            (TargetOptions::Qcow2(o), "compression_type") => {
                o.compression = match v.as_str() {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => die(&format!("bad compression_type {v}")),
                }
            }
            (TargetOptions::Qcow2(o), "preallocation") => {
                o.preallocation = match v.as_str() {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    "falloc" => Preallocation::Falloc,
                    "full" => Preallocation::Full,
                    _ => die(&format!("bad preallocation {v}")),
                }
            }
            (TargetOptions::Vmdk(o), "subformat") => {
                o.subformat = match v.as_str() {
                    "monolithicSparse" => VmdkSubformat::MonolithicSparse,
                    "monolithicFlat" => VmdkSubformat::MonolithicFlat,
                    "streamOptimized" => VmdkSubformat::StreamOptimized,
                    "twoGbMaxExtentSparse" => VmdkSubformat::TwoGbMaxExtentSparse,
                    "twoGbMaxExtentFlat" => VmdkSubformat::TwoGbMaxExtentFlat,
                    _ => die(&format!("bad subformat {v}")),
                }
            }
            (TargetOptions::Vmdk(o), "adapter_type") => {
                o.adapter = match v.as_str() {
                    "ide" => VmdkAdapter::Ide,
                    "buslogic" => VmdkAdapter::Buslogic,
                    "lsilogic" => VmdkAdapter::Lsilogic,
                    "legacyESX" => VmdkAdapter::LegacyEsx,
                    _ => die(&format!("bad adapter_type {v}")),
                }
            }
            (TargetOptions::Vmdk(o), "compat6") => o.compat6 = onoff(v),
            (TargetOptions::Vmdk(o), "hwversion") => o.hwversion = Some(v.clone()),
            (TargetOptions::Vmdk(o), "toolsversion") => o.toolsversion = Some(v.clone()),
            (TargetOptions::Vmdk(o), "zeroed_grain") => o.zeroed_grain = onoff(v),
            (TargetOptions::Vmdk(o), "backing_file") => o.backing_file = Some(v.clone()),
            (TargetOptions::Qcow2(o), "backing_file") => o.backing_file = Some(v.clone()),
            (TargetOptions::Qcow2(o), "backing_fmt") => o.backing_format = Some(v.clone()),
            _ => die(&format!("option {k} not known for {format}")),
        }
    }
    ConvertTarget {
        options,
        compress,
        size: None,
    }
}

fn is_zero(b: &[u8]) -> bool {
    // OR-folding vectorizes; `all` stops early but byte by byte.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

/// The next offset at or after `pos` that starts data (SEEK_DATA) or a
/// hole (SEEK_HOLE); `u64::MAX` when there is none.
fn seek(f: &File, pos: u64, whence: i32) -> u64 {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn lseek(fd: i32, offset: i64, whence: i32) -> i64;
    }
    // SAFETY: lseek only reads its integer arguments; the descriptor is
    // open for the lifetime of `f`.
    let r = unsafe { lseek(f.as_raw_fd(), pos as i64, whence) };
    const ENXIO: i32 = 6;
    if r >= 0 {
        r as u64
    } else if std::io::Error::last_os_error().raw_os_error() == Some(ENXIO) {
        u64::MAX
    } else if whence == SEEK_DATA {
        pos // no SEEK_DATA here: read everything
    } else {
        u64::MAX
    }
}

fn die(msg: &str) -> ! {
    eprintln!("write-image: {msg}");
    exit(1)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut chunk = None;
    if args.first().map(String::as_str) == Some("--chunk") && args.len() > 1 {
        chunk = Some(size(&args[1]).max(1));
        args.drain(..2);
    }
    let mut opts = Vec::new();
    if args.len() == 5 && args[1] == "-o" {
        for kv in args[2].split(',') {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| die(&format!("bad option {kv}")));
            opts.push((k.to_string(), v.to_string()));
        }
        args.drain(1..3);
    }
    let [format, src, dst] = &args[..] else {
        die("usage: write-image [--chunk N] FORMAT [-o key=value,...] SRC.raw DST");
    };
    let target = target(format, &opts);
    let input = File::open(src).unwrap_or_else(|e| die(&format!("{src}: {e}")));
    let len = input
        .metadata()
        .map(|m| m.len())
        .unwrap_or_else(|e| die(&e.to_string()));
    let names = write::output_files(&target, dst, len);
    let files = names
        .iter()
        .map(|n| File::create(n).unwrap_or_else(|e| die(&format!("{n}: {e}"))))
        .collect();
    let mut sink = HostSink { files, names };
    let run = |sink: &mut HostSink| -> Result<()> {
        let mut w = create(sink, &target, len, dst)?;
        let piece = chunk.unwrap_or(4096) as usize;
        // Read several pieces at a time; hand over maximal runs of data.
        let buf_len = piece
            .max(w.granularity() as usize)
            .max(4 << 20)
            .next_multiple_of(piece);
        let mut buf = vec![0u8; buf_len];
        let mut pos = 0u64;
        while pos < len {
            // Skip the source's holes as the engine skips unallocated
            // ranges (qemu-img uses block status the same way).
            let skip = (seek(&input, pos, SEEK_DATA).min(len) - pos) / piece as u64 * piece as u64;
            if skip > 0 {
                w.zero(sink, pos, skip)?;
                pos += skip;
                continue;
            }
            // Read up to the next hole, in whole pieces.
            let data_end = seek(&input, pos, SEEK_HOLE).min(len);
            let want = (data_end - pos)
                .next_multiple_of(piece as u64)
                .max(piece as u64);
            let n = (len - pos).min(buf_len as u64).min(want) as usize;
            input.read_exact_at(&mut buf[..n], pos).map_err(io)?;
            let mut k = 0;
            while k < n {
                let end = (k + piece).min(n);
                if is_zero(&buf[k..end]) {
                    w.zero(sink, pos + k as u64, (end - k) as u64)?;
                    k = end;
                    continue;
                }
                let mut run_end = end;
                while run_end < n {
                    let next = (run_end + piece).min(n);
                    if is_zero(&buf[run_end..next]) {
                        break;
                    }
                    run_end = next;
                }
                w.write(sink, pos + k as u64, &buf[k..run_end])?;
                k = run_end;
            }
            pos += n as u64;
        }
        w.finish(sink)
    };
    if let Err(e) = run(&mut sink) {
        die(&e.message);
    }
}

/// [`write::create`], except that a vmdk target with a backing file gets
/// its parentCID from that file (the engine's job in instar), read with
/// this crate's vmdk `info` from beside `dst` as qemu-img resolves it.
fn create(
    sink: &mut HostSink,
    target: &ConvertTarget,
    len: u64,
    dst: &str,
) -> Result<Box<dyn write::ImageWriter>> {
    let TargetOptions::Vmdk(o) = &target.options else {
        return write::create(sink, target, len);
    };
    let Some(backing) = &o.backing_file else {
        return write::create(sink, target, len);
    };
    let dir = std::path::Path::new(dst)
        .parent()
        .unwrap_or(std::path::Path::new(""));
    let path = dir.join(backing);
    let file = File::open(&path).map_err(io)?;
    let mut files = HostFiles {
        files: vec![file],
        dir: dir.to_path_buf(),
    };
    let info = instar_formats::vmdk::info(&mut files, 0, backing)?;
    let cid = write::vmdk::parent_cid(&info)?;
    Ok(Box::new(write::vmdk::VmdkWriter::create(
        sink,
        o,
        target.compress,
        len,
        Some(cid),
    )?))
}

/// Read-only host files for reading a backing image's descriptor.
struct HostFiles {
    files: Vec<File>,
    dir: std::path::PathBuf,
}

impl instar_formats::Files for HostFiles {
    fn len(&mut self, file: u32) -> Result<u64> {
        self.files[file as usize]
            .metadata()
            .map(|m| m.len())
            .map_err(io)
    }
    fn read_at(&mut self, file: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let f = &self.files[file as usize];
        let mut done = 0;
        while done < buf.len() {
            match f
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(io)?
            {
                0 => break,
                n => done += n,
            }
        }
        Ok(())
    }
    fn open(&mut self, _relative_to: u32, path: &str) -> Result<u32> {
        self.files
            .push(File::open(self.dir.join(path)).map_err(io)?);
        Ok(self.files.len() as u32 - 1)
    }
}
