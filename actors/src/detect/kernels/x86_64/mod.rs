//! The x86-64 microkernels, one file per instruction set: each holds the register-tiled
//! matrix-product kernel, the packing routines compiled for its vector width, and its
//! [`Lanes`](super::simd::Lanes) for the element-wise kernels. The matrix-product code is chosen
//! at run time by [`isa`](super::isa), which alone calls it. [`depthwise_lanes`] is the
//! depthwise kernel for small planes, with channels in the lanes, for both.

pub(super) mod amx;
pub(super) mod avx2;
pub(super) mod avx512;
pub(super) mod depthwise_lanes;
