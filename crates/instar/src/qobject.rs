//! A small ordered value tree standing in for qemu's QObject, and the two
//! ways qemu-img prints one: `qobject_to_json_pretty` (JSON output) and the
//! generic "Format specific information" dump of the human output.
//!
//! Dictionaries keep their members in insertion order (the QAPI member order,
//! base struct first); the printers reorder them the way a QDict iterates,
//! which is what makes the key order of qemu-img's JSON look arbitrary.

/// A QObject: the values the QAPI output visitor produces.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    /// QNum holding a signed value (`int`, `int64`, `size` printed signed).
    Int(i64),
    /// QNum holding an unsigned value (`uint64`, `size`).
    UInt(u64),
    /// QBool.
    Bool(bool),
    /// QString. Bytes, because qemu's strings are C strings of any bytes.
    Str(Vec<u8>),
    /// QList.
    List(Vec<QValue>),
    /// QDict, members in insertion order.
    Dict(QDict),
}

/// Members of a QDict in insertion order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QDict {
    entries: Vec<(String, QValue)>,
}

/// Number of hash buckets of qemu's QDict (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// qemu's QDict bucket of `key` (`tdb_hash` of the key, modulo the bucket
/// count). Computed over the key's bytes with wrapping 32-bit arithmetic.
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    // The length is a C `size_t` truncated into the u32 accumulator.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    let mut value: u32 = 0x238F_13AF_u32.wrapping_mul(len);
    for (i, &c) in bytes.iter().enumerate() {
        let shift = u32::try_from((i * 5) % 24).unwrap_or(0);
        value = value.wrapping_add(u32::from(c) << shift);
    }
    value = 1_103_515_243_u32.wrapping_mul(value).wrapping_add(12345);
    value % QDICT_BUCKETS
}

impl QDict {
    /// An empty dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert `key` (QAPI member order is insertion order). Replacing an
    /// existing key keeps its place, as `qdict_put` does.
    pub fn put(&mut self, key: &str, value: QValue) {
        if let Some(slot) = self.entries.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.entries.push((key.to_string(), value));
        }
    }

    /// Insert a string member.
    pub fn put_str(&mut self, key: &str, value: impl AsRef<[u8]>) {
        self.put(key, QValue::Str(value.as_ref().to_vec()));
    }

    /// Insert an unsigned member.
    pub fn put_uint(&mut self, key: &str, value: u64) {
        self.put(key, QValue::UInt(value));
    }

    /// Insert a signed member.
    pub fn put_int(&mut self, key: &str, value: i64) {
        self.put(key, QValue::Int(value));
    }

    /// Insert a bool member.
    pub fn put_bool(&mut self, key: &str, value: bool) {
        self.put(key, QValue::Bool(value));
    }

    /// True when the dict has no member.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Look a member up.
    pub fn get(&self, key: &str) -> Option<&QValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Members in the order a QDict iterates them: bucket by bucket, and
    /// inside a bucket the most recently inserted first (qemu puts new
    /// entries at the head of the bucket's list).
    pub fn iter_qdict_order(&self) -> impl Iterator<Item = (&str, &QValue)> {
        let mut order: Vec<(u32, usize)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (qdict_bucket(k), i))
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        order.into_iter().map(move |(_, i)| {
            let (k, v) = &self.entries[i];
            (k.as_str(), v)
        })
    }
}

/// `qobject_to_json_pretty(obj)` followed by the newline qemu-img prints.
pub fn to_json_pretty(value: &QValue) -> Vec<u8> {
    let mut out = Vec::new();
    write_json(&mut out, value, 0);
    out.push(b'\n');
    out
}

fn newline(out: &mut Vec<u8>, depth: usize) {
    out.push(b'\n');
    out.resize(out.len() + depth * 4, b' ');
}

fn write_json(out: &mut Vec<u8>, value: &QValue, depth: usize) {
    match value {
        QValue::Int(v) => out.extend_from_slice(v.to_string().as_bytes()),
        QValue::UInt(v) => out.extend_from_slice(v.to_string().as_bytes()),
        QValue::Bool(v) => out.extend_from_slice(if *v { b"true" } else { b"false" }),
        QValue::Str(s) => json_quoted(out, s),
        QValue::List(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                newline(out, depth + 1);
                write_json(out, item, depth + 1);
            }
            // An empty container still gets the newline before its closer.
            newline(out, depth);
            out.push(b']');
        }
        QValue::Dict(dict) => {
            out.push(b'{');
            for (i, (key, item)) in dict.iter_qdict_order().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                newline(out, depth + 1);
                json_quoted(out, key.as_bytes());
                out.extend_from_slice(b": ");
                write_json(out, item, depth + 1);
            }
            newline(out, depth);
            out.push(b'}');
        }
    }
}

/// The C string qemu would hold: everything up to the first NUL.
fn c_str(s: &[u8]) -> &[u8] {
    match s.iter().position(|&b| b == 0) {
        Some(end) => &s[..end],
        None => s,
    }
}

/// Decode one code point the way qemu's `mod_utf8_codepoint` does: returns
/// the code point (or `None` for anything invalid: stray or missing
/// continuation bytes, overlong forms except `C0 80`, surrogates,
/// noncharacters, values above U+10FFFF) and the number of bytes consumed.
fn mod_utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];
    let Some(&first) = s.first() else {
        return (None, 0);
    };
    let first = u32::from(first);
    if first < 0x80 {
        return (Some(first), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        return (None, 1);
    }
    let mut len = 0usize;
    let mut mask = 0x80u32;
    while first & mask != 0 {
        len += 1;
        mask >>= 1;
    }
    let mut cp = first & (mask - 1);
    let mut used = 1usize;
    for i in 1..len {
        let byte = s.get(i).copied().map(u32::from).unwrap_or(0);
        if byte & 0xC0 != 0x80 {
            return (None, used);
        }
        used += 1;
        cp = (cp << 6) | (byte & 0x3F);
    }
    let valid = if cp > 0x10_FFFF
        || (0xFDD0..=0xFDEF).contains(&cp)
        || cp & 0xFFFE == 0xFFFE
        || (0xD800..=0xDFFF).contains(&cp)
    {
        false
    } else {
        cp >= MIN_CP[len - 2] || (cp == 0 && len == 2)
    };
    (valid.then_some(cp), used)
}

/// A JSON string as qemu's JSON writer quotes it.
pub fn json_quoted(out: &mut Vec<u8>, s: &[u8]) {
    let mut s = c_str(s);
    out.push(b'"');
    while !s.is_empty() {
        let (cp, used) = mod_utf8_codepoint(s);
        s = &s[used.max(1)..];
        match cp {
            Some(0x22) => out.extend_from_slice(b"\\\""),
            Some(0x5C) => out.extend_from_slice(b"\\\\"),
            Some(0x08) => out.extend_from_slice(b"\\b"),
            Some(0x0C) => out.extend_from_slice(b"\\f"),
            Some(0x0A) => out.extend_from_slice(b"\\n"),
            Some(0x0D) => out.extend_from_slice(b"\\r"),
            Some(0x09) => out.extend_from_slice(b"\\t"),
            other => {
                let cp = other.unwrap_or(0xFFFD);
                if cp > 0xFFFF {
                    let v = cp - 0x1_0000;
                    let hi = 0xD800 | (v >> 10);
                    let lo = 0xDC00 | (v & 0x3FF);
                    out.extend_from_slice(format!("\\u{hi:04X}\\u{lo:04X}").as_bytes());
                } else if !(0x20..0x7F).contains(&cp) {
                    out.extend_from_slice(format!("\\u{cp:04X}").as_bytes());
                } else if let Ok(b) = u8::try_from(cp) {
                    out.push(b);
                }
            }
        }
    }
    out.push(b'"');
}

/// The human dump of a QObject (qemu's `dump_qobject`): dict keys with `-`
/// shown as spaces, scalars after `key: `, composites on deeper lines, list
/// items as `[i]:`. `level` counts 4-space steps.
pub fn dump_human(out: &mut Vec<u8>, level: usize, value: &QValue) {
    match value {
        QValue::Int(v) => out.extend_from_slice(format!("{v}\n").as_bytes()),
        QValue::UInt(v) => out.extend_from_slice(format!("{v}\n").as_bytes()),
        QValue::Bool(v) => out.extend_from_slice(if *v { b"true\n" } else { b"false\n" }),
        QValue::Str(s) => {
            out.extend_from_slice(c_str(s));
            out.push(b'\n');
        }
        QValue::Dict(dict) => {
            for (key, item) in dict.iter_qdict_order() {
                out.resize(out.len() + level * 4, b' ');
                out.extend(key.bytes().map(|b| if b == b'-' { b' ' } else { b }));
                out.push(b':');
                out.push(if is_composite(item) { b'\n' } else { b' ' });
                dump_human(out, level + 1, item);
            }
        }
        QValue::List(items) => {
            for (i, item) in items.iter().enumerate() {
                out.resize(out.len() + level * 4, b' ');
                out.extend_from_slice(format!("[{i}]:").as_bytes());
                out.push(if is_composite(item) { b'\n' } else { b' ' });
                dump_human(out, level + 1, item);
            }
        }
    }
}

fn is_composite(v: &QValue) -> bool {
    matches!(v, QValue::Dict(_) | QValue::List(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(keys: &[&str]) -> Vec<String> {
        let mut d = QDict::new();
        for k in keys {
            d.put_bool(k, true);
        }
        d.iter_qdict_order().map(|(k, _)| k.to_string()).collect()
    }

    // Insertion orders are QAPI member orders; expected orders are what
    // qemu-img 10.0.2 prints (captured here; also listed in the notes).
    #[test]
    fn image_info_order() {
        let got = order(&[
            "filename",
            "format",
            "dirty-flag",
            "actual-size",
            "virtual-size",
            "cluster-size",
            "encrypted",
            "compressed",
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
            "snapshots",
            "format-specific",
            "children",
            "backing-image",
        ]);
        let want = [
            "backing-image",
            "compressed",
            "children",
            "backing-filename-format",
            "snapshots",
            "virtual-size",
            "filename",
            "cluster-size",
            "format",
            "actual-size",
            "format-specific",
            "full-backing-filename",
            "encrypted",
            "backing-filename",
            "dirty-flag",
        ];
        assert_eq!(got, want);
        assert_eq!(qdict_bucket("children"), 206);
        assert_eq!(qdict_bucket("backing-filename-format"), 206);
    }

    #[test]
    fn qcow2_luks_snapshot_orders() {
        assert_eq!(
            order(&[
                "compat",
                "data-file",
                "data-file-raw",
                "extended-l2",
                "lazy-refcounts",
                "corrupt",
                "refcount-bits",
                "encrypt",
                "bitmaps",
                "compression-type"
            ]),
            [
                "compat",
                "compression-type",
                "lazy-refcounts",
                "bitmaps",
                "refcount-bits",
                "data-file",
                "encrypt",
                "data-file-raw",
                "corrupt",
                "extended-l2"
            ]
        );
        assert_eq!(
            order(&[
                "format",
                "cipher-alg",
                "cipher-mode",
                "ivgen-alg",
                "ivgen-hash-alg",
                "hash-alg",
                "detached-header",
                "payload-offset",
                "master-key-iters",
                "uuid",
                "slots"
            ]),
            [
                "ivgen-alg",
                "detached-header",
                "hash-alg",
                "cipher-alg",
                "uuid",
                "ivgen-hash-alg",
                "format",
                "cipher-mode",
                "slots",
                "payload-offset",
                "master-key-iters"
            ]
        );
        assert_eq!(
            order(&["active", "iters", "stripes", "key-offset"]),
            ["active", "iters", "key-offset", "stripes"]
        );
        assert_eq!(
            order(&[
                "id",
                "name",
                "vm-state-size",
                "date-sec",
                "date-nsec",
                "vm-clock-sec",
                "vm-clock-nsec",
                "icount"
            ]),
            [
                "icount",
                "vm-clock-nsec",
                "name",
                "date-sec",
                "date-nsec",
                "vm-clock-sec",
                "id",
                "vm-state-size"
            ]
        );
        assert_eq!(
            order(&["create-type", "cid", "parent-cid", "extents"]),
            ["cid", "parent-cid", "create-type", "extents"]
        );
        assert_eq!(
            order(&[
                "filename",
                "format",
                "virtual-size",
                "cluster-size",
                "compressed"
            ]),
            [
                "compressed",
                "virtual-size",
                "filename",
                "cluster-size",
                "format"
            ]
        );
        assert_eq!(order(&["name", "info"]), ["name", "info"]);
        assert_eq!(order(&["type", "data"]), ["type", "data"]);
        assert_eq!(
            order(&["name", "granularity", "flags"]),
            ["flags", "name", "granularity"]
        );
    }

    #[test]
    fn json_layout_and_empty_containers() {
        let mut data = QDict::new();
        data.put("children", QValue::List(vec![]));
        let mut fs = QDict::new();
        fs.put_str("type", "file");
        fs.put("data", QValue::Dict(QDict::new()));
        data.put("format-specific", QValue::Dict(fs));
        let text = String::from_utf8(to_json_pretty(&QValue::Dict(data))).unwrap();
        // Shape of a file child's info in qemu-img 10.0.2 output.
        assert_eq!(
            text,
            "{\n    \"children\": [\n    ],\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}\n"
        );
        let list = QValue::List(vec![QValue::Dict(QDict::new())]);
        assert_eq!(to_json_pretty(&list), b"[\n    {\n    }\n]\n");
    }

    #[test]
    fn json_escapes() {
        let mut out = Vec::new();
        json_quoted(&mut out, b"a\"b\\c\x08\x0c\n\r\t\x01\x7f");
        assert_eq!(out, b"\"a\\\"b\\\\c\\b\\f\\n\\r\\t\\u0001\\u007F\"");
        out.clear();
        json_quoted(&mut out, "é😀".as_bytes());
        assert_eq!(out, b"\"\\u00E9\\uD83D\\uDE00\"");
        out.clear();
        json_quoted(&mut out, b"x\xffy\xc3");
        assert_eq!(out, b"\"x\\uFFFDy\\uFFFD\"");
        out.clear();
        json_quoted(&mut out, b"ab\0cd");
        assert_eq!(out, b"\"ab\"");
    }
}
