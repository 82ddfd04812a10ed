//! The AVX-512F microkernel (8x32 tiles) and the packing routines compiled for AVX-512F.

use super::super::epilogue::{TileEpilogue, finish};
use super::super::pack::{self, PackedB};
use super::super::simd::Avx512;

/// The AVX-512 microkernel: 16 accumulators (8 rows of two 16-float registers); each `A`
/// element is a broadcast operand of the multiply-add, so `B` needs only two registers.
///
/// # Safety
/// As for [`kernel`](super::super::isa::kernel), with `mr = 8`, `nr = 32`.
#[target_feature(enable = "avx512f")]
pub(in super::super) unsafe fn kernel_8x32(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool, epilogue: Option<&TileEpilogue>) {
    use std::arch::x86_64::*;
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
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    let residual = e.residual.map(|(p, ld)| p.add(r * ld + j * 16));
                    *v = finish(Avx512(*v), e.bias[r], e.silu, residual).0;
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
