//! qcow2: open-time parsing and validation as qemu 10 does it, and `info`.
//!
//! [`Qcow2Image::open`] reproduces the checks of qemu's `qcow2_do_open` for
//! a read-only, no-I/O open (what `qemu-img info` does): the same images are
//! refused, with the same messages, in the same order. The parsed
//! [`Qcow2Image`] is the starting point for check/map/convert, which walk
//! the L1/L2 and refcount tables from its header.

pub mod bitmap;
pub mod extensions;
pub mod header;
pub mod map;
pub mod read;
pub mod snapshot;
pub mod tables;

#[cfg(test)]
mod tests;

use crate::bytes::{be32, read_backing_name};
use crate::limits::MAX_BACKING_NAME;
use crate::luks::{LuksAlgorithms, LuksHeader};
use crate::{Files, Result};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use extensions::Extensions;
use header::*;
use instar_wire::{
    ChildFile, FileId, FormatSpecific, ImageError, ImageInfo, Qcow2Encrypt, Qcow2Info,
};

pub use bitmap::Bitmap;
pub use header::Qcow2Header;
pub use snapshot::Snapshot;

/// Encryption as the image declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// Not encrypted.
    None,
    /// Legacy AES-CBC.
    Aes,
    /// LUKS, with the header from the crypto-header extension area.
    Luks(Box<(LuksHeader, LuksAlgorithms)>),
}

/// A qcow2 image opened as `qemu-img info` opens it.
#[derive(Debug, Clone)]
pub struct Qcow2Image {
    /// The file holding the image.
    pub file: FileId,
    /// The header.
    pub header: Qcow2Header,
    /// Header extensions.
    pub extensions: Extensions,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Internal snapshots in table order.
    pub snapshots: Vec<Snapshot>,
    /// Persistent bitmaps (empty unless the bitmaps extension is valid).
    pub bitmaps: Vec<Bitmap>,
    /// Encryption.
    pub encryption: Encryption,
}

impl Qcow2Image {
    /// Parse and validate the image in `file`.
    pub fn open(files: &mut dyn Files, file: FileId) -> Result<Self> {
        let mut raw = [0u8; HEADER_SIZE];
        files.read_at(file, 0, &mut raw)?;
        let h = Qcow2Header::decode(&raw);
        h.check_basic(be32(&raw, 0))?;
        h.check_compression()?;
        let unknown = h.incompatible_features & !INCOMPAT_MASK;
        if unknown != 0 {
            let ext = extensions::read_lenient(files, file, &h);
            return Err(ImageError::open(extensions::unsupported_features_message(
                ext.feature_table.as_deref(),
                unknown,
            )));
        }
        h.check_tables()?;
        if h.crypt_method > CRYPT_LUKS {
            return Err(ImageError::open(format!(
                "Unsupported encryption method {}",
                h.crypt_method as i32
            )));
        }
        let mut ext = extensions::read(files, file, &h)?;
        let encryption = match h.crypt_method {
            CRYPT_AES => Encryption::Aes,
            CRYPT_LUKS => match ext.luks.take() {
                Some(l) => Encryption::Luks(Box::new(l)),
                None => {
                    return Err(ImageError::open(format!(
                        "Missing CRYPTO header for crypt method {CRYPT_LUKS}"
                    )))
                }
            },
            _ => Encryption::None,
        };
        let backing_file = if h.backing_file_offset != 0 {
            let len = h.backing_file_size as u64;
            // `backing_file_offset <= cluster_size` was checked.
            if len > MAX_BACKING_NAME.min(h.cluster_size() - h.backing_file_offset) {
                return Err(ImageError::open("Backing file name too long"));
            }
            read_backing_name(files, file, h.backing_file_offset, len)?
        } else {
            None
        };
        let snapshots = snapshot::read_table(files, file, &h)?;
        let bitmaps = match &ext.bitmaps {
            Some(b) => {
                let list = bitmap::read_directory(files, file, &h, b)?;
                bitmap::check_loadable(files, file, &h, &list)?;
                list
            }
            None => Vec::new(),
        };
        // The block layer refuses a length that overflows int64 once the
        // driver has opened (the L1 check above lets such sizes through
        // when qemu's size arithmetic wraps).
        if h.size / 512 > (i64::MAX as u64) / 512 {
            return Err(ImageError::open(
                "Could not refresh total sector count: File too large",
            ));
        }
        // The external data file is never opened: qemu-img info opens with
        // "no I/O", and since 9.1 (CVE-2024-4467) qcow2 then skips the data
        // file and all of its consistency checks.
        Ok(Self {
            file,
            header: h,
            extensions: ext,
            backing_file,
            snapshots,
            bitmaps,
            encryption,
        })
    }

    /// The external data file is in use (incompatible bit set).
    pub fn has_data_file(&self) -> bool {
        self.header.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// The `format-specific` section qemu prints.
    pub fn specific_info(&self) -> Qcow2Info {
        let h = &self.header;
        let encrypt = match &self.encryption {
            Encryption::None => None,
            Encryption::Aes => Some(Qcow2Encrypt::Aes),
            Encryption::Luks(l) => Some(Qcow2Encrypt::Luks(l.0.info(&l.1))),
        };
        let compression_type = if h.compression_type == COMPRESSION_ZSTD {
            "zstd"
        } else {
            "zlib"
        }
        .into();
        if h.version == 2 {
            return Qcow2Info {
                compat: "0.10".into(),
                refcount_bits: h.refcount_bits(),
                encrypt,
                compression_type,
                ..Default::default()
            };
        }
        let has_data_file = self.has_data_file();
        Qcow2Info {
            compat: "1.1".into(),
            data_file: self.extensions.data_file.clone(),
            data_file_raw: has_data_file
                .then_some(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0),
            extended_l2: Some(h.has_subclusters()),
            lazy_refcounts: Some(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
            corrupt: Some(h.incompatible_features & INCOMPAT_CORRUPT != 0),
            refcount_bits: h.refcount_bits(),
            encrypt,
            bitmaps: (!self.bitmaps.is_empty())
                .then(|| self.bitmaps.iter().map(Bitmap::info).collect()),
            compression_type,
        }
    }

    /// The whole `info` result.
    pub fn info(&self) -> ImageInfo {
        let h = &self.header;
        ImageInfo {
            format: "qcow2".into(),
            virtual_size: h.virtual_size(),
            cluster_size: Some(h.cluster_size()),
            encrypted: h.crypt_method != CRYPT_NONE,
            compressed: None,
            dirty_flag: Some(h.incompatible_features & INCOMPAT_DIRTY != 0),
            backing_filename: self.backing_file.clone(),
            // qemu only reports the format alongside a backing file.
            backing_filename_format: self
                .backing_file
                .as_ref()
                .and(self.extensions.backing_format.clone()),
            snapshots: self.snapshots.iter().map(Snapshot::info).collect(),
            format_specific: Some(FormatSpecific::Qcow2(self.specific_info())),
            children: vec![ChildFile {
                name: "file".into(),
                file: self.file,
                counts_in_disk_size: true,
            }],
            warnings: if self.extensions.stale_bitmaps {
                vec![
                    format!(
                        "warning: {}",
                        extensions::stale_bitmaps_warning(h.version)
                    ),
                    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
                        .into(),
                ]
            } else {
                Vec::new()
            },
        }
    }
}

/// qemu's qcow2 probe: magic and a version of at least 2.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= HEADER_SIZE && be32(buf, 0) == MAGIC && be32(buf, 4) >= 2 {
        100
    } else {
        0
    }
}

/// `info` of a qcow2 image.
pub fn info(files: &mut dyn Files, file: FileId, _filename: &str) -> Result<ImageInfo> {
    Ok(Qcow2Image::open(files, file)?.info())
}
