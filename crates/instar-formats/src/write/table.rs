//! A block allocation table written as the image is: the engine's writes
//! come in ascending guest order, so the entry of block `i` is final once a
//! write lands past block `i`. Entries are kept for one window of
//! [`TABLE_CHUNK`] bytes and written out as the window moves on, so memory
//! stays at one chunk however large the table (a 2 TiB VHD has a 4 MiB BAT,
//! a 64 TiB VHDX with 1 MiB blocks a 512 MiB one).

use super::Sink;
use crate::limits::TABLE_CHUNK;
use crate::Result;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use instar_wire::{ImageError, OutId};

/// How an entry is stored.
#[derive(Clone, Copy)]
pub(crate) enum Entry {
    /// Big-endian u32 (VHD).
    Be32,
    /// Little-endian u64 (VHDX).
    Le64,
}

impl Entry {
    fn width(self) -> usize {
        match self {
            Entry::Be32 => 4,
            Entry::Le64 => 8,
        }
    }
    fn put(self, buf: &mut [u8], value: u64) {
        match self {
            // Callers store u32 entries; the truncation cannot lose bits.
            Entry::Be32 => buf.copy_from_slice(&(value as u32).to_be_bytes()),
            Entry::Le64 => buf.copy_from_slice(&value.to_le_bytes()),
        }
    }
}

/// The value an entry has when no block was written there, by index.
pub(crate) type DefaultEntry = Box<dyn Fn(u64) -> u64>;

/// A table of `len` entries at `offset` of output `file`.
pub(crate) struct TableWriter {
    file: OutId,
    offset: u64,
    len: u64,
    entry: Entry,
    default: DefaultEntry,
    /// Write windows holding only zero default entries too (qemu writes the
    /// whole table; a hole reads the same but counts differently in `disk
    /// size`).
    write_zeros: bool,
    /// First entry of the window.
    base: u64,
    window: Vec<u8>,
    dirty: bool,
}

impl TableWriter {
    pub(crate) fn new(
        file: OutId,
        offset: u64,
        len: u64,
        entry: Entry,
        default: DefaultEntry,
        write_zeros: bool,
    ) -> Self {
        let mut t = Self {
            file,
            offset,
            len,
            entry,
            default,
            write_zeros,
            base: 0,
            window: Vec::new(),
            dirty: false,
        };
        t.fill();
        t
    }

    fn per_window(&self) -> u64 {
        (TABLE_CHUNK / self.entry.width()) as u64
    }

    /// Load the default entries of the window at `base`.
    fn fill(&mut self) {
        let n = (self.len - self.base.min(self.len)).min(self.per_window()) as usize;
        let w = self.entry.width();
        self.window = vec![0u8; n * w];
        for (k, slot) in self.window.chunks_exact_mut(w).enumerate() {
            self.entry.put(slot, (self.default)(self.base + k as u64));
        }
        self.dirty = false;
    }

    fn flush(&mut self, sink: &mut dyn Sink) -> Result<()> {
        if self.window.is_empty() {
            return Ok(());
        }
        if self.dirty || self.write_zeros || self.window.iter().any(|&b| b != 0) {
            let at = self.base * self.entry.width() as u64;
            sink.write_at(self.file, self.offset + at, &self.window)?;
        }
        Ok(())
    }

    /// Entry `index` is `value`. Indices must not go backwards past a
    /// window already written.
    pub(crate) fn set(&mut self, sink: &mut dyn Sink, index: u64, value: u64) -> Result<()> {
        if index >= self.len || index < self.base {
            return Err(ImageError::operation(
                "internal error: table entry out of order or out of range",
            ));
        }
        while index >= self.base + self.per_window() {
            self.flush(sink)?;
            self.base += self.per_window();
            self.fill();
        }
        let w = self.entry.width();
        let at = (index - self.base) as usize * w;
        self.entry.put(&mut self.window[at..at + w], value);
        self.dirty = true;
        Ok(())
    }

    /// Write the current window and every one after it.
    pub(crate) fn finish(mut self, sink: &mut dyn Sink) -> Result<()> {
        loop {
            self.flush(sink)?;
            self.base += self.per_window();
            if self.base >= self.len {
                return Ok(());
            }
            self.fill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::MemSink;

    #[test]
    fn windows_defaults_and_holes() {
        let per = (TABLE_CHUNK / 4) as u64;
        let mut sink = MemSink::new(&["t"]);
        let len = 3 * per + 5;
        let mut t = TableWriter::new(
            0,
            100,
            len,
            Entry::Be32,
            Box::new(|_| u64::from(u32::MAX)),
            false,
        );
        t.set(&mut sink, 3, 7).unwrap();
        t.set(&mut sink, per + 1, 8).unwrap();
        t.set(&mut sink, 3 * per + 4, 9).unwrap();
        assert!(t.set(&mut sink, 2, 1).is_err(), "window already written");
        t.finish(&mut sink).unwrap();
        let f = &sink.files[0];
        assert_eq!(f.len() as u64, 100 + 4 * len);
        let e = |i: u64| crate::bytes::be32(f, (100 + 4 * i) as usize);
        assert_eq!(
            (e(0), e(3), e(per + 1), e(2 * per), e(3 * per + 4)),
            (u32::MAX, 7, 8, u32::MAX, 9)
        );

        // Zero defaults are left as holes unless asked for.
        let per = (TABLE_CHUNK / 8) as u64;
        let mut sink = MemSink::new(&["t"]);
        let mut t = TableWriter::new(0, 0, 2 * per, Entry::Le64, Box::new(|_| 0), false);
        t.set(&mut sink, 1, 6).unwrap();
        t.finish(&mut sink).unwrap();
        assert_eq!(sink.files[0].len(), TABLE_CHUNK);
        let mut sink = MemSink::new(&["t"]);
        TableWriter::new(0, 0, 2 * per, Entry::Le64, Box::new(|_| 0), true)
            .finish(&mut sink)
            .unwrap();
        assert_eq!(sink.files[0].len(), 2 * TABLE_CHUNK);
    }
}
