//! Single-threaded f32 matrix product on packed operands, with an AVX2+FMA microkernel.
//!
//! `C[m x n] = A[m x k] * B[k x n]`, where `A` (a convolution's weights) is packed once at load
//! time into panels of [`MR`] rows, and `B` (a tile of input columns) is packed per call into
//! panels of [`NR`] columns. The 6x16 microkernel keeps its 12 accumulators in registers and
//! walks `k` in blocks of [`KC`] so that a `B` panel stays in L1. Callers parallelise over tiles.

/// Rows per `A` panel and per microkernel call.
pub const MR: usize = 6;
/// Columns per `B` panel and per microkernel call.
pub const NR: usize = 16;
/// Depth of one pass over a `B` panel (16 KiB of `B`, in L1).
const KC: usize = 256;

/// Whether this CPU runs the microkernel (AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `A` in panels of [`MR`] rows: panel `p` holds, for each `k`, rows `p*MR..p*MR+MR` (zero rows
/// past `m`).
#[derive(Debug, Clone)]
pub struct PackedA {
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedA {
    /// Packs row-major `a` (`m x k`).
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        Self::strided(a, m, k, k, 1)
    }

    /// Packs `m x k` whose element `(i, j)` is `a[i * row_stride + j * col_stride]` (a stored
    /// transposed has `row_stride = 1, col_stride = m`).
    pub fn strided(a: &[f32], m: usize, k: usize, row_stride: usize, col_stride: usize) -> Self {
        if m > 0 && k > 0 {
            assert!((m - 1) * row_stride + (k - 1) * col_stride < a.len(), "A is smaller than its strides say");
        }
        let panels = m.div_ceil(MR);
        let mut data = vec![0.0; panels * k * MR];
        for p in 0..panels {
            let panel = &mut data[p * k * MR..][..k * MR];
            for r in 0..MR.min(m - p * MR) {
                let row = (p * MR + r) * row_stride;
                for kk in 0..k {
                    panel[kk * MR + r] = a[row + kk * col_stride];
                }
            }
        }
        PackedA { m, k, data }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.data[p * self.k * MR..][..self.k * MR]
    }
}

/// Packs `k x width` of a row-major matrix (`row_stride` apart) into [`NR`]-column panels
/// (`[panel][k][NR]`, zero columns past `width`) in `out`.
///
/// # Safety
/// `src` must be valid for reads of `k` rows of `width` elements, `row_stride` apart.
pub unsafe fn pack_b(src: *const f32, row_stride: usize, k: usize, width: usize, out: &mut Vec<f32>) {
    // The buffer is reused across calls: grow it, never clear it, since every element below is
    // written (zero-filling it each time costs as much as packing).
    let len = width.div_ceil(NR) * k * NR;
    if out.len() < len {
        out.resize(len, 0.0);
    }
    for kk in 0..k {
        // SAFETY: row `kk` of the source holds `width` readable elements (the caller's contract).
        let row = unsafe { std::slice::from_raw_parts(src.add(kk * row_stride), width) };
        for (q, chunk) in row.chunks(NR).enumerate() {
            let dst = &mut out[(q * k + kk) * NR..][..NR];
            dst[..chunk.len()].copy_from_slice(chunk);
            dst[chunk.len()..].fill(0.0);
        }
    }
}

/// `C[rows, 0..width] = A[rows] * B` for panel-aligned `rows` of `a` and `b` packed by
/// [`pack_b`] with the same `k` (`b` may be longer than the packed panels). `C` is row-major with `ldc` elements per row.
///
/// # Safety
/// [`available`] must be true; `c` must be valid for writes of `rows.len()` rows of `width`
/// elements, `ldc` apart; `rows.start` must be a multiple of [`MR`].
pub unsafe fn gemm(a: &PackedA, rows: std::ops::Range<usize>, b: &[f32], width: usize, c: *mut f32, ldc: usize) {
    let k = a.k;
    debug_assert!(b.len() >= width.div_ceil(NR) * k * NR);
    // SAFETY: the caller's contract, and each call reads `kc` rows of one packed `B` panel.
    unsafe {
        tiles(a, rows, width, c, ldc, |k0, kc, q, ap, dst, ldc, accumulate| {
            let bq = b[(q * k + k0) * NR..][..kc * NR].as_ptr();
            kernel_6x16(kc, ap, bq, dst, ldc, accumulate);
        });
    }
}

/// Like [`gemm`], with `B` read in place instead of packed: row `kk` of `B` is the `width`
/// floats at `base + offsets[kk]`. A stride-1 convolution's patches are such rows of its
/// (padded) input, so it needs no im2col and no packing.
///
/// # Safety
/// As for [`gemm`]; `offsets.len()` must be `a`'s `k`, and `base + offsets[kk] + j` readable for
/// every `kk` and every `j < width.div_ceil(NR) * NR` (columns past `width` are read, not used).
pub unsafe fn gemm_offsets(a: &PackedA, rows: std::ops::Range<usize>, base: *const f32, offsets: &[usize], width: usize, c: *mut f32, ldc: usize) {
    debug_assert_eq!(offsets.len(), a.k);
    // SAFETY: the caller's contract covers every address the kernel reads.
    unsafe {
        tiles(a, rows, width, c, ldc, |k0, kc, q, ap, dst, ldc, accumulate| {
            kernel_6x16_offsets(kc, ap, base.add(q * NR), offsets[k0..k0 + kc].as_ptr(), dst, ldc, accumulate);
        });
    }
}

/// The loops shared by [`gemm`] and [`gemm_offsets`]: `k` in blocks of [`KC`], then `B` panels,
/// then `A` panels; `kernel(k0, kc, q, a_panel, c_tile, ldc, accumulate)` computes one 6x16
/// tile. Tiles at the right and bottom edges go through a buffer so that only `C`'s own elements
/// are written.
///
/// # Safety
/// As for [`gemm`]; `kernel` must be safe to call with any tile of that range.
#[allow(clippy::type_complexity)]
unsafe fn tiles(a: &PackedA, rows: std::ops::Range<usize>, width: usize, c: *mut f32, ldc: usize, kernel: impl Fn(usize, usize, usize, *const f32, *mut f32, usize, bool)) {
    debug_assert!(rows.start % MR == 0 && rows.end <= a.m);
    let k = a.k;
    let panels = width.div_ceil(NR);
    let mut edge = [0f32; MR * NR];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let accumulate = k0 > 0;
        for q in 0..panels {
            let cols = NR.min(width - q * NR);
            for row in (rows.start..rows.end).step_by(MR) {
                let ap = a.panel(row / MR)[k0 * MR..][..kc * MR].as_ptr();
                let valid = MR.min(rows.end - row);
                // SAFETY: the caller guarantees `c` covers `rows` x `width`; `row` and `q * NR`
                // stay inside. Full tiles are written in place, edge tiles through `edge`.
                unsafe {
                    let dst = c.add((row - rows.start) * ldc + q * NR);
                    if valid == MR && cols == NR {
                        kernel(k0, kc, q, ap, dst, ldc, accumulate);
                    } else {
                        if accumulate {
                            for r in 0..valid {
                                std::ptr::copy_nonoverlapping(dst.add(r * ldc), edge[r * NR..].as_mut_ptr(), cols);
                            }
                        }
                        kernel(k0, kc, q, ap, edge.as_mut_ptr(), NR, accumulate);
                        for r in 0..valid {
                            std::ptr::copy_nonoverlapping(edge[r * NR..].as_ptr(), dst.add(r * ldc), cols);
                        }
                    }
                }
            }
        }
    }
}

/// Batched `C[b] = alpha * A[b] * B[b]` (`m x k` times `k x n`) for contiguous `a` and `b`,
/// each stored row-major or, when its flag is set, transposed (`k x m`, `n x k`) — so that a
/// transpose feeding a product costs nothing, and a scale costs nothing either (it is applied
/// to the packed `A`). In parallel over the batch. Needs [`available`].
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize, a_transposed: bool, b_transposed: bool, alpha: f32) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(available(), "callers check `available()` first");
    assert!(a.len() == batch * m * k && b.len() == batch * k * n);
    if m * n == 0 || k == 0 {
        return vec![0.0; batch * m * n];
    }
    // Not zero-filled first: the first pass over `k` writes every element.
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    out.spare_capacity_mut()[..batch * m * n].par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
        let ai = &a[i * m * k..][..m * k];
        let mut packed = if a_transposed { PackedA::strided(ai, m, k, 1, m) } else { PackedA::new(ai, m, k) };
        if alpha != 1.0 {
            packed.data.iter_mut().for_each(|v| *v *= alpha);
        }
        let bi = &b[i * k * n..][..k * n];
        let mut packed_b = Vec::new();
        if b_transposed {
            pack_b_transposed(bi, k, n, &mut packed_b);
        } else {
            // SAFETY: `bi` is `k x n` row-major.
            unsafe { pack_b(bi.as_ptr(), n, k, n, &mut packed_b) };
        }
        // SAFETY: `c` is `m x n`; the microkernel is available (asserted above). `gemm` only
        // writes through the pointer until its first pass over `k` has initialised the tile.
        unsafe { gemm(&packed, 0..m, &packed_b, n, c.as_mut_ptr().cast::<f32>(), n) };
    });
    // SAFETY: with `k > 0`, `gemm` wrote every element of every `m x n` product.
    unsafe { out.set_len(batch * m * n) };
    out
}

/// Like [`pack_b`] for `B` stored transposed: `bt` is `n x k` row-major.
pub fn pack_b_transposed(bt: &[f32], k: usize, n: usize, out: &mut Vec<f32>) {
    assert_eq!(bt.len(), n * k);
    let panels = n.div_ceil(NR);
    // Zero first: the last panel's missing columns must read as zero.
    out.clear();
    out.resize(panels * k * NR, 0.0);
    for (j, column) in bt.chunks_exact(k.max(1)).enumerate().take(n) {
        let (q, lane) = (j / NR, j % NR);
        let panel = &mut out[q * k * NR..][..k * NR];
        for (kk, &v) in column.iter().enumerate() {
            panel[kk * NR + lane] = v;
        }
    }
}

/// `C[6 x 16] (+)= A_panel[kc x 6] * B_panel[kc x 16]`.
///
/// # Safety
/// AVX2 and FMA must be available; `a` holds `kc * 6` and `b` `kc * 16` readable floats; `c` is
/// valid for reads and writes of 6 rows of 16 floats, `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    // SAFETY: row `kk` of the packed panel is the 16 floats at `b + kk * NR` (the contract).
    unsafe { kernel_6x16_with(kc, a, |kk| b.add(kk * NR), c, ldc, accumulate) }
}

/// Like [`kernel_6x16`] with row `kk` of `B` the 16 floats at `base + offsets[kk]`.
///
/// # Safety
/// As for [`kernel_6x16`]; `offsets` holds `kc` entries and each `base + offsets[kk]` starts 16
/// readable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16_offsets(kc: usize, a: *const f32, base: *const f32, offsets: *const usize, c: *mut f32, ldc: usize, accumulate: bool) {
    // SAFETY: the contract makes every `base + offsets[kk]` a readable row of 16 floats.
    unsafe { kernel_6x16_with(kc, a, |kk| base.add(*offsets.add(kk)), c, ldc, accumulate) }
}

/// The microkernel's body: 12 accumulators in registers, `B` row `kk` at `b_row(kk)`.
///
/// # Safety
/// As for [`kernel_6x16`], with `b_row(kk)` pointing at 16 readable floats for `kk < kc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_6x16_with(kc: usize, a: *const f32, b_row: impl Fn(usize) -> *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    use std::arch::x86_64::*;
    // SAFETY: every pointer access below stays within the bounds stated in the contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(c.add(r * ldc));
                row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
        }
        for kk in 0..kc {
            let b = b_row(kk);
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            let ak = a.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ak.add(r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), row[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_6x16(_: usize, _: *const f32, _: *const f32, _: *mut f32, _: usize, _: bool) {
    unreachable!("callers check `available()` first")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_6x16_offsets(_: usize, _: *const f32, _: *const f32, _: *const usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("callers check `available()` first")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_operands_give_the_same_product() {
        if !available() {
            eprintln!("SKIPPED: no AVX2/FMA on this CPU; the engine uses the portable path");
            return;
        }
        let (batch, m, k, n) = (2, 7, 19, 21);
        let a: Vec<f32> = (0..batch * m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..batch * k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
        let transpose = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            x.chunks(rows * cols).flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c]))).collect()
        };
        let plain = batched_matmul(&a, &b, batch, m, k, n, false, false, 1.0);
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        for (ta, tb) in [(true, false), (false, true), (true, true)] {
            let got = batched_matmul(if ta { &at } else { &a }, if tb { &bt } else { &b }, batch, m, k, n, ta, tb, 1.0);
            for (x, y) in got.iter().zip(&plain) {
                assert!((x - y).abs() < 1e-4, "transposed ({ta}, {tb})");
            }
        }
        let scaled = batched_matmul(&at, &b, batch, m, k, n, true, false, 0.25);
        for (x, y) in scaled.iter().zip(&plain) {
            assert!((x - 0.25 * y).abs() < 1e-4, "scaled by alpha");
        }
    }

    #[test]
    fn rows_read_in_place_at_offsets_match_packed_rows() {
        if !available() {
            eprintln!("SKIPPED: no AVX2/FMA on this CPU; the engine uses the portable path");
            return;
        }
        for &(m, k, width) in &[(6, 5, 16), (13, 300, 37), (8, 9, 20)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            // Row kk of B sits at a scattered offset in a larger buffer, with slack after it.
            let offsets: Vec<usize> = (0..k).map(|kk| (kk * 37) % 101 * (width + 3) + kk % 5).collect();
            let source: Vec<f32> = (0..offsets.iter().max().unwrap() + width + 2 * NR).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
            let rows: Vec<f32> = offsets.iter().flat_map(|&o| source[o..o + width].iter().copied()).collect();
            let packed_a = PackedA::new(&a, m, k);
            let mut packed_b = Vec::new();
            let (mut want, mut got) = (vec![0.0; m * width], vec![0.0; m * width]);
            // SAFETY: `rows` is `k x width`; `want` and `got` are `m x width`; the offsets leave
            // `2 * NR` floats of slack at the end of `source`.
            unsafe {
                pack_b(rows.as_ptr(), width, k, width, &mut packed_b);
                gemm(&packed_a, 0..m, &packed_b, width, want.as_mut_ptr(), width);
                gemm_offsets(&packed_a, 0..m, source.as_ptr(), &offsets, width, got.as_mut_ptr(), width);
            }
            assert_eq!(got, want, "m={m} k={k} width={width}");
        }
    }

    #[test]
    fn matches_a_naive_product_on_every_edge_shape() {
        if !available() {
            eprintln!("SKIPPED: no AVX2/FMA on this CPU; the engine uses the portable path");
            return;
        }
        for &(m, k, n) in &[(6, 1, 16), (7, 3, 17), (16, 300, 40), (64, 576, 100), (13, 27, 5), (32, 513, 33)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
            let packed = PackedA::new(&a, m, k);
            let mut bp = Vec::new();
            // SAFETY: `b` is k x n row-major.
            unsafe { pack_b(b.as_ptr(), n, k, n, &mut bp) };
            // Rows 6.. only, into a C with a wider stride, to check offsets and edges.
            let ldc = n + 3;
            let mut c = vec![f32::NAN; m * ldc];
            let start = if m > 6 { 6 } else { 0 };
            // SAFETY: the microkernel is available (checked above); `c` covers the rows.
            unsafe { gemm(&packed, start..m, &bp, n, c[start * ldc..].as_mut_ptr(), ldc) };
            for i in start..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
                    let got = c[i * ldc + j];
                    assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "({m},{k},{n}) [{i},{j}] {got} vs {want}");
                }
                assert!(c[i * ldc + n].is_nan(), "wrote past the row");
            }
        }
    }
}
