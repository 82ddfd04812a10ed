//! 3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): a 4x4 block of output pixels
//! comes from the 6x6 block of input around it through 36 multiplies per input and output
//! channel, where the direct product needs 144.
//!
//! In matrix form, output tile `Y = Aᵀ [U ⊙ V] A` with `U = G g Gᵀ` (the 3x3 kernel `g`,
//! transformed once at load time) and `V = Bᵀ d B` (the 6x6 input tile `d`). Summed over input
//! channels, each of the 36 positions of `U ⊙ V` is a matrix product
//! `M[p] = U[p] (out x in) * V[p] (in x tiles)`, which the packed microkernel runs at the same
//! speed as any other product: the weights of each position are packed once, and the input
//! transform writes `V[p]` straight in the panel layout the microkernel reads.
//!
//! The input is first split into the 16 phase planes of stride 4 (the same planes
//! [`run_direct`](Conv2d::run_direct) uses for strided convolutions): tap `(i, j)` of tile
//! `(ty, tx)` is then at place `(ty + i/4, tx + j/4)` of phase `(i % 4, j % 4)`, so the taps of
//! consecutive tiles are consecutive floats, and a vector of tiles is one load. Tiles are
//! numbered along the phase planes' rows, which are one tile longer than the output's: the
//! extra tile of each row is computed and dropped.
//!
//! Work is split into blocks of one panel of tiles (`nr`, 32 with AVX-512), and for small
//! outputs into blocks of output channels too; each block transforms its input, runs the 36
//! products and transforms the result into output pixels, applying the bias, SiLU and the
//! residual on the way. Blocks of output channels share their tiles' transformed input, which
//! a loop of its own transforms first, by ranges of input channels: when each block
//! transformed it, a 20x20 output (one panel of tiles, four blocks of channels on 2 threads)
//! transformed its input four times. YOLO11n and YOLOv12n, 2 threads, interleaved rounds
//! against that, three sittings: the 3x3 layers at 20x20 took 0.83-1.07 of their time, most
//! below 0.97 (256 -> 64 channels 0.65-0.92), 0.82-0.98 on one thread (two blocks of channels
//! there). The output transform leaves each row of a tile's pixels interleaved
//! in registers ([`Lanes::interleave4`]): a vector holds one output row of a group of 2 (4)
//! tiles, stored in place where the group lies whole inside the output, through a buffer and
//! clipped at its edges. (Through the buffer for every tile, then copied out by runs, the 3x3
//! stride-1 layers took 1.005-1.007 of the time, each 1.03-1.10 on the small outputs: YOLO11n
//! and YOLOv12n, 2 threads, 30 interleaved rounds.)
//!
//! With AVX2 the output may go to blocks of 8 channels instead
//! ([`ChannelLayout::Blocked`]): the finished pixels of 8 channels of 8 tiles, transposed so
//! that each register holds one pixel's 8 channels, stored whole.
//!
//! Measured with `cargo bench --bench conv` (this AVX-512 machine, 1 thread): 64 -> 64
//! channels at 80x80 in 0.93 ms against 2.27 ms direct; in YOLOv12n the 3x3 stride-1 layers
//! went from 5.9 to 3.4 ms.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use crate::detect::kernels::parallel;

use super::super::isa::Isa;
use super::super::pack::{PackedA, PackedB};
use super::super::simd::Lanes;
use super::super::{SendPtr, tiling};
use super::direct::{PhaseLayout, phase_planes};
use super::winograd_lanes::{self, LaneWeights};
use super::{BLOCK, ChannelLayout, Conv2d, ConvInput, ConvSpec, OutputPlanes, add_assign, schedule};

/// Output pixels along each side of a tile.
const TILE: usize = 4;
/// Input pixels along each side of a tile: `TILE + 3 - 1`.
const SPAN: usize = 6;
/// Positions of a transformed tile, one matrix product each.
const POSITIONS: usize = SPAN * SPAN;
/// Floats per cache line (and per AVX-512 register).
const LINE: usize = 16;
/// Output pixels below which a convolution that has pixel tiles
/// ([`pixel_tiles`](super::pixel_tiles)) runs in them instead: on small outputs the transforms
/// cost more than the multiplies they save. At 20x20 (25 tiles of 4x4 per channel) Winograd
/// now wins: in YOLOv12n, calls alternating between the two in one process, the five 64 -> 64
/// layers at 20x20 took 0.85-0.93 of their time in pixel tiles on 2 threads and 0.83-0.88 on
/// one, 256 -> 64 1.03 and 0.90; all 3x3 layers at 20x20, YOLOv12n 0.94 (2 threads) and 0.87
/// (one thread), YOLO11n 0.93 and 0.88, YOLO11n at batch 4 level. (An earlier kernel lost
/// there: 0.49-0.51 ms against 0.43-0.44 for the 64 -> 64 layers.)
pub(super) const MIN_PIXELS: usize = 20 * 20;

/// Fewer input (output) channels than this leave the products too small to pay for the
/// transforms: the direct path runs those. Measured in YOLO11n (2 threads, per-step times of
/// interleaved runs), 8 -> 16 channels at 160x160 took 0.213-0.214 ms by Winograd against
/// 0.227-0.235 in pixel tiles.
const MIN_IN_CHANNELS: usize = 8;
const MIN_OUT_CHANNELS: usize = 8;

/// `G`, which transforms a 3-tap kernel into 6 (interpolation points 0, 1, -1, 2, -2, ∞).
const G: [[f64; 3]; SPAN] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A convolution's weights transformed for F(4x4, 3x3): for each of the 36 positions, the
/// `out_channels x in_channels` matrix `U[p]`, packed for the microkernel.
#[derive(Debug, Clone)]
pub(super) struct Winograd {
    positions: Vec<PackedA>,
    /// With AVX2, the same matrices for [`winograd_lanes`](super::winograd_lanes), which takes
    /// the layers whose input and output are in blocks; `None` unless both channel counts are
    /// whole blocks.
    lanes: Option<LaneWeights>,
    /// With AVX-512, the same matrices packed for AVX2's panels of 16 tiles, made at the first
    /// call whose output they suit ([`Conv2d::winograd_for`]).
    narrow: OnceLock<Box<Winograd>>,
}

impl Winograd {
    /// Whether a convolution of `spec` runs this way: a 3x3 kernel, stride and dilation 1, one
    /// group, and enough channels.
    /// `STREAMDET_WINOGRAD=off` keeps every convolution on the direct path, to compare the two
    /// on one machine.
    pub(super) fn applies(spec: &ConvSpec) -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENABLED.get_or_init(|| std::env::var("STREAMDET_WINOGRAD").map_or(true, |v| v != "off"))
            && spec.kernel == (3, 3)
            && spec.stride == (1, 1)
            && spec.dilation == (1, 1)
            && spec.groups == 1
            && spec.in_channels >= MIN_IN_CHANNELS
            && spec.out_channels >= MIN_OUT_CHANNELS
    }

    /// Transforms `weights` (`[out][in][3][3]`) and packs them for `isa`, which is supported.
    /// The transform runs in `f64`, so the packed values are the exact ones rounded once.
    pub(super) fn new(isa: Isa, spec: &ConvSpec, weights: &[f32]) -> Self {
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        assert_eq!(weights.len(), cout * cin * 9, "3x3 weights");
        let mut transformed = vec![0f32; POSITIONS * cout * cin];
        for (index, g) in weights.chunks_exact(9).enumerate() {
            // `G g`, then `(G g) Gᵀ`.
            let gg: [[f64; 3]; SPAN] = std::array::from_fn(|u| std::array::from_fn(|b| (0..3).map(|a| G[u][a] * g[a * 3 + b] as f64).sum()));
            for u in 0..SPAN {
                for v in 0..SPAN {
                    let value: f64 = (0..3).map(|b| gg[u][b] * G[v][b]).sum();
                    transformed[(u * SPAN + v) * cout * cin + index] = value as f32;
                }
            }
        }
        let positions = transformed.chunks_exact(cout * cin).map(|u| PackedA::new(isa, u, cout, cin)).collect();
        let lanes = if isa == Isa::Avx2 { LaneWeights::new(&transformed, cin, cout) } else { None };
        Winograd { positions, lanes, narrow: OnceLock::new() }
    }

    pub(super) fn isa(&self) -> Isa {
        self.positions[0].isa()
    }
}

thread_local! {
    /// Each rayon worker's transformed input (`V`, packed panels) and products (`M`), reused
    /// across blocks and calls.
    static SCRATCH: std::cell::RefCell<(PackedB, Vec<f32>)> = const { std::cell::RefCell::new((PackedB::new(), Vec::new())) };
    /// The calling thread's transformed input of a call's blocks of tiles, when blocks of
    /// output channels share it.
    static SHARED_INPUT: std::cell::RefCell<PackedB> = const { std::cell::RefCell::new(PackedB::new()) };
}

/// The greatest common divisor of `a` and `b`.
const fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Blocks of one panel of tiles in each image's output.
fn tile_blocks(oh: usize, ow: usize, isa: Isa) -> usize {
    (oh.div_ceil(TILE) * (ow.div_ceil(TILE) + 1)).div_ceil(isa.nr())
}

impl Conv2d {
    /// Whether this call runs by F(4x4, 3x3): the weights were transformed, and blocks of
    /// tiles times blocks of output channels give every thread one.
    pub(super) fn winograd_for(&self, n: usize, oh: usize, ow: usize) -> Option<&Winograd> {
        let winograd = self.winograd.as_ref()?;
        let winograd = self.narrow_winograd(winograd, n, oh, ow).unwrap_or(winograd);
        let tasks = n * tile_blocks(oh, ow, winograd.isa()) * self.winograd_channel_blocks(n, oh, ow, winograd.isa(), false).1;
        (tasks >= parallel::threads()).then_some(winograd)
    }

    /// `winograd` packed for AVX2, when it is packed for AVX-512 and the output is so small
    /// that AVX-512's panels of 32 tiles leave a thread without a block of tiles where AVX2's
    /// panels of 16 give each one. The threads would otherwise share blocks of output
    /// channels, and with them a transformed input made in a loop of its own first; the two
    /// kernels run at one rate on a CPU that splits a 512-bit operation in two (AMD's Zen 4).
    /// Measured there (`scripts/ab-steps.py`, 2 threads, 6-8 rounds): the 64 -> 64 layers at
    /// 20x20 took 0.84-0.97 of their time, 256 -> 64 0.86-0.91 (YOLOv12n and YOLO11n).
    fn narrow_winograd<'a>(&'a self, winograd: &'a Winograd, n: usize, oh: usize, ow: usize) -> Option<&'a Winograd> {
        let threads = parallel::threads();
        let narrow_fills = n * tile_blocks(oh, ow, Isa::Avx512) < threads && n * tile_blocks(oh, ow, Isa::Avx2) >= threads;
        (winograd.isa() == Isa::Avx512 && narrow_fills && Isa::Avx2.supported()).then(|| {
            &**winograd.narrow.get_or_init(|| {
                // Tensors stay in planes with AVX-512, so the lanes' weights would go unused.
                let narrow = Winograd::new(Isa::Avx2, &self.spec, &self.weights);
                Box::new(Winograd { lanes: None, ..narrow })
            })
        })
    }

    /// Whether this call runs by F(4x4, 3x3): as [`winograd_for`](Self::winograd_for), unless
    /// the output is smaller than [`MIN_PIXELS`] and pixel tiles can take it.
    pub(super) fn runs_winograd(&self, n: usize, oh: usize, ow: usize) -> Option<&Winograd> {
        self.winograd_for(n, oh, ow).filter(|_| oh * ow >= MIN_PIXELS || self.pixel_tiles_for(oh, ow).is_none())
    }

    /// Blocks of output channels, `(channels per block, blocks)`: one when every thread has a
    /// block of tiles, more for small outputs. Blocks of channels share their tiles' transformed
    /// input, made in a loop of its own first, and each reads it again: at 20x20 (two blocks of
    /// tiles on 2 threads), one block of channels took 0.81-0.89 of the time of two in
    /// YOLO11n and YOLOv12n (64 -> 64 channels; 256 -> 64 0.95), and at 40x40 and 80x80 two
    /// blocks of channels lost (1.03-1.15) though they share out the odd block of tiles.
    /// With `blocked_out`, blocks start on whole blocks of 8 channels too.
    fn winograd_channel_blocks(&self, n: usize, oh: usize, ow: usize, isa: Isa, blocked_out: bool) -> (usize, usize) {
        let tasks = n * tile_blocks(oh, ow, isa);
        // Blocks of channels are whole panels of the product (`mr` rows), and whole blocks of
        // 8 channels where the output is in blocks.
        let unit = if blocked_out { isa.mr() * BLOCK / gcd(isa.mr(), BLOCK) } else { isa.mr() };
        match tasks >= parallel::threads() {
            true => (self.spec.out_channels.div_ceil(unit) * unit, 1),
            false => schedule::channel_blocks(tasks, self.spec.out_channels, unit, parallel::threads()),
        }
    }

    /// The convolution by F(4x4, 3x3) (see the module's notes), into `out` (`planes`, its
    /// channels laid out as `out_layout` says), adding `residual` (laid out as the output) last.
    /// An output in [`ChannelLayout::Blocked`] is for AVX2, with planes `oh * ow` apart.
    pub(super) fn run_winograd(
        &self,
        winograd: &Winograd,
        input: &ConvInput,
        planes: OutputPlanes,
        out_layout: ChannelLayout,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (n, h, w) = (input.n, input.h, input.w);
        let OutputPlanes { oh, ow, pitch } = planes;
        let (cin, cout) = (self.spec.in_channels, self.spec.out_channels);
        let isa = winograd.isa();
        let blocked_out = out_layout == ChannelLayout::Blocked;
        if let Some(lanes) = winograd.lanes.as_ref().filter(|_| blocked_out && input.layout() == ChannelLayout::Blocked && winograd_lanes::enabled()) {
            return self.run_winograd_lanes(lanes, input, planes, residual, out);
        }
        assert!(
            !blocked_out || (isa == Isa::Avx2 && cout.is_multiple_of(BLOCK) && pitch == oh * ow),
            "a blocked output from Winograd's AVX2 tiles, in packed planes"
        );
        let nr = isa.nr();
        let (th, tw) = (oh.div_ceil(TILE), ow.div_ceil(TILE));
        // Tile `ty` reads padded rows `4ty..4ty + 6`: one place more than the tiles in each
        // phase plane. Every input pixel falls inside them, as `PhaseLayout` requires:
        // `h + pt = oh + 2 - pb <= 4 * th + 2 < 4 * hp`, and the same for columns.
        let (hp, wq) = (th + 1, tw + 1);
        let plane = hp * wq;
        let layout = PhaseLayout { h, w, pt: self.spec.pads.0, pl: self.spec.pads.1, sh: TILE, sw: TILE, plane, hp, wp: wq };
        let planes = phase_planes(input, &layout, Some(isa));
        let channel_len = TILE * TILE * plane;
        // Tap (i, j) of tile t = ty * wq + tx, from the start of its channel's planes.
        let taps: [usize; POSITIONS] = std::array::from_fn(|p| {
            let (i, j) = (p / SPAN, p % SPAN);
            ((i % TILE) * TILE + j % TILE) * plane + (i / TILE) * wq + j / TILE
        });
        let tiles = th * wq;
        let blocks = tiles.div_ceil(nr);
        let (m_block, m_blocks) = self.winograd_channel_blocks(n, oh, ow, isa, blocked_out);
        let silu = self.spec.activation == super::super::activation::Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        // The 36 matrices of `V` (and of `M`) lie one cache line more than their size
        // apart: a power of two apart, the 36 stores (loads) of one tile's transform would
        // all map to the same L1 cache sets and evict each other.
        let (v_stride, m_stride) = (cin * nr + LINE, cout * nr + LINE);
        let block_input = |batch: usize, block: usize, channels: std::ops::Range<usize>| {
            let image = &planes[batch * cin * channel_len..];
            // The last tap of the block's last tile is at `cin * channel_len + nr - 1` at most
            // (see `taps`: the last place of the last phase plane is `16 * plane - 1`, and the
            // block's tiles run past `tiles` by up to `nr - 1`): inside the next image's planes
            // or the slack after the last.
            assert!(image.len() >= cin * channel_len + nr && channels.end <= cin, "the phase planes' slack covers a block");
            BlockInput { tiles: image[block * nr + channels.start * channel_len..].as_ptr(), channel_len, channels: channels.len(), taps: &taps, nr }
        };
        SHARED_INPUT.with_borrow_mut(|shared| {
            // With blocks of output channels, the blocks of one block of tiles share its
            // transformed input: transformed once before them, by ranges of input channels in
            // parallel, rather than by each.
            let per_block = POSITIONS * v_stride;
            let shared = if m_blocks > 1 {
                // No part may be empty: 48 channels in 32 parts of 2 would leave parts
                // starting past the last channel (16 threads).
                let per_part = cin.div_ceil((2 * parallel::threads()).min(cin));
                let parts = cin.div_ceil(per_part);
                let matrices = shared.floats_mut(n * blocks * per_block);
                let buffer = SendPtr(matrices.as_mut_ptr());
                parallel::for_each(n * blocks * parts, |task| {
                    let (block, channels) = (task / parts, task % parts * per_part..((task % parts + 1) * per_part).min(cin));
                    // SAFETY: `isa` is supported; every load is inside the phase planes
                    // (`block_input` asserts it); this task alone writes rows `channels` of the
                    // `POSITIONS` matrices (`cin x nr`, `v_stride` apart) of block `block`, inside
                    // `shared` (`n * blocks` such blocks).
                    unsafe {
                        transform_input(
                            isa,
                            &block_input(block / blocks, block % blocks, channels.clone()),
                            buffer.get().add(block * per_block + channels.start * nr),
                            v_stride,
                        )
                    };
                });
                Some(&*matrices)
            } else {
                None
            };
            parallel::for_each(n * blocks * m_blocks, |task| {
                let (batch, block) = (task / m_blocks / blocks, task / m_blocks % blocks);
                let channels = task % m_blocks * m_block..((task % m_blocks + 1) * m_block).min(cout);
                let first_tile = block * nr;
                SCRATCH.with_borrow_mut(|(transformed, products)| {
                    if products.len() < POSITIONS * m_stride {
                        products.resize(POSITIONS * m_stride, 0.0);
                    }
                    let transformed = match shared {
                        // Block `batch * blocks + block` of the shared matrices, written before this
                        // loop began.
                        Some(shared) => shared[(batch * blocks + block) * per_block..].as_ptr(),
                        None => {
                            let transformed = transformed.floats_mut(POSITIONS * v_stride);
                            // SAFETY: `isa` is supported (`winograd` was packed for it); every load
                            // is inside the phase planes (`block_input` asserts it) and every store
                            // inside `transformed` (`POSITIONS` matrices of `cin x nr`, `v_stride`
                            // apart).
                            unsafe { transform_input(isa, &block_input(batch, block, 0..cin), transformed.as_mut_ptr(), v_stride) };
                            transformed.as_ptr()
                        }
                    };
                    for (p, u) in winograd.positions.iter().enumerate() {
                        // SAFETY: `V[p]` is one packed panel (`cin x nr`) at a multiple of 16 floats
                        // from the start of an aligned buffer; `M[p]` is `cout x nr`.
                        unsafe {
                            tiling::gemm_panels(
                                u,
                                channels.clone(),
                                transformed.add(p * v_stride),
                                nr,
                                products.as_mut_ptr().add(p * m_stride + channels.start * nr),
                                nr,
                                None,
                            )
                        };
                    }
                    #[cfg(target_arch = "x86_64")]
                    if blocked_out {
                        // Where each tile's pixels lie inside the output: the first one's 8 floats
                        // from the block of the channels' first, and the tile clipped.
                        let mut places = [TilePlace::default(); super::super::isa::MAX_NR];
                        for (lane, place) in places[..nr].iter_mut().enumerate() {
                            let tile = first_tile + lane;
                            let (ty, tx) = (tile / wq, tile % wq);
                            if tile < tiles && tx < tw {
                                let (y, x) = (TILE * ty, TILE * tx);
                                *place = TilePlace { at: (y * ow + x) * BLOCK, rows: TILE.min(oh - y), columns: TILE.min(ow - x) };
                            }
                        }
                        for first in channels.step_by(BLOCK) {
                            // The 8 channels' blocks start where their first plane would.
                            let block = (batch * cout + first) * pitch;
                            // SAFETY: the CPU has AVX2 and FMA (asserted above); `products` holds
                            // `POSITIONS` matrices of `cout x nr`, `m_stride` apart; `bias` holds
                            // the 8 channels; each place lies inside the block of image `batch`
                            // (a pixel inside the output), which only this task's tiles write.
                            unsafe {
                                transform_output_blocked(
                                    products.as_ptr().add(first * nr),
                                    m_stride,
                                    nr,
                                    &self.bias[first..first + BLOCK],
                                    silu,
                                    &places[..nr],
                                    ow,
                                    out_ptr.get().add(block),
                                    residual.map(|r| r[block..].as_ptr()),
                                )
                            };
                        }
                        return;
                    }
                    // The block's tiles in groups of one vector's pixels of a row: a group that
                    // lies whole inside the output, on one row of tiles, is stored in place, at
                    // `in_place[group]` from its channel's first pixel; the others go through
                    // `pixels_of_tiles`, clipped.
                    let per_group = isa.lanes() / TILE;
                    let groups = nr / per_group;
                    let mut in_place = [THROUGH_BUFFER; super::super::isa::MAX_NR];
                    for (group, place) in in_place[..groups].iter_mut().enumerate() {
                        let tile = first_tile + group * per_group;
                        let (ty, tx) = (tile / wq, tile % wq);
                        // Whole inside the output: then also inside its row of tiles (`tw <
                        // wq`) and among the image's tiles.
                        if TILE * (tx + per_group) <= ow && TILE * (ty + 1) <= oh {
                            *place = TILE * ty * ow + TILE * tx;
                        }
                    }
                    let mut pixels_of_tiles = [0f32; TILE * TILE * super::super::isa::MAX_NR];
                    for co in channels {
                        let channel_first = (batch * cout + co) * pitch;
                        let destination = TileDestination {
                            // SAFETY: channel `co` of image `batch` starts inside the output.
                            out: unsafe { out_ptr.get().add(channel_first) },
                            residual: residual.map(|residual| residual[channel_first..][..oh * ow].as_ptr()),
                            row: ow,
                            in_place: &in_place[..groups],
                            buffer: pixels_of_tiles.as_mut_ptr(),
                        };
                        // SAFETY: `isa` is supported; `products` holds `POSITIONS` matrices of
                        // `cout x nr`, `m_stride` apart, and `pixels_of_tiles` `TILE * TILE * nr`;
                        // a group stored in place lies whole inside the output (and residual)
                        // plane of channel `co`, where only this block's tiles write.
                        unsafe { transform_output(isa, products.as_ptr().add(co * nr), m_stride, nr, self.bias[co], silu, &destination) };
                        // The other groups' tiles, without the rows' extra tiles, clipped to the
                        // output.
                        for group in (0..groups).filter(|&group| in_place[group] == THROUGH_BUFFER) {
                            for lane in group * per_group..((group + 1) * per_group).min(tiles - first_tile) {
                                let (ty, tx) = ((first_tile + lane) / wq, (first_tile + lane) % wq);
                                if tx >= tw {
                                    continue;
                                }
                                let columns = TILE.min(ow - TILE * tx);
                                for a in 0..TILE.min(oh - TILE * ty) {
                                    let first = channel_first + (TILE * ty + a) * ow + TILE * tx;
                                    let source = &pixels_of_tiles[a * TILE * nr + TILE * lane..][..columns];
                                    // SAFETY: `columns` pixels of row 4ty + a of channel `co` of
                                    // image `batch` from column 4tx, inside the output; only this
                                    // block's tiles write them.
                                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(first), columns) };
                                    dst.copy_from_slice(source);
                                    if let Some(residual) = residual {
                                        add_assign(dst, &residual[first..][..columns]);
                                    }
                                }
                            }
                        }
                    }
                });
            });
        });
    }
}

/// `Bᵀ d` for one column (or row) of six.
#[inline(always)]
unsafe fn input_rows<V: Lanes>(d: [V; SPAN]) -> [V; SPAN] {
    // SAFETY: the caller runs on a CPU with `V`'s features.
    unsafe {
        let (four, five, two) = (V::splat(4.0), V::splat(-5.0), V::splat(2.0));
        let neg_four = V::splat(-4.0);
        [
            d[0].mul_add(four, d[2].mul_add(five, d[4])),
            d[1].add(d[2]).mul_add(neg_four, d[3].add(d[4])),
            d[1].sub(d[2]).mul_add(four, d[4].sub(d[3])),
            d[3].sub(d[1]).mul_add(two, d[4].sub(d[2])),
            d[1].sub(d[3]).mul_add(two, d[4].sub(d[2])),
            d[1].mul_add(four, d[3].mul_add(five, d[5])),
        ]
    }
}

/// `Aᵀ m` for one column (or row) of six.
#[inline(always)]
unsafe fn output_rows<V: Lanes>(m: [V; SPAN]) -> [V; TILE] {
    // SAFETY: the caller runs on a CPU with `V`'s features.
    unsafe {
        let (sum12, diff12, sum34, diff34) = (m[1].add(m[2]), m[1].sub(m[2]), m[3].add(m[4]), m[3].sub(m[4]));
        [
            m[0].add(sum12).add(sum34),
            diff34.mul_add(V::splat(2.0), diff12),
            sum34.mul_add(V::splat(4.0), sum12),
            diff34.mul_add(V::splat(8.0), diff12).add(m[5]),
        ]
    }
}

/// Where a block's input tiles lie: tap `p` of tile `t` of channel `c` is at
/// `tiles + c * channel_len + taps[p] + t`, for `c < channels` and the block's `nr` tiles
/// (`tiles` is tile 0 of channel 0's phase planes, offset by the block's first tile).
struct BlockInput<'a> {
    tiles: *const f32,
    channel_len: usize,
    channels: usize,
    taps: &'a [usize; POSITIONS],
    nr: usize,
}

/// `V[p][c][t] = (Bᵀ d B)[p]` for the block's tiles `t` and every channel `c`; matrix `V[p]`
/// starts at `v + p * v_stride`.
///
/// # Safety
/// The CPU has `V`'s features; every tap of `input` is readable; `v` is writable for
/// `POSITIONS` matrices of `channels x nr` floats, `v_stride` apart.
#[inline(always)]
unsafe fn transform_input_with<V: Lanes>(input: &BlockInput, v: *mut f32, v_stride: usize) {
    let &BlockInput { tiles, channel_len, channels, taps, nr } = input;
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        for c in 0..channels {
            let base = tiles.add(c * channel_len);
            for lane in (0..nr).step_by(V::LEN) {
                // Rows first: `Bᵀ d` column by column...
                let mut rows = [[V::splat(0.0); SPAN]; SPAN];
                for j in 0..SPAN {
                    let mut column = [V::splat(0.0); SPAN];
                    for (i, value) in column.iter_mut().enumerate() {
                        *value = V::load(base.add(taps[i * SPAN + j] + lane));
                    }
                    for (row, value) in rows.iter_mut().zip(input_rows(column)) {
                        row[j] = value;
                    }
                }
                // ... then `(Bᵀ d) B` row by row.
                for (u, row) in rows.into_iter().enumerate() {
                    for (x, value) in input_rows(row).into_iter().enumerate() {
                        value.store(v.add((u * SPAN + x) * v_stride + c * nr + lane));
                    }
                }
            }
        }
    }
}

/// One output channel of the `nr` tiles of `M`, whose 36 rows of `nr` are `m_stride` apart
/// from `m`: `Aᵀ m A` plus `bias`, then SiLU when asked, stored as `destination` says.
///
/// # Safety
/// The CPU has `V`'s features; `m + p * m_stride` holds `nr` readable floats for every
/// position `p`; `destination.buffer` holds `TILE * TILE * nr` writable floats;
/// `destination.in_place` has `nr / (V::LEN / TILE)` groups, and each group stored in place
/// has its `TILE` rows of `V::LEN` floats writable (and readable in the residual).
#[inline(always)]
unsafe fn transform_output_with<V: Lanes>(m: *const f32, m_stride: usize, nr: usize, bias: f32, silu: bool, destination: &TileDestination) {
    let &TileDestination { out, residual, row, in_place, buffer } = destination;
    let per_group = V::LEN / TILE;
    assert_eq!(in_place.len(), nr / per_group, "a place for every group of tiles");
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        for lane in (0..nr).step_by(V::LEN) {
            let finished = finished_pixels::<V>(m.add(lane), m_stride, bias, silu);
            for a in 0..TILE {
                let mut pixels = [V::splat(0.0); TILE];
                pixels.copy_from_slice(&finished[a * TILE..][..TILE]);
                // Run `r` holds the row's pixels of tiles `lane + r * per_group ..` (a group).
                for (r, run) in V::interleave4(pixels).into_iter().enumerate() {
                    match in_place[lane / per_group + r] {
                        THROUGH_BUFFER => run.store(buffer.add(a * TILE * nr + TILE * lane + r * V::LEN)),
                        place => {
                            let at = place + a * row;
                            match residual {
                                Some(residual) => run.add(V::load(residual.add(at))).store(out.add(at)),
                                None => run.store(out.add(at)),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `Aᵀ m A` plus `bias`, then SiLU when asked, for the `V::LEN` tiles of `M` from `m` (its 36
/// rows `m_stride` apart): each tile's 16 pixels, `4 a + b` for pixel `(a, b)`, a vector of
/// the tiles each.
///
/// # Safety
/// The CPU has `V`'s features; `m + p * m_stride` holds `V::LEN` readable floats for every
/// position `p`.
#[inline(always)]
unsafe fn finished_pixels<V: Lanes>(m: *const f32, m_stride: usize, bias: f32, silu: bool) -> [V; TILE * TILE] {
    // SAFETY: the caller's contract covers every load.
    unsafe {
        // (Loops rather than `array::from_fn`: a closure would not inherit the caller's
        // target features, and its vectors would go through memory.)
        let mut rows = [[V::splat(0.0); TILE]; SPAN];
        for (i, row) in rows.iter_mut().enumerate() {
            let mut products = [V::splat(0.0); SPAN];
            for (j, value) in products.iter_mut().enumerate() {
                *value = V::load(m.add((i * SPAN + j) * m_stride));
            }
            *row = output_rows(products);
        }
        // `columns[b][a]`: pixel (a, b) of each tile.
        let mut columns = [[V::splat(0.0); TILE]; TILE];
        for (b, column) in columns.iter_mut().enumerate() {
            let mut values = [V::splat(0.0); SPAN];
            for (value, row) in values.iter_mut().zip(&rows) {
                *value = row[b];
            }
            *column = output_rows(values);
        }
        // All the tiles' pixels side by side through the bias and SiLU, `a` major.
        let mut finished = [V::splat(0.0); TILE * TILE];
        for (a, pixels) in finished.chunks_exact_mut(TILE).enumerate() {
            for (pixel, column) in pixels.iter_mut().zip(&columns) {
                *pixel = column[a];
            }
        }
        super::super::epilogue::finish_each(finished, [V::splat(bias); TILE * TILE], silu)
    }
}

/// Where a tile's pixels go in a blocked output: pixel `(a, b)` at `at + (a * row + b) * 8`
/// for `a < rows` and `b < columns` (the tile clipped to the output; none for a tile past it).
#[derive(Clone, Copy, Default)]
struct TilePlace {
    at: usize,
    rows: usize,
    columns: usize,
}

/// Eight output channels of a block's `nr` tiles, from `M` (channel `c`'s rows of `nr` at
/// `m + c * nr`, positions `m_stride` apart), finished (`Aᵀ m A`, the bias, SiLU when asked)
/// and stored in blocks of 8 channels ([`ChannelLayout::Blocked`](super::ChannelLayout)):
/// each pixel's 8 channels, a register after an 8x8 transpose, where `places` (one per tile)
/// puts it in `out` (plus the residual's 8 floats at the same place), outputs `row` pixels
/// wide.
///
/// # Safety
/// The CPU has AVX2 and FMA; `m + c * nr + p * m_stride` holds `nr` readable floats for `c <
/// 8` and every position `p`; `bias` holds 8 floats; `places` holds `nr`, and each pixel they
/// place has 8 writable floats in `out` (readable in the residual) that no other thread
/// accesses.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn transform_output_blocked(
    m: *const f32,
    m_stride: usize,
    nr: usize,
    bias: &[f32],
    silu: bool,
    places: &[TilePlace],
    row: usize,
    out: *mut f32,
    residual: Option<*const f32>,
) {
    use super::super::simd::Avx2;
    use std::arch::x86_64::*;
    const LANES: usize = 8;
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        for lane in (0..nr).step_by(LANES) {
            // `pixels[c][q]`: pixel `q` of the 8 tiles from `lane`, channel `c`.
            let mut pixels = [[_mm256_setzero_ps(); TILE * TILE]; LANES];
            for (c, channel) in pixels.iter_mut().enumerate() {
                for (value, pixel) in channel.iter_mut().zip(finished_pixels::<Avx2>(m.add(c * nr + lane), m_stride, bias[c], silu)) {
                    *value = pixel.0;
                }
            }
            for q in 0..TILE * TILE {
                let mut channels = [_mm256_setzero_ps(); LANES];
                for (value, channel) in channels.iter_mut().zip(&pixels) {
                    *value = channel[q];
                }
                let (a, b) = (q / TILE, q % TILE);
                for (tile, place) in super::super::x86_64::avx2::transpose_8x8(channels).into_iter().zip(&places[lane..lane + LANES]) {
                    if a < place.rows && b < place.columns {
                        let at = place.at + (a * row + b) * BLOCK;
                        let tile = match residual {
                            Some(residual) => _mm256_add_ps(tile, _mm256_loadu_ps(residual.add(at))),
                            None => tile,
                        };
                        _mm256_storeu_ps(out.add(at), tile);
                    }
                }
            }
        }
    }
}

/// Marks a group of tiles that is not stored in place ([`TileDestination::in_place`]).
const THROUGH_BUFFER: usize = usize::MAX;

/// Where [`transform_output_with`] puts one output channel's pixels of a block's tiles, a
/// vector (a group of `V::LEN / 4` tiles, 4 pixels each) of a tile row at a time: group `g`'s
/// row `a` at `out + in_place[g] + a * row` (plus the residual's floats at the same place from
/// `residual`), or, where `in_place[g]` is [`THROUGH_BUFFER`], at `buffer + a * 4 * nr +
/// 4 * (first tile of the group)` (`[TILE][nr][TILE]`: a run of tiles along an output row is a
/// run of pixels there).
struct TileDestination<'a> {
    out: *mut f32,
    residual: Option<*const f32>,
    row: usize,
    in_place: &'a [usize],
    buffer: *mut f32,
}

/// [`transform_input_with`] on `isa`'s vectors.
///
/// # Safety
/// As for [`transform_input_with`]; `isa` is supported.
unsafe fn transform_input(isa: Isa, input: &BlockInput, v: *mut f32, v_stride: usize) {
    use super::super::simd::{Avx2, Avx512};
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(input: &BlockInput, v: *mut f32, v_stride: usize) {
        // SAFETY: the caller's contract; AVX-512F is enabled.
        unsafe { transform_input_with::<Avx512>(input, v, v_stride) }
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(input: &BlockInput, v: *mut f32, v_stride: usize) {
        // SAFETY: the caller's contract; AVX2 and FMA are enabled.
        unsafe { transform_input_with::<Avx2>(input, v, v_stride) }
    }
    // SAFETY: the caller's contract; `isa` is supported, so the CPU has its features.
    unsafe {
        match isa {
            Isa::Avx512 => avx512(input, v, v_stride),
            Isa::Avx2 => avx2(input, v, v_stride),
        }
    }
}

/// [`transform_output_with`] on `isa`'s vectors.
///
/// # Safety
/// As for [`transform_output_with`]; `isa` is supported.
unsafe fn transform_output(isa: Isa, m: *const f32, m_stride: usize, nr: usize, bias: f32, silu: bool, destination: &TileDestination) {
    use super::super::simd::{Avx2, Avx512};
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(m: *const f32, m_stride: usize, nr: usize, bias: f32, silu: bool, destination: &TileDestination) {
        // SAFETY: the caller's contract; AVX-512F is enabled.
        unsafe { transform_output_with::<Avx512>(m, m_stride, nr, bias, silu, destination) }
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(m: *const f32, m_stride: usize, nr: usize, bias: f32, silu: bool, destination: &TileDestination) {
        // SAFETY: the caller's contract; AVX2 and FMA are enabled.
        unsafe { transform_output_with::<Avx2>(m, m_stride, nr, bias, silu, destination) }
    }
    // SAFETY: the caller's contract; `isa` is supported, so the CPU has its features.
    unsafe {
        match isa {
            Isa::Avx512 => avx512(m, m_stride, nr, bias, silu, destination),
            Isa::Avx2 => avx2(m, m_stride, nr, bias, silu, destination),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::activation::Activation;
    use super::super::super::isa;
    use super::super::tests::{reference, values};
    use super::*;

    /// The largest error relative to the size of the value, over `got` and `want`.
    fn worst_error(got: &[f32], want: &[f32]) -> f32 {
        got.iter().zip(want).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0, f32::max)
    }

    #[test]
    fn matches_the_definition_on_every_edge_of_the_tiles() {
        // (in, out, images, h, w, padding): outputs that end inside a tile on either axis or
        // both, one tile, no padding, channels that fill no panel, a batch, the fewest input
        // channels; no padding in whole blocks of channels (with the channels in the lanes).
        let shapes = [
            (16, 8, 1, 8, 8, 1),
            (24, 40, 2, 7, 21, 1),
            (32, 20, 1, 13, 10, 0),
            (17, 33, 1, 5, 5, 1),
            (64, 64, 1, 3, 3, 1),
            (48, 70, 2, 23, 38, 1),
            (8, 16, 1, 34, 35, 1),
            (64, 64, 2, 20, 20, 1),
            (16, 24, 1, 13, 10, 0),
        ];
        // On 2 and 3 threads, the small outputs run in blocks of output channels that share
        // their transformed input; on one, most of them do not. On 16, the input channels
        // (48) do not fill twice as many parts evenly.
        let pools: Vec<rayon::ThreadPool> = [1, 2, 3, 16].map(|threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()).into();
        for (isa, pool) in isa::all_supported().into_iter().flat_map(|isa| pools.iter().map(move |pool| (isa, pool))) {
            for (cin, cout, n, h, w, pad) in shapes {
                let spec = ConvSpec::square(cin, cout, 1, 3, 1, pad, Activation::Silu);
                let conv = Conv2d::new(spec, values(cout * cin * 9, 1), values(cout, 2)).unwrap().with_weights_packed_for(isa).unwrap();
                let winograd = conv.winograd.as_ref().expect("3x3 stride 1 with 16 channels or more");
                let input = values(n * cin * h * w, 3);
                let input_in_blocks = super::super::input::planes_to_blocks(&input, h * w);
                let (oh, ow) = conv.output_size(h, w).unwrap();
                let residual = values(n * cout * oh * ow, 4);
                // In blocks too, with AVX2 and whole blocks of output channels (the residual in
                // blocks as well).
                let layouts = [ChannelLayout::Planes, ChannelLayout::Blocked];
                let blocks_fit = isa == Isa::Avx2 && cout.is_multiple_of(BLOCK);
                // An input in blocks, into blocks, runs with the channels in the lanes.
                let input_layouts: &[ChannelLayout] = if isa == Isa::Avx2 && cin.is_multiple_of(BLOCK) { &layouts } else { &layouts[..1] };
                for (with_residual, layout, input_layout) in [false, true]
                    .into_iter()
                    .flat_map(|r| layouts.map(|l| (r, l)))
                    .filter(|&(_, l)| blocks_fit || l == ChannelLayout::Planes)
                    .flat_map(|(r, l)| input_layouts.iter().map(move |&i| (r, l, i)))
                {
                    let pixels = oh * ow;
                    let blocked = layout == ChannelLayout::Blocked;
                    let residual_laid_out = if blocked { super::super::input::planes_to_blocks(&residual, pixels) } else { residual.clone() };
                    // NaN marks any pixel left unwritten.
                    let mut out = vec![MaybeUninit::new(f32::NAN); n * cout * pixels];
                    let conv_input = match input_layout {
                        ChannelLayout::Planes => ConvInput::contiguous(&input, n, cin, h, w),
                        ChannelLayout::Blocked => {
                            let part = super::super::input::InputPart {
                                data: &input_in_blocks,
                                channels: cin,
                                image_stride: cin * h * w,
                                plane_stride: h * w,
                                cold: false,
                            };
                            ConvInput::blocked(vec![part], n, h, w).unwrap()
                        }
                    };
                    pool.install(|| {
                        conv.run_winograd(
                            winograd,
                            &conv_input,
                            OutputPlanes { oh, ow, pitch: pixels },
                            layout,
                            with_residual.then_some(residual_laid_out.as_slice()),
                            &mut out,
                        )
                    });
                    // SAFETY: initialised (NaN) when the vector was made.
                    let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                    let got = if blocked { super::super::input::blocks_to_planes(&got, pixels) } else { got };
                    let mut want = reference(&conv, &input, n, h, w);
                    if with_residual {
                        want.iter_mut().zip(&residual).for_each(|(w, r)| *w += r);
                    }
                    let error = worst_error(&got, &want);
                    let threads = pool.current_num_threads();
                    assert!(
                        error < 1e-4,
                        "{isa:?} {threads} threads {cin}->{cout} {n}x{h}x{w} pad {pad} residual {with_residual} {input_layout:?} -> {layout:?}: relative error {error}"
                    );
                }
            }
        }
    }

    #[test]
    fn runs_when_the_output_has_blocks_for_every_thread() {
        for isa in isa::all_supported() {
            let spec = ConvSpec::square(32, 24, 1, 3, 1, 1, Activation::Identity);
            let conv = Conv2d::new(spec, values(24 * 32 * 9, 5), values(24, 6)).unwrap().with_weights_packed_for(isa).unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            pool.install(|| {
                assert!(conv.winograd_for(1, 80, 80).is_some(), "80x80 has 14 blocks of 32 tiles");
                let narrow = Conv2d::new(ConvSpec::square(32, 8, 1, 3, 1, 1, Activation::Silu), values(8 * 32 * 9, 5), values(8, 6)).unwrap();
                let narrow = narrow.with_weights_packed_for(isa).unwrap();
                assert!(narrow.winograd_for(1, 8, 8).is_none(), "8x8 to 8 channels has one block of tiles and one of channels");
                assert!(conv.winograd_for(1, 8, 8).is_some(), "8x8 to 24 channels has two blocks of channels");
                assert!(conv.winograd_for(1, 20, 20).is_some(), "20x20 has two blocks of tiles (AVX2), or one and two of channels");
                // A block of tiles for each thread: one block of channels, else two.
                let channel_blocks = if tile_blocks(20, 20, isa) >= 2 { 1 } else { 2 };
                assert_eq!(conv.winograd_channel_blocks(1, 20, 20, isa, false).1, channel_blocks, "{isa:?} at 20x20");
                assert!(conv.runs_winograd(1, 80, 80).is_some(), "80x80 runs by Winograd");
                assert!(conv.runs_winograd(1, 20, 20).is_some(), "20x20 runs by Winograd");
                assert!(conv.winograd_for(1, 16, 16).is_some() && conv.runs_winograd(1, 16, 16).is_none(), "16x16 runs in pixel tiles");
                // AVX-512's one block of tiles at 20x20 gives way to AVX2's two; at 80x80 and
                // at batch 2 every thread has a block of 32 tiles.
                let narrow_at_20 = if isa == Isa::Avx512 && Isa::Avx2.supported() { Isa::Avx2 } else { isa };
                assert_eq!(conv.winograd_for(1, 20, 20).map(Winograd::isa), Some(narrow_at_20), "{isa:?} at 20x20");
                assert_eq!(conv.winograd_for(2, 20, 20).map(Winograd::isa), Some(isa), "{isa:?} at 20x20, batch 2");
                assert_eq!(conv.winograd_for(1, 80, 80).map(Winograd::isa), Some(isa), "{isa:?} at 80x80");
                for size in [80, 20] {
                    let input = values(32 * size * size, 7);
                    let error = worst_error(&conv.run(&input, 1, size, size, None), &reference(&conv, &input, 1, size, size));
                    assert!(error < 1e-4, "{isa:?} at {size}x{size}: relative error {error}");
                }
            });
        }
        // Other shapes keep the direct path: strided, too few input or output channels,
        // grouped. Eight input channels are enough.
        assert!(Winograd::applies(&ConvSpec::square(8, 16, 1, 3, 1, 1, Activation::Silu)));
        for spec in [
            ConvSpec::square(32, 32, 1, 3, 2, 1, Activation::Silu),
            ConvSpec::square(4, 32, 1, 3, 1, 1, Activation::Silu),
            ConvSpec::square(32, 4, 1, 3, 1, 1, Activation::Silu),
            ConvSpec::square(32, 32, 2, 3, 1, 1, Activation::Silu),
        ] {
            assert!(!Winograd::applies(&spec), "{spec:?}");
        }
    }
}
