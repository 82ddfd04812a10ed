//! The AVX2+FMA microkernel (6x16 tiles) and the packing routines compiled for AVX2.

use super::super::epilogue::{TileEpilogue, finish};
use super::super::pack::{self, PackedB};
use super::super::simd::Avx2;

/// The AVX2 microkernel: 12 accumulators (6 rows of two 8-float registers).
///
/// # Safety
/// As for [`kernel`](super::super::isa::kernel), with `mr = 6`, `nr = 16`.
#[target_feature(enable = "avx2,fma")]
pub(in super::super) unsafe fn kernel_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool, epilogue: Option<&TileEpilogue>) {
    use std::arch::x86_64::*;
    const MR: usize = 6;
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
            let b0 = _mm256_loadu_ps(b.add(kk * 16));
            let b1 = _mm256_loadu_ps(b.add(kk * 16 + 8));
            let ak = a.add(kk * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ak.add(r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        if let Some(e) = epilogue {
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    let residual = e.residual.map(|(p, ld)| p.add(r * ld + j * 8));
                    *v = finish(Avx2(*v), e.bias[r], e.silu, residual).0;
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), row[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
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
