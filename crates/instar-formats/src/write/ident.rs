//! Identifiers that qemu draws at random or from the clock when it creates
//! an image (VHD footer UUID, VHDX GUIDs and header sequence numbers). The
//! guest has neither a clock nor an entropy source, and reproducible output
//! is worth having, so writers derive them instead: from the format, the
//! output name, the size and options, and a fingerprint of the data written
//! (offset, length and the bytes at both ends of every write). Converting
//! the same data to the same name gives the same image; different data or a
//! different name gives different identifiers. Writers put identifiers in
//! place in `finish`, once everything has been mixed in.

/// A running 128-bit hash (two FNV-1a lanes, finished with splitmix64).
/// Not cryptographic: it only has to make collisions between unrelated
/// images unlikely.
#[derive(Clone)]
pub(crate) struct Ident {
    a: u64,
    b: u64,
}

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bytes of each end of a write that go into the fingerprint.
const SAMPLE: usize = 32;

impl Ident {
    /// A hash seeded with the format name.
    pub(crate) fn new(format: &str) -> Self {
        let mut h = Self {
            a: 0xcbf2_9ce4_8422_2325,
            b: 0x6c62_272e_07bb_0142,
        };
        h.bytes(format.as_bytes());
        h
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) {
        for &x in data {
            self.a = (self.a ^ u64::from(x)).wrapping_mul(FNV_PRIME);
            self.b = (self.b ^ u64::from(x) ^ 0x5a).wrapping_mul(FNV_PRIME);
        }
        // Length-delimited, so ("ab", "c") and ("a", "bc") differ.
        self.a = (self.a ^ data.len() as u64).wrapping_mul(FNV_PRIME);
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// Fold in a write of `data` at guest `offset`, in constant time.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        self.u64(offset);
        self.u64(data.len() as u64);
        self.bytes(&data[..data.len().min(SAMPLE)]);
        self.bytes(&data[data.len().saturating_sub(SAMPLE)..]);
    }

    /// 64 bits for purpose `n` (each purpose gets independent bits).
    pub(crate) fn value(&self, n: u64) -> u64 {
        splitmix(self.a ^ splitmix(self.b.wrapping_add(n)))
    }

    /// A UUID for purpose `n`, in RFC 9562 byte order, marked as version 8
    /// (custom) so that it cannot be mistaken for a random or time UUID.
    pub(crate) fn uuid(&self, n: u64) -> [u8; 16] {
        let mut u = [0u8; 16];
        u[..8].copy_from_slice(&self.value(2 * n).to_be_bytes());
        u[8..].copy_from_slice(&self.value(2 * n + 1).to_be_bytes());
        u[6] = (u[6] & 0x0f) | 0x80;
        u[8] = (u[8] & 0x3f) | 0x80;
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_and_distinct() {
        let mut x = Ident::new("vpc");
        x.bytes(b"out.vhd");
        let mut y = x.clone();
        x.write(0, b"hello");
        y.write(0, b"hellp");
        assert_ne!(x.uuid(0), y.uuid(0));
        assert_ne!(x.uuid(0), x.uuid(1));
        let mut z = Ident::new("vpc");
        z.bytes(b"out.vhd");
        z.write(0, b"hello");
        assert_eq!(x.uuid(0), z.uuid(0));
        assert_eq!(x.uuid(0)[6] >> 4, 8);
        assert_eq!(x.uuid(0)[8] >> 6, 2);
    }
}
