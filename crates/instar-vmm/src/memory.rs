//! Guest RAM: one anonymous mapping, bounds-checked access helpers.
//!
//! Every address that comes from the guest goes through [`GuestMemory::range`]
//! before the host touches it.

use crate::VmmError;
use std::ptr::NonNull;

/// Anonymous, lazily-populated guest RAM at guest physical address 0.
pub struct GuestMemory {
    ptr: NonNull<u8>,
    size: usize,
}

impl GuestMemory {
    /// Map `size` bytes (a multiple of 2 MiB) of zeroed memory.
    pub fn new(size: u64) -> Result<Self, VmmError> {
        let size = usize::try_from(size)
            .map_err(|_| VmmError::Failed("guest memory size too large".into()))?;
        // SAFETY: anonymous private mapping with no address hint; the kernel
        // picks a free range, nothing existing is replaced. The result is
        // checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VmmError::Failed(format!(
                "cannot map {} MiB of guest memory: {}",
                size >> 20,
                crate::os_error(std::io::Error::last_os_error())
            )));
        }
        // First touches of guest pages go through the hypervisor; huge
        // pages make that pass several times faster for the heap, where
        // bulk data lands. The low part (system tables, mailbox, code,
        // stack) is touched sparsely, where zeroing whole 2 MiB pages would
        // only add to the start-up time. Advisory only.
        let heap = instar_wire::mailbox::HEAP_ADDR as usize;
        if size > heap {
            // SAFETY: the range lies inside the mapping just created (heap
            // is 2 MiB aligned, so the start is page aligned).
            unsafe {
                libc::madvise(
                    ptr.cast::<u8>().add(heap).cast(),
                    size - heap,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| VmmError::Failed("mmap returned null".into()))?;
        Ok(Self { ptr, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Host address of guest physical 0 (for KVM_SET_USER_MEMORY_REGION).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Check that `[addr, addr + len)` lies inside guest RAM; gives the
    /// offset as usize.
    pub fn range(&self, addr: u64, len: u64) -> Option<usize> {
        let end = addr.checked_add(len)?;
        if end > self.size as u64 {
            return None;
        }
        usize::try_from(addr).ok()
    }

    /// Guest bytes `[addr, addr + len)`, if in bounds.
    pub fn slice(&self, addr: u64, len: u64) -> Option<&[u8]> {
        let start = self.range(addr, len)?;
        // SAFETY: in bounds of the live mapping (checked above). The vCPU
        // is stopped whenever the host looks at guest memory (single vCPU,
        // handled inside the exit), so nothing writes it concurrently.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len as usize) })
    }

    /// Mutable guest bytes `[addr, addr + len)`, if in bounds.
    pub fn slice_mut(&mut self, addr: u64, len: u64) -> Option<&mut [u8]> {
        let start = self.range(addr, len)?;
        // SAFETY: as in `slice`; `&mut self` makes this the only host view.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len as usize) })
    }

    /// Copy `data` to guest `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Option<()> {
        self.slice_mut(addr, data.len() as u64)?
            .copy_from_slice(data);
        Some(())
    }

    /// Write a little-endian u64 at guest `addr`.
    pub fn write_u64(&mut self, addr: u64, value: u64) -> Option<()> {
        self.write(addr, &value.to_le_bytes())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no slice
        // into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let mut m = GuestMemory::new(4 << 20).unwrap();
        assert!(m.slice(0, 4 << 20).is_some());
        assert!(m.slice((4 << 20) - 1, 1).is_some());
        assert!(m.slice((4 << 20) - 1, 2).is_none());
        assert!(m.slice(4 << 20, 0).is_some());
        assert!(m.slice((4 << 20) + 1, 0).is_none());
        assert!(m.slice(u64::MAX, 2).is_none());
        assert!(m.slice(1, u64::MAX).is_none());
        assert!(m.write(8, b"abc").is_some());
        assert_eq!(m.slice(8, 3).unwrap(), b"abc");
        assert!(m.write((4 << 20) - 2, b"abc").is_none());
    }
}
