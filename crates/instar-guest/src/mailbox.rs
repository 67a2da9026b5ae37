//! The guest side of the mailbox: header fields and the four doorbells.

use instar_wire::mailbox::{
    MailboxHeader, HEADER_BYTES, MESSAGE_ADDR, MESSAGE_CAPACITY, PORT_CALL, PORT_DONE, PORT_READ,
    PORT_WRITE,
};

/// Index of each header field (its byte offset divided by 8).
mod field {
    pub const MEMORY_END: usize = 2;
    pub const ROOT_LENGTH: usize = 3;
    pub const REQUEST_LEN: usize = 4;
    pub const FILE: usize = 5;
    pub const OFFSET: usize = 6;
    pub const LENGTH: usize = 7;
    pub const BUFFER: usize = 8;
    pub const MSG_ADDR: usize = 9;
    pub const MSG_LEN: usize = 10;
    pub const STATUS: usize = 11;
    pub const REPLY_LEN: usize = 12;
}

const _: () = assert!(HEADER_BYTES == 13 * 8);
const _: () = assert!(core::mem::offset_of!(MailboxHeader, reply_len) == field::REPLY_LEN * 8);
const _: () = assert!(core::mem::offset_of!(MailboxHeader, memory_end) == field::MEMORY_END * 8);

/// The mailbox at a fixed guest address. Copyable: it is only an address.
#[derive(Clone, Copy)]
pub struct Mailbox {
    base: usize,
}

/// Ring a doorbell: the vCPU exits to the host, which handles the call
/// before this instruction retires.
#[inline(always)]
fn out(port: u16) {
    // SAFETY: `out` is allowed at ring 3 because the host sets RFLAGS.IOPL=3;
    // it has no effect inside the guest. It is not `nomem`: the host reads
    // and writes guest memory during the exit, so the compiler must not
    // cache memory across it.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") 0u8, options(nostack, preserves_flags));
    }
}

impl Mailbox {
    pub fn new(base: u64) -> Self {
        Self {
            base: base as usize,
        }
    }

    fn get(&self, index: usize) -> u64 {
        // SAFETY: the header lies in mapped guest RAM at `base` (the host
        // put it there and passed its address); fields are 8 bytes each and
        // `index` is below 13. Volatile because the host writes it during
        // exits.
        let bytes = unsafe { core::ptr::read_volatile((self.base + index * 8) as *const [u8; 8]) };
        u64::from_le_bytes(bytes)
    }

    fn set(&self, index: usize, value: u64) {
        // SAFETY: as in `get`; the guest owns these fields before an `out`.
        unsafe {
            core::ptr::write_volatile((self.base + index * 8) as *mut [u8; 8], value.to_le_bytes())
        }
    }

    pub fn memory_end(&self) -> u64 {
        self.get(field::MEMORY_END)
    }

    pub fn root_length(&self) -> u64 {
        self.get(field::ROOT_LENGTH)
    }

    /// The encoded request, if its length fits the message area.
    pub fn request(&self) -> Option<&'static [u8]> {
        let len = self.get(field::REQUEST_LEN);
        if len > MESSAGE_CAPACITY {
            return None;
        }
        // SAFETY: the message area is mapped guest RAM of MESSAGE_CAPACITY
        // bytes; the host wrote the request there and does not touch it
        // again until the guest makes a call (the request is decoded into
        // owned values before any call).
        Some(unsafe { core::slice::from_raw_parts(MESSAGE_ADDR as *const u8, len as usize) })
    }

    /// Read into `buf`; gives the host's status (0 = done).
    pub fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> u64 {
        self.set(field::FILE, u64::from(file));
        self.set(field::OFFSET, offset);
        self.set(field::LENGTH, buf.len() as u64);
        self.set(field::BUFFER, buf.as_mut_ptr() as u64);
        out(PORT_READ);
        // Keep the buffer observably written by the exit.
        core::hint::black_box(buf.as_mut_ptr());
        self.get(field::STATUS)
    }

    /// Write `buf` to output `file` at `offset`; gives the host's status
    /// (0 = done) and, on a failure, the offset it failed at (the host may
    /// report an earlier write's failure here).
    pub fn write(&self, file: u32, offset: u64, buf: &[u8]) -> (u64, u64) {
        self.set(field::FILE, u64::from(file));
        self.set(field::OFFSET, offset);
        self.set(field::LENGTH, buf.len() as u64);
        self.set(field::BUFFER, buf.as_ptr() as u64);
        // The buffer's contents must be in memory before the exit.
        core::hint::black_box(buf.as_ptr());
        out(PORT_WRITE);
        (self.get(field::STATUS), self.get(field::OFFSET))
    }

    /// Make a host call; gives the encoded reply (valid until the next call).
    pub fn call(&self, message: &[u8]) -> &'static [u8] {
        self.set(field::MSG_ADDR, message.as_ptr() as u64);
        self.set(field::MSG_LEN, message.len() as u64);
        out(PORT_CALL);
        let len = self.get(field::REPLY_LEN).min(MESSAGE_CAPACITY);
        // SAFETY: the reply lies in the message area (mapped, capacity
        // checked above); the host does not write it again until the next
        // call, and callers decode it into owned values before that.
        unsafe { core::slice::from_raw_parts(MESSAGE_ADDR as *const u8, len as usize) }
    }

    /// Hand over the encoded response; the host never resumes after this.
    pub fn done(&self, message: &[u8]) -> ! {
        loop {
            self.signal_message(PORT_DONE, message.as_ptr() as u64, message.len() as u64);
        }
    }

    pub fn signal_message(&self, port: u16, addr: u64, len: u64) {
        self.set(field::MSG_ADDR, addr);
        self.set(field::MSG_LEN, len);
        out(port);
    }
}
