//! The guest allocator: a bump allocator over [HEAP_ADDR, memory_end).
//!
//! One run is one short-lived operation, and the VM is thrown away after
//! it, so memory is never returned to a general free list. Two cheap cases
//! are reclaimed because Vec growth and scratch buffers hit them all the
//! time: freeing the most recent block rewinds the bump pointer, and growing
//! the most recent block extends it in place.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use instar_wire::mailbox::HEAP_ADDR;

struct State {
    next: usize,
    end: usize,
}

struct Bump(UnsafeCell<State>);

// SAFETY: the guest has one vCPU and no interrupts, so there is never more
// than one thread of execution to touch the state.
unsafe impl Sync for Bump {}

#[global_allocator]
static HEAP: Bump = Bump(UnsafeCell::new(State { next: 0, end: 0 }));

/// Set the heap's end (from the mailbox header). Called once, first thing.
pub fn init(memory_end: u64) {
    // SAFETY: single thread of execution (see `Sync` above), and no
    // allocation has happened yet.
    let state = unsafe { &mut *HEAP.0.get() };
    state.next = HEAP_ADDR as usize;
    state.end = (memory_end as usize).max(HEAP_ADDR as usize);
}

// SAFETY: blocks handed out are disjoint parts of [HEAP_ADDR, end), which is
// guest RAM used for nothing else, aligned as asked; a block is only reused
// after it was freed (rewind of the last block).
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single thread of execution; no reference outlives this call.
        let state = unsafe { &mut *self.0.get() };
        let Some(start) = state.next.checked_next_multiple_of(layout.align()) else {
            return core::ptr::null_mut();
        };
        match start.checked_add(layout.size()) {
            Some(end) if end <= state.end => {
                state.next = end;
                start as *mut u8
            }
            _ => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: single thread of execution.
        let state = unsafe { &mut *self.0.get() };
        if ptr as usize + layout.size() == state.next {
            state.next = ptr as usize;
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        {
            // SAFETY: single thread of execution; the borrow ends before the
            // fallback below re-enters the allocator.
            let state = unsafe { &mut *self.0.get() };
            if ptr as usize + layout.size() == state.next {
                match (ptr as usize).checked_add(new_size) {
                    Some(end) if end <= state.end => {
                        state.next = end;
                        return ptr;
                    }
                    _ => return core::ptr::null_mut(),
                }
            }
        }
        // SAFETY: `layout.align()` is a valid alignment (it came from a
        // Layout) and the caller guarantees new_size does not overflow it.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarding the caller's guarantees to our own alloc.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for min(old, new) bytes and are
            // disjoint (the new one was carved past the old one).
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: ptr was allocated with `layout` by us.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}
