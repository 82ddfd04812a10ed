//! Depthwise convolutions (one input channel per group): a direct kernel per channel plane,
//! compiled for the CPU's vectors.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::activation::bias_activation;
use super::super::isa::Isa;
use super::{Conv2d, add_assign, zeroed};

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_depthwise(&self, input: &[f32], h: usize, w: usize, oh: usize, ow: usize, residual: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        let channels = self.spec.out_channels;
        let isa = Isa::detect();
        let (kh, kw) = self.spec.kernel;
        let (_, pl, _, pr) = self.spec.pads;
        // Tap `(ky, kx)` of the flat kernel reads the padded plane this far past the output.
        let wp = w + pl + pr;
        let offsets: Vec<usize> = (0..kh * kw).map(|t| t / kw * wp + t % kw).collect();
        let offsets = &offsets;
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane_index, dst)| {
            let c = plane_index % channels;
            let src = &input[plane_index * h * w..][..h * w];
            let dst = match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU supports AVX-512F (`Isa::detect` checked it).
                Some(Isa::Avx512) => unsafe { depthwise_plane_avx512(self, c, src, h, w, oh, ow, offsets, dst) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU supports AVX2 and FMA (`Isa::detect` checked it).
                Some(Isa::Avx2) => unsafe { depthwise_plane_avx2(self, c, src, h, w, oh, ow, offsets, dst) },
                _ => depthwise_plane(self, c, src, h, w, oh, ow, offsets, dst),
            };
            if let Some(residual) = residual {
                add_assign(dst, &residual[plane_index * oh * ow..][..oh * ow]);
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_avx2<'a>(
    conv: &Conv2d,
    c: usize,
    src: &[f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    offsets: &[usize],
    dst: &'a mut [MaybeUninit<f32>],
) -> &'a mut [f32] {
    depthwise_plane(conv, c, src, h, w, oh, ow, offsets, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_avx512<'a>(
    conv: &Conv2d,
    c: usize,
    src: &[f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    offsets: &[usize],
    dst: &'a mut [MaybeUninit<f32>],
) -> &'a mut [f32] {
    depthwise_plane(conv, c, src, h, w, oh, ow, offsets, dst)
}

/// One channel of a depthwise convolution into `dst`, which it initialises and returns;
/// `offsets` are the taps' offsets for the stride-1 kernel ([`depthwise_plane_flat`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane<'a>(
    conv: &Conv2d,
    c: usize,
    src: &[f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    offsets: &[usize],
    dst: &'a mut [MaybeUninit<f32>],
) -> &'a mut [f32] {
    let dst = if conv.spec.stride == (1, 1) && conv.spec.dilation == (1, 1) {
        depthwise_plane_flat(conv, c, src, h, w, oh, ow, offsets, dst)
    } else {
        let dst = zeroed(dst);
        depthwise_plane_rows(conv, c, src, h, w, oh, ow, dst);
        dst
    };
    bias_activation(dst, conv.bias[c], conv.spec.activation);
    dst
}

/// A stride-1 depthwise convolution of one channel over the flattened plane. The plane is
/// copied once into a zero-padded buffer of width `wp`; output pixel `(oy, ox)` is then
/// computed at `oy * wp + ox` of an accumulator laid out like the padded plane, where tap
/// `(ky, kx)` reads the padded plane `ky * wp + kx` further on. So every output is the same
/// sum of taps at fixed offsets, one vector of outputs at a time (the `wp - ow` columns past
/// each row are computed and dropped), without bounds per row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_flat<'a>(
    conv: &Conv2d,
    c: usize,
    src: &[f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    offsets: &[usize],
    dst: &'a mut [MaybeUninit<f32>],
) -> &'a mut [f32] {
    let (kh, kw) = conv.spec.kernel;
    let (pt, pl, pb, pr) = conv.spec.pads;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    let weights = &conv.weights[c * kh * kw..][..kh * kw];
    PLANES.with_borrow_mut(|(padded, acc)| {
        // Reused across planes, and zeroed again for each: the padding must read zero, and the
        // pixels are copied over the rest.
        padded.clear();
        padded.resize(hp * wp, 0.0);
        for (y, row) in src.chunks_exact(w).enumerate() {
            padded[(y + pt) * wp + pl..][..w].copy_from_slice(row);
        }
        // The last tap ends at `(kh - 1 + oh) * wp + kw - 1 <= hp * wp`: inside the plane.
        let len = oh * wp - (kw - 1);
        if acc.len() < oh * wp {
            acc.resize(oh * wp, 0.0);
        }
        accumulate_taps(padded, offsets, weights, &mut acc[..len]);
        for (drow, arow) in dst.chunks_exact_mut(ow).zip(acc.chunks(wp)) {
            drow.iter_mut().zip(&arow[..ow]).for_each(|(d, &v)| _ = d.write(v));
        }
    });
    // SAFETY: the loop above wrote every row of `dst` (`oh` rows of `ow`), and
    // `MaybeUninit<f32>` has the layout of `f32`.
    unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

thread_local! {
    /// Each rayon worker's padded plane and accumulator, reused across planes and calls.
    static PLANES: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A depthwise convolution of one channel, tap by tap over whole output rows so that the inner
/// loop is a vectorisable multiply-add; for any stride and dilation.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn depthwise_plane_rows(conv: &Conv2d, c: usize, src: &[f32], h: usize, w: usize, oh: usize, ow: usize, dst: &mut [f32]) {
    let (kh, kw) = conv.spec.kernel;
    let (sh, sw) = conv.spec.stride;
    let (dh, dw) = conv.spec.dilation;
    let (pt, pl) = (conv.spec.pads.0 as isize, conv.spec.pads.1 as isize);
    let weights = &conv.weights[c * kh * kw..][..kh * kw];
    for ky in 0..kh {
        for kx in 0..kw {
            let wv = weights[ky * kw + kx];
            // Output columns whose input column stays inside the image.
            let off_x = (kx * dw) as isize - pl;
            let x_lo = if off_x >= 0 { 0 } else { ((-off_x) as usize).div_ceil(sw) };
            let x_hi = if (w as isize) <= off_x { 0 } else { ((w as isize - off_x) as usize).div_ceil(sw).min(ow) };
            if x_lo >= x_hi {
                continue;
            }
            for oy in 0..oh {
                let iy = (oy * sh) as isize - pt + (ky * dh) as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let srow = &src[iy as usize * w..][..w];
                let drow = &mut dst[oy * ow..][..ow];
                if sw == 1 {
                    let start = (x_lo as isize + off_x) as usize;
                    let s = &srow[start..start + (x_hi - x_lo)];
                    for (d, &v) in drow[x_lo..x_hi].iter_mut().zip(s) {
                        *d += wv * v;
                    }
                } else {
                    for ox in x_lo..x_hi {
                        drow[ox] += wv * srow[(ox as isize * sw as isize + off_x) as usize];
                    }
                }
            }
        }
    }
}

/// `acc[i] = sum over taps t of weights[t] * padded[i + offsets[t]]`: every tap of a vector of
/// outputs while it is in registers, in the CPU's widest vectors.
fn accumulate_taps(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) {
    assert_eq!(offsets.len(), weights.len());
    assert!(offsets.iter().all(|&o| o + acc.len() <= padded.len()), "a tap reads past the plane");
    #[cfg(target_arch = "x86_64")]
    {
        use super::super::simd::{Avx2, Avx512, Lanes};
        /// # Safety
        /// The CPU has `V`'s features; the caller checked that every tap of every output lies
        /// inside `padded`.
        #[inline(always)]
        unsafe fn vectors<V: Lanes>(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) -> usize {
            // Blocks of `BLOCK` vectors first: each tap's multiply-add depends on the previous
            // one into the same sum, so one vector at a time waits on the FMA's latency at every
            // tap; `BLOCK` independent sums keep both FMA units busy.
            const BLOCK: usize = 8;
            let blocked = acc.len() / (BLOCK * V::LEN) * (BLOCK * V::LEN);
            let whole = acc.len() / V::LEN * V::LEN;
            // SAFETY: output `i + V::LEN - 1 < acc.len()` reads `padded[i + V::LEN - 1 + o]`,
            // inside `padded` (checked by the caller); the CPU has `V`'s features.
            unsafe {
                for i in (0..blocked).step_by(BLOCK * V::LEN) {
                    let mut sums = [V::splat(0.0); BLOCK];
                    for (&o, &w) in offsets.iter().zip(weights) {
                        let w = V::splat(w);
                        let from = padded.as_ptr().add(i + o);
                        for (b, sum) in sums.iter_mut().enumerate() {
                            *sum = w.mul_add(V::load(from.add(b * V::LEN)), *sum);
                        }
                    }
                    for (b, sum) in sums.iter().enumerate() {
                        sum.store(acc.as_mut_ptr().add(i + b * V::LEN));
                    }
                }
                for i in (blocked..whole).step_by(V::LEN) {
                    let mut sum = V::splat(0.0);
                    for (&o, &w) in offsets.iter().zip(weights) {
                        sum = V::splat(w).mul_add(V::load(padded.as_ptr().add(i + o)), sum);
                    }
                    sum.store(acc.as_mut_ptr().add(i));
                }
            }
            whole
        }
        #[target_feature(enable = "avx512f")]
        fn avx512(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) -> usize {
            // SAFETY: AVX-512F is enabled; the bounds were checked above.
            unsafe { vectors::<Avx512>(padded, offsets, weights, acc) }
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32]) -> usize {
            // SAFETY: AVX2 and FMA are enabled; the bounds were checked above.
            unsafe { vectors::<Avx2>(padded, offsets, weights, acc) }
        }
        let done = match Isa::detect() {
            // SAFETY: `Isa::detect` checked that the CPU has the features.
            Some(Isa::Avx512) => unsafe { avx512(padded, offsets, weights, acc) },
            // SAFETY: as above.
            Some(Isa::Avx2) => unsafe { avx2(padded, offsets, weights, acc) },
            None => 0,
        };
        accumulate_taps_scalar(padded, offsets, weights, acc, done);
    }
    #[cfg(not(target_arch = "x86_64"))]
    accumulate_taps_scalar(padded, offsets, weights, acc, 0);
}

/// [`accumulate_taps`] for outputs `from..`.
fn accumulate_taps_scalar(padded: &[f32], offsets: &[usize], weights: &[f32], acc: &mut [f32], from: usize) {
    for (i, a) in acc.iter_mut().enumerate().skip(from) {
        *a = offsets.iter().zip(weights).map(|(&o, &w)| w * padded[i + o]).sum();
    }
}
