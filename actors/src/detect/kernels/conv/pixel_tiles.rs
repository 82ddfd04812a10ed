//! Convolutions that Winograd does not take (strided and pointwise ones above all), as tiles
//! of output pixels times output channels ([`avx512::conv_tile_wide`],
//! [`avx512::conv_tile_16x16`] and their AVX2 forms).
//!
//! The channel-major product ([`run_direct`](Conv2d::run_direct), [`run_gemm`](Conv2d::run_gemm))
//! puts pixels in the vector lanes, so each block of `B` must first be gathered or packed
//! from the input into a panel, and its tiles of `C` go back to memory between blocks of `k`.
//! Here the lanes hold output channels instead: the weights are the vector operand, packed
//! once at load time, and each input value is a broadcast operand read where it lies, where
//! the pixels of a tile are consecutive floats for every tap: in the input's phase planes
//! ([`phase_planes`]) for a convolution with a kernel, in the input itself for a pointwise
//! one. Nothing is gathered or packed per call, and each tile's whole `k` runs in registers,
//! so the bias, SiLU and residual are applied once, after a 16x16 transpose that turns the
//! tile back into rows of pixels.
//!
//! With AVX-512, tiles are 10 or 14 pixels by 32 channels (28 of the 32 registers hold sums at
//! 14), and 16 pixels by 16 channels for convolutions with 16 output channels or fewer, which
//! would leave half of a 32-channel tile empty. With AVX2 (16 registers), 5 or 6 pixels by 16
//! channels, and 8 by 8. Each tile lies in one run of pixels (an output row;
//! for a pointwise convolution, a stretch of the plane); the last tile of a run ends on the
//! run's last pixel, so it overlaps the one before when the run is not a multiple of the
//! tile, and those pixels are computed twice, to the same values. The width of the wide
//! tiles is the one that computes the fewest pixels twice.
//!
//! Measured (`cargo bench --bench conv`, 2 threads, this AVX-512 machine, against the
//! channel-major path in the same run): 64 -> 128 channels at 80x80 stride 2 in 0.53-0.57 ms
//! against 0.65-0.68, 128 -> 256 at 40x40 stride 2 0.60-0.62 against 0.75-0.76; pointwise,
//! 256 -> 32 at 80x80 0.26-0.29 against 0.34-0.37 and 384 -> 256 at 20x20 0.17-0.18 against
//! 0.25. In YOLOv12n, the 3x3 convolutions went from 10.6 to 9.6 ms and the pointwise ones
//! from 8.5 to 7.7.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::SendPtr;
use super::super::activation::Activation;
use super::super::cache;
use super::super::isa::Isa;
use super::super::pack::PackedB;
use super::super::x86_64::{avx2, avx512};
use super::direct::phase_planes;
use super::schedule::{self, SCRATCH};
use super::winograd::Winograd;
use super::{Conv2d, ConvInput, ConvSpec, add_assign};

/// A convolution's weights in panels of `panel` output channels (16 or 32),
/// `[panel][kk][channel]` with `kk = (c, ky, kx)` (zeros past the last channel), and its
/// biases padded to whole panels.
#[derive(Debug, Clone)]
pub(super) struct PixelTiles {
    isa: Isa,
    weights: PackedB,
    bias: Vec<f32>,
    k: usize,
    panel: usize,
}

/// Pixels per strip of an output written through a compact buffer (`32 x 128` floats: 16 KiB,
/// in L1).
const COMPACT_STRIP: usize = 128;

/// No tile is wider than this many pixels ([`PixelTiles::tile`]).
const WIDEST_TILE: usize = 16;

/// One tile's kernel: `conv_tile_wide` or the narrow one of [`avx512`] or [`avx2`].
type TileKernel = unsafe fn(&[*const f32], usize, *const f32, *const f32, bool, *mut f32, usize, Option<(*const f32, usize)>, usize);

impl PixelTiles {
    /// Whether a convolution of `spec` runs this way: one group, and a shape that Winograd
    /// does not take.
    /// `STREAMDET_PIXEL_TILES=off` keeps such convolutions on the channel-major path, to
    /// compare the two on one machine.
    pub(super) fn applies(spec: &ConvSpec) -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENABLED.get_or_init(|| std::env::var("STREAMDET_PIXEL_TILES").map_or(true, |v| v != "off")) && spec.groups == 1 && !Winograd::applies(spec)
    }

    /// Packs `weights` (`[out][in][kh][kw]`) and `bias` into panels for `isa`'s tiles.
    pub(super) fn new(isa: Isa, spec: &ConvSpec, weights: &[f32], bias: &[f32]) -> Self {
        let k = spec.in_channels * spec.kernel.0 * spec.kernel.1;
        let cout = spec.out_channels;
        let (narrow, wide) = match isa {
            Isa::Avx512 => (avx512::NARROW_TILE, avx512::WIDE_TILE_CHANNELS),
            Isa::Avx2 => (avx2::NARROW_TILE, avx2::WIDE_TILE_CHANNELS),
        };
        let panel = if cout <= narrow { narrow } else { wide };
        let panels = cout.div_ceil(panel);
        let mut packed = PackedB::new();
        let floats = packed.floats_mut(panels * k * panel);
        for (index, value) in floats.iter_mut().enumerate() {
            let (p, kk, lane) = (index / (k * panel), index / panel % k, index % panel);
            let channel = p * panel + lane;
            *value = if channel < cout { weights[channel * k + kk] } else { 0.0 };
        }
        let mut padded_bias = bias.to_vec();
        padded_bias.resize(panels * panel, 0.0);
        PixelTiles { isa, weights: packed, bias: padded_bias, k, panel }
    }

    /// Panel `p`'s weights: `k * panel` floats, 64-byte aligned.
    fn weights(&self, p: usize) -> *const f32 {
        // SAFETY: panel `p` of the `bias.len() / panel` panels starts inside the packed floats.
        unsafe { self.weights.as_ptr().add(p * self.k * self.panel) }
    }

    /// Pixels per tile for runs of `run` pixels, and the kernel for them: the widest tile
    /// that computes the fewest pixels twice.
    fn tile(&self, run: usize) -> (usize, TileKernel) {
        let choices: [(usize, TileKernel); 2] = match (self.isa, self.panel) {
            (Isa::Avx512, avx512::NARROW_TILE) => [(16, avx512::conv_tile_16x16 as TileKernel); 2],
            (Isa::Avx512, _) => [(14, avx512::conv_tile_wide::<14> as TileKernel), (10, avx512::conv_tile_wide::<10> as TileKernel)],
            (Isa::Avx2, avx2::NARROW_TILE) => [(8, avx2::conv_tile_8x8 as TileKernel); 2],
            (Isa::Avx2, _) => [(6, avx2::conv_tile_wide::<6> as TileKernel), (5, avx2::conv_tile_wide::<5> as TileKernel)],
        };
        choices.into_iter().filter(|&(pixels, _)| pixels <= run).min_by_key(|&(pixels, _)| run.div_ceil(pixels) * pixels).unwrap_or(choices[1])
    }
}

impl Conv2d {
    /// The pixel tiles for an output of `oh x ow`, when this convolution has them: a run of
    /// pixels (a row, or the whole plane for a pointwise convolution) must hold a tile.
    pub(super) fn pixel_tiles_for(&self, oh: usize, ow: usize) -> Option<&PixelTiles> {
        let tiles = self.pixel_tiles.as_ref()?;
        let run = if self.is_pointwise() { oh * ow } else { ow };
        (run >= tiles.tile(run).0).then_some(tiles)
    }

    /// The convolution in tiles of pixels by channels (see the module's notes), into `out`
    /// (`[n][out_channels][oh][ow]`), adding `residual` (the output's shape) last.
    pub(super) fn run_pixel_tiles(&self, tiles: &PixelTiles, input: &ConvInput, oh: usize, ow: usize, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let n = input.n;
        let (cin, cout) = (self.spec.in_channels, self.spec.out_channels);
        let pixels = oh * ow;
        let threads = rayon::current_num_threads();
        // Runs of output pixels whose inputs are consecutive floats for every tap: the output
        // rows over the phase planes, or for a pointwise convolution, which reads its input
        // where it lies, stretches of the whole plane (the last one takes the remainder).
        let pointwise = self.is_pointwise();
        let (planes, offsets, channel_len, run_len, in_stride, runs) = if pointwise {
            let stretch = (pixels / (4 * threads).div_ceil(n)).max(WIDEST_TILE).min(pixels);
            (Vec::new(), Vec::new(), 0, stretch, stretch, pixels / stretch)
        } else {
            let layout = self.phase_layout(input.h, input.w);
            let planes = phase_planes(input, &layout, Some(tiles.isa));
            let offsets = self.tap_offsets(&layout);
            (planes, offsets, layout.sh * layout.sw * layout.plane, ow, layout.wp, oh)
        };
        let (tile, kernel) = tiles.tile(run_len);
        assert!(run_len >= tile, "a run holds a whole tile");
        let panels = cout.div_ceil(tiles.panel);
        let (runs_per_task, run_tasks) = schedule::row_tasks(runs, n, threads);
        // Few runs: split the panels of channels too, so that every thread works.
        let panel_blocks = if n * run_tasks >= 2 * threads { 1 } else { (2 * threads).div_ceil(n * run_tasks).min(panels) };
        let panels_per_block = panels.div_ceil(panel_blocks);
        let panel_blocks = panels.div_ceil(panels_per_block);
        let silu = self.spec.activation == Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        let (planes, offsets) = (&planes, &offsets);
        // Channel planes a whole number of pages apart share their L1 sets, so a tile stored
        // straight into them evicts its own rows: such outputs go through a compact strip.
        let compact = cache::rows_share_cache_sets(pixels);
        (0..n * run_tasks * panel_blocks).into_par_iter().for_each(|task| {
            SCRATCH.with_borrow_mut(|(scratch, _)| {
                let block = task % panel_blocks;
                let run_task = task / panel_blocks % run_tasks;
                let batch = task / panel_blocks / run_tasks;
                // Where each tap of the image's first pixel lies.
                let taps: Vec<*const f32> = if pointwise {
                    (0..cin).map(|c| input.plane(batch, c).as_ptr()).collect()
                } else {
                    let image = &planes[batch * cin * channel_len..];
                    offsets.iter().map(|&o| image[o..].as_ptr()).collect()
                };
                let task_runs = run_task * runs_per_task..((run_task + 1) * runs_per_task).min(runs);
                for panel in block * panels_per_block..((block + 1) * panels_per_block).min(panels) {
                    let channels = tiles.panel.min(cout - panel * tiles.panel);
                    let weights = tiles.weights(panel);
                    let bias = tiles.bias[panel * tiles.panel..].as_ptr();
                    for run in task_runs.clone() {
                        let len = if pointwise && run + 1 == runs { pixels - run * run_len } else { run_len };
                        // Output index of the run's first pixel in the panel's first channel.
                        let run_first = (batch * cout + panel * tiles.panel) * pixels + run * run_len;
                        let strip = if compact { (COMPACT_STRIP / tile).max(1) * tile } else { len };
                        let mut strip_start = 0;
                        while strip_start < len {
                            let end = (strip_start + strip).min(len);
                            // A last strip shorter than a tile reaches back into the one before.
                            let start = strip_start.min(end - tile);
                            let width = end - start;
                            let tile_starts = (0..width).step_by(tile).map(|x| x.min(width - tile));
                            if compact {
                                if scratch.len() < channels * width {
                                    scratch.resize(channels * width, 0.0);
                                }
                                for x in tile_starts {
                                    // SAFETY: as below, writing rows of `width` floats of `scratch`,
                                    // which holds `channels` of them.
                                    unsafe {
                                        kernel(&taps, run * in_stride + start + x, weights, bias, silu, scratch.as_mut_ptr().add(x), width, None, channels)
                                    };
                                }
                                for (c, row) in scratch.chunks_exact(width).take(channels).enumerate() {
                                    let first = run_first + c * pixels + start;
                                    // SAFETY: pixels `start..end` of this run of channel `c` of the
                                    // panel: this task's alone, inside `out`.
                                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(first), width) };
                                    dst.copy_from_slice(row);
                                    if let Some(residual) = residual {
                                        add_assign(dst, &residual[first..][..width]);
                                    }
                                }
                            } else {
                                for x in tile_starts {
                                    let first = run_first + start + x;
                                    // SAFETY: the CPU has the features of `tiles.isa` (the weights
                                    // were packed for it, which `PackedA` checks). Tap `kk` of pixel
                                    // `start + x + j` (`j < tile`, within the run) of run `run` is
                                    // at `taps[kk] + run * in_stride + start + x + j`: in the input
                                    // plane of channel `kk` (pointwise: that is the pixel's own
                                    // index), or inside the phase planes, as for `run_direct`. The
                                    // panel holds `k * panel` aligned weights and `panel` biases.
                                    // This task alone writes channels `panel * tiles.panel ..`
                                    // (`channels` of them) of its runs of image `batch` (tasks
                                    // differ in image, runs or panels), inside `out` and the
                                    // residual, which have the output's shape.
                                    unsafe {
                                        kernel(
                                            &taps,
                                            run * in_stride + start + x,
                                            weights,
                                            bias,
                                            silu,
                                            out_ptr.get().add(first),
                                            pixels,
                                            residual.map(|r| (r[first..].as_ptr(), pixels)),
                                            channels,
                                        )
                                    };
                                }
                            }
                            strip_start = end;
                        }
                    }
                }
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::activation::Activation;
    use super::super::tests::check;
    use super::*;

    #[test]
    fn tiles_fit_their_runs_and_compute_the_fewest_pixels() {
        for isa in [Isa::Avx2, Isa::Avx512] {
            for cout in [8, 16, 40] {
                let spec = ConvSpec::square(4, cout, 1, 3, 2, 1, Activation::Silu);
                let tiles = PixelTiles::new(isa, &spec, &vec![0.5; cout * 36], &vec![0.0; cout]);
                for run in WIDEST_TILE..200 {
                    let (pixels, _) = tiles.tile(run);
                    assert!(pixels <= run, "{isa:?} {cout} channels: a tile of {pixels} in a run of {run}");
                }
            }
            let wide = PixelTiles::new(isa, &ConvSpec::square(4, 64, 1, 3, 2, 1, Activation::Silu), &[0.5; 64 * 36], &[0.0; 64]);
            // YOLO's widths (multiples of 10) take the narrower wide tile with no pixel twice.
            let (pixels, _) = wide.tile(80);
            assert_eq!(80 % pixels, 0, "{isa:?}: tiles of {pixels} in rows of 80");
        }
    }

    #[test]
    fn convolutions_in_pixel_tiles_match_the_definition() {
        // Rows that end inside a tile (20 = 14 + 6 and 10 + 10, 16 + 4), 16 output channels
        // or fewer, channels past the last whole panel, stride 1 below Winograd's channels,
        // batch 2, a 5x5 kernel, no padding.
        check(16, 32, 1, 3, 2, 1, 1, 40, 40);
        check(16, 64, 1, 3, 2, 1, 1, 56, 58);
        check(3, 16, 1, 3, 2, 1, 2, 34, 36);
        check(8, 40, 1, 3, 2, 1, 1, 33, 47);
        check(8, 16, 1, 3, 1, 1, 2, 17, 19);
        check(4, 40, 1, 5, 1, 2, 1, 18, 21);
        check(6, 8, 1, 3, 2, 0, 1, 40, 35);
        // Pointwise: stretches of the plane that end inside a tile, one and a half panels,
        // batch 2; a plane smaller than a tile stays on the channel-major path.
        check(20, 48, 1, 1, 1, 0, 2, 7, 9);
        check(8, 16, 1, 1, 1, 0, 1, 23, 31);
        check(8, 40, 1, 1, 1, 0, 1, 3, 3);
        // Channel planes of 1024 pixels (a whole number of pages): through the compact strips.
        check(8, 40, 1, 1, 1, 0, 1, 32, 32);
        check(4, 24, 1, 3, 2, 1, 2, 64, 64);
    }
}
