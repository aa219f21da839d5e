//! Runtime support for `no_std` guests, which must not link std: on
//! `wasm32-wasip2` std imports `wasi:cli` and `wasi:io` for its panic output,
//! and a pure saga step may import nothing.
//!
//! The kernel runs every invocation in a fresh instance, so memory never needs
//! to be given back: a bump allocator that grows linear memory is enough, and
//! the instance's memory limit bounds it. Link it with `use plugin_heap as _;`.
#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::arch::wasm32;
use core::cell::Cell;

const PAGE: usize = 65_536;

struct BumpHeap {
    /// Next free byte; 0 until the first allocation.
    next: Cell<usize>,
    /// End of the memory grown so far.
    end: Cell<usize>,
}

// A component instance is single-threaded.
unsafe impl Sync for BumpHeap {}

#[global_allocator]
static HEAP: BumpHeap = BumpHeap {
    next: Cell::new(0),
    end: Cell::new(0),
};

unsafe impl GlobalAlloc for BumpHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.next.get() == 0 {
            // The linker places the heap after the stack and the data, and
            // the initial memory usually has room there. Using it first
            // spares small calls a `memory.grow`, which costs the host
            // system calls on every instance.
            unsafe extern "C" {
                static __heap_base: u8;
            }
            self.next.set(core::ptr::addr_of!(__heap_base) as usize);
            self.end.set(wasm32::memory_size(0) * PAGE);
        }
        let start = (self.next.get() + layout.align() - 1) & !(layout.align() - 1);
        let Some(stop) = start.checked_add(layout.size()) else {
            return core::ptr::null_mut();
        };
        if stop > self.end.get() {
            let pages = (stop - self.end.get()).div_ceil(PAGE);
            if wasm32::memory_grow(0, pages) == usize::MAX {
                return core::ptr::null_mut();
            }
            self.end.set(self.end.get() + pages * PAGE);
        }
        self.next.set(stop);
        start as *mut u8
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

/// The canonical ABI's allocator, which std would otherwise export.
///
/// # Safety
/// Called by the host with a pointer this allocator returned (or null) and a
/// valid alignment.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    if new_len == 0 {
        return align as *mut u8;
    }
    let Ok(layout) = Layout::from_size_align(new_len, align) else {
        wasm32::unreachable()
    };
    let ptr = unsafe { HEAP.alloc(layout) };
    if ptr.is_null() {
        wasm32::unreachable()
    }
    if old_len > 0 {
        unsafe { core::ptr::copy_nonoverlapping(old_ptr, ptr, old_len.min(new_len)) };
    }
    ptr
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // A trap: the host reports it as a plugin error.
    wasm32::unreachable()
}
