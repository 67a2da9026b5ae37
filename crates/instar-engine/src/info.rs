//! `info`: probe or take the named format, then let its driver describe it.

use instar_formats::{probe, Files, ImageInfo, Result};
use instar_wire::ROOT_FILE;

/// Describe the image in [`instar_wire::ROOT_FILE`]: `-f` names the driver,
/// or the file is probed as qemu-img probes it. The driver's result is
/// complete, children included.
pub fn info(files: &mut dyn Files, format: Option<&str>, filename: &str) -> Result<ImageInfo> {
    probe::info(files, ROOT_FILE, format, filename)
}
