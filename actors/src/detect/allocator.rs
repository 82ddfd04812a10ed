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
