//! The fused epilogue: what the last pass over `k` does to a tile of `C` while it is still in
//! registers (a convolution's bias, SiLU and skip connection), so that none of them costs a
//! trip through memory.

use super::isa::MAX_MR;
#[cfg(target_arch = "x86_64")]
use super::simd::Lanes;

/// What the last pass over `k` does to a tile of `C` before it is stored, while the tile is in
/// registers: a convolution's bias, SiLU and skip connection cost no trip through memory.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Added to each row of the product (`bias[i]` to row `rows.start + i`).
    pub bias: &'a [f32],
    /// SiLU after the bias.
    pub silu: bool,
    /// Added last: element `(i, j)` of the product gets `residual.0[i * residual.1 + j]`
    /// (a pointer to the residual's element for the product's first row, and its row stride).
    pub residual: Option<(*const f32, usize)>,
}

/// The epilogue of one microkernel tile: `mr` biases (zero past the product's rows) and the
/// residual tile's start, when it can be read whole.
#[derive(Clone, Copy)]
pub(super) struct TileEpilogue {
    pub(super) bias: [f32; MAX_MR],
    pub(super) silu: bool,
    pub(super) residual: Option<(*const f32, usize)>,
}

/// `N` registers of a finished tile: `+ bias[i]`, then SiLU when asked, the SiLU of all `N`
/// side by side ([`Lanes::silu_each`]); the residual, where there is one, is the caller's.
///
/// # Safety
/// The CPU has `V`'s features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn finish_each<V: Lanes, const N: usize>(mut v: [V; N], bias: [V; N], silu: bool) -> [V; N] {
    // SAFETY: the caller's contract.
    unsafe {
        for (v, b) in v.iter_mut().zip(&bias) {
            *v = v.add(*b);
        }
        if silu { V::silu_each(v) } else { v }
    }
}
