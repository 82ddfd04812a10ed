//! The portable fallback, for CPUs without a microkernel (or `STREAMDET_CPU_KERNEL=portable`):
//! a tile of a product with the `gemm` crate on unpacked weights, then the epilogue as a second
//! pass over the tile, vectorised as far as the CPU allows
//! ([`bias_activation_tile`](super::activation::bias_activation_tile)).

use super::activation::{Activation, bias_activation_tile};

/// `C = W * B`, then `+ bias`, the activation and `+ residual`: `W` is `rows x k` row-major,
/// row `kk` of `B` holds `width` floats at `rhs + kk * rhs_row_stride`, and `C` is `rows` rows
/// of `width` floats `ldc` apart; `biases` has one value per row, and the residual (its first
/// element and row stride) has `C`'s shape.
///
/// # Safety
/// `rhs` is valid for reads of `B`, `c` for writes of `C` and the residual for reads of a tile
/// of `C`'s shape; no other thread touches `C` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product_tile(
    weights: &[f32],
    rows: usize,
    k: usize,
    rhs: *const f32,
    rhs_row_stride: isize,
    width: usize,
    c: *mut f32,
    ldc: usize,
    biases: &[f32],
    activation: Activation,
    residual: Option<(*const f32, usize)>,
) {
    assert!(weights.len() >= rows * k && biases.len() >= rows, "weights and biases cover the rows");
    // SAFETY: the caller's contract: `B` and `C` cover the shapes given to the `gemm` crate,
    // whose `lhs` is `weights` (checked above); the epilogue pass reads and writes the same tile.
    unsafe {
        gemm::gemm(
            rows,
            width,
            k,
            c,
            1,
            ldc as isize,
            false,
            weights.as_ptr(),
            1,
            k as isize,
            rhs,
            1,
            rhs_row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        bias_activation_tile(c, ldc, width, &biases[..rows], activation, residual);
    }
}
