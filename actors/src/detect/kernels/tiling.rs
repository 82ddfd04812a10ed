//! Tiling and scheduling of the single-threaded product on packed operands: `k` in blocks that
//! keep a `B` panel in L1 ([`cache::b_block_floats`]), then `B` panels, then `A` panels, each
//! tile handed to the microkernel of `A`'s [`Isa`](super::isa::Isa) (chosen in [`isa`]) with its epilogue on the
//! last pass. Callers parallelise over tiles.
//!
//! `C[m x n] = A[m x k] * B[k x n]`, where `A` is packed once ([`PackedA`]) and `B` either
//! packed per call ([`gemm`]) or read in place at offsets and gathered block by block
//! ([`gemm_offsets`]).

use super::cache;
use super::epilogue::{Epilogue, TileEpilogue};
use super::isa::{self, MAX_MR, MAX_NR};
use super::pack::{PackedA, PackedB};

/// `C[rows, 0..width] = A[rows] * B` for panel-aligned `rows` of `a` and `b` packed for `a`'s
/// [`Isa`](super::isa::Isa) with the same `k`, then the [`Epilogue`], if any. `C` is row-major with `ldc`
/// elements per row.
///
/// # Safety
/// `a`'s [`Isa`](super::isa::Isa) must be supported; `b` must hold the packed panels of `width` columns; `c`
/// must be valid for writes of `rows.len()` rows of `width` elements, `ldc` apart;
/// `rows.start` must be a multiple of `mr`. An epilogue's `bias` holds `rows.len()` values and
/// its residual is readable over the same `rows.len() x width` shape.
pub unsafe fn gemm(a: &PackedA, rows: std::ops::Range<usize>, b: &PackedB, width: usize, c: *mut f32, ldc: usize, epilogue: Option<&Epilogue>) {
    let (k, nr) = (a.k(), a.isa().nr());
    assert!(b.len() >= width.div_ceil(nr) * k * nr, "B holds fewer panels than the width needs");
    // SAFETY: the caller's contract; `b` holds the panels (checked above) and is aligned.
    unsafe { gemm_panels(a, rows, b.as_ptr(), width, c, ldc, epilogue) }
}

/// Like [`gemm`], with `B`'s packed panels at `b`.
///
/// # Safety
/// As for [`gemm`]; `b` is 64-byte aligned and holds `width.div_ceil(nr) * k * nr` readable
/// floats.
pub unsafe fn gemm_panels(a: &PackedA, rows: std::ops::Range<usize>, b: *const f32, width: usize, c: *mut f32, ldc: usize, epilogue: Option<&Epilogue>) {
    let (k, nr) = (a.k(), a.isa().nr());
    debug_assert!(b.addr().is_multiple_of(64), "B panels are aligned for the microkernel's loads");
    // SAFETY: the caller's contract; each block is `kc` rows of one packed `B` panel.
    unsafe { tiles(a, rows, width, c, ldc, epilogue, |k0, _kc, q| b.add((q * k + k0) * nr)) }
}

/// Like [`gemm`], with row `kk` of `B` the `width` floats at `base + offsets[kk]`: a
/// convolution's patches are such rows of its (padded) input, so it needs no im2col.
///
/// # Safety
/// As for [`gemm`]; `offsets.len()` must be `a`'s `k`, and `base + offsets[kk] + j` readable for
/// every `kk` and every `j < width.div_ceil(nr) * nr` (columns past `width` are read, not used).
// The product's operands, as the microkernel takes them: grouping them would only move the list.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_offsets(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    base: *const f32,
    offsets: &[usize],
    width: usize,
    c: *mut f32,
    ldc: usize,
    epilogue: Option<&Epilogue>,
) {
    assert_eq!(offsets.len(), a.k());
    let nr = a.isa().nr();
    // The block of `B` that every `A` panel multiplies is gathered once into an aligned buffer
    // that stays in L1: read in place, its rows straddle cache lines and scatter over the
    // input's planes, and every `A` panel would read them again.
    // Not zeroed: each call below writes the `kc * nr` floats the kernel then reads.
    let mut block = std::mem::MaybeUninit::<Block>::uninit();
    let block = block.as_mut_ptr().cast::<f32>();
    // SAFETY: the caller's contract covers every address read; `block` holds `kc * nr <=
    // cache::MAX_B_BLOCK_FLOATS` floats.
    unsafe {
        tiles(a, rows, width, c, ldc, epilogue, |k0, kc, q| {
            let src = base.add(q * nr);
            let offsets = &offsets[k0..k0 + kc];
            isa::gather_rows(a.isa(), src, offsets, block);
            block.cast_const()
        })
    }
}

/// One block of a `B` panel, aligned for the microkernel's loads.
#[repr(C, align(64))]
struct Block([f32; cache::MAX_B_BLOCK_FLOATS]);

/// The loops shared by [`gemm`] and [`gemm_offsets`]: `k` in blocks, then `B` panels, then `A`
/// panels. `b_block(k0, kc, q)` returns rows `k0..k0 + kc` of `B` panel `q`, packed
/// (`kc x nr`); it is called once before the `A` panels that use it. Tiles at the right and
/// bottom edges go through a buffer so that only `C`'s own elements are written.
///
/// # Safety
/// As for [`gemm`]; the pointer `b_block` returns must hold `kc * nr` readable floats until its
/// next call.
unsafe fn tiles(
    a: &PackedA,
    rows: std::ops::Range<usize>,
    width: usize,
    c: *mut f32,
    ldc: usize,
    epilogue: Option<&Epilogue>,
    mut b_block: impl FnMut(usize, usize, usize) -> *const f32,
) {
    let isa = a.isa();
    let (mr, nr, kc_max) = (isa.mr(), isa.nr(), isa.kc());
    assert!(rows.start.is_multiple_of(mr) && rows.end <= a.m(), "rows must start on a panel");
    if let Some(e) = epilogue {
        assert!(e.bias.len() >= rows.len(), "one bias per row");
    }
    let k = a.k();
    let panels = width.div_ceil(nr);
    let mut edge = [0f32; MAX_MR * MAX_NR];
    let edge = edge.as_mut_ptr();
    for k0 in (0..k).step_by(kc_max) {
        let kc = kc_max.min(k - k0);
        let accumulate = k0 > 0;
        let last = k0 + kc == k;
        for q in 0..panels {
            let cols = nr.min(width - q * nr);
            let bq = b_block(k0, kc, q);
            for row in (rows.start..rows.end).step_by(mr) {
                let ap = a.panel(row / mr)[k0 * mr..][..kc * mr].as_ptr();
                let valid = mr.min(rows.end - row);
                // A tile of fewer rows than a panel's runs on only those where the microkernel
                // can; a tile is written in place when it has all its columns.
                let tile_rows = if isa.short_tiles() { valid } else { mr };
                let in_place = cols == nr && tile_rows == valid;
                let first = row - rows.start;
                // The epilogue of this tile, on the last pass; a tile through the buffer adds
                // its residual while it is copied out, since the kernel would read past the
                // residual's rows.
                let tile_epilogue = epilogue.filter(|_| last).map(|e| {
                    let mut bias = [0f32; MAX_MR];
                    bias[..valid].copy_from_slice(&e.bias[first..first + valid]);
                    // SAFETY: the residual covers the product's rows and columns (the caller's
                    // contract); this is the tile's first element.
                    let residual = e.residual.filter(|_| in_place).map(|(r, ld)| (unsafe { r.add(first * ld + q * nr) }, ld));
                    TileEpilogue { bias, silu: e.silu, residual }
                });
                // SAFETY: the caller guarantees `c` covers `rows` x `width`; `row` and `q * nr`
                // stay inside. Tiles with all their columns (and, where the kernel has tiles
                // of fewer rows, any rows) are written in place, the others through `edge`.
                unsafe {
                    let dst = c.add(first * ldc + q * nr);
                    if in_place {
                        isa::kernel(isa, valid, kc, ap, bq, dst, ldc, accumulate, tile_epilogue.as_ref());
                    } else {
                        if accumulate {
                            for r in 0..valid {
                                std::ptr::copy_nonoverlapping(dst.add(r * ldc), edge.add(r * nr), cols);
                            }
                        }
                        isa::kernel(isa, tile_rows, kc, ap, bq, edge, nr, accumulate, tile_epilogue.as_ref());
                        let residual = epilogue.filter(|_| last).and_then(|e| e.residual);
                        for r in 0..valid {
                            let out = std::slice::from_raw_parts_mut(dst.add(r * ldc), cols);
                            out.copy_from_slice(std::slice::from_raw_parts(edge.add(r * nr), cols));
                            if let Some((res, ld)) = residual {
                                let res = std::slice::from_raw_parts(res.add((first + r) * ld + q * nr), cols);
                                out.iter_mut().zip(res).for_each(|(o, x)| *o += x);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::detect::kernels::pack::pack_b;

    pub(in super::super) fn matrix(len: usize, mul: usize, modulus: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) / (modulus / 2) as f32).collect()
    }

    #[test]
    fn rows_read_in_place_at_offsets_match_packed_rows() {
        for isa in isa::all_supported() {
            for &(m, k, width) in &[(6, 5, 16), (13, 300, 37), (8, 9, 20), (17, 700, 70)] {
                let a = matrix(m * k, 7, 13);
                // Row kk of B sits at a scattered offset in a larger buffer, with slack after it.
                let offsets: Vec<usize> = (0..k).map(|kk| (kk * 37) % 101 * (width + 3) + kk % 5).collect();
                let source = matrix(offsets.iter().max().unwrap() + width + 2 * MAX_NR, 5, 11);
                let rows: Vec<f32> = offsets.iter().flat_map(|&o| source[o..o + width].iter().copied()).collect();
                let packed_a = PackedA::new(isa, &a, m, k);
                let mut packed_b = PackedB::new();
                let (mut want, mut got) = (vec![0.0; m * width], vec![0.0; m * width]);
                // SAFETY: `isa` is supported; `rows` is `k x width`; `want` and `got` are
                // `m x width`; the offsets leave `2 * MAX_NR` floats of slack after `source`.
                unsafe {
                    pack_b(isa, rows.as_ptr(), width, k, width, &mut packed_b);
                    gemm(&packed_a, 0..m, &packed_b, width, want.as_mut_ptr(), width, None);
                    gemm_offsets(&packed_a, 0..m, source.as_ptr(), &offsets, width, got.as_mut_ptr(), width, None);
                }
                assert_eq!(got, want, "{isa:?} m={m} k={k} width={width}");
            }
        }
    }

    #[test]
    fn tiles_of_fewer_rows_apply_the_bias_silu_and_residual() {
        for isa in isa::all_supported() {
            for &(m, k, n) in &[(7, 3, 16), (16, 300, 32), (9, 40, 16), (11, 257, 48), (32, 64, 20)] {
                let (a, b) = (matrix(m * k, 7, 13), matrix(k * n, 5, 11));
                let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.1 - 0.5).collect();
                let residual = matrix(m * n, 3, 17);
                let packed = PackedA::new(isa, &a, m, k);
                let mut bp = PackedB::new();
                // SAFETY: `b` is k x n row-major; `isa` comes from `all_supported`.
                unsafe { pack_b(isa, b.as_ptr(), n, k, n, &mut bp) };
                let mut c = vec![f32::NAN; m * n];
                let epilogue = Epilogue { bias: &bias, silu: true, residual: Some((residual.as_ptr(), n)) };
                // SAFETY: `isa` is supported; `c`, the bias and the residual cover the rows.
                unsafe { gemm(&packed, 0..m, &bp, n, c.as_mut_ptr(), n, Some(&epilogue)) };
                for i in 0..m {
                    for j in 0..n {
                        let x = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum::<f32>() + bias[i];
                        let want = x / (1.0 + (-x).exp()) + residual[i * n + j];
                        let got = c[i * n + j];
                        assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "{isa:?} ({m},{k},{n}) [{i},{j}] {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_a_naive_product_on_every_edge_shape() {
        for isa in isa::all_supported() {
            let mr = isa.mr();
            for &(m, k, n) in
                &[(6, 1, 16), (7, 3, 17), (16, 300, 40), (64, 576, 100), (13, 27, 5), (32, 513, 33), (20, 129, 64), (9, 601, 32), (11, 257, 16), (15, 5, 48)]
            {
                let (a, b) = (matrix(m * k, 7, 13), matrix(k * n, 5, 11));
                let packed = PackedA::new(isa, &a, m, k);
                let mut bp = PackedB::new();
                // SAFETY: `b` is k x n row-major; `isa` comes from `all_supported`.
                unsafe { pack_b(isa, b.as_ptr(), n, k, n, &mut bp) };
                // From the second panel on, into a C with a wider stride, to check offsets and
                // edges.
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                let start = if m > mr { mr } else { 0 };
                // SAFETY: `isa` is supported; `c` covers the rows.
                unsafe { gemm(&packed, start..m, &bp, n, c[start * ldc..].as_mut_ptr(), ldc, None) };
                for i in start..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
                        let got = c[i * ldc + j];
                        assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "{isa:?} ({m},{k},{n}) [{i},{j}] {got} vs {want}");
                    }
                    assert!(c[i * ldc + n].is_nan(), "{isa:?} wrote past the row");
                }
            }
        }
    }
}
