//! Header extensions: the (magic, length, data) records between the header
//! and the end of the extension area, each padded to 8 bytes.

use super::header::{Qcow2Header, AUTOCLEAR_BITMAPS, CRYPT_LUKS};
use crate::bytes::{be32, be64, c_string, Cursor};
use crate::limits::*;
use crate::luks::{self, LuksAlgorithms, LuksHeader};
use crate::{Files, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};

/// End of the extension list.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Full disk encryption (LUKS) header location.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// Persistent bitmaps directory.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (up to 46 bytes).
    pub name: String,
}

/// Location of the LUKS header inside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoHeaderExt {
    /// Byte offset (cluster aligned).
    pub offset: u64,
    /// Length of the area.
    pub length: u64,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory offset (cluster aligned).
    pub directory_offset: u64,
}

/// An extension qemu does not know; kept so a rewriter can preserve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExt {
    /// Magic.
    pub magic: u32,
    /// Offset of the data.
    pub offset: u64,
    /// Data length.
    pub len: u32,
}

/// Everything the extension area told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format (`qcow2`, `raw`...).
    pub backing_format: Option<String>,
    /// The feature name table, if present.
    pub feature_table: Option<Vec<FeatureName>>,
    /// Crypto header location (LUKS images).
    pub crypto_header: Option<CryptoHeaderExt>,
    /// Bitmaps directory (only when the autoclear bit vouches for it).
    pub bitmaps: Option<BitmapsExt>,
    /// The bitmaps extension was present but its autoclear bit was clear:
    /// qemu warns and ignores it.
    pub stale_bitmaps: bool,
    /// External data file name as stored.
    pub data_file: Option<String>,
    /// The LUKS header the crypto extension points at, validated.
    pub luks: Option<(LuksHeader, LuksAlgorithms)>,
    /// Extensions qemu does not interpret.
    pub unknown: Vec<UnknownExt>,
}

/// Read the extension list from `h.header_length` to the end of the
/// extension area, with qemu's checks and messages.
pub fn read(files: &mut dyn Files, file: FileId, h: &Qcow2Header) -> Result<Extensions> {
    let mut ext = Extensions::default();
    walk(files, file, h, &mut ext, true)?;
    Ok(ext)
}

/// The walk qemu makes only to name unknown incompatible features: errors
/// end it silently, keeping what was read so far.
pub fn read_lenient(files: &mut dyn Files, file: FileId, h: &Qcow2Header) -> Extensions {
    let mut ext = Extensions::default();
    let _ = walk(files, file, h, &mut ext, false);
    ext
}

fn walk(
    files: &mut dyn Files,
    file: FileId,
    h: &Qcow2Header,
    ext: &mut Extensions,
    open_crypto: bool,
) -> Result<()> {
    let mut cur = Cursor::new(files, file);
    let end = h.extensions_end();
    let cluster = h.cluster_size();
    let mut offset = h.header_length as u64;
    while offset < end {
        let mut head = [0u8; 8];
        cur.read(offset, &mut head)?;
        let magic = be32(&head, 0);
        let len = be32(&head, 4);
        offset += 8;
        if offset > end || len as u64 > end - offset {
            return Err(ImageError::open("Header extension too large"));
        }
        // `offset + len <= end <= cluster 0 (2 MiB)`: every read below is
        // bounded by the extension area.
        match magic {
            EXT_END => return Ok(()),
            EXT_BACKING_FORMAT => {
                if len >= QCOW2_BACKING_FORMAT_BUF {
                    return Err(ImageError::open(format!(
                        "ERROR: ext_backing_format: len={len} too large (>={QCOW2_BACKING_FORMAT_BUF})"
                    )));
                }
                let data = cur.read_vec(
                    offset,
                    len as u64,
                    QCOW2_MAX_EXTENSION_BYTES,
                    "backing format",
                )?;
                ext.backing_format = Some(c_string(&data));
            }
            EXT_FEATURE_TABLE => {
                let data = cur.read_vec(
                    offset,
                    len as u64,
                    QCOW2_MAX_EXTENSION_BYTES,
                    "feature table",
                )?;
                // qemu walks 48-byte entries until one with an empty name;
                // a partial trailing entry reads as zero-padded.
                let mut table = Vec::new();
                for chunk in data.chunks(48) {
                    let mut e = [0u8; 48];
                    e[..chunk.len()].copy_from_slice(chunk);
                    if e[2] == 0 {
                        break;
                    }
                    table.push(FeatureName {
                        kind: e[0],
                        bit: e[1],
                        name: c_string(&e[2..48]),
                    });
                }
                ext.feature_table = Some(table);
            }
            EXT_CRYPTO_HEADER => {
                if h.crypt_method != CRYPT_LUKS {
                    return Err(ImageError::open(
                        "CRYPTO header extension only expected with LUKS encryption method",
                    ));
                }
                if len != 16 {
                    return Err(ImageError::open(format!(
                        "CRYPTO header extension size {len}, but expected size 16"
                    )));
                }
                let mut d = [0u8; 16];
                cur.read(offset, &mut d)?;
                let c = CryptoHeaderExt {
                    offset: be64(&d, 0),
                    length: be64(&d, 8),
                };
                if !c.offset.is_multiple_of(cluster) {
                    return Err(ImageError::open(format!(
                        "Encryption header offset '{}' is not a multiple of cluster size '{cluster}'",
                        c.offset
                    )));
                }
                ext.crypto_header = Some(c);
                if open_crypto {
                    // qemu opens the LUKS header right here, so its errors
                    // come before those of later extensions.
                    ext.luks = Some(luks::read_header_with(&mut cur, c.offset, Some(c.length))?);
                }
            }
            EXT_BITMAPS => {
                if len != 24 {
                    return Err(ImageError::open("bitmaps_ext: Invalid extension length"));
                }
                if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
                    ext.stale_bitmaps = true;
                } else {
                    let mut d = [0u8; 24];
                    cur.read(offset, &mut d)?;
                    if be32(&d, 4) != 0 {
                        return Err(ImageError::open("bitmaps_ext: Reserved field is not zero"));
                    }
                    let b = BitmapsExt {
                        nb_bitmaps: be32(&d, 0),
                        directory_size: be64(&d, 8),
                        directory_offset: be64(&d, 16),
                    };
                    if b.nb_bitmaps > QCOW2_MAX_BITMAPS {
                        return Err(ImageError::open(format!(
                            "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {QCOW2_MAX_BITMAPS}",
                            b.nb_bitmaps
                        )));
                    }
                    if b.nb_bitmaps == 0 {
                        return Err(ImageError::open(
                            "found bitmaps extension with zero bitmaps",
                        ));
                    }
                    if !b.directory_offset.is_multiple_of(cluster) {
                        return Err(ImageError::open(
                            "bitmaps_ext: invalid bitmap directory offset",
                        ));
                    }
                    if b.directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
                        return Err(ImageError::open(format!(
                            "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({QCOW2_MAX_BITMAP_DIRECTORY_SIZE})",
                            b.directory_size
                        )));
                    }
                    ext.bitmaps = Some(b);
                }
            }
            EXT_DATA_FILE => {
                let data = cur.read_vec(
                    offset,
                    len as u64,
                    QCOW2_MAX_EXTENSION_BYTES,
                    "data file name",
                )?;
                ext.data_file = Some(c_string(&data));
            }
            _ => ext.unknown.push(UnknownExt { magic, offset, len }),
        }
        offset += (len as u64 + 7) & !7;
    }
    Ok(())
}

/// qemu's "Unsupported qcow2 feature(s): ..." text for the unknown
/// incompatible bits in `mask`, naming them from the feature table.
pub fn unsupported_features_message(table: Option<&[FeatureName]>, mut mask: u64) -> String {
    let mut names: Vec<String> = Vec::new();
    for f in table.unwrap_or(&[]) {
        // qemu shifts by the stored bit number; x86 takes it modulo 64.
        let bit = 1u64 << (f.bit & 63);
        if f.kind == 0 && mask & bit != 0 {
            let name: String = f.name.chars().take(46).collect();
            names.push(name);
            mask &= !bit;
        }
    }
    if mask != 0 {
        names.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    format!("Unsupported qcow2 feature(s): {}", names.join(", "))
}

/// What qemu-img writes to stderr (after `qemu-img: warning: `) when the
/// bitmaps extension is present but its autoclear bit is clear
/// ([`Extensions::stale_bitmaps`]); `info` still succeeds. qemu follows it
/// with `Some clusters may be leaked, run 'qemu-img check -r' on the image
/// file to fix.` and no newline.
pub fn stale_bitmaps_warning(version: u32) -> &'static str {
    if version < 3 {
        "This qcow2 v2 image contains bitmaps, but they may have been modified by a program \
         without persistent bitmap support; so now they must all be considered inconsistent"
    } else {
        "a program lacking bitmap support modified this file, so all bitmaps are now \
         considered inconsistent"
    }
}
