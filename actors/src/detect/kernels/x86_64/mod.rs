//! The x86-64 microkernels, one file per instruction set: each holds the register-tiled
//! matrix-product kernel and the packing routines compiled for its vector width. They are
//! chosen at run time by [`isa`](super::isa), which alone calls them.

pub(super) mod avx2;
pub(super) mod avx512;
