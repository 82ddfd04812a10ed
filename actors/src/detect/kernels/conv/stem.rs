//! The stem of a detection model: a 3x3 convolution with stride 2 and padding 1 over a few
//! input channels (an RGB image), with AVX-512 or AVX2.
//!
//! The other kernels keep output channels in the vector lanes and broadcast each input value;
//! with `K = 27` that leaves a tile doing as much work in its epilogue (SiLU, a transpose) as in
//! its products, and loads one input float per multiply-add. Here the lanes hold adjacent
//! output pixels of one channel instead (16 with AVX-512, 8 with AVX2). For each input row a
//! tap reads, two pairs of loads and a few permutes give the tap's inputs for `kx = 0, 1, 2`
//! (the even and odd columns, and the even ones shifted by one); each is multiplied into a
//! block of output channels' accumulators (16 with AVX-512, 8 with AVX2, where 16 registers
//! hold the accumulators, the three taps and a weight) with the weight broadcast from memory.
//! The accumulators are rows of the output as they lie, so the epilogue stores them without a
//! transpose.
//!
//! The input rows are read where they lie: a row above or below the image adds nothing and is
//! skipped, and the loads at the image's left and right edges are masked to its columns (AVX2:
//! copied with zeros). The two input rows the next output row needs are fetched ahead: the
//! image comes from memory, and the kernel reads nine rows at once, more streams than the
//! hardware prefetchers follow. The rows were first copied, per output row, into zero-padded
//! rows (16 % of the stem's samples on one thread of an AMD EPYC, Zen 4, and 4 % zeroing them).
//! Against that, interleaved rounds (`scripts/ab-steps.py`): YOLO11n's stem took 0.79 of its
//! time on one thread and YOLOv12n's 0.92 on two; with the kernels capped at AVX2, where the
//! stem had gone through the pixel tiles, 0.75 of their time on two threads.
//!
//! With AVX2 the output may go to blocks of 8 channels ([`ChannelLayout::Blocked`]): each 8
//! pixels' sums of a block of channels are then transposed, a pixel's 8 channels a register,
//! and the stride-2 layer after the stem reads them in place, a row of 8 channels one stretch
//! of memory where planes are 16 streams of lines. YOLO11n and YOLOv12n, 2 threads, 60 rounds
//! alternating with planes: the stem level (0.95-1.01), 16 -> 32 channels from 320x320 0.89-0.90,
//! the calls 0.992-0.993.
//!
//! With AVX-512 the same kernel runs the stride-2 layers of up to 64 input channels onto
//! outputs of 64 pixels and wider: YOLO's 16 -> 32 channels from 320x320 and 64 -> 64 from
//! 160x160. Their rows are read a vector at a time, as the stem's, where the pixel tiles
//! broadcast each input value (10 pixels by 32 channels a tile, the weights of all the taps
//! read per tile). YOLOv12n and YOLO11n on an AMD EPYC (Zen 4), interleaved rounds against the
//! pixel tiles: at 2 threads 16 -> 32 took 0.81-0.83 of its time, 64 -> 64 0.91-0.93, the
//! calls 0.986-0.992; at 1 thread (YOLOv12n) 0.83, 0.92 and 0.985. Wider inputs lost: 128 ->
//! 128 from 80x80 1.08-1.15 (a block's weights, 72 KiB, no longer stay in the L1 cache), and
//! outputs 40 and 20 pixels wide 1.07-1.50 (half a vector idle at the end of each row). Without
//! fetching the rows ahead (three rows of each of 64 channels, too many streams for the
//! hardware prefetchers), 64 -> 64 ran at 92 GFLOP/s on one thread, against 107 with it
//! (`cargo bench --bench conv`).
//!
//! With AVX2 those layers stay on the pixel tiles, which read the blocks the layer before
//! writes. The AVX2 kernel given them (planes in, YOLOv12n on the Zen 4 EPYC capped at AVX2,
//! 2 threads, interleaved rounds) took 16 -> 32 channels from 1.76 to 2.35 ms and 64 -> 64 from
//! 2.60 to 5.00. Its block of 8 channels loads a broadcast weight for each multiply-add, 28
//! loads for every 24 multiply-adds of an input row, so loads bound it, not the multiply-adds.
//! The stem itself (3 channels) is bound the same way there. Its profile on one thread
//! (`cargo bench --bench conv`, the same capped CPU) was 56 % that loop and 36 % the
//! epilogue's SiLU. It took 1.6 times AVX-512's time.
//!
//! The output (6.5 MB at 640x640) is stored through the caches: stores that bypass them
//! (`_mm512_stream_ps`) left the stem at 0.98 of its time and the next layer, which reads it
//! back, at 1.06 (YOLOv12n, 2 threads, an AMD EPYC of the Zen 4 family).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;

use super::super::SendPtr;
use super::super::epilogue::finish_each;
use super::super::isa::Isa;
use super::super::simd::{Avx2, Avx512};
use super::{BLOCK, ChannelLayout, Conv2d, ConvInput, ConvSpec, OutputPlanes};

/// Taps per input channel.
const TAPS: usize = 9;
/// The most input channels of a model's first layer that the stem takes with either
/// instruction set: beyond a few, the channel-major kernels have enough `K` to be efficient.
const STEM_IN_CHANNELS: usize = 4;
/// The most input channels a stride-2 layer may have to run here with AVX-512 (see the
/// module's notes): a block's weights, 16 floats for each of `9 * 64` taps (36 KiB), about
/// fill the L1 cache of the cores measured.
const MAX_IN_CHANNELS: usize = 64;
/// The narrowest output (in pixels) that such a layer of more than [`STEM_IN_CHANNELS`] input
/// channels runs on here: 80 pixels are five whole vectors, where 40 leave half of the third
/// one idle.
const MIN_WIDE_OUTPUT: usize = 64;

/// The weights rearranged for the stem: for each block of output channels (`lanes`, the ISA's
/// floats per vector), each input channel and each tap, the block's weights (zero past the
/// last channel); and the biases, padded the same way.
#[derive(Debug, Clone)]
pub(super) struct Stem {
    isa: Isa,
    lanes: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl Stem {
    /// The vector instructions the stem runs with.
    pub(super) fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether a convolution of `spec` may run here on `isa`'s CPU: a 3x3 stride-2 layer with
    /// padding 1 of a few input channels (a model's first layer), or with AVX-512 up to
    /// [`MAX_IN_CHANNELS`] ([`takes`](Self::takes) says on which outputs).
    pub(super) fn applies(spec: &ConvSpec, isa: Isa) -> bool {
        let most = match isa {
            Isa::Avx512 => MAX_IN_CHANNELS,
            Isa::Avx2 => STEM_IN_CHANNELS,
        };
        spec.kernel == (3, 3) && spec.stride == (2, 2) && spec.dilation == (1, 1) && spec.pads == (1, 1, 1, 1) && spec.groups == 1 && spec.in_channels <= most
    }

    /// Whether a layer of `in_channels` runs here on an output `ow` pixels wide: a stem on
    /// any, a wider layer on one at least [`MIN_WIDE_OUTPUT`] wide, where a partial last vector
    /// weighs little (the pixel tiles take the others).
    pub(super) fn takes(in_channels: usize, ow: usize) -> bool {
        in_channels <= STEM_IN_CHANNELS || ow >= MIN_WIDE_OUTPUT
    }

    /// `weights` in ONNX's `[out][in][3][3]` order, and one bias per output channel, for
    /// `isa` (which this CPU supports).
    pub(super) fn new(isa: Isa, spec: &ConvSpec, weights: &[f32], bias: &[f32]) -> Self {
        assert!(isa.supported(), "the stem for {isa:?}, which this CPU cannot run");
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        assert_eq!(weights.len(), cout * cin * TAPS, "3x3 weights");
        let lanes = isa.lanes();
        let blocks = cout.div_ceil(lanes);
        let mut rearranged = vec![0.0; blocks * cin * TAPS * lanes];
        for co in 0..cout {
            for ci in 0..cin {
                for tap in 0..TAPS {
                    rearranged[((co / lanes * cin + ci) * TAPS + tap) * lanes + co % lanes] = weights[(co * cin + ci) * TAPS + tap];
                }
            }
        }
        let mut padded_bias = bias.to_vec();
        padded_bias.resize(blocks * lanes, 0.0);
        Stem { isa, lanes, weights: rearranged, bias: padded_bias }
    }
}

impl Conv2d {
    /// The stem over `input` into `out` (`planes`, its channels laid out as `out_layout` says),
    /// in tasks of output rows. An output in [`ChannelLayout::Blocked`] is for AVX2, whose
    /// blocks of output channels are 8 wide, with planes `oh * ow` apart.
    pub(super) fn run_stem(&self, stem: &Stem, input: &ConvInput, planes: OutputPlanes, out_layout: ChannelLayout, out: &mut [MaybeUninit<f32>]) {
        let (n, h, w) = (input.n, input.h, input.w);
        let OutputPlanes { oh, ow, pitch } = planes;
        let (cin, cout) = (self.spec.in_channels, self.spec.out_channels);
        assert!(pitch >= oh * ow && out.len() == n * cout * pitch && cin <= MAX_IN_CHANNELS);
        let blocked = out_layout == ChannelLayout::Blocked;
        assert!(!blocked || (stem.isa == Isa::Avx2 && cout.is_multiple_of(BLOCK) && pitch == oh * ow), "a blocked output from the AVX2 stem");
        // Output column `ox` reads input columns `2 ox - 1 ..= 2 ox + 1`: inside the image or
        // its padding of one.
        assert!(w <= 2 * ow && 2 * ow <= w + 1, "a {w}-pixel row into {ow} outputs");
        let lanes = stem.lanes;
        let silu = self.spec.activation == super::super::activation::Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        parallel::for_each_range(n * oh, |rows| {
            for (batch, oy) in rows.map(|row| (row / oh, row % oh)) {
                // Row `2 oy - 1 + ky` of each input channel, `(ci, ky)` in order; `None` above or
                // below the image.
                let mut taps: [Option<&[f32]>; 3 * MAX_IN_CHANNELS] = [None; 3 * MAX_IN_CHANNELS];
                for (index, tap) in taps.iter_mut().enumerate().take(3 * cin) {
                    let (ci, ky) = (index / 3, index % 3);
                    *tap = (2 * oy + ky).checked_sub(1).filter(|&y| y < h).map(|y| &input.plane(batch, ci)[y * w..][..w]);
                }
                // The two input rows the next output row reads first, fetched while this one is
                // computed: the kernel reads its rows a vector at a time, nine rows (and sixteen
                // output rows) at once, more streams than the hardware prefetchers follow.
                input.fetch(batch, (2 * oy + 2) * w..(2 * oy + 4) * w);
                for block in 0..cout.div_ceil(lanes) {
                    let channels = lanes.min(cout - block * lanes);
                    let weights = &stem.weights[block * cin * TAPS * lanes..][..cin * TAPS * lanes];
                    let bias = &stem.bias[block * lanes..][..lanes];
                    // In blocks, the block's row `oy` (its planes start where the first channel's
                    // plane would).
                    let first = (batch * cout + block * lanes) * pitch + oy * ow * if blocked { BLOCK } else { 1 };
                    // SAFETY: the ISA is this CPU's (`Stem::new` checked); the taps are rows of
                    // `w` floats; the weights hold `cin * 9` vectors and the bias one; output row
                    // `oy` of channels `block * lanes ..` of image `batch` (`pitch` apart) lies
                    // inside `out`, and this task alone writes it.
                    unsafe {
                        let out = out_ptr.get().add(first);
                        match stem.isa {
                            Isa::Avx512 => stem_row_avx512(&taps[..3 * cin], w, weights, bias, silu, out, pitch, ow, channels),
                            Isa::Avx2 => stem_row_avx2(&taps[..3 * cin], w, weights, bias, silu, out, pitch, ow, channels, blocked),
                        }
                    }
                }
            }
        });
    }
}

/// The lanes of a 16-float load from column `start` (which may be negative) of a row of `w`
/// columns that lie inside the row.
fn lanes_inside(start: isize, w: usize) -> u16 {
    let low = (-start).clamp(0, 16);
    let high = (w as isize - start).clamp(0, 16);
    if high <= low { 0 } else { ((1u32 << high) - (1u32 << low)) as u16 }
}

/// One output row of one block of up to 16 output channels: `taps[ci * 3 + ky]` is the input
/// row `2 oy - 1 + ky` of channel `ci` (`None` in the padding), `w` floats; `weights` holds 16
/// floats per `(ci, ky, kx)`; channel `c < channels` of the row goes to `out + c * plane`.
/// With more than [`STEM_IN_CHANNELS`] input channels, each row's next lines are fetched ahead:
/// the kernel then reads three rows of each input channel a vector at a time, more streams
/// than the hardware prefetchers follow (a stem's nine they do follow, and there fetching
/// ahead cost 5-8 % of its time).
///
/// # Safety
/// The CPU has AVX-512F. Every tap holds `w` floats, `w <= 2 ow <= w + 1`; `weights` holds
/// `taps.len() * 3 * 16` floats and `bias` 16; `out` holds `channels` rows of `ow` floats,
/// `plane` apart, `channels <= 16`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn stem_row_avx512(
    taps: &[Option<&[f32]>],
    w: usize,
    weights: &[f32],
    bias: &[f32],
    silu: bool,
    out: *mut f32,
    plane: usize,
    ow: usize,
    channels: usize,
) {
    const LANES: usize = 16;
    let fetch_ahead = taps.len() > 3 * STEM_IN_CHANNELS;
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for x0 in (0..ow).step_by(LANES) {
        let mut acc = [_mm512_setzero_ps(); LANES];
        // Columns `2 x0 - 1 ..` (the loads `a`, `b`) and `2 x0 ..` (`c`, `d`), 32 each.
        let start = 2 * x0 as isize;
        let interior = x0 > 0 && 2 * x0 + 2 * LANES <= w;
        let masks = [lanes_inside(start - 1, w), lanes_inside(start + 15, w), lanes_inside(start, w), lanes_inside(start + 16, w)];
        for (index, tap) in taps.iter().enumerate() {
            // A row of the padding adds nothing.
            let Some(row) = tap else { continue };
            let p = row.as_ptr().wrapping_add(2 * x0);
            if fetch_ahead {
                // The two lines this row's loads begin with two vectors of pixels further on.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4 * LANES).cast::<i8>());
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(5 * LANES).cast::<i8>());
            }
            // SAFETY: inside the image, `2 x0 - 1 .. 2 x0 + 32` are columns of the row; at its
            // edges the masks keep every load to the row's columns.
            let [a, b, c, d] = unsafe {
                if interior {
                    [_mm512_loadu_ps(p.sub(1)), _mm512_loadu_ps(p.add(15)), _mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
                } else {
                    [
                        _mm512_maskz_loadu_ps(masks[0], p.wrapping_sub(1)),
                        _mm512_maskz_loadu_ps(masks[1], p.wrapping_add(15)),
                        _mm512_maskz_loadu_ps(masks[2], p),
                        _mm512_maskz_loadu_ps(masks[3], p.wrapping_add(16)),
                    ]
                }
            };
            let inputs = [_mm512_permutex2var_ps(a, evens, b), _mm512_permutex2var_ps(c, evens, d), _mm512_permutex2var_ps(c, odds, d)];
            for (kx, x) in inputs.into_iter().enumerate() {
                let tap_weights: &[f32; LANES] = weights[(index * 3 + kx) * LANES..][..LANES].try_into().expect("16 weights");
                macro_rules! multiply_add {
                    ($($c:literal)*) => { $(acc[$c] = _mm512_fmadd_ps(x, _mm512_set1_ps(tap_weights[$c]), acc[$c]);)* };
                }
                multiply_add!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            }
        }
        let valid = LANES.min(ow - x0);
        let mask: __mmask16 = if valid == LANES { !0 } else { (1u16 << valid) - 1 };
        // One channel at a time: the sums of the others hold most of the registers. (Eight
        // SiLU chains side by side spilled: YOLOv12n's stem took 1.28 of its time. Nor did a
        // second pass over the finished rows, still in L1, with eight chains side by side pay:
        // 0.96-1.11 of the stem's time on an AMD EPYC (Zen 4), three sittings of interleaved rounds.
        // With `max(x, 0)` in the SiLU's place the stem took 0.71 of its time: the SiLU is work
        // there, not waiting.)
        macro_rules! store {
            ($($c:literal)*) => {$(
                if $c < channels {
                    // SAFETY: the caller's contract (AVX-512F; channel `$c`'s row holds `ow`
                    // floats, of which the mask keeps `x0 .. x0 + valid`).
                    unsafe {
                        let [v] = finish_each([Avx512(acc[$c])], [Avx512(_mm512_set1_ps(bias[$c]))], silu);
                        _mm512_mask_storeu_ps(out.add($c * plane + x0), mask, v.0);
                    }
                }
            )*};
        }
        store!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    }
}

/// [`stem_row_avx512`] with AVX2: 8 output pixels by a block of up to 8 output channels,
/// `weights` 8 floats per `(ci, ky, kx)`. AVX2's masked moves are slow on some CPUs, so the
/// rows' edges go through a zero-padded copy of the 17 columns a block reads, and a last
/// partial block of pixels through a buffer. With `blocked`, the output is a row of a block of
/// 8 channels (`ow` pixels of 8 floats from `out`): each 8 pixels' sums go out by an 8x8
/// transpose, a pixel's channels a register.
///
/// # Safety
/// The CPU has AVX2 and FMA. As for [`stem_row_avx512`], with 8 in place of 16; with
/// `blocked`, `channels` is 8 and `out` holds the block's row.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn stem_row_avx2(
    taps: &[Option<&[f32]>],
    w: usize,
    weights: &[f32],
    bias: &[f32],
    silu: bool,
    out: *mut f32,
    plane: usize,
    ow: usize,
    channels: usize,
    blocked: bool,
) {
    const LANES: usize = 8;
    // `[0, 2, 4, 6 | 1, 3, 5, 7]`: each half of a register's evens, then its odds.
    let by_parity = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for x0 in (0..ow).step_by(LANES) {
        let mut acc = [_mm256_setzero_ps(); LANES];
        let interior = x0 > 0 && 2 * x0 + 2 * LANES <= w;
        for (index, tap) in taps.iter().enumerate() {
            let Some(row) = tap else { continue };
            // Columns `2 x0 - 1 .. 2 x0 + 16`: in place inside the image, else copied with
            // zeros for the columns outside it.
            let mut edge = [0f32; 2 * LANES + 1];
            let p = if interior {
                row[2 * x0 - 1..2 * x0 + 2 * LANES].as_ptr()
            } else {
                for (i, value) in edge.iter_mut().enumerate() {
                    if let Some(&v) = (2 * x0 + i).checked_sub(1).and_then(|x| row.get(x)) {
                        *value = v;
                    }
                }
                edge.as_ptr()
            };
            // SAFETY: `p` points at 17 readable floats (`2 x0 - 1 + 16 < 2 x0 + 16 <= w` inside
            // the image; `edge` at its edges).
            let [a, b, c, d] = unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(1)), _mm256_loadu_ps(p.add(9))] };
            let [a, b, c, d] = [
                _mm256_permutevar8x32_ps(a, by_parity),
                _mm256_permutevar8x32_ps(b, by_parity),
                _mm256_permutevar8x32_ps(c, by_parity),
                _mm256_permutevar8x32_ps(d, by_parity),
            ];
            let inputs = [_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x20>(c, d), _mm256_permute2f128_ps::<0x31>(c, d)];
            for (kx, x) in inputs.into_iter().enumerate() {
                let tap_weights: &[f32; LANES] = weights[(index * 3 + kx) * LANES..][..LANES].try_into().expect("8 weights");
                macro_rules! multiply_add {
                    ($($c:literal)*) => { $(acc[$c] = _mm256_fmadd_ps(x, _mm256_set1_ps(tap_weights[$c]), acc[$c]);)* };
                }
                multiply_add!(0 1 2 3 4 5 6 7);
            }
        }
        let valid = LANES.min(ow - x0);
        // The eight channels' SiLU chains side by side (with eight sums, the registers hold them).
        let sums: [Avx2; LANES] = std::array::from_fn(|c| Avx2(acc[c]));
        let biases: [Avx2; LANES] = std::array::from_fn(|c| Avx2(_mm256_set1_ps(bias[c])));
        // SAFETY: AVX2 and FMA (the caller's contract).
        let rows = unsafe { finish_each(sums, biases, silu) };
        if blocked {
            // Each pixel's 8 channels, a register after the transpose, stored whole.
            let pixels = super::super::x86_64::avx2::transpose_8x8(rows.map(|row| row.0));
            for (x, pixel) in pixels.iter().enumerate().take(valid) {
                // SAFETY: the caller's contract: the block's row holds `ow` pixels of 8 floats,
                // of which `x0 .. x0 + valid` are written.
                unsafe { _mm256_storeu_ps(out.add((x0 + x) * BLOCK), *pixel) };
            }
            continue;
        }
        for (c, row) in rows.iter().enumerate().take(channels) {
            // SAFETY: the caller's contract: channel `c`'s row holds `ow` floats, of which
            // `x0 .. x0 + valid` are written.
            unsafe {
                let to = out.add(c * plane + x0);
                if valid == LANES {
                    _mm256_storeu_ps(to, row.0);
                } else {
                    let mut lanes = [0f32; LANES];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), row.0);
                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), to, valid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::reference;
    use super::*;
    use crate::detect::kernels::activation::Activation;

    #[test]
    fn matches_the_definition() {
        let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported()).collect();
        if isas.is_empty() {
            eprintln!("SKIPPED: no AVX2 or AVX-512 on this CPU; the stem runs only with them");
            return;
        }
        // RGB into one block and into a block and a part; one channel; sizes odd and even,
        // narrower than a vector and not a multiple of one, and wide enough for blocks inside
        // the row (read in place) between the edges' (masked or copied); two images.
        let stems = [(3, 16, 1, 40, 64), (3, 20, 2, 9, 37), (1, 16, 1, 7, 5), (4, 8, 1, 33, 50), (3, 16, 1, 6, 101), (3, 24, 1, 5, 96)];
        // With AVX-512, wider layers on outputs of whole vectors and one ending in a partial
        // vector (`Stem::takes`), whose rows are fetched ahead.
        let wide: [(usize, usize, usize, usize, usize); 3] = [(16, 20, 1, 9, 133), (64, 16, 2, 6, 160), (8, 32, 1, 5, 128)];
        for isa in isas {
            let shapes = stems.iter().chain(if isa == Isa::Avx512 { &wide[..] } else { &[] });
            for &(cin, cout, n, h, w) in shapes {
                for activation in [Activation::Silu, Activation::Identity] {
                    let spec = ConvSpec::square(cin, cout, 1, 3, 2, 1, activation);
                    assert!(Stem::applies(&spec, isa) && Stem::takes(cin, w.div_ceil(2)));
                    let weights = (0..cout * cin * 9).map(|i| ((i * 37) % 19) as f32 / 19.0 - 0.5).collect();
                    let conv = Conv2d::new(spec, weights, (0..cout).map(|c| c as f32 * 0.1 - 0.5).collect()).unwrap().with_weights_packed_for(isa).unwrap();
                    assert!(conv.stem.is_some(), "{isa:?} runs the stem");
                    let input: Vec<f32> = (0..n * cin * h * w).map(|i| ((i * 29) % 23) as f32 / 23.0 - 0.5).collect();
                    let want = reference(&conv, &input, n, h, w);
                    let got = conv.run(&input, n, h, w, None);
                    assert_eq!(got.len(), want.len());
                    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                        assert!((g - r).abs() < 1e-5 * (1.0 + r.abs()), "{isa:?} {cin}->{cout} {n}x{h}x{w} {activation:?} [{i}] {g} vs {r}");
                    }
                    // In blocks too, where the AVX2 stem writes them.
                    if isa == Isa::Avx2 && cout.is_multiple_of(BLOCK) {
                        let (oh, ow) = conv.output_size(h, w).unwrap();
                        let blocks = conv.run_input_blocked(&ConvInput::contiguous(&input, n, cin, h, w), None);
                        let got = super::super::input::blocks_to_planes(&blocks, oh * ow);
                        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                            assert!((g - r).abs() < 1e-5, "{isa:?} in blocks {cin}->{cout} {n}x{h}x{w} {activation:?} [{i}] {g} vs {r}");
                        }
                    }
                }
            }
        }
    }
}
