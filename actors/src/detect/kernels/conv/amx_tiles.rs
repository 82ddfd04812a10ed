//! Convolutions on AMX tiles ([`amx`]), on CPUs that have them: blocks of 32 output channels
//! by 32 output pixels, the weights split into BF16 parts and laid out as `A` tiles once at
//! load time, the bias loaded as the sums' starting value, and SiLU and the residual applied
//! as each block is stored.
//!
//! A pointwise convolution converts each block of pixels into `B` tiles in the task that
//! computes it. Any other kernel first converts the whole input, in parallel, into zero-padded
//! planes of pair lanes split by stride phase, where every tap of a block of output pixels is
//! a `B` tile read in place: the block's pixels are consecutive places of the output grid laid
//! over the phase planes' width (the places past the output's width are computed and dropped),
//! and a tap is a fixed offset from them.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;

use super::super::SendPtr;
use super::super::activation::Activation;
use super::super::x86_64::amx::{self, StepB, TileRow, Tiles};
use super::{Conv2d, ConvInput, ConvSpec};

/// Output channels and pixels per block, and input channels per step of `k`.
const BLOCK: usize = 32;

/// Rows of one tile.
const TILE_ROWS: usize = 16;

/// The largest output plane, in pixels, on which [`AmxTiles::on_small_planes`] shapes take the
/// tiles (20x20).
const SMALL_PLANE: usize = 400;

/// The largest output plane, in pixels, on which [`AmxTiles::on_medium_planes`] shapes take
/// the tiles (40x40).
const MEDIUM_PLANE: usize = 1600;

/// A convolution's weights as `A` tiles and its biases as starting sums, made only when AMX
/// is [`available`](amx::available) ([`AmxTiles::runs`]), which the kernel calls rely on.
#[derive(Debug, Clone)]
pub(super) struct AmxTiles {
    /// `[channel block][step][tap][tile][row]`: per step of input channels and tap, the high
    /// parts of the block's first and second 16 output channels, then their low parts
    /// ([`Tiles::block_32x32`]); zeros past the last channel, in either direction.
    weights: Vec<TileRow>,
    /// `[channel block][half][row]`: each row 16 copies of its channel's bias.
    bias: Vec<TileRow>,
    /// Steps of [`BLOCK`] input channels.
    steps: usize,
    /// The kernel's taps, `kh * kw`.
    taps: usize,
    /// The largest output plane, in pixels, that the tiles take ([`AmxTiles::largest_plane`]).
    largest_plane: usize,
}

/// One block's sums, as [`Tiles::block_32x32`] stores them.
#[repr(C, align(64))]
struct SumBlock([[f32; BLOCK]; BLOCK]);

thread_local! {
    /// Each thread's `B` tiles of its block of pixels, and its block of sums.
    static SCRATCH: RefCell<(Vec<TileRow>, Box<SumBlock>)> = RefCell::new((Vec::new(), Box::new(SumBlock([[0.0; BLOCK]; BLOCK]))));
}

impl AmxTiles {
    /// Whether a convolution of `spec` may run on AMX tiles: one group, no dilation, on a CPU
    /// with AMX, and a shape where the tiles were measured faster than the AVX-512 kernels
    /// (Winograd's included, for stride 1) on every plane ([`on_any_plane`](Self::on_any_plane))
    /// or on smaller ones ([`takes`](Self::takes) decides per call).
    pub(super) fn applies(spec: &ConvSpec) -> bool {
        Self::runs(spec) && Self::largest_plane(spec).is_some()
    }

    /// The largest output plane, in pixels, on which a convolution of `spec` takes the tiles;
    /// `None` when it never does.
    fn largest_plane(spec: &ConvSpec) -> Option<usize> {
        if Self::on_any_plane(spec) {
            Some(usize::MAX)
        } else if Self::on_medium_planes(spec) {
            Some(MEDIUM_PLANE)
        } else if Self::on_small_planes(spec) {
            Some(SMALL_PLANE)
        } else {
            None
        }
    }

    /// Products over many input channels, on planes of any size.
    fn on_any_plane(spec: &ConvSpec) -> bool {
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        match (Self::pointwise(spec), spec.stride) {
            (true, _) => cin >= 128 && cout >= 128,
            (false, (2, 2)) => cin >= 64 && cout >= 128,
            (false, (1, 1)) => cin >= 128 && cout >= 64,
            (false, _) => false,
        }
    }

    /// Stride-1 kernels over fewer input channels, on outputs of at most [`SMALL_PLANE`]
    /// pixels, where Winograd's tiles are few. YOLOv12n and YOLO11n (2 threads, interleaved
    /// rounds against the build without): their 64 -> 64 3x3 layers at 20x20 took 0.61-0.71
    /// of their time (the 3x3 layers Winograd kept, 0.92-0.98); at 40x40 the tiles did not gain on such layers (32 -> 32 and 64 -> 64
    /// 3x3 0.73-1.07), and pointwise layers of under 128 channels there mostly lost (64 ->
    /// 64 and 80 -> 80, 1.19-1.43).
    fn on_small_planes(spec: &ConvSpec) -> bool {
        !Self::pointwise(spec) && spec.stride == (1, 1) && spec.in_channels >= 64 && spec.out_channels >= 64
    }

    /// Stride-2 kernels of 64 to 127 output channels, on outputs of at most [`MEDIUM_PLANE`]
    /// pixels. YOLOv12n (2 threads, three sets of 8-14 rounds interleaved with the AVX-512
    /// tiles): 64 -> 64 channels 3x3 from 80x80 took 0.79-0.92 of its time (YOLO11n's 0.90);
    /// from 160x160 1.13-1.15, which stays on the AVX-512 tiles.
    fn on_medium_planes(spec: &ConvSpec) -> bool {
        !Self::pointwise(spec) && spec.stride == (2, 2) && spec.in_channels >= 64 && spec.out_channels >= 64
    }

    fn pointwise(spec: &ConvSpec) -> bool {
        spec.kernel == (1, 1) && spec.stride == (1, 1) && spec.pads == (0, 0, 0, 0)
    }

    /// Whether the tiles take an output of `pixels` per channel.
    pub(super) fn takes(&self, pixels: usize) -> bool {
        pixels <= self.largest_plane
    }

    /// Whether the tiles can run a convolution of `spec`: one group, no dilation, a stride of 1
    /// or 2 along rows ([`amx::pair_run`]), on a CPU with AMX.
    fn runs(spec: &ConvSpec) -> bool {
        spec.groups == 1 && spec.dilation == (1, 1) && spec.stride.1 <= 2 && amx::available()
    }

    /// Lays out `weights` (`[out][in]`) and `bias` as tiles.
    pub(super) fn new(spec: &ConvSpec, weights: &[f32], bias: &[f32]) -> Self {
        assert!(Self::runs(spec), "AMX tiles for {spec:?}");
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        let taps = spec.kernel.0 * spec.kernel.1;
        let steps = cin.div_ceil(BLOCK);
        let blocks = cout.div_ceil(BLOCK);
        let mut tiles = vec![TileRow::default(); blocks * steps * taps * 4 * TILE_ROWS];
        for (i, row) in tiles.iter_mut().enumerate() {
            let r = i % TILE_ROWS;
            let tile = i / TILE_ROWS % 4;
            let tap = i / TILE_ROWS / 4 % taps;
            let step = i / TILE_ROWS / 4 / taps % steps;
            let block = i / TILE_ROWS / 4 / taps / steps;
            let (low_part, half) = (tile / 2 == 1, tile % 2);
            let co = block * BLOCK + half * TILE_ROWS + r;
            for e in 0..BLOCK {
                let ci = step * BLOCK + e;
                let w = if co < cout && ci < cin { weights[(co * cin + ci) * taps + tap] } else { 0.0 };
                let (hi, lo) = amx::split_scalar(w);
                let part = if low_part { lo } else { hi };
                row.0[e / 2] |= u32::from(part) << (16 * (e % 2));
            }
        }
        let bias = (0..blocks * 2 * TILE_ROWS)
            .map(|i| {
                let co = i / (2 * TILE_ROWS) * BLOCK + i % (2 * TILE_ROWS);
                TileRow([bias.get(co).copied().unwrap_or(0.0).to_bits(); 16])
            })
            .collect();
        AmxTiles { weights: tiles, bias, steps, taps, largest_plane: Self::largest_plane(spec).unwrap_or(0) }
    }
}

impl Conv2d {
    /// Runs the convolution on AMX tiles.
    pub(super) fn run_amx(&self, amx: &AmxTiles, input: &ConvInput, oh: usize, ow: usize, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        if self.is_pointwise() {
            self.run_amx_pointwise(amx, input, residual, out);
        } else {
            self.run_amx_planes(amx, input, oh, ow, residual, out);
        }
    }

    /// A pointwise convolution: one task per block of 32 pixels of an image.
    fn run_amx_pointwise(&self, amx: &AmxTiles, input: &ConvInput, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let (n, pixels) = (input.n, input.h * input.w);
        let (cin, cout) = (self.spec.in_channels, self.spec.out_channels);
        let steps = amx.steps;
        let columns = pixels.div_ceil(BLOCK);
        let silu = self.spec.activation == Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        parallel::for_each(n * columns, |task| {
            let (batch, p0) = (task / columns, task % columns * BLOCK);
            let valid = BLOCK.min(pixels - p0);
            // A cold input (a skip connection's) is read one line per channel plane, more
            // streams than the hardware prefetchers follow: this thread's block after next is
            // fetched into L2 now.
            input.fetch_cold(batch, p0 + 2 * BLOCK..p0 + 3 * BLOCK);
            let tiles = Tiles::configure().expect("AMX tiles exist only where AMX is available");
            SCRATCH.with_borrow_mut(|(b, sums)| {
                // The block's input as `B` tiles, per step the high parts (rows of 32 pixels'
                // pair lanes, 128 bytes apart), then the low parts.
                b.resize(steps * 4 * TILE_ROWS, TileRow::default());
                let row_of = |c: usize, half: usize| -> *const f32 {
                    if c < cin && 16 * half < valid { input.plane(batch, c)[p0 + 16 * half..].as_ptr() } else { std::ptr::null() }
                };
                for (step, tiles) in b.chunks_exact_mut(4 * TILE_ROWS).enumerate() {
                    let (high, low) = tiles.split_at_mut(2 * TILE_ROWS);
                    for r in 0..TILE_ROWS {
                        let c = step * BLOCK + 2 * r;
                        for half in 0..2 {
                            let columns = valid.saturating_sub(16 * half).min(16);
                            let i = 2 * r + half;
                            // SAFETY: AMX is available, so AVX-512F is; each non-null row has
                            // `columns` floats from its start (`row_of`: `p0 + 16 * half +
                            // columns <= pixels`).
                            unsafe { amx::pair_row(row_of(c, half), row_of(c + 1, half), columns, &mut high[i], &mut low[i]) };
                        }
                    }
                }
                let list: Vec<StepB> =
                    b.chunks_exact(4 * TILE_ROWS).map(|tiles| StepB { hi: tiles[0].0.as_ptr(), lo: tiles[2 * TILE_ROWS].0.as_ptr() }).collect();
                for block in 0..cout.div_ceil(BLOCK) {
                    let co = block * BLOCK;
                    let rows = BLOCK.min(cout - co);
                    // SAFETY: each step of `b` holds its 16 rows of 128 bytes of either part.
                    unsafe { amx.block_sums(&tiles, block, &list, 2 * std::mem::size_of::<TileRow>(), silu, sums) };
                    // SAFETY: rows `co..co + rows` of image `batch` from pixel `p0`, `valid`
                    // pixels each: inside the output and the residual (`valid <= pixels - p0`),
                    // and this task's alone.
                    unsafe { store_block(sums, rows, &out_ptr, residual, (batch * cout + co) * pixels + p0, pixels, 0..valid) };
                }
            });
        });
    }
}

impl AmxTiles {
    /// The sums of output channel block `block` over `list`'s steps into `sums`, then SiLU
    /// when asked.
    ///
    /// # Safety
    /// `list` holds `steps * taps` steps whose `B` tiles are readable as
    /// [`Tiles::block_32x32`] reads them, rows `b_stride` bytes apart.
    unsafe fn block_sums(&self, tiles: &Tiles, block: usize, list: &[StepB], b_stride: usize, silu: bool, sums: &mut SumBlock) {
        assert_eq!(list.len(), self.steps * self.taps, "a step of B per step of A");
        let a = &self.weights[block * list.len() * 4 * TILE_ROWS..][..list.len() * 4 * TILE_ROWS];
        let bias = &self.bias[block * 2 * TILE_ROWS..][..2 * TILE_ROWS];
        // SAFETY: `a` holds four tiles per step and `bias` two, `sums` is 32 rows of 128 bytes;
        // `list` is the caller's.
        unsafe { tiles.block_32x32(a.as_ptr(), list, b_stride, bias.as_ptr(), sums.0.as_mut_ptr().cast()) };
        if silu {
            // SAFETY: AMX is available (`tiles` exists), so AVX-512F is.
            unsafe { amx::silu_rows(&mut sums.0) };
        }
    }
}

/// Stores `columns` of the first `rows` rows of `sums`, row `r` to the output from element
/// `first + r * pixels`, adding the residual's elements at the same places.
///
/// # Safety
/// AMX is available; each of those rows has `columns.len()` elements inside the output (and
/// the residual), and no other task writes them.
#[allow(clippy::too_many_arguments)]
unsafe fn store_block(sums: &SumBlock, rows: usize, out: &SendPtr, residual: Option<&[f32]>, first: usize, pixels: usize, columns: std::ops::Range<usize>) {
    let mut dst = [std::ptr::null_mut(); BLOCK];
    let mut res = [std::ptr::null(); BLOCK];
    for r in 0..rows {
        // SAFETY: inside the output (the caller's contract).
        dst[r] = unsafe { out.get().add(first + r * pixels) };
        if let Some(residual) = residual {
            res[r] = residual[first + r * pixels..].as_ptr();
        }
    }
    // SAFETY: AVX-512F comes with AMX; the rows are the caller's.
    unsafe { amx::store_rows(&sums.0[..rows], &dst[..rows], residual.map(|_| &res[..rows]), columns) };
}

/// The zero-padded stride-phase planes of a convolution's input, as pair lanes
/// (`[image][pair][part][phase][place]`, the high part first), and where each tap reads them.
struct PhasePlanes {
    data: Vec<u32>,
    /// Places per phase plane: its rows (`rows x width`) and zero slack after them.
    plane: usize,
    width: usize,
    /// Pairs of input channels: 16 per step, those past the input's channels all zeros.
    pairs: usize,
    phases: usize,
}

impl PhasePlanes {
    /// Lanes from one pair of channels to the next (a `B` tile's row stride).
    fn pair_stride(&self) -> usize {
        2 * self.phases * self.plane
    }
}

impl Conv2d {
    /// The phase planes of `input` for this convolution, whose output is `oh x ow`.
    fn amx_phase_planes(&self, input: &ConvInput, oh: usize, ow: usize, pairs: usize) -> PhasePlanes {
        let (kh, kw) = self.spec.kernel;
        let (sh, sw) = self.spec.stride;
        let (pt, pl) = (self.spec.pads.0, self.spec.pads.1);
        let (h, w, cin) = (input.h, input.w, self.spec.in_channels);
        let rows = oh + (kh - 1) / sh;
        let width = ow + (kw - 1) / sw;
        // A block of the output grid reads up to 31 places past the grid's last and a tap's
        // offset past that: `(kh - 1) / sh` rows (inside `rows`) and `(kw - 1) / sw` places.
        let plane = (rows * width + BLOCK + (kw - 1) / sw).next_multiple_of(16);
        let phases = sh * sw;
        let chunk = 2 * phases * plane;
        // Each task writes its own chunk: the pixels of the pair's two channels, and zeros
        // where a tap reads padding (the rows above and below the input, the places left and
        // right of it, the slack after each plane). Zeroing whole chunks first (up to 3.5 MiB
        // a call) took 0.5 % of YOLOv12n's CPU time (`perf` samples, 2 threads).
        let total = input.n * pairs * chunk;
        let mut data: Vec<u32> = Vec::with_capacity(total);
        parallel::for_each_chunk_mut(&mut data.spare_capacity_mut()[..total], chunk, |index, planes| {
            let zero = |places: &mut [std::mem::MaybeUninit<u32>]| places.fill(std::mem::MaybeUninit::new(0));
            let (batch, pair) = (index / pairs, index % pairs);
            let channel = |c: usize| (c < cin).then(|| input.plane(batch, c));
            let (even, odd) = (channel(2 * pair), channel(2 * pair + 1));
            if even.is_none() {
                zero(planes);
                return;
            }
            let (high, low) = planes.split_at_mut(phases * plane);
            for phase in 0..phases {
                let (a, b) = (phase / sw, phase % sw);
                // Places `x` of a phase row read input column `x * sw + b - pl`: those inside
                // the input, `first..end`.
                let first = pl.saturating_sub(b).div_ceil(sw).min(width);
                let end = (w + pl).saturating_sub(b).div_ceil(sw).clamp(first, width);
                for y in 0..rows {
                    let at = phase * plane + y * width;
                    let input_row = (y * sh + a).checked_sub(pt).filter(|&iy| iy < h);
                    let (written_first, written_end) = match input_row {
                        Some(_) if first < end => (first, end),
                        _ => (0, 0),
                    };
                    for half in [&mut *high, &mut *low] {
                        zero(&mut half[at..at + written_first]);
                        zero(&mut half[at + written_end..at + width]);
                    }
                    let Some(iy) = input_row.filter(|_| first < end) else { continue };
                    let column = first * sw + b - pl;
                    let row = |c: Option<&[f32]>| c.map_or(std::ptr::null(), |c| c[iy * w + column..].as_ptr());
                    // SAFETY: AMX is available (this convolution has tiles), so AVX-512F is;
                    // `sw` is 1 or 2 (`applies`); each input row has `(end - first - 1) * sw + 1`
                    // floats from `column` (`(end - 1) * sw + b - pl < w`), and the plane rows
                    // `end - first` places from `at + first`.
                    unsafe {
                        amx::pair_run(row(even), row(odd), end - first, sw, high[at + first..].as_mut_ptr().cast(), low[at + first..].as_mut_ptr().cast());
                    }
                }
                for half in [&mut *high, &mut *low] {
                    zero(&mut half[phase * plane + rows * width..(phase + 1) * plane]);
                }
            }
        });
        // SAFETY: the chunks cover the first `total` elements, and each task wrote every
        // element of its own: the places of each phase row left and right of `first..end`
        // and the slack after each plane are zeros, the places in between either a pair run
        // or, on rows outside the input, zeros too.
        unsafe { data.set_len(total) };
        PhasePlanes { data, plane, width, pairs, phases }
    }

    /// A convolution with a kernel: the phase planes, then one task per block of 32 places of
    /// the output grid (`oh` rows of the planes' width) of an image.
    fn run_amx_planes(&self, amx: &AmxTiles, input: &ConvInput, oh: usize, ow: usize, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let (kh, kw) = self.spec.kernel;
        let (sh, sw) = self.spec.stride;
        let cout = self.spec.out_channels;
        let steps = amx.steps;
        let planes = self.amx_phase_planes(input, oh, ow, steps * TILE_ROWS);
        let width = planes.width;
        let places = oh * width;
        let blocks = places.div_ceil(BLOCK);
        let silu = self.spec.activation == Activation::Silu;
        let pixels = oh * ow;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        parallel::for_each(input.n * blocks, |task| {
            let (batch, g0) = (task / blocks, task % blocks * BLOCK);
            let tiles = Tiles::configure().expect("AMX tiles exist only where AMX is available");
            // Each step's and tap's `B` tiles, read in place.
            let image = &planes.data[batch * planes.pairs * planes.pair_stride()..];
            let mut list = Vec::with_capacity(steps * amx.taps);
            for step in 0..steps {
                let pair = &image[step * TILE_ROWS * planes.pair_stride()..];
                for (ky, kx) in (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx))) {
                    let phase = (ky % sh) * sw + kx % sw;
                    let at = phase * planes.plane + g0 + (ky / sh) * width + kx / sw;
                    let hi = &pair[at..];
                    let lo = &pair[planes.phases * planes.plane + at..];
                    list.push(StepB { hi: hi.as_ptr(), lo: lo.as_ptr() });
                }
            }
            SCRATCH.with_borrow_mut(|(_, sums)| {
                for block in 0..cout.div_ceil(BLOCK) {
                    let co = block * BLOCK;
                    let rows = BLOCK.min(cout - co);
                    // SAFETY: each `B` tile's 16 rows of 128 bytes lie inside the planes (a
                    // block's places plus a tap's offset stay inside a plane, slack included,
                    // and the 16 pairs of a step inside the image's pairs).
                    unsafe { amx.block_sums(&tiles, block, &list, 4 * planes.pair_stride(), silu, sums) };
                    // The block's places, one output row at a time; places past the output's
                    // width are dropped.
                    let mut g = g0;
                    while g < (g0 + BLOCK).min(places) {
                        let (y, x) = (g / width, g % width);
                        let run_end = (g + width - x).min(g0 + BLOCK);
                        if x < ow {
                            let len = (ow - x).min(run_end - g);
                            let first = (batch * cout + co) * pixels + y * ow + x;
                            // SAFETY: rows `co..co + rows` of image `batch`, `len` pixels of
                            // output row `y` from column `x` (`x + len <= ow`): inside the
                            // output and the residual, and this task's alone (the output
                            // pixels of its places).
                            unsafe { store_block(sums, rows, &out_ptr, residual, first, pixels, g - g0..g - g0 + len) };
                        }
                        g = run_end;
                    }
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{reference, values};
    use super::super::{Conv2d, ConvInput, ConvSpec, InputPart};
    use super::{AmxTiles, MEDIUM_PLANE, SMALL_PLANE};
    use crate::detect::kernels::activation::Activation;
    use crate::detect::kernels::isa::Isa;
    use crate::detect::kernels::x86_64::amx;

    #[test]
    fn matches_the_definition() {
        if !amx::available() {
            eprintln!("SKIPPED: no AMX on this CPU (or STREAMDET_AMX=off); the AVX-512 kernels run pointwise convolutions");
            return;
        }
        // Channels within, at and past blocks of 32 in both directions; pixels within a tile,
        // at blocks and past them; batch 2; SiLU on and off; with and without a residual;
        // kernels of 1, 2, 3 and 5 with strides 1 and 2, with and without padding.
        for (cin, cout, k, stride, pad, n, h, w, activation) in [
            (32, 32, 1, 1, 0, 1, 8, 4, Activation::Silu),
            (16, 48, 1, 1, 0, 2, 9, 11, Activation::Silu),
            (70, 33, 1, 1, 0, 1, 5, 13, Activation::Identity),
            (256, 64, 1, 1, 0, 1, 20, 20, Activation::Silu),
            (3, 5, 1, 1, 0, 1, 1, 7, Activation::Silu),
            (16, 32, 3, 1, 1, 1, 20, 20, Activation::Silu),
            (32, 64, 3, 2, 1, 2, 17, 22, Activation::Silu),
            (24, 40, 3, 1, 0, 1, 7, 21, Activation::Identity),
            (5, 9, 3, 2, 0, 1, 12, 16, Activation::Silu),
            (70, 20, 5, 1, 2, 1, 9, 8, Activation::Silu),
            (8, 16, 2, 2, 0, 1, 8, 8, Activation::Identity),
        ] {
            let spec = ConvSpec::square(cin, cout, 1, k, stride, pad, activation);
            let mut conv = Conv2d::new(spec, values(cout * cin * k * k, 1), values(cout, 2)).unwrap().with_weights_packed_for(Isa::Avx512).unwrap();
            // Every shape the tiles can run, also those the engine runs on other kernels.
            conv.amx = Some(AmxTiles { largest_plane: usize::MAX, ..AmxTiles::new(&spec, &conv.weights, &conv.bias) });
            let input = values(n * cin * h * w, 3);
            let (oh, ow) = conv.output_size(h, w).unwrap();
            let residual = values(n * cout * oh * ow, 4);
            for with_residual in [false, true] {
                let out = conv.run(&input, n, h, w, with_residual.then_some(residual.as_slice()));
                let mut want = reference(&conv, &input, n, h, w);
                if with_residual {
                    want.iter_mut().zip(&residual).for_each(|(w, r)| *w += r);
                }
                let worst: f32 = out.iter().zip(&want).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0, f32::max);
                assert!(worst < 1e-4, "{cin}->{cout} k{k} s{stride} p{pad} {n}x{h}x{w} {activation:?} residual={with_residual}: relative error {worst}");
            }
        }
    }

    #[test]
    fn a_cold_input_in_parts_gives_the_same_output() {
        if !amx::available() {
            eprintln!("SKIPPED: no AMX on this CPU (or STREAMDET_AMX=off)");
            return;
        }
        // Pointwise, on AMX tiles at any plane; the first part cold (fetched ahead of each
        // block, up to past the plane's end, which the fetch clamps).
        let (n, h, w) = (2, 9, 11);
        let conv = Conv2d::new(ConvSpec::square(128, 128, 1, 1, 1, 0, Activation::Silu), values(128 * 128, 1), values(128, 2))
            .unwrap()
            .with_weights_packed_for(Isa::Avx512)
            .unwrap();
        assert!(conv.runs_amx());
        let (first, second) = (values(n * 48 * h * w, 3), values(n * 80 * h * w, 4));
        let parts = vec![
            InputPart { data: &first, channels: 48, image_stride: 48 * h * w, plane_stride: h * w, cold: true },
            InputPart { data: &second, channels: 80, image_stride: 80 * h * w, plane_stride: h * w, cold: false },
        ];
        let input = ConvInput::new(parts, n, h, w).unwrap();
        assert_eq!(conv.run_input(&input, None), conv.run(&input.to_contiguous(), n, h, w, None));
    }

    #[test]
    fn shorter_products_take_the_tiles_on_smaller_planes_only() {
        let small = ConvSpec::square(64, 64, 1, 3, 1, 1, Activation::Silu);
        let strided = ConvSpec::square(64, 64, 1, 3, 2, 1, Activation::Silu);
        let wide = ConvSpec::square(128, 128, 1, 1, 1, 0, Activation::Silu);
        let pointwise = ConvSpec::square(64, 64, 1, 1, 1, 0, Activation::Silu);
        assert_eq!(AmxTiles::largest_plane(&small), Some(SMALL_PLANE));
        assert_eq!(AmxTiles::largest_plane(&strided), Some(MEDIUM_PLANE));
        assert_eq!(AmxTiles::largest_plane(&wide), Some(usize::MAX));
        assert_eq!(AmxTiles::largest_plane(&pointwise), None);
        if !amx::available() {
            eprintln!("SKIPPED: no AMX on this CPU (or STREAMDET_AMX=off); the rule alone was checked");
            return;
        }
        let tiles = |spec: &ConvSpec| {
            let taps = spec.kernel.0 * spec.kernel.1;
            AmxTiles::new(spec, &values(spec.out_channels * spec.in_channels * taps, 1), &values(spec.out_channels, 2))
        };
        let (small, strided, wide) = (tiles(&small), tiles(&strided), tiles(&wide));
        assert!(small.takes(20 * 20) && !small.takes(40 * 40));
        assert!(strided.takes(40 * 40) && !strided.takes(80 * 80));
        assert!(wide.takes(80 * 80));
    }

    #[test]
    fn splits_floats_into_two_bf16_parts() {
        for x in [1.0f32, -2.7182817, 1e-3, 65504.0, 0.0, 1.0 + f32::EPSILON * 3.0] {
            let (hi, lo) = amx::split_scalar(x);
            let back = f32::from_bits(u32::from(hi) << 16) + f32::from_bits(u32::from(lo) << 16);
            assert!((back - x).abs() <= x.abs() * 2f32.powi(-16), "{x}: {back}");
        }
    }
}
