//! The stem of a detection model: a 3x3 convolution with stride 2 and padding 1 over a few
//! input channels (an RGB image), with AVX-512.
//!
//! The other kernels keep output channels in the vector lanes and broadcast each input value;
//! with `K = 27` that leaves a tile doing as much work in its epilogue (SiLU, a transpose) as in
//! its products, and loads one input float per multiply-add. Here the lanes hold 16 adjacent
//! output pixels of one channel instead. For each input row a tap reads, two pairs of loads and
//! three permutes give the tap's 16 inputs for `kx = 0, 1, 2` (the even and odd columns, and
//! the even ones shifted by one); each is multiplied into all 16 output channels' accumulators
//! with the weight broadcast from memory. The accumulators are rows of the output as they lie,
//! so the epilogue stores them without a transpose.
//!
//! Input rows are first copied, per output row, into zero-padded rows (a zero before the first
//! column, zeros past the last), so that no load needs a bounds check.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;

use super::super::SendPtr;
use super::super::epilogue::finish;
use super::super::isa::Isa;
use super::super::simd::Avx512;
use super::{Conv2d, ConvInput, ConvSpec};

/// Output pixels per vector, and output channels per block of accumulators.
const LANES: usize = 16;
/// Taps per input channel.
const TAPS: usize = 9;
/// The most input channels the stem takes: beyond a few, the channel-major kernels have
/// enough `K` to be efficient.
const MAX_IN_CHANNELS: usize = 4;

/// The weights rearranged for the stem: for each block of 16 output channels, each input
/// channel and each tap, the 16 channels' weights (zero past the last channel); and the
/// biases, padded the same way.
#[derive(Debug, Clone)]
pub(super) struct Stem {
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl Stem {
    /// Whether a convolution of `spec` runs as the stem on `isa`'s CPU.
    pub(super) fn applies(spec: &ConvSpec, isa: Isa) -> bool {
        isa == Isa::Avx512
            && spec.kernel == (3, 3)
            && spec.stride == (2, 2)
            && spec.dilation == (1, 1)
            && spec.pads == (1, 1, 1, 1)
            && spec.groups == 1
            && spec.in_channels <= MAX_IN_CHANNELS
    }

    /// `weights` in ONNX's `[out][in][3][3]` order, and one bias per output channel.
    pub(super) fn new(spec: &ConvSpec, weights: &[f32], bias: &[f32]) -> Self {
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        assert_eq!(weights.len(), cout * cin * TAPS, "3x3 weights");
        let blocks = cout.div_ceil(LANES);
        let mut rearranged = vec![0.0; blocks * cin * TAPS * LANES];
        for co in 0..cout {
            for ci in 0..cin {
                for tap in 0..TAPS {
                    rearranged[((co / LANES * cin + ci) * TAPS + tap) * LANES + co % LANES] = weights[(co * cin + ci) * TAPS + tap];
                }
            }
        }
        let mut padded_bias = bias.to_vec();
        padded_bias.resize(blocks * LANES, 0.0);
        Stem { weights: rearranged, bias: padded_bias }
    }
}

impl Conv2d {
    /// The stem's convolution (see the module's notes) of `input` into `out`
    /// (`[n][out_channels][oh][ow]`). The CPU has AVX-512F: the stem is made only for it.
    pub(super) fn run_stem(&self, stem: &Stem, input: &ConvInput, oh: usize, ow: usize, out: &mut [MaybeUninit<f32>]) {
        let (n, h, w) = (input.n, input.h, input.w);
        let (cin, cout) = (self.spec.in_channels, self.spec.out_channels);
        assert!(Isa::Avx512.supported() && out.len() == n * cout * oh * ow);
        // A padded row holds input columns `-1..` at places `0..`, for every load of every
        // block of 16 output pixels: block `b` reads places `32 b ..= 32 b + 32`.
        let blocks = ow.div_ceil(LANES);
        let padded_len = 2 * LANES * blocks + 2;
        assert!(w < padded_len, "a padded row holds its input row");
        let silu = self.spec.activation == super::super::activation::Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        // Output rows of every image, in ranges that shrink towards the end of the loop.
        parallel::for_each_range(n * oh, |rows| {
            let mut padded = vec![0.0f32; cin * 3 * padded_len];
            for (batch, oy) in rows.map(|row| (row / oh, row % oh)) {
                // Input row `2 oy - 1 + ky` of each channel, or zeros above and below the image.
                for (index, row) in padded.chunks_exact_mut(padded_len).enumerate() {
                    let (ci, ky) = (index / 3, index % 3);
                    row.fill(0.0);
                    if let Some(y) = (2 * oy + ky).checked_sub(1).filter(|&y| y < h) {
                        row[1..=w].copy_from_slice(&input.plane(batch, ci)[y * w..][..w]);
                    }
                }
                for block in 0..cout.div_ceil(LANES) {
                    let channels = LANES.min(cout - block * LANES);
                    let weights = &stem.weights[block * cin * TAPS * LANES..][..cin * TAPS * LANES];
                    let bias: &[f32; LANES] = stem.bias[block * LANES..][..LANES].try_into().expect("16 biases");
                    // The block's 16 channels of this output row, from channel 0's pixel 0.
                    let first = ((batch * cout + block * LANES) * oh + oy) * ow;
                    // SAFETY: AVX-512F (asserted above); `padded` holds `cin * 3` rows of
                    // `padded_len`, which every block's loads stay inside (see above);
                    // `weights` and `bias` hold the block's `cin * 9 * 16` and 16 values. The
                    // stores go to rows `oy` of channels `block * 16..+channels` of image
                    // `batch`, `ow` pixels each, inside `out`, which only this range writes
                    // (the ranges do not overlap).
                    unsafe { stem_row(&padded, padded_len, cin, weights, bias, silu, out_ptr.get().add(first), oh * ow, ow, channels) };
                }
            }
        });
    }
}

/// One output row of one block of up to 16 channels: pixel `x` of channel `c` at
/// `out + c * plane + x`, for `x < ow` and `c < channels`.
///
/// # Safety
/// The CPU has AVX-512F; `padded` holds `cin * 3` rows of `padded_len >= 32 * ceil(ow / 16) +
/// 2` floats; `out` is valid for those writes.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn stem_row(
    padded: &[f32],
    padded_len: usize,
    cin: usize,
    weights: &[f32],
    bias: &[f32; LANES],
    silu: bool,
    out: *mut f32,
    plane: usize,
    ow: usize,
    channels: usize,
) {
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for x0 in (0..ow).step_by(LANES) {
        let mut acc = [_mm512_setzero_ps(); LANES];
        for ci in 0..cin {
            for ky in 0..3 {
                // Place `p` holds input column `p - 1`; output pixel `x` reads columns
                // `2x - 1 + kx`, places `2x + kx`.
                let row = padded[(ci * 3 + ky) * padded_len + 2 * x0..][..2 * LANES + 1].as_ptr();
                // SAFETY: places `0..=32` of the slice above, 33 floats.
                let taps = unsafe {
                    let (a, b) = (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(LANES)));
                    let (c, d) = (_mm512_loadu_ps(row.add(1)), _mm512_loadu_ps(row.add(LANES + 1)));
                    [_mm512_permutex2var_ps(a, evens, b), _mm512_permutex2var_ps(c, evens, d), _mm512_permutex2var_ps(c, odds, d)]
                };
                for (kx, tap) in taps.into_iter().enumerate() {
                    let w: &[f32; LANES] = weights[((ci * 3 + ky) * 3 + kx) * LANES..][..LANES].try_into().expect("16 weights");
                    // Written out with constant indices: as a loop, the compiler kept the
                    // accumulators in memory, a store after every multiply-add.
                    macro_rules! multiply_add {
                        ($($c:literal)*) => { $(acc[$c] = _mm512_fmadd_ps(tap, _mm512_set1_ps(w[$c]), acc[$c]);)* };
                    }
                    multiply_add!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
                }
            }
        }
        let valid = LANES.min(ow - x0);
        let mask: __mmask16 = if valid == LANES { !0 } else { (1u16 << valid) - 1 };
        // Constant indices again, so that `acc` stays in registers (see above).
        macro_rules! store {
            ($($c:literal)*) => {$(
                if $c < channels {
                    // SAFETY: AVX-512F (this function's features); no residual.
                    let v = unsafe { finish(Avx512(acc[$c]), bias[$c], silu, None) };
                    // SAFETY: pixels `x0..x0 + valid` of channel `c`'s row (the caller's
                    // contract).
                    unsafe { _mm512_mask_storeu_ps(out.add($c * plane + x0), mask, v.0) };
                }
            )*};
        }
        store!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::reference;
    use super::*;
    use crate::detect::kernels::activation::Activation;

    #[test]
    fn matches_the_definition() {
        if !Isa::Avx512.supported() {
            eprintln!("SKIPPED: no AVX-512 on this CPU; the stem runs only with it");
            return;
        }
        // RGB into one block and into a block and a part; one channel; sizes odd and even,
        // narrower than a vector and not a multiple of one; two images.
        for (cin, cout, n, h, w) in [(3, 16, 1, 40, 64), (3, 20, 2, 9, 37), (1, 16, 1, 7, 5), (4, 8, 1, 33, 50)] {
            for activation in [Activation::Silu, Activation::Identity] {
                let spec = ConvSpec::square(cin, cout, 1, 3, 2, 1, activation);
                assert!(Stem::applies(&spec, Isa::Avx512));
                let weights = (0..cout * cin * 9).map(|i| ((i * 37) % 19) as f32 / 19.0 - 0.5).collect();
                let conv = Conv2d::new(spec, weights, (0..cout).map(|c| c as f32 * 0.1 - 0.5).collect()).unwrap().with_weights_packed_for(Isa::Avx512).unwrap();
                let input: Vec<f32> = (0..n * cin * h * w).map(|i| ((i * 29) % 23) as f32 / 23.0 - 0.5).collect();
                let want = reference(&conv, &input, n, h, w);
                let got = conv.run(&input, n, h, w, None);
                assert_eq!(got.len(), want.len());
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!((g - r).abs() < 1e-5, "{cin}->{cout} {n}x{h}x{w} {activation:?} [{i}] {g} vs {r}");
                }
            }
        }
    }
}
