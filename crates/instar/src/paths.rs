//! File names the way qemu treats them: protocol prefixes and the
//! combination of a stored backing name with the name of the image that
//! stores it (qemu's `path_combine` / `bdrv_get_full_backing_filename`).

/// qemu's `path_has_protocol`: a `:` before any `/`.
pub fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// The protocol prefix of `name`, if any.
pub fn protocol(name: &str) -> Option<&str> {
    has_protocol(name).then(|| name.split(':').next().unwrap_or(""))
}

/// qemu's `path_combine(base, name)`: `name` if absolute, else `name`
/// appended to everything of `base` up to and including its last `/` (or
/// its protocol prefix).
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    let after_protocol = if has_protocol(base) {
        base.find(':').map_or(0, |i| i + 1)
    } else {
        0
    };
    let after_slash = base.rfind('/').map_or(0, |i| i + 1);
    let keep = after_protocol.max(after_slash);
    format!("{}{}", &base[..keep], name)
}

/// qemu's `full-backing-filename` of `backing` stored in image `image`.
/// `None` where qemu cannot determine it (relative name in a `json:` image).
pub fn full_backing_filename(image: &str, backing: &str) -> Option<String> {
    if backing.is_empty() {
        return None;
    }
    if has_protocol(backing) || backing.starts_with('/') {
        return Some(backing.to_string());
    }
    if image.is_empty() || image.starts_with("json:") {
        return None;
    }
    Some(path_combine(image, backing))
}

/// Protocols of qemu's block layer: names with these prefixes are not
/// plain files. instar serves plain files only and refuses them.
pub const QEMU_PROTOCOLS: &[&str] = &[
    "blkdebug",
    "blkverify",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "gluster+rdma",
    "gluster+tcp",
    "gluster+unix",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "json",
    "nbd",
    "nbd+tcp",
    "nbd+unix",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "rbd",
    "ssh",
    "vvfat",
];

#[cfg(test)]
mod tests {
    use super::*;

    // Pairs seen with qemu-img 10.0.2: `info sub/t.qcow2` whose backing is
    // `../base.qcow2` shows `(actual path: sub/../base.qcow2)`.
    #[test]
    fn combine() {
        assert_eq!(
            path_combine("sub/t.qcow2", "../base.qcow2"),
            "sub/../base.qcow2"
        );
        assert_eq!(path_combine("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(path_combine("/a/b/top", "/abs"), "/abs");
        assert_eq!(path_combine("file:x/y", "z"), "file:x/z");
        assert_eq!(path_combine("file:y", "z"), "file:z");
        assert_eq!(full_backing_filename("t", ""), None);
        assert_eq!(full_backing_filename("json:{}", "b"), None);
        assert_eq!(full_backing_filename("d/t", "nbd:x"), Some("nbd:x".into()));
    }

    #[test]
    fn protocols() {
        assert!(has_protocol("x:y"));
        assert!(!has_protocol("./a:b"));
        assert_eq!(protocol("json:{}"), Some("json"));
        assert_eq!(protocol("plain.img"), None);
    }
}
