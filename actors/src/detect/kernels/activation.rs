//! Element-wise activations over `f32` slices, written so that LLVM vectorises them, and compiled
//! twice: once for the baseline x86-64 target and once with AVX2+FMA, chosen at run time.

/// What a convolution applies after adding its bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `x * sigmoid(x)`, ultralytics' default activation.
    Silu,
}

/// `e^x` to within a few ulp for the range that matters (inputs are clamped so the result is
/// finite and normal or zero). Branch-free so that it vectorises.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + 0.5).floor();
    let r = x - k * LN2_HI - k * LN2_LO;
    // Minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf coefficients).
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // 2^k without a float-to-int conversion (which does not vectorise): adding 2^23 puts the
    // integer k + 127 (in 1..=254 after the clamp) in the low mantissa bits; shifting them into
    // the exponent field shifts the rest out.
    e * f32::from_bits((k + 127.0 + 8_388_608.0).to_bits() << 23)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn bias_activation_body(xs: &mut [f32], bias: f32, activation: Activation) {
    match activation {
        Activation::Identity => xs.iter_mut().for_each(|x| *x += bias),
        Activation::Silu => xs.iter_mut().for_each(|x| {
            let v = *x + bias;
            *x = v * sigmoid(v);
        }),
    }
}

#[inline(always)]
fn map_body(xs: &mut [f32], f: UnaryFn) {
    match f {
        UnaryFn::Sigmoid => xs.iter_mut().for_each(|x| *x = sigmoid(*x)),
        UnaryFn::Silu => xs.iter_mut().for_each(|x| *x *= sigmoid(*x)),
        UnaryFn::Exp => xs.iter_mut().for_each(|x| *x = exp(*x)),
    }
}

/// Folds `xs` with 8 independent lanes, so that the compiler can vectorise a reduction whose
/// operation is not associative in floating point.
#[inline(always)]
fn fold_lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, x);
        }
    }
    let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    lanes.iter().fold(tail, |a, &x| f(a, x))
}

#[inline(always)]
fn softmax_body(xs: &mut [f32]) {
    let max = fold_lanes(xs, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    xs.iter_mut().for_each(|x| *x = exp(*x - max));
    let scale = 1.0 / fold_lanes(xs, 0.0, |a, b| a + b);
    xs.iter_mut().for_each(|x| *x *= scale);
}

/// Softmax over the rows of a `[len][inner]` block, for every one of its `inner` columns: the
/// axis is strided, the columns are contiguous, so every pass vectorises across columns.
#[inline(always)]
fn softmax_columns_body(block: &mut [f32], len: usize, inner: usize) {
    let mut acc = block[..inner].to_vec();
    for row in block.chunks_exact(inner).skip(1) {
        acc.iter_mut().zip(row).for_each(|(m, &x)| *m = if x > *m { x } else { *m });
    }
    for row in block.chunks_exact_mut(inner) {
        row.iter_mut().zip(&acc).for_each(|(x, &m)| *x = exp(*x - m));
    }
    acc.fill(0.0);
    for row in block.chunks_exact(inner) {
        acc.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
    }
    acc.iter_mut().for_each(|s| *s = 1.0 / *s);
    for row in block.chunks_exact_mut(inner).take(len) {
        row.iter_mut().zip(&acc).for_each(|(x, &r)| *x *= r);
    }
}

/// Element-wise functions the engine applies in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryFn {
    Sigmoid,
    Silu,
    Exp,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    pub fn bias_activation(xs: &mut [f32], bias: f32, activation: Activation) {
        bias_activation_body(xs, bias, activation)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn map(xs: &mut [f32], f: UnaryFn) {
        map_body(xs, f)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn softmax(xs: &mut [f32]) {
        softmax_body(xs)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn softmax_columns(block: &mut [f32], len: usize, inner: usize) {
        softmax_columns_body(block, len, inner)
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Adds `bias` to every element, then applies `activation`, in place.
pub fn bias_activation(xs: &mut [f32], bias: f32, activation: Activation) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::bias_activation(xs, bias, activation) };
    }
    bias_activation_body(xs, bias, activation)
}

/// Applies `f` to every element in place.
pub fn map_inplace(xs: &mut [f32], f: UnaryFn) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::map(xs, f) };
    }
    map_body(xs, f)
}

/// Replaces a row by its softmax, in place.
pub fn softmax_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::softmax(xs) };
    }
    softmax_body(xs)
}

/// Softmax along the rows of a `[len][inner]` block (an axis that is not the innermost), in
/// place.
pub fn softmax_columns_inplace(block: &mut [f32], len: usize, inner: usize) {
    assert_eq!(block.len(), len * inner);
    if block.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::softmax_columns(block, len, inner) };
    }
    softmax_columns_body(block, len, inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 2e-6, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp(-1000.0), (-87.0f32).exp());
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut row = vec![1.0, 2.0, 3.0, -50.0, 1000.0];
        softmax_inplace(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((row[4] - 1.0).abs() < 1e-6 && row[3] < 1e-30);
    }

    #[test]
    fn softmax_over_a_strided_axis_matches_rows() {
        let (len, inner) = (5, 7);
        let data: Vec<f32> = (0..len * inner).map(|i| ((i * 37) % 11) as f32 / 3.0).collect();
        let mut by_columns = data.clone();
        softmax_columns_inplace(&mut by_columns, len, inner);
        for c in 0..inner {
            let mut column: Vec<f32> = (0..len).map(|r| data[r * inner + c]).collect();
            softmax_inplace(&mut column);
            for r in 0..len {
                assert!((column[r] - by_columns[r * inner + c]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn dispatched_kernels_match_scalar_definitions() {
        let xs: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) / 37.0).collect();
        let mut silu = xs.clone();
        bias_activation(&mut silu, 0.5, Activation::Silu);
        let mut sig = xs.clone();
        map_inplace(&mut sig, UnaryFn::Sigmoid);
        for ((x, s), g) in xs.iter().zip(&silu).zip(&sig) {
            let v = x + 0.5;
            assert!((s - v / (1.0 + (-v).exp())).abs() < 1e-5);
            assert!((g - 1.0 / (1.0 + (-x).exp())).abs() < 1e-6);
        }
    }
}
