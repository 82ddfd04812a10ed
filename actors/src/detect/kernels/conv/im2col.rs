//! The portable path's patch matrix: one row of a tile's im2col columns at a time.

use super::Conv2d;

impl Conv2d {
    /// Fills `dst` with row `kk` (input channel, kernel row, kernel column) of the patches of
    /// output pixels `p0..p0 + dst.len()`, zero where the kernel reads padding; `plane` is that
    /// input channel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn im2col_row(&self, plane: &[f32], h: usize, w: usize, ow: usize, p0: usize, kk: usize, dst: &mut [f32]) {
        let (kh, kw) = self.spec.kernel;
        let (sh, sw) = self.spec.stride;
        let (dh, dw) = self.spec.dilation;
        let (pt, pl) = (self.spec.pads.0 as isize, self.spec.pads.1 as isize);
        let (ky, kx) = (kk / kw % kh, kk % kw);
        let width = dst.len();
        let mut p = p0;
        let mut filled = 0;
        while filled < width {
            let (oy, ox) = (p / ow, p % ow);
            let run = (ow - ox).min(width - filled);
            let iy = (oy * sh) as isize - pt + (ky * dh) as isize;
            let dst = &mut dst[filled..filled + run];
            if iy < 0 || iy >= h as isize {
                dst.fill(0.0);
            } else {
                let src = &plane[iy as usize * w..][..w];
                let ix0 = (ox * sw) as isize - pl + (kx * dw) as isize;
                // Columns j with 0 <= ix0 + j*sw < w read the image; the rest is padding.
                let j_lo = if ix0 >= 0 { 0 } else { ((-ix0) as usize).div_ceil(sw) }.min(run);
                let j_hi = if ix0 >= w as isize { 0 } else { ((w as isize - ix0) as usize).div_ceil(sw) };
                let j_hi = j_hi.clamp(j_lo, run);
                dst[..j_lo].fill(0.0);
                dst[j_hi..].fill(0.0);
                // A run that reads only padding (one that begins in the right-hand padding, as
                // the small tiles of many threads can) has no `first` inside the row.
                if j_lo < j_hi {
                    let first = (ix0 + (j_lo * sw) as isize) as usize;
                    let inside = &mut dst[j_lo..j_hi];
                    if sw == 1 {
                        inside.copy_from_slice(&src[first..first + inside.len()]);
                    } else {
                        for (d, &v) in inside.iter_mut().zip(src[first..].iter().step_by(sw)) {
                            *d = v;
                        }
                    }
                }
            }
            filled += run;
            p += run;
        }
    }
}
