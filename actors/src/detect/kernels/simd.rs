//! Vector lanes for the element-wise kernels: one small trait, [`Lanes`], implemented for
//! AVX-512 (16 floats) and AVX2+FMA (8 floats), so that `exp`, the sigmoid and the softmax are
//! written once ([`activation`](super::activation)) and compiled for each. The implementations
//! live with the other code of their instruction set, in [`x86_64`](super::x86_64).
//!
//! Every method is `unsafe`: it may only run on a CPU with the instructions of its type. The
//! callers are `#[target_feature]` functions chosen at run time, into which these `#[inline(always)]`
//! methods inline.

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
    /// The four vectors' lanes interleaved: lane `i` of `v[b]` goes to place `4 * i + b` of the
    /// result read as one run of `4 * LEN` floats (a 4 x LEN matrix transposed).
    unsafe fn interleave4(v: [Self; 4]) -> [Self; 4];

    /// `e^self`, clamped like the scalar [`exp`](super::activation::exp) so that the result is
    /// finite.
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        // SAFETY: the trait's contract, passed on.
        unsafe { Self::exp_each([self])[0] }
    }

    /// `e^x` of each of `N` vectors: Cephes' range reduction and polynomial, with fused
    /// multiply-adds, each step taken across all `N` before the next. One vector's `exp` is a
    /// chain of about twenty dependent operations, ninety cycles long; a kernel that finishes a
    /// tile one vector at a time waits on that chain (the out-of-order window holds only a few
    /// of them), while `N` chains side by side keep the vector units busy.
    #[inline(always)]
    unsafe fn exp_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let mut x = v;
            for x in &mut x {
                *x = x.max(Self::splat(-87.0)).min(Self::splat(88.0));
            }
            let mut k = x;
            for k in &mut k {
                *k = k.mul(Self::splat(std::f32::consts::LOG2_E)).round();
            }
            let mut r = x;
            for (r, k) in r.iter_mut().zip(&k) {
                *r = k.mul_add(Self::splat(-0.693_359_4), *r);
            }
            for (r, k) in r.iter_mut().zip(&k) {
                *r = k.mul_add(Self::splat(2.121_944_4e-4), *r);
            }
            let mut p = [Self::splat(1.987_569_1e-4); N];
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
                for (p, r) in p.iter_mut().zip(&r) {
                    *p = p.mul_add(*r, Self::splat(c));
                }
            }
            for ((p, r), k) in p.iter_mut().zip(&r).zip(&k) {
                *p = p.mul_add(r.mul(*r), *r).add(Self::splat(1.0)).mul(k.pow2i());
            }
            p
        }
    }

    /// `1 / (1 + e^-self)`.
    #[inline(always)]
    unsafe fn sigmoid(self) -> Self {
        // SAFETY: the trait's contract, passed on.
        unsafe { Self::sigmoid_each([self])[0] }
    }

    /// The sigmoid of each of `N` vectors, side by side as in [`exp_each`](Self::exp_each).
    #[inline(always)]
    unsafe fn sigmoid_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let mut minus = v;
            for m in &mut minus {
                *m = Self::splat(0.0).sub(*m);
            }
            let mut e = Self::exp_each(minus);
            for e in &mut e {
                *e = e.add(Self::splat(1.0)).recip();
            }
            e
        }
    }

    /// SiLU (`x * sigmoid(x)`) of each of `N` vectors, side by side as in
    /// [`exp_each`](Self::exp_each).
    #[inline(always)]
    unsafe fn silu_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let mut s = Self::sigmoid_each(v);
            for (s, v) in s.iter_mut().zip(&v) {
                *s = s.mul(*v);
            }
            s
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use super::x86_64::{avx2::Avx2, avx512::Avx512};
