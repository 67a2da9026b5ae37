//! `info` output: the typed result becomes the QAPI object qemu-img would
//! build (members inserted in QAPI order), which is then printed as JSON or
//! in the human layout of the selected profile.

use crate::profile::{OutputProfile, SnapshotLayout};
use crate::qobject::{dump_human, to_json_pretty, QDict, QValue};
use crate::sizefmt::size_to_str;
use instar_wire::{
    BitmapFlag, FormatSpecific, ImageInfo, LuksInfo, Qcow2Encrypt, Qcow2Info, SnapshotInfo,
    VmdkInfo,
};

/// What the host knows of one file of the call, from its own `fstat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    /// The name qemu-img shows for it.
    pub display_name: String,
    /// Length in bytes (qemu rounds it up to 512 when it reports it).
    pub length: u64,
    /// `st_blocks * 512`.
    pub allocated: u64,
    /// qemu's protocol driver for it: `file`, or `host_device` for
    /// device nodes.
    pub protocol: &'static str,
    /// `FS_IOC_FSGETXATTR` extent size hint, when nonzero.
    pub extent_size_hint: Option<u64>,
}

/// One image to render.
#[derive(Debug, Clone)]
pub struct ImageView<'a> {
    /// The name the image was opened by (command line, or the combined
    /// backing file name in a chain).
    pub filename: &'a str,
    /// The guest's result.
    pub info: &'a ImageInfo,
    /// Host facts, indexed by `FileId`.
    pub files: &'a [FileFacts],
    /// qemu's `full-backing-filename` (the stored name resolved against
    /// `filename`), when there is a backing file.
    pub full_backing_filename: Option<String>,
}

fn round_up_512(n: u64) -> u64 {
    n.div_ceil(512).saturating_mul(512)
}

fn file_node_dict(f: &FileFacts, profile: &OutputProfile) -> QDict {
    let mut d = QDict::new();
    d.put_str("filename", &f.display_name);
    d.put_str("format", f.protocol);
    d.put_bool("dirty-flag", false);
    d.put_uint("actual-size", f.allocated);
    d.put_uint("virtual-size", round_up_512(f.length));
    if profile.child_nodes {
        let mut fs = QDict::new();
        fs.put_str("type", "file");
        let mut data = QDict::new();
        if let Some(h) = f.extent_size_hint {
            data.put_uint("extent-size-hint", h);
        }
        fs.put("data", QValue::Dict(data));
        d.put("format-specific", QValue::Dict(fs));
        d.put("children", QValue::List(Vec::new()));
    }
    d
}

/// Children qemu would show, after the profile's rules.
fn visible_children<'a>(
    info: &'a ImageInfo,
    profile: &OutputProfile,
) -> impl Iterator<Item = &'a instar_wire::ChildFile> + 'a {
    let data_file = profile.info_opens_data_file;
    info.children
        .iter()
        .filter(move |c| data_file || c.name != "data-file")
}

/// The QAPI `BlockGraphInfo` (8.0+) or `ImageInfo` (before) of an image.
pub fn image_dict(v: &ImageView, profile: &OutputProfile) -> QDict {
    let info = v.info;
    let mut d = QDict::new();
    d.put_str("filename", v.filename);
    d.put_str("format", &info.format);
    // Absent for drivers without `bdrv_get_info` (bochs, cloop, dmg,
    // parallels); the guest knows which.
    if let Some(flag) = info.dirty_flag {
        let dirty = flag && (profile.qcow2_dirty_flag || info.format != "qcow2");
        d.put_bool("dirty-flag", dirty);
    }
    let mut counted = visible_children(info, profile)
        .filter(|c| c.counts_in_disk_size)
        .filter_map(|c| v.files.get(usize::try_from(c.file).ok()?))
        .peekable();
    let actual = if counted.peek().is_some() {
        Some(counted.map(|f| f.allocated).fold(0u64, u64::saturating_add))
    } else {
        v.files.first().map(|f| f.allocated)
    };
    if let Some(a) = actual {
        d.put_uint("actual-size", a);
    }
    d.put_uint("virtual-size", info.virtual_size);
    if let Some(cs) = info.cluster_size.filter(|&c| c != 0) {
        d.put_uint("cluster-size", cs);
    }
    if info.encrypted {
        d.put_bool("encrypted", true);
    }
    if let Some(c) = info.compressed {
        d.put_bool("compressed", c);
    }
    if let Some(b) = info.backing_filename.as_deref().filter(|b| !b.is_empty()) {
        d.put_str("backing-filename", b);
        if let Some(full) = &v.full_backing_filename {
            d.put_str("full-backing-filename", full);
        }
        if let Some(f) = &info.backing_filename_format {
            d.put_str("backing-filename-format", f);
        }
    }
    if !info.snapshots.is_empty() {
        d.put(
            "snapshots",
            QValue::List(
                info.snapshots
                    .iter()
                    .map(|s| snapshot_dict(s, profile.snapshot_icount))
                    .collect(),
            ),
        );
    }
    if let Some(fs) = &info.format_specific {
        d.put(
            "format-specific",
            QValue::Dict(format_specific_dict(fs, profile)),
        );
    }
    if profile.child_nodes {
        let children = visible_children(info, profile)
            .filter_map(|c| {
                let f = v.files.get(usize::try_from(c.file).ok()?)?;
                let mut e = QDict::new();
                e.put_str("name", &c.name);
                e.put("info", QValue::Dict(file_node_dict(f, profile)));
                Some(QValue::Dict(e))
            })
            .collect();
        d.put("children", QValue::List(children));
    }
    d
}

fn snapshot_dict(s: &SnapshotInfo, icount: bool) -> QValue {
    let mut d = QDict::new();
    d.put_str("id", &s.id);
    d.put_str("name", &s.name);
    // QAPI's `int`: qemu prints the 64-bit field signed.
    d.put_int("vm-state-size", s.vm_state_size as i64);
    d.put_uint("date-sec", s.date_sec);
    d.put_uint("date-nsec", s.date_nsec);
    d.put_uint("vm-clock-sec", s.vm_clock_sec);
    d.put_uint("vm-clock-nsec", s.vm_clock_nsec);
    if let Some(i) = s.icount.filter(|_| icount) {
        d.put_uint("icount", i);
    }
    QValue::Dict(d)
}

fn format_specific_dict(fs: &FormatSpecific, profile: &OutputProfile) -> QDict {
    let (kind, data) = match fs {
        FormatSpecific::Qcow2(q) => ("qcow2", qcow2_dict(q, profile)),
        FormatSpecific::Vmdk(v) => ("vmdk", vmdk_dict(v)),
        FormatSpecific::Luks(l) => {
            let mut d = QDict::new();
            luks_members(&mut d, l, profile);
            ("luks", d)
        }
    };
    let mut u = QDict::new();
    u.put_str("type", kind);
    u.put("data", QValue::Dict(data));
    u
}

fn qcow2_dict(q: &Qcow2Info, profile: &OutputProfile) -> QDict {
    let mut d = QDict::new();
    d.put_str("compat", &q.compat);
    if let Some(f) = &q.data_file {
        d.put_str("data-file", f);
    }
    if let Some(b) = q.data_file_raw {
        d.put_bool("data-file-raw", b);
    }
    if let Some(b) = q.extended_l2.filter(|_| profile.qcow2_extended_l2) {
        d.put_bool("extended-l2", b);
    }
    if let Some(b) = q.lazy_refcounts {
        d.put_bool("lazy-refcounts", b);
    }
    if let Some(b) = q.corrupt {
        d.put_bool("corrupt", b);
    }
    d.put_uint("refcount-bits", q.refcount_bits);
    if let Some(e) = &q.encrypt {
        let mut ed = QDict::new();
        match e {
            Qcow2Encrypt::Aes => ed.put_str("format", "aes"),
            Qcow2Encrypt::Luks(l) => {
                ed.put_str("format", "luks");
                luks_members(&mut ed, l, profile);
            }
        }
        d.put("encrypt", QValue::Dict(ed));
    }
    if let Some(bitmaps) = &q.bitmaps {
        let list = bitmaps
            .iter()
            .map(|b| {
                let mut bd = QDict::new();
                bd.put_str("name", &b.name);
                bd.put_uint("granularity", b.granularity);
                let flags = b
                    .flags
                    .iter()
                    .map(|f| {
                        QValue::Str(
                            match f {
                                BitmapFlag::InUse => "in-use",
                                BitmapFlag::Auto => "auto",
                            }
                            .as_bytes()
                            .to_vec(),
                        )
                    })
                    .collect();
                bd.put("flags", QValue::List(flags));
                QValue::Dict(bd)
            })
            .collect();
        d.put("bitmaps", QValue::List(list));
    }
    if profile.qcow2_compression_type {
        d.put_str("compression-type", &q.compression_type);
    }
    d
}

fn luks_members(d: &mut QDict, l: &LuksInfo, profile: &OutputProfile) {
    d.put_str("cipher-alg", &l.cipher_alg);
    d.put_str("cipher-mode", &l.cipher_mode);
    d.put_str("ivgen-alg", &l.ivgen_alg);
    if let Some(h) = &l.ivgen_hash_alg {
        d.put_str("ivgen-hash-alg", h);
    }
    d.put_str("hash-alg", &l.hash_alg);
    if profile.luks_detached_header {
        d.put_bool("detached-header", l.detached_header);
    }
    d.put_int("payload-offset", l.payload_offset);
    d.put_uint("master-key-iters", l.master_key_iters);
    d.put_str("uuid", &l.uuid);
    let slots = l
        .slots
        .iter()
        .map(|s| {
            let mut sd = QDict::new();
            sd.put_bool("active", s.active);
            if let Some(i) = s.iters {
                sd.put_uint("iters", i);
            }
            if let Some(st) = s.stripes {
                sd.put_uint("stripes", st);
            }
            sd.put_uint("key-offset", s.key_offset);
            QValue::Dict(sd)
        })
        .collect();
    d.put("slots", QValue::List(slots));
}

fn vmdk_dict(v: &VmdkInfo) -> QDict {
    let mut d = QDict::new();
    d.put_str("create-type", &v.create_type);
    d.put_uint("cid", v.cid);
    d.put_uint("parent-cid", v.parent_cid);
    let extents = v
        .extents
        .iter()
        .map(|e| {
            let mut ed = QDict::new();
            ed.put_str("filename", &e.filename);
            ed.put_str("format", &e.format);
            ed.put_uint("virtual-size", e.virtual_size);
            if let Some(cs) = e.cluster_size {
                ed.put_uint("cluster-size", cs);
            }
            if let Some(c) = e.compressed {
                ed.put_bool("compressed", c);
            }
            QValue::Dict(ed)
        })
        .collect();
    d.put("extents", QValue::List(extents));
    d
}

/// JSON of one image (`qemu-img info --output=json`).
pub fn json_one(d: QDict) -> Vec<u8> {
    to_json_pretty(&QValue::Dict(d))
}

/// JSON of a chain (`--backing-chain`): a top-level array.
pub fn json_chain(ds: Vec<QDict>) -> Vec<u8> {
    to_json_pretty(&QValue::List(ds.into_iter().map(QValue::Dict).collect()))
}

/// Human output of a chain: images separated by a blank line.
pub fn human_chain(ds: &[QDict], profile: &OutputProfile) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, d) in ds.iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        human_graph(&mut out, d, 0, "/", profile);
    }
    out
}

fn get_str<'a>(d: &'a QDict, key: &str) -> &'a [u8] {
    match d.get(key) {
        Some(QValue::Str(s)) => s,
        _ => b"",
    }
}

fn get_u64(d: &QDict, key: &str) -> Option<u64> {
    match d.get(key) {
        Some(QValue::UInt(v)) => Some(*v),
        Some(QValue::Int(v)) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn pad(out: &mut Vec<u8>, n: usize) {
    out.resize(out.len() + n, b' ');
}

fn line(out: &mut Vec<u8>, indent: usize, parts: &[&[u8]]) {
    pad(out, indent);
    for p in parts {
        out.extend_from_slice(c_str(p));
    }
    out.push(b'\n');
}

fn c_str(s: &[u8]) -> &[u8] {
    s.iter().position(|&b| b == 0).map_or(s, |e| &s[..e])
}

/// qemu-img's `dump_human_image_info`: the node, then each child block.
fn human_graph(out: &mut Vec<u8>, d: &QDict, level: usize, path: &str, profile: &OutputProfile) {
    let children: &[QValue] = match d.get("children") {
        Some(QValue::List(l)) => l,
        _ => &[],
    };
    // A node without children is a protocol node (8.0+ wording).
    let protocol = profile.child_nodes && children.is_empty();
    human_node(out, d, level, protocol, profile);
    for child in children {
        let QValue::Dict(c) = child else { continue };
        let name = String::from_utf8_lossy(get_str(c, "name")).into_owned();
        pad(out, level * 4);
        out.extend_from_slice(format!("Child node '{path}{name}':\n").as_bytes());
        if let Some(QValue::Dict(info)) = c.get("info") {
            human_graph(out, info, level + 1, &format!("{path}{name}/"), profile);
        }
    }
}

/// qemu's `bdrv_node_info_dump` (`bdrv_image_info_dump` before 8.0).
fn human_node(out: &mut Vec<u8>, d: &QDict, level: usize, protocol: bool, profile: &OutputProfile) {
    let ind = level * 4;
    let vsize = get_u64(d, "virtual-size").unwrap_or(0);
    let size_line = format!("{} ({vsize} bytes)", size_to_str(vsize));
    let dsize = get_u64(d, "actual-size").map_or_else(|| "unavailable".to_string(), size_to_str);
    if protocol {
        line(out, ind, &[b"filename: ", get_str(d, "filename")]);
        line(out, ind, &[b"protocol type: ", get_str(d, "format")]);
        line(out, ind, &[b"file length: ", size_line.as_bytes()]);
    } else {
        line(out, ind, &[b"image: ", get_str(d, "filename")]);
        line(out, ind, &[b"file format: ", get_str(d, "format")]);
        line(out, ind, &[b"virtual size: ", size_line.as_bytes()]);
    }
    line(out, ind, &[b"disk size: ", dsize.as_bytes()]);
    if matches!(d.get("encrypted"), Some(QValue::Bool(true))) {
        line(out, ind, &[b"encrypted: yes"]);
    }
    if let Some(cs) = get_u64(d, "cluster-size") {
        line(out, ind, &[b"cluster_size: ", cs.to_string().as_bytes()]);
    }
    if matches!(d.get("dirty-flag"), Some(QValue::Bool(true))) {
        line(out, ind, &[b"cleanly shut down: no"]);
    }
    if d.get("backing-filename").is_some() {
        let b = get_str(d, "backing-filename");
        pad(out, ind);
        out.extend_from_slice(b"backing file: ");
        out.extend_from_slice(c_str(b));
        match d.get("full-backing-filename") {
            None => out.extend_from_slice(b" (cannot determine actual path)"),
            Some(_) => {
                let full = get_str(d, "full-backing-filename");
                if c_str(full) != c_str(b) {
                    out.extend_from_slice(b" (actual path: ");
                    out.extend_from_slice(c_str(full));
                    out.push(b')');
                }
            }
        }
        out.push(b'\n');
        if d.get("backing-filename-format").is_some() {
            line(
                out,
                ind,
                &[
                    b"backing file format: ",
                    get_str(d, "backing-filename-format"),
                ],
            );
        }
    }
    if let Some(QValue::List(snaps)) = d.get("snapshots") {
        line(out, ind, &[b"Snapshot list:"]);
        pad(out, ind);
        out.extend_from_slice(snapshot_header(profile.snapshot_layout).as_bytes());
        out.push(b'\n');
        for s in snaps {
            if let QValue::Dict(s) = s {
                pad(out, ind);
                out.extend_from_slice(&snapshot_row(s, profile.snapshot_layout));
                out.push(b'\n');
            }
        }
    }
    if let Some(QValue::Dict(fs)) = d.get("format-specific") {
        let empty = !matches!(fs.get("data"), Some(QValue::Dict(data)) if !data.is_empty());
        if !(empty && profile.hide_empty_format_specific) {
            line(out, ind, &[b"Format specific information:"]);
            if let Some(data) = fs.get("data") {
                dump_human(out, level + 1, data);
            }
        }
    }
}

/// Title row of `Snapshot list:`.
pub fn snapshot_header(layout: SnapshotLayout) -> String {
    match layout {
        SnapshotLayout::V9 => format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        ),
        SnapshotLayout::Classic => format!(
            "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}",
            "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
        ),
        SnapshotLayout::Pre52 => format!(
            "{:<10}{:<20}{:>11}{:>20}{:>15}",
            "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK"
        ),
    }
}

/// C's `%-Ns` / `%Ns` over bytes (printf pads by bytes, not characters).
fn pad_bytes(out: &mut Vec<u8>, s: &[u8], width: usize, left: bool) {
    let fill = width.saturating_sub(s.len());
    if !left {
        pad(out, fill);
    }
    out.extend_from_slice(s);
    if left {
        pad(out, fill);
    }
}

/// Local time of `secs` as `%Y-%m-%d %H:%M:%S` (qemu uses localtime_r).
pub fn local_date(secs: u64) -> String {
    let Ok(t) = libc::time_t::try_from(secs) else {
        return String::new();
    };
    // SAFETY: `tm` is plain data that localtime_r fills; both pointers are
    // valid for the call; the result is checked before use.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return String::new();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// One row of `Snapshot list:` (qemu's `bdrv_snapshot_dump`).
pub fn snapshot_row(s: &QDict, layout: SnapshotLayout) -> Vec<u8> {
    // qemu copies id and name into fixed buffers (128 and 256 bytes).
    let id = get_str(s, "id");
    let id = &c_str(id)[..c_str(id).len().min(127)];
    let name = get_str(s, "name");
    let name = &c_str(name)[..c_str(name).len().min(255)];
    // Stored as QAPI `int`; qemu's size_to_str takes it back as uint64_t.
    let vm_state = match s.get("vm-state-size") {
        Some(QValue::Int(v)) => *v as u64,
        Some(QValue::UInt(v)) => *v,
        _ => 0,
    };
    let date = local_date(get_u64(s, "date-sec").unwrap_or(0));
    let clock_ns = get_u64(s, "vm-clock-sec")
        .unwrap_or(0)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(get_u64(s, "vm-clock-nsec").unwrap_or(0));
    // qemu rebuilds the clock into QEMUSnapshotInfo's uint64_t and prints
    // the parts cast to int (pinned by the corpus image snap-fields-max:
    // an all-ones clock prints 5124095:34:33.709).
    let ns = clock_ns;
    let secs = ns / 1_000_000_000;
    let (h, m, sec, ms) = (
        (secs / 3600) as i32,
        ((secs / 60) % 60) as i32,
        (secs % 60) as i32,
        ((ns / 1_000_000) % 1000) as i32,
    );
    let icount = get_u64(s, "icount");
    let size = size_to_str(vm_state);
    let mut out = Vec::new();
    match layout {
        SnapshotLayout::V9 => {
            let clock = format!("{h:04}:{m:02}:{sec:02}.{ms:03}");
            let ic = icount.map_or_else(|| "--".to_string(), |i| (i as i64).to_string());
            pad_bytes(&mut out, id, 7, true);
            out.push(b' ');
            pad_bytes(&mut out, name, 16, true);
            out.push(b' ');
            pad_bytes(&mut out, size.as_bytes(), 8, false);
            out.push(b' ');
            pad_bytes(&mut out, date.as_bytes(), 19, false);
            out.push(b' ');
            pad_bytes(&mut out, clock.as_bytes(), 15, false);
            out.push(b' ');
            pad_bytes(&mut out, ic.as_bytes(), 10, false);
        }
        SnapshotLayout::Pre52 => {
            let clock = format!("{h:02}:{m:02}:{sec:02}.{ms:03}");
            pad_bytes(&mut out, id, 10, true);
            pad_bytes(&mut out, name, 20, true);
            pad_bytes(&mut out, size.as_bytes(), 11, false);
            pad_bytes(&mut out, date.as_bytes(), 20, false);
            pad_bytes(&mut out, clock.as_bytes(), 15, false);
        }
        SnapshotLayout::Classic => {
            let clock = format!("{h:02}:{m:02}:{sec:02}.{ms:03}");
            let ic = icount.map_or_else(String::new, |i| (i as i64).to_string());
            pad_bytes(&mut out, id, 9, true);
            out.push(b' ');
            pad_bytes(&mut out, name, 16, true);
            out.push(b' ');
            pad_bytes(&mut out, size.as_bytes(), 8, false);
            pad_bytes(&mut out, date.as_bytes(), 20, false);
            pad_bytes(&mut out, clock.as_bytes(), 13, false);
            pad_bytes(&mut out, ic.as_bytes(), 11, false);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::QemuVersion;

    fn snap(
        id: &str,
        name: &str,
        date: u64,
        clock_sec: u64,
        clock_nsec: u64,
        icount: Option<u64>,
    ) -> QDict {
        let QValue::Dict(d) = snapshot_dict(
            &SnapshotInfo {
                id: id.into(),
                name: name.into(),
                vm_state_size: 0,
                date_sec: date,
                date_nsec: 0,
                vm_clock_sec: clock_sec,
                vm_clock_nsec: clock_nsec,
                icount,
            },
            true,
        ) else {
            unreachable!()
        };
        d
    }

    // tests/evidence/4.2.1/snapshot-list.stdout (TZ=UTC).
    #[test]
    fn snapshot_rows_pre52() {
        std::env::set_var("TZ", "UTC");
        assert_eq!(
            snapshot_header(SnapshotLayout::Pre52),
            "ID        TAG                     VM SIZE                DATE       VM CLOCK"
        );
        assert_eq!(
            String::from_utf8(snapshot_row(
                &snap("1", "snap1", 1795833081, 0, 0, None),
                SnapshotLayout::Pre52
            ))
            .unwrap(),
            "1         snap1                       0 B 2026-11-28 02:31:21   00:00:00.000"
        );
    }

    // Rows as qemu-img 10.0.2 printed them here with TZ=UTC for snapshots
    // made with `qemu-img snapshot -c` (date 1795831927).
    #[test]
    fn snapshot_rows_v9() {
        std::env::set_var("TZ", "UTC");
        assert_eq!(
            snapshot_header(SnapshotLayout::V9),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        assert_eq!(
            String::from_utf8(snapshot_row(
                &snap("1", "s1", 1795831927, 0, 0, Some(0)),
                SnapshotLayout::V9
            ))
            .unwrap(),
            "1       s1                    0 B 2026-11-28 02:12:07  0000:00:00.000          0"
        );
    }

    // tests/evidence/{6.2.0,7.2.22,8.2.2}/snapshot-list.stdout (TZ=UTC);
    // the clock and missing-icount cases follow qemu's format strings
    // (row "%-9s %-16s %8s%20s%13s%11s"), printed with printf(1).
    #[test]
    fn snapshot_rows_classic() {
        std::env::set_var("TZ", "UTC");
        assert_eq!(
            snapshot_header(SnapshotLayout::Classic),
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
        );
        assert_eq!(
            String::from_utf8(snapshot_row(
                &snap("2", "second-snapshot", 1795832177, 0, 0, Some(0)),
                SnapshotLayout::Classic
            ))
            .unwrap(),
            "2         second-snapshot       0 B 2026-11-28 02:16:17 00:00:00.000          0"
        );
        assert_eq!(
            String::from_utf8(snapshot_row(
                &snap("1", "s1", 1795831927, 3661, 5_000_000, None),
                SnapshotLayout::Classic
            ))
            .unwrap(),
            "1         s1                    0 B 2026-11-28 02:12:07 01:01:01.005           "
        );
    }

    #[test]
    fn raw_human_and_json() {
        let p = OutputProfile::for_version(QemuVersion::new(10, 0, 2), None);
        let info = ImageInfo {
            format: "raw".into(),
            virtual_size: 1024000,
            dirty_flag: Some(false),
            children: vec![instar_wire::ChildFile {
                name: "file".into(),
                file: 0,
                counts_in_disk_size: true,
            }],
            ..ImageInfo::default()
        };
        let files = [FileFacts {
            display_name: "raw.img".into(),
            length: 1023999,
            allocated: 4096,
            protocol: "file",
            extent_size_hint: None,
        }];
        let v = ImageView {
            filename: "raw.img",
            info: &info,
            files: &files,
            full_backing_filename: None,
        };
        let d = image_dict(&v, &p);
        // Captured from `qemu-img info raw.img` (qemu-img 10.0.2).
        assert_eq!(
            String::from_utf8(human_chain(std::slice::from_ref(&d), &p)).unwrap(),
            "image: raw.img\nfile format: raw\nvirtual size: 0.977 MiB (1024000 bytes)\ndisk size: 4 KiB\nChild node '/file':\n    filename: raw.img\n    protocol type: file\n    file length: 0.977 MiB (1024000 bytes)\n    disk size: 4 KiB\n"
        );
        assert_eq!(
            String::from_utf8(json_one(d)).unwrap(),
            "{\n    \"children\": [\n        {\n            \"name\": \"file\",\n            \"info\": {\n                \"children\": [\n                ],\n                \"virtual-size\": 1024000,\n                \"filename\": \"raw.img\",\n                \"format\": \"file\",\n                \"actual-size\": 4096,\n                \"format-specific\": {\n                    \"type\": \"file\",\n                    \"data\": {\n                    }\n                },\n                \"dirty-flag\": false\n            }\n        }\n    ],\n    \"virtual-size\": 1024000,\n    \"filename\": \"raw.img\",\n    \"format\": \"raw\",\n    \"actual-size\": 4096,\n    \"dirty-flag\": false\n}\n"
        );
    }
}
