//! Reading qcow2 compressed clusters: qemu's `qcow2_co_preadv_compressed`
//! with `qcow2_zlib_decompress` (raw deflate) and `qcow2_zstd_decompress`.
//!
//! A compressed L2 entry names a host byte range (offset and a count of
//! 512-byte sectors, the first one partial); its decompressed form must be
//! exactly one cluster. Anything else (corrupt stream, short or long
//! output) is qemu's -EIO, never a panic. Memory: one cluster of output
//! and at most one cluster plus a sector of input, reused.

use super::header::COMPRESSION_ZSTD;
use crate::{Files, Result};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::{FileId, ImageError};
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// The error qemu's read path gives for any bad compressed cluster (the
/// caller words it for its operation).
fn eio() -> ImageError {
    ImageError::operation("Input/output error")
}

/// The host range of a compressed L2 entry: qemu's
/// `qcow2_parse_compressed_l2_entry`.
pub fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let csize_shift = 62 - (cluster_bits - 8);
    let csize_mask = (1u64 << (cluster_bits - 8)) - 1;
    let offset_mask = (1u64 << csize_shift) - 1;
    let coffset = entry & offset_mask;
    let nb_csectors = ((entry >> csize_shift) & csize_mask) + 1;
    let csize = nb_csectors * 512 - (coffset & 511);
    (coffset, csize)
}

/// Reusable state for decompressing clusters of one image.
pub struct Decompressor {
    inflate: Box<DecompressorOxide>,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Host offset of the cluster now in `output`, if it is whole.
    cached: Option<u64>,
}

impl Decompressor {
    /// State for clusters of `cluster_size` bytes.
    pub fn new(cluster_size: u64) -> Self {
        Self {
            inflate: Box::default(),
            input: Vec::new(),
            output: vec![0; cluster_size as usize],
            cached: None,
        }
    }

    /// The decompressed cluster of L2 entry `entry` (compressed, of an
    /// image in `file` with `cluster_bits` and header `compression_type`).
    pub fn cluster(
        &mut self,
        files: &mut dyn Files,
        file: FileId,
        entry: u64,
        cluster_bits: u32,
        compression_type: u8,
    ) -> Result<&[u8]> {
        let (coffset, csize) = compressed_range(entry, cluster_bits);
        if self.cached == Some(entry) {
            return Ok(&self.output);
        }
        self.cached = None;
        // csize is at most 2^(cluster_bits - 8) sectors, i.e. 2 * cluster
        // size: bounded by the format, not by the image.
        self.input.resize(csize as usize, 0);
        files.read_at(file, coffset, &mut self.input)?;
        let ok = if compression_type == COMPRESSION_ZSTD {
            zstd(&self.input, &mut self.output)
        } else {
            zlib(&mut self.inflate, &self.input, &mut self.output)
        };
        if !ok {
            return Err(eio());
        }
        self.cached = Some(entry);
        Ok(&self.output)
    }
}

/// qemu's `qcow2_zlib_decompress`: raw deflate (window bits -12) with
/// Z_FINISH; it succeeds when the output is filled, even if the input is
/// not used up (it is sector-padded).
fn zlib(state: &mut DecompressorOxide, input: &[u8], out: &mut [u8]) -> bool {
    state.init();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(state, input, out, 0, flags);
    written == out.len()
        && !matches!(
            status,
            TINFLStatus::Failed | TINFLStatus::BadParam | TINFLStatus::Adler32Mismatch
        )
}

/// qemu's `qcow2_zstd_decompress`: frames are decoded until the output is
/// full; the frame must end exactly there (more data is corruption), and
/// a stream that stops short is too. Trailing input (sector padding) is
/// ignored.
fn zstd(input: &[u8], out: &mut [u8]) -> bool {
    use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
    use ruzstd::io::Read;
    let mut decoder = FrameDecoder::new();
    let mut source = input;
    let mut filled = 0usize;
    while filled < out.len() {
        if decoder.init(&mut source).is_err() {
            return false;
        }
        loop {
            // One block (at most 128 KiB) at a time so a frame that
            // decompresses to more than the cluster never grows the
            // decoder's buffer much past it.
            let room = (out.len() - filled) as u64;
            if decoder
                .decode_blocks(
                    &mut source,
                    BlockDecodingStrategy::UptoBytes(room.max(1) as usize),
                )
                .is_err()
            {
                return false;
            }
            if decoder.can_collect() > out.len() - filled {
                return false;
            }
            match decoder.read(&mut out[filled..]) {
                Ok(n) => filled += n,
                Err(_) => return false,
            }
            if decoder.is_finished() && decoder.can_collect() == 0 {
                break;
            }
            if filled == out.len() {
                // Output full but the frame goes on.
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;

    #[test]
    fn range_of_an_entry() {
        // 64 KiB clusters: csize_shift = 54; 3 sectors at 0x10200.
        let entry = (1u64 << 62) | (2u64 << 54) | 0x10200;
        assert_eq!(compressed_range(entry & !(1 << 62), 16), (0x10200, 3 * 512));
        // An unaligned start shortens the first sector.
        assert_eq!(
            compressed_range((2u64 << 54) | 0x10210, 16).1,
            3 * 512 - 0x10
        );
    }

    #[test]
    fn zlib_round_trip_and_corruption() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut image = vec![0u8; 4096];
        image.extend_from_slice(&packed);
        // Sector padding after the stream, as qemu stores it.
        image.resize(image.len().div_ceil(512) * 512, 0);
        let sectors = (packed.len() as u64).div_ceil(512);
        let entry = ((sectors - 1) << 54) | 4096;
        let mut files = MemFiles::new(image.clone());
        let mut d = Decompressor::new(65536);
        assert_eq!(d.cluster(&mut files, 0, entry, 16, 0).unwrap(), &data[..]);
        // A damaged stream is an error, not a panic.
        let mut bad = image;
        for b in &mut bad[4096 + 10..4096 + 60] {
            *b ^= 0x5a;
        }
        let mut files = MemFiles::new(bad);
        let mut d = Decompressor::new(65536);
        assert!(d.cluster(&mut files, 0, entry, 16, 0).is_err());
        // A cluster size the stream does not fill is an error too.
        let mut d = Decompressor::new(1 << 17);
        let mut files = MemFiles::new(vec![0u8; 8192]);
        assert!(d.cluster(&mut files, 0, entry, 17, 0).is_err());
    }

    #[test]
    fn zstd_round_trip_and_bounds() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 13 % 253) as u8).collect();
        let packed = ruzstd::encoding::compress_to_vec(
            &data[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut image = vec![0u8; 4096];
        image.extend_from_slice(&packed);
        image.resize(image.len().next_multiple_of(512) + 512, 0);
        let sectors = (packed.len() as u64).div_ceil(512);
        let entry = ((sectors - 1) << 54) | 4096;
        let mut files = MemFiles::new(image);
        let mut d = Decompressor::new(65536);
        assert_eq!(
            d.cluster(&mut files, 0, entry, 16, COMPRESSION_ZSTD)
                .unwrap(),
            &data[..]
        );
        // A frame holding more than one cluster is corruption: 32 KiB
        // clusters (csize_shift 55) over the same stream.
        let entry = ((sectors - 1) << 55) | 4096;
        let mut d = Decompressor::new(32768);
        assert!(d
            .cluster(&mut files, 0, entry, 15, COMPRESSION_ZSTD)
            .is_err());
    }

    #[test]
    fn zstd_garbage_is_an_error() {
        let mut files = MemFiles::new(vec![0x28u8; 8192]);
        let mut d = Decompressor::new(65536);
        assert!(d
            .cluster(&mut files, 0, (1u64 << 54) | 512, 16, COMPRESSION_ZSTD)
            .is_err());
    }
}
