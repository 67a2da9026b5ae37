//! `info`: probe or take the named format, then let its driver describe it.

use instar_formats::{Files, ImageInfo, Result};

/// Describe the image in [`instar_wire::ROOT_FILE`].
pub fn info(files: &mut dyn Files, format: Option<&str>, filename: &str) -> Result<ImageInfo> {
    let _ = (files, format, filename);
    Err(instar_wire::ImageError::operation("info: not yet implemented"))
}
