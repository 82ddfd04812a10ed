//! Batched products of whole matrices (the engine's `MatMul` and `Gemm`): scheduling over the
//! batch, on the packed product of [`tiling`](super::tiling), with transposed operands and a
//! scale folded into the packing.

use super::isa::Isa;
use super::pack::{PackedA, PackedB, pack_b, pack_b_transposed};
use super::tiling::gemm;

/// Batched `C[b] = alpha * A[b] * B[b]` (`m x k` times `k x n`) for contiguous `a` and `b`,
/// each stored row-major or, when its flag is set, transposed (`k x m`, `n x k`) — so that a
/// transpose feeding a product costs nothing, and a scale costs nothing either (it is applied
/// to the packed `A`). In parallel over the batch. Needs [`available`](super::isa::available).
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize, a_transposed: bool, b_transposed: bool, alpha: f32) -> Vec<f32> {
    let isa = Isa::detect().expect("callers check `available()` first");
    batched_matmul_on(isa, a, b, batch, m, k, n, a_transposed, b_transposed, alpha)
}

#[allow(clippy::too_many_arguments)]
fn batched_matmul_on(
    isa: Isa,
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    a_transposed: bool,
    b_transposed: bool,
    alpha: f32,
) -> Vec<f32> {
    use crate::detect::kernels::parallel;
    assert!(isa.supported());
    assert!(a.len() == batch * m * k && b.len() == batch * k * n);
    if m * n == 0 || k == 0 {
        return vec![0.0; batch * m * n];
    }
    // Not zero-filled first: the first pass over `k` writes every element.
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    parallel::for_each_chunk_mut(&mut out.spare_capacity_mut()[..batch * m * n], m * n, |i, c| {
        let (ai, bi) = (&a[i * m * k..][..m * k], &b[i * k * n..][..k * n]);
        let mut packed_b = PackedB::new();
        if b_transposed {
            // `C = A x Bt^T` is computed as `C^T = Bt x A^T`, then transposed: `Bt` packs by rows
            // (reading in order) and `A^T` is the small operand, whereas packing a large `Bt`
            // into column panels would read it across rows.
            let mut packed = PackedA::new(isa, bi, n, k);
            if alpha != 1.0 {
                packed.scale(alpha);
            }
            if a_transposed {
                // SAFETY: `ai` is `k x m` row-major, which is `A^T`; `isa` is supported (asserted
                // above).
                unsafe { pack_b(isa, ai.as_ptr(), m, k, m, &mut packed_b) };
            } else {
                pack_b_transposed(isa, ai, k, m, &mut packed_b);
            }
            let mut ct = Vec::<f32>::with_capacity(n * m);
            // SAFETY: `ct` has room for `n x m`; the microkernel is supported (asserted above).
            // With `k > 0`, the product writes every element, so `set_len` exposes no garbage.
            unsafe {
                gemm(&packed, 0..n, &packed_b, m, ct.as_mut_ptr(), m, None);
                ct.set_len(n * m);
            }
            for (j, row) in c.chunks_exact_mut(n).enumerate() {
                for (dst, src) in row.iter_mut().zip(ct.iter().skip(j).step_by(m)) {
                    dst.write(*src);
                }
            }
            return;
        }
        let mut packed = if a_transposed { PackedA::strided(isa, ai, m, k, 1, m) } else { PackedA::new(isa, ai, m, k) };
        if alpha != 1.0 {
            packed.scale(alpha);
        }
        // SAFETY: `bi` is `k x n` row-major; `isa` is supported (asserted above).
        unsafe { pack_b(isa, bi.as_ptr(), n, k, n, &mut packed_b) };
        // SAFETY: `c` is `m x n`; the microkernel is supported (asserted above). `gemm` only
        // writes through the pointer until its first pass over `k` has initialised the tile.
        unsafe { gemm(&packed, 0..m, &packed_b, n, c.as_mut_ptr().cast::<f32>(), n, None) };
    });
    // SAFETY: with `k > 0`, `gemm` wrote every element of every `m x n` product.
    unsafe { out.set_len(batch * m * n) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::kernels::isa;
    use crate::detect::kernels::tiling::tests::matrix;

    #[test]
    fn transposed_operands_give_the_same_product() {
        let (batch, m, k, n) = (2, 7, 19, 37);
        let (a, b) = (matrix(batch * m * k, 7, 13), matrix(batch * k * n, 5, 11));
        let transpose = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            x.chunks(rows * cols).flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c]))).collect()
        };
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        for isa in isa::all_supported() {
            let plain = batched_matmul_on(isa, &a, &b, batch, m, k, n, false, false, 1.0);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
                    assert!((plain[i * n + j] - want).abs() < 1e-4, "{isa:?} [{i},{j}]");
                }
            }
            for (ta, tb) in [(true, false), (false, true), (true, true)] {
                let got = batched_matmul_on(isa, if ta { &at } else { &a }, if tb { &bt } else { &b }, batch, m, k, n, ta, tb, 1.0);
                for (x, y) in got.iter().zip(&plain) {
                    assert!((x - y).abs() < 1e-4, "{isa:?} transposed ({ta}, {tb})");
                }
            }
            let scaled = batched_matmul_on(isa, &at, &b, batch, m, k, n, true, false, 0.25);
            for (x, y) in scaled.iter().zip(&plain) {
                assert!((x - 0.25 * y).abs() < 1e-4, "{isa:?} scaled by alpha");
            }
        }
    }
}
