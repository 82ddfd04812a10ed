//! The AVX2+FMA microkernel (6x16 tiles, and tiles of fewer rows), the packing routines
//! compiled for AVX2, and the [`Lanes`] the element-wise kernels are written in.

use std::arch::x86_64::*;

use super::super::epilogue::{TileEpilogue, finish_each};
use super::super::pack::{self, PackedB};
use super::super::simd::Lanes;

/// AVX2+FMA lanes.
#[derive(Clone, Copy)]
pub(in super::super) struct Avx2(pub(in super::super) __m256);

// SAFETY: 8 lanes, one `__m256`; `load` and `store` are unaligned moves of 8 floats and the
// other methods work on registers only, all with AVX, AVX2 and FMA instructions.
unsafe impl Lanes for Avx2 {
    const LEN: usize = 8;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's contract (AVX, 8 readable floats).
        Avx2(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's contract (AVX, 8 writable floats).
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_set1_ps(v) })
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_add_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_sub_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_mul_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn div(self, d: Self) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_div_ps(self.0, d.0) })
    }
    #[inline(always)]
    fn divides() -> bool {
        true
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_max_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_min_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: FMA (the caller's contract).
        Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn mul_sub(self, b: Self, c: Self) -> Self {
        // SAFETY: FMA (the caller's contract).
        Avx2(unsafe { _mm256_fmsub_ps(self.0, b.0, c.0) })
    }
    /// `k` added to the exponent field, which is `self * 2^k` while the result is normal (the
    /// trait's contract).
    #[inline(always)]
    unsafe fn mul_pow2(self, _k: Self, shifted: Self) -> Self {
        // `k` from the low bits of `shifted`, moved into the exponent field (the bits above
        // them shift out): one instruction less than converting `k` to integers first.
        // SAFETY: AVX2 (the caller's contract).
        Avx2(unsafe {
            let exponent = _mm256_slli_epi32::<23>(_mm256_castps_si256(shifted.0));
            _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(self.0), exponent))
        })
    }
    #[inline(always)]
    unsafe fn recip(self) -> Self {
        // SAFETY: AVX and FMA (the caller's contract).
        Avx2(unsafe {
            let r = _mm256_rcp_ps(self.0);
            _mm256_mul_ps(r, _mm256_fnmadd_ps(self.0, r, _mm256_set1_ps(2.0)))
        })
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        // SAFETY: AVX (the caller's contract).
        unsafe {
            let m = _mm_max_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
            _mm_cvtss_f32(m)
        }
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        // SAFETY: AVX (the caller's contract).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn interleave4(v: [Self; 4]) -> [Self; 4] {
        // SAFETY: AVX (the caller's contract).
        unsafe {
            let [a, b, c, d] = [v[0].0, v[1].0, v[2].0, v[3].0];
            // Within each 128-bit half k: pairs, then quads, so that `quads[j]` holds the four
            // values of lane 4k + j.
            let (ab_low, ab_high) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let (cd_low, cd_high) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
            // (Written out: a closure here would not inherit the caller's target features.)
            let (low, high) = (_mm256_castps_pd(ab_low), _mm256_castps_pd(ab_high));
            let (low2, high2) = (_mm256_castps_pd(cd_low), _mm256_castps_pd(cd_high));
            let quads = [
                _mm256_castpd_ps(_mm256_unpacklo_pd(low, low2)),
                _mm256_castpd_ps(_mm256_unpackhi_pd(low, low2)),
                _mm256_castpd_ps(_mm256_unpacklo_pd(high, high2)),
                _mm256_castpd_ps(_mm256_unpackhi_pd(high, high2)),
            ];
            // Lanes 0..4 are the low halves of quads 0 and 1, lanes 4..8 their high halves.
            [
                Avx2(_mm256_permute2f128_ps::<0x20>(quads[0], quads[1])),
                Avx2(_mm256_permute2f128_ps::<0x20>(quads[2], quads[3])),
                Avx2(_mm256_permute2f128_ps::<0x31>(quads[0], quads[1])),
                Avx2(_mm256_permute2f128_ps::<0x31>(quads[2], quads[3])),
            ]
        }
    }
}

/// The AVX2 microkernel on the first `R <= 6` rows of a 6-row `A` panel: two 8-float registers
/// of sums per row, 12 for a whole tile. A tile of fewer rows (the last of a product whose rows
/// are not a multiple of 6) computes only its own rather than 6 into a buffer: with fewer than
/// 8 sums the multiply-adds would wait on each other (4 cycles each, two at a time), so such a
/// tile keeps `SETS` sets of sums, consecutive taps going to different sets, added at the end.
/// On the AMD EPYC (Zen 4) with the kernels capped at AVX2, one thread: attention's heads (32
/// channels, the last tile 2 rows) 0.96 of their time (`cargo bench --bench conv`, 6
/// alternating rounds); in YOLOv12n (10 interleaved rounds) Winograd's layers of 16 and 32
/// output channels 0.89-0.95, of 64 0.96, the calls 0.98.
///
/// # Safety
/// As for [`kernel`](super::super::isa::kernel), with `mr = 6`, `nr = 16`: `a` holds `kc * 6`
/// floats; `c` (and the epilogue's residual) `R` rows.
#[target_feature(enable = "avx2,fma")]
pub(in super::super) unsafe fn kernel_x16<const R: usize, const SETS: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    epilogue: Option<&TileEpilogue>,
) {
    const MR: usize = 6;
    const { assert!(R >= 1 && R <= MR && SETS >= 1) };
    // SAFETY: every pointer access below stays within the bounds stated in the contract.
    unsafe {
        let mut sets = [[[_mm256_setzero_ps(); 2]; R]; SETS];
        if accumulate {
            for (r, row) in sets[0].iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(c.add(r * ldc));
                row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
        }
        let whole = kc - kc % SETS;
        for kk in (0..whole).step_by(SETS) {
            for (s, acc) in sets.iter_mut().enumerate() {
                tap(acc, a.add((kk + s) * MR), b.add((kk + s) * 16));
            }
        }
        for kk in whole..kc {
            tap(&mut sets[0], a.add(kk * MR), b.add(kk * 16));
        }
        let (first, rest) = sets.split_at_mut(1);
        let acc = &mut first[0];
        for set in rest.iter() {
            for (row, other) in acc.iter_mut().zip(set) {
                row[0] = _mm256_add_ps(row[0], other[0]);
                row[1] = _mm256_add_ps(row[1], other[1]);
            }
        }
        if let Some(e) = epilogue {
            // The tile's registers side by side through the bias and SiLU (a tile of fewer
            // rows leaves the rest of `flat` zero).
            let mut flat = [Avx2(_mm256_setzero_ps()); 2 * MR];
            let mut bias = flat;
            for (r, row) in acc.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    flat[2 * r + j] = Avx2(v);
                    bias[2 * r + j] = Avx2::splat(e.bias[r]);
                }
            }
            let flat = finish_each(flat, bias, e.silu);
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = flat[2 * r + j].0;
                    if let Some((p, ld)) = e.residual {
                        *v = _mm256_add_ps(*v, _mm256_loadu_ps(p.add(r * ld + j * 8)));
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), row[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
        }
    }
}

/// One tap of [`kernel_x16`]: `acc[r] += a[r] * b[0..16]` for each of its rows.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` holds `R` floats and `b` 16.
#[inline(always)]
unsafe fn tap<const R: usize>(acc: &mut [[__m256; 2]; R], a: *const f32, b: *const f32) {
    // SAFETY: the caller's contract.
    unsafe {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r));
            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
        }
    }
}

/// [`pack::pack_b_panels`] compiled for AVX2, whose 16-column panels then copy as two vector moves.
///
/// # Safety
/// As for [`pack_b_rows`](super::super::pack::pack_b_rows); the CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(in super::super) unsafe fn pack_b(row: &dyn Fn(usize) -> *const f32, k: usize, width: usize, out: &mut PackedB) {
    // SAFETY: the caller's contract.
    unsafe { pack::pack_b_panels::<16>(row, k, width, out) }
}

/// [`pack::gather_rows_of`] for 16-float rows, each two AVX moves.
///
/// # Safety
/// As for [`gather_rows`](super::super::isa::gather_rows); the CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(in super::super) unsafe fn gather_rows(src: *const f32, offsets: &[usize], dst: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { pack::gather_rows_of::<16>(src, offsets, dst) }
}

/// The AVX2 form of the AVX-512 pixel tile (see there): `P <= 8` consecutive output pixels
/// times `8 NV` output channels (8 x 8 tiles for narrow layers, 5 or 6 x 16 for the others),
/// tap `kk` of pixel `j` at `taps[kk][at + j * SX]`, weights `[kk][8 NV]`, partial sums
/// (`[P][8 NV]`) from `sums_in` and to `sums_out` when they are not null.
///
/// The finished tile goes to `out` as rows of pixels, one per channel, `ldo` apart; or, when
/// `BLOCKED`, as blocks of 8 channels ([`ChannelLayout::Blocked`](super::super::conv::ChannelLayout)):
/// each register of sums is one pixel's 8 channels, stored whole at `out + v * ldo + 8 j`
/// with no transpose (the residual read the same way).
///
/// # Safety
/// The CPU has AVX2 and FMA. `taps[kk] + at + j * SX` is a readable float of the allocation
/// `taps[kk]` points into (or past) for every `kk < taps.len()` and `j < P`; `weights` is
/// 32-byte aligned and holds `taps.len() * 8 NV` floats; `bias` holds `8 NV`;
/// `channels <= 8 NV`; `out` and the residual hold `channels` rows of `P` floats (when
/// `BLOCKED`: `channels` is a multiple of 8, and they hold `channels / 8` blocks of `8 P`
/// floats); `sums_in` and `sums_out` are null or hold `8 P NV` floats.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(in super::super) unsafe fn conv_tile<const P: usize, const NV: usize, const SX: usize, const BLOCKED: bool>(
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
    const { assert!(P <= 8 && NV > 0) };
    // SAFETY: every access stays within the bounds of the contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NV]; P];
        if !sums_in.is_null() {
            for (j, a) in acc.iter_mut().enumerate() {
                for (v, a) in a.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(sums_in.add((j * NV + v) * 8));
                }
            }
        }
        for (kk, &tap) in taps.iter().enumerate() {
            let mut w = [_mm256_setzero_ps(); NV];
            for (v, w) in w.iter_mut().enumerate() {
                *w = _mm256_load_ps(weights.add((kk * NV + v) * 8));
            }
            let p = tap.wrapping_add(at);
            for (j, a) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*p.wrapping_add(j * SX));
                for (a, &w) in a.iter_mut().zip(&w) {
                    *a = _mm256_fmadd_ps(x, w, *a);
                }
            }
        }
        if !sums_out.is_null() {
            for (j, a) in acc.iter().enumerate() {
                for (v, &a) in a.iter().enumerate() {
                    _mm256_storeu_ps(sums_out.add((j * NV + v) * 8), a);
                }
            }
            return;
        }
        // The sums by register of channels, copied out in fully unrolled loops: read as
        // `acc[j][v]` in the loop over `v` below (which the compiler keeps rolled), `acc`
        // itself stayed in memory, zeroed by a call to `memset` before every tile.
        let mut columns = [[Avx2(_mm256_setzero_ps()); P]; NV];
        for (j, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                columns[v][j] = Avx2(a);
            }
        }
        for (v, rows) in columns.into_iter().enumerate() {
            if BLOCKED && 8 * v >= channels {
                break;
            }
            let bias = Avx2(_mm256_loadu_ps(bias.add(8 * v)));
            let rows = finish_each(rows, [bias; P], silu);
            if BLOCKED {
                for (j, row) in rows.iter().enumerate() {
                    let row = match residual {
                        Some((r, ld)) => _mm256_add_ps(row.0, _mm256_loadu_ps(r.add(v * ld + 8 * j))),
                        None => row.0,
                    };
                    _mm256_storeu_ps(out.add(v * ldo + 8 * j), row);
                }
                continue;
            }
            let mut block = [_mm256_setzero_ps(); 8];
            for (b, row) in block.iter_mut().zip(&rows) {
                *b = row.0;
            }
            for (c, &row) in transpose_8x8(block).iter().enumerate().take(channels.saturating_sub(8 * v).min(8)) {
                let channel = 8 * v + c;
                // `P` of the 8 lanes are this row's pixels.
                store_first_lanes(row, out.add(channel * ldo), residual.map(|(r, ld)| r.add(channel * ld)), P);
            }
        }
    }
}

/// The first `count` lanes of `row` (all 8 when `count >= 8`), plus as many floats from
/// `residual` when there is one, stored at `out`, with whole moves of 8, 4, 2 and 1 floats:
/// AVX2's masked stores are slow on AMD's CPUs, and a buffer stored whole, then read back in
/// parts, stalls the parts' loads. (Through such a buffer, the pointwise layers of YOLO11n and
/// YOLOv12n took 1.015-1.017 of their time, the short products at 80x80 and 40x40 1.03-1.07:
/// 2 threads, 30 interleaved rounds.)
///
/// # Safety
/// The CPU has AVX2; `out` (and `residual`) hold `count.min(8)` floats.
#[inline(always)]
pub(super) unsafe fn store_first_lanes(row: __m256, out: *mut f32, residual: Option<*const f32>, count: usize) {
    // SAFETY: the caller's contract: each piece lies inside the `count` floats.
    unsafe {
        if count >= 8 {
            let row = match residual {
                Some(r) => _mm256_add_ps(row, _mm256_loadu_ps(r)),
                None => row,
            };
            return _mm256_storeu_ps(out, row);
        }
        let halves = [_mm256_castps256_ps128(row), _mm256_extractf128_ps::<1>(row)];
        for (half, &values) in halves.iter().enumerate() {
            let (first, count) = (4 * half, count.saturating_sub(4 * half).min(4));
            let values = match residual {
                Some(r) => _mm_add_ps(values, load_low(r.add(first), count)),
                None => values,
            };
            store_low(out.add(first), values, count);
        }
    }
}

/// The first `count <= 4` floats at `p` in the low lanes, zeros above.
///
/// # Safety
/// The CPU has AVX2; `p` holds `count` floats.
#[inline(always)]
unsafe fn load_low(p: *const f32, count: usize) -> __m128 {
    // SAFETY: the caller's contract.
    unsafe {
        match count {
            0 => _mm_setzero_ps(),
            1 => _mm_load_ss(p),
            2 => _mm_castpd_ps(_mm_load_sd(p.cast::<f64>())),
            3 => _mm_movelh_ps(_mm_castpd_ps(_mm_load_sd(p.cast::<f64>())), _mm_load_ss(p.add(2))),
            _ => _mm_loadu_ps(p),
        }
    }
}

/// The low `count <= 4` lanes of `v` stored at `p`.
///
/// # Safety
/// The CPU has AVX2; `p` holds `count` floats.
#[inline(always)]
unsafe fn store_low(p: *mut f32, v: __m128, count: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        match count {
            0 => {}
            1 => _mm_store_ss(p, v),
            2 => _mm_store_sd(p.cast::<f64>(), _mm_castps_pd(v)),
            3 => {
                _mm_store_sd(p.cast::<f64>(), _mm_castps_pd(v));
                _mm_store_ss(p.add(2), _mm_movehl_ps(v, v));
            }
            _ => _mm_storeu_ps(p, v),
        }
    }
}

/// Pixels a [`pointwise_rows`] tile computes: two registers.
pub(in super::super) const ROW_TILE: usize = 16;

/// The AVX2 form of the AVX-512 tile with the pixels in the lanes (see there): `M` output
/// channels (2, 4 or 6: two registers each, and the inputs and a weight beside them in 16
/// registers) times `lanes <= 16` consecutive pixels of the plane. Input channel `kk`'s pixels
/// are two loads from `taps[kk] + at`, its weight for output channel `i` a broadcast of
/// `weights[kk * tap_floats + i]`. The first `rows` channels get `bias`, SiLU when asked, the
/// residual's rows (`residual.0`, `residual.1` apart) and are stored `ldo` apart from `out`.
/// A tile of fewer than 16 pixels (only a run's last, and at 640x640 no YOLO layer has one)
/// reads and writes through masked moves, which are slow on some CPUs but touch nothing past
/// `lanes`.
///
/// # Safety
/// The CPU has AVX2 and FMA. `taps[kk] + at + j` is a readable float for every `kk` and `j <
/// lanes`; `weights` holds `taps.len()` rows of `tap_floats >= M` floats; `bias` holds `rows`
/// floats, `rows <= M`; `out` (and the residual) hold `rows` rows of `lanes` floats.
#[target_feature(enable = "avx2,fma")]
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
    const { assert!(M.is_multiple_of(2) && M <= 6) };
    let whole = lanes >= ROW_TILE;
    // The masks of a partial tile's halves. (Made where they are used: held through the loop of
    // a whole tile, they would take two of the 16 registers that the sums need.)
    let masks = || {
        let places = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        [
            _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes.min(8) as i32), places),
            _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes.saturating_sub(8).min(8) as i32), places),
        ]
    };
    // SAFETY: every access stays within the bounds of the contract; a partial tile's masked
    // moves neither read nor write past `lanes`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for (kk, &tap) in taps.iter().enumerate() {
            let p = tap.wrapping_add(at);
            // The next tiles of the run read on along the same planes, one plane per input
            // channel: more streams than the hardware prefetcher follows.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(2 * ROW_TILE).cast::<i8>());
            let x = if whole {
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.wrapping_add(8))]
            } else {
                let masks = masks();
                [_mm256_maskload_ps(p, masks[0]), _mm256_maskload_ps(p.wrapping_add(8), masks[1])]
            };
            let w = weights.add(kk * tap_floats);
            for (i, a) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(*w.add(i));
                a[0] = _mm256_fmadd_ps(w, x[0], a[0]);
                a[1] = _mm256_fmadd_ps(w, x[1], a[1]);
            }
        }
        // Two channels (four registers) at a time, their SiLU chains side by side. The sums
        // are first copied into those blocks in a fully unrolled loop (as the AVX-512 tile's:
        // indexed in the rolled loop below, `acc` would stay in memory).
        let mut blocks = [[Avx2(_mm256_setzero_ps()); 4]; 3];
        for (channel, a) in acc.iter().enumerate() {
            blocks[channel / 2][2 * (channel % 2)] = Avx2(a[0]);
            blocks[channel / 2][2 * (channel % 2) + 1] = Avx2(a[1]);
        }
        for (index, block) in blocks.into_iter().enumerate().take(M / 2) {
            let first = 2 * index;
            if first >= rows {
                break;
            }
            let biases = std::array::from_fn(|i| {
                let channel = first + i / 2;
                Avx2(_mm256_set1_ps(if channel < rows { *bias.add(channel) } else { 0.0 }))
            });
            let block = finish_each(block, biases, silu);
            for r in 0..2.min(rows - first) {
                let channel = first + r;
                for (half, mask) in masks().into_iter().enumerate() {
                    let v = match residual {
                        Some((res, ld)) if whole => _mm256_add_ps(block[2 * r + half].0, _mm256_loadu_ps(res.wrapping_add(channel * ld + 8 * half))),
                        Some((res, ld)) => _mm256_add_ps(block[2 * r + half].0, _mm256_maskload_ps(res.wrapping_add(channel * ld + 8 * half), mask)),
                        None => block[2 * r + half].0,
                    };
                    let to = out.wrapping_add(channel * ldo + 8 * half);
                    if whole { _mm256_storeu_ps(to, v) } else { _mm256_maskstore_ps(to, mask, v) }
                }
                // The line this channel's row stores two tiles on, fetched ahead (as the
                // AVX-512 tile does: a store to a line not in the cache waits for it).
                _mm_prefetch::<_MM_HINT_T0>(out.wrapping_add(channel * ldo + 2 * ROW_TILE).cast::<i8>());
            }
        }
    }
}

/// Deinterleaves one channel's plane (`src`, rows of `w` floats) by 4 along rows and columns
/// into its 16 phase planes, as `avx512::split_plane_by_4` does (the same layout, the same
/// contract), 32 columns at a time, read where they lie (masked at the rows' ends, for the
/// AVX-512 form's reason): a permute pairs each register's columns by phase (`[0, 4, 1, 5, 2,
/// 6, 3, 7]`), 64-bit unpacks join the pairs of two registers, and 128-bit permutes join two
/// registers' halves. The last places of a phase row are stored in whole moves of 4, 2 and 1
/// floats ([`store_first_lanes`]): one float at a time, from a buffer, Winograd's layers (rows
/// of 6, 11 and 21 places at 20x20, 40x40 and 80x80) took 1.011-1.014 of their time in
/// YOLOv12n and YOLO11n (2 threads, 60 interleaved rounds). The loop runs down the rows for
/// each stretch of 8 places, its masks worked out once.
/// Panics unless `src` is whole rows, each row's pixels fall inside its phase rows, and every
/// phase row lies inside `dst`.
#[target_feature(enable = "avx2")]
pub(in super::super) fn split_plane_by_4(src: &[f32], (w, pt, pl): (usize, usize, usize), dst: &mut [std::mem::MaybeUninit<f32>], (plane, wp): (usize, usize)) {
    super::phase_rows_by_4(src.len(), (w, pt, pl), dst.len(), (plane, wp));
    let by_phase = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let width = w as isize;
    // The lanes of 8 columns from `start` (which may lie before the row or past its end) that
    // lie inside the row: `None` when all of them do.
    let inside = |start: isize| {
        let (from, to) = ((-start).clamp(0, 8) as i32, (width - start).clamp(0, 8) as i32);
        ((from, to) != (0, 8))
            .then(|| _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(from), lane_index), _mm256_cmpgt_epi32(_mm256_set1_epi32(to), lane_index)))
    };
    let out = dst.as_mut_ptr().cast::<f32>();
    for first in (0..wp).step_by(8) {
        let columns = (4 * first) as isize - pl as isize;
        let masks: [Option<__m256i>; 4] = std::array::from_fn(|i| inside(columns + 8 * i as isize));
        for (y, row) in src.chunks_exact(w).enumerate() {
            let (py, y2) = ((y + pt) % 4, (y + pt) / 4);
            // Each register as four 64-bit pairs, pair `p` holding phase `p`.
            let [a, b, c, d] = std::array::from_fn(|i| {
                let start = row.as_ptr().wrapping_offset(columns + 8 * i as isize);
                // SAFETY: without a mask, columns `start..start + 8`, all inside `row`; with
                // one, the lanes loaded are columns of `row` and masked lanes are not read, so
                // the pointer may lie outside it (it is only formed, with wrapping arithmetic).
                let columns = unsafe {
                    match masks[i] {
                        None => _mm256_loadu_ps(start),
                        Some(mask) => _mm256_maskload_ps(start, mask),
                    }
                };
                _mm256_castps_pd(_mm256_permutevar8x32_ps(columns, by_phase))
            });
            // `[a0, b0 | a2, b2]` and `[a1, b1 | a3, b3]` (pairs by phase), and the same of c, d.
            let (ab_02, ab_13) = (_mm256_unpacklo_pd(a, b), _mm256_unpackhi_pd(a, b));
            let (cd_02, cd_13) = (_mm256_unpacklo_pd(c, d), _mm256_unpackhi_pd(c, d));
            let phases = [
                _mm256_permute2f128_pd::<0x20>(ab_02, cd_02),
                _mm256_permute2f128_pd::<0x20>(ab_13, cd_13),
                _mm256_permute2f128_pd::<0x31>(ab_02, cd_02),
                _mm256_permute2f128_pd::<0x31>(ab_13, cd_13),
            ];
            let at = py * 4 * plane + y2 * wp + first;
            for (px, phase) in phases.into_iter().enumerate() {
                // SAFETY: places `first..first + 8` (or up to `wp`, the last time) of row `y2`
                // of phase `4 py + px`, inside `dst` (`phase_rows_by_4` checked it).
                unsafe { store_first_lanes(_mm256_castpd_ps(phase), out.add(at + px * plane), None, wp - first) };
            }
        }
    }
}

/// Deinterleaves a row of a block of 8 channels (`row`, `[w][8]`) by 4 after `pad` zeros
/// into each channel's 4 phase rows, as [`split_plane_by_4`] does a plane's rows: place `i` of
/// phase `p` of channel `c` gets channel `c` of pixel `4 i + p - pad` (zero where that lies
/// outside the row), for `places` places; channel `c`'s phase-`p` row starts at
/// `dst[c * channel_len + p * plane + at]`. Eight places of a phase are 8 pixels' blocks (one
/// load each, 4 pixels apart), transposed into 8 channels' rows: every float goes through one
/// 8x8 transpose. Panics unless `dst` holds the rows.
#[target_feature(enable = "avx2")]
pub(in super::super) fn split_block_row_by_4(
    row: &[f32],
    pad: usize,
    dst: &mut [std::mem::MaybeUninit<f32>],
    (channel_len, plane, at): (usize, usize, usize),
    places: usize,
) {
    assert!(places > 0 && dst.len() >= 7 * channel_len + 3 * plane + at + places, "split_block_row_by_4 bounds");
    let w = row.len() / 8;
    for phase in 0..4 {
        for first in (0..places).step_by(8) {
            let mut pixels = [_mm256_setzero_ps(); 8];
            for (k, pixel) in pixels.iter_mut().enumerate() {
                // Column `x - pad` of the row; places past `places` lie past its end.
                let x = 4 * (first + k) + phase;
                if x >= pad && x - pad < w {
                    // SAFETY: pixel `x - pad < w`: its 8 floats lie inside `row`.
                    *pixel = unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * (x - pad))) };
                }
            }
            let count = (places - first).min(8);
            for (c, channel) in transpose_8x8(pixels).into_iter().enumerate() {
                // SAFETY: places `first..first + count` of channel `c`'s phase row, inside `dst`
                // (checked above).
                unsafe { store_first_lanes(channel, dst.as_mut_ptr().add(c * channel_len + phase * plane + at + first).cast::<f32>(), None, count) };
            }
        }
    }
}

/// The transpose of an 8x8 block: row `i` of the result holds element `i` of every input row.
/// Pairs, then quads within each 128-bit half; then the halves across registers.
#[inline]
#[target_feature(enable = "avx2")]
pub(in super::super) fn transpose_8x8(r: [__m256; 8]) -> [__m256; 8] {
    let mut t = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // `u[4 g + c]`: in 128-bit half `b`, element `4 b + c` of rows `4 g .. 4 g + 4`.
    let mut u = [_mm256_setzero_ps(); 8];
    for g in 0..2 {
        let t = &t[4 * g..4 * g + 4];
        u[4 * g] = _mm256_shuffle_ps::<0x44>(t[0], t[2]);
        u[4 * g + 1] = _mm256_shuffle_ps::<0xEE>(t[0], t[2]);
        u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(t[1], t[3]);
        u[4 * g + 3] = _mm256_shuffle_ps::<0xEE>(t[1], t[3]);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for c in 0..4 {
        out[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
        out[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_the_first_lanes_and_nothing_past_them() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for count in 1..=8 {
            let row: Vec<f32> = (1..=8).map(|i| i as f32).collect();
            let residual: Vec<f32> = (0..count).map(|i| 100.0 * (i + 1) as f32).collect();
            for with_residual in [false, true] {
                // NaN past the `count` floats shows a store beyond them.
                let mut out = [f32::NAN; 9];
                // SAFETY: the CPU has AVX2 (checked above); `out` and `residual` hold `count`
                // floats.
                unsafe { store_first_lanes(_mm256_loadu_ps(row.as_ptr()), out.as_mut_ptr(), with_residual.then_some(residual.as_ptr()), count) };
                for (i, &value) in out.iter().enumerate() {
                    let want = if i < count { row[i] + if with_residual { residual[i] } else { 0.0 } } else { f32::NAN };
                    assert!(value == want || (value.is_nan() && want.is_nan()), "{count} lanes, residual {with_residual}: place {i} holds {value}");
                }
            }
        }
    }

    #[test]
    fn transposes_an_8x8_block() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let m: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let mut got = [0f32; 64];
        // SAFETY: the CPU has AVX2 (checked above); `m` and `got` hold 64 floats.
        unsafe {
            let rows: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(m.as_ptr().add(8 * i)));
            for (i, row) in transpose_8x8(rows).iter().enumerate() {
                _mm256_storeu_ps(got.as_mut_ptr().add(8 * i), *row);
            }
        }
        for i in 0..8 {
            for j in 0..8 {
                assert_eq!(got[8 * i + j], m[8 * j + i], "({i}, {j})");
            }
        }
    }
}
