//! The AVX-512F microkernel (8x32 tiles), the packing routines compiled for AVX-512F, and the
//! [`Lanes`] the element-wise kernels are written in.

use std::arch::x86_64::*;
use std::sync::atomic::{AtomicBool, Ordering};

use super::super::epilogue::{TileEpilogue, finish_each};
use super::super::pack::{self, PackedB};
use super::super::simd::Lanes;

/// AVX-512F lanes.
#[derive(Clone, Copy)]
pub(in super::super) struct Avx512(pub(in super::super) __m512);

/// Whether [`Lanes::ratio_each`] divides, rather than multiplying by the refined reciprocal:
/// on AMD's cores, not on Intel's ([`choose_division`] sets it when the kernels are chosen;
/// until then the reciprocal, right on every CPU). A SiLU is some eleven instructions on the
/// multiply-add units and a quotient. On an AMD EPYC of the Zen 4 family, a 512-bit division
/// runs in the divider beside them, where the reciprocal, its refinement and the product are
/// three more on those units: at 2 threads, interleaved rounds, YOLOv12n's calls took
/// 0.977-0.989 of their time with the division (many of its pointwise layers 0.90-0.95) and
/// YOLO11n's 0.979; at 1 thread the two came out level (0.996-1.007). Intel's cores (Skylake
/// to Ice Lake) take some 10 cycles a vector for it on a port the multiply-adds need.
static DIVIDES: AtomicBool = AtomicBool::new(false);

/// Sets [`DIVIDES`] for this CPU, or as `STREAMDET_AVX512_DIVISION=on` or `=off` says (to
/// compare the two on one machine).
pub(in super::super) fn choose_division() {
    let divides = match std::env::var("STREAMDET_AVX512_DIVISION").as_deref() {
        Ok("on") => true,
        Ok("off") => false,
        _ => {
            // CPUID leaf 0: the vendor's name in EBX, EDX, ECX.
            let leaf = __cpuid(0);
            [leaf.ebx, leaf.edx, leaf.ecx] == [u32::from_le_bytes(*b"Auth"), u32::from_le_bytes(*b"enti"), u32::from_le_bytes(*b"cAMD")]
        }
    };
    DIVIDES.store(divides, Ordering::Relaxed);
}

// SAFETY: 16 lanes, one `__m512`; `load` and `store` are unaligned moves of 16 floats and the
// other methods work on registers only, all with AVX-512F instructions.
unsafe impl Lanes for Avx512 {
    const LEN: usize = 16;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract (AVX-512F, 16 readable floats).
        Avx512(unsafe { _mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract (AVX-512F, 16 writable floats).
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_set1_ps(v) })
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_add_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_sub_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_mul_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn div(self, d: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_div_ps(self.0, d.0) })
    }
    #[inline(always)]
    fn divides() -> bool {
        DIVIDES.load(Ordering::Relaxed)
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_max_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_min_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn mul_sub(self, b: Self, c: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_fmsub_ps(self.0, b.0, c.0) })
    }
    /// `vscalefps`: one instruction, exact for any integral `k` (it saturates to zero or
    /// infinity where the result leaves the range of `f32`).
    #[inline(always)]
    unsafe fn mul_pow2(self, k: Self, _shifted: Self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_scalef_ps(self.0, k.0) })
    }
    #[inline(always)]
    unsafe fn recip(self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe {
            let r = _mm512_rcp14_ps(self.0);
            // r * (2 - x * r)
            _mm512_mul_ps(r, _mm512_fnmadd_ps(self.0, r, _mm512_set1_ps(2.0)))
        })
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        // SAFETY: AVX-512F (the caller's contract).
        unsafe { _mm512_reduce_max_ps(self.0) }
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        // SAFETY: AVX-512F (the caller's contract).
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
    #[inline(always)]
    unsafe fn interleave4(v: [Self; 4]) -> [Self; 4] {
        // SAFETY: AVX-512F (the caller's contract).
        unsafe {
            let [a, b, c, d] = [v[0].0, v[1].0, v[2].0, v[3].0];
            // Within each 128-bit block k: pairs, then quads, so that `quads[j]` holds the four
            // values of lane 4k + j.
            let (ab_low, ab_high) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let (cd_low, cd_high) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            // (Written out: a closure here would not inherit the caller's target features.)
            let (low, high) = (_mm512_castps_pd(ab_low), _mm512_castps_pd(ab_high));
            let (low2, high2) = (_mm512_castps_pd(cd_low), _mm512_castps_pd(cd_high));
            let quads = [
                _mm512_castpd_ps(_mm512_unpacklo_pd(low, low2)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(low, low2)),
                _mm512_castpd_ps(_mm512_unpacklo_pd(high, high2)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(high, high2)),
            ];
            // Then the 4x4 matrix of 128-bit blocks transposed: result r holds block r of
            // quads 0..4, which are lanes 4r..4r + 4.
            let low = _mm512_shuffle_f32x4::<0b01_00_01_00>(quads[0], quads[1]);
            let high = _mm512_shuffle_f32x4::<0b11_10_11_10>(quads[0], quads[1]);
            let low2 = _mm512_shuffle_f32x4::<0b01_00_01_00>(quads[2], quads[3]);
            let high2 = _mm512_shuffle_f32x4::<0b11_10_11_10>(quads[2], quads[3]);
            [
                Avx512(_mm512_shuffle_f32x4::<0b10_00_10_00>(low, low2)),
                Avx512(_mm512_shuffle_f32x4::<0b11_01_11_01>(low, low2)),
                Avx512(_mm512_shuffle_f32x4::<0b10_00_10_00>(high, high2)),
                Avx512(_mm512_shuffle_f32x4::<0b11_01_11_01>(high, high2)),
            ]
        }
    }
}

/// The AVX-512 microkernel: 16 accumulators (8 rows of two 16-float registers); each `A`
/// element is a broadcast operand of the multiply-add, so `B` needs only two registers.
///
/// # Safety
/// As for [`kernel`](super::super::isa::kernel), with `mr = 8`, `nr = 32`.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn kernel_8x32(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    epilogue: Option<&TileEpilogue>,
) {
    const MR: usize = 8;
    // SAFETY: every pointer access below stays within the bounds stated in the contract; `b`
    // is 64-byte aligned, so each row of the panel is two aligned loads.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(r * ldc));
                row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
            }
        }
        for kk in 0..kc {
            let b0 = _mm512_load_ps(b.add(kk * 32));
            let b1 = _mm512_load_ps(b.add(kk * 32 + 16));
            let ak = a.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ak.add(r));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        if let Some(e) = epilogue {
            // The tile's registers side by side through the bias and SiLU.
            let mut flat = [Avx512(_mm512_setzero_ps()); 2 * MR];
            let mut bias = flat;
            for (r, row) in acc.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    flat[2 * r + j] = Avx512(v);
                    bias[2 * r + j] = Avx512::splat(e.bias[r]);
                }
            }
            let flat = finish_each(flat, bias, e.silu);
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = flat[2 * r + j].0;
                    if let Some((p, ld)) = e.residual {
                        *v = _mm512_add_ps(*v, _mm512_loadu_ps(p.add(r * ld + j * 16)));
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), row[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
        }
    }
}

/// [`pack::pack_b_panels`] compiled for AVX-512F: a 32-column panel row is two vector moves.
///
/// # Safety
/// As for [`pack_b_rows`](super::super::pack::pack_b_rows); the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn pack_b(row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    // SAFETY: the caller's contract.
    unsafe { pack::pack_b_panels::<32>(row, k, width, out) }
}

/// [`pack::gather_rows_of`] for 32-float rows, each two AVX-512 moves.
///
/// # Safety
/// As for [`gather_rows`](super::super::isa::gather_rows); the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn gather_rows(src: *const f32, offsets: &[usize], dst: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { pack::gather_rows_of::<32>(src, offsets, dst) }
}

/// One tile of a pixel-major convolution: `P <= 16` consecutive output pixels times `16 NV`
/// output channels (`NV` registers per pixel: 16 x 16 tiles for narrow layers, 10 or 12 x 32
/// for the others). Each input value is a broadcast operand, read where it lies: tap `kk` of
/// pixel `j` is `taps[kk][at + j * SX]` (`SX` is the convolution's stride along rows when it
/// reads its input in place, 1 otherwise). Each accumulator holds 16 channels of one pixel, so
/// the weights (`[kk][16 NV]`) are `NV` aligned loads per tap, and each value read feeds `NV`
/// multiply-adds. The finished tile gets `bias` (`16 NV` channels) and SiLU when asked, is
/// transposed into rows of pixels, gets the residual's rows (`residual.0`, `residual.1`
/// apart) and is stored as the first `channels` rows of `out`, `ldo` apart.
///
/// With `AHEAD > 0`, the tile fetches tap `kk + AHEAD`'s first pixel into L1 as it runs tap
/// `kk` (for taps that each read another row, as a pointwise layer's do).
///
/// A product may run in blocks of taps (the pixel tiles run AVX-512's whole, AVX2's long ones
/// in blocks; the micro-benchmark stores its sums unfinished): the sums start from `sums_in`
/// when it is not null, and when `sums_out` is not null they are stored there (`[P][16 NV]`
/// floats) instead of being finished.
///
/// # Safety
/// The CPU has AVX-512F. `taps[kk] + at + j * SX` is a readable float of the allocation
/// `taps[kk]` points into (or past) for every `kk < taps.len()` and `j < P`; `weights` is
/// 64-byte aligned and holds `taps.len() * 16 NV` floats; `bias` holds `16 NV`;
/// `channels <= 16 NV`; `out` and the residual hold `channels` rows of `P` floats;
/// `sums_in` and `sums_out` are null or hold `16 P NV` floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(in super::super) unsafe fn conv_tile<const P: usize, const NV: usize, const SX: usize, const AHEAD: usize>(
    taps: &[*const f32],
    at: usize,
    weights: *const f32,
    bias: *const f32,
    silu: bool,
    out: *mut f32,
    ldo: usize,
    residual: Option<(*const f32, usize)>,
    channels: usize,
    sums_in: *const f32,
    sums_out: *mut f32,
) {
    const { assert!(P <= 16 && NV > 0) };
    // SAFETY: every access stays within the bounds of the contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; P];
        if !sums_in.is_null() {
            for (j, a) in acc.iter_mut().enumerate() {
                for (v, a) in a.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(sums_in.add((j * NV + v) * 16));
                }
            }
        }
        for (kk, &tap) in taps.iter().enumerate() {
            let mut w = [_mm512_setzero_ps(); NV];
            for (v, w) in w.iter_mut().enumerate() {
                *w = _mm512_load_ps(weights.add((kk * NV + v) * 16));
            }
            let p = tap.wrapping_add(at);
            if AHEAD > 0
                && let Some(&ahead) = taps.get(kk + AHEAD)
            {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(at).cast::<i8>());
            }
            if SX <= 2 {
                // The next tiles of a run read on along the same rows: fetch this row two
                // tiles ahead. A pointwise layer's tile reads one row from each of its input
                // planes, more streams than the hardware prefetcher follows: 256 -> 32
                // channels at 80x80 went from 0.82 to 0.58 ms in YOLOv12n (2 threads, a
                // Xeon); 3x3 layers on phase planes did not change. A 3x3 layer that reads
                // its input in place with stride 2 (three rows of every input channel) gained
                // on an AMD EPYC (Zen 4; YOLO11n and YOLOv12n, interleaved rounds against the
                // build without): 16 -> 32 channels from 320x320 0.84-0.95 of its time, 64 ->
                // 64 from 160x160 0.94-0.96, at 1 and 2 threads; on a Xeon (Sapphire Rapids)
                // such layers had got slower with a fetch ahead, not measured there since in
                // this form. The AVX2 tile, at most 8 pixels wide, got slower with it.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(2 * P * SX).cast::<i8>());
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*p.wrapping_add(j * SX));
                for (a, &w) in a.iter_mut().zip(&w) {
                    *a = _mm512_fmadd_ps(x, w, *a);
                }
            }
        }
        if !sums_out.is_null() {
            for (j, a) in acc.iter().enumerate() {
                for (v, &a) in a.iter().enumerate() {
                    _mm512_storeu_ps(sums_out.add((j * NV + v) * 16), a);
                }
            }
            return;
        }
        let lanes: __mmask16 = ((1u32 << P) - 1) as __mmask16;
        // The sums by register of channels, copied out in fully unrolled loops: read as
        // `acc[j][v]` in the loop over `v` below (which the compiler keeps rolled), `acc`
        // itself stayed in memory, zeroed by a call to `memset` before every tile.
        let mut columns = [[Avx512(_mm512_setzero_ps()); P]; NV];
        for (j, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                columns[v][j] = Avx512(a);
            }
        }
        for (v, rows) in columns.into_iter().enumerate() {
            let bias = Avx512(_mm512_loadu_ps(bias.add(16 * v)));
            let rows = finish_each(rows, [bias; P], silu);
            let mut block = [_mm512_setzero_ps(); 16];
            for (b, row) in block.iter_mut().zip(&rows) {
                *b = row.0;
            }
            for (c, &row) in transpose_16x16(block).iter().enumerate().take(channels.saturating_sub(16 * v).min(16)) {
                let channel = 16 * v + c;
                let row = match residual {
                    Some((r, ld)) => _mm512_add_ps(row, _mm512_maskz_loadu_ps(lanes, r.add(channel * ld))),
                    None => row,
                };
                _mm512_mask_storeu_ps(out.add(channel * ldo), lanes, row);
            }
        }
    }
}

/// Blocks of four output channels a [`pointwise_rows`] tile computes, at most.
const MAX_ROW_BLOCKS: usize = 3;

/// Pixels a [`pointwise_rows`] tile computes: two registers.
pub(in super::super) const ROW_TILE: usize = 32;

/// One tile of a pointwise convolution with pixels in the lanes: `M` output channels (a
/// multiple of 4) times `lanes <= 32` consecutive pixels of the plane. Input channel `kk`'s
/// pixels are two loads from `taps[kk] + at` (masked to `lanes`), and its weight for output
/// channel `i` is a broadcast of `weights[kk * tap_floats + i]`, so every sum holds 16 pixels
/// of one output channel and the finished tile is stored as it is, row by row: no transpose,
/// and whole lines of each channel's plane, where [`conv_tile`] (channels in the lanes)
/// transposes its sums and stores 10-12 pixels of each of 32 channels. The first `rows`
/// channels get `bias`, SiLU when asked, the residual's rows (`residual.0`, `residual.1`
/// apart) and are stored `ldo` apart from `out`.
///
/// # Safety
/// The CPU has AVX-512F. `taps[kk] + at + j` is a readable float for every `kk` and `j <
/// lanes`; `weights` holds `taps.len()` rows of `tap_floats >= M` floats; `bias` holds `rows`
/// floats, `rows <= M`; `out` (and the residual) hold `rows` rows of `lanes` floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(in super::super) unsafe fn pointwise_rows<const M: usize>(
    taps: &[*const f32],
    at: usize,
    lanes: usize,
    weights: *const f32,
    tap_floats: usize,
    bias: *const f32,
    silu: bool,
    out: *mut f32,
    ldo: usize,
    residual: Option<(*const f32, usize)>,
    rows: usize,
) {
    const { assert!(M.is_multiple_of(4) && M <= 4 * MAX_ROW_BLOCKS) };
    let mask = |n: usize| ((1u32 << n.min(16)) - 1) as __mmask16;
    let masks = [mask(lanes), mask(lanes.saturating_sub(16))];
    // SAFETY: every access stays within the bounds of the contract; masked lanes are neither
    // read nor written.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for (kk, &tap) in taps.iter().enumerate() {
            let p = tap.wrapping_add(at);
            // The next tiles of the run read on along the same planes, one plane per input
            // channel: more streams than the hardware prefetcher follows.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(2 * ROW_TILE).cast::<i8>());
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(2 * ROW_TILE + 16).cast::<i8>());
            let x = [_mm512_maskz_loadu_ps(masks[0], p), _mm512_maskz_loadu_ps(masks[1], p.wrapping_add(16))];
            let w = weights.add(kk * tap_floats);
            for (i, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*w.add(i));
                a[0] = _mm512_fmadd_ps(w, x[0], a[0]);
                a[1] = _mm512_fmadd_ps(w, x[1], a[1]);
            }
        }
        // Four channels (eight registers) at a time, so that eight SiLU chains run side by side.
        // The sums are first copied into those blocks in a fully unrolled loop: read as
        // `acc[first + r]` in the loop over blocks (which the compiler keeps rolled), `acc`
        // itself stayed in memory, zeroed by a call to `memset` before every tile.
        let mut blocks = [[Avx512(_mm512_setzero_ps()); 8]; MAX_ROW_BLOCKS];
        for (channel, a) in acc.iter().enumerate() {
            blocks[channel / 4][2 * (channel % 4)] = Avx512(a[0]);
            blocks[channel / 4][2 * (channel % 4) + 1] = Avx512(a[1]);
        }
        for (index, block) in blocks.into_iter().enumerate().take(M / 4) {
            let first = 4 * index;
            if first >= rows {
                break;
            }
            let biases = std::array::from_fn(|i| {
                let channel = first + i / 2;
                Avx512(_mm512_set1_ps(if channel < rows { *bias.add(channel) } else { 0.0 }))
            });
            let block = finish_each(block, biases, silu);
            for r in 0..4.min(rows - first) {
                let channel = first + r;
                for (half, &m) in masks.iter().enumerate() {
                    let v = match residual {
                        Some((res, ld)) => _mm512_add_ps(block[2 * r + half].0, _mm512_maskz_loadu_ps(m, res.wrapping_add(channel * ld + 16 * half))),
                        None => block[2 * r + half].0,
                    };
                    _mm512_mask_storeu_ps(out.wrapping_add(channel * ldo + 16 * half), m, v);
                }
                // The lines this channel's row stores two tiles on, fetched ahead. The stores go
                // to a line of every output plane, more streams than the hardware fetches ahead
                // of, and a store to a line not in the cache waits for it to be read: on an AMD
                // EPYC (Zen 4), the stores took some 45 % of this kernel's samples (32 -> 32
                // channels at 160x160). YOLO11n, 2 threads, interleaved rounds against the build
                // without: 48 -> 64 channels at 160x160 0.65-0.95 of its time, 32 -> 32 at
                // 160x160 0.83-0.88, 96 -> 128 at 80x80 0.85-0.97; 0.80-0.88 at 1 thread. The
                // same fetch after the stores of [`conv_tile`], whose tiles store a part of a
                // line per row, left its layers level.
                _mm_prefetch::<_MM_HINT_T0>(out.wrapping_add(channel * ldo + 2 * ROW_TILE).cast::<i8>());
                _mm_prefetch::<_MM_HINT_T0>(out.wrapping_add(channel * ldo + 2 * ROW_TILE + 16).cast::<i8>());
            }
        }
    }
}

/// Deinterleaves one channel's plane (`src`, rows of `w` floats) by 4 along rows and columns
/// into its 16 phase planes (`dst`, `plane` floats apart, rows of `wp` places): pixel `(y, x)`
/// goes to phase `((y + pt) % 4, (x + pl) % 4)`, row `(y + pt) / 4`, place `(x + pl) / 4`.
/// Each phase row that holds pixels is written whole, zeros in its padding places. 64 columns
/// at a time, read where they lie (masked at the rows' ends): two permutes gather phases 0 and
/// 1 (2 and 3) of 32 columns into the halves of a register, and a 128-bit shuffle joins two
/// such halves. Reading the rows in place rather than from zero-padded copies: the copies'
/// stores were still in flight when the vector loads that straddle them read them back, which
/// the CPU cannot forward (a fifth of the splitter's samples on the first load). The loop runs
/// down the rows for each stretch of 16 places, so that the masks are worked out once per
/// stretch: on Winograd's short rows (20 to 80 pixels) the work of each row is a few vector
/// moves, and working out its places and masks again took as long.
/// Panics unless `src` is whole rows, each row's pixels fall inside its phase rows, and every
/// phase row lies inside `dst`.
#[target_feature(enable = "avx512f")]
pub(in super::super) fn split_plane_by_4(src: &[f32], (w, pt, pl): (usize, usize, usize), dst: &mut [std::mem::MaybeUninit<f32>], (plane, wp): (usize, usize)) {
    super::phase_rows_by_4(src.len(), (w, pt, pl), dst.len(), (plane, wp));
    let phases_01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    let phases_23 = _mm512_add_epi32(phases_01, _mm512_set1_epi32(2));
    let width = w as isize;
    // The lanes of 16 columns from `start` (which may lie before the row or past its end) that
    // lie inside the row.
    let inside = |start: isize| {
        let (from, to) = ((-start).clamp(0, 16) as u32, (width - start).clamp(0, 16) as u32);
        if to > from { (((1u32 << to) - 1) & !((1u32 << from) - 1)) as __mmask16 } else { 0 }
    };
    let out = dst.as_mut_ptr().cast::<f32>();
    for first in (0..wp).step_by(16) {
        let columns = (4 * first) as isize - pl as isize;
        let loads: [__mmask16; 4] = std::array::from_fn(|i| inside(columns + 16 * i as isize));
        let stores = ((1u32 << (wp - first).min(16)) - 1) as __mmask16;
        for (y, row) in src.chunks_exact(w).enumerate() {
            let (py, y2) = ((y + pt) % 4, (y + pt) / 4);
            // SAFETY: the lanes loaded are columns of `row` (`loads`); masked lanes are not
            // read, so the pointer may lie outside it (it is only formed, with wrapping
            // arithmetic).
            let [a, b, c, d] = std::array::from_fn(|i| unsafe { _mm512_maskz_loadu_ps(loads[i], row.as_ptr().wrapping_offset(columns + 16 * i as isize)) });
            let (ab_01, cd_01) = (_mm512_permutex2var_ps(a, phases_01, b), _mm512_permutex2var_ps(c, phases_01, d));
            let (ab_23, cd_23) = (_mm512_permutex2var_ps(a, phases_23, b), _mm512_permutex2var_ps(c, phases_23, d));
            let phases = [
                _mm512_shuffle_f32x4::<0x44>(ab_01, cd_01),
                _mm512_shuffle_f32x4::<0xEE>(ab_01, cd_01),
                _mm512_shuffle_f32x4::<0x44>(ab_23, cd_23),
                _mm512_shuffle_f32x4::<0xEE>(ab_23, cd_23),
            ];
            let at = py * 4 * plane + y2 * wp + first;
            for (px, phase) in phases.into_iter().enumerate() {
                // SAFETY: places `first ..` (the lanes of `stores`, at most `wp - first`) of
                // row `y2` of phase `4 py + px`, inside `dst` (`phase_rows_by_4` checked it).
                unsafe { _mm512_mask_storeu_ps(out.add(at + px * plane), stores, phase) };
            }
        }
    }
}

/// The transpose of a 16x16 block: row `i` of the result holds element `i` of every input row.
/// Pairs, then quads within each 128-bit block; then the 128-bit blocks across registers.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose_16x16(r: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // `u[4 g + c]`: in 128-bit block `b`, element `4 b + c` of rows `4 g .. 4 g + 4`.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let t = &t[4 * g..4 * g + 4];
        u[4 * g] = _mm512_shuffle_ps::<0x44>(t[0], t[2]);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[0], t[2]);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[1], t[3]);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[1], t[3]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let low = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
        let high = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
        let low2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
        let high2 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(low, low2);
        out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(low, low2);
        out[8 + c] = _mm512_shuffle_f32x4::<0x88>(high, high2);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(high, high2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_of_dividing_give_the_quotient() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // Numerators and denominators over the range a SiLU divides (`x / (1 + e^-x)`).
        let values: Vec<f32> = (0..1600).map(|i| (i as f32 - 800.0) * 0.11).collect();
        for (i, chunk) in values.chunks_exact(16).enumerate() {
            let denominators: Vec<f32> = chunk.iter().map(|x| 1.0 + (-x.clamp(-88.0, 87.0)).exp()).collect();
            let (mut divided, mut by_reciprocal) = ([0f32; 16], [0f32; 16]);
            // SAFETY: the CPU has AVX-512F (checked above); every pointer is to 16 floats.
            unsafe {
                let (x, d) = (Avx512::load(chunk.as_ptr()), Avx512::load(denominators.as_ptr()));
                x.div(d).store(divided.as_mut_ptr());
                x.mul(d.recip()).store(by_reciprocal.as_mut_ptr());
            }
            for j in 0..16 {
                let want = chunk[j] as f64 / denominators[j] as f64;
                let tolerance = 1e-6 * want.abs() + f64::from(f32::MIN_POSITIVE);
                assert!((divided[j] as f64 - want).abs() <= tolerance, "chunk {i}: {} / {}", chunk[j], denominators[j]);
                assert!((by_reciprocal[j] as f64 - want).abs() <= tolerance, "chunk {i}: {} / {} by the reciprocal", chunk[j], denominators[j]);
            }
        }
    }

    #[test]
    fn transposes_a_16x16_block() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut got = [0f32; 256];
        // SAFETY: the CPU has AVX-512F (checked above); `m` and `got` hold 256 floats.
        unsafe {
            let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            for (i, row) in transpose_16x16(rows).iter().enumerate() {
                _mm512_storeu_ps(got.as_mut_ptr().add(16 * i), *row);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * i + j], m[16 * j + i], "({i}, {j})");
            }
        }
    }
}
