//! Vector lanes for the element-wise kernels: one small trait, [`Lanes`], implemented for
//! AVX-512 (16 floats) and AVX2+FMA (8 floats), so that `exp`, the sigmoid and the softmax are
//! written once ([`activation`](super::activation)) and compiled for each. The implementations
//! live with the other code of their instruction set, in [`x86_64`](super::x86_64).
//!
//! Every method is `unsafe`: it may only run on a CPU with the instructions of its type. The
//! callers are `#[target_feature]` functions chosen at run time, into which these `#[inline(always)]`
//! methods inline.

/// `log2(e)` as the nearest `f32`, and what that leaves out.
const LOG2E_HI: f32 = std::f32::consts::LOG2_E;
const LOG2E_LO: f32 = 1.925_963e-8;

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
    /// `self / d` by the division instruction.
    unsafe fn div(self, d: Self) -> Self;
    /// Whether a quotient is faster as a division ([`div`](Self::div)) than as the product by
    /// the refined reciprocal ([`recip`](Self::recip)) on this CPU: AVX2, and AVX-512 on AMD's
    /// cores, run the division on a divider beside the other units, where the reciprocal
    /// estimate, its refinement and the product are three instructions on the busy ports; on
    /// Intel's cores, Skylake to Ice Lake, a 512-bit division takes some 10 cycles a vector,
    /// longer than the dozen other instructions of a SiLU together.
    fn divides() -> bool;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    /// `self * b + c` with one rounding.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// `self * b - c` with one rounding.
    unsafe fn mul_sub(self, b: Self, c: Self) -> Self;
    /// `self * 2^k` for integral `k`, where `self` and the result are normal floats; `shifted`
    /// is `k + 1.5 * 2^23` ([`nearest_integer_of_product`](Self::nearest_integer_of_product)),
    /// whose low 23 bits hold `k` in two's complement, for an implementation that adds them to
    /// the exponent as they are.
    unsafe fn mul_pow2(self, k: Self, shifted: Self) -> Self;
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

    /// `e^x` of each of `N` vectors, `x` clamped to `[-87, 88]` so that the result is finite:
    /// [`pow2_of_product`](Self::pow2_of_product) with `c = log2(e)` in two parts, so that the
    /// fraction keeps its precision. Each step is taken across all `N` before the next: one
    /// vector's `exp` is a chain of a dozen dependent operations, some sixty cycles long; a
    /// kernel that finishes a tile one vector at a time waits on that chain (the out-of-order
    /// window holds only a few of them), while `N` chains side by side keep the vector units
    /// busy.
    #[inline(always)]
    unsafe fn exp_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe { Self::pow2_of_product(v, (-87.0, Some(88.0)), LOG2E_HI, Some(LOG2E_LO)) }
    }

    /// `e^x` of each of `N` vectors of `x <= 0` (a softmax's `x - max`), `x` clamped below at
    /// -87: [`exp_each`](Self::exp_each) without the upper clamp, which such `x` never reach,
    /// and with `log2(e)` in one part: the second part would move `e^x` by at most `1.2e-6` of
    /// itself, and that only near -87, where `e^x` is below `1e-37`; by at most `4e-8` where
    /// `e^x > 0.07`. Two operations of some sixteen fewer: attention's heads took 0.955-0.986
    /// of their time (`cargo bench --bench conv -- 1 attention`, one thread, an AMD EPYC (Zen
    /// 4), AVX2 and AVX-512, the best and the median of 6 interleaved rounds).
    #[inline(always)]
    unsafe fn exp_of_nonpositive_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe { Self::pow2_of_product(v, (-87.0, None), LOG2E_HI, None) }
    }

    /// `2^(x * c)` of each vector, `x` first clamped to `range` (below, and above unless the
    /// caller knows `x` lies below its bound), which must keep `x * c` in `-125.5..=127` (the
    /// result is then a normal float): `2^k * 2^f` with `k` the nearest integer to `x * c` and
    /// `f = x * c - k` in `[-1/2, 1/2]` (plus `x * c_rest`, where `c` is the nearest `f32` to a
    /// constant and `c_rest` what that leaves out), `2^f` by
    /// [`pow2_fraction`](Self::pow2_fraction).
    #[inline(always)]
    unsafe fn pow2_of_product<const N: usize>(v: [Self; N], range: (f32, Option<f32>), c: f32, c_rest: Option<f32>) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let mut x = v;
            for x in &mut x {
                *x = x.max(Self::splat(range.0));
                if let Some(upper) = range.1 {
                    *x = x.min(Self::splat(upper));
                }
            }
            let mut k = x;
            let mut shifted = x;
            for (k, shifted) in k.iter_mut().zip(&mut shifted) {
                (*k, *shifted) = k.nearest_integer_of_product(c);
            }
            let mut f = x;
            for (f, k) in f.iter_mut().zip(&k) {
                let fraction = f.mul_sub(Self::splat(c), *k);
                *f = match c_rest {
                    Some(rest) => f.mul_add(Self::splat(rest), fraction),
                    None => fraction,
                };
            }
            let mut e = Self::pow2_fraction(f);
            for ((e, k), shifted) in e.iter_mut().zip(&k).zip(&shifted) {
                // Normal: `k` is in `-126..=127`, and `2^f` below 1 only where `k < 127`.
                *e = e.mul_pow2(*k, *shifted);
            }
            e
        }
    }

    /// `2^f` of each vector, for `f` in `[-1/2, 1/2]`: the polynomial of degree 5 with the
    /// least largest relative error there (fitted by reweighted least squares; 1.9e-7 in `f32`
    /// arithmetic, against 2.4e-7 for the Taylor polynomial of degree 6), by Horner's rule.
    #[inline(always)]
    unsafe fn pow2_fraction<const N: usize>(f: [Self; N]) -> [Self; N] {
        // The linear coefficient is the fit's, a little below ln(2): not the constant.
        #[allow(clippy::approx_constant)]
        const COEFFICIENTS: [f32; 6] = [0.001_326_472_7, 0.009_671_513, 0.055_507_336, 0.240_222_42, 0.693_147, 1.0];
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let mut p = [Self::splat(COEFFICIENTS[0]); N];
            for c in &COEFFICIENTS[1..] {
                for (p, f) in p.iter_mut().zip(&f) {
                    *p = p.mul_add(*f, Self::splat(*c));
                }
            }
            p
        }
    }

    /// `self * c` rounded to the nearest integer `k` (ties to even), for `|self * c| < 2^22`,
    /// and the sum it comes from, `k + 1.5 * 2^23`: adding `1.5 * 2^23` within the multiply's
    /// own rounding leaves no fraction bits, and taking it away again gives the integer; two
    /// instructions on either vector port, where a multiply and a rounding instruction are
    /// three, two of them on one port. The sum lies in `[2^23, 2^24)`, where floats are the
    /// integers, so its low 23 bits are `k` in two's complement ([`mul_pow2`](Self::mul_pow2)).
    #[inline(always)]
    unsafe fn nearest_integer_of_product(self, c: f32) -> (Self, Self) {
        const SHIFTER: f32 = 12_582_912.0;
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let shifted = self.mul_add(Self::splat(c), Self::splat(SHIFTER));
            (shifted.sub(Self::splat(SHIFTER)), shifted)
        }
    }

    /// `n[i] / d[i]`, the way that is faster on this CPU ([`divides`](Self::divides)), chosen
    /// once for the `N` quotients.
    #[inline(always)]
    unsafe fn ratio_each<const N: usize>(mut n: [Self; N], d: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            if Self::divides() {
                for (n, d) in n.iter_mut().zip(&d) {
                    *n = n.div(*d);
                }
            } else {
                for (n, d) in n.iter_mut().zip(&d) {
                    *n = n.mul(d.recip());
                }
            }
            n
        }
    }

    /// `1 / (1 + e^-self)`.
    #[inline(always)]
    unsafe fn sigmoid(self) -> Self {
        // SAFETY: the trait's contract, passed on.
        unsafe { Self::sigmoid_each([self])[0] }
    }

    /// `e^-x` of each of `N` vectors for the sigmoid and SiLU, in the fewest operations that
    /// keep them within a few units in the last place: `2^t` with `t = -x * log2(e)` in one
    /// part (the second part of `log2(e)` moves the sigmoid by under 3e-9, and by under 1.2e-6
    /// of itself where it is tiny), `x` clamped to `[-88, 87]` so that `2^t` is a normal float.
    #[inline(always)]
    unsafe fn exp_of_negated_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe { Self::pow2_of_product(v, (-88.0, Some(87.0)), -LOG2E_HI, None) }
    }

    /// The sigmoid of each of `N` vectors, side by side as in [`exp_each`](Self::exp_each):
    /// `1 / (1 + e^-x)` ([`ratio_each`](Self::ratio_each)).
    #[inline(always)]
    unsafe fn sigmoid_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let mut s = Self::exp_of_negated_each(v);
            for s in &mut s {
                *s = s.add(Self::splat(1.0));
            }
            Self::ratio_each([Self::splat(1.0); N], s)
        }
    }

    /// SiLU (`x * sigmoid(x)`) of each of `N` vectors, side by side as in
    /// [`exp_each`](Self::exp_each): `x / (1 + e^-x)` ([`ratio_each`](Self::ratio_each)). Most
    /// convolutions of a YOLO model end in it: with AVX2 on a Zen 3 EPYC it took
    /// some 6 % of a call (YOLO11n and YOLOv12n, 2 threads, against `max(x, 0)` in its place).
    /// As `x * (1 / (1 + e^-x))` there, the reciprocal refined once, and with `2^k` built from
    /// `k` converted to integers, the calls took 1.03 of their time.
    #[inline(always)]
    unsafe fn silu_each<const N: usize>(v: [Self; N]) -> [Self; N] {
        // SAFETY: the trait's contract, passed on.
        unsafe {
            let mut s = Self::exp_of_negated_each(v);
            for s in &mut s {
                *s = s.add(Self::splat(1.0));
            }
            Self::ratio_each(v, s)
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use super::x86_64::{avx2::Avx2, avx512::Avx512};
