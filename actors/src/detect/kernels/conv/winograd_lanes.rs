//! F(4x4, 3x3) with the channels in the lanes, for AVX2 layers whose input and output are both
//! in blocks of 8 channels ([`ChannelLayout::Blocked`]).
//!
//! [`winograd`](super::winograd) puts tiles in the lanes: its input must first be split into
//! phase planes (a copy of the whole input, handed out by channels, so that on two threads
//! half of it is read from the other core's cache), and its finished pixels are transposed back
//! into blocks. Here a register holds one pixel's 8 channels, which is how blocks store them:
//! - the input transform reads each tile's 6x6 pixels straight from the input's blocks (zeros
//!   past its edges) and writes `V[p]` as `[tile][in channel]`;
//! - each of the 36 products `M[p] = V[p] U[p]` runs as tiles of 6 tiles by 16 output channels,
//!   the weights the vector operand (`U[p]` packed at load time as `[panel][in][16]`) and each
//!   transformed input a broadcast;
//! - the output transform turns a tile's 36 vectors of 8 output channels into its 16 pixels,
//!   adds the bias, applies SiLU and the residual, and stores each pixel's 8 channels whole.
//!
//! A task is a run of consecutive tiles of one image (along rows of tiles), so each thread
//! reads the rows of the input it wrote in the layer before, and nothing is copied per call.
//! `STREAMDET_WINOGRAD_LANES=off` runs these layers through [`winograd`](super::winograd)'s
//! tiles instead, to compare the two.
//!
//! Measured on a Xeon (Sapphire Rapids) capped at AVX2 (`scripts/as-avx2.sh`), YOLOv12n, 2
//! threads, 8 rounds alternating with the tiles in the lanes (`scripts/ab-steps.py`): the 3x3
//! stride-1 layers took 0.64-0.80 of their time (64 -> 64 channels at 80x80 0.70-0.74, the
//! 32 -> 32 at 40x40 0.64-0.74, the 64 -> 64 at 20x20 0.75-0.80), all 3x3 layers 0.90-0.92,
//! the call 0.95-0.96; the steps' speed-up from one thread to two went from 1.83x to 1.89x.
//! Runs of 12 tiles instead of 24 were faster at 80x80 (0.91-0.96) and slower at 40x40 and
//! 20x20 (up to 1.18); each tile's blocks of input channels transformed together (a tile at a
//! time rather than a block at a time) took 1.03-1.08.

use std::mem::MaybeUninit;

use super::super::pack::PackedB;
use super::super::{SendPtr, parallel};
use super::{BLOCK, Conv2d, ConvInput, OutputPlanes};

/// Output pixels along each side of a tile.
const TILE: usize = 4;
/// Input pixels along each side of a tile.
const SPAN: usize = 6;
/// Positions of a transformed tile, one matrix product each.
const POSITIONS: usize = SPAN * SPAN;
/// Floats per cache line: the 36 matrices of a task's `V` (and `M`) lie one line more than
/// their size apart, so that a tile's 36 stores do not all fall into the same L1 sets when
/// that size is a multiple of 4 KiB.
const LINE: usize = 16;
/// Output channels per panel of the products (two registers).
const PANEL: usize = 16;
/// Tiles per product kernel call: 12 sums beside 2 weights and a broadcast (16 registers).
const GROUP: usize = 6;
/// Most tiles per task: each task reads all of `U` (36 matrices of `in x out`) once, so
/// longer runs read it less often; shorter ones share the work more evenly.
const MOST_TILES_PER_TASK: usize = 24;

/// Whether the AVX2 layers in blocks take this path (`STREAMDET_WINOGRAD_LANES=off`: no).
pub(super) fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("STREAMDET_WINOGRAD_LANES").map_or(true, |v| v != "off"))
}

/// The transformed weights `U[p]` (`in x out` for each position `p`), each as panels of 16
/// output channels (the last 8 wide when the channels leave 8 over), `[p][panel][in][width]`,
/// 64-byte aligned.
#[derive(Debug, Clone)]
pub(super) struct LaneWeights {
    u: PackedB,
    cin: usize,
    cout: usize,
}

impl LaneWeights {
    /// From `transformed`, the 36 matrices `out x in` (`[p][out][in]`); `None` unless both
    /// channel counts are whole blocks of 8.
    pub(super) fn new(transformed: &[f32], cin: usize, cout: usize) -> Option<Self> {
        if cin == 0 || cout == 0 || !cin.is_multiple_of(BLOCK) || !cout.is_multiple_of(BLOCK) {
            return None;
        }
        assert_eq!(transformed.len(), POSITIONS * cout * cin, "36 transformed matrices");
        let mut u = PackedB::new();
        let floats = u.floats_mut(POSITIONS * cin * cout);
        for (p, matrix) in transformed.chunks_exact(cout * cin).enumerate() {
            for (start, width) in panels(cout) {
                let panel = &mut floats[p * cin * cout + start * cin..][..cin * width];
                for (c, row) in panel.chunks_exact_mut(width).enumerate() {
                    for (o, value) in row.iter_mut().enumerate() {
                        *value = matrix[(start + o) * cin + c];
                    }
                }
            }
        }
        Some(LaneWeights { u, cin, cout })
    }

    /// Panel `(start, width)` of position `p`: `cin x width` floats.
    fn panel(&self, p: usize, start: usize) -> *const f32 {
        assert!(p < POSITIONS && start < self.cout);
        // SAFETY: position `p`'s panels follow `p` whole positions; a panel starting at channel
        // `start` follows `start` channels' columns of `cin` floats each.
        unsafe { self.u.as_ptr().add(p * self.cin * self.cout + start * self.cin) }
    }
}

/// The panels of `cout` output channels (a multiple of 8): `(first channel, width)`.
fn panels(cout: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..cout).step_by(PANEL).map(move |start| (start, PANEL.min(cout - start)))
}

/// Tiles per task for `tiles` tiles an image on `threads`: runs of at most
/// [`MOST_TILES_PER_TASK`], as many tasks as a whole multiple of the threads, as even as
/// whole tiles allow.
fn tiles_per_task(tiles: usize, threads: usize) -> usize {
    let tasks = tiles.div_ceil(MOST_TILES_PER_TASK).next_multiple_of(threads.max(1)).max(1);
    tiles.div_ceil(tasks).max(1)
}

thread_local! {
    /// Each worker's transformed input (`V`) and products (`M`) of a task, reused across tasks.
    static SCRATCH: std::cell::RefCell<(PackedB, PackedB)> = const { std::cell::RefCell::new((PackedB::new(), PackedB::new())) };
}

/// Marks a row or column of a tile that lies in the padding.
const OUTSIDE: usize = usize::MAX;

impl Conv2d {
    /// The convolution by F(4x4, 3x3) with the channels in the lanes (see the module's notes):
    /// `input` in blocks, into `out` in blocks (`planes.pitch == oh * ow`), adding `residual`
    /// (in blocks too) last. The CPU has AVX2 and FMA (the weights were packed for it).
    pub(super) fn run_winograd_lanes(
        &self,
        lanes: &LaneWeights,
        input: &ConvInput,
        planes: OutputPlanes,
        residual: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (n, h, w) = (input.n, input.h, input.w);
        let OutputPlanes { oh, ow, pitch } = planes;
        let (cin, cout) = (lanes.cin, lanes.cout);
        assert!(
            input.layout() == super::ChannelLayout::Blocked && input.channels() == cin && self.spec.out_channels == cout && pitch == oh * ow,
            "a blocked input and output of the convolution's channels"
        );
        assert!(super::super::isa::Isa::Avx2.supported(), "the lanes' kernels need AVX2 and FMA");
        let len = n * cout * pitch;
        assert!(out.len() >= len && residual.is_none_or(|r| r.len() >= len), "the output and residual hold every block");
        let (pt, pl) = (self.spec.pads.0, self.spec.pads.1);
        let (th, tw) = (oh.div_ceil(TILE), ow.div_ceil(TILE));
        let tiles = th * tw;
        if n * tiles == 0 {
            return;
        }
        let per_task = tiles_per_task(tiles, parallel::threads());
        let tasks = tiles.div_ceil(per_task);
        let silu = self.spec.activation == super::super::activation::Activation::Silu;
        let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
        parallel::for_each(n * tasks, |task| {
            let (image, first) = (task / tasks, task % tasks * per_task);
            let count = per_task.min(tiles - first);
            SCRATCH.with_borrow_mut(|(v_buffer, m_buffer)| {
                let (v_stride, m_stride) = (count * cin + LINE, count * cout + LINE);
                let v = v_buffer.floats_mut(POSITIONS * v_stride).as_mut_ptr();
                let m = m_buffer.floats_mut(POSITIONS * m_stride).as_mut_ptr();
                // Each tile's input rows and columns `4t - pad ..` (offsets into a block), where
                // inside: the same for every block of channels.
                let inside = |t: usize, pad: usize, size: usize, step: usize| -> [usize; SPAN] {
                    std::array::from_fn(|r| (TILE * t + r).checked_sub(pad).filter(|&y| y < size).map_or(OUTSIDE, |y| y * step))
                };
                let mut places = [([OUTSIDE; SPAN], [OUTSIDE; SPAN]); MOST_TILES_PER_TASK];
                for (i, place) in places[..count].iter_mut().enumerate() {
                    let (ty, tx) = ((first + i) / tw, (first + i) % tw);
                    *place = (inside(ty, pt, h, w * BLOCK), inside(tx, pl, w, BLOCK));
                }
                for c in (0..cin).step_by(BLOCK) {
                    let block = input.block(image, c);
                    for (i, (rows, columns)) in places[..count].iter().enumerate() {
                        // SAFETY: AVX2 and FMA are supported (asserted); every row and column
                        // offset not `OUTSIDE` is a pixel of the block (`h x w` pixels of 8
                        // floats); `V` holds `POSITIONS` matrices of `count x cin` floats,
                        // `v_stride` apart, and this writes the 8 floats of tile `i`'s channels
                        // `c..c + 8` in each.
                        unsafe { transform_input(block.as_ptr(), rows, columns, v.add(i * cin + c), v_stride) };
                    }
                }
                for p in 0..POSITIONS {
                    for (start, width) in panels(cout) {
                        for group in (0..count).step_by(GROUP) {
                            let tiles_here = GROUP.min(count - group);
                            // SAFETY: AVX2 and FMA are supported; the group's rows of `V[p]`
                            // (`tiles_here` rows of `cin` floats) and of `M[p]` (rows of `cout`,
                            // columns `start..start + width`) lie inside the buffers; the panel
                            // holds `cin x width` floats.
                            unsafe {
                                products(
                                    tiles_here,
                                    width,
                                    v.add(p * v_stride + group * cin),
                                    cin,
                                    lanes.panel(p, start),
                                    m.add(p * m_stride + group * cout + start),
                                    cout,
                                )
                            };
                        }
                    }
                }
                for c in (0..cout).step_by(BLOCK) {
                    // The 8 channels' blocks start where their first plane would.
                    let block = (image * cout + c) * pitch;
                    for i in 0..count {
                        let (ty, tx) = ((first + i) / tw, (first + i) % tw);
                        let (y, x) = (TILE * ty, TILE * tx);
                        let place = TilePlace { at: block + (y * ow + x) * BLOCK, rows: TILE.min(oh - y), columns: TILE.min(ow - x), row: ow * BLOCK };
                        // SAFETY: AVX2 and FMA are supported; `M` holds `POSITIONS` matrices of
                        // `count x cout`, `m_stride` apart, and this reads tile `i`'s channels
                        // `c..c + 8` of each; the bias holds the 8 channels; the tile's pixels
                        // inside the output (`rows x columns` from `at`) lie inside block `c`
                        // of image `image`, and only this task writes them (its tiles are its
                        // own).
                        unsafe {
                            transform_output(
                                m.add(i * cout + c),
                                m_stride,
                                &self.bias[c..c + BLOCK],
                                silu,
                                &place,
                                out_ptr.get(),
                                residual.map(<[f32]>::as_ptr),
                            )
                        };
                    }
                }
            })
        });
    }
}

/// Where a tile's pixels go in a block of the output: the first at `at`, `rows x columns` of
/// them inside the output, rows `row` floats apart.
struct TilePlace {
    at: usize,
    rows: usize,
    columns: usize,
    row: usize,
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `Bᵀ d` for one column (or row) of a tile's input: the interpolation points 0, 1, -1, 2, -2
/// and ∞ of [`winograd`](super::winograd)'s `G`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn input_1d(d: [__m256; SPAN]) -> [__m256; SPAN] {
    // SAFETY: the callers are compiled with AVX2 and FMA.
    unsafe {
        let (two, four, five) = (_mm256_set1_ps(2.0), _mm256_set1_ps(4.0), _mm256_set1_ps(5.0));
        // -4 d1 - 4 d2 + d3 + d4 and 4 d1 - 4 d2 - d3 + d4; -2 d1 - d2 + 2 d3 + d4 and
        // 2 d1 - d2 - 2 d3 + d4.
        let (a, b) = (_mm256_fnmadd_ps(four, d[2], d[4]), _mm256_fnmadd_ps(four, d[1], d[3]));
        let (c, e) = (_mm256_sub_ps(d[4], d[2]), _mm256_sub_ps(d[3], d[1]));
        [
            _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4])),
            _mm256_add_ps(a, b),
            _mm256_sub_ps(a, b),
            _mm256_fmadd_ps(two, e, c),
            _mm256_fnmadd_ps(two, e, c),
            _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5])),
        ]
    }
}

/// `Aᵀ m` for one column (or row) of a tile's products.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn output_1d(m: [__m256; SPAN]) -> [__m256; TILE] {
    // SAFETY: the callers are compiled with AVX2 and FMA.
    unsafe {
        let (s12, d12) = (_mm256_add_ps(m[1], m[2]), _mm256_sub_ps(m[1], m[2]));
        let (s34, d34) = (_mm256_add_ps(m[3], m[4]), _mm256_sub_ps(m[3], m[4]));
        [
            _mm256_add_ps(_mm256_add_ps(m[0], s12), s34),
            _mm256_fmadd_ps(_mm256_set1_ps(2.0), d34, d12),
            _mm256_fmadd_ps(_mm256_set1_ps(4.0), s34, s12),
            _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0), d34, d12), m[5]),
        ]
    }
}

/// One tile's 6x6 input pixels of 8 channels, `block + rows[r] + columns[c]` (zeros where
/// either is [`OUTSIDE`]), transformed (`Bᵀ d B`) into the 36 vectors at `v + p * v_stride`.
///
/// # Safety
/// The CPU has AVX2 and FMA; each pixel not outside has 8 readable floats; `v + p * v_stride`
/// has 8 writable floats for every `p < 36`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_input(block: *const f32, rows: &[usize; SPAN], columns: &[usize; SPAN], v: *mut f32, v_stride: usize) {
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        // `Bᵀ d`, a column at a time.
        let mut partial = [[_mm256_setzero_ps(); SPAN]; SPAN];
        for (c, &column) in columns.iter().enumerate() {
            let d: [__m256; SPAN] =
                std::array::from_fn(
                    |r| {
                        if rows[r] == OUTSIDE || column == OUTSIDE { _mm256_setzero_ps() } else { _mm256_loadu_ps(block.add(rows[r] + column)) }
                    },
                );
            for (u, value) in input_1d(d).into_iter().enumerate() {
                partial[u][c] = value;
            }
        }
        // Then `(Bᵀ d) B`, a row at a time.
        for (u, row) in partial.into_iter().enumerate() {
            for (q, value) in input_1d(row).into_iter().enumerate() {
                _mm256_storeu_ps(v.add((u * SPAN + q) * v_stride), value);
            }
        }
    }
}

/// `M = V U` for `tiles` (1 to 6) rows of `V` (`v`, `k` floats each, one after another) and a
/// panel of `U` (`k x width`, `width` 8 or 16), into `tiles` rows of `M` (`m`, rows `m_row`
/// apart, `width` floats each).
///
/// # Safety
/// The CPU has AVX2 and FMA; the rows and the panel are readable and `M`'s rows writable.
#[cfg(target_arch = "x86_64")]
unsafe fn products(tiles: usize, width: usize, v: *const f32, k: usize, u: *const f32, m: *mut f32, m_row: usize) {
    macro_rules! tiles {
        ($nv:literal) => {
            match tiles {
                1 => product_tile::<1, $nv>,
                2 => product_tile::<2, $nv>,
                3 => product_tile::<3, $nv>,
                4 => product_tile::<4, $nv>,
                5 => product_tile::<5, $nv>,
                6 => product_tile::<6, $nv>,
                _ => unreachable!("1 to {GROUP} tiles a group"),
            }
        };
    }
    let kernel = match width {
        16 => tiles!(2),
        8 => tiles!(1),
        _ => unreachable!("panels of 8 or 16 channels"),
    };
    // SAFETY: the caller's contract.
    unsafe { kernel(v, u, k, m, m_row) }
}

/// [`products`] for `P` tiles and `NV` registers of output channels.
///
/// # Safety
/// As for [`products`], with `tiles == P` and `width == 8 NV`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn product_tile<const P: usize, const NV: usize>(v: *const f32, u: *const f32, k: usize, m: *mut f32, m_row: usize) {
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        let mut sums = [[_mm256_setzero_ps(); NV]; P];
        let rows: [*const f32; P] = std::array::from_fn(|j| v.add(j * k));
        for c in 0..k {
            let weights: [__m256; NV] = std::array::from_fn(|q| _mm256_loadu_ps(u.add((c * NV + q) * 8)));
            for (sums, &row) in sums.iter_mut().zip(&rows) {
                let x = _mm256_broadcast_ss(&*row.add(c));
                for (sum, &weight) in sums.iter_mut().zip(&weights) {
                    *sum = _mm256_fmadd_ps(x, weight, *sum);
                }
            }
        }
        for (j, sums) in sums.iter().enumerate() {
            for (q, &sum) in sums.iter().enumerate() {
                _mm256_storeu_ps(m.add(j * m_row + q * 8), sum);
            }
        }
    }
}

/// One tile's products of 8 output channels (`m + p * m_stride`, 36 vectors) transformed
/// (`Aᵀ M A`) into its 16 pixels, plus `bias`, through SiLU when `silu`, plus the residual's
/// floats at the same place; the pixels inside the output stored at `out + place.at + a *
/// place.row + 8 b`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `m + p * m_stride` has 8 readable floats for every `p < 36`;
/// `bias` holds 8 floats; `out` (and the residual) have 8 floats at each place of a pixel
/// inside the output, which no other thread accesses.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transform_output(m: *const f32, m_stride: usize, bias: &[f32], silu: bool, place: &TilePlace, out: *mut f32, residual: Option<*const f32>) {
    use super::super::simd::{Avx2, Lanes};
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        // `Aᵀ M`, a column at a time.
        let columns: [[__m256; TILE]; SPAN] = std::array::from_fn(|q| output_1d(std::array::from_fn(|u| _mm256_loadu_ps(m.add((u * SPAN + q) * m_stride)))));
        let partial: [[__m256; SPAN]; TILE] = std::array::from_fn(|a| std::array::from_fn(|q| columns[q][a]));
        let bias = Avx2(_mm256_loadu_ps(bias.as_ptr()));
        for (a, row) in partial.into_iter().take(place.rows).enumerate() {
            let pixels = output_1d(row).map(|p| Avx2(_mm256_add_ps(p, bias.0)));
            let pixels = if silu { Avx2::silu_each(pixels) } else { pixels };
            for (b, pixel) in pixels.into_iter().take(place.columns).enumerate() {
                let at = place.at + a * place.row + b * BLOCK;
                let pixel = match residual {
                    Some(residual) => _mm256_add_ps(pixel.0, _mm256_loadu_ps(residual.add(at))),
                    None => pixel.0,
                };
                _mm256_storeu_ps(out.add(at), pixel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_share_the_tiles_evenly_and_none_is_empty() {
        for threads in [1, 2, 3, 16] {
            for tiles in [0, 1, 5, 25, 100, 400, 10_000] {
                let per_task = tiles_per_task(tiles, threads);
                assert!(per_task >= 1 && per_task <= MOST_TILES_PER_TASK.max(1), "{tiles} tiles on {threads} threads: {per_task}");
                let tasks = tiles.div_ceil(per_task);
                // Every task but the last is full, and the last is not empty.
                assert!(
                    tasks * per_task >= tiles && (tasks == 0 || (tasks - 1) * per_task < tiles),
                    "{tiles} tiles on {threads} threads: {tasks} x {per_task}"
                );
            }
        }
        // 20x20 (25 tiles) on two threads: two tasks, 13 and 12 tiles; 80x80 (400): 18 of 23.
        assert_eq!(tiles_per_task(25, 2), 13);
        assert_eq!(tiles_per_task(400, 2), 23);
    }
}
