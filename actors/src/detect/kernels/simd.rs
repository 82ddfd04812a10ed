//! Vector lanes for the element-wise kernels: one small trait, [`Lanes`], implemented for
//! AVX-512 (16 floats) and AVX2+FMA (8 floats), so that `exp`, the sigmoid and the softmax are
//! written once ([`activation`](super::activation)) and compiled for each.
//!
//! Every method is `unsafe`: it may only run on a CPU with the instructions of its type. The
//! callers are `#[target_feature]` functions chosen at run time, into which these `#[inline(always)]`
//! methods inline.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The most lanes of any [`Lanes`] implementation.
pub(super) const MAX_LANES: usize = 16;

/// A vector of `LEN` `f32` lanes.
///
/// # Safety
/// For callers: every method may run only on a CPU that has the instructions of the
/// implementing type (AVX-512F for [`Avx512`], AVX2 and FMA for [`Avx2`]) — in practice, inside
/// a `#[target_feature]` function reached after a run-time check — and `load` and `store`
/// need a pointer valid for reads (writes) of `LEN` floats; no alignment is required.
///
/// For implementors: `LEN` is exactly the number of floats `load` reads and `store` writes,
/// and at most [`MAX_LANES`] (callers size buffers and step pointers by it); no method reads or
/// writes the caller's memory other than those `LEN` floats, or needs any CPU feature beyond
/// the type's.
pub(super) unsafe trait Lanes: Copy {
    const LEN: usize;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn splat(v: f32) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    /// `self * b + c` with one rounding.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// Rounded to the nearest integer (ties to even).
    unsafe fn round(self) -> Self;
    /// `2^self` for integral `self` in `-126..=127`.
    unsafe fn pow2i(self) -> Self;
    /// `1 / self`: the hardware estimate refined by one Newton step (about 1e-7 relative).
    unsafe fn recip(self) -> Self;
    unsafe fn reduce_max(self) -> f32;
    unsafe fn reduce_sum(self) -> f32;

    /// `e^self`, clamped like the scalar [`exp`](super::activation::exp) so that the result is
    /// finite: Cephes' range reduction and polynomial, with fused multiply-adds.
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let x = self.max(Self::splat(-87.0)).min(Self::splat(88.0));
            let k = x.mul(Self::splat(std::f32::consts::LOG2_E)).round();
            let r = k.mul_add(Self::splat(-0.693_359_4), x);
            let r = k.mul_add(Self::splat(2.121_944_4e-4), r);
            let mut p = Self::splat(1.987_569_1e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
                p = p.mul_add(r, Self::splat(c));
            }
            let e = p.mul_add(r.mul(r), r).add(Self::splat(1.0));
            e.mul(k.pow2i())
        }
    }

    /// `1 / (1 + e^-self)`.
    #[inline(always)]
    unsafe fn sigmoid(self) -> Self {
        // SAFETY: the trait's contract, passed on.
        unsafe { Self::splat(0.0).sub(self).exp().add(Self::splat(1.0)).recip() }
    }
}

/// AVX-512F lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Avx512(pub(super) __m512);

#[cfg(target_arch = "x86_64")]
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
    unsafe fn round(self) -> Self {
        // SAFETY: AVX-512F (the caller's contract).
        Avx512(unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0) })
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        // SAFETY: AVX-512F (the caller's contract). `self + 127` is a valid biased exponent.
        Avx512(unsafe {
            let biased = _mm512_add_epi32(_mm512_cvtps_epi32(self.0), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased))
        })
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
}

/// AVX2+FMA lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Avx2(pub(super) __m256);

#[cfg(target_arch = "x86_64")]
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
    unsafe fn round(self) -> Self {
        // SAFETY: AVX (the caller's contract).
        Avx2(unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0) })
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        // SAFETY: AVX2 (the caller's contract). `self + 127` is a valid biased exponent.
        Avx2(unsafe {
            let biased = _mm256_add_epi32(_mm256_cvtps_epi32(self.0), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
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
}
