//! Depthwise convolutions (one input channel per group): a direct kernel per channel plane,
//! compiled for the CPU's vectors; with AVX-512 or AVX2, small planes of stride 1 instead run
//! as many channels at a time as a vector has lanes, with the channels in the lanes.

use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;

#[cfg(target_arch = "x86_64")]
use super::super::SendPtr;
use super::super::activation::{Activation, bias_activation};
use super::super::isa::Isa;
use super::{BLOCK, ChannelLayout, Conv2d, ConvInput, OutputPlanes, add_assign, zeroed};

/// Output pixels below which a task takes several planes.
const SMALL_TASK_PIXELS: usize = 4096;

impl Conv2d {
    /// Into `out` (`planes`), adding `residual` last.
    pub(super) fn run_depthwise(&self, input: &ConvInput, planes: OutputPlanes, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let (h, w) = (input.h, input.w);
        #[cfg(target_arch = "x86_64")]
        if self.run_channel_lanes(input, planes, ChannelLayout::Planes, residual, out) {
            return;
        }
        let OutputPlanes { oh, ow, pitch } = planes;
        let channels = self.spec.out_channels;
        let isa = Isa::detect();
        let (kh, kw) = self.spec.kernel;
        let (_, pl, _, pr) = self.spec.pads;
        // Tap `(ky, kx)` of the flat kernel reads the padded plane this far past the output.
        let wp = w + pl + pr;
        let offsets: Vec<usize> = (0..kh * kw).map(|t| t / kw * wp + t % kw).collect();
        let offsets = &offsets;
        // Small planes several to a task: one 20x20 plane per task spent about as long on the
        // handing out as on the plane.
        let planes = input.n * channels;
        let per_task = (SMALL_TASK_PIXELS / (oh * ow).max(1)).min(planes.div_ceil(8 * parallel::threads())).max(1);
        parallel::for_each_chunk_mut(&mut out[..planes * pitch], per_task * pitch, |task, dsts| {
            // Chunks of `pitch`, each cut to its plane's pixels (the floats after them are not
            // this kernel's to write).
            for (i, dst) in dsts.chunks_mut(pitch).enumerate() {
                let dst = &mut dst[..oh * ow];
                let plane_index = task * per_task + i;
                let (c, src) = (plane_index % channels, input.plane(plane_index / channels, plane_index % channels));
                let plane = Plane { c, src, h, w, oh, ow, offsets };
                let dst = match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU supports AVX-512F (`Isa::detect` checked it).
                    Some(Isa::Avx512) => unsafe { depthwise_plane_avx512(self, plane, dst) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU supports AVX2 and FMA (`Isa::detect` checked it).
                    Some(Isa::Avx2) => unsafe { depthwise_plane_avx2(self, plane, dst) },
                    _ => depthwise_plane(self, plane, dst),
                };
                if let Some(residual) = residual {
                    add_assign(dst, &residual[plane_index * pitch..][..oh * ow]);
                }
            }
        });
    }
}

/// The widest output rows, and the most output pixels per plane, for which a stride-1
/// depthwise convolution runs with channels in the vector lanes
/// ([`depthwise_lanes`](super::super::x86_64::depthwise_lanes)): rows of 20 or 40 pixels fill
/// vectors poorly, and a small plane's padding and edges cost about as much as its taps. The
/// two transposes cost about as much per pixel as the taps of a 3x3 kernel, so 3x3 kernels
/// take the lanes for rows up to 20 only. YOLOv12n, 2 threads, calls alternating with
/// `STREAMDET_DEPTHWISE_LANES=off` (`scripts/ab-steps.py`, 6-8 rounds), each layer's time with
/// the lanes against without, all rows up to 40 in the lanes: AVX-512, 7x7 at 20x20
/// 0.61-0.81, 3x3 at 20x20 0.68-0.77, 7x7 at 40x40 0.92-1.01, 3x3 at 40x40 1.02-1.06; AVX2
/// kernels, 7x7 at 20x20 0.57-0.61, at 40x40 0.67-0.79, 3x3 at 20x20 0.97-1.09, at 40x40
/// 1.27-1.31; the 80x80 layers (rows in both runs) 0.98-1.01. With the widths below, all
/// depthwise layers 0.93 (AVX-512) and 0.80 (AVX2) of their time.
#[cfg(target_arch = "x86_64")]
fn channel_lanes_max_width(kernel: usize) -> usize {
    if kernel >= 5 { 40 } else { 20 }
}
#[cfg(target_arch = "x86_64")]
const CHANNEL_LANES_MAX_PIXELS: usize = 40 * 40;

#[cfg(target_arch = "x86_64")]
impl Conv2d {
    /// Whether [`run_channel_lanes`](Self::run_channel_lanes) runs this convolution from an input
    /// of `h x w` into one of `oh x ow` (channels in the lanes): one whose shape
    /// [`channel_lanes_suit`](Self::channel_lanes_suit), its rows up to
    /// [`channel_lanes_max_width`] and planes up to [`CHANNEL_LANES_MAX_PIXELS`], or with tensors
    /// in blocks (`blocked`) every size: the lanes are the blocks, and no transposes are left to
    /// outweigh the taps. `STREAMDET_DEPTHWISE_LANES=off` keeps every plane in planes on the
    /// row kernel, to compare the two.
    pub(super) fn channel_lanes_take(&self, (h, w): (usize, usize), (oh, ow): (usize, usize), blocked: bool) -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| std::env::var("STREAMDET_DEPTHWISE_LANES").map_or(true, |v| v != "off"));
        let (kh, kw) = self.spec.kernel;
        let size_fits = blocked || (enabled && ow <= channel_lanes_max_width(kh) && oh * ow <= CHANNEL_LANES_MAX_PIXELS);
        self.channel_lanes_suit(blocked) && size_fits && oh > 0 && ow > 0 && h > 0 && self.spec.pads.1 + w < ow + kw
    }

    /// Whether the channels-in-lanes kernel suits this convolution's shape: a depthwise one of
    /// stride 1, no dilation, a 3x3, 5x5 or 7x7 kernel, with AVX-512 or AVX2; in blocks
    /// (`blocked`), with AVX2 (whose lanes are a block) and channels in whole blocks.
    pub(super) fn channel_lanes_suit(&self, blocked: bool) -> bool {
        let (kh, kw) = self.spec.kernel;
        let isa = Isa::detect();
        let isa_fits = if blocked { isa == Some(Isa::Avx2) && self.spec.out_channels.is_multiple_of(BLOCK) } else { isa.is_some() };
        self.is_depthwise() && isa_fits && self.spec.stride == (1, 1) && self.spec.dilation == (1, 1) && kh == kw && matches!(kh, 3 | 5 | 7)
    }

    /// The convolution with channels in the lanes, when [`channel_lanes_take`](Self::channel_lanes_take)
    /// says it applies: from an input in planes or blocks, into `out` in planes or (`out_layout`)
    /// blocks, adding `residual` (laid out as the output). Returns whether it ran.
    pub(super) fn run_channel_lanes(
        &self,
        input: &ConvInput,
        OutputPlanes { oh, ow, pitch }: OutputPlanes,
        out_layout: ChannelLayout,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) -> bool {
        use super::super::x86_64::depthwise_lanes::{ChannelGroup, GroupInput, GroupOutput, depthwise_rows_avx2, depthwise_rows_avx512};
        let (kh, kw) = self.spec.kernel;
        let (pt, pl) = (self.spec.pads.0, self.spec.pads.1);
        let (images, h, w) = (input.n, input.h, input.w);
        let isa = Isa::detect();
        let blocked_in = input.layout() == ChannelLayout::Blocked;
        let blocked_out = out_layout == ChannelLayout::Blocked;
        if !self.channel_lanes_take((h, w), (oh, ow), blocked_in || blocked_out) {
            return false;
        }
        assert!(!blocked_out || pitch == oh * ow, "blocks of packed planes");
        let channels = self.spec.out_channels;
        let len = match isa {
            Some(Isa::Avx512) => 16,
            _ => 8,
        };
        let groups = channels.div_ceil(len);
        // Some four tasks per thread: a group's rows are split when there are few groups (each
        // part transposes `kh - 1` rows more than its own).
        let parts = (4 * parallel::threads()).div_ceil(images * groups).clamp(1, oh);
        let rows_per_part = oh.div_ceil(parts);
        let parts = oh.div_ceil(rows_per_part);
        let silu = self.spec.activation == Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        parallel::for_each(images * groups * parts, |task| {
            let (image, group, part) = (task / (groups * parts), task / parts % groups, task % parts);
            let first_channel = group * len;
            let lanes = (channels - first_channel).min(len);
            let first_row = part * rows_per_part;
            let rows = rows_per_part.min(oh - first_row);
            let planes = (first_channel..first_channel + lanes).map(|c| (image * channels + c) * pitch + first_row * ow);
            let inputs: Vec<&[f32]> = match blocked_in {
                true => Vec::new(),
                false => (first_channel..first_channel + lanes).map(|c| input.plane(image, c)).collect(),
            };
            let group_input = match blocked_in {
                true => GroupInput::Block(input.block(image, first_channel)),
                false => GroupInput::Planes(&inputs),
            };
            let mut taps = [0.0f32; 7 * 7 * 16];
            for (t, tap) in taps.chunks_exact_mut(len).take(kh * kw).enumerate() {
                for (lane, weight) in tap.iter_mut().take(lanes).enumerate() {
                    *weight = self.weights[(first_channel + lane) * kh * kw + t];
                }
            }
            let mut bias = [0.0f32; 16];
            bias[..lanes].copy_from_slice(&self.bias[first_channel..first_channel + lanes]);
            let group = ChannelGroup {
                input: group_input,
                channels: lanes,
                h,
                w,
                kernel: kh,
                pads: (pt, pl),
                ow,
                first_row,
                taps: &taps[..kh * kw * len],
                bias: &bias[..len],
                silu,
            };
            let run = |outputs: GroupOutput<'_, '_>| {
                PLANES.with_borrow_mut(|(scratch, _)| match isa {
                    // SAFETY: the CPU has AVX-512F (`Isa::detect` said so).
                    Some(Isa::Avx512) => unsafe { depthwise_rows_avx512(&group, outputs, scratch) },
                    // SAFETY: the CPU has AVX2 and FMA (`Isa::detect` said so).
                    _ => unsafe { depthwise_rows_avx2(&group, outputs, scratch) },
                })
            };
            if blocked_out {
                // The group's block: its channels are `len = 8` from `first_channel`.
                let start = (image * channels + first_channel) * pitch + first_row * ow * BLOCK;
                // SAFETY: this task alone writes rows `first_row .. first_row + rows` of the block
                // of channels `first_channel ..` of image `image` (tasks differ in image, group or
                // rows), inside `out` (`[images][channels / 8]` blocks of `8 pitch`), which
                // outlives the loop.
                let block = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(start).cast::<MaybeUninit<f32>>(), rows * ow * BLOCK) };
                run(GroupOutput::Block(block));
                if let Some(residual) = residual {
                    // SAFETY: the kernel initialised every element of the block, and
                    // `MaybeUninit<f32>` has the layout of `f32`.
                    let block = unsafe { &mut *(block as *mut [MaybeUninit<f32>] as *mut [f32]) };
                    add_assign(block, &residual[start..][..rows * ow * BLOCK]);
                }
                return;
            }
            // SAFETY: this task alone writes rows `first_row .. first_row + rows` of the planes
            // of channels `first_channel ..` of image `image` (tasks differ in image, group or
            // rows), inside `out` (`[images][channels]` planes `pitch` apart), which outlives
            // the loop.
            let mut outputs: Vec<&mut [MaybeUninit<f32>]> =
                planes.clone().map(|start| unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(start).cast::<MaybeUninit<f32>>(), rows * ow) }).collect();
            run(GroupOutput::Planes(&mut outputs));
            if let Some(residual) = residual {
                for (output, start) in outputs.into_iter().zip(planes) {
                    // SAFETY: the kernel initialised every element of the output, and
                    // `MaybeUninit<f32>` has the layout of `f32`.
                    let output = unsafe { &mut *(output as *mut [MaybeUninit<f32>] as *mut [f32]) };
                    add_assign(output, &residual[start..][..rows * ow]);
                }
            }
        });
        true
    }
}

/// One channel's share of a depthwise convolution: its index `c`, its input plane (`h x w`),
/// the output's size, and the taps' offsets for the stride-1 kernel ([`depthwise_plane_flat`]).
#[derive(Clone, Copy)]
struct Plane<'a> {
    c: usize,
    src: &'a [f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    offsets: &'a [usize],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn depthwise_plane_avx2<'a>(conv: &Conv2d, plane: Plane<'_>, dst: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
    depthwise_plane(conv, plane, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn depthwise_plane_avx512<'a>(conv: &Conv2d, plane: Plane<'_>, dst: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
    depthwise_plane(conv, plane, dst)
}

/// One channel of a depthwise convolution into `dst`, which it initialises and returns.
#[inline(always)]
fn depthwise_plane<'a>(conv: &Conv2d, plane: Plane<'_>, dst: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
    if conv.spec.stride == (1, 1) && conv.spec.dilation == (1, 1) {
        return depthwise_plane_flat(conv, plane, dst);
    }
    let dst = zeroed(dst);
    depthwise_plane_rows(conv, plane, dst);
    bias_activation(dst, conv.bias[plane.c], conv.spec.activation);
    dst
}

/// A stride-1 depthwise convolution of one channel, with its bias and activation. The plane
/// is copied once into a zero-padded buffer of width `wp`, where tap `(ky, kx)` of output
/// pixel `(oy, ox)` is at `(oy + ky) * wp + ox + kx`. Blocks of rows go straight into `dst`
/// ([`accumulate_row_blocks`]); the rows left over are computed over the flattened plane
/// into an accumulator laid out like the padded plane (output `(oy, ox)` at `oy * wp + ox`),
/// so that every output is the same sum of taps at fixed offsets, one vector at a time (the
/// `wp - ow` columns past each row are computed and dropped), without bounds per row.
#[inline(always)]
fn depthwise_plane_flat<'a>(conv: &Conv2d, plane: Plane<'_>, dst: &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] {
    let Plane { c, src, h, w, oh, ow, offsets } = plane;
    let (kh, kw) = conv.spec.kernel;
    let (pt, pl, pb, pr) = conv.spec.pads;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    let weights = &conv.weights[c * kh * kw..][..kh * kw];
    let done = PLANES.with_borrow_mut(|(padded, acc)| {
        // Reused across planes: the padding is zeroed again for each (a previous plane of
        // another shape may have left pixels there), and the pixels are copied over the rest.
        // The slack past the plane is read only for the columns past each row, which are
        // computed and dropped.
        if padded.len() < hp * wp + BLOCK_SLACK + kw {
            padded.resize(hp * wp + BLOCK_SLACK + kw, 0.0);
        }
        padded[..pt * wp].fill(0.0);
        padded[(pt + h) * wp..hp * wp].fill(0.0);
        for (y, row) in src.chunks_exact(w).enumerate() {
            let padded_row = &mut padded[(y + pt) * wp..][..wp];
            padded_row[..pl].fill(0.0);
            padded_row[pl..pl + w].copy_from_slice(row);
            padded_row[pl + w..].fill(0.0);
        }
        let finish = Finish { bias: conv.bias[c], silu: conv.spec.activation == Activation::Silu };
        let done = accumulate_row_blocks(padded, dst, (hp, wp), (oh, ow), (kh, kw), weights, finish);
        if done < oh {
            // The last tap ends at `(kh - 1 + oh) * wp + kw - 1 <= hp * wp`: inside the plane.
            let len = (oh - done) * wp - (kw - 1);
            if acc.len() < len {
                acc.resize(len, 0.0);
            }
            accumulate_taps(&padded[done * wp..], offsets, weights, &mut acc[..len]);
            for (drow, arow) in dst[done * ow..].chunks_exact_mut(ow).zip(acc.chunks(wp)) {
                drow.iter_mut().zip(&arow[..ow]).for_each(|(d, &v)| _ = d.write(v));
            }
        }
        done
    });
    // SAFETY: the blocks and the loop above wrote every row of `dst` (`oh` rows of `ow`), and
    // `MaybeUninit<f32>` has the layout of `f32`.
    let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
    if done < oh {
        bias_activation(&mut dst[done * ow..], conv.bias[c], conv.spec.activation);
    }
    dst
}

/// What every output of a depthwise plane gets before it is stored: its channel's bias, then
/// SiLU when asked.
#[derive(Clone, Copy)]
struct Finish {
    bias: f32,
    silu: bool,
}

thread_local! {
    /// Each rayon worker's padded plane and accumulator, reused across planes and calls.
    static PLANES: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A depthwise convolution of one channel, tap by tap over whole output rows so that the inner
/// loop is a vectorisable multiply-add; for any stride and dilation.
#[inline(always)]
fn depthwise_plane_rows(conv: &Conv2d, plane: Plane<'_>, dst: &mut [f32]) {
    let Plane { c, src, h, w, oh, ow, .. } = plane;
    let (kh, kw) = conv.spec.kernel;
    let (sh, sw) = conv.spec.stride;
    let (dh, dw) = conv.spec.dilation;
    let (pt, pl) = (conv.spec.pads.0 as isize, conv.spec.pads.1 as isize);
    let weights = &conv.weights[c * kh * kw..][..kh * kw];
    for ky in 0..kh {
        for kx in 0..kw {
            let wv = weights[ky * kw + kx];
            // Output columns whose input column stays inside the image.
            let off_x = (kx * dw) as isize - pl;
            let x_lo = if off_x >= 0 { 0 } else { ((-off_x) as usize).div_ceil(sw) };
            let x_hi = if (w as isize) <= off_x { 0 } else { ((w as isize - off_x) as usize).div_ceil(sw).min(ow) };
            if x_lo >= x_hi {
                continue;
            }
            for oy in 0..oh {
                let iy = (oy * sh) as isize - pt + (ky * dh) as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let srow = &src[iy as usize * w..][..w];
                let drow = &mut dst[oy * ow..][..ow];
                if sw == 1 {
                    let start = (x_lo as isize + off_x) as usize;
                    let s = &srow[start..start + (x_hi - x_lo)];
                    for (d, &v) in drow[x_lo..x_hi].iter_mut().zip(s) {
                        *d += wv * v;
                    }
                } else {
                    for ox in x_lo..x_hi {
                        drow[ox] += wv * srow[(ox as isize * sw as isize + off_x) as usize];
                    }
                }
            }
        }
    }
}

/// Floats past the plane that [`accumulate_row_blocks`] may read: a block's last vectors run
/// past the row's end.
const BLOCK_SLACK: usize = 80;

/// Output rows per block of [`accumulate_row_blocks`].
const BLOCK_ROWS: usize = 4;

/// The first output rows of a stride-1 depthwise plane (see [`depthwise_plane_flat`]), with
/// their bias and activation, straight into `dst` (`oh x ow`), in blocks of [`BLOCK_ROWS`]
/// rows by a few vectors: each input vector loaded feeds every output row of the block whose
/// taps reach it, where one row at a time loads each input vector once per tap. A block is as
/// many vectors wide as takes the fewest operations (80 columns: one block of 5 vectors of 16,
/// where blocks of 4 would compute 128), and the columns past the row's end are dropped. Returns
/// the rows done (a multiple of `BLOCK_ROWS`); the caller does the rest. `padded` holds the
/// padded plane (`hp x wp`) and [`BLOCK_SLACK`] `+ kw` floats more.
#[allow(clippy::too_many_arguments)]
fn accumulate_row_blocks(
    padded: &[f32],
    dst: &mut [MaybeUninit<f32>],
    (hp, wp): (usize, usize),
    (oh, ow): (usize, usize),
    (kh, kw): (usize, usize),
    weights: &[f32],
    finish: Finish,
) -> usize {
    assert!(hp == oh + kh - 1 && ow + kw - 1 <= wp && weights.len() == kh * kw && dst.len() == oh * ow, "a stride-1 plane");
    assert!(padded.len() >= hp * wp + BLOCK_SLACK + kw, "the slack of the padded plane");
    let rows = oh / BLOCK_ROWS * BLOCK_ROWS;
    #[cfg(target_arch = "x86_64")]
    {
        use super::super::epilogue;
        use super::super::simd::{Avx2, Avx512, Lanes};
        /// # Safety
        /// The CPU has `V`'s features; the buffers are as [`accumulate_row_blocks`] asserts
        /// for a `K x K` kernel, and `NV * V::LEN <= BLOCK_SLACK` and `V::LEN <= 16`.
        #[inline(always)]
        unsafe fn blocks<V: Lanes, const NV: usize, const K: usize>(
            padded: &[f32],
            dst: &mut [MaybeUninit<f32>],
            wp: usize,
            rows: usize,
            ow: usize,
            weights: &[f32],
            finish: Finish,
        ) {
            // SAFETY: a block reads rows `oy0 .. oy0 + BLOCK_ROWS + K - 1` (below `hp`) from
            // column `x0 < ow` for `NV * V::LEN + K - 1` floats: at most `BLOCK_SLACK + K`
            // past the plane's last row start plus `wp`, inside `padded`; it writes columns
            // `x0..ow` at most of rows `oy0 .. oy0 + BLOCK_ROWS` (below `oh`) of `dst`. The
            // features are the caller's contract; `weights` holds `K * K` floats.
            unsafe {
                for oy0 in (0..rows).step_by(BLOCK_ROWS) {
                    for x0 in (0..ow).step_by(NV * V::LEN) {
                        let mut sums = [[V::splat(0.0); NV]; BLOCK_ROWS];
                        // With the kernel's side known at compile time, these loops unroll
                        // whole and the tests on `iy - r` vanish: with the side a run-time
                        // value, a 3x3 block ran at a quarter of the FMA units' rate.
                        for iy in 0..BLOCK_ROWS + K - 1 {
                            let row = padded.as_ptr().add((oy0 + iy) * wp + x0);
                            for kx in 0..K {
                                let mut x = [V::splat(0.0); NV];
                                for (v, x) in x.iter_mut().enumerate() {
                                    *x = V::load(row.add(kx + v * V::LEN));
                                }
                                // Output row `r` of the block meets input row `iy` at tap row
                                // `iy - r`.
                                for (r, sums) in sums.iter_mut().enumerate() {
                                    if iy >= r && iy - r < K {
                                        let w = V::splat(*weights.get_unchecked((iy - r) * K + kx));
                                        for (sum, &x) in sums.iter_mut().zip(&x) {
                                            *sum = w.mul_add(x, *sum);
                                        }
                                    }
                                }
                            }
                        }
                        for (r, &sums) in sums.iter().enumerate() {
                            let out = dst.as_mut_ptr().add((oy0 + r) * ow).cast::<f32>();
                            let values = epilogue::finish_each(sums, [V::splat(finish.bias); NV], finish.silu);
                            for (v, &value) in values.iter().enumerate() {
                                let x = x0 + v * V::LEN;
                                if x >= ow {
                                    break;
                                }
                                if x + V::LEN <= ow {
                                    value.store(out.add(x));
                                } else {
                                    let mut lanes = [0.0f32; 16];
                                    value.store(lanes.as_mut_ptr());
                                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(x), ow - x);
                                }
                            }
                        }
                    }
                }
            }
        }
        /// The vectors per block, up to `most`, that take the fewest operations along a row of
        /// `ow`: per tap and output row, a block of `nv` vectors does `nv` multiply-adds and
        /// one broadcast of the tap's weight (the widest of equals). Counting the columns
        /// computed alone chose one vector of 8 for rows of 40 and 20 (AVX2), where the
        /// broadcasts then equal the multiply-adds: two vectors, with 8 and 12 columns past
        /// the row, took YOLOv12n's depthwise layers 0.85 of their time (0.75-0.83 for the
        /// 7x7 ones; 2 threads, calls alternating in one process, the AVX2 kernels on an
        /// AVX-512 Xeon). With 16 lanes the choices for rows of 20, 40, 80 and 160 stay.
        fn vectors_per_block(ow: usize, lanes: usize, most: usize) -> usize {
            (1..=most).rev().min_by_key(|&nv| ow.div_ceil(nv * lanes) * (nv + 1)).expect("at least one")
        }
        /// `blocks` for the kernel sides YOLO models use (3, 5, 7) and `nv` among `$nvs`; a
        /// block for any other side returns no rows, which the caller then computes by taps.
        macro_rules! dispatch {
            ($lanes:ty, $nv:expr, [$($n:literal)*], $k:expr, $args:tt) => {
                match ($k, $nv) {
                    // SAFETY: the caller's features; `n * LEN <= BLOCK_SLACK` for these `n`.
                    $((3, $n) => unsafe { blocks::<$lanes, $n, 3> $args },)*
                    // SAFETY: as above.
                    $((5, $n) => unsafe { blocks::<$lanes, $n, 5> $args },)*
                    // SAFETY: as above.
                    $((7, $n) => unsafe { blocks::<$lanes, $n, 7> $args },)*
                    _ => return false,
                }
            };
        }
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        fn avx512(padded: &[f32], dst: &mut [MaybeUninit<f32>], wp: usize, rows: usize, ow: usize, k: usize, weights: &[f32], finish: Finish) -> bool {
            // 5 x 4 sums and 5 inputs fit the 32 registers.
            dispatch!(Avx512, vectors_per_block(ow, 16, 5), [1 2 3 4 5], k, (padded, dst, wp, rows, ow, weights, finish));
            true
        }
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        fn avx2(padded: &[f32], dst: &mut [MaybeUninit<f32>], wp: usize, rows: usize, ow: usize, k: usize, weights: &[f32], finish: Finish) -> bool {
            // 2 x 4 sums and 2 inputs fit the 16 registers.
            dispatch!(Avx2, vectors_per_block(ow, 8, 2), [1 2], k, (padded, dst, wp, rows, ow, weights, finish));
            true
        }
        if kh != kw {
            return 0;
        }
        let done = match Isa::detect() {
            // SAFETY: `Isa::detect` checked that the CPU has the features.
            Some(Isa::Avx512) => unsafe { avx512(padded, dst, wp, rows, ow, kh, weights, finish) },
            // SAFETY: as above.
            Some(Isa::Avx2) => unsafe { avx2(padded, dst, wp, rows, ow, kh, weights, finish) },
            None => false,
        };
        if done { rows } else { 0 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// `acc[i] = sum over taps t of weights[t] * padded[i + offsets[t]]`: every tap of a vector of
/// outputs while it is in registers, in the CPU's widest vectors.
fn accumulate_taps(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) {
    assert_eq!(offsets.len(), weights.len());
    assert!(offsets.iter().all(|&o| o + acc.len() <= padded.len()), "a tap reads past the plane");
    #[cfg(target_arch = "x86_64")]
    {
        use super::super::simd::{Avx2, Avx512, Lanes};
        /// # Safety
        /// The CPU has `V`'s features; the caller checked that every tap of every output lies
        /// inside `padded`.
        #[inline(always)]
        unsafe fn vectors<V: Lanes>(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) -> usize {
            // Blocks of `BLOCK` vectors first: each tap's multiply-add depends on the previous
            // one into the same sum, so one vector at a time waits on the FMA's latency at every
            // tap; `BLOCK` independent sums keep both FMA units busy.
            const BLOCK: usize = 8;
            let blocked = acc.len() / (BLOCK * V::LEN) * (BLOCK * V::LEN);
            let whole = acc.len() / V::LEN * V::LEN;
            // SAFETY: output `i + V::LEN - 1 < acc.len()` reads `padded[i + V::LEN - 1 + o]`,
            // inside `padded` (checked by the caller); the CPU has `V`'s features.
            unsafe {
                for i in (0..blocked).step_by(BLOCK * V::LEN) {
                    let mut sums = [V::splat(0.0); BLOCK];
                    for (&o, &w) in offsets.iter().zip(weights) {
                        let w = V::splat(w);
                        let from = padded.as_ptr().add(i + o);
                        for (b, sum) in sums.iter_mut().enumerate() {
                            *sum = w.mul_add(V::load(from.add(b * V::LEN)), *sum);
                        }
                    }
                    for (b, sum) in sums.iter().enumerate() {
                        sum.store(acc.as_mut_ptr().add(i + b * V::LEN));
                    }
                }
                for i in (blocked..whole).step_by(V::LEN) {
                    let mut sum = V::splat(0.0);
                    for (&o, &w) in offsets.iter().zip(weights) {
                        sum = V::splat(w).mul_add(V::load(padded.as_ptr().add(i + o)), sum);
                    }
                    sum.store(acc.as_mut_ptr().add(i));
                }
            }
            whole
        }
        #[target_feature(enable = "avx512f")]
        fn avx512(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) -> usize {
            // SAFETY: AVX-512F is enabled; the bounds were checked above.
            unsafe { vectors::<Avx512>(padded, offsets, weights, acc) }
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) -> usize {
            // SAFETY: AVX2 and FMA are enabled; the bounds were checked above.
            unsafe { vectors::<Avx2>(padded, offsets, weights, acc) }
        }
        let done = match Isa::detect() {
            // SAFETY: `Isa::detect` checked that the CPU has the features.
            Some(Isa::Avx512) => unsafe { avx512(padded, offsets, weights, acc) },
            // SAFETY: as above.
            Some(Isa::Avx2) => unsafe { avx2(padded, offsets, weights, acc) },
            None => 0,
        };
        accumulate_taps_scalar(padded, offsets, weights, acc, done);
    }
    #[cfg(not(target_arch = "x86_64"))]
    accumulate_taps_scalar(padded, offsets, weights, acc, 0);
}

/// [`accumulate_taps`] for outputs `from..`.
fn accumulate_taps_scalar(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32], from: usize) {
    for (i, a) in acc.iter_mut().enumerate().skip(from) {
        *a = offsets.iter().zip(weights).map(|(&o, &w)| w * padded[i + o]).sum();
    }
}
