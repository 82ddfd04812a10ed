//! Depthwise convolutions with channels in the vector lanes (AVX-512F, AVX2): for small planes,
//! where a plane's rows (20 or 40 pixels) fill few vectors and a row kernel computes many
//! columns past their end.
//!
//! A group of as many channels as a vector has lanes is turned into pixels of those channels
//! (a transpose per vector of pixels of a row), zero-padded; each output pixel is then the sum
//! over taps of an input pixel times the tap's channel weights, where no lane is wasted and the
//! input vectors of a row serve every tap along it from registers; the sums get their bias and
//! SiLU a vector of channels at a time and are transposed back into the channels' planes.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::super::epilogue::finish_each;
use super::super::simd::{Lanes, MAX_LANES};
use super::avx2::{Avx2, transpose_8x8};
use super::avx512::{Avx512, transpose_16x16};

/// [`Lanes`] that also load and store their first lanes alone and transpose a square block.
///
/// # Safety
/// As for [`Lanes`]; `load_first` reads and `store_first` writes the first `n <= LEN` floats
/// only, and `transpose` works on registers.
pub(in super::super) unsafe trait ChannelLanes: Lanes {
    /// The first `n` floats at `p`, zeros in the other lanes.
    ///
    /// # Safety
    /// The CPU has the type's features; `p` is valid for reading `n <= LEN` floats.
    unsafe fn load_first(p: *const f32, n: usize) -> Self;
    /// Stores the first `n` lanes at `p`.
    ///
    /// # Safety
    /// The CPU has the type's features; `p` is valid for writing `n <= LEN` floats.
    unsafe fn store_first(self, p: *mut f32, n: usize);
    /// The transpose of the square block of the first `LEN` vectors: vector `i` of the result
    /// holds lane `i` of each (the vectors past `LEN` are left as they are).
    ///
    /// # Safety
    /// The CPU has the type's features.
    unsafe fn transpose(rows: [Self; MAX_LANES]) -> [Self; MAX_LANES];
}

/// Masks of the first `n` lanes.
fn first_lanes_mask16(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

// SAFETY: masked moves of the first `n` lanes; the transpose works on registers.
unsafe impl ChannelLanes for Avx512 {
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self {
        // SAFETY: the caller's contract; the mask reads `n` floats.
        Avx512(unsafe { _mm512_maskz_loadu_ps(first_lanes_mask16(n), p) })
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        // SAFETY: the caller's contract; the mask writes `n` floats.
        unsafe { _mm512_mask_storeu_ps(p, first_lanes_mask16(n), self.0) }
    }
    #[inline(always)]
    unsafe fn transpose(rows: [Self; MAX_LANES]) -> [Self; MAX_LANES] {
        // SAFETY: the caller's contract (AVX-512F).
        let mut block = unsafe { [_mm512_setzero_ps(); MAX_LANES] };
        for (b, row) in block.iter_mut().zip(rows) {
            *b = row.0;
        }
        // SAFETY: as above.
        let block = unsafe { transpose_16x16(block) };
        let mut out = rows;
        for (o, b) in out.iter_mut().zip(block) {
            *o = Avx512(b);
        }
        out
    }
}

/// The lanes below `n` set, for AVX2's masked moves.
#[target_feature(enable = "avx2")]
fn first_lanes_mask8(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

// SAFETY: whole moves of all 8 lanes, masked loads of fewer (`vmaskmovps` neither reads nor
// faults on the others), stores of fewer in whole pieces of 4, 2 and 1 floats; the transpose
// works on registers.
unsafe impl ChannelLanes for Avx2 {
    #[inline(always)]
    unsafe fn load_first(p: *const f32, n: usize) -> Self {
        // SAFETY: the caller's contract; the load (or the mask) reads `n` floats.
        Avx2(unsafe { if n >= 8 { _mm256_loadu_ps(p) } else { _mm256_maskload_ps(p, first_lanes_mask8(n)) } })
    }
    #[inline(always)]
    unsafe fn store_first(self, p: *mut f32, n: usize) {
        // SAFETY: the caller's contract: `n` floats at `p`. (With masked stores, the depthwise
        // layers at 20x20 and 40x40 of YOLO11n and YOLOv12n took 1.10-1.28 of their time on an
        // AMD EPYC, Zen 3: 2 threads, 30 interleaved rounds.)
        unsafe { super::avx2::store_first_lanes(self.0, p, None, n) }
    }
    #[inline(always)]
    unsafe fn transpose(mut rows: [Self; MAX_LANES]) -> [Self; MAX_LANES] {
        // SAFETY: the caller's contract (AVX2).
        let mut block = unsafe { [_mm256_setzero_ps(); 8] };
        for (b, row) in block.iter_mut().zip(rows) {
            *b = row.0;
        }
        // SAFETY: as above.
        let block = unsafe { transpose_8x8(block) };
        for (row, t) in rows.iter_mut().zip(block) {
            *row = Avx2(t);
        }
        rows
    }
}

/// A group's input: each channel's plane (`h x w`), or, in blocks of 8 channels with AVX2,
/// the group's block (`h x w` pixels of 8 floats), which is the layout the kernel computes in.
pub(in super::super) enum GroupInput<'a> {
    Planes(&'a [&'a [f32]]),
    Block(&'a [f32]),
}

/// Where a group's output goes: one slice per channel (`rows x ow`), or, in blocks, the
/// group's block (`rows x ow` pixels of 8 floats).
pub(in super::super) enum GroupOutput<'a, 'b> {
    Planes(&'a mut [&'b mut [MaybeUninit<f32>]]),
    Block(&'a mut [MaybeUninit<f32>]),
}

/// One group's share of a stride-1 `kernel x kernel` depthwise convolution: output rows
/// `first_row .. first_row + rows` of as many channels as a vector has lanes, or fewer.
pub(in super::super) struct ChannelGroup<'a> {
    pub input: GroupInput<'a>,
    /// The group's channels: at most the lanes; all of them in blocks.
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    /// 3, 5 or 7.
    pub kernel: usize,
    /// Padding above and left of the input.
    pub pads: (usize, usize),
    pub ow: usize,
    pub first_row: usize,
    /// Tap `t`'s weights for the lanes `LEN` at a time, `[kernel * kernel][LEN]` (zeros past
    /// the channels).
    pub taps: &'a [f32],
    /// One per lane (zeros past the channels).
    pub bias: &'a [f32],
    pub silu: bool,
}

/// Computes `group` into `outputs` with 16 channels in the lanes of AVX-512F (see
/// [`rows_in_lanes`]).
#[target_feature(enable = "avx512f")]
pub(in super::super) fn depthwise_rows_avx512(group: &ChannelGroup<'_>, outputs: GroupOutput<'_, '_>, scratch: &mut Vec<f32>) {
    // Blocks of 10 pixels: their sums and the input vectors under them (at most 16 for 7x7)
    // take 27 of the 32 registers.
    match group.kernel {
        // SAFETY: this function's target features are Avx512's.
        3 => unsafe { rows_in_lanes::<Avx512, 3, 10>(group, outputs, scratch) },
        // SAFETY: this function's target features are Avx512's.
        5 => unsafe { rows_in_lanes::<Avx512, 5, 10>(group, outputs, scratch) },
        // SAFETY: this function's target features are Avx512's.
        7 => unsafe { rows_in_lanes::<Avx512, 7, 10>(group, outputs, scratch) },
        k => panic!("no depthwise kernel in lanes for {k}x{k}"),
    }
}

/// Computes `group` into `outputs` with 8 channels in the lanes of AVX2 (see
/// [`rows_in_lanes`]).
#[target_feature(enable = "avx2,fma")]
pub(in super::super) fn depthwise_rows_avx2(group: &ChannelGroup<'_>, outputs: GroupOutput<'_, '_>, scratch: &mut Vec<f32>) {
    // Blocks as wide as leave the sums, the input vectors under them and a tap's weights in
    // the 16 registers: 6 + 8 + 1 for 3x3, 5 + 9 + 1 for 5x5, 4 + 10 + 1 for 7x7.
    match group.kernel {
        // SAFETY: this function's target features are Avx2's.
        3 => unsafe { rows_in_lanes::<Avx2, 3, 6>(group, outputs, scratch) },
        // SAFETY: this function's target features are Avx2's.
        5 => unsafe { rows_in_lanes::<Avx2, 5, 5>(group, outputs, scratch) },
        // SAFETY: this function's target features are Avx2's.
        7 => unsafe { rows_in_lanes::<Avx2, 7, 4>(group, outputs, scratch) },
        k => panic!("no depthwise kernel in lanes for {k}x{k}"),
    }
}

/// Computes `group` into `outputs` (one per input channel, each `rows x ow`, the rows from
/// `group.first_row`; or the group's block of `rows x ow` pixels), initialising every element,
/// in blocks of `P` pixels; `scratch` holds the padded pixels between calls. Panics unless the
/// sizes agree: 1 to `LEN` channels (`LEN` in blocks), planes (a block) of `h x w`, `K * K`
/// taps of `LEN`, `LEN` biases, and an input whose padded rows fit the output (`pl + w <= ow +
/// K - 1`).
///
/// # Safety
/// The CPU has `V`'s features.
#[inline(always)]
unsafe fn rows_in_lanes<V: ChannelLanes, const K: usize, const P: usize>(group: &ChannelGroup<'_>, outputs: GroupOutput<'_, '_>, scratch: &mut Vec<f32>) {
    const { assert!(K >= 1 && P >= 1 && P + K - 1 <= MAX_LANES) };
    let &ChannelGroup { ref input, channels: lanes, h, w, kernel, pads: (pt, pl), ow, first_row, taps, bias, silu } = group;
    let len = V::LEN;
    assert!(kernel == K && (1..=len).contains(&lanes), "1 to LEN channels");
    let input_fits = match input {
        GroupInput::Planes(inputs) => inputs.len() == lanes && inputs.iter().all(|p| p.len() == h * w),
        GroupInput::Block(block) => lanes == len && block.len() == h * w * len,
    };
    assert!(input_fits && taps.len() == K * K * len && bias.len() == len, "planes (a block) of h x w, K x K taps");
    let output_len = match &outputs {
        GroupOutput::Planes(outputs) => {
            assert!(outputs.len() == lanes && outputs.iter().all(|o| o.len() == outputs[0].len()), "as many outputs as channels");
            outputs[0].len()
        }
        GroupOutput::Block(block) => {
            assert!(lanes == len && block.len().is_multiple_of(len), "a block of whole pixels");
            block.len() / len
        }
    };
    assert!(ow > 0 && output_len.is_multiple_of(ow), "outputs of whole rows");
    let wp = ow + K - 1;
    assert!(pl + w <= wp, "the input's padded rows fit the output");
    let rows = output_len / ow;
    let padded_rows = rows + K - 1;
    // The padded pixels, then one output row of pixels.
    scratch.resize(padded_rows * wp * len + ow * len, 0.0);
    let (padded, out_row) = scratch.split_at_mut(padded_rows * wp * len);

    // SAFETY: the CPU has `V`'s features (the contract); the bounds of each access are given
    // beside it.
    unsafe {
        let zero = V::splat(0.0);
        // Padded row `r` holds input row `first_row + r - pt`, from column `pl`.
        for (r, row) in padded.chunks_exact_mut(wp * len).enumerate() {
            let Some(y) = (first_row + r).checked_sub(pt).filter(|&y| y < h) else {
                row.fill(0.0);
                continue;
            };
            row[..pl * len].fill(0.0);
            row[(pl + w) * len..].fill(0.0);
            let inputs = match input {
                GroupInput::Planes(inputs) => *inputs,
                GroupInput::Block(block) => {
                    // Already pixels of the group's channels.
                    row[pl * len..(pl + w) * len].copy_from_slice(&block[y * w * len..][..w * len]);
                    continue;
                }
            };
            for x in (0..w).step_by(len) {
                let n = (w - x).min(len);
                let mut columns = [zero; MAX_LANES];
                for (column, plane) in columns.iter_mut().zip(inputs) {
                    // `n` floats from `y * w + x`, `x + n <= w`: inside the plane (`y < h`).
                    *column = V::load_first(plane.as_ptr().add(y * w + x), n);
                }
                for (j, pixel) in V::transpose(columns).into_iter().take(n).enumerate() {
                    // Pixel `pl + x + j < pl + w <= wp` of the row of `wp` pixels.
                    pixel.store(row.as_mut_ptr().add((pl + x + j) * len));
                }
            }
        }

        let bias = V::load(bias.as_ptr());
        let (out_row, mut outputs) = match outputs {
            // Sums go straight to the block's rows.
            GroupOutput::Block(block) => (block.as_mut_ptr().cast::<f32>(), None),
            GroupOutput::Planes(outputs) => (out_row.as_mut_ptr(), Some(outputs)),
        };
        for r in 0..rows {
            // Output row `r`'s pixels: the scratch row, or row `r` of the block.
            let out_row = if outputs.is_some() { out_row } else { out_row.add(r * ow * len) };
            let mut x0 = 0;
            // A block of `P` pixels from `x0` (`x0 + P <= ow`) reads padded rows `r .. r + K`
            // (`< padded_rows`) from pixel `x0` for `P + K - 1 <= wp - x0` pixels, and writes
            // pixels `x0 .. x0 + P` of the output row; the pixels past the last block, one by one.
            while x0 + P <= ow {
                block::<V, K, P>(padded.as_ptr().add((r * wp + x0) * len), wp, taps.as_ptr(), bias, silu, out_row.add(x0 * len));
                x0 += P;
            }
            for x in x0..ow {
                block::<V, K, 1>(padded.as_ptr().add((r * wp + x) * len), wp, taps.as_ptr(), bias, silu, out_row.add(x * len));
            }
            let Some(outputs) = outputs.as_deref_mut() else { continue };
            // Back to the channels' planes, `len` pixels at a time.
            for x in (0..ow).step_by(len) {
                let n = (ow - x).min(len);
                let mut pixels = [zero; MAX_LANES];
                for (j, pixel) in pixels.iter_mut().enumerate().take(n) {
                    // Pixel `x + j < ow` of the output row.
                    *pixel = V::load(out_row.add((x + j) * len));
                }
                for (plane, channel) in outputs.iter_mut().zip(V::transpose(pixels)) {
                    // `n` floats from `r * ow + x` (`x + n <= ow`, `r < rows`) of an output of
                    // `rows x ow`.
                    channel.store_first(plane.as_mut_ptr().add(r * ow + x).cast::<f32>(), n);
                }
            }
        }
    }
}

/// `P` output pixels of `LEN` channels: the sum over the `K x K` taps of the input pixel under
/// each times the tap's weights, plus `bias`, through SiLU when `silu`, stored at `out`.
///
/// # Safety
/// The CPU has `V`'s features; `input` is the block's first pixel in padded rows of `wp`
/// pixels of `LEN` floats, and rows `0..K` from it hold `P + K - 1` pixels each; `taps` holds
/// `K * K * LEN` floats and `out` room for `P * LEN`.
#[inline(always)]
unsafe fn block<V: ChannelLanes, const K: usize, const P: usize>(input: *const f32, wp: usize, taps: *const f32, bias: V, silu: bool, out: *mut f32) {
    let len = V::LEN;
    // SAFETY: the reads and writes stay inside the bounds of the contract.
    unsafe {
        let mut sums = [V::splat(0.0); P];
        for ky in 0..K {
            let row = input.add(ky * wp * len);
            let mut pixels = [V::splat(0.0); MAX_LANES];
            for (i, pixel) in pixels.iter_mut().enumerate().take(P + K - 1) {
                *pixel = V::load(row.add(i * len));
            }
            for kx in 0..K {
                let weights = V::load(taps.add((ky * K + kx) * len));
                for (p, sum) in sums.iter_mut().enumerate() {
                    *sum = pixels[p + kx].mul_add(weights, *sum);
                }
            }
        }
        for (p, value) in finish_each(sums, [bias; P], silu).iter().enumerate() {
            value.store(out.add(p * len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    type Kernel = fn(&ChannelGroup<'_>, GroupOutput<'_, '_>, &mut Vec<f32>);

    /// One group through `run` (`len` lanes) against the definition; with AVX2's 8 lanes and
    /// as many channels, from and into a block too.
    #[allow(clippy::too_many_arguments)]
    fn check(run: Kernel, len: usize, k: usize, lanes: usize, (h, w): (usize, usize), first_row: usize, rows: usize, silu: bool) {
        let (pt, pl) = (k / 2, k / 2);
        let ow = w;
        let inputs: Vec<Vec<f32>> = (0..lanes).map(|c| values(h * w, c)).collect();
        let weights = values(lanes * k * k, 100);
        let mut taps = vec![0.0; k * k * len];
        for t in 0..k * k {
            for c in 0..lanes {
                taps[t * len + c] = weights[c * k * k + t];
            }
        }
        let mut bias = vec![0.0; len];
        bias[..lanes].copy_from_slice(&values(lanes, 200));
        let planes: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let group = ChannelGroup {
            input: GroupInput::Planes(&planes),
            channels: lanes,
            h,
            w,
            kernel: k,
            pads: (pt, pl),
            ow,
            first_row,
            taps: &taps,
            bias: &bias,
            silu,
        };
        let mut outputs = vec![vec![MaybeUninit::new(f32::NAN); rows * ow]; lanes];
        let mut slices: Vec<&mut [MaybeUninit<f32>]> = outputs.iter_mut().map(Vec::as_mut_slice).collect();
        run(&group, GroupOutput::Planes(&mut slices), &mut Vec::new());
        // SAFETY: every element was initialised (to NaN before the call).
        let got: Vec<Vec<f32>> = outputs.iter().map(|o| o.iter().map(|v| unsafe { v.assume_init() }).collect()).collect();
        if len == 8 && lanes == 8 {
            // The same group from a block, into planes; from planes and from a block, into a
            // block.
            let block: Vec<f32> = (0..h * w).flat_map(|p| inputs.iter().map(move |plane| plane[p])).collect();
            let from_block = ChannelGroup { input: GroupInput::Block(&block), ..group };
            let mut outputs = vec![vec![MaybeUninit::new(f32::NAN); rows * ow]; lanes];
            let mut slices: Vec<&mut [MaybeUninit<f32>]> = outputs.iter_mut().map(Vec::as_mut_slice).collect();
            run(&from_block, GroupOutput::Planes(&mut slices), &mut Vec::new());
            // SAFETY: as above.
            assert_eq!(outputs.iter().map(|o| o.iter().map(|v| unsafe { v.assume_init() }).collect::<Vec<f32>>()).collect::<Vec<_>>(), got);
            for group in [&from_block, &ChannelGroup { input: GroupInput::Planes(&planes), ..from_block }] {
                let mut out = vec![MaybeUninit::new(f32::NAN); rows * ow * 8];
                run(group, GroupOutput::Block(&mut out), &mut Vec::new());
                // SAFETY: as above.
                let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                for (c, plane) in got.iter().enumerate() {
                    assert_eq!(&out.iter().skip(c).step_by(8).copied().collect::<Vec<f32>>(), plane);
                }
            }
        }
        for (c, output) in got.iter().enumerate() {
            for (i, &got) in output.iter().enumerate() {
                let (oy, ox) = (first_row + i / ow, i % ow);
                let mut want = bias[c];
                for ky in 0..k {
                    for kx in 0..k {
                        let (y, x) = ((oy + ky).checked_sub(pt), (ox + kx).checked_sub(pl));
                        if let (Some(y), Some(x)) = (y.filter(|&y| y < h), x.filter(|&x| x < w)) {
                            want += weights[c * k * k + ky * k + kx] * inputs[c][y * w + x];
                        }
                    }
                }
                if silu {
                    want /= 1.0 + (-want).exp();
                }
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{len} lanes, {k}x{k}, {lanes} channels, {h}x{w}, rows {first_row}+{rows}: channel {c} ({oy}, {ox}): {got} vs {want}"
                );
            }
        }
    }

    /// Each kernel side, 1 to `len` channels, widths under, at and past a block and a vector,
    /// and parts of the rows (the first, one in the middle, the last).
    fn check_all(run: Kernel, len: usize) {
        for (lanes, size) in [(len, (20, 20)), (5, (7, 13)), (1, (4, 9)), (len, (12, 40)), (len - 1, (9, 17)), (3, (3, 33))] {
            for (k, silu) in [(3, true), (5, false), (7, true)] {
                check(run, len, k, lanes, size, 0, size.0, silu);
            }
        }
        for (first_row, rows) in [(0, 5), (5, 6), (15, 5)] {
            check(run, len, 7, len, (20, 20), first_row, rows, true);
            check(run, len, 3, len / 2 + 1, (20, 23), first_row, rows, true);
        }
    }

    #[test]
    fn matches_the_definition() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            check_all(|g, o, s| unsafe { depthwise_rows_avx512(g, o, s) }, 16);
        } else {
            eprintln!("skipped the AVX-512 kernel: this CPU has no AVX-512F");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            check_all(|g, o, s| unsafe { depthwise_rows_avx2(g, o, s) }, 8);
        } else {
            eprintln!("skipped the AVX2 kernel: this CPU has no AVX2 and FMA");
        }
    }
}
