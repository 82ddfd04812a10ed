//! How a convolution's work is split into parallel tasks and sized for the caches: tiles of
//! pixels, blocks of output channels when a layer has few pixels, and each worker's scratch
//! buffers.

use super::super::cache;
use super::super::pack::PackedB;

/// Output pixels per tile: a tile's column matrix (`K x TILE` floats) should fit in L2. Tiles
/// are whole panels of `nr` columns: a tile ending inside a panel would run the microkernel's
/// full width for its last columns, through a buffer.
pub(super) fn tile_width(k: usize, pixels: usize, tasks_wanted: usize, nr: usize) -> usize {
    let by_cache = (cache::L2_FLOATS / k.max(1)).clamp(64, 4096);
    let by_parallelism = pixels.div_ceil(tasks_wanted.max(1));
    by_cache.min(by_parallelism).max(nr).div_ceil(nr) * nr
}

/// Blocks of a group's `m_g` output channels, `(channels per block, blocks)`, for `tasks` tasks
/// over pixels or rows: one block when those keep every thread busy twice over, more for small
/// late layers (few pixels), so that all cores work. Blocks start on microkernel panels of
/// `mr` rows.
pub(super) fn channel_blocks(tasks: usize, m_g: usize, mr: usize, threads: usize) -> (usize, usize) {
    let m_blocks = if tasks >= 2 * threads { 1 } else { (2 * threads).div_ceil(tasks).min(m_g.div_ceil(16)) }.max(1);
    let m_block = m_g.div_ceil(m_blocks).div_ceil(mr) * mr;
    (m_block, m_g.div_ceil(m_block))
}

thread_local! {
    /// Each rayon worker's reusable buffers: the patch matrix (portable path) and packed panels
    /// (pointwise convolutions).
    /// Kept across tasks and calls so no tile allocates or zero-fills memory.
    pub(super) static SCRATCH: std::cell::RefCell<(Vec<f32>, PackedB)> = const { std::cell::RefCell::new((Vec::new(), PackedB::new())) };
}

/// Output rows per task and the number of such tasks, for `units` images times groups: about
/// four tasks per thread in all.
pub(super) fn row_tasks(oh: usize, units: usize, threads: usize) -> (usize, usize) {
    let rows_per_task = oh.div_ceil((4 * threads).div_ceil(units).clamp(1, oh));
    (rows_per_task, oh.div_ceil(rows_per_task))
}
