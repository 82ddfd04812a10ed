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

/// How the runs of output pixels of `images` images (`runs` each: rows, or stretches of a
/// plane) and `panels` panels of output channels split into parallel tasks of equal size: a
/// task takes `runs_per_task` consecutive runs of one image through `panels_per_block`
/// consecutive panels. The pixel tiles keep the blocks of panels, and hand out single runs,
/// done in pieces of at most `runs_per_task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RunsByPanels {
    pub(super) runs_per_task: usize,
    pub(super) run_tasks: usize,
    pub(super) panels_per_block: usize,
    pub(super) panel_blocks: usize,
}

impl RunsByPanels {
    /// The split whose busiest thread has the least work, counting one run through one panel
    /// as the unit and each thread taking `ceil(tasks / threads)` of the largest tasks; among
    /// those, the one nearest four tasks per thread, so that a thread slowed by other work
    /// leaves some of its share to the rest; then the one with the fewest panel blocks (the
    /// input rows a task reads stay in cache for all its panels). Splitting rows and channels apart (as
    /// [`row_tasks`] and [`channel_blocks`] do) gave small layers uneven shares: 20 rows of 8
    /// panels on 2 threads became 7 tasks of 3 rows, 4 for one thread and 3 for the other.
    pub(super) fn new(images: usize, runs: usize, panels: usize, threads: usize) -> Self {
        let wanted = 4 * threads.max(1);
        let mut best: Option<((usize, usize, usize), RunsByPanels)> = None;
        // More tasks than twice the wanted number only add overhead; so do more panel blocks
        // than the wanted number of tasks.
        for run_tasks in 1..=runs.clamp(1, 2 * wanted) {
            let runs_per_task = runs.max(1).div_ceil(run_tasks);
            for panel_blocks in 1..=panels.clamp(1, wanted) {
                let panels_per_block = panels.max(1).div_ceil(panel_blocks);
                let split = RunsByPanels {
                    runs_per_task,
                    run_tasks: runs.max(1).div_ceil(runs_per_task),
                    panels_per_block,
                    panel_blocks: panels.max(1).div_ceil(panels_per_block),
                };
                let tasks = images.max(1) * split.run_tasks * split.panel_blocks;
                let busiest = tasks.div_ceil(threads.max(1)) * runs_per_task * panels_per_block;
                let key = (busiest, tasks.abs_diff(wanted), split.panel_blocks);
                if best.is_none_or(|(best_key, _)| key < best_key) {
                    best = Some((key, split));
                }
            }
        }
        best.expect("the loops run at least once").1
    }

    #[cfg(test)]
    pub(super) fn tasks(&self, images: usize) -> usize {
        images * self.run_tasks * self.panel_blocks
    }
}

/// Output rows per task and the number of such tasks, for `units` images times groups: about
/// four tasks per thread in all.
pub(super) fn row_tasks(oh: usize, units: usize, threads: usize) -> (usize, usize) {
    let rows_per_task = oh.div_ceil((4 * threads).div_ceil(units).clamp(1, oh));
    (rows_per_task, oh.div_ceil(rows_per_task))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every run and panel of every image in exactly one task.
    fn covers(split: RunsByPanels, runs: usize, panels: usize) {
        assert!(split.runs_per_task * split.run_tasks >= runs && split.runs_per_task * (split.run_tasks - 1) < runs, "{split:?}");
        assert!(split.panels_per_block * split.panel_blocks >= panels && split.panels_per_block * (split.panel_blocks - 1) < panels, "{split:?}");
    }

    #[test]
    fn runs_by_panels_share_small_layers_evenly() {
        // 20 rows of 8 panels on 2 threads: 8 tasks of 5 rows by 4 panels, 80 units each.
        let split = RunsByPanels::new(1, 20, 8, 2);
        assert_eq!(split, RunsByPanels { runs_per_task: 5, run_tasks: 4, panels_per_block: 4, panel_blocks: 2 });
        // 20 rows of 2 panels: 8 tasks of 5 rows by one panel.
        assert_eq!(RunsByPanels::new(1, 20, 2, 2), RunsByPanels { runs_per_task: 5, run_tasks: 4, panels_per_block: 1, panel_blocks: 2 });
        // Large layers keep whole panels and four tasks per thread.
        assert_eq!(RunsByPanels::new(1, 160, 2, 2), RunsByPanels { runs_per_task: 20, run_tasks: 8, panels_per_block: 2, panel_blocks: 1 });
        for (images, runs, panels, threads) in [(1, 1, 1, 1), (2, 7, 3, 2), (1, 320, 1, 2), (4, 20, 8, 2), (1, 13, 5, 3), (1, 3, 1, 8)] {
            let split = RunsByPanels::new(images, runs, panels, threads);
            covers(split, runs, panels);
            // Never more work for the busiest thread than splitting rows and channels apart.
            let busiest = split.tasks(images).div_ceil(threads) * split.runs_per_task * split.panels_per_block;
            let (rows_per_task, row_tasks) = row_tasks(runs, images, threads);
            let (per_block, blocks) = channel_blocks(images * row_tasks, panels, 1, threads);
            assert!(busiest <= (images * row_tasks * blocks).div_ceil(threads) * rows_per_task * per_block, "{split:?}");
        }
    }
}
