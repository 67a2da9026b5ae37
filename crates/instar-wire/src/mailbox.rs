//! Guest memory layout and the mailbox through which guest and host talk.
//!
//! The guest is one vCPU at ring 3 with an identity map (guest virtual ==
//! guest physical), so every address below is both. Both sides compile
//! against these constants; docs/wire-protocol.md describes the protocol.
//!
//! ```text
//! 0x0000_0000  system page (2 MiB, supervisor only): GDT, page tables.
//!              Mapped without the user bit so a guest null-pointer access
//!              faults instead of reading page tables.
//! 0x0020_0000  mailbox (2 MiB): MailboxHeader, then the message area.
//! 0x0040_0000  guest code and data (ELF PT_LOAD segments), up to CODE_LIMIT.
//! 0x0100_0000  stack guard (2 MiB, not present): an overflow faults.
//! 0x0120_0000  stack (2 MiB), grows down from STACK_TOP.
//! 0x0140_0000  heap, up to the end of guest RAM (MailboxHeader::memory_end).
//! ```
//!
//! A call from the guest is a header update followed by a one-byte `out` to
//! one of the `PORT_*` ports; the host handles it while the vCPU is stopped
//! and resumes it. There is no interrupt and no shared-memory polling.

/// Size of one large page: the identity map uses 2 MiB pages only.
pub const PAGE_SIZE: u64 = 2 << 20;

/// Start of the mailbox (header followed by the message area).
pub const MAILBOX_ADDR: u64 = 0x0020_0000;
/// Size of the mailbox region.
pub const MAILBOX_SIZE: u64 = PAGE_SIZE;
/// Bytes reserved for [`MailboxHeader`] at [`MAILBOX_ADDR`]; the header is
/// much smaller, the rest of the page is spare for later fields.
pub const HEADER_SIZE: u64 = 4096;
/// Start of the message area: the request (host to guest) and the replies to
/// [`PORT_CALL`] are written here by the host.
pub const MESSAGE_ADDR: u64 = MAILBOX_ADDR + HEADER_SIZE;
/// Capacity of the message area. A request or call reply that does not fit
/// is an error, not a truncation.
pub const MESSAGE_CAPACITY: u64 = MAILBOX_SIZE - HEADER_SIZE;

/// Guest code is linked at this address (see crates/instar-guest/link.ld).
pub const CODE_ADDR: u64 = 0x0040_0000;
/// End of the code window: the loader refuses segments beyond it.
pub const CODE_LIMIT: u64 = 0x0100_0000;
/// Bottom of the stack (the 2 MiB below it are left unmapped as a guard).
pub const STACK_BOTTOM: u64 = 0x0120_0000;
/// Initial stack pointer plus 8 (the guest starts as if just `call`ed).
pub const STACK_TOP: u64 = 0x0140_0000;
/// Start of the guest heap; it ends at [`MailboxHeader::memory_end`].
pub const HEAP_ADDR: u64 = STACK_TOP;

/// Smallest guest RAM the layout works with: everything above plus a 16 MiB
/// heap (the read cache alone takes 2 MiB).
pub const MIN_MEMORY: u64 = HEAP_ADDR + (16 << 20);
/// Largest guest RAM: the identity map has one page directory per GiB and
/// the host reserves four (enough for any single operation; buffers are
/// bounded well below this).
pub const MAX_MEMORY: u64 = 4 << 30;

/// `out` here: read `length` bytes of `file` at `offset` into guest memory at
/// `buffer`. Bytes past the end of the file are zeros. `status` gets 0 or an
/// errno value.
pub const PORT_READ: u16 = 0x10;
/// `out` here: a postcard [`crate::HostCall`] is at `msg_addr`/`msg_len`;
/// the host writes a postcard [`crate::HostReply`] at [`MESSAGE_ADDR`] and
/// its length in `reply_len`.
pub const PORT_CALL: u16 = 0x11;
/// `out` here: the run is over; a postcard [`crate::Response`] is at
/// `msg_addr`/`msg_len` (anywhere in guest RAM, e.g. the heap).
pub const PORT_DONE: u16 = 0x12;
/// `out` here: write `length` bytes of guest memory at `buffer` to output
/// `file` (an [`crate::OutId`]) at `offset`. `status` gets 0 or an errno
/// value. The host refuses writes beyond its output limit.
pub const PORT_WRITE: u16 = 0x14;
/// `out` here: the guest panicked; UTF-8 text at `msg_addr`/`msg_len`.
pub const PORT_PANIC: u16 = 0x13;

/// `MailboxHeader::magic`: "INSTARMB" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"INSTARMB");
/// Version of this layout and protocol; bump on any change.
pub const PROTOCOL_VERSION: u64 = 2;

/// `status` of a call that worked.
pub const STATUS_OK: u64 = 0;

/// A little-endian u64 as stored in guest memory (alignment 1, so the
/// struct has no padding and the same bytes on any host).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Le64([u8; 8]);

impl Le64 {
    /// Wrap a value.
    pub const fn new(value: u64) -> Self {
        Self(value.to_le_bytes())
    }
    /// The value.
    pub const fn get(self) -> u64 {
        u64::from_le_bytes(self.0)
    }
}

impl core::fmt::Debug for Le64 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.get().fmt(f)
    }
}

/// The header at [`MAILBOX_ADDR`]. Fields marked host→guest are written by
/// the host before the guest starts or before it resumes after a call;
/// guest→host fields are written by the guest before its `out`. The host
/// validates every guest→host field (range, bounds) before using it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MailboxHeader {
    /// host→guest: [`MAGIC`].
    pub magic: Le64,
    /// host→guest: [`PROTOCOL_VERSION`].
    pub version: Le64,
    /// host→guest: end of guest RAM (exclusive); the heap ends here.
    pub memory_end: Le64,
    /// host→guest: length of [`crate::ROOT_FILE`] in bytes.
    pub root_length: Le64,
    /// host→guest: length of the postcard [`crate::Request`] at
    /// [`MESSAGE_ADDR`].
    pub request_len: Le64,
    /// guest→host ([`PORT_READ`]): file id.
    pub file: Le64,
    /// guest→host ([`PORT_READ`]): byte offset in the file.
    pub offset: Le64,
    /// guest→host ([`PORT_READ`]): bytes to read.
    pub length: Le64,
    /// guest→host ([`PORT_READ`]): guest address of the destination.
    pub buffer: Le64,
    /// guest→host ([`PORT_CALL`], [`PORT_DONE`], [`PORT_PANIC`]): guest
    /// address of the message.
    pub msg_addr: Le64,
    /// guest→host: length of the message.
    pub msg_len: Le64,
    /// host→guest: result of the last [`PORT_READ`] ([`STATUS_OK`] or errno).
    pub status: Le64,
    /// host→guest: length of the reply at [`MESSAGE_ADDR`] after
    /// [`PORT_CALL`].
    pub reply_len: Le64,
}

/// Size of [`MailboxHeader`] in bytes.
pub const HEADER_BYTES: usize = core::mem::size_of::<MailboxHeader>();

const _: () = assert!(HEADER_BYTES as u64 <= HEADER_SIZE);
const _: () = assert!(core::mem::align_of::<MailboxHeader>() == 1);
// The regions are ordered and 2 MiB aligned (the identity map has no
// smaller pages), with a whole unmapped page as the stack guard.
const _: () = assert!(MAILBOX_ADDR >= PAGE_SIZE && MAILBOX_ADDR.is_multiple_of(PAGE_SIZE));
const _: () =
    assert!(CODE_ADDR >= MAILBOX_ADDR + MAILBOX_SIZE && CODE_ADDR.is_multiple_of(PAGE_SIZE));
const _: () =
    assert!(STACK_BOTTOM >= CODE_LIMIT + PAGE_SIZE && CODE_LIMIT.is_multiple_of(PAGE_SIZE));
const _: () = assert!(STACK_TOP.is_multiple_of(PAGE_SIZE) && MIN_MEMORY.is_multiple_of(PAGE_SIZE));

impl MailboxHeader {
    /// The header as bytes (for the host to copy into guest memory).
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        for (i, field) in self.fields().iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&field.0);
        }
        out
    }

    /// Parse a header from bytes (for the host reading guest memory). Every
    /// bit pattern is a valid header; the values still need validation.
    pub fn from_bytes(bytes: &[u8; HEADER_BYTES]) -> Self {
        let mut h = Self::default();
        for (i, field) in h.fields_mut().into_iter().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            *field = Le64(b);
        }
        h
    }

    fn fields(&self) -> [Le64; HEADER_BYTES / 8] {
        [
            self.magic,
            self.version,
            self.memory_end,
            self.root_length,
            self.request_len,
            self.file,
            self.offset,
            self.length,
            self.buffer,
            self.msg_addr,
            self.msg_len,
            self.status,
            self.reply_len,
        ]
    }

    fn fields_mut(&mut self) -> [&mut Le64; HEADER_BYTES / 8] {
        [
            &mut self.magic,
            &mut self.version,
            &mut self.memory_end,
            &mut self.root_length,
            &mut self.request_len,
            &mut self.file,
            &mut self.offset,
            &mut self.length,
            &mut self.buffer,
            &mut self.msg_addr,
            &mut self.msg_len,
            &mut self.status,
            &mut self.reply_len,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = MailboxHeader {
            magic: Le64::new(MAGIC),
            offset: Le64::new(0x1122_3344_5566_7788),
            reply_len: Le64::new(7),
            ..Default::default()
        };
        let b = h.to_bytes();
        assert_eq!(&b[..8], b"INSTARMB");
        assert_eq!(MailboxHeader::from_bytes(&b), h);
    }
}
