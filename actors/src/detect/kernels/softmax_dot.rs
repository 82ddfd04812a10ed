//! A softmax over channels followed by a 1x1 convolution, in one pass over the input: for each
//! pixel, `out[o] = bias[o] + sum_c weights[o][c] * softmax(x[.., pixel])[c]`. The
//! distribution-focal-loss decoding of YOLO heads is this with one output: 16 bins per box side,
//! weighted by their index. Unfused it took a transposed copy of the box logits, a softmax
//! that wrote them once more, and a convolution that read them again (0.27 ms of YOLOv12n on 2
//! cores); this reads them once, where they lie.

use crate::detect::kernels::parallel;

use super::activation;
use super::isa::{Vectors, vectors};
use super::simd::{Lanes, MAX_LANES};

/// The weights (`[outputs][channels]`) and biases of the convolution.
#[derive(Debug, Clone)]
pub struct SoftmaxDot {
    weights: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
}

/// Where an NCHW input lies in its buffer: element `(n, c, y, x)` at
/// `offset + n * strides[0] + c * strides[1] + y * strides[2] + x` (the pixels of a row are
/// adjacent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelsView {
    pub offset: usize,
    pub dims: [usize; 4],
    pub strides: [usize; 3],
}

impl ChannelsView {
    /// One past the furthest element (0 when there is none).
    fn extent(&self) -> usize {
        let [n, c, h, w] = self.dims;
        if n * c * h * w == 0 {
            return 0;
        }
        self.offset + (n - 1) * self.strides[0] + (c - 1) * self.strides[1] + (h - 1) * self.strides[2] + w
    }
}

impl SoftmaxDot {
    /// `None` unless `weights` holds `outputs x channels` values, `bias` one per output, and
    /// there is at least one channel.
    pub fn new(weights: Vec<f32>, bias: Vec<f32>, channels: usize) -> Option<Self> {
        (channels > 0 && !bias.is_empty() && weights.len() == bias.len() * channels).then_some(SoftmaxDot { weights, bias, channels })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn outputs(&self) -> usize {
        self.bias.len()
    }

    /// The result for the input `view` of `src`: `[n][outputs][h][w]`, in parallel over rows.
    /// Panics when the view has another number of channels or reaches past `src`.
    pub fn run(&self, src: &[f32], view: &ChannelsView) -> Vec<f32> {
        let [n, c, h, w] = view.dims;
        assert!(c == self.channels && view.extent() <= src.len(), "the input view does not fit");
        let outputs = self.outputs();
        let mut out = vec![0.0f32; n * outputs * h * w];
        if out.is_empty() {
            return out;
        }
        let vectors = vectors();
        // Tasks of whole rows of one image: output row `(b, o, y)` for every `o`.
        let rows_per_task = (n * h).div_ceil(8 * parallel::threads()).max(1);
        let out_ptr = super::SendPtr(out.as_mut_ptr());
        parallel::for_each((n * h).div_ceil(rows_per_task), |task| {
            let mut scratch = vec![0.0f32; c * MAX_LANES];
            for row in task * rows_per_task..((task + 1) * rows_per_task).min(n * h) {
                let (b, y) = (row / h, row % h);
                let first = view.offset + b * view.strides[0] + y * view.strides[2];
                for o in 0..outputs {
                    // SAFETY: row `y` of output `o` of image `b`, `w` floats inside `out`, written
                    // by this task alone (tasks own whole rows `(b, y)`).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(((b * outputs + o) * h + y) * w), w) };
                    dst.fill(self.bias[o]);
                }
                let row_of = |o: usize| ((b * outputs + o) * h + y) * w;
                // SAFETY: the reads stay inside `src` (the view's extent, asserted above); each
                // write is to this task's rows (as above), `row_of(o) + x` for `x < w`.
                unsafe { dot_row(vectors, self, src.as_ptr().add(first), view.strides[1], w, out_ptr.get(), &row_of, &mut scratch) };
            }
        });
        out
    }
}

/// One row of pixels: channel `c` of pixel `x` at `src + c * channel_stride + x`; the result
/// for output `o` added at `out + row_of(o) + x`.
///
/// # Safety
/// Those reads and writes are in bounds and the writes this caller's alone; `scratch` holds
/// `channels * MAX_LANES` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn dot_row(
    vectors: Vectors,
    op: &SoftmaxDot,
    src: *const f32,
    channel_stride: usize,
    w: usize,
    out: *mut f32,
    row_of: &dyn Fn(usize) -> usize,
    scratch: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    let done = {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(
            op: &SoftmaxDot,
            src: *const f32,
            stride: usize,
            w: usize,
            out: *mut f32,
            row_of: &dyn Fn(usize) -> usize,
            scratch: &mut [f32],
        ) -> usize {
            // SAFETY: the caller's contract; compiled with AVX-512F.
            unsafe { dot_vectors::<super::simd::Avx512>(op, src, stride, w, out, row_of, scratch) }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            op: &SoftmaxDot,
            src: *const f32,
            stride: usize,
            w: usize,
            out: *mut f32,
            row_of: &dyn Fn(usize) -> usize,
            scratch: &mut [f32],
        ) -> usize {
            // SAFETY: the caller's contract; compiled with AVX2 and FMA.
            unsafe { dot_vectors::<super::simd::Avx2>(op, src, stride, w, out, row_of, scratch) }
        }
        match vectors {
            // SAFETY: the caller's contract; `vectors()` only chooses what the CPU has.
            Vectors::Avx512 => unsafe { avx512(op, src, channel_stride, w, out, row_of, scratch) },
            // SAFETY: as above.
            Vectors::Avx2 => unsafe { avx2(op, src, channel_stride, w, out, row_of, scratch) },
            Vectors::Scalar => 0,
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = (vectors, scratch);
        0
    };
    // SAFETY: the caller's contract, for the pixels the vectors left.
    unsafe { dot_scalar(op, src, channel_stride, done..w, out, row_of) };
}

/// Whole vectors of pixels from the row's start; returns how many pixels they covered.
///
/// # Safety
/// As for [`dot_row`]; the CPU has `V`'s features.
#[inline(always)]
unsafe fn dot_vectors<V: Lanes>(
    op: &SoftmaxDot,
    src: *const f32,
    stride: usize,
    w: usize,
    out: *mut f32,
    row_of: &dyn Fn(usize) -> usize,
    scratch: &mut [f32],
) -> usize {
    let c = op.channels;
    let whole = w / V::LEN * V::LEN;
    // SAFETY: every load is channel `k < c` of pixels `x..x + LEN <= w`; every store is output
    // `o`'s pixels `x..x + LEN`; `scratch` holds `c` vectors (the caller's contract).
    unsafe {
        for x in (0..whole).step_by(V::LEN) {
            let at = |k: usize| src.add(k * stride + x);
            let mut max = V::load(at(0));
            for k in 1..c {
                max = max.max(V::load(at(k)));
            }
            let mut sum = V::splat(0.0);
            for k in 0..c {
                let e = V::exp_of_nonpositive_each([V::load(at(k)).sub(max)])[0];
                e.store(scratch.as_mut_ptr().add(k * V::LEN));
                sum = sum.add(e);
            }
            let scale = sum.recip();
            for o in 0..op.outputs() {
                let weights = &op.weights[o * c..][..c];
                let mut dot = V::splat(0.0);
                for (k, &weight) in weights.iter().enumerate() {
                    dot = V::load(scratch.as_ptr().add(k * V::LEN)).mul_add(V::splat(weight), dot);
                }
                let dst = out.add(row_of(o) + x);
                dot.mul_add(scale, V::load(dst)).store(dst);
            }
        }
    }
    whole
}

/// Pixels `pixels` one at a time.
///
/// # Safety
/// As for [`dot_row`].
unsafe fn dot_scalar(op: &SoftmaxDot, src: *const f32, stride: usize, pixels: std::ops::Range<usize>, out: *mut f32, row_of: &dyn Fn(usize) -> usize) {
    let c = op.channels;
    for x in pixels {
        // SAFETY: channel `k < c` of pixel `x < w` (the caller's contract).
        let value = |k: usize| unsafe { *src.add(k * stride + x) };
        let max = (0..c).map(value).fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = (0..c).map(|k| activation::exp(value(k) - max)).collect();
        let scale = 1.0 / exps.iter().sum::<f32>();
        for o in 0..op.outputs() {
            let dot: f32 = op.weights[o * c..][..c].iter().zip(&exps).map(|(w, e)| w * e).sum();
            // SAFETY: output `o`'s pixel `x`, this caller's alone.
            unsafe { *out.add(row_of(o) + x) += dot * scale };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in `f64`, on a contiguous input.
    fn reference(x: &[f32], [n, c, h, w]: [usize; 4], op: &SoftmaxDot) -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..n {
            for o in 0..op.outputs() {
                for p in 0..h * w {
                    let logits: Vec<f64> = (0..c).map(|k| x[(b * c + k) * h * w + p] as f64).collect();
                    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    let dot: f64 = (0..c).map(|k| op.weights[o * c + k] as f64 * exps[k] / sum).sum();
                    out.push((dot + op.bias[o] as f64) as f32);
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_through_a_transposed_view() {
        // The DFL layout: logits `[n][4 sides][16 bins][w]`, read as `[n][16][4][w]`; rows of
        // 37 pixels leave a tail after the vectors.
        let (n, sides, bins, w) = (2, 4, 16, 37);
        let logits: Vec<f32> = (0..n * sides * bins * w).map(|i| ((i * 29) % 97) as f32 / 9.0 - 5.0).collect();
        let transposed: Vec<f32> = (0..n)
            .flat_map(|b| (0..bins).flat_map(move |k| (0..sides).flat_map(move |s| (0..w).map(move |x| ((b * sides + s) * bins + k) * w + x))))
            .map(|i| logits[i])
            .collect();
        for outputs in [1, 3] {
            let weights: Vec<f32> = (0..outputs * bins).map(|i| (i % bins) as f32 + 0.25 * (i / bins) as f32).collect();
            let op = SoftmaxDot::new(weights, (0..outputs).map(|o| o as f32 * 0.5).collect(), bins).unwrap();
            let want = reference(&transposed, [n, bins, sides, w], &op);
            let view = ChannelsView { offset: 0, dims: [n, bins, sides, w], strides: [sides * bins * w, w, bins * w] };
            let got = op.run(&logits, &view);
            assert_eq!(got.len(), want.len());
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!((g - r).abs() < 1e-5 * (1.0 + r.abs()), "[{i}] {g} vs {r}");
            }
        }
    }

    #[test]
    fn mismatched_weights_are_refused() {
        assert!(SoftmaxDot::new(vec![0.0; 15], vec![0.0], 16).is_none());
        assert!(SoftmaxDot::new(vec![], vec![], 0).is_none());
    }
}
