//! Convolutions without im2col: the input is copied once into zero-padded planes split by
//! stride phase, and the microkernel reads every patch row in place at a fixed offset.

use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;

use super::super::SendPtr;
use super::super::isa::{Isa, MAX_NR};
#[cfg(target_arch = "x86_64")]
use super::super::x86_64;
use super::super::{cache, tiling};
use super::schedule::{self, SCRATCH};
use super::{BLOCK, ChannelLayout, Conv2d, ConvInput, OutputPlanes, add_assign, zeroed};

impl Conv2d {
    /// A convolution without im2col. The input is copied once into zero-padded planes split by
    /// stride phase (for stride 2: even and odd rows times even and odd columns), so that the
    /// input a kernel tap sees for 16 consecutive output pixels is 16 consecutive floats of one
    /// phase plane; for each output row the microkernel then reads every patch row in place, at
    /// a fixed offset from the row's start (`gemm_offsets`). Output rows run in parallel.
    /// Into `out` (`planes`), adding `residual` last.
    pub(super) fn run_direct(&self, input: &ConvInput, planes: OutputPlanes, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let n = input.n;
        let OutputPlanes { oh, ow, pitch } = planes;
        let g = self.spec.groups;
        let (cin_g, m_g) = (self.spec.in_channels / g, self.spec.out_channels / g);
        let layout = self.phase_layout(input.h, input.w);
        let (channel_len, wp) = (layout.sh * layout.sw * layout.plane, layout.wp);
        let padded = phase_planes(input, &layout, self.isa());
        let offsets = self.tap_offsets(&layout);
        let threads = parallel::threads();
        let units = n * g;
        let (rows_per_task, row_tasks) = schedule::row_tasks(oh, units, threads);
        // Few rows (small late layers): split the output channels too, so both cores work.
        let (m_block, m_blocks) = schedule::channel_blocks(units * row_tasks, m_g, self.panel_rows(), threads);
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        let padded = &padded;
        parallel::for_each(units * row_tasks * m_blocks, |task| {
            let mb = task % m_blocks;
            let row_task = (task / m_blocks) % row_tasks;
            let (batch, group) = (task / m_blocks / row_tasks / g, task / m_blocks / row_tasks % g);
            let m0 = mb * m_block;
            let rows = m_block.min(m_g - m0);
            let channel0 = group * m_g + m0;
            let image = &padded[(batch * self.spec.in_channels + group * cin_g) * channel_len..];
            let task_rows = row_task * rows_per_task..((row_task + 1) * rows_per_task).min(oh);
            let packed = &self.packed[group];
            if !ow.is_multiple_of(packed.isa().nr()) || cache::rows_share_cache_sets(pitch) {
                // Rows that end inside a panel would waste its last columns (a 40-pixel row is
                // 1.25 panels of 32): the product runs over several rows at once instead, into
                // a compact tile (which also suits outputs whose channel planes alias).
                // SAFETY: as below, for the rows of this task.
                unsafe { self.direct_rows_flattened(group, m0..m0 + rows, image, &offsets, wp, ow, pitch, task_rows, batch, residual, out_ptr) };
                return;
            }
            for oy in task_rows {
                let first = (batch * self.spec.out_channels + channel0) * pitch + oy * ow;
                // SAFETY: this task writes rows `channel0..channel0+rows` of output row `oy` of
                // image `batch` — a region no other task writes — inside `out`. Each patch row
                // starts at `image[oy * wp + offsets[kk]]` and the kernel reads at most
                // `ow.div_ceil(nr) * nr` floats from there: within the padded planes, or the
                // slack after the last one.
                unsafe {
                    let dst = out_ptr.get().add(first);
                    let epilogue = self.epilogue(channel0..channel0 + rows, residual.map(|r| (r[first..].as_ptr(), pitch)));
                    tiling::gemm_offsets(&self.packed[group], m0..m0 + rows, image.as_ptr().add(oy * wp), &offsets, ow, dst, pitch, Some(&epilogue));
                }
            }
        });
    }

    /// The phase planes of this convolution's input (`h x w`): each channel becomes
    /// `sh * sw` zero-padded planes of `hp x wp`.
    pub(super) fn phase_layout(&self, h: usize, w: usize) -> PhaseLayout {
        let (sh, sw) = self.spec.stride;
        let (pt, pl, pb, pr) = self.spec.pads;
        let (hp, wp) = ((h + pt + pb).div_ceil(sh), (w + pl + pr).div_ceil(sw));
        PhaseLayout { h, w, pt, pl, sh, sw, plane: hp * wp, hp, wp }
    }

    /// Where each tap `kk = (c, ky, kx)` (the weights' order) of output pixel `(0, 0)` lies in
    /// a group's phase planes (`layout`); output pixel `(oy, ox)` reads it `oy * wp + ox`
    /// further on. Tap `(c, ky, kx)` of `(oy, ox)` is in phase `((ky*dh) % sh, (kx*dw) % sw)`
    /// of channel `c`, at row `oy + ky*dh/sh`, column `ox + kx*dw/sw`.
    pub(super) fn tap_offsets(&self, layout: &PhaseLayout) -> Vec<usize> {
        let (kh, kw) = self.spec.kernel;
        let (dh, dw) = self.spec.dilation;
        let &PhaseLayout { sh, sw, plane, wp, .. } = layout;
        let channel_len = sh * sw * plane;
        // The parts of each kernel row and of each kernel column, worked out once rather than
        // by six divisions per tap, which showed in the serial part of a call (the 33 3x3
        // layers of YOLOv12n: 0.47-0.48 -> 0.41-0.46 ms a call, a slow spell).
        let rows: Vec<usize> = (0..kh).map(|ky| (ky * dh % sh) * sw * plane + (ky * dh / sh) * wp).collect();
        let columns: Vec<usize> = (0..kw).map(|kx| (kx * dw % sw) * plane + kx * dw / sw).collect();
        let mut offsets = Vec::with_capacity(self.spec.in_channels / self.spec.groups * kh * kw);
        for c in 0..self.spec.in_channels / self.spec.groups {
            for row in &rows {
                offsets.extend(columns.iter().map(|column| c * channel_len + row + column));
            }
        }
        offsets
    }

    /// Output rows `out_rows` of channels `channels` (of image `batch`, relative to `group`'s
    /// first) of a convolution run in place
    /// ([`run_direct`](Self::run_direct)), as products over several rows at once: output pixel
    /// `(oy, ox)` is column `(oy - oy0) * wp + ox` of a product whose `B` rows run along the
    /// padded phase planes, `wp` floats per row, so one product covers `oy0..oy1` with the
    /// `wp - ow` columns between rows computed and dropped. The product lands in a scratch
    /// tile (bias and activation applied by the kernel); its rows are copied out, adding the
    /// residual on the way.
    ///
    /// # Safety
    /// As for the row-by-row loop in `run_direct`: this task alone writes these channels of
    /// these rows of `out`; `image` has the padded planes of the group's channels and the
    /// slack after them.
    #[allow(clippy::too_many_arguments)]
    unsafe fn direct_rows_flattened(
        &self,
        group: usize,
        channels: std::ops::Range<usize>,
        image: &[f32],
        offsets: &[usize],
        wp: usize,
        ow: usize,
        pitch: usize,
        out_rows: std::ops::Range<usize>,
        batch: usize,
        residual: Option<&[f32]>,
        out: SendPtr,
    ) {
        // Columns per product: about 32 panels, so that the scratch tile stays in L2.
        const COLUMNS: usize = cache::SCRATCH_TILE_COLUMNS;
        let packed = &self.packed[group];
        let channel0 = group * (self.spec.out_channels / self.spec.groups) + channels.start;
        let rows = channels.len();
        let per_product = (COLUMNS / wp).max(1);
        let epilogue = self.epilogue(channel0..channel0 + rows, None);
        SCRATCH.with_borrow_mut(|(scratch, _)| {
            let mut oy0 = out_rows.start;
            while oy0 < out_rows.end {
                let oy1 = (oy0 + per_product).min(out_rows.end);
                let width = (oy1 - oy0 - 1) * wp + ow;
                // Grown, never cleared: the product writes every element it covers.
                if scratch.len() < rows * width {
                    scratch.resize(rows * width, 0.0);
                }
                // SAFETY: the caller's contract; the `B` rows start at `oy0 * wp + offsets[kk]`
                // and are read for at most `width.div_ceil(nr) * nr` floats, which ends where
                // the row-by-row product of row `oy1 - 1` ends: inside the planes or the slack.
                unsafe {
                    tiling::gemm_offsets(packed, channels.clone(), image.as_ptr().add(oy0 * wp), offsets, width, scratch.as_mut_ptr(), width, Some(&epilogue))
                };
                for r in 0..rows {
                    for oy in oy0..oy1 {
                        let first = (batch * self.spec.out_channels + channel0 + r) * pitch + oy * ow;
                        // SAFETY: row `oy` of output channel `channel0 + r`: this task's alone.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(first), ow) };
                        dst.copy_from_slice(&scratch[r * width + (oy - oy0) * wp..][..ow]);
                        if let Some(residual) = residual {
                            add_assign(dst, &residual[first..][..ow]);
                        }
                    }
                }
                oy0 = oy1;
            }
        });
    }
}

thread_local! {
    /// Each worker's rows of a block of 8 channels, taken out of blocks for [`phase_planes`].
    static UNBLOCKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Every channel of every image of `input` copied into its zero-padded phase planes
/// (`layout`), one channel after another, followed by [`MAX_NR`] zeros: a microkernel tile
/// that starts inside the last plane may read that far past it. An input in blocks of 8
/// channels is split a row of a block at a time: Winograd's planes with AVX2 by
/// [`split_block_row_by_4`](x86_64::avx2::split_block_row_by_4), for all 8 channels at once;
/// others through 8 rows taken out of the block (which stay in L1), each split as a plane's.
/// (Taking each row out of its block and then splitting the 8 rows, Winograd's layers took
/// 1.04-1.09 of their time on planes; split at once, 0.94-0.96.) The loop hands out channels:
/// handing out bands of rows instead, each thread splitting the rows it wrote in the layer
/// before and reads in this one, the layers that read phase planes took 1.05-1.21 of their time
/// in YOLOv12n on 2 threads (1.3-1.5 at 20x20), with the vCPUs close on the host or apart:
/// the short phase rows cut into bands cost more than the reads across the cores saved.
pub(super) fn phase_planes(input: &ConvInput, layout: &PhaseLayout, isa: Option<Isa>) -> Vec<f32> {
    let channels = input.channels();
    let channel_len = layout.sh * layout.sw * layout.plane;
    let planes_len = input.n * channels * channel_len;
    let mut padded: Vec<f32> = Vec::with_capacity(planes_len + MAX_NR);
    zeroed(&mut padded.spare_capacity_mut()[planes_len..planes_len + MAX_NR]);
    match input.layout() {
        ChannelLayout::Planes => {
            let padding = PhasePadding::new(layout, splits_whole_rows(isa, layout));
            parallel::for_each_chunk_mut(&mut padded.spare_capacity_mut()[..planes_len], channel_len, |index, dst| {
                // Only the padding is zeroed (the pixels are written next), here rather than
                // by the allocator: in parallel, and just before the copy.
                padding.zero(dst);
                split_pixels(dst, input.plane(index / channels, index % channels), layout, isa);
            })
        }
        ChannelLayout::Blocked => {
            let (blocks, w) = (channels / BLOCK, input.w);
            let padding = PhasePadding::new(layout, splits_whole_rows(isa, layout));
            parallel::for_each_chunk_mut(&mut padded.spare_capacity_mut()[..planes_len], BLOCK * channel_len, |index, dst| {
                let block = input.block(index / blocks, index % blocks * BLOCK);
                dst.chunks_exact_mut(channel_len).for_each(|dst| padding.zero(dst));
                #[cfg(target_arch = "x86_64")]
                if isa == Some(Isa::Avx2) && layout.sw == 4 {
                    // Winograd's planes: each row of the block split for its 8 channels at once.
                    for (y, row) in block.chunks_exact(BLOCK * w).enumerate() {
                        let (py, y2) = ((y + layout.pt) % layout.sh, (y + layout.pt) / layout.sh);
                        let at = py * layout.sw * layout.plane + y2 * layout.wp;
                        // SAFETY: the CPU supports AVX2 (the weights were packed for it).
                        unsafe { x86_64::avx2::split_block_row_by_4(row, layout.pl, dst, (channel_len, layout.plane, at), layout.wp) };
                    }
                    return;
                }
                UNBLOCKED.with_borrow_mut(|rows| {
                    // Grown, never cleared: `unblock` writes every float of the 8 rows.
                    if rows.len() < BLOCK * w {
                        rows.resize(BLOCK * w, 0.0);
                    }
                    for (y, row) in block.chunks_exact(BLOCK * w).enumerate() {
                        unblock(row, w, rows);
                        // Row `y` alone: a layout of one row, `y` rows further into the padding.
                        let row_layout = PhaseLayout { h: 1, pt: layout.pt + y, ..*layout };
                        for (dst, src) in dst.chunks_exact_mut(channel_len).zip(rows.chunks_exact(w)) {
                            split_pixels(dst, src, &row_layout, isa);
                        }
                    }
                });
            });
        }
    }
    // SAFETY: every element was written: the padding and the pixels of each plane (which
    // partition it, see `PhasePadding`) by the loop above, the slack before it.
    unsafe { padded.set_len(planes_len + MAX_NR) };
    padded
}

/// The pixels of one channel's plane (`src`) into its phase planes (`dst`, `layout`), with
/// the vector splitters `isa` has.
fn split_pixels(dst: &mut [MaybeUninit<f32>], src: &[f32], layout: &PhaseLayout, isa: Option<Isa>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F (the weights were packed for it).
        Some(Isa::Avx512) => unsafe { split_phases_avx512(dst, src, layout) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 (the weights were packed for it).
        Some(Isa::Avx2) => unsafe { split_phases_avx2(dst, src, layout) },
        _ => split_phases(dst, src, layout),
    }
}

/// The 8 planes (`[8][pixels]`, into `planes`) of a block of 8 channels (`[pixels][8]`).
fn unblock(block: &[f32], pixels: usize, planes: &mut [f32]) {
    for (p, pixel) in block[..BLOCK * pixels].chunks_exact(BLOCK).enumerate() {
        for (c, &value) in pixel.iter().enumerate() {
            planes[c * pixels + p] = value;
        }
    }
}

/// Where one input channel's pixels go among its zero-padded stride-phase planes (see
/// [`Conv2d::run_direct`]).
/// Every input pixel must fall inside the planes: `hp * sh >= h + pt` and `wp * sw >= w + pl`.
pub(super) struct PhaseLayout {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) pt: usize,
    pub(super) pl: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    /// Floats per phase plane; its rows and their length.
    pub(super) plane: usize,
    pub(super) hp: usize,
    pub(super) wp: usize,
}

/// The rows (or columns) of a phase plane that hold pixels: place `i` of phase `phase` holds
/// input index `i * stride + phase - pad`, which must lie in `0..len`; `places` in all.
fn pixel_span(len: usize, pad: usize, stride: usize, phase: usize, places: usize) -> std::ops::Range<usize> {
    let first = pad.saturating_sub(phase).div_ceil(stride);
    let end = if len + pad > phase { ((len - 1 + pad - phase) / stride + 1).min(places) } else { 0 };
    first.min(end)..end
}

/// Whether the splitter that [`phase_planes`] runs for `isa` writes every place of the phase
/// rows that hold pixels, their padding columns included: the vector splitters for stride 4
/// along rows and columns (`avx2::split_plane_by_4`, `avx512::split_plane_by_4`) do.
fn splits_whole_rows(isa: Option<Isa>, layout: &PhaseLayout) -> bool {
    cfg!(target_arch = "x86_64") && matches!(isa, Some(Isa::Avx2 | Isa::Avx512)) && layout.sw == 4 && layout.sh == 4
}

/// The padding of one channel's phase planes: every place that [`split_phases`] does not
/// write; with `whole_rows` (the splitter writes the padding columns of the rows that hold
/// pixels, [`splits_whole_rows`]), only the rows that hold none. As ranges of floats from the
/// channel's first, adjacent ones merged, worked out once for all the channels of a layer:
/// Winograd's planes have 16 phases of short rows, where working the ranges out again for each
/// channel (two divisions per phase and side) took as long as zeroing them.
struct PhasePadding(Vec<std::ops::Range<usize>>);

impl PhasePadding {
    fn new(layout: &PhaseLayout, whole_rows: bool) -> Self {
        let &PhaseLayout { h, w, pt, pl, sh, sw, plane, hp, wp } = layout;
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        let mut push = |range: std::ops::Range<usize>| match ranges.last_mut() {
            _ if range.is_empty() => {}
            Some(last) if last.end == range.start => last.end = range.end,
            _ => ranges.push(range),
        };
        for py in 0..sh {
            let rows = pixel_span(h, pt, sh, py, hp);
            for px in 0..sw {
                let cols = pixel_span(w, pl, sw, px, wp);
                let phase = (py * sw + px) * plane;
                push(phase..phase + rows.start * wp);
                if !whole_rows {
                    for row in rows.clone() {
                        let first = phase + row * wp;
                        push(first..first + cols.start);
                        push(first + cols.end..first + wp);
                    }
                }
                push(phase + rows.end * wp..phase + hp * wp);
            }
        }
        PhasePadding(ranges)
    }

    fn zero(&self, dst: &mut [MaybeUninit<f32>]) {
        for range in &self.0 {
            dst[range.clone()].fill(MaybeUninit::new(0.0));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn split_phases_avx2(dst: &mut [MaybeUninit<f32>], src: &[f32], layout: &PhaseLayout) {
    match layout.sw {
        4 if layout.sh == 4 => x86_64::avx2::split_plane_by_4(src, (layout.w, layout.pt, layout.pl), dst, (layout.plane, layout.wp)),
        _ => split_phases(dst, src, layout),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn split_phases_avx512(dst: &mut [MaybeUninit<f32>], src: &[f32], layout: &PhaseLayout) {
    match layout.sw {
        4 if layout.sh == 4 => x86_64::avx512::split_plane_by_4(src, (layout.w, layout.pt, layout.pl), dst, (layout.plane, layout.wp)),
        _ => split_phases(dst, src, layout),
    }
}

/// Copies one channel (`src`, rows of `w`) into its phase planes (`dst`): pixel
/// `(y, x)` goes to phase `((y + pt) % sh, (x + pl) % sw)` at row `(y + pt) / sh`, column
/// `(x + pl) / sw`. Compiled for the CPU's vectors by the callers above: for stride 2 the
/// compiler then splits even and odd columns with vector shuffles.
#[inline(always)]
fn split_phases(dst: &mut [MaybeUninit<f32>], src: &[f32], layout: &PhaseLayout) {
    let &PhaseLayout { w, pt, pl, sh, sw, plane, wp, .. } = layout;
    for (y, row) in src.chunks_exact(w).enumerate() {
        let (py, y2) = ((y + pt) % sh, (y + pt) / sh);
        // Column x0 + k*sw lands at place (x0 + pl) / sw + k of its phase's row.
        let phase_row = |x0: usize| (py * sw + (x0 + pl) % sw) * plane + y2 * wp + (x0 + pl) / sw;
        match sw {
            1 => dst[phase_row(0)..][..w].iter_mut().zip(row).for_each(|(d, &v)| _ = d.write(v)),
            2 if w >= 2 => {
                // Both phases in one pass over the row: pairs (even, odd).
                let (even, odd) = (phase_row(0), phase_row(1));
                let pairs = row.chunks_exact(2);
                let last = pairs.remainder().first().copied();
                let (even_len, odd_len) = (w.div_ceil(2), w / 2);
                // The two rows lie in different planes: split `dst` between them.
                let (even_row, odd_row) = if even < odd {
                    let (head, tail) = dst.split_at_mut(odd);
                    (&mut head[even..][..even_len], &mut tail[..odd_len])
                } else {
                    let (head, tail) = dst.split_at_mut(even);
                    (&mut tail[..even_len], &mut head[odd..][..odd_len])
                };
                for ((e, o), pair) in even_row.iter_mut().zip(odd_row.iter_mut()).zip(pairs) {
                    e.write(pair[0]);
                    o.write(pair[1]);
                }
                if let Some(v) = last {
                    even_row[odd_len].write(v);
                }
            }
            _ => {
                for x0 in 0..sw.min(w) {
                    let start = phase_row(x0);
                    let count = (w - x0).div_ceil(sw);
                    dst[start..][..count].iter_mut().zip(row[x0..].iter().step_by(sw)).for_each(|(d, &v)| _ = d.write(v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_and_pixels_fill_every_phase_plane() {
        type Split = fn(&mut [MaybeUninit<f32>], &[f32], &PhaseLayout);
        let mut splits: Vec<(Option<Isa>, Split)> = vec![(None, split_phases)];
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::Avx2.supported() {
                // SAFETY: pushed only where the CPU has AVX2.
                splits.push((Some(Isa::Avx2), |d, s, l| unsafe { split_phases_avx2(d, s, l) }));
            }
            if Isa::Avx512.supported() {
                // SAFETY: pushed only where the CPU has AVX-512F.
                splits.push((Some(Isa::Avx512), |d, s, l| unsafe { split_phases_avx512(d, s, l) }));
            }
        }
        // (h, w, pad, stride, places past the last pixel's): stride 4 as Winograd lays it out
        // (one place more), with rows of one, two and three chunks of the vector splitters.
        let cases = [(7usize, 9usize, 1usize, 2usize, 0usize), (8, 6, 0, 2, 0), (5, 5, 2, 3, 0), (6, 7, 1, 1, 0), (4, 4, 3, 2, 0)];
        let by_4 = [(9, 9, 1, 4, 1), (6, 20, 1, 4, 1), (5, 83, 1, 4, 1), (3, 160, 1, 4, 1), (4, 30, 0, 4, 0), (5, 7, 2, 4, 2)];
        for ((h, w, pad, stride, extra), (isa, split)) in cases.into_iter().chain(by_4).flat_map(|case| splits.iter().map(move |&s| (case, s))) {
            let (hp, wp) = ((h + 2 * pad).div_ceil(stride) + extra, (w + 2 * pad).div_ceil(stride) + extra);
            let layout = PhaseLayout { h, w, pt: pad, pl: pad, sh: stride, sw: stride, plane: hp * wp, hp, wp };
            let src: Vec<f32> = (1..=h * w).map(|i| i as f32).collect();
            // NaN stands for memory nobody wrote.
            let mut dst = vec![MaybeUninit::new(f32::NAN); stride * stride * hp * wp];
            PhasePadding::new(&layout, splits_whole_rows(isa, &layout)).zero(&mut dst);
            split(&mut dst, &src, &layout);
            // SAFETY: every element was initialised (with NaN) when the vector was made.
            let planes: Vec<f32> = dst.iter().map(|v| unsafe { v.assume_init() }).collect();
            for (i, &v) in planes.iter().enumerate() {
                let (phase, y2, x2) = (i / (hp * wp), i / wp % hp, i % wp);
                let (y, x) = ((y2 * stride + phase / stride) as isize - pad as isize, (x2 * stride + phase % stride) as isize - pad as isize);
                let inside = (0..h as isize).contains(&y) && (0..w as isize).contains(&x);
                let want = if inside { src[y as usize * w + x as usize] } else { 0.0 };
                assert_eq!(v, want, "{isa:?}: {h}x{w} pad {pad} stride {stride}: phase {phase} ({y2}, {x2})");
            }
        }
    }

    #[test]
    fn a_blocked_input_gives_the_phase_planes_of_its_planes() {
        let isas = [None].into_iter().chain(super::super::super::isa::all_supported().into_iter().map(Some));
        // (images, channels, h, w, pad, stride): Winograd's layout (stride 4, one place more)
        // with rows of one to three vectors of places, and stride 2.
        let cases: [(usize, usize, usize, usize, usize, usize); 5] =
            [(1, 16, 9, 9, 1, 4), (2, 8, 6, 20, 1, 4), (1, 24, 5, 83, 1, 4), (1, 8, 4, 30, 0, 4), (2, 16, 7, 9, 1, 2)];
        for (isa, (n, channels, h, w, pad, stride)) in isas.flat_map(|isa| cases.into_iter().map(move |case| (isa, case))) {
            let extra = usize::from(stride == 4);
            let (hp, wp) = ((h + 2 * pad).div_ceil(stride) + extra, (w + 2 * pad).div_ceil(stride) + extra);
            let layout = PhaseLayout { h, w, pt: pad, pl: pad, sh: stride, sw: stride, plane: hp * wp, hp, wp };
            let planes: Vec<f32> = (0..n * channels * h * w).map(|i| (i % 997) as f32 - 400.0).collect();
            let blocks = super::super::input::planes_to_blocks(&planes, h * w);
            let part = |data| super::super::InputPart { data, channels, image_stride: channels * h * w, plane_stride: h * w, cold: false };
            let blocked = ConvInput::blocked(vec![part(&blocks)], n, h, w).expect("a blocked input");
            let want = phase_planes(&ConvInput::contiguous(&planes, n, channels, h, w), &layout, isa);
            assert_eq!(phase_planes(&blocked, &layout, isa), want, "{isa:?}: {n}x{channels}x{h}x{w} pad {pad} stride {stride}");
        }
    }
}
