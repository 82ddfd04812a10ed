//! CPU kernels where candle's own are too slow for detection models: plain Rust over `f32`
//! slices, with explicit AVX-512 and AVX2 code where the compiler's vectorisation fell short
//! (chosen at run time); the `unsafe` blocks carry `SAFETY` notes.
//!
//! Laid out after tract's `linalg`, one concept per file:
//! - [`isa`]: which microkernel this CPU runs, and the dispatch to it; [`cache`]: the cache
//!   sizes every blocking constant derives from; [`parallel`]: the team of threads every
//!   kernel's parallel loop runs on;
//! - the packed matrix product: packing (`pack`), tiling (`tiling`), the fused epilogue
//!   (`epilogue`), the batched product (`matmul`), the microkernels per instruction set
//!   (`x86_64/avx2.rs`, `x86_64/avx512.rs`) and the portable fallback (`portable`);
//! - [`conv`]: pointwise, direct (phase planes), depthwise and the schedule;
//! - element-wise functions ([`activation`], on the lanes of `simd`), [`attention`], max
//!   pooling ([`pool`]), a channel softmax with a 1x1 convolution ([`softmax_dot`]),
//!   [`transpose`] and [`strided`] views.

pub mod activation;
pub mod attention;
pub mod cache;
pub mod conv;
mod epilogue;
pub mod isa;
mod matmul;
mod pack;
pub mod parallel;
pub mod pool;
mod portable;
mod simd;
pub mod softmax_dot;
pub mod strided;
mod tiling;
pub mod transpose;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// The packed matrix product under the path the engine calls it by, gathered from the modules
/// that hold its parts: detection ([`isa`](super::isa)), packing, tiling, the fused epilogue
/// and the batched product.
pub mod packed_gemm {
    pub use super::isa::available;
    pub use super::matmul::batched_matmul;
}

/// A raw pointer that may cross threads; every use writes a region no other task touches.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks that share a `SendPtr` read and write disjoint elements of one live
// allocation (see each use), so sending the pointer to another thread cannot create a data race.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: a shared `SendPtr` only hands out the pointer, and the tasks that
// dereference it touch disjoint elements.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking `self` makes closures capture the whole wrapper, not its raw-pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}
