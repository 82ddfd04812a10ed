//! Max pooling of NCHW planes on the CPU. Separable: first the maximum along each row over
//! every window's width, then of those row maxima down each window's height, so a `kh x kw`
//! window costs `kh + kw` comparisons per output instead of `kh * kw`. The loops are plain
//! Rust over whole padded planes, compiled with AVX-512 or AVX2 where the CPU has them so that
//! they vectorise at that width.

use crate::detect::kernels::parallel;

use super::isa::{Vectors, vectors};

/// A max pooling's window, strides and padding (top, left, bottom, right), checked when it is
/// made: positive sizes and strides, and each side's padding narrower than the window, so that
/// every window holds at least one input pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool {
    kernel: (usize, usize),
    stride: (usize, usize),
    pads: (usize, usize, usize, usize),
}

impl MaxPool {
    pub fn new(kernel: (usize, usize), stride: (usize, usize), pads: (usize, usize, usize, usize)) -> Option<Self> {
        let (pt, pl, pb, pr) = pads;
        let fits = kernel.0 > 0 && kernel.1 > 0 && stride.0 > 0 && stride.1 > 0 && pt.max(pb) < kernel.0 && pl.max(pr) < kernel.1;
        fits.then_some(MaxPool { kernel, stride, pads })
    }

    /// The output of an `h x w` input, `None` when the padded input is smaller than the window.
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let ((kh, kw), (sh, sw), (pt, pl, pb, pr)) = (self.kernel, self.stride, self.pads);
        let (padded_h, padded_w) = (h + pt + pb, w + pl + pr);
        (h > 0 && w > 0 && padded_h >= kh && padded_w >= kw).then(|| ((padded_h - kh) / sh + 1, (padded_w - kw) / sw + 1))
    }

    /// Pools every `h x w` plane of `input` (whose length is a multiple of `h * w`), in
    /// parallel over planes; `None` when the window does not fit (see [`output_size`](Self::output_size)).
    pub fn run(&self, input: &[f32], h: usize, w: usize) -> Option<Vec<f32>> {
        let (oh, ow) = self.output_size(h, w)?;
        assert!(input.len().is_multiple_of(h * w), "whole planes");
        let planes = input.len() / (h * w);
        // A few tasks per thread: one task per 20x20 plane spent more on the handing out than on
        // the pooling.
        let per_task = planes.div_ceil(8 * parallel::threads()).max(1);
        let mut out = vec![0.0f32; planes * oh * ow];
        let vectors = vectors();
        parallel::for_each_chunk_mut(&mut out, per_task * oh * ow, |task, dst| {
            let src = &input[task * per_task * h * w..][..dst.len() / (oh * ow) * h * w];
            SCRATCH.with_borrow_mut(|scratch| {
                scratch.resize(self.scratch_len(h, w), 0.0);
                for (dst, src) in dst.chunks_exact_mut(oh * ow).zip(src.chunks_exact(h * w)) {
                    pool_plane(vectors, self, src, (h, w), dst, scratch);
                }
            })
        });
        Some(out)
    }
}

impl MaxPool {
    /// Floats of scratch for an `h x w` plane: the padded plane, its row maxima, and the
    /// maxima down the rows, each rounded up to whole runs (see `pool_plane_body`).
    fn scratch_len(&self, h: usize, w: usize) -> usize {
        let (pt, pl, pb, pr) = self.pads;
        let rows_len = ((h + pt + pb) * (w + pl + pr) + RUN).next_multiple_of(RUN);
        3 * rows_len + self.kernel.1
    }
}

thread_local! {
    /// Each rayon worker's scratch ([`MaxPool::scratch_len`]), reused across planes and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`pool_plane_body`] compiled for `vectors`.
fn pool_plane(vectors: Vectors, pool: &MaxPool, src: &[f32], size: (usize, usize), dst: &mut [f32], scratch: &mut [f32]) {
    assert!(vectors.supported(), "this CPU lacks the chosen instructions");
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(pool: &MaxPool, src: &[f32], size: (usize, usize), dst: &mut [f32], scratch: &mut [f32]) {
            pool_plane_body(pool, src, size, dst, scratch)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(pool: &MaxPool, src: &[f32], size: (usize, usize), dst: &mut [f32], scratch: &mut [f32]) {
            pool_plane_body(pool, src, size, dst, scratch)
        }
        match vectors {
            // SAFETY: the CPU has AVX-512F (asserted above).
            Vectors::Avx512 => return unsafe { avx512(pool, src, size, dst, scratch) },
            // SAFETY: the CPU has AVX2 and FMA (asserted above).
            Vectors::Avx2 => return unsafe { avx2(pool, src, size, dst, scratch) },
            Vectors::Scalar => {}
        }
    }
    pool_plane_body(pool, src, size, dst, scratch)
}

/// Floats per vector loop iteration: four AVX-512 vectors.
const RUN: usize = 64;

/// The larger of two floats as one `max` instruction (`f32::max` adds a NaN check that
/// blends: three instructions per vector).
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a { b } else { a }
}

/// One `h x w` plane (`src`) into its `oh x ow` output (`dst`), through `scratch`
/// ([`MaxPool::scratch_len`]). Written as loops over whole planes where it can, with no
/// closures: the compiler vectorises a loop four vectors at a time, so a loop over one row of
/// 20 would run scalar; and a closure is not always inlined into the `#[target_feature]`
/// function, so compiled outside it, it would not vectorise at that width.
#[inline(always)]
fn pool_plane_body(pool: &MaxPool, src: &[f32], (h, w): (usize, usize), dst: &mut [f32], scratch: &mut [f32]) {
    let ((kh, kw), (sh, sw), (pt, pl, pb, pr)) = (pool.kernel, pool.stride, pool.pads);
    let (oh, ow) = pool.output_size(h, w).expect("the callers' input fits the window");
    // The plane with its padding as -inf (`hp x wp`), and more -inf after it: each pass runs
    // over whole multiples of `RUN` floats, which the compiler's unrolled vector loop takes
    // with no scalar remainder.
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    let rows_len = (hp * wp + RUN).next_multiple_of(RUN);
    let (padded, rest) = scratch.split_at_mut(rows_len + kw);
    let (row_maxima, rest) = rest.split_at_mut(rows_len);
    padded.fill(f32::NEG_INFINITY);
    for (y, row) in src.chunks_exact(w).enumerate() {
        copy_row(&mut padded[(y + pt) * wp + pl..][..w], row);
    }
    // `row_maxima[i]` is the max of `padded[i..i + kw]`: for `i = y * wp + x`, the window of
    // row `y` from column `x` (windows that run into the next row are never read).
    max_of_taps(row_maxima, padded, 1, kw);
    if (sh, sw) == (1, 1) {
        // Then down the rows, over whole planes: `maxima[i]` is the max of
        // `row_maxima[i + ky * wp]`, `ky < kh`; output row `oy` is `maxima[oy * wp..][..ow]`.
        // The last tap read, `(kh - 1) * wp + len - 1`, is below `hp * wp + RUN` (`oh + kh - 1
        // = hp` at stride 1), inside `row_maxima`.
        let maxima = &mut rest[..((oh - 1) * wp + ow).next_multiple_of(RUN)];
        max_of_taps(maxima, row_maxima, wp, kh);
        for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
            copy_row(out_row, &maxima[oy * wp..][..ow]);
        }
    } else {
        // Strided: each output pixel's column of row maxima.
        for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
            for (ox, out) in out_row.iter_mut().enumerate() {
                let mut max = f32::NEG_INFINITY;
                for ky in 0..kh {
                    max = larger(max, row_maxima[(oy * sh + ky) * wp + ox * sw]);
                }
                *out = max;
            }
        }
    }
}

/// `maxima[i]` = the max of `taps[i + k * step]` for `k < count` (`count > 0`): the first two
/// taps out of place, then the others in place. (An in-place pass written as `if b > a { b }
/// else { a }` compiled to masked stores, which store only the lanes that change and are slow
/// on AMD's CPUs: SPPF's 5x5 poolings of 128 planes of 20x20 took 163 us on 2 threads, against
/// 41 us with `f32::max`, which is three instructions a vector.)
#[inline(always)]
fn max_of_taps(maxima: &mut [f32], taps: &[f32], step: usize, count: usize) {
    let len = maxima.len();
    assert!(count > 0 && taps.len() >= len + (count - 1) * step, "max_of_taps bounds");
    if count == 1 {
        maxima.copy_from_slice(&taps[..len]);
        return;
    }
    let (first, second) = (&taps[..len], &taps[step..step + len]);
    for i in 0..len {
        maxima[i] = larger(first[i], second[i]);
    }
    for k in 2..count {
        let tap = &taps[k * step..k * step + len];
        for i in 0..len {
            maxima[i] = maxima[i].max(tap[i]);
        }
    }
}

/// `dst = src` in pieces of fixed sizes, which the compiler turns into vector moves: a call to
/// `memcpy` for each row of a 20x20 plane (and each of its output rows) took a third of the
/// pooling's time.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy_row lengths");
    let (mut dst_chunks, mut src_chunks) = (dst.chunks_exact_mut(8), src.chunks_exact(8));
    for (d, s) in (&mut dst_chunks).zip(&mut src_chunks) {
        let s: &[f32; 8] = s.try_into().expect("chunks of 8");
        d.copy_from_slice(s);
    }
    let (dst, src) = (dst_chunks.into_remainder(), src_chunks.remainder());
    let mut at = 0;
    for piece in [4, 2, 1] {
        if dst.len() - at >= piece {
            dst[at..at + piece].copy_from_slice(&src[at..at + piece]);
            at += piece;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: the max over each window's pixels inside the input.
    fn reference(input: &[f32], (h, w): (usize, usize), pool: &MaxPool) -> Vec<f32> {
        let (oh, ow) = pool.output_size(h, w).unwrap();
        let ((kh, kw), (sh, sw), (pt, pl, ..)) = (pool.kernel, pool.stride, pool.pads);
        let mut out = Vec::new();
        for plane in input.chunks_exact(h * w) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let taps = (0..kh).flat_map(|ky| (0..kw).map(move |kx| ((oy * sh + ky) as isize - pt as isize, (ox * sw + kx) as isize - pl as isize)));
                    let inside = taps.filter(|&(y, x)| (0..h as isize).contains(&y) && (0..w as isize).contains(&x));
                    out.push(inside.map(|(y, x)| plane[y as usize * w + x as usize]).fold(f32::NEG_INFINITY, f32::max));
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_every_instruction_set() {
        let (h, w) = (9, 23);
        let input: Vec<f32> = (0..7 * h * w).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        for (kernel, stride, pads) in
            [((5, 5), (1, 1), (2, 2, 2, 2)), ((3, 3), (2, 2), (1, 1, 1, 1)), ((2, 2), (2, 2), (0, 0, 0, 0)), ((3, 3), (1, 1), (0, 2, 1, 0))]
        {
            let pool = MaxPool::new(kernel, stride, pads).unwrap();
            let want = reference(&input, (h, w), &pool);
            for v in [Vectors::Avx512, Vectors::Avx2, Vectors::Scalar].into_iter().filter(|v| v.supported()) {
                let (oh, ow) = pool.output_size(h, w).unwrap();
                let mut got = vec![0.0; want.len()];
                let mut scratch = vec![0.0; pool.scratch_len(h, w)];
                for (dst, src) in got.chunks_exact_mut(oh * ow).zip(input.chunks_exact(h * w)) {
                    pool_plane(v, &pool, src, (h, w), dst, &mut scratch);
                }
                assert_eq!(got, want, "{v:?} {kernel:?} {stride:?} {pads:?}");
            }
            assert_eq!(pool.run(&input, h, w).unwrap(), want, "in parallel, {kernel:?} {stride:?} {pads:?}");
        }
    }

    #[test]
    fn windows_that_do_not_fit_are_refused() {
        assert_eq!(MaxPool::new((3, 3), (1, 1), (3, 0, 0, 0)), None);
        assert_eq!(MaxPool::new((0, 3), (1, 1), (0, 0, 0, 0)), None);
        assert_eq!(MaxPool::new((3, 3), (0, 1), (0, 0, 0, 0)), None);
        let pool = MaxPool::new((5, 5), (1, 1), (0, 0, 0, 0)).unwrap();
        assert_eq!(pool.output_size(4, 9), None);
        assert_eq!(pool.output_size(5, 9), Some((1, 5)));
    }
}
