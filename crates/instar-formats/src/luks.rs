//! LUKS1 headers: the raw `luks` driver, and the shared parser qcow2 uses
//! for the header stored in its crypto-header extension.
//!
//! `info` never needs the key: qemu opens with "no I/O", which loads and
//! validates the header but unlocks no key slot. So this module only
//! validates the 592-byte header the way qemu does and reports it.

use crate::block::single_child;
use crate::bytes::{be16, be32, c_string, Cursor};
use crate::limits::LUKS_HEADER_SIZE;
use crate::{Files, Result};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
#[cfg(test)]
use alloc::vec::Vec;
use instar_wire::{FileId, FormatSpecific, ImageError, ImageInfo, LuksInfo, LuksSlot};

/// The LUKS magic, `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only version qemu reads.
pub const VERSION: u16 = 1;
/// Key slots in a LUKS1 header.
pub const NUM_KEY_SLOTS: usize = 8;
/// The anti-forensic stripe count every slot must use.
pub const STRIPES: u32 = 4000;
/// `active` value of an enabled slot.
pub const KEY_SLOT_ENABLED: u32 = 0x00AC_71F3;
/// `active` value of a disabled slot.
pub const KEY_SLOT_DISABLED: u32 = 0x0000_DEAD;
/// LUKS sectors are 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Key material starts at 4096 bytes: 8 sectors of header.
const KEY_SLOT_OFFSET_SECTORS: u32 = 4096 / 512;

/// One key slot as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    /// [`KEY_SLOT_ENABLED`] or [`KEY_SLOT_DISABLED`].
    pub active: u32,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// Start of key material, in 512-byte sectors.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A LUKS1 header (the fields qemu reads; digests and salts are skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Format version (1).
    pub version: u16,
    /// e.g. `aes`.
    pub cipher_name: String,
    /// e.g. `xts-plain64`.
    pub cipher_mode: String,
    /// e.g. `sha256`.
    pub hash_spec: String,
    /// Start of the encrypted payload, in sectors.
    pub payload_offset_sector: u32,
    /// Master key length in bytes.
    pub master_key_len: u32,
    /// Master key digest iterations.
    pub master_key_iterations: u32,
    /// Volume UUID as text.
    pub uuid: String,
    /// The key slots.
    pub key_slots: [KeySlot; NUM_KEY_SLOTS],
}

/// What qemu derives from a LUKS header's algorithm strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksAlgorithms {
    /// qemu's cipher algorithm name (`aes-256`).
    pub cipher_alg: &'static str,
    /// Cipher mode (`xts`).
    pub cipher_mode: &'static str,
    /// IV generator (`plain64`).
    pub ivgen_alg: &'static str,
    /// IV generator hash (ESSIV only).
    pub ivgen_hash_alg: Option<&'static str>,
    /// PBKDF hash (`sha256`).
    pub hash_alg: &'static str,
}

// Lookup tables in qemu's QAPI enum spelling. Their order does not matter:
// only names are compared.
const CIPHER_MODES: &[&str] = &["ecb", "cbc", "xts", "ctr"];
const IVGENS: &[&str] = &["plain", "plain64", "essiv"];
/// Hash names and digest lengths (for ESSIV key sizing).
const HASHES: &[(&str, u32)] = &[
    ("md5", 16),
    ("sha1", 20),
    ("sha224", 28),
    ("sha256", 32),
    ("sha384", 48),
    ("sha512", 64),
    ("ripemd160", 20),
    ("sm3", 32),
];
/// LUKS cipher name -> (key bytes, qemu algorithm) as the qemu build here
/// maps them (no sm4: `qemu-img create -o cipher-alg=sm4` is refused).
const CIPHERS: &[(&str, &[(u32, &str)])] = &[
    ("aes", &[(16, "aes-128"), (24, "aes-192"), (32, "aes-256")]),
    ("cast5", &[(16, "cast5-128")]),
    (
        "serpent",
        &[
            (16, "serpent-128"),
            (24, "serpent-192"),
            (32, "serpent-256"),
        ],
    ),
    (
        "twofish",
        &[
            (16, "twofish-128"),
            (24, "twofish-192"),
            (32, "twofish-256"),
        ],
    ),
];

fn lookup(table: &[&'static str], name: &str, kind: &str) -> Result<&'static str> {
    table
        .iter()
        .find(|n| **n == name)
        .copied()
        .ok_or_else(|| ImageError::open(format!("{kind} '{name}' not supported")))
}

fn hash_lookup(name: &str) -> Result<(&'static str, u32)> {
    HASHES
        .iter()
        .find(|(n, _)| *n == name)
        .copied()
        .ok_or_else(|| ImageError::open(format!("Hash algorithm '{name}' not supported")))
}

fn key_len(alg: &str) -> u32 {
    CIPHERS
        .iter()
        .flat_map(|(_, sizes)| sizes.iter())
        .find(|(_, a)| *a == alg)
        .map_or(0, |(k, _)| *k)
}

/// The ESSIV cipher must take the hash digest as its key; qemu picks a
/// sibling key size of the same family or refuses.
fn essiv_check(cipher: &'static str, digest_len: u32) -> Result<()> {
    if key_len(cipher) == digest_len {
        return Ok(());
    }
    let family = cipher.split('-').next().unwrap_or("");
    let label = match family {
        "aes" => "AES",
        "serpent" => "Serpent",
        "twofish" => "Twofish",
        _ => {
            return Err(ImageError::open(format!(
                "Cipher {cipher} not supported with essiv"
            )))
        }
    };
    if matches!(digest_len, 16 | 24 | 32) {
        Ok(())
    } else {
        Err(ImageError::open(format!(
            "No {label} cipher with key size {digest_len} available"
        )))
    }
}

impl LuksHeader {
    /// Decode the 592 header bytes. Checks nothing: see [`Self::check`].
    pub fn decode(buf: &[u8]) -> Self {
        let mut key_slots = [KeySlot {
            active: 0,
            iterations: 0,
            key_offset_sector: 0,
            stripes: 0,
        }; NUM_KEY_SLOTS];
        for (i, slot) in key_slots.iter_mut().enumerate() {
            let base = 208 + 48 * i;
            *slot = KeySlot {
                active: be32(buf, base),
                iterations: be32(buf, base + 4),
                key_offset_sector: be32(buf, base + 40),
                stripes: be32(buf, base + 44),
            };
        }
        Self {
            version: be16(buf, 6),
            cipher_name: c_string(buf.get(8..40).unwrap_or(&[])),
            cipher_mode: c_string(buf.get(40..72).unwrap_or(&[])),
            hash_spec: c_string(buf.get(72..104).unwrap_or(&[])),
            payload_offset_sector: be32(buf, 104),
            master_key_len: be32(buf, 108),
            master_key_iterations: be32(buf, 164),
            uuid: c_string(buf.get(168..208).unwrap_or(&[])),
            key_slots,
        }
    }

    /// Parse and validate as qemu's LUKS open does (header checks, then the
    /// algorithm names), giving qemu's messages.
    pub fn parse(buf: &[u8]) -> Result<(Self, LuksAlgorithms)> {
        if buf.get(0..6) != Some(&MAGIC[..]) {
            return Err(ImageError::open("Volume is not in LUKS format"));
        }
        let hdr = Self::decode(buf);
        hdr.check(buf)?;
        let algs = hdr.algorithms()?;
        Ok((hdr, algs))
    }

    fn check(&self, raw: &[u8]) -> Result<()> {
        if self.version != VERSION {
            return Err(ImageError::open(format!(
                "LUKS version {} is not supported",
                self.version
            )));
        }
        let nul_in = |r: core::ops::Range<usize>| raw.get(r).is_some_and(|s| s.contains(&0));
        if !nul_in(8..40) {
            return Err(ImageError::open(
                "LUKS header cipher name is not NUL terminated",
            ));
        }
        if !nul_in(40..72) {
            return Err(ImageError::open(
                "LUKS header cipher mode is not NUL terminated",
            ));
        }
        if !nul_in(72..104) {
            return Err(ImageError::open(
                "LUKS header hash spec is not NUL terminated",
            ));
        }
        // qemu opens without the "detached" flag: the payload must follow
        // the header.
        if self.payload_offset_sector < KEY_SLOT_OFFSET_SECTORS {
            return Err(ImageError::open(
                "LUKS payload is overlapping with the header",
            ));
        }
        if self.master_key_iterations == 0 {
            return Err(ImageError::open("LUKS key iteration count is zero"));
        }
        // qemu computes slot extents in 32-bit unsigned arithmetic; mirror
        // its wrapping so the same headers pass and fail.
        let split_sectors = |stripes: u32| -> u32 {
            let bytes = self.master_key_len.wrapping_mul(stripes) as u64;
            let sectors = bytes.div_ceil(512);
            let rounded =
                sectors.div_ceil(KEY_SLOT_OFFSET_SECTORS as u64) * KEY_SLOT_OFFSET_SECTORS as u64;
            rounded as u32
        };
        for (i, s1) in self.key_slots.iter().enumerate() {
            let start1 = s1.key_offset_sector;
            let len1 = split_sectors(s1.stripes);
            if s1.stripes != STRIPES {
                return Err(ImageError::open(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s1.stripes as i32
                )));
            }
            if s1.active != KEY_SLOT_DISABLED && s1.active != KEY_SLOT_ENABLED {
                return Err(ImageError::open(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if s1.active == KEY_SLOT_ENABLED && s1.iterations == 0 {
                return Err(ImageError::open(format!(
                    "Keyslot {i} iteration count is zero"
                )));
            }
            if start1 < KEY_SLOT_OFFSET_SECTORS {
                return Err(ImageError::open(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if start1.wrapping_add(len1) > self.payload_offset_sector {
                return Err(ImageError::open(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, s2) in self.key_slots.iter().enumerate().skip(i + 1) {
                let start2 = s2.key_offset_sector as u64;
                let len2 = split_sectors(s2.stripes) as u64;
                let (start1, len1) = (start1 as u64, len1 as u64);
                let last1 = start1.wrapping_add(len1).wrapping_sub(1);
                let last2 = start2.wrapping_add(len2).wrapping_sub(1);
                if !(last2 < start1 || last1 < start2) {
                    return Err(ImageError::open(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        Ok(())
    }

    fn algorithms(&self) -> Result<LuksAlgorithms> {
        let Some((mode_name, ivgen_part)) = self.cipher_mode.split_once('-') else {
            return Err(ImageError::open(format!(
                "Unexpected cipher mode string format '{}'",
                self.cipher_mode
            )));
        };
        let (ivgen_name, ivhash) = match ivgen_part.split_once(':') {
            Some((g, h)) => (g, Some(hash_lookup(h)?)),
            None => (ivgen_part, None),
        };
        let cipher_mode = lookup(CIPHER_MODES, mode_name, "Cipher mode")?;
        let key_bytes = if cipher_mode == "xts" {
            self.master_key_len / 2
        } else {
            self.master_key_len
        };
        let cipher_alg = CIPHERS
            .iter()
            .filter(|(n, _)| *n == self.cipher_name)
            .flat_map(|(_, sizes)| sizes.iter())
            .find(|(k, _)| *k == key_bytes)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                ImageError::open(format!(
                    "Algorithm '{}' with key size {} bytes not supported",
                    self.cipher_name, key_bytes as i32
                ))
            })?;
        let (hash_alg, _) = hash_lookup(&self.hash_spec)?;
        let ivgen_alg = lookup(IVGENS, ivgen_name, "IV generator")?;
        let mut ivgen_hash_alg = None;
        if ivgen_alg == "essiv" {
            let Some((h, digest_len)) = ivhash else {
                return Err(ImageError::open("Missing IV generator hash specification"));
            };
            essiv_check(cipher_alg, digest_len)?;
            ivgen_hash_alg = Some(h);
        }
        Ok(LuksAlgorithms {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash_alg,
            hash_alg,
        })
    }

    /// Payload offset in bytes.
    pub fn payload_offset(&self) -> u64 {
        self.payload_offset_sector as u64 * SECTOR_SIZE
    }

    /// The `QCryptoBlockInfoLUKS` qemu reports for this header.
    pub fn info(&self, algs: &LuksAlgorithms) -> LuksInfo {
        let payload = self.payload_offset();
        LuksInfo {
            cipher_alg: algs.cipher_alg.to_string(),
            cipher_mode: algs.cipher_mode.to_string(),
            ivgen_alg: algs.ivgen_alg.to_string(),
            ivgen_hash_alg: algs.ivgen_hash_alg.map(ToString::to_string),
            hash_alg: algs.hash_alg.to_string(),
            detached_header: payload == 0,
            payload_offset: payload as i64,
            master_key_iters: self.master_key_iterations as u64,
            uuid: self.uuid.clone(),
            slots: self
                .key_slots
                .iter()
                .map(|s| {
                    let active = s.active == KEY_SLOT_ENABLED;
                    LuksSlot {
                        active,
                        iters: active.then_some(s.iterations as u64),
                        stripes: active.then_some(s.stripes as u64),
                        key_offset: s.key_offset_sector as u64 * SECTOR_SIZE,
                    }
                })
                .collect(),
        }
    }
}

/// Read and validate the header at `offset` of `file`; `avail` is how many
/// bytes the container allows (qcow2's crypto extension length), or `None`
/// for a whole file.
pub fn read_header(
    files: &mut dyn Files,
    file: FileId,
    offset: u64,
    avail: Option<u64>,
) -> Result<(LuksHeader, LuksAlgorithms)> {
    if let Some(avail) = avail {
        if (LUKS_HEADER_SIZE as u64) > avail {
            return Err(ImageError::open(
                "Request for data outside of extension header",
            ));
        }
    }
    let mut buf = vec![0u8; LUKS_HEADER_SIZE];
    files.read_at(file, offset, &mut buf)?;
    LuksHeader::parse(&buf)
}

/// [`read_header`] through a caller's buffered reader.
pub fn read_header_with(
    cur: &mut Cursor<'_>,
    offset: u64,
    avail: Option<u64>,
) -> Result<(LuksHeader, LuksAlgorithms)> {
    if avail.is_some_and(|a| (LUKS_HEADER_SIZE as u64) > a) {
        return Err(ImageError::open(
            "Request for data outside of extension header",
        ));
    }
    let mut buf = [0u8; LUKS_HEADER_SIZE];
    cur.read(offset, &mut buf)?;
    LuksHeader::parse(&buf)
}

/// qemu's `luks` probe: magic and version 1.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= 8 && buf[0..6] == MAGIC && be16(buf, 6) == VERSION {
        100
    } else {
        0
    }
}

/// `info` of a raw LUKS volume.
pub fn info(files: &mut dyn Files, file: FileId, _filename: &str) -> Result<ImageInfo> {
    let (hdr, algs) = read_header(files, file, 0, None)?;
    // The file layer reports its length rounded up to whole sectors.
    let file_len = files.len(file)?.div_ceil(512).saturating_mul(512);
    let payload = hdr.payload_offset();
    if payload > file_len {
        return Err(ImageError::open(
            "Could not refresh total sector count: Input/output error",
        ));
    }
    Ok(ImageInfo {
        // qemu's driver answers bdrv_get_info, so dirty-flag is present.
        dirty_flag: Some(false),
        format: "luks".into(),
        virtual_size: file_len - payload,
        cluster_size: None,
        encrypted: true,
        format_specific: Some(FormatSpecific::Luks(hdr.info(&algs))),
        children: single_child(file),
        ..Default::default()
    })
}

/// Build a LUKS1 header like qemu-img's default (aes-256 xts-plain64
/// sha256, slot 0 active) for tests.
#[cfg(test)]
pub(crate) fn test_header() -> Vec<u8> {
    let mut b = vec![0u8; LUKS_HEADER_SIZE];
    b[0..6].copy_from_slice(&MAGIC);
    b[6..8].copy_from_slice(&1u16.to_be_bytes());
    b[8..11].copy_from_slice(b"aes");
    b[40..51].copy_from_slice(b"xts-plain64");
    b[72..78].copy_from_slice(b"sha256");
    b[104..108].copy_from_slice(&4040u32.to_be_bytes());
    b[108..112].copy_from_slice(&64u32.to_be_bytes());
    b[164..168].copy_from_slice(&1000u32.to_be_bytes());
    b[168..204].copy_from_slice(b"01234567-89ab-cdef-0123-456789abcdef");
    for i in 0..NUM_KEY_SLOTS {
        let base = 208 + 48 * i;
        let active = if i == 0 {
            KEY_SLOT_ENABLED
        } else {
            KEY_SLOT_DISABLED
        };
        b[base..base + 4].copy_from_slice(&active.to_be_bytes());
        b[base + 4..base + 8].copy_from_slice(&2000u32.to_be_bytes());
        b[base + 40..base + 44].copy_from_slice(&(8 + 504 * i as u32).to_be_bytes());
        b[base + 44..base + 48].copy_from_slice(&STRIPES.to_be_bytes());
    }
    b
}

/// qemu opens a LUKS image for I/O only with its key, which instar never
/// takes: the crypto layer refuses before it reads the header, so every
/// file opened as luks for `map` or `convert` gets this error.
pub fn key_required() -> ImageError {
    ImageError::open("Parameter 'key-secret' is required for cipher")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemFiles;

    fn err(buf: Vec<u8>) -> String {
        let mut f = MemFiles::new(buf);
        info(&mut f, 0, "x").unwrap_err().message
    }

    fn with_len(mut h: Vec<u8>, len: usize) -> Vec<u8> {
        h.resize(len, 0);
        h
    }

    #[test]
    fn round_trip() {
        let img = with_len(test_header(), 4040 * 512 + 16 * 1024 * 1024);
        let mut f = MemFiles::new(img);
        let i = info(&mut f, 0, "x").unwrap();
        assert_eq!(i.virtual_size, 16 * 1024 * 1024);
        assert!(i.encrypted);
        let Some(FormatSpecific::Luks(l)) = i.format_specific else {
            panic!()
        };
        assert_eq!(l.cipher_alg, "aes-256");
        assert_eq!(l.cipher_mode, "xts");
        assert_eq!(l.ivgen_alg, "plain64");
        assert_eq!(l.payload_offset, 2068480);
        assert_eq!(l.slots[0].iters, Some(2000));
        assert_eq!(l.slots[1].iters, None);
        assert_eq!(l.slots[1].key_offset, 512 * 512);
        assert!(!l.detached_header);
    }

    #[test]
    fn probe_needs_version_1() {
        let mut h = test_header();
        assert_eq!(probe(&h, "x"), 100);
        h[7] = 2;
        assert_eq!(probe(&h, "x"), 0);
        assert_eq!(probe(b"LUKS", "x"), 0);
    }

    // Messages below are qemu-img 10.0.2's for the same header edits.
    #[test]
    fn hostile_headers() {
        let big = 4040 * 512;
        assert_eq!(err(vec![]), "Volume is not in LUKS format");
        let mut h = test_header();
        h[7] = 2;
        assert_eq!(err(with_len(h, big)), "LUKS version 2 is not supported");
        let mut h = test_header();
        h[8..40].fill(b'a');
        assert_eq!(
            err(with_len(h, big)),
            "LUKS header cipher name is not NUL terminated"
        );
        let mut h = test_header();
        h[104..108].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            err(with_len(h, big)),
            "LUKS payload is overlapping with the header"
        );
        let mut h = test_header();
        h[164..168].fill(0);
        assert_eq!(err(with_len(h, big)), "LUKS key iteration count is zero");
        let mut h = test_header();
        h[208 + 48 + 44..208 + 48 + 48].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            err(with_len(h, big)),
            "Keyslot 1 is corrupted (stripes 3 != 4000)"
        );
        let mut h = test_header();
        h[208..212].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            err(with_len(h, big)),
            "Keyslot 0 state (active/disable) is corrupted"
        );
        let mut h = test_header();
        h[208 + 48 * 2 + 40..208 + 48 * 2 + 44].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(
            err(with_len(h, big)),
            "Keyslots 0 and 2 are overlapping in the header"
        );
        let mut h = test_header();
        h[104..108].copy_from_slice(&600u32.to_be_bytes());
        assert_eq!(
            err(with_len(h, big)),
            "Keyslot 1 is overlapping with the encrypted payload"
        );
        let mut h = test_header();
        h[40..72].fill(0);
        h[40..45].copy_from_slice(b"xts64");
        assert_eq!(
            err(with_len(h, big)),
            "Unexpected cipher mode string format 'xts64'"
        );
        let mut h = test_header();
        h[8..11].copy_from_slice(b"des");
        assert_eq!(
            err(with_len(h, big)),
            "Algorithm 'des' with key size 32 bytes not supported"
        );
        let mut h = test_header();
        h[72..78].copy_from_slice(b"sha999");
        assert_eq!(
            err(with_len(h, big)),
            "Hash algorithm 'sha999' not supported"
        );
        let mut h = test_header();
        h[40..72].fill(0);
        h[40..49].copy_from_slice(b"xts-essiv");
        assert_eq!(
            err(with_len(h, big)),
            "Missing IV generator hash specification"
        );
        // Payload past the end of the file.
        assert_eq!(
            err(test_header()),
            "Could not refresh total sector count: Input/output error"
        );
    }

    #[test]
    fn hostile_sweeps() {
        // qemu-img 10.0.2 on a qemu-img-created LUKS image cut short: the
        // first field missing decides the message.
        let h = test_header();
        assert_eq!(err(h[..4].to_vec()), "Volume is not in LUKS format");
        for n in [8, 32, 64] {
            assert_eq!(
                err(h[..n].to_vec()),
                "LUKS payload is overlapping with the header"
            );
        }
        assert_eq!(err(h[..128].to_vec()), "LUKS key iteration count is zero");
        assert_eq!(
            err(h[..200].to_vec()),
            "Keyslot 0 is corrupted (stripes 0 != 4000)"
        );
        let img = with_len(test_header(), 4040 * 512 + 4096);
        crate::hostile::truncations(info, &img, "x", LUKS_HEADER_SIZE + 8);
        crate::hostile::absurd_fields(
            info,
            &img,
            "x",
            0..LUKS_HEADER_SIZE,
            &crate::hostile::no_fix,
        );
    }

    #[test]
    fn io_opens_need_the_key() {
        // qemu-img 10.0.2 `map -f luks` on any file.
        assert_eq!(
            key_required().message,
            "Parameter 'key-secret' is required for cipher"
        );
    }
}
