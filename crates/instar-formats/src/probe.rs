//! Format probing and the driver table.
//!
//! qemu probes by asking every format driver to score the first 2048 bytes
//! (`bdrv_probe_all`); the highest score wins, and on a tie the driver met
//! first in qemu's driver list wins (the comparison is strict). qemu's list
//! is in reverse registration order; the magic-based probes never tie in
//! practice, so [`DRIVERS`] lists formats in qemu-img's help order, with
//! two pinned exceptions: raw (score 1) loses every tie, and dmg comes before
//! cloop (both score 2 for a cloop image named `*.dmg`, and qemu-img 10.0.2
//! reports dmg).

use crate::{Driver, Files, Result, PROBE_BUF_SIZE};
use alloc::format;
use instar_wire::{FileId, ImageError, ImageInfo};

/// Every format driver instar has, by qemu name. Raw comes last so that
/// its score of 1 loses every tie.
pub static DRIVERS: &[Driver] = &[
    Driver {
        name: "qcow2",
        probe: Some(crate::qcow2::probe),
        info: crate::qcow2::info,
    },
    Driver {
        name: "qcow",
        probe: Some(crate::qcow::probe),
        info: crate::qcow::info,
    },
    Driver {
        name: "qed",
        probe: Some(crate::qed::probe),
        info: crate::qed::info,
    },
    Driver {
        name: "vmdk",
        probe: Some(crate::vmdk::probe),
        info: crate::vmdk::info,
    },
    Driver {
        name: "vpc",
        probe: Some(crate::vpc::probe),
        info: crate::vpc::info,
    },
    Driver {
        name: "vhdx",
        probe: Some(crate::vhdx::probe),
        info: crate::vhdx::info,
    },
    Driver {
        name: "vdi",
        probe: Some(crate::vdi::probe),
        info: crate::vdi::info,
    },
    Driver {
        name: "parallels",
        probe: Some(crate::parallels::probe),
        info: crate::parallels::info,
    },
    Driver {
        name: "luks",
        probe: Some(crate::luks::probe),
        info: crate::luks::info,
    },
    Driver {
        name: "bochs",
        probe: Some(crate::bochs::probe),
        info: crate::bochs::info,
    },
    Driver {
        name: "dmg",
        probe: Some(crate::dmg::probe),
        info: crate::dmg::info,
    },
    Driver {
        name: "cloop",
        probe: Some(crate::cloop::probe),
        info: crate::cloop::info,
    },
    Driver {
        name: "raw",
        probe: Some(crate::raw::probe),
        info: crate::raw::info,
    },
];

/// The driver qemu calls `name` (`-f name`).
pub fn find(name: &str) -> Option<&'static Driver> {
    DRIVERS.iter().find(|d| d.name == name)
}

/// `-f name` as qemu resolves it: unknown names are an open error.
pub fn find_or_err(name: &str) -> Result<&'static Driver> {
    find(name).ok_or_else(|| ImageError::open(format!("Unknown driver '{name}'")))
}

/// Score `buf` (the first bytes of the file, zero-padded to
/// [`PROBE_BUF_SIZE`]) with every driver; highest score wins, ties go to the
/// earlier driver.
pub fn probe_buf(buf: &[u8], filename: &str) -> Option<&'static Driver> {
    let mut best: Option<(&'static Driver, u32)> = None;
    for d in DRIVERS {
        let Some(probe) = d.probe else { continue };
        let score = probe(buf, filename);
        if score > best.map_or(0, |(_, s)| s) {
            best = Some((d, score));
        }
    }
    best.map(|(d, _)| d)
}

/// Probe `file` as `qemu-img` does without `-f`. An empty file is raw
/// without probing (qemu's shortcut for zero-length images).
pub fn probe(files: &mut dyn Files, file: FileId, filename: &str) -> Result<&'static Driver> {
    let len = files.len(file)?;
    if len > 0 {
        let mut buf = [0u8; PROBE_BUF_SIZE];
        // Past EOF reads as zeros, as qemu's file driver does.
        files.read_at(file, 0, &mut buf)?;
        if let Some(d) = probe_buf(&buf, filename) {
            return Ok(d);
        }
    }
    find("raw").ok_or_else(|| {
        ImageError::open("Could not determine image format: No compatible driver found")
    })
}

/// Take `-f` or probe, then describe the image with that driver.
pub fn info(
    files: &mut dyn Files,
    file: FileId,
    format: Option<&str>,
    filename: &str,
) -> Result<ImageInfo> {
    let driver = match format {
        Some(name) => find_or_err(name)?,
        None => probe(files, file, filename)?,
    };
    (driver.info)(files, file, filename)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;

    #[test]
    fn unknown_driver_message() {
        // qemu-img 10.0.2: `qemu-img info -f foo x` ->
        // "qemu-img: Could not open 'x': Unknown driver 'foo'"
        let mut f = MemFiles::new(alloc::vec![0u8; 10]);
        assert_eq!(
            info(&mut f, 0, Some("foo"), "x").unwrap_err().message,
            "Unknown driver 'foo'"
        );
    }

    #[test]
    fn probes_by_magic() {
        let mut b = [0u8; PROBE_BUF_SIZE];
        b[..8].copy_from_slice(&[0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
        assert_eq!(probe_buf(&b, "x").map(|d| d.name), Some("qcow2"));
        b[7] = 1;
        assert_eq!(probe_buf(&b, "x").map(|d| d.name), Some("qcow"));
        b[..4].copy_from_slice(b"QED\0");
        assert_eq!(probe_buf(&b, "x").map(|d| d.name), Some("qed"));
        b[..8].copy_from_slice(b"LUKS\xba\xbe\0\x01");
        assert_eq!(probe_buf(&b, "x").map(|d| d.name), Some("luks"));
    }
}
