//! Depthwise convolutions with channels in the vector lanes (AVX-512F): for small planes, where
//! a plane's rows (20 or 40 pixels) fill few vectors of 16 and a row kernel computes many
//! columns past their end.
//!
//! A group of up to 16 channels is turned into pixels of 16 channels each (a 16x16 transpose
//! per 16 pixels of a row), zero-padded; each output pixel is then the sum over taps of an
//! input pixel times the tap's 16 channel weights, where no lane is wasted and the input
//! vectors of a row serve every tap along it from registers; the sums get their bias and SiLU
//! 16 channels at a time and are transposed back into the channels' planes.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::super::epilogue::finish_each;
use super::avx512::{Avx512, transpose_16x16};

/// Output pixels per block of a row: its sums and the input vectors under it
/// (`PIXELS + K - 1`, at most 16 for `K <= 7`) fit the 32 registers.
const PIXELS: usize = 10;

/// One group's share of a stride-1 `K x K` depthwise convolution: output rows
/// `first_row .. first_row + rows` of up to 16 channels.
pub(in super::super) struct ChannelGroup<'a> {
    /// Each channel's input plane, `h x w`.
    pub inputs: &'a [&'a [f32]],
    pub h: usize,
    pub w: usize,
    /// Padding above and left of the input.
    pub pads: (usize, usize),
    pub ow: usize,
    pub first_row: usize,
    /// Tap `t`'s weights for the 16 lanes at `16 t..16 t + 16` (zeros past the channels).
    pub taps: &'a [f32],
    /// One per lane (zeros past the channels).
    pub bias: &'a [f32; 16],
    pub silu: bool,
}

/// Computes `group` into `outputs` (one per input channel, each `rows x ow`, the rows from
/// `group.first_row`), initialising every element. `scratch` holds the padded pixels between
/// calls. Panics unless the sizes agree: 1 to 16 channels, planes of `h x w`, `K * K` taps of
/// 16, an input whose padded rows fit the output (`pl + w <= ow + K - 1`).
#[target_feature(enable = "avx512f")]
pub(in super::super) fn depthwise_rows<const K: usize>(group: &ChannelGroup<'_>, outputs: &mut [&mut [MaybeUninit<f32>]], scratch: &mut Vec<f32>) {
    const { assert!(K >= 1 && PIXELS + K - 1 <= 16) };
    let &ChannelGroup { inputs, h, w, pads: (pt, pl), ow, first_row, taps, bias, silu } = group;
    let lanes = inputs.len();
    assert!((1..=16).contains(&lanes) && outputs.len() == lanes, "1 to 16 channels, as many outputs");
    assert!(inputs.iter().all(|p| p.len() == h * w) && taps.len() == K * K * 16, "planes of h x w and K x K taps");
    assert!(ow > 0 && outputs[0].len().is_multiple_of(ow) && outputs.iter().all(|o| o.len() == outputs[0].len()), "outputs of whole rows");
    let wp = ow + K - 1;
    assert!(pl + w <= wp, "the input's padded rows fit the output");
    let rows = outputs[0].len() / ow;
    let padded_rows = rows + K - 1;
    // The padded pixels, then one output row of pixels.
    scratch.resize(padded_rows * wp * 16 + ow * 16, 0.0);
    let (padded, out_row) = scratch.split_at_mut(padded_rows * wp * 16);

    // Padded row `r` holds input row `first_row + r - pt`, from column `pl`.
    for (r, row) in padded.chunks_exact_mut(wp * 16).enumerate() {
        let y = (first_row + r).checked_sub(pt).filter(|&y| y < h);
        let Some(y) = y else {
            row.fill(0.0);
            continue;
        };
        row[..pl * 16].fill(0.0);
        row[(pl + w) * 16..].fill(0.0);
        for x in (0..w).step_by(16) {
            let n = (w - x).min(16);
            let mask = ((1u32 << n) - 1) as __mmask16;
            let columns: [__m512; 16] = std::array::from_fn(|c| match inputs.get(c) {
                // SAFETY: the mask reads `n` floats from `y * w + x`, with `x + n <= w`: inside
                // the plane of `h x w` (`y < h`).
                Some(plane) => unsafe { _mm512_maskz_loadu_ps(mask, plane.as_ptr().add(y * w + x)) },
                None => _mm512_setzero_ps(),
            });
            for (j, pixel) in transpose_16x16(columns).into_iter().take(n).enumerate() {
                // SAFETY: pixel `pl + x + j < pl + w <= wp` of the row of `wp` pixels of 16.
                unsafe { _mm512_storeu_ps(row.as_mut_ptr().add((pl + x + j) * 16), pixel) };
            }
        }
    }

    // SAFETY: `bias` holds 16 floats.
    let bias = Avx512(unsafe { _mm512_loadu_ps(bias.as_ptr()) });
    for r in 0..rows {
        let mut x0 = 0;
        while x0 < ow {
            // SAFETY: a block of `P` pixels from `x0` (`x0 + P <= ow`) reads padded rows
            // `r .. r + K` (`< padded_rows`) from pixel `x0` for `P + K - 1 <= wp - x0` pixels,
            // the `K * K` taps, and writes pixels `x0 .. x0 + P` of the output row.
            unsafe {
                if x0 + PIXELS <= ow {
                    block::<K, PIXELS>(padded.as_ptr().add((r * wp + x0) * 16), wp, taps.as_ptr(), bias, silu, out_row.as_mut_ptr().add(x0 * 16));
                    x0 += PIXELS;
                } else {
                    block::<K, 1>(padded.as_ptr().add((r * wp + x0) * 16), wp, taps.as_ptr(), bias, silu, out_row.as_mut_ptr().add(x0 * 16));
                    x0 += 1;
                }
            }
        }
        // Back to the channels' planes, 16 pixels at a time.
        for x in (0..ow).step_by(16) {
            let n = (ow - x).min(16);
            let mask = ((1u32 << n) - 1) as __mmask16;
            let pixels: [__m512; 16] = std::array::from_fn(|j| {
                // SAFETY: pixel `x + j < ow` of the output row of `ow` pixels of 16.
                if j < n { unsafe { _mm512_loadu_ps(out_row.as_ptr().add((x + j) * 16)) } } else { _mm512_setzero_ps() }
            });
            for (plane, channel) in outputs.iter_mut().zip(transpose_16x16(pixels)) {
                // SAFETY: the mask writes `n` floats from `r * ow + x` (`x + n <= ow`, `r < rows`)
                // of an output of `rows x ow`.
                unsafe { _mm512_mask_storeu_ps(plane.as_mut_ptr().add(r * ow + x).cast::<f32>(), mask, channel) };
            }
        }
    }
}

/// `P` output pixels of 16 channels: the sum over the `K x K` taps of the input pixel under
/// each times the tap's weights, plus `bias`, through SiLU when `silu`, stored at `out`.
///
/// # Safety
/// The CPU has AVX-512F; `input` is the block's first pixel in padded rows of `wp` pixels of
/// 16 floats, and rows `0..K` from it hold `P + K - 1` pixels each; `taps` holds `K * K * 16`
/// floats and `out` room for `P * 16`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block<const K: usize, const P: usize>(input: *const f32, wp: usize, taps: *const f32, bias: Avx512, silu: bool, out: *mut f32) {
    // SAFETY: the reads and writes stay inside the bounds of the contract.
    unsafe {
        let mut sums = [_mm512_setzero_ps(); P];
        for ky in 0..K {
            let row = input.add(ky * wp * 16);
            let mut pixels = [_mm512_setzero_ps(); 16];
            for (i, pixel) in pixels.iter_mut().enumerate().take(P + K - 1) {
                *pixel = _mm512_loadu_ps(row.add(i * 16));
            }
            for kx in 0..K {
                let weights = _mm512_loadu_ps(taps.add((ky * K + kx) * 16));
                for (p, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm512_fmadd_ps(pixels[p + kx], weights, *sum);
                }
            }
        }
        let values = finish_each(sums.map(Avx512), [bias; P], silu);
        for (p, value) in values.iter().enumerate() {
            _mm512_storeu_ps(out.add(p * 16), value.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    /// Each of `K`, the channels of a group (1 to 16), the rows of a part (from the first, the
    /// middle or the last) and widths under, at and past a block of pixels and 16 columns,
    /// against the definition.
    fn check<const K: usize>(lanes: usize, (h, w): (usize, usize), first_row: usize, rows: usize, silu: bool) {
        let (pt, pl) = (K / 2, K / 2);
        let ow = w;
        let inputs: Vec<Vec<f32>> = (0..lanes).map(|c| values(h * w, c)).collect();
        let weights = values(lanes * K * K, 100);
        let mut taps = vec![0.0; K * K * 16];
        for t in 0..K * K {
            for c in 0..lanes {
                taps[t * 16 + c] = weights[c * K * K + t];
            }
        }
        let mut bias = [0.0; 16];
        bias[..lanes].copy_from_slice(&values(lanes, 200));
        let planes: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let group = ChannelGroup { inputs: &planes, h, w, pads: (pt, pl), ow, first_row, taps: &taps, bias: &bias, silu };
        let mut outputs = vec![vec![MaybeUninit::new(f32::NAN); rows * ow]; lanes];
        let mut slices: Vec<&mut [MaybeUninit<f32>]> = outputs.iter_mut().map(Vec::as_mut_slice).collect();
        // SAFETY: the caller checked that the CPU has AVX-512F.
        unsafe { depthwise_rows::<K>(&group, &mut slices, &mut Vec::new()) };
        for (c, output) in outputs.iter().enumerate() {
            for (i, got) in output.iter().enumerate() {
                // SAFETY: `depthwise_rows` wrote every element (NaN before, checked below).
                let got = unsafe { got.assume_init() };
                let (oy, ox) = (first_row + i / ow, i % ow);
                let mut want = bias[c];
                for ky in 0..K {
                    for kx in 0..K {
                        let (y, x) = ((oy + ky).checked_sub(pt), (ox + kx).checked_sub(pl));
                        if let (Some(y), Some(x)) = (y.filter(|&y| y < h), x.filter(|&x| x < w)) {
                            want += weights[c * K * K + ky * K + kx] * inputs[c][y * w + x];
                        }
                    }
                }
                if silu {
                    want /= 1.0 + (-want).exp();
                }
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "K={K} lanes={lanes} {h}x{w} rows {first_row}+{rows}: channel {c} ({oy}, {ox}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn matches_the_definition() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        for (lanes, size) in [(16, (20, 20)), (5, (7, 13)), (1, (4, 9)), (16, (12, 40)), (11, (9, 17)), (3, (3, 33))] {
            check::<3>(lanes, size, 0, size.0, true);
            check::<5>(lanes, size, 0, size.0, false);
            check::<7>(lanes, size, 0, size.0, true);
        }
        // Parts of the rows: the first, one in the middle, the last.
        for (first_row, rows) in [(0, 5), (5, 6), (15, 5)] {
            check::<7>(16, (20, 20), first_row, rows, true);
            check::<3>(9, (20, 23), first_row, rows, true);
        }
    }
}
