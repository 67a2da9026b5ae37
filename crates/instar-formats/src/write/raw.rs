//! raw target: guest offset = file offset; unwritten ranges stay holes.

use super::{ImageWriter, Sink};
use crate::Result;
use alloc::boxed::Box;
use instar_wire::convert::Preallocation;

/// Writes a raw image.
pub struct RawWriter {
    size: u64,
}

impl RawWriter {
    /// Size the file (a hole of `virtual_size` bytes; preallocation is the
    /// host's business and not done yet).
    pub fn create(
        sink: &mut dyn Sink,
        virtual_size: u64,
        preallocation: Preallocation,
    ) -> Result<Self> {
        if preallocation != Preallocation::Off {
            return Err(instar_wire::ImageError::limit(
                "convert with preallocation is not implemented yet",
            ));
        }
        sink.set_len(0, virtual_size)?;
        Ok(Self { size: virtual_size })
    }
}

impl ImageWriter for RawWriter {
    fn granularity(&self) -> u64 {
        64 << 10
    }
    fn write(&mut self, sink: &mut dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
        sink.write_at(0, offset, data)
    }
    fn zero(&mut self, _sink: &mut dyn Sink, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn finish(self: Box<Self>, sink: &mut dyn Sink) -> Result<()> {
        sink.set_len(0, self.size)
    }
}
