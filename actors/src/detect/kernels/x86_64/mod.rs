//! The x86-64 microkernels, one file per instruction set: each holds the register-tiled
//! matrix-product kernel, the packing routines compiled for its vector width, and its
//! [`Lanes`](super::simd::Lanes) for the element-wise kernels. The matrix-product code is chosen
//! at run time by [`isa`](super::isa), which alone calls it. [`depthwise_lanes`] is the
//! depthwise kernel for small planes, with channels in the lanes, for both.

pub(super) mod amx;
pub(super) mod avx2;
pub(super) mod avx512;
pub(super) mod depthwise_lanes;

/// The rows of a channel's plane (`src_len` floats, rows of `w`) that a `split_plane_by_4`
/// ([`avx2::split_plane_by_4`], [`avx512::split_plane_by_4`]) splits into 16 phase planes of
/// `dst_len` floats in all (`plane` apart, rows of `wp` places, `pt` rows and `pl` columns of
/// padding first): checks what their stores rely on. Panics unless the plane is whole rows,
/// each row's pixels fall inside its phase rows, and every phase row lies inside the planes.
fn phase_rows_by_4(src_len: usize, (w, pt, pl): (usize, usize, usize), dst_len: usize, (plane, wp): (usize, usize)) -> usize {
    assert!(w > 0 && src_len.is_multiple_of(w) && pl + w <= 4 * wp, "split_plane_by_4: {w}-pixel rows into {wp} places");
    let h = src_len / w;
    // The furthest phase row: phase 15, row `(h - 1 + pt) / 4`.
    assert!(h == 0 || 15 * plane + ((h - 1 + pt) / 4 + 1) * wp <= dst_len, "split_plane_by_4: the phase rows lie inside the planes");
    h
}
