//! Convolutions that Winograd does not take (strided and pointwise ones above all, and small
//! outputs), as tiles of output pixels times output channels ([`avx512::conv_tile`] and its
//! AVX2 form).
//!
//! The channel-major product ([`run_direct`](Conv2d::run_direct), [`run_gemm`](Conv2d::run_gemm))
//! puts pixels in the vector lanes, so each block of `B` must first be gathered or packed
//! from the input into a panel, and its tiles of `C` go back to memory between blocks of `k`.
//! Here the lanes hold output channels instead: the weights are the vector operand, packed
//! once at load time, and each input value is a broadcast operand read where it lies: in the
//! input itself for a pointwise convolution, and for one with a kernel either in the input's
//! phase planes ([`phase_planes`]), where the pixels of a tile are consecutive floats for
//! every tap, or, for a large input with stride 1 or 2 along rows, in the input rows, `SX`
//! floats apart ([`Reading`]). Nothing is gathered or packed per call (but the planes), and
//! each tile's whole `k` runs in registers, so the bias, SiLU and residual are applied once,
//! after a 16x16 (8x8) transpose that turns the tile back into rows of pixels.
//!
//! With AVX-512, tiles are 10 or 12 pixels by 32 channels (24 of the 32 registers hold sums at
//! 12; at 14, with 28, the compiler kept the sums on the stack and the tile ran at half speed:
//! 48 -> 64 channels on rows that took it, 2.4-2.9 ms at 156-162 px against 1.0-1.1 ms at 12),
//! and 16 pixels by 16 channels for convolutions with 16 output channels or fewer, which
//! would leave half of a 32-channel tile empty. With AVX2 (16 registers), 5 or 6 pixels by 16
//! channels, and 8 by 8. Each tile lies in one run of pixels (an output row; for a pointwise
//! convolution, a stretch of the plane); the last tile of a run ends on the run's last pixel,
//! so it overlaps the one before when the run is not a multiple of the tile, and those pixels
//! are computed twice, to the same values. The width of the wide tiles is the one that
//! computes the fewest pixels twice.
//!
//! Tiles of 5 or 6 pixels by 64 channels (four registers, as oneDNN's direct kernels block
//! them) changed nothing on the stride-2 layers of an AMD EPYC (Zen 4), whether they read the
//! phase planes as they are or planes with 16 channels interleaved per pixel (`[c / 16][phase]
//! [row][column][16]`, each tile's whole product in registers): `cargo bench --bench conv` gave
//! 128 -> 128 channels from 80x80 0.89-0.91 of the time on two threads, but in YOLOv12n (2
//! threads, interleaved rounds) the four stride-2 layers on phase planes took 0.93-1.07 of
//! theirs.
//!
//! Nor did Winograd's minimal filtering, decomposed for stride 2 (Huang et al., "DWM", 2020:
//! the input's four stride-2 phases convolved with the kernel's corners, the ends of its middle
//! column and row, and its centre, each by F(m, 2)) on the layers the stem does not take (128
//! -> 128 channels from 80x80, 128 -> 256 and 128 -> 128 from 40x40, 64 -> 64 from 80x80). With
//! F(2, 2), 25 products a 2x2 tile against 36, they took 0.93-1.07 of their time in YOLOv12n
//! (2 threads, interleaved rounds); with F(4, 2), 81 products a 4x4 tile against 144,
//! 1.03-1.23 (at one thread in `cargo bench --bench conv`, 0.88-1.04). The 16 and 36
//! transformed weight matrices (1 and 2.3 MB at 128 channels each way) and the transformed
//! tiles do not fit the L2 cache beside each other, and the transforms took the rest of what
//! the products saved.
//!
//! Pointwise convolutions of few input channels on large planes turn the tile around
//! ([`PixelTiles::pointwise_rows`], [`rows_apply`]): the pixels in the lanes, 32 a tile by 12 or
//! 8 output channels with AVX-512 (16 by 6 or 4 with AVX2, on the largest planes only), each
//! weight a broadcast and each input plane read as whole
//! vectors where it lies. The finished sums are rows of pixels already, stored as they are:
//! on a short product the transposes and the scattered stores of the other tile weigh most.
//! With AVX2 the same tile runs 3x3 stride-1 convolutions of at most 16 channels each way on
//! large outputs ([`rows_take_kernel`]) an output row at a time, each tap a row of a
//! zero-padded input plane, in place of Winograd.
//!
//! Measured (`cargo bench --bench conv`, 2 threads, this AVX-512 machine, against the
//! channel-major path in the same run): 64 -> 128 channels at 80x80 stride 2 in 0.53-0.57 ms
//! against 0.65-0.68, 128 -> 256 at 40x40 stride 2 0.60-0.62 against 0.75-0.76; pointwise,
//! 256 -> 32 at 80x80 0.26-0.29 against 0.34-0.37 and 384 -> 256 at 20x20 0.17-0.18 against
//! 0.25. In YOLOv12n, the 3x3 convolutions went from 10.6 to 9.6 ms and the pointwise ones
//! from 8.5 to 7.7.

use std::mem::MaybeUninit;

use crate::detect::kernels::parallel;

use super::super::SendPtr;
use super::super::activation::Activation;
use super::super::cache;
use super::super::isa::Isa;
use super::super::pack::PackedB;
use super::super::x86_64::{avx2, avx512};
use super::direct::phase_planes;
use super::schedule::{self, SCRATCH};
use super::{BLOCK, ChannelLayout, Conv2d, ConvInput, ConvSpec, OutputPlanes, add_assign};

/// A convolution's weights in panels of `panel` output channels (one or two registers: 16 or
/// 32 with AVX-512, 8 or 16 with AVX2), `[panel][kk][channel]` with `kk = (c, ky, kx)` (zeros
/// past the last channel), and its biases padded to whole panels. The last panel is one
/// register wide (`last`) when the channels past the whole wide panels fill at most one: a
/// layer of 80 channels is panels of 32, 32 and 16, not three of 32 with a sixth of the work
/// on zeros. Made only for an ISA this CPU supports (`new` checks it), which the `unsafe`
/// calls of the kernels rely on.
#[derive(Debug, Clone)]
pub(super) struct PixelTiles {
    isa: Isa,
    weights: PackedB,
    bias: Vec<f32>,
    k: usize,
    panel: usize,
    panels: usize,
    last: usize,
    /// Runs may take the tile with the pixels in the lanes ([`PixelTiles::rows_for`]):
    /// pointwise convolutions and the small 3x3 ones of [`rows_take_kernel`].
    rows: bool,
}

/// Pixels per strip of an output written through a compact buffer (`32 x 128` floats: 16 KiB,
/// in L1).
const COMPACT_STRIP: usize = 128;

/// Weights of a block of taps, in floats (8 KiB, 128 taps of a 16-channel panel), for AVX2's
/// products of more than two such blocks: a group of tiles runs through one block (its weights
/// in L1) before the next, their sums kept in between, where a tile running its whole product
/// read the panel's weights (74 KiB for 128 input channels by 3x3) from L2 again for each tile.
/// With AVX-512's tiles (blocks of 64 taps), before they fetched their input ahead: YOLOv12n, 2
/// threads, interleaved rounds against whole products: 384 -> 256 channels pointwise at 20x20
/// 0.84-0.92 in three sittings; the 3x3 stride-2 layers 0.84-0.91 in a sitting where the
/// machine ran slow and 0.96-1.05 in one where it ran fast. Blocks of 4 KiB and of 16 KiB were
/// slower.
///
/// AVX-512's tiles run their whole products, reading each tile's weights from L2: with the
/// tile as it is now (it fetches its input two tiles ahead, `avx512::conv_tile`), that measured
/// faster than the blocks, whose sums each tile stores and reloads once per block. On an AMD
/// EPYC (Zen 4), 2 threads, 14 rounds alternating (YOLOv12n in each order), whole products
/// against blocks: the stride-2 layers 0.95-0.99 of their time, 384 -> 256 and 256 -> 128
/// pointwise at 20x20 0.96-0.97, the calls 0.986-0.991 (YOLOv12n), 0.979 (YOLO11n) and
/// 0.975-0.995 (YOLO11n at batch 4, 8 rounds in each order); at 1 thread level (0.99-1.01).
/// Blocks of 24 KiB came out level with whole products, blocks of 16 KiB level with those of
/// 8 KiB. With AVX2's tiles on the same machine the calls came out level (1.000, 1.008), so they
/// keep the blocks.
const TAP_BLOCK_FLOATS: usize = 2048;

/// Tiles that run through each block of taps before the next block (4 and 16 measured the
/// same).
const TILES_PER_GROUP: usize = 8;

thread_local! {
    /// Each thread's sums of the tiles of a group between blocks of taps.
    static SUMS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many taps ahead a pointwise tile fetches its input row (AVX-512). Each tap of a
/// pointwise tile is another input plane, a line the hardware prefetchers do not foresee:
/// YOLOv12n's pointwise layers took 0.96-0.97 of their time with it at 6 or 12 taps ahead
/// (2 threads, calls alternating with and without it in one process); layers with a kernel,
/// whose taps share rows, did not change (at most 0.98 for those on phase planes).
const TAPS_AHEAD: usize = 6;

/// Pixels of a pointwise convolution's plane per unit of work (the last takes the remainder),
/// on planes of [`SMALL_PLANE_UNITS`] units per thread or more.
const POINTWISE_UNIT: usize = 64;

/// On a plane of fewer than this many [`POINTWISE_UNIT`]s per thread, the units are longer.
const SMALL_PLANE_UNITS: usize = 8;

/// Pixels per unit of work of a pointwise convolution on a plane of `pixels`, for `threads`.
///
/// The units a thread claims at once are computed as one run of tiles, and the last tile of a
/// run overlaps the one before it when the tiles do not fit the run: a 20x20 plane in units of
/// 64 computed 430 pixels for 400, in tiles of 10. A small plane (under [`SMALL_PLANE_UNITS`]
/// units per thread) is cut into two units per thread instead (400 pixels on 2 threads: four
/// of 100), each at least two tiles long. YOLOv12n's pointwise layers at 20x20, calls
/// alternating between the two in one process: 0.93-0.96 of their time on 2 threads, 0.87 on
/// one.
fn pointwise_stretch(pixels: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    if pixels < SMALL_PLANE_UNITS * threads * POINTWISE_UNIT { (pixels / (2 * threads)).max(2 * WIDEST_TILE).min(pixels) } else { POINTWISE_UNIT.min(pixels) }
}

/// No tile is wider than this many pixels ([`PixelTiles::tile`]).
const WIDEST_TILE: usize = 16;

/// One tile with the pixels in the lanes: `pointwise_rows` of [`avx512`] or [`avx2`].
type RowKernel = unsafe fn(&[*const f32], usize, usize, *const f32, usize, *const f32, bool, *mut f32, usize, Option<(*const f32, usize)>, usize);

/// One tile's kernel: `conv_tile` of [`avx512`] or [`avx2`].
type TileKernel = unsafe fn(&[*const f32], usize, *const f32, *const f32, bool, *mut f32, usize, Option<(*const f32, usize)>, usize, *const f32, *mut f32);

impl PixelTiles {
    /// Whether a convolution of `spec` can run this way: one group. (Where Winograd applies,
    /// it runs this way on small outputs only, [`winograd::MIN_PIXELS`](super::winograd::MIN_PIXELS).)
    /// `STREAMDET_PIXEL_TILES=off` keeps such convolutions on the channel-major path, to
    /// compare the two on one machine.
    pub(super) fn applies(spec: &ConvSpec) -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENABLED.get_or_init(|| std::env::var("STREAMDET_PIXEL_TILES").map_or(true, |v| v != "off")) && spec.groups == 1
    }

    /// Packs `weights` (`[out][in][kh][kw]`) and `bias` into panels for `isa`'s tiles.
    pub(super) fn new(isa: Isa, spec: &ConvSpec, weights: &[f32], bias: &[f32]) -> Self {
        assert!(isa.supported(), "pixel tiles for {isa:?}, which this CPU cannot run");
        let k = spec.in_channels * spec.kernel.0 * spec.kernel.1;
        let cout = spec.out_channels;
        // One register of channels per tile for narrow layers, two for the others.
        let narrow = isa.lanes();
        let wide = 2 * narrow;
        let panel = if cout <= narrow { narrow } else { wide };
        let panels = cout.div_ceil(panel);
        let last = if cout - (panels - 1) * panel <= narrow { narrow } else { panel };
        let mut padded_bias = bias.to_vec();
        padded_bias.resize((panels - 1) * panel + last, 0.0);
        let rows = rows_enabled() && (spec.kernel == (1, 1) || rows_take_kernel(isa, spec));
        let mut tiles = PixelTiles { isa, weights: PackedB::new(), bias: padded_bias, k, panel, panels, last, rows };
        let widths: Vec<usize> = (0..panels).map(|p| tiles.width(p)).collect();
        let floats = tiles.weights.floats_mut((panels - 1) * k * panel + k * last);
        // Panel `p` starts after `p` whole panels.
        for (p, &width) in widths.iter().enumerate() {
            for (index, value) in floats[p * k * panel..][..k * width].iter_mut().enumerate() {
                let (kk, channel) = (index / width, p * panel + index % width);
                *value = if channel < cout { weights[channel * k + kk] } else { 0.0 };
            }
        }
        tiles
    }

    /// Pointwise runs on [`avx512::conv_tile`] from now on.
    #[cfg(any(test, feature = "bench-internals"))]
    pub(super) fn without_rows(&mut self) {
        self.rows = false;
    }

    /// Whether runs may put the pixels in the lanes ([`PixelTiles::rows_for`] decides per call).
    #[cfg(any(test, feature = "bench-internals"))]
    pub(super) fn has_rows(&self) -> bool {
        self.rows
    }

    /// Whether a run of a convolution of `spec` from an input of `input_floats` per image into
    /// `pixels` output pixels puts the pixels in the lanes: pointwise ones as [`rows_apply`]
    /// says; the 3x3 ones that have rows on large outputs whose input is read through phase
    /// planes (which a row of pixels-in-lanes tiles reads as consecutive floats, every tap).
    pub(super) fn rows_for(&self, spec: &ConvSpec, input_floats: usize, pixels: usize) -> bool {
        self.rows
            && if spec.kernel == (1, 1) {
                rows_apply(self.isa, spec.in_channels, pixels)
            } else {
                pixels >= KERNEL_ROWS_MIN_PIXELS && input_floats < IN_PLACE_MIN_FLOATS
            }
    }

    /// Panel `p`'s weights: `k * width(p)` floats, 64-byte aligned.
    fn weights(&self, p: usize) -> *const f32 {
        assert!(p < self.panels, "panel {p} of {}", self.panels);
        // SAFETY: panel `p` starts after `p` whole panels, inside the packed floats.
        unsafe { self.weights.as_ptr().add(p * self.k * self.panel) }
    }

    /// Panel `p` of a layer of `cout` output channels, with SiLU when `silu`.
    fn panel(&self, p: usize, cout: usize, silu: bool) -> Panel {
        Panel {
            weights: self.weights(p),
            tap_floats: self.width(p),
            bias: self.bias[p * self.panel..].as_ptr(),
            silu,
            channels: self.panel.min(cout - p * self.panel),
            taps_per_block: match self.isa {
                Isa::Avx2 => Some(TAP_BLOCK_FLOATS / self.width(p)),
                Isa::Avx512 => None,
            },
        }
    }

    /// A pointwise run of `len` pixels from `first` of each input plane (`taps`) through panel
    /// `p`, with the pixels in the lanes ([`avx512::pointwise_rows`], [`avx2::pointwise_rows`]):
    /// the panel's channels in blocks of 12 and 8 with AVX-512 (32 = 12 + 12 + 8, 16 = 8 + 8),
    /// of 6 and 4 with AVX2 (16 = 6 + 6 + 4, 8 = 4 + 4), each tile of 32 (16) pixels of the run
    /// through every block in turn.
    /// `out` is the panel's first channel at pixel `first`, channels `ldo` apart; the residual
    /// has its layout.
    ///
    /// # Safety
    /// `self.rows`; pixels `first..first + len` of every tap are
    /// readable; `out` and the residual hold the panel's channels of those pixels, `ldo` apart,
    /// and no other thread accesses them.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pointwise_rows(
        &self,
        taps: &[*const f32],
        first: usize,
        len: usize,
        p: usize,
        cout: usize,
        silu: bool,
        out: *mut f32,
        ldo: usize,
        residual: Option<*const f32>,
    ) {
        debug_assert!(self.rows);
        let width = self.width(p);
        let channels = self.panel.min(cout - p * self.panel);
        // Blocks of channels `(first, count, kernel)`: as many sums as registers allow beside
        // the tile's inputs and a weight (24 and 12 of them).
        let (tile, blocks): (usize, &[(usize, usize, RowKernel)]) = match (self.isa, width) {
            (Isa::Avx512, 32) => {
                (avx512::ROW_TILE, &[(0, 12, avx512::pointwise_rows::<12>), (12, 12, avx512::pointwise_rows::<12>), (24, 8, avx512::pointwise_rows::<8>)])
            }
            (Isa::Avx512, _) => (avx512::ROW_TILE, &[(0, 8, avx512::pointwise_rows::<8>), (8, 8, avx512::pointwise_rows::<8>)]),
            (Isa::Avx2, 16) => (avx2::ROW_TILE, &[(0, 6, avx2::pointwise_rows::<6>), (6, 6, avx2::pointwise_rows::<6>), (12, 4, avx2::pointwise_rows::<4>)]),
            (Isa::Avx2, _) => (avx2::ROW_TILE, &[(0, 4, avx2::pointwise_rows::<4>), (4, 4, avx2::pointwise_rows::<4>)]),
        };
        // Each tile of pixels through every block: the tile's input (`k x tile` floats) stays
        // in L1 from one block to the next, beside the panel's weights. (Copied first into a
        // compact buffer, out of the reach of planes that share their cache sets, the AVX2 tile
        // took 0.93 of its time on 32 -> 32 channels at 160x160 and was level on 48 -> 64, one
        // thread on an AMD EPYC (Zen 4): not worth the copy.)
        for x in (0..len).step_by(tile) {
            let lanes = (len - x).min(tile);
            for &(c0, m, kernel) in blocks.iter().filter(|&&(c0, _, _)| c0 < channels) {
                let rows = m.min(channels - c0);
                // SAFETY: the caller's contract, for pixels `first + x ..` of channels `c0 ..
                // c0 + rows` of the panel (the CPU has the features of `self.isa`, whose kernels
                // these are); the panel's weights are `k` rows of `width >= c0 + m` floats, its
                // biases padded to `width`.
                unsafe {
                    let residual = residual.map(|r| (r.add(c0 * ldo + x), ldo));
                    kernel(
                        taps,
                        first + x,
                        lanes,
                        self.weights(p).add(c0),
                        width,
                        self.bias[p * self.panel + c0..].as_ptr(),
                        silu,
                        out.add(c0 * ldo + x),
                        ldo,
                        residual,
                        rows,
                    );
                }
            }
        }
    }

    /// Output channels of panel `p`'s registers.
    fn width(&self, p: usize) -> usize {
        if p + 1 == self.panels { self.last } else { self.panel }
    }

    /// The fewest pixels a run needs to hold a tile of every panel's kernel.
    pub(super) fn shortest_run(&self, run: usize) -> usize {
        self.tile(run, 1, self.panel, false).0.max(self.tile(run, 1, self.last, false).0)
    }

    pub(super) fn isa(&self) -> Isa {
        self.isa
    }

    /// Like [`tile`](Self::tile), for a run with AVX2 whose taps' pixels are `step` floats
    /// apart: a pointwise run's in planes (1) or in blocks (8, [`BLOCK`] floats from one pixel
    /// to the next), a stride-2 run's in blocks (16); its output goes to planes or
    /// (`blocked_out`) to blocks.
    ///
    /// Measured on an AMD EPYC (Zen 4) capped at AVX2, YOLOv12n, 2 threads, interleaved rounds,
    /// and not kept: tiles of 6 pixels on the stride-2 layers' output rows of 20 (which tiles of
    /// 5 fit exactly), 1.07-1.08 of those layers' time; panels of 32 channels in tiles of 3 pixels,
    /// so that a stride-2 layer reads its input once per 32 channels rather than per 16, level
    /// (0.95-1.05); and the 8 taps of a block of channels read from one tap's pointer (the
    /// loop over them unrolled, for fewer instructions per multiply-add), 1.02-1.12 on the
    /// stride-2 layers, whose unrolled loop spilled a sum, and level on the pointwise ones.
    fn blocked_tile(&self, run: usize, step: usize, width: usize, blocked_out: bool) -> (usize, TileKernel) {
        assert_eq!(self.isa, Isa::Avx2, "blocked tensors are read by the AVX2 tiles only");
        macro_rules! kernels {
            ($sx:literal, $blocked:literal) => {
                match width {
                    8 => [(8, avx2::conv_tile::<8, 1, $sx, $blocked> as TileKernel); 2],
                    _ => [(6, avx2::conv_tile::<6, 2, $sx, $blocked> as TileKernel), (5, avx2::conv_tile::<5, 2, $sx, $blocked> as TileKernel)],
                }
            };
        }
        let choices = match (step, blocked_out) {
            (1, true) => kernels!(1, true),
            (1, false) => kernels!(1, false),
            (BLOCK, true) => kernels!(8, true),
            (BLOCK, false) => kernels!(8, false),
            (16, false) => kernels!(16, false),
            (16, true) => kernels!(16, true),
            _ => unreachable!("no blocked tile reads taps {step} floats a pixel into {blocked_out:?} blocks"),
        };
        choices.into_iter().filter(|&(pixels, _)| pixels <= run).min_by_key(|&(pixels, _)| run.div_ceil(pixels) * pixels).unwrap_or(choices[1])
    }

    /// Pixels per tile for runs of `run` pixels whose inputs are `stride` (1 or 2) floats
    /// apart, and the kernel for them, for panels `width` channels wide: the widest tile that
    /// computes the fewest pixels twice. `pointwise`: each tap is an input plane (the kernel
    /// fetches them [`TAPS_AHEAD`] ahead).
    fn tile(&self, run: usize, stride: usize, width: usize, pointwise: bool) -> (usize, TileKernel) {
        macro_rules! kernels {
            ($sx:literal, $ahead:expr) => {
                match (self.isa, width) {
                    (Isa::Avx512, 16) => [(16, avx512::conv_tile::<16, 1, $sx, $ahead> as TileKernel); 2],
                    (Isa::Avx512, _) => {
                        [(12, avx512::conv_tile::<12, 2, $sx, $ahead> as TileKernel), (10, avx512::conv_tile::<10, 2, $sx, $ahead> as TileKernel)]
                    }
                    (Isa::Avx2, 8) => [(8, avx2::conv_tile::<8, 1, $sx, false> as TileKernel); 2],
                    (Isa::Avx2, _) => [(6, avx2::conv_tile::<6, 2, $sx, false> as TileKernel), (5, avx2::conv_tile::<5, 2, $sx, false> as TileKernel)],
                }
            };
        }
        let choices = if stride == 2 {
            kernels!(2, 0)
        } else if pointwise {
            kernels!(1, TAPS_AHEAD)
        } else {
            kernels!(1, 0)
        };
        choices.into_iter().filter(|&(pixels, _)| pixels <= run).min_by_key(|&(pixels, _)| run.div_ceil(pixels) * pixels).unwrap_or(choices[1])
    }
}

/// The widest tile's multiply-add rate on this thread, in GFLOP/s (2 per multiply-add): `isa`'s
/// tile of pixels by channels (6 x 16 with AVX2, 12 x 32 with AVX-512) over `taps` taps, each
/// in a plane of its own `plane_floats` floats after the one before, as a pointwise
/// convolution reads its input, for some `flops` floating-point operations; the sums are
/// stored unfinished, so the loop over the taps is all that is timed. `None` when this CPU
/// cannot run `isa`. The micro-benchmark (`benches/conv.rs`) sets planes of YOLO's sizes
/// beside the same planes one cache line longer: at 640x640 the planes of 40x40 pixels and more
/// are whole multiples of 256 bytes long, which puts the lines that a tile reads (the same
/// pixels of every plane) in 16 (40x40), 4 (80x80) or one (160x160) of the 64 sets of a
/// 32 KiB, 8-way L1, more lines than those sets hold.
#[cfg(feature = "bench-internals")]
pub fn tile_gflops(isa: Isa, taps: usize, plane_floats: usize, flops: f64) -> Option<f64> {
    if !isa.supported() || taps == 0 {
        return None;
    }
    let (pixels, channels, kernel): (usize, usize, TileKernel) = match isa {
        Isa::Avx2 => (6, 16, avx2::conv_tile::<6, 2, 1, false>),
        Isa::Avx512 => (12, 32, avx512::conv_tile::<12, 2, 1, 0>),
    };
    // Two tiles side by side in every plane, the kernel alternating between them.
    let plane_floats = plane_floats.max(2 * pixels);
    let input = vec![0.5f32; taps * plane_floats];
    let taps: Vec<*const f32> = input.chunks_exact(plane_floats).map(<[f32]>::as_ptr).collect();
    let mut weights = PackedB::new();
    weights.floats_mut(taps.len() * channels).fill(0.01);
    let bias = vec![0.0f32; channels];
    let mut sums = vec![0.0f32; pixels * channels];
    let mut out = vec![0.0f32; pixels * channels];
    let per_call = (2 * taps.len() * pixels * channels) as f64;
    let calls = ((flops / per_call) as usize).max(1);
    let start = std::time::Instant::now();
    for call in 0..calls {
        // SAFETY: the CPU runs `isa` (checked above); every tap points at a plane of
        // `plane_floats >= 2 * pixels` floats, and pixels `at..at + pixels` with `at` at most
        // `pixels` lie inside it; the weights are line-aligned (`PackedB`) and hold `channels`
        // floats per tap; `bias` holds `channels` and `out` `channels` rows of `pixels`; the
        // sums go to `sums` (`pixels * channels` floats).
        unsafe {
            kernel(
                &taps,
                (call % 2) * pixels,
                weights.as_ptr(),
                bias.as_ptr(),
                false,
                out.as_mut_ptr(),
                pixels,
                None,
                channels,
                std::ptr::null(),
                sums.as_mut_ptr(),
            )
        };
    }
    std::hint::black_box(&sums);
    Some(per_call * calls as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// `STREAMDET_POINTWISE_ROWS=off` keeps pointwise convolutions on [`avx512::conv_tile`] and
/// the small 3x3 ones of [`rows_take_kernel`] on Winograd, to compare on one machine.
fn rows_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("STREAMDET_POINTWISE_ROWS").map_or(true, |v| v != "off"))
}

/// Whether a pointwise convolution of `cin` input channels on planes of `pixels` runs with the
/// pixels in the lanes ([`PixelTiles::pointwise_rows`]). YOLOv12n, 2 threads, the same build
/// with and without them (`STREAMDET_POINTWISE_ROWS`) in alternating rounds, three sittings,
/// each layer's time set against that of the layers the switch leaves alone in the same rounds:
/// layers of at most 96 input channels took 0.84-0.91 of their time at 40x40 (64 -> 64 and
/// 64 -> 192 channels among them) and 0.79-0.84 at 160x160, and were level at 80x80. On such
/// short products the other tile's epilogue (transposes, and stores of 10-12 pixels to each of
/// 32 channels) weighs most. Longer products lost then on a Xeon (128 -> 64 channels at 40x40
/// 1.1-1.25); since the tile fetches the lines it stores ahead, they gain on an AMD EPYC (Zen
/// 4): 128 to 256 input channels at 40x40 0.82-0.99 of their time at 2 threads (YOLOv12n,
/// YOLO11n; 192 -> 128 0.89-0.92, 256 -> 32 0.82) and 0.86-0.94 at 1, interleaved rounds
/// against the build that took at most 96. Every layer on 20x20 planes loses (1.2-1.4 on the
/// Xeon, in stretches of 96-112 pixels; 0.93-1.22 on the EPYC, most above 1.05).
///
/// The AVX2 tile (16 pixels by 6 or 4 channels, where 16 registers allow) gains on large
/// planes only: on the EPYC with the kernels capped at AVX2 (`STREAMDET_CPU_KERNEL=avx2`),
/// YOLO11n, 2 threads, interleaved rounds against the channels in the lanes: at 160x160 32 ->
/// 32 and 48 -> 64 channels 0.85 and 0.87 of their time, at 80x80 0.93-1.10, at 40x40 1.01-1.19.
fn rows_apply(isa: Isa, cin: usize, pixels: usize) -> bool {
    let fewest_pixels = match isa {
        Isa::Avx512 => 1600,
        Isa::Avx2 => 160 * 160,
    };
    cin <= 256 && pixels >= fewest_pixels
}

/// Whether a pointwise convolution of `cin` input channels on planes of `pixels` runs as the
/// channel-major product (the 6x16 microkernel, pixels in its lanes) rather than in pixel tiles,
/// with AVX2: on small planes with at least 256 input channels. On the AMD EPYC (Zen 4) with
/// the kernels capped at AVX2, YOLO11n, 2 threads, interleaved rounds between the two, two
/// sittings: its layers at 20x20 of 256 input channels took 0.86-0.91 of their time in the
/// product (256 -> 256, 256 -> 128), 384 -> 128 and 256 -> 80 0.89-0.99, 384 -> 256 and 512 ->
/// 256 0.96-1.05 (level); those of 64 to 128 input channels lost (1.03-1.21), as did every
/// layer with AVX-512 (1.01-1.19).
///
/// That holds on planes only. In blocks ([`ChannelLayout::Blocked`]), where the tile stores
/// each pixel's 8 sums whole, without the transposes and the scattered stores into planes,
/// the tiles win, and such layers now keep their tensors in blocks
/// ([`Conv2d::runs_blocked`]): on a Xeon (Sapphire Rapids) capped at AVX2
/// (`scripts/as-avx2.sh`), 2 threads, 8 rounds alternating with the product on planes,
/// YOLOv12n's pointwise layers at 20x20 took 0.80-0.93 of their time (256 -> 128 0.80-0.82, 384
/// -> 256 0.82, 256 -> 80 0.68), the 3x3 and depthwise layers that read their outputs 0.91 and
/// 0.52, all pointwise layers 0.94, the call 0.96; YOLO11n's pointwise layers at 20x20
/// 0.76-0.93 (256 -> 256 0.76-0.82), the call 0.97, and 0.96 at batch 4.
fn avx2_gemm_takes(cin: usize, pixels: usize) -> bool {
    cin >= AVX2_GEMM_MIN_CHANNELS && pixels <= 20 * 20
}

/// The fewest input channels of a pointwise convolution on planes that [`avx2_gemm_takes`]
/// to the channel-major product.
const AVX2_GEMM_MIN_CHANNELS: usize = 256;

/// Whether a 3x3 stride-2 convolution of `spec` into `pixels` output pixels runs as the
/// channel-major product over the phase planes ([`run_direct`](Conv2d::run_direct): the 6x16
/// microkernel, pixels in its lanes) rather than in pixel tiles, with AVX2: one of at least 128
/// input channels into an output of 40x40 or more, a long product (`k` of 1152 and more) over
/// many pixels. On a Zen 3 EPYC, YOLO11n and YOLOv12n at 2 threads, 20 rounds alternating with
/// pixel tiles in one process: 128 -> 128 channels from 80x80 took 0.91-0.95 of its time (0.87-
/// 0.92 in three earlier sittings); the same layers from 40x40 (128 -> 128, 128 -> 256) lost,
/// 1.11-1.15, and 64 -> 64 from 80x80 1.05.
fn avx2_direct_takes(spec: &ConvSpec, pixels: usize) -> bool {
    spec.kernel == (3, 3) && spec.stride == (2, 2) && spec.dilation == (1, 1) && spec.in_channels >= 128 && pixels >= 40 * 40
}

/// Whether a 3x3 stride-1 convolution of `spec` may run with the pixels in the lanes, an output
/// row at a time from its zero-padded input planes ([`PixelTiles::rows_for`] decides per call),
/// with `isa`'s tiles: one of at most 16 input and output channels, with AVX2. Its weights are
/// short (`k` of 72-144) and its channels fill at most one register, so Winograd's transforms
/// and the other tile's channel lanes (half of them empty at 8 output channels) cost more than
/// the product. With AVX-512, Winograd now runs them faster: on an AMD EPYC (Zen 4), `cargo
/// bench --bench conv` (the best of 8-12 runs, four sets), 16 -> 8 and 8 -> 16 channels at
/// 160x160 took 0.52-0.69 and 0.57-0.60 ms by Winograd against 0.68-0.74 and 0.71-0.73 in the
/// rows on one thread, 0.34-0.38 against 0.39-0.42 and 0.38-0.48 against 0.41-0.44 on two
/// (three runs); in YOLOv12n, interleaved rounds, 0.83-1.00 of their time on one thread in two
/// sittings (1.08-1.09 in a third, whose untouched layers moved by 1.03) and 0.89-0.99 on two
/// in two (YOLO11n 0.98 and 1.01). With the AVX2 tiles (the same CPU capped at AVX2)
/// Winograd lost in the model (1.11-1.16 for 16 -> 8, 0.94-1.15 for 8 -> 16), so the rows keep
/// them there.
fn rows_take_kernel(isa: Isa, spec: &ConvSpec) -> bool {
    isa == Isa::Avx2 && spec.kernel == (3, 3) && spec.stride == (1, 1) && spec.dilation == (1, 1) && spec.in_channels <= 16 && spec.out_channels <= 16
}

/// Output pixels from which a convolution that [`rows_take_kernel`] takes the pixels-in-lanes
/// tile. Against Winograd, interleaved rounds (`scripts/ab-steps.py`, 8-10 each), at 160x160:
/// YOLO11n at 2 threads 16 -> 8 channels 0.78 and 0.56 of its time, 8 -> 16 0.79 and 0.65
/// (the untouched layers 0.93-0.98), at 1 thread 0.76 and 0.73; YOLOv12n 8 -> 16 0.70 and 0.69.
/// At 80x80 16 -> 16 came out level (0.80-1.13 over four layers) and 32 -> 16 lost (1.20-1.33;
/// hence at most 16 input channels). With the AVX2 tile (the EPYC capped at AVX2, YOLO11n, 2
/// threads), 16 -> 8 and 8 -> 16 at 160x160 took 0.79 and 0.93 of their time.
const KERNEL_ROWS_MIN_PIXELS: usize = 160 * 160;

/// Input floats per image from which a convolution with a kernel reads its input in place
/// rather than through phase planes. Reading in place skips the copy into the planes, which
/// costs most where the input is large: in YOLOv12n, 3 -> 16 channels from 640x640 went from
/// 0.74-0.78 to 0.64 ms, 64 -> 64 from 160x160 from 1.23-1.40 to 1.13-1.15; but a stride-2
/// tile then spans twice the cache lines, and below this size the planes are faster (128 ->
/// 128 channels from 80x80: 1.05-1.07 against 1.17-1.18 ms in place). On an AMD EPYC (Zen 4)
/// every stride-2 layer read in place came out level (YOLOv12n, 2 threads, 0.93-1.02 of the
/// layers' time): what the copy costs, the wider rows lose again.
const IN_PLACE_MIN_FLOATS: usize = 1 << 20;

/// How a convolution's tiles find their inputs.
enum Reading {
    /// Pointwise: the input planes themselves, in stretches of `stretch` pixels (the last
    /// stretch takes the remainder).
    Planes { stretch: usize },
    /// Stride 1 or 2 along rows, on a large input ([`IN_PLACE_MIN_FLOATS`]): the input rows
    /// in place, for the output columns `interior` whose taps all fall inside the image; the
    /// other columns are gathered.
    InPlace { stride: usize, interior: std::ops::Range<usize> },
    /// Any other stride: the phase planes ([`phase_planes`]).
    PhasePlanes,
}

impl Conv2d {
    /// The pixel tiles for an output of `oh x ow`, when this convolution has them: a run of
    /// pixels (a row, or the whole plane for a pointwise convolution) must hold a tile, and
    /// with AVX2 a long pointwise product on a small plane ([`avx2_gemm_takes`]) and a long
    /// stride-2 one on a large output ([`avx2_direct_takes`]) are left to the channel-major
    /// product.
    pub(super) fn pixel_tiles_for(&self, oh: usize, ow: usize) -> Option<&PixelTiles> {
        let tiles = self.pixel_tiles.as_ref()?;
        let pointwise = self.is_pointwise();
        let run = if pointwise { oh * ow } else { ow };
        let channel_major = tiles.isa == Isa::Avx2
            && match pointwise {
                true => avx2_gemm_takes(self.spec.in_channels, oh * ow),
                false => avx2_direct_takes(&self.spec, oh * ow),
            };
        (run >= tiles.shortest_run(run) && !channel_major).then_some(tiles)
    }

    /// How this convolution's tiles read an input of `h x w` pixels (`layout`) into an output
    /// `ow` wide. A blocked input is read in place (the caller checked that it can be,
    /// [`blocked_strided_tiles`](Self::blocked_strided_tiles)) unless the layer is pointwise.
    fn reading(&self, tiles: &PixelTiles, (h, w): (usize, usize), layout: ChannelLayout, ow: usize, stretch: usize) -> Reading {
        if self.is_pointwise() {
            return Reading::Planes { stretch };
        }
        if layout == ChannelLayout::Blocked {
            let interior = self.in_place_interior(tiles, w, ow).expect("a blocked input to a layer that cannot read it in place");
            return Reading::InPlace { stride: self.spec.stride.1, interior };
        }
        if self.spec.in_channels * h * w < IN_PLACE_MIN_FLOATS {
            return Reading::PhasePlanes;
        }
        match self.in_place_interior(tiles, w, ow) {
            Some(interior) => Reading::InPlace { stride: self.spec.stride.1, interior },
            None => Reading::PhasePlanes,
        }
    }

    /// The output columns whose taps all fall inside an input row `w` wide, when this
    /// convolution's tiles can read its rows in place: stride 1 or 2 along them, and enough
    /// such columns for a tile.
    fn in_place_interior(&self, tiles: &PixelTiles, w: usize, ow: usize) -> Option<std::ops::Range<usize>> {
        let (sw, dw, pl, kw) = (self.spec.stride.1, self.spec.dilation.1, self.spec.pads.1, self.spec.kernel.1);
        // Output column `ox` reads input columns `ox * sw - pl + kx * dw`, `kx < kw`.
        let first = pl.div_ceil(sw);
        let span = (kw - 1) * dw;
        let end = if w + pl > span { ((w + pl - span - 1) / sw + 1).min(ow) } else { 0 };
        (sw <= 2 && end >= first + tiles.shortest_run(end.saturating_sub(first))).then_some(first..end)
    }

    /// The pixel tiles that run this convolution on `input` in blocks, read in place: one that
    /// [`reads_blocked`](Self::reads_blocked) with a stride of 2, on an input wide enough for
    /// a tile of interior columns. (Such a layer on planes may run otherwise: in phase planes
    /// or on the channel-major product.)
    pub(super) fn blocked_strided_tiles(&self, input: &ConvInput) -> Option<&PixelTiles> {
        let (_, ow) = self.output_size(input.h, input.w)?;
        let tiles = self.pixel_tiles.as_ref()?;
        (input.layout() == ChannelLayout::Blocked && self.strided_tiles_read_blocks() && self.in_place_interior(tiles, input.w, ow).is_some()).then_some(tiles)
    }

    /// The convolution in tiles of pixels by channels (see the module's notes), into `out`
    /// (`output`, its channels laid out as `out_layout` says), adding `residual` (laid out as
    /// the output) last. An input or output in [`ChannelLayout::Blocked`] is for pointwise
    /// convolutions on AVX2 tiles ([`Conv2d::runs_blocked`]), an output so with planes
    /// `oh * ow` apart.
    pub(super) fn run_pixel_tiles(
        &self,
        tiles: &PixelTiles,
        input: &ConvInput,
        output: OutputPlanes,
        out_layout: ChannelLayout,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (n, h, w) = (input.n, input.h, input.w);
        let OutputPlanes { oh, ow, pitch } = output;
        let blocked_out = out_layout == ChannelLayout::Blocked;
        let blocked_in = input.layout() == ChannelLayout::Blocked;
        let blocked = blocked_in || blocked_out;
        assert!(!blocked_in || self.reads_blocked(), "a blocked input to a convolution that does not read blocks");
        assert!(!blocked_out || (self.runs_blocked() && pitch == oh * ow), "a blocked output from a convolution that does not write blocks");
        // Floats from one pixel to the next, in the input and in the output.
        let in_step = if blocked_in { BLOCK } else { 1 };
        let out_step = if blocked_out { BLOCK } else { 1 };
        let (cin, cout) = (self.spec.in_channels, self.spec.out_channels);
        let (kh, kw) = self.spec.kernel;
        let (sh, dh, pt, dw) = (self.spec.stride.0, self.spec.dilation.0, self.spec.pads.0, self.spec.dilation.1);
        let pixels = oh * ow;
        let threads = parallel::threads();
        let rows = !blocked && tiles.rows_for(&self.spec, cin * h * w, pixels);
        let stretch = match rows {
            // Stretches of whole vectors of pixels: only the plane's last tile is partial.
            true => (pointwise_stretch(pixels, threads) / 16 * 16).max(16),
            false => pointwise_stretch(pixels, threads),
        };
        let reading = self.reading(tiles, (h, w), input.layout(), ow, stretch);
        // Runs of output pixels: stretches of the plane, or output rows.
        let runs = match reading {
            Reading::Planes { stretch } => pixels / stretch,
            Reading::InPlace { .. } | Reading::PhasePlanes => oh,
        };
        let layout = self.phase_layout(h, w);
        let (planes, offsets) = match reading {
            Reading::PhasePlanes => (phase_planes(input, &layout, Some(tiles.isa)), self.tap_offsets(&layout)),
            Reading::Planes { .. } | Reading::InPlace { .. } => (Vec::new(), Vec::new()),
        };
        let channel_len = layout.sh * layout.sw * layout.plane;
        // What taps of rows above or below the image read: zeros, as far as a row reaches.
        let zeros = match reading {
            Reading::InPlace { stride, .. } => vec![0.0f32; (ow * stride + WIDEST_TILE * 2) * in_step],
            Reading::Planes { .. } | Reading::PhasePlanes => Vec::new(),
        };
        let panels = cout.div_ceil(tiles.panel);
        // Blocks of panels, and the most runs a piece of work takes: those of a task when the
        // loop is split into some four tasks of equal size per thread (a pointwise convolution's
        // in stretches of the plane, each a quarter of a thread's share).
        let (coarse_runs, runs_per_coarse_run) = match reading {
            Reading::Planes { stretch } => {
                let coarse = (pixels / (4 * threads).div_ceil(n)).max(WIDEST_TILE).min(pixels);
                (pixels / coarse, (coarse / stretch).max(1))
            }
            Reading::InPlace { .. } | Reading::PhasePlanes => (runs, 1),
        };
        let split = schedule::RunsByPanels::new(n, coarse_runs, panels, threads);
        let (panels_per_block, panel_blocks) = (split.panels_per_block, split.panel_blocks);
        let piece_runs = split.runs_per_task * runs_per_coarse_run;
        let silu = self.spec.activation == Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        // Channel planes a whole number of pages apart share their L1 sets, so a tile stored
        // straight into them evicts its own rows: such outputs go through a compact strip.
        let compact = !blocked_out && cache::rows_share_cache_sets(pitch);
        let (planes, offsets, zeros, reading) = (&planes, &offsets, &zeros, &reading);
        // The work goes out in units of one run of one image through one block of panels,
        // numbered along the runs (the blocks of a run consecutive), in ranges that shrink
        // towards the end of the loop ([`parallel::for_each_range`]). A range is done in pieces
        // of consecutive runs through one block, at most `piece_runs` long, each through its
        // panels in turn: the input of a piece stays in L2 from one panel to the next. YOLOv12n
        // (2 threads, calls alternating with tasks of equal size): the threads' waits for each
        // other at the ends of all loops went from 3.5 to 2.2 ms a call. On the AMD EPYC (Zen 4),
        // neither units of a single panel nor half of a stride-2 layer's panels to each thread
        // (each reading all the input and half the weights) changed those layers' time (0.90-1.03),
        // and nor did fetching the panels' weights into L2 at the start of each range (the
        // pointwise layers at 40x40 and 20x20 0.95-1.04).
        parallel::for_each_range(n * runs * panel_blocks, |units| {
            let mut unit = units.start;
            while unit < units.end {
                let (batch, first_run, block) = (unit / panel_blocks / runs, unit / panel_blocks % runs, unit % panel_blocks);
                let len = if panel_blocks == 1 { (units.end - unit).min(runs - first_run).min(piece_runs) } else { 1 };
                let task_runs = first_run..first_run + len;
                let first_of_range = unit == units.start;
                unit += len;
                let task_panels = block * panels_per_block..((block + 1) * panels_per_block).min(panels);
                // The output of panel `panel` at pixel `p` of channel 0 of the panel (in blocks,
                // the panel's first block starts where its first plane would).
                let at = |panel: usize, p: usize| (batch * cout + panel * tiles.panel) * pitch + p * out_step;
                let run = |taps: &[*const f32], start: usize, stride: usize, len: usize, first_out: usize, panel: usize, scratch: &mut Vec<f32>| {
                    let (tile, kernel) = match blocked {
                        true => tiles.blocked_tile(len, stride, tiles.width(panel), blocked_out),
                        false => tiles.tile(len, stride, tiles.width(panel), matches!(reading, Reading::Planes { .. })),
                    };
                    let run = Run { kernel, tile, taps, at: start, stride, len, out_step };
                    let weights = tiles.panel(panel, cout, silu);
                    let residual = residual.map(|r| r[first_out..].as_ptr());
                    // SAFETY: the CPU has the features of `tiles.isa` (`PixelTiles::new` checked).
                    // The callers below pass taps and starts whose pixels lie inside the input (or
                    // the zero row), as `Run` requires. This piece alone writes channels
                    // `panel * tiles.panel ..` of its runs of image `batch` (the ranges of units
                    // do not overlap, and units differ in image, run or panels), inside `out` and
                    // the residual, which have the output's shape.
                    unsafe { run.emit(&weights, out_ptr.get().add(first_out), pitch * out_step, residual, compact, scratch) };
                };
                SCRATCH.with_borrow_mut(|(scratch, _)| match reading {
                    Reading::Planes { stretch } => {
                        // The stretches of the range are one run.
                        let taps: Vec<*const f32> = (0..cin).map(|c| input.channel_start(batch, c)).collect();
                        let first = task_runs.start * stretch;
                        let end = if task_runs.end == runs { pixels } else { task_runs.end * stretch };
                        // The planes of a skip connection's tensor, made many layers before,
                        // come from L3 or memory, one line per plane and tap: more streams than
                        // the hardware prefetchers follow. The next piece of them (this thread's
                        // next, as a rule; and the first piece of a range, too) is fetched into
                        // L2 while this one is computed. YOLOv12n, 2 threads, 12 interleaved
                        // rounds: 256 -> 32 channels at 80x80 (half its input 33 MB old) 0.79 of
                        // its time, 384 -> 64 0.93, 192 -> 64 0.89; fetching the first piece
                        // too, 0.87 more on 256 -> 32. Not for the pixels-in-lanes tile, which
                        // reads at most 256 planes a whole line at a time: 48 -> 64 at 160x160
                        // took 1.19 of its time with it.
                        if !rows {
                            input.fetch_cold(batch, if first_of_range { first } else { end }..2 * end - first);
                        }
                        for panel in task_panels.clone() {
                            if rows {
                                let out = out_ptr.get().wrapping_add(at(panel, first));
                                let residual = residual.map(|r| r[at(panel, first)..].as_ptr());
                                // SAFETY: `rows` holds; pixels `first..end` of every
                                // input plane lie inside the plane; this piece alone writes
                                // channels `panel * tiles.panel ..` of pixels `first..end` of image
                                // `batch` (as `run` below), inside `out` and the residual.
                                unsafe { tiles.pointwise_rows(&taps, first, end - first, panel, cout, silu, out, pitch, residual) };
                            } else {
                                run(&taps, first * in_step, in_step, end - first, at(panel, first), panel, scratch);
                            }
                        }
                    }
                    Reading::PhasePlanes => {
                        let image = &planes[batch * cin * channel_len..];
                        let taps: Vec<*const f32> = offsets.iter().map(|&o| image[o..].as_ptr()).collect();
                        for panel in task_panels.clone() {
                            for oy in task_runs.clone() {
                                if rows {
                                    let out = out_ptr.get().wrapping_add(at(panel, oy * ow));
                                    let residual = residual.map(|r| r[at(panel, oy * ow)..].as_ptr());
                                    // SAFETY: `rows` holds; the taps
                                    // are the phase planes' offsets, and `ow` pixels from
                                    // `oy * wp` of each lie inside them (as `run` below reads);
                                    // this piece alone writes channels `panel * tiles.panel ..`
                                    // of output row `oy` of image `batch`, `pitch` apart.
                                    unsafe { tiles.pointwise_rows(&taps, oy * layout.wp, ow, panel, cout, silu, out, pitch, residual) };
                                } else {
                                    run(&taps, oy * layout.wp, 1, ow, at(panel, oy * ow), panel, scratch);
                                }
                            }
                        }
                    }
                    Reading::InPlace { stride, interior } => {
                        let pl = self.spec.pads.1;
                        // Each channel's first pixel; in blocks, its lane of the first pixel's block.
                        let planes: Vec<*const f32> = (0..cin).map(|c| input.channel_start(batch, c)).collect();
                        let mut taps = vec![zeros.as_ptr(); cin * kh * kw];
                        for oy in task_runs.clone() {
                            // Tap (c, ky, kx) of output column `ox` is input column
                            // `ox * stride - pl + kx * dw` of row `oy * sh - pt + ky * dh`: the row's
                            // start plus `kx * dw` here, plus `ox * stride - pl` in the run. Built
                            // without dividing `kk`: the three divisions per tap and row took 8 % of
                            // 64 -> 64 channels from 160x160 (one thread, 2.09-2.15 ms before,
                            // 1.93-2.01 after; 16 -> 32 from 320x320 1.26-1.30 before, 1.18 after).
                            let mut tap = taps.iter_mut();
                            for &plane in &planes {
                                for ky in 0..kh {
                                    let row = (oy * sh + ky * dh).checked_sub(pt).filter(|&y| y < h).map(|y| plane.wrapping_add(y * w * in_step));
                                    for (kx, tap) in tap.by_ref().take(kw).enumerate() {
                                        *tap = row.map_or(zeros.as_ptr(), |row| row.wrapping_add(kx * dw * in_step));
                                    }
                                }
                            }
                            for panel in task_panels.clone() {
                                run(
                                    &taps,
                                    (interior.start * stride - pl) * in_step,
                                    stride * in_step,
                                    interior.len(),
                                    at(panel, oy * ow + interior.start),
                                    panel,
                                    scratch,
                                );
                            }
                        }
                    }
                });
            }
        });
        if let Reading::InPlace { stride, interior } = reading {
            let columns: Vec<usize> = (0..interior.start).chain(interior.end..ow).collect();
            if !columns.is_empty() {
                self.border_columns(tiles, input, output, out_layout, *stride, &columns, residual, out_ptr);
            }
        }
    }

    /// The output columns `columns` of a convolution that reads its input in place
    /// ([`Reading::InPlace`]): their taps reach into the padding, so each column's inputs
    /// are gathered, with zeros for the padding, and computed as one run down the rows.
    #[allow(clippy::too_many_arguments)]
    fn border_columns(
        &self,
        tiles: &PixelTiles,
        input: &ConvInput,
        OutputPlanes { oh, ow, pitch }: OutputPlanes,
        out_layout: ChannelLayout,
        stride: usize,
        columns: &[usize],
        residual: Option<&[f32]>,
        out: SendPtr,
    ) {
        let (n, h, w) = (input.n, input.h, input.w);
        let (cin, cout) = (self.spec.in_channels, self.spec.out_channels);
        let (kh, kw) = self.spec.kernel;
        let (sh, dh, pt) = (self.spec.stride.0, self.spec.dilation.0, self.spec.pads.0);
        let (dw, pl) = (self.spec.dilation.1, self.spec.pads.1);
        let panels = cout.div_ceil(tiles.panel);
        let units = n * columns.len();
        let threads = parallel::threads();
        let (panels_per_block, panel_blocks) = panel_blocks(units, cout, tiles.panel, threads);
        // At least a tile of rows: the rows past the output's are zeros, computed and dropped.
        let rows = oh.max(WIDEST_TILE);
        let silu = self.spec.activation == Activation::Silu;
        // Each column's taps, `rows` values per tap, gathered once for all its blocks of
        // panels (in parallel by tap: a layer has one or two such columns): gathered by each
        // block, they took as long as the blocks' products.
        let k = cin * kh * kw;
        let mut gathered = vec![0.0f32; units * k * rows];
        parallel::for_each_chunk_mut(&mut gathered, rows, |index, values| {
            let (unit, kk) = (index / k, index % k);
            let (batch, ox) = (unit / columns.len(), columns[unit % columns.len()]);
            let (c, ky, kx) = (kk / (kh * kw), kk / kw % kh, kk % kw);
            let (channel, step) = input.channel(batch, c);
            let Some(x) = (ox * stride + kx * dw).checked_sub(pl).filter(|&x| x < w) else { return };
            for (oy, value) in values[..oh].iter_mut().enumerate() {
                if let Some(y) = (oy * sh + ky * dh).checked_sub(pt).filter(|&y| y < h) {
                    *value = channel[(y * w + x) * step];
                }
            }
        });
        parallel::for_each(units * panel_blocks, |task| {
            let (unit, block) = (task / panel_blocks, task % panel_blocks);
            let (batch, ox) = (unit / columns.len(), columns[unit % columns.len()]);
            let taps: Vec<*const f32> = gathered[unit * k * rows..][..k * rows].chunks_exact(rows).map(<[f32]>::as_ptr).collect();
            SCRATCH.with_borrow_mut(|(column, _)| {
                for panel in block * panels_per_block..((block + 1) * panels_per_block).min(panels) {
                    let (tile, kernel) = tiles.tile(rows, 1, tiles.width(panel), false);
                    let run = Run { kernel, tile, taps: &taps, at: 0, stride: 1, len: rows, out_step: 1 };
                    let p = tiles.panel(panel, cout, silu);
                    let channels = p.channels;
                    if column.len() < channels * rows {
                        column.resize(channels * rows, 0.0);
                    }
                    // SAFETY: the CPU has the features of `tiles.isa` (`PixelTiles::new`
                    // checked); the taps are the gathered rows, `rows` floats each; the output is
                    // `column`, `channels` rows of `rows`, this worker's own.
                    unsafe { run.emit(&p, column.as_mut_ptr(), rows, None, false, &mut Vec::new()) };
                    for (c, values) in column.chunks_exact(rows).take(channels).enumerate() {
                        let channel = panel * tiles.panel + c;
                        for (oy, &v) in values[..oh].iter().enumerate() {
                            let index = match out_layout {
                                ChannelLayout::Planes => (batch * cout + channel) * pitch + oy * ow + ox,
                                // The block starts where its first channel's plane would.
                                ChannelLayout::Blocked => (batch * cout + channel - channel % BLOCK) * pitch + (oy * ow + ox) * BLOCK + channel % BLOCK,
                            };
                            let v = v + residual.map_or(0.0, |r| r[index]);
                            // SAFETY: pixel `(oy, ox)` of channel `panel * tiles.panel + c`: this
                            // task's alone (tasks differ in image, column or panels), inside `out`.
                            unsafe { out.get().add(index).write(v) };
                        }
                    }
                }
            });
        });
    }
}

/// Blocks of whole panels of `panel` channels for `tasks` tasks over pixels,
/// `(panels per block, blocks)`, as [`schedule::channel_blocks`] splits channels.
fn panel_blocks(tasks: usize, channels: usize, panel: usize, threads: usize) -> (usize, usize) {
    let (per_block, blocks) = schedule::channel_blocks(tasks, channels, panel, threads);
    (per_block / panel, blocks)
}

/// One panel's weights, biases and activation, for `channels` output channels.
struct Panel {
    weights: *const f32,
    /// Weights per tap: the panel's registers times their lanes.
    tap_floats: usize,
    bias: *const f32,
    silu: bool,
    channels: usize,
    /// Taps per block of a long product ([`TAP_BLOCK_FLOATS`]); `None`: whole products.
    taps_per_block: Option<usize>,
}

/// A run of `len` output pixels whose tap `kk` of pixel `x` is at `taps[kk] + at + x * stride`,
/// computed in tiles of `tile` pixels by `kernel` (made for that stride), its output pixels
/// `out_step` floats apart (1 in planes, 8 in blocks).
struct Run<'a> {
    kernel: TileKernel,
    tile: usize,
    taps: &'a [*const f32],
    at: usize,
    stride: usize,
    len: usize,
    out_step: usize,
}

impl Run<'_> {
    /// Computes the run into `out` (its first pixel in the panel's first channel; channels, or
    /// blocks of them, `ldo` apart), adding the residual (the same layout, when given). When
    /// `compact` (never in blocks), it goes through strips of `scratch` first, copied out row
    /// by row.
    ///
    /// # Safety
    /// The CPU has the features of the kernel's ISA. `taps[kk] + at + x * stride` is a
    /// readable float of the allocation the tap points into, for every tap and `x < len`;
    /// the panel holds `taps.len()` rows of aligned weights and its biases; `out` (and the
    /// residual) hold `panel.channels` rows of `len` floats, `ldo` apart, that no other thread
    /// accesses. `len` is at least `tile`.
    unsafe fn emit(&self, panel: &Panel, out: *mut f32, ldo: usize, residual: Option<*const f32>, compact: bool, scratch: &mut Vec<f32>) {
        let Run { kernel, tile, taps, at, stride, len, out_step } = *self;
        debug_assert!(!compact || out_step == 1);
        let strip = if compact { (COMPACT_STRIP / tile).max(1) * tile } else { len };
        let mut strip_start = 0;
        while strip_start < len {
            let end = (strip_start + strip).min(len);
            // A last strip shorter than a tile reaches back into the one before.
            let start = strip_start.min(end - tile);
            let width = end - start;
            let tiles = width.div_ceil(tile);
            let tile_start = |i: usize| (i * tile).min(width - tile);
            if compact && scratch.len() < panel.channels * width {
                scratch.resize(panel.channels * width, 0.0);
            }
            let (dst, ld, residual_here) = match compact {
                true => (scratch.as_mut_ptr(), width, None),
                // SAFETY: pixel `start` of the run lies inside `out` and the residual.
                false => unsafe { (out.add(start * out_step), ldo, residual.map(|r| r.add(start * out_step))) },
            };
            // Tile `i` over the taps `k0..k1`: its sums start from `sums` unless `k0` is the
            // first tap, and stay there unless `k1` is past the last (then they are finished).
            let run_tile = |i: usize, k0: usize, k1: usize, sums: *mut f32| {
                let x = tile_start(i);
                let (sums_in, sums_out) = match (k0 == 0, k1 == taps.len()) {
                    (true, true) => (std::ptr::null(), std::ptr::null_mut()),
                    (true, false) => (std::ptr::null(), sums),
                    (false, true) => (sums.cast_const(), std::ptr::null_mut()),
                    (false, false) => (sums.cast_const(), sums),
                };
                // SAFETY: the caller's contract, for pixels `start + x + j` (`j < tile`) of the
                // run, which lie in `start..end`; `dst` holds `channels` rows of `width` pixels,
                // `ld` apart (a strip of `scratch`, or the output); the weights of taps `k0..`
                // start `k0` whole taps into the panel's (so they stay aligned); `sums` holds a
                // tile's sums (the tap blocks below) or is never read or written.
                unsafe {
                    let weights = panel.weights.add(k0 * panel.tap_floats);
                    let residual = residual_here.map(|r| (r.add(x * out_step), ldo));
                    let at = at + (start + x) * stride;
                    kernel(&taps[k0..k1], at, weights, panel.bias, panel.silu, dst.add(x * out_step), ld, residual, panel.channels, sums_in, sums_out);
                }
            };
            let block = panel.taps_per_block.filter(|&block| taps.len() > 2 * block && tiles >= 2);
            if let Some(block) = block {
                // A long product: each block of taps (its weights in L1) runs through a group of
                // tiles, whose sums wait in `sums` between blocks.
                let per_tile = tile * panel.tap_floats;
                SUMS.with_borrow_mut(|sums| {
                    if sums.len() < TILES_PER_GROUP * per_tile {
                        sums.resize(TILES_PER_GROUP * per_tile, 0.0);
                    }
                    for group in (0..tiles).step_by(TILES_PER_GROUP) {
                        for k0 in (0..taps.len()).step_by(block) {
                            let k1 = (k0 + block).min(taps.len());
                            for i in group..(group + TILES_PER_GROUP).min(tiles) {
                                run_tile(i, k0, k1, sums[(i - group) * per_tile..].as_mut_ptr());
                            }
                        }
                    }
                });
            } else {
                (0..tiles).for_each(|i| run_tile(i, 0, taps.len(), std::ptr::null_mut()));
            }
            if compact {
                for (c, row) in scratch.chunks_exact(width).take(panel.channels).enumerate() {
                    // SAFETY: row `c` of the panel's output, pixels `start..end` of the run.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.add(c * ldo + start), width) };
                    dst.copy_from_slice(row);
                    if let Some(r) = residual {
                        // SAFETY: the residual has the output's layout.
                        add_assign(dst, unsafe { std::slice::from_raw_parts(r.add(c * ldo + start), width) });
                    }
                }
            }
            strip_start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::activation::Activation;
    use super::super::tests::check;
    use super::*;

    #[test]
    fn tiles_fit_their_runs_and_compute_the_fewest_pixels() {
        for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.supported()) {
            for cout in [8, 16, 40, 80] {
                let spec = ConvSpec::square(4, cout, 1, 3, 2, 1, Activation::Silu);
                let tiles = PixelTiles::new(isa, &spec, &vec![0.5; cout * 36], &vec![0.0; cout]);
                for (run, stride) in (WIDEST_TILE..200).flat_map(|run| [(run, 1), (run, 2)]) {
                    for panel in 0..tiles.panels {
                        let (pixels, _) = tiles.tile(run, stride, tiles.width(panel), false);
                        assert!(pixels <= run, "{isa:?} {cout} channels: a tile of {pixels} in a run of {run}");
                    }
                }
            }
            // Whole wide panels, and one register for what is left when it fits in one.
            let widths = |cout: usize| {
                let tiles = PixelTiles::new(isa, &ConvSpec::square(4, cout, 1, 1, 1, 0, Activation::Silu), &vec![0.5; cout * 4], &vec![0.0; cout]);
                (0..tiles.panels).map(|p| tiles.width(p)).collect::<Vec<_>>()
            };
            match isa {
                Isa::Avx512 => {
                    assert_eq!(widths(80), [32, 32, 16]);
                    assert_eq!(widths(104), [32, 32, 32, 16]);
                    assert_eq!(widths(120), [32, 32, 32, 32]);
                    assert_eq!(widths(12), [16]);
                }
                Isa::Avx2 => {
                    assert_eq!(widths(40), [16, 16, 8]);
                    assert_eq!(widths(44), [16, 16, 16]);
                }
            }
            let wide = PixelTiles::new(isa, &ConvSpec::square(4, 64, 1, 3, 2, 1, Activation::Silu), &[0.5; 64 * 36], &[0.0; 64]);
            // YOLO's widths (multiples of 10) take the narrower wide tile with no pixel twice.
            let (pixels, _) = wide.tile(80, 2, wide.width(0), false);
            assert_eq!(80 % pixels, 0, "{isa:?}: tiles of {pixels} in rows of 80");
        }
    }

    #[test]
    fn small_planes_split_into_two_units_per_thread() {
        // 20x20 on two threads: tiles of 10 fit units of 100; 40x40 keeps units of 64.
        assert_eq!(pointwise_stretch(400, 2), 100);
        assert_eq!(pointwise_stretch(400, 1), 200);
        assert_eq!(pointwise_stretch(1600, 2), POINTWISE_UNIT);
        // Never shorter than two tiles, nor longer than the plane.
        assert_eq!(pointwise_stretch(100, 2), 2 * WIDEST_TILE);
        assert_eq!(pointwise_stretch(20, 2), 20);
    }

    #[test]
    fn convolutions_in_pixel_tiles_match_the_definition() {
        // Rows that end inside a tile (29 pixels in tiles of 10, 23 in tiles of 12, 20 in 16),
        // 16 output channels or fewer, channels past the last whole panel, stride 1 below
        // Winograd's channels (4) and size (17x19), batch 2, a 5x5 kernel, no padding.
        check(16, 32, 1, 3, 2, 1, 1, 40, 40);
        check(4, 40, 1, 3, 1, 1, 1, 9, 23);
        check(16, 64, 1, 3, 2, 1, 1, 56, 58);
        // A last panel of one register (80 = 32 + 32 + 16 with AVX-512, 16 + 16 + 16 + 16 + 16
        // with AVX2), in rows and in stretches of a plane.
        check(8, 80, 1, 3, 2, 1, 1, 33, 47);
        check(20, 80, 1, 1, 1, 0, 2, 7, 9);
        check(3, 16, 1, 3, 2, 1, 2, 34, 36);
        check(8, 40, 1, 3, 2, 1, 1, 33, 47);
        check(8, 16, 1, 3, 1, 1, 2, 17, 19);
        check(4, 40, 1, 5, 1, 2, 1, 18, 21);
        check(6, 8, 1, 3, 2, 0, 1, 40, 35);
        // A small output that Winograd leaves to pixel tiles.
        check(32, 24, 1, 3, 1, 1, 2, 18, 18);
        // Pointwise: stretches of the plane that end inside a tile, one and a half panels,
        // batch 2; a plane smaller than a tile stays on the channel-major path.
        check(20, 48, 1, 1, 1, 0, 2, 7, 9);
        check(8, 16, 1, 1, 1, 0, 1, 23, 31);
        check(8, 40, 1, 1, 1, 0, 1, 3, 3);
        // Channel planes of 1024 pixels (a whole number of pages): through the compact strips.
        check(8, 40, 1, 1, 1, 0, 1, 32, 32);
        check(4, 24, 1, 3, 2, 1, 2, 64, 64);
        // AVX2's products in blocks of taps (`TAP_BLOCK_FLOATS`), the last block partial: through
        // the compact strips, with a last panel of one register (40 = 16 + 16 + 8 channels), and
        // pointwise in stretches of a plane, batch 2; AVX-512 runs the same products whole.
        check(32, 40, 1, 3, 2, 1, 1, 64, 64);
        check(288, 48, 1, 1, 1, 0, 2, 21, 21);
        check(36, 24, 1, 3, 2, 1, 1, 30, 50);
        // A long pointwise product on a small plane: with AVX2 through the channel-major
        // product instead.
        assert!(avx2_gemm_takes(256, 400) && !avx2_gemm_takes(128, 400) && !avx2_gemm_takes(256, 1600));
        check(256, 24, 1, 1, 1, 0, 1, 20, 20);
        // A long stride-2 product on a large output: with AVX2 through the channel-major
        // product over the phase planes.
        let strided = |cin: usize| ConvSpec::square(cin, 16, 1, 3, 2, 1, Activation::Silu);
        assert!(avx2_direct_takes(&strided(128), 1600) && !avx2_direct_takes(&strided(64), 1600) && !avx2_direct_takes(&strided(128), 400));
        check(128, 24, 1, 3, 2, 1, 1, 80, 81);
    }

    #[test]
    fn pointwise_convolutions_with_the_pixels_in_the_lanes_match_the_definition() {
        // Planes of 1600 pixels and more, at most 256 input channels (`rows_apply`): a 41x41
        // plane (its last tile 17 pixels wide), a wide panel and a narrow one (44 = 32 + 12
        // channels: blocks of 12, 12 and 8, then 8 and 4), batch 2; 20 channels in one wide
        // panel (blocks of 12 and 8); 96 and 256 input channels.
        assert!(rows_apply(Isa::Avx512, 256, 1600) && !rows_apply(Isa::Avx512, 257, 1600) && !rows_apply(Isa::Avx512, 64, 400));
        assert!(rows_apply(Isa::Avx2, 48, 160 * 160) && !rows_apply(Isa::Avx2, 48, 80 * 80));
        // With AVX2, from 160x160 only: a 161x161 plane (its last tile one pixel), panels of 16
        // and 8 channels (24: blocks of 6, 6 and 4, then 4 and 4).
        check(20, 24, 1, 1, 1, 0, 1, 161, 161);
        check(24, 44, 1, 1, 1, 0, 2, 41, 41);
        check(96, 20, 1, 1, 1, 0, 1, 40, 40);
        check(256, 44, 1, 1, 1, 0, 1, 40, 41);
        check(5, 16, 1, 1, 1, 0, 1, 40, 41);
    }

    #[test]
    fn large_inputs_read_in_place_match_the_definition() {
        // Over `IN_PLACE_MIN_FLOATS`: stride 2 with a border column on each side (an odd
        // width), stride 1 with fewer input channels than Winograd takes (7 of 8) and a last
        // panel of one register.
        check(4, 24, 1, 3, 2, 1, 1, 515, 517);
        check(7, 40, 1, 3, 1, 1, 1, 397, 401);
    }
}
