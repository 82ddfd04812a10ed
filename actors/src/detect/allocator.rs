//! The C allocator's settings for the engine's way of allocating memory.
//!
//! Each step of a model allocates its output (up to 6.5 MB a frame at 640x640) and frees its
//! inputs, so a call allocates and frees some hundred large blocks, and the next call the same
//! ones again. glibc serves blocks over a threshold with `mmap` and gives the top of its heap
//! back to the system once enough of it is free; the threshold adapts to the sizes freed, but
//! not to this pattern: with four frames a call (run one after the other, YOLO11n, 2 threads)
//! each call page-faulted 5,000-7,000 times, 20-28 MB of fresh zeroed pages, and took 169-195
//! ms against 164-166 ms with the settings below (six runs of `bench-model --batch 4`), which
//! brought it to 2,000 faults a call. One frame a call faulted little either way.
//!
//! So blocks up to 32 MiB (glibc's largest threshold) come from the heap, and up to 1 GiB of
//! freed heap stays with the process for the next call: its resident memory stays at its
//! peak rather than shrinking between calls. Settings the user made through glibc's
//! environment variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) are left alone.
//!
//! The blocks stay on the system's page size: with transparent huge pages for every block (the
//! kernel's setting `always` against `madvise`, eight rounds alternating, YOLOv12n at 2 threads
//! on an AMD EPYC of the Zen 4 family) the calls came out level (0.94-1.03 of their time), so
//! the engine does not ask for them.
//!
//! [`LineAligned`] is a global allocator for the host program (the `streamdet` binary uses it)
//! that starts every block of 4 KiB and more on a cache line.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

/// The largest block served from the heap: glibc's maximum on 64-bit systems.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of the heap that is kept rather than returned to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Applies the settings once per process (see the module's notes); a no-op where the C
/// library is not glibc.
pub(crate) fn keep_freed_memory_for_the_next_call() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let set_by_user = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"].iter().any(|v| std::env::var_os(v).is_some());
            if !set_by_user {
                // SAFETY: `mallopt` only changes the allocator's parameters, which glibc reads
                // under its own locks; it may be called from any thread at any time.
                unsafe {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
                }
            }
        });
    }
}

/// The system allocator, with blocks of [`LINE_ALIGNED_FROM`] bytes and more starting on a
/// 64-byte cache line: a program's `#[global_allocator]`.
///
/// glibc aligns blocks to 16 bytes, so a tensor's rows of floats start anywhere in a line, and
/// a kernel that loads 16 floats (64 bytes) at a time from them reads two lines for most of
/// its loads. YOLOv12n, 2 threads, the same build with and without (`STREAMDET_LINE_ALIGNED=off`)
/// in alternating rounds, two sittings: the pointwise layers with the pixels in the lanes took
/// 0.86-0.96 of their time, set against the layers in the same rounds that load nothing so.
/// `STREAMDET_LINE_ALIGNED=off` (read once, at the first allocation) leaves every block as the
/// system allocator makes it, to compare.
pub struct LineAligned;

/// Blocks from this size on start on a cache line.
pub const LINE_ALIGNED_FROM: usize = 4096;

impl LineAligned {
    /// The layout the system allocator is asked for: `layout`, or the same size aligned to a
    /// cache line. It depends only on the size and the alignment asked, so a block is freed
    /// with the layout it was allocated with.
    fn layout(layout: Layout) -> Layout {
        if layout.size() >= LINE_ALIGNED_FROM && layout.align() < 64 && line_aligned() {
            // A size that fits a `Layout` of a smaller alignment fits one of 64 bytes: every
            // size asked for is at most `isize::MAX` rounded down to its alignment, and the
            // block is no larger.
            Layout::from_size_align(layout.size(), 64).unwrap_or(layout)
        } else {
            layout
        }
    }
}

/// Whether [`LineAligned`] aligns large blocks (`STREAMDET_LINE_ALIGNED` is not `off`), read
/// once; the environment is read through `getenv`, which does not allocate.
fn line_aligned() -> bool {
    // 0: not read yet, 1: off, 2: on.
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: the name is a NUL-terminated C string; `getenv` returns null or a
            // NUL-terminated string of the environment, read before anything else runs here.
            let off = unsafe {
                let value = libc::getenv(c"STREAMDET_LINE_ALIGNED".as_ptr());
                !value.is_null() && std::ffi::CStr::from_ptr(value).to_bytes() == b"off"
            };
            STATE.store(if off { 1 } else { 2 }, Ordering::Relaxed);
            !off
        }
        state => state == 2,
    }
}

// SAFETY: every call goes to the system allocator with `LineAligned::layout` of the layout
// asked, which has the same size and at least the alignment asked, and which is the same for
// the allocation and the release of a block (it depends on the size and alignment alone,
// and on a setting read once). `realloc` moves a block whose alignment changes with its size
// into a new block itself.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract; the layout has a non-zero size, as asked.
        unsafe { System.alloc(Self::layout(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(Self::layout(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated with `Self::layout(layout)` (the trait's contract and
        // this impl's).
        unsafe { System.dealloc(ptr, Self::layout(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = Self::layout(layout);
        let Ok(asked) = Layout::from_size_align(new_size, layout.align()) else { return std::ptr::null_mut() };
        let new = Self::layout(asked);
        // SAFETY: `ptr` holds a block of `old`; a new block of `new` is written only within
        // the smaller of the two sizes; the old block is freed once copied.
        unsafe {
            if new.align() == old.align() {
                return System.realloc(ptr, old, new_size);
            }
            let moved = System.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                System.dealloc(ptr, old);
            }
            moved
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Runs in a process of its own (the test below starts it), where no other test allocates
    /// meanwhile.
    #[test]
    #[ignore = "runs in a child process of large_blocks_come_from_the_heap_and_stay_after_they_are_freed"]
    fn allocator_child() {
        keep_freed_memory_for_the_next_call();
        // SAFETY: `mallinfo2` only reads the allocator's statistics.
        let info = || unsafe { libc::mallinfo2() };
        let mapped_before = info().hblkhd;
        let block: Vec<f32> = Vec::with_capacity(4 << 20); // 16 MiB
        assert_eq!(info().hblkhd, mapped_before, "a 16 MiB block was mapped on its own");
        drop(std::hint::black_box(block));
        let free_in_heap = info().fordblks;
        assert!(free_in_heap >= 16 << 20, "only {free_in_heap} bytes free in the heap after freeing 16 MiB");
    }

    #[test]
    fn line_aligned_blocks_start_on_a_line_and_keep_their_contents_as_they_grow() {
        let on_a_line = |p: *mut u8| (p as usize).is_multiple_of(64);
        // SAFETY: called below on blocks of at least `len` bytes, all written.
        let bytes = |p: *mut u8, len: usize| unsafe { std::slice::from_raw_parts(p, len).to_vec() };
        // SAFETY: every block is allocated, written, read and freed with the layouts and sizes
        // it has.
        unsafe {
            let small = Layout::from_size_align(100, 4).unwrap();
            let p = LineAligned.alloc(small);
            assert!(!p.is_null());
            p.write_bytes(7, 100);
            // Growing past the threshold moves it onto a line, contents kept.
            let p = LineAligned.realloc(p, small, 10_000);
            assert!(on_a_line(p) && bytes(p, 100) == [7; 100]);
            p.add(100).write_bytes(9, 9_900);
            let large = Layout::from_size_align(10_000, 4).unwrap();
            let p = LineAligned.realloc(p, large, 50_000);
            assert!(on_a_line(p) && bytes(p, 100) == [7; 100] && bytes(p.add(100), 9_900) == vec![9; 9_900]);
            // Shrinking below it keeps the first bytes.
            let p = LineAligned.realloc(p, Layout::from_size_align(50_000, 4).unwrap(), 50);
            assert_eq!(bytes(p, 50), [7; 50]);
            LineAligned.dealloc(p, Layout::from_size_align(50, 4).unwrap());
            let zeroed = Layout::from_size_align(LINE_ALIGNED_FROM, 8).unwrap();
            let z = LineAligned.alloc_zeroed(zeroed);
            assert!(on_a_line(z) && bytes(z, LINE_ALIGNED_FROM).iter().all(|&b| b == 0));
            LineAligned.dealloc(z, zeroed);
            // An alignment larger than a line is kept.
            let page = Layout::from_size_align(8192, 4096).unwrap();
            let q = LineAligned.alloc(page);
            assert!((q as usize).is_multiple_of(4096));
            LineAligned.dealloc(q, page);
        }
    }

    #[test]
    fn large_blocks_come_from_the_heap_and_stay_after_they_are_freed() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "detect::allocator::tests::allocator_child", "--test-threads", "1"])
            .env_remove("MALLOC_MMAP_THRESHOLD_")
            .env_remove("MALLOC_TRIM_THRESHOLD_")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    }
}
