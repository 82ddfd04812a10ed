//! CPU kernels where candle's own are too slow for detection models. Each kernel is plain Rust
//! over `f32` slices, vectorised by the compiler; the few `unsafe` blocks carry `SAFETY` notes.

pub mod activation;
pub mod conv;
pub mod packed_gemm;
mod simd;
pub mod transpose;
