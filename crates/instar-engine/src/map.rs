//! `map`: open the image and its backing chain, ask each layer for block
//! status and merge the runs exactly as qemu-img's `img_map` does
//! (`get_block_status`, `entry_mergeable`, `dump_map_entry`).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use instar_formats::map::{self as fmap, MapImage, Mapping};
use instar_formats::{Files, Result};
use instar_wire::{ErrorKind, FileId, ImageError, MapEntry, MapResult, ROOT_FILE};

/// img_map probes at most 1 GiB per block-status call.
const PROBE_BYTES: u64 = 1 << 30;

/// Parameters of one `map` run (the fields of `Request::Map`).
pub struct MapParams<'a> {
    /// `-f`.
    pub format: Option<&'a str>,
    /// The name as given.
    pub filename: &'a str,
    /// `--start-offset`.
    pub start: u64,
    /// `--max-length`.
    pub max_length: Option<u64>,
    /// Backing files allowed below the image.
    pub max_chain_depth: u32,
    /// Entry limit.
    pub max_entries: u64,
    /// Human output.
    pub human: bool,
    /// Compressed runs are told apart (qemu 8.2 on).
    pub split_compressed: bool,
}

/// One image of a backing chain (shared with `compare`).
pub(crate) struct Layer {
    pub(crate) image: Box<dyn MapImage>,
    pub(crate) file: FileId,
    pub(crate) name: String,
}

/// qemu's `path_combine` (absolute names as they are, others relative to
/// the directory part of `base`); the host's gate resolves the same way.
fn combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.into();
    }
    let mut keep = 0;
    if let Some(i) = base.find([':', '/']) {
        if base.as_bytes()[i] == b':' {
            keep = i + 1;
        }
    }
    if let Some(slash) = base.rfind('/') {
        keep = keep.max(slash + 1);
    }
    let mut out = String::from(&base[..keep]);
    out.push_str(name);
    out
}

fn backing_error(e: ImageError) -> ImageError {
    match e.kind {
        ErrorKind::Open => ImageError {
            message: format!("Could not open backing file: {}", e.message),
            ..e
        },
        _ => e,
    }
}

/// Open the image in `root` and every backing file below it.
pub(crate) fn open_chain(
    files: &mut dyn Files,
    root: FileId,
    format: Option<&str>,
    filename: &str,
    max_chain_depth: u32,
) -> Result<Vec<Layer>> {
    let top = fmap::open(files, root, format, filename)?;
    let mut chain = alloc::vec![Layer {
        image: top,
        file: root,
        name: filename.into(),
    }];
    loop {
        let last = chain.last().expect("chain starts with the image");
        let Some((name, format)) = last.image.backing() else {
            break;
        };
        if chain.len() > max_chain_depth as usize {
            return Err(ImageError::limit(format!(
                "backing chain is deeper than max_chain_depth ({max_chain_depth}) at '{name}'"
            )));
        }
        let (name, format) = (String::from(name), format.map(String::from));
        let display = combine(&last.name, &name);
        let file = files.open(last.file, &name).map_err(backing_error)?;
        let image = fmap::open(files, file, format.as_deref(), &display).map_err(backing_error)?;
        chain.push(Layer {
            image,
            file,
            name: display,
        });
    }
    Ok(chain)
}

/// qemu-img's `get_block_status`: the first layer that has the run
/// decides; depth counts the layers passed.
pub(crate) fn block_status(
    files: &mut dyn Files,
    chain: &mut [Layer],
    offset: u64,
    bytes: u64,
) -> Result<MapEntry> {
    let mut bytes = bytes;
    let mut depth = 0usize;
    loop {
        let (below_size, has_below) = match chain.get(depth + 1) {
            Some(l) => (l.image.virtual_size(), true),
            None => (0, false),
        };
        let layer = &mut chain[depth];
        // The block layer clamps each query to the layer's length.
        let size = layer.image.virtual_size();
        if offset >= size {
            // Cannot happen: the layer above reports zeros past our end.
            return Err(ImageError::operation(
                "Could not read file metadata: Input/output error",
            ));
        }
        let ext = layer
            .image
            .block_status(files, offset, bytes.min(size - offset))?;
        if ext.length == 0 || ext.length > bytes {
            return Err(ImageError::operation(
                "Could not read file metadata: Input/output error",
            ));
        }
        bytes = ext.length;
        let mut file_zero = false;
        if let (true, Mapping::Data { at }) = (ext.recurse, ext.mapping) {
            let (z, n) = fmap::recurse_into_file(files, at, bytes)?;
            file_zero = z;
            bytes = n;
        }
        let (data, mut zero, compressed, at) = match ext.mapping {
            Mapping::Data { at } => (true, false, false, Some(at)),
            Mapping::Opaque => (true, false, false, None),
            Mapping::Compressed => (true, false, true, None),
            Mapping::Zero { at } => (false, true, false, at),
            Mapping::Unallocated { at } => (false, false, false, at),
        };
        zero |= file_zero;
        let present = data || zero;
        if !present && layer.image.supports_backing() && (!has_below || offset >= below_size) {
            zero = true;
        }
        if data || zero || !has_below {
            return Ok(MapEntry {
                start: offset,
                length: bytes,
                depth: depth as u64,
                present,
                zero,
                data,
                compressed,
                offset: at.map(|a| a.offset),
                file: at.map(|a| a.file),
            });
        }
        depth += 1;
    }
}

/// qemu-img's `entry_mergeable`.
pub fn mergeable(curr: &MapEntry, next: &MapEntry) -> bool {
    if curr.length == 0 {
        return false;
    }
    if curr.zero != next.zero
        || curr.data != next.data
        || curr.compressed != next.compressed
        || curr.depth != next.depth
        || curr.present != next.present
        || curr.file != next.file
        || curr.offset.is_some() != next.offset.is_some()
    {
        return false;
    }
    match curr.offset {
        Some(o) => o.checked_add(curr.length) == next.offset,
        None => true,
    }
}

/// Collects what qemu-img would print, in order.
struct Out {
    human: bool,
    max_entries: u64,
    entries: Vec<MapEntry>,
}

impl Out {
    /// `dump_map_entry` of `e`; `next` is adjusted as qemu's human mode
    /// does. An error ends the walk.
    fn dump(&mut self, e: MapEntry, next: Option<&mut MapEntry>) -> Result<()> {
        if self.human {
            if e.data && e.offset.is_none() {
                return Err(ImageError::operation(
                    "File contains external, encrypted or compressed clusters.",
                ));
            }
            // Human output ignores the difference between zero and
            // unallocated: merging them gives longer runs.
            if let Some(n) = next {
                if !n.data || n.zero {
                    n.data = false;
                    n.zero = true;
                }
            }
            if !(e.data && !e.zero) {
                return Ok(());
            }
        }
        if self.entries.len() as u64 >= self.max_entries {
            return Err(ImageError::limit(format!(
                "map has more than {} entries (the limit of one run); use --start-offset and --max-length to map it in parts",
                self.max_entries
            )));
        }
        self.entries.push(e);
        Ok(())
    }
}

/// Map the image: open errors are returned as errors; errors during the
/// walk end it, with what qemu-img would have printed before them.
pub fn map(files: &mut dyn Files, p: &MapParams) -> Result<MapResult> {
    let mut chain = open_chain(files, ROOT_FILE, p.format, p.filename, p.max_chain_depth)?;
    let size = chain[0].image.virtual_size();
    // Each image warns as it opens, the image before its backing files.
    let warnings = chain
        .iter()
        .flat_map(|l| l.image.warnings().iter().cloned())
        .collect();
    let length = match p.max_length {
        Some(m) => size.min(p.start.saturating_add(m)),
        None => size,
    };
    let mut out = Out {
        human: p.human,
        max_entries: p.max_entries,
        entries: Vec::new(),
    };
    let mut curr = MapEntry {
        start: p.start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        file: None,
    };
    let mut error = None;
    while curr.start + curr.length < length {
        let offset = curr.start + curr.length;
        let n = PROBE_BYTES.min(length - offset);
        let mut next = match block_status(files, &mut chain, offset, n) {
            // Before 8.2 qemu-img's entries have no such field.
            Ok(e) if !p.split_compressed => MapEntry {
                compressed: false,
                ..e
            },
            Ok(e) => e,
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        if mergeable(&curr, &next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            let done = curr.clone();
            if let Err(e) = out.dump(done, Some(&mut next)) {
                error = Some(e);
                break;
            }
        }
        curr = next;
    }
    if error.is_none() {
        if let Err(e) = out.dump(curr, None) {
            error = Some(e);
        }
    }
    Ok(MapResult {
        entries: out.entries,
        error,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use instar_formats::MemFiles;

    fn entry(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
            file: offset.map(|_| 0),
        }
    }

    fn params(human: bool) -> MapParams<'static> {
        MapParams {
            format: Some("raw"),
            filename: "x.raw",
            start: 0,
            max_length: None,
            max_chain_depth: 15,
            max_entries: 100,
            human,
            split_compressed: true,
        }
    }

    #[test]
    fn merge_rules() {
        let a = entry(0, 512, Some(1024));
        assert!(mergeable(&a, &entry(512, 512, Some(1536))));
        // Host offsets must continue.
        assert!(!mergeable(&a, &entry(512, 512, Some(4096))));
        // A zero-length current entry never merges (the walk's start).
        assert!(!mergeable(
            &entry(0, 0, Some(1024)),
            &entry(0, 512, Some(1024))
        ));
        let mut b = entry(512, 512, Some(1536));
        b.compressed = true;
        assert!(!mergeable(&a, &b));
        let mut b = entry(512, 512, Some(1536));
        b.depth = 1;
        assert!(!mergeable(&a, &b));
        let mut b = entry(512, 512, Some(1536));
        b.file = Some(1);
        assert!(!mergeable(&a, &b));
        // Without offsets, only the flags count.
        assert!(mergeable(&entry(0, 512, None), &entry(512, 512, None)));
        assert!(!mergeable(&entry(0, 512, None), &entry(512, 512, Some(0))));
    }

    #[test]
    fn raw_is_one_data_run() {
        let mut f = MemFiles::new(alloc::vec![7u8; 1000]);
        let m = map(&mut f, &params(false)).unwrap();
        // 1000 bytes are a 1024-byte disk: data, then the sector's tail
        // past the end of the file reads as a hole.
        assert_eq!(m.entries.len(), 2);
        assert_eq!((m.entries[0].length, m.entries[0].offset), (1000, Some(0)));
        assert!(m.entries[1].zero && !m.entries[1].data);
        assert!(m.error.is_none());
        // Human output keeps only data runs.
        let m = map(&mut f, &params(true)).unwrap();
        assert_eq!(m.entries.len(), 1);
    }

    #[test]
    fn start_past_the_end_gives_one_empty_entry() {
        // qemu-img map --output=json --start-offset=2M of a 1 MiB image:
        // [{ "start": 2097152, "length": 0, ... "data": false ...}]
        let mut f = MemFiles::new(alloc::vec![7u8; 1024]);
        let mut p = params(false);
        p.start = 2 << 20;
        let m = map(&mut f, &p).unwrap();
        assert_eq!(m.entries.len(), 1);
        assert_eq!((m.entries[0].start, m.entries[0].length), (2 << 20, 0));
        assert!(!m.entries[0].present && !m.entries[0].data);
    }

    #[test]
    fn entry_limit_is_an_error() {
        let mut f = MemFiles::new(alloc::vec![7u8; 1000]);
        let mut p = params(false);
        p.max_entries = 1;
        let m = map(&mut f, &p).unwrap();
        assert_eq!(m.error.map(|e| e.kind), Some(ErrorKind::Limit));
        assert_eq!(m.entries.len(), 1);
    }

    #[test]
    fn other_formats_refuse_clearly() {
        let mut img = alloc::vec![0u8; 4096];
        img[..4].copy_from_slice(b"QED\0");
        let mut f = MemFiles::new(img);
        let mut p = params(false);
        p.format = None;
        let e = map(&mut f, &p).unwrap_err();
        assert!(
            e.message.contains("QED") || e.message.contains("qed"),
            "{}",
            e.message
        );
    }

    #[test]
    fn combine_like_qemu() {
        assert_eq!(combine("dir/a.qcow2", "b.qcow2"), "dir/b.qcow2");
        assert_eq!(combine("a.qcow2", "/abs/b"), "/abs/b");
        assert_eq!(combine("a.qcow2", "b"), "b");
    }
}
