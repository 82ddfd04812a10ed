//! Element-wise activations and the softmax over `f32` slices. Each is written twice: over
//! [`Lanes`] (explicit AVX-512 or AVX2+FMA vectors, chosen at run time) and as a scalar body for
//! other CPUs and for the tails shorter than a vector.

use super::isa::{Vectors, vectors};

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
pub(super) fn exp(x: f32) -> f32 {
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
    p = p * r + 5e-1;
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

/// Element-wise functions the engine applies in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryFn {
    Sigmoid,
    /// No planned graph has a SiLU left on its own today (the planner fuses it into the
    /// convolution before it); kept, with its tests, for one that it cannot fuse.
    #[cfg_attr(not(feature = "bench-internals"), allow(dead_code))]
    Silu,
    Exp,
}

/// The vector kernels, generic over the lanes.
mod lanes {
    use super::super::simd::{Lanes, MAX_LANES};
    use super::*;

    /// Rows whose exponentials a softmax computes side by side.
    const ROWS_AT_ONCE: usize = 8;

    /// Replaces every vector `$v` of `$xs` by `$body`; the tail goes through a zero-padded
    /// vector, so that short rows (a 40-pixel feature map row is 2.5 vectors) pay no scalar
    /// `exp`. A macro rather than a function taking a closure: a closure is not always inlined
    /// into the `#[target_feature]` function that calls it, and outside one every intrinsic in
    /// it becomes a call. Expands to unsafe operations: the CPU must have `$lanes`' features.
    macro_rules! each {
        ($lanes:ty, $xs:expr, |$v:ident| $body:expr) => {{
            let mut padded = [0.0f32; MAX_LANES];
            for chunk in $xs.chunks_mut(<$lanes>::LEN) {
                let whole = chunk.len() == <$lanes>::LEN;
                if !whole {
                    padded[..chunk.len()].copy_from_slice(chunk);
                }
                // `p` points at `LEN` floats: a whole chunk, or `padded` (`MAX_LANES >= LEN`).
                let p = if whole { chunk.as_mut_ptr() } else { padded.as_mut_ptr() };
                let $v = <$lanes>::load(p);
                ($body).store(p);
                if !whole {
                    chunk.copy_from_slice(&padded[..chunk.len()]);
                }
            }
        }};
    }

    /// Like `each!`, with `$group` (an expression over the array `$vs` of [`ROWS_AT_ONCE`]
    /// vectors, such as [`Lanes::silu_each`]) for whole groups of vectors and `$single` for
    /// the rest: the groups' long dependency chains run side by side.
    macro_rules! each_grouped {
        ($lanes:ty, $xs:expr, |$vs:ident| $group:expr, |$v:ident| $single:expr) => {{
            let group_len = <$lanes>::LEN * ROWS_AT_ONCE;
            let whole = $xs.len() / group_len * group_len;
            let (groups, rest) = $xs.split_at_mut(whole);
            for chunk in groups.chunks_exact_mut(group_len) {
                let p = chunk.as_mut_ptr();
                let mut $vs = [<$lanes>::splat(0.0); ROWS_AT_ONCE];
                for (i, v) in $vs.iter_mut().enumerate() {
                    *v = <$lanes>::load(p.add(i * <$lanes>::LEN));
                }
                for (i, v) in ($group).into_iter().enumerate() {
                    v.store(p.add(i * <$lanes>::LEN));
                }
            }
            each!($lanes, rest, |$v| $single);
        }};
    }

    /// # Safety
    /// The CPU has `V`'s features; the rest is [`bias_activation_tile`](super::bias_activation_tile)'s
    /// contract.
    #[inline(always)]
    pub unsafe fn bias_activation_tile<V: Lanes>(
        c: *mut f32,
        ldc: usize,
        width: usize,
        biases: &[f32],
        activation: Activation,
        residual: Option<(*const f32, usize)>,
    ) {
        for (r, &bias) in biases.iter().enumerate() {
            // SAFETY: row `r` of the tile and of the residual, inside the regions the caller
            // vouches for; the features are the caller's contract.
            unsafe {
                let row = std::slice::from_raw_parts_mut(c.add(r * ldc), width);
                bias_activation::<V>(row, bias, activation);
                if let Some((res, ldr)) = residual {
                    let res = std::slice::from_raw_parts(res.add(r * ldr), width);
                    add_assign::<V>(row, res);
                }
            }
        }
    }

    /// Each row of `rows` (`scales.len()` floats each) times `scales`, element-wise.
    ///
    /// # Safety
    /// The CPU has `V`'s features.
    #[inline(always)]
    pub unsafe fn scale_columns<V: Lanes>(rows: &mut [f32], scales: &[f32]) {
        for row in rows.chunks_exact_mut(scales.len()) {
            let (mut x, mut y) = (row.chunks_exact_mut(V::LEN), scales.chunks_exact(V::LEN));
            for (a, b) in (&mut x).zip(&mut y) {
                // SAFETY: whole vectors of both; the features are the caller's contract.
                unsafe { V::load(a.as_ptr()).mul(V::load(b.as_ptr())).store(a.as_mut_ptr()) }
            }
            x.into_remainder().iter_mut().zip(y.remainder()).for_each(|(a, b)| *a *= b);
        }
    }

    /// `xs += ys`, element-wise.
    ///
    /// # Safety
    /// The CPU has `V`'s features.
    #[inline(always)]
    unsafe fn add_assign<V: Lanes>(xs: &mut [f32], ys: &[f32]) {
        let (mut x, mut y) = (xs.chunks_exact_mut(V::LEN), ys.chunks_exact(V::LEN));
        for (a, b) in (&mut x).zip(&mut y) {
            // SAFETY: whole vectors of both; the features are the caller's contract.
            unsafe { V::load(a.as_ptr()).add(V::load(b.as_ptr())).store(a.as_mut_ptr()) }
        }
        x.into_remainder().iter_mut().zip(y.remainder()).for_each(|(a, b)| *a += b);
    }

    /// # Safety
    /// The CPU has `V`'s features.
    #[inline(always)]
    pub unsafe fn bias_activation<V: Lanes>(xs: &mut [f32], bias: f32, activation: Activation) {
        // SAFETY: the caller's contract, for every use of `V` below.
        unsafe {
            let b = V::splat(bias);
            match activation {
                Activation::Identity => each!(V, xs, |v| v.add(b)),
                Activation::Silu => each_grouped!(
                    V,
                    xs,
                    |vs| {
                        // (A loop, not `map`: a closure would not inherit the caller's target
                        // features.)
                        let mut biased = vs;
                        for v in &mut biased {
                            *v = v.add(b);
                        }
                        V::silu_each(biased)
                    },
                    |v| {
                        let v = v.add(b);
                        v.mul(v.sigmoid())
                    }
                ),
            }
        }
    }

    /// # Safety
    /// The CPU has `V`'s features.
    #[inline(always)]
    pub unsafe fn map<V: Lanes>(xs: &mut [f32], f: UnaryFn) {
        // SAFETY: the caller's contract, for every use of `V` below.
        unsafe {
            match f {
                UnaryFn::Sigmoid => each_grouped!(V, xs, |vs| V::sigmoid_each(vs), |v| v.sigmoid()),
                UnaryFn::Silu => each_grouped!(V, xs, |vs| V::silu_each(vs), |v| v.mul(v.sigmoid())),
                UnaryFn::Exp => each_grouped!(V, xs, |vs| V::exp_each(vs), |v| v.exp()),
            }
        }
    }

    /// # Safety
    /// The CPU has `V`'s features.
    #[inline(always)]
    pub unsafe fn softmax<V: Lanes>(xs: &mut [f32]) {
        // SAFETY: the caller's contract, for every use of `V` below; every pointer is a whole
        // vector of `xs`.
        unsafe {
            let mut chunks = xs.chunks_exact(V::LEN);
            let mut m = V::splat(f32::NEG_INFINITY);
            for chunk in &mut chunks {
                m = m.max(V::load(chunk.as_ptr()));
            }
            let max = chunks.remainder().iter().fold(m.reduce_max(), |a, &x| a.max(x));
            let (vmax, mut sum) = (V::splat(max), V::splat(0.0));
            let mut chunks = xs.chunks_exact_mut(V::LEN);
            for chunk in &mut chunks {
                let e = V::exp_of_nonpositive_each([V::load(chunk.as_ptr()).sub(vmax)])[0];
                e.store(chunk.as_mut_ptr());
                sum = sum.add(e);
            }
            let mut total = sum.reduce_sum();
            for x in chunks.into_remainder() {
                *x = exp(*x - max);
                total += *x;
            }
            let scale = 1.0 / total;
            each!(V, xs, |v| v.mul(V::splat(scale)));
        }
    }

    /// Softmax along the `len` rows of the `[len][stride]` block at `base`, for its columns
    /// `columns`: whole vectors of them, then the rest one at a time. With `inverse_sums`, the
    /// columns are left as the numerators `e^(x - max)`, and the reciprocal of each column's
    /// sum goes to `inverse_sums[c - columns.start]`, for a caller that divides later.
    ///
    /// # Safety
    /// The CPU has `V`'s features; `base` is valid for reads and writes of `len * stride`
    /// floats, of which no other thread touches these columns meanwhile; `inverse_sums`, if
    /// any, is valid for writes of `columns.len()` floats.
    #[inline(always)]
    pub unsafe fn softmax_columns<V: Lanes>(base: *mut f32, len: usize, stride: usize, columns: std::ops::Range<usize>, inverse_sums: Option<*mut f32>) {
        assert!(columns.end <= stride);
        let split = columns.start + columns.len() / V::LEN * V::LEN;
        // SAFETY: every pointer is a whole vector of columns `c..c + V::LEN <= split` of row
        // `r < len`; the rest is the caller's contract.
        unsafe {
            for c in (columns.start..split).step_by(V::LEN) {
                let at = |r: usize| base.add(r * stride + c);
                let mut max = V::load(at(0));
                for r in 1..len {
                    max = max.max(V::load(at(r)));
                }
                // Eight rows' exponentials side by side ([`Lanes::exp_of_nonpositive_each`]), then the rest.
                let mut sums = [V::splat(0.0); ROWS_AT_ONCE];
                let whole = len / ROWS_AT_ONCE * ROWS_AT_ONCE;
                for r0 in (0..whole).step_by(ROWS_AT_ONCE) {
                    let mut x = [max; ROWS_AT_ONCE];
                    for (i, x) in x.iter_mut().enumerate() {
                        *x = V::load(at(r0 + i)).sub(max);
                    }
                    for (i, (e, sum)) in V::exp_of_nonpositive_each(x).into_iter().zip(&mut sums).enumerate() {
                        e.store(at(r0 + i));
                        *sum = sum.add(e);
                    }
                }
                for r in whole..len {
                    let e = V::exp_of_nonpositive_each([V::load(at(r)).sub(max)])[0];
                    e.store(at(r));
                    sums[0] = sums[0].add(e);
                }
                let mut sum = sums[0];
                for s in &sums[1..] {
                    sum = sum.add(*s);
                }
                let scale = sum.recip();
                match inverse_sums {
                    Some(sums) => scale.store(sums.add(c - columns.start)),
                    None => {
                        for r in 0..len {
                            V::load(at(r)).mul(scale).store(at(r));
                        }
                    }
                }
            }
            softmax_columns_scalar(base, len, stride, split..columns.end, inverse_sums.map(|sums| sums.add(split - columns.start)));
        }
    }
}

/// Like [`lanes::softmax_columns`], one column at a time.
///
/// # Safety
/// As for [`lanes::softmax_columns`], with no CPU features needed.
unsafe fn softmax_columns_scalar(base: *mut f32, len: usize, stride: usize, columns: std::ops::Range<usize>, inverse_sums: Option<*mut f32>) {
    let first = columns.start;
    for c in columns {
        // SAFETY: element `(r, c)` of the block, `r < len` (the caller's contract).
        let at = |r: usize| unsafe { &mut *base.add(r * stride + c) };
        let max = (0..len).map(|r| *at(r)).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for r in 0..len {
            let e = exp(*at(r) - max);
            *at(r) = e;
            sum += e;
        }
        let scale = 1.0 / sum;
        match inverse_sums {
            // SAFETY: place `c - first < columns.len()` (the caller's contract).
            Some(sums) => unsafe { sums.add(c - first).write(scale) },
            None => {
                for r in 0..len {
                    *at(r) *= scale;
                }
            }
        }
    }
}

/// Softmax along the rows of a `[len][inner]` block (an axis that is not the innermost), in
/// place. The columns are independent, so they are split among the current rayon pool's
/// threads: the DFL head's softmax is a single block.
pub fn softmax_columns_inplace(block: &mut [f32], len: usize, inner: usize) {
    softmax_columns_with(vectors(), block, len, inner)
}

fn softmax_columns_with(vectors: Vectors, block: &mut [f32], len: usize, inner: usize) {
    use crate::detect::kernels::parallel;
    assert!(vectors.supported(), "this CPU lacks the chosen instructions");
    const COLUMNS: usize = 1024;
    assert_eq!(block.len(), len * inner);
    if block.is_empty() {
        return;
    }
    let base = super::SendPtr(block.as_mut_ptr());
    parallel::for_each(inner.div_ceil(COLUMNS), |chunk| {
        let columns = chunk * COLUMNS..((chunk + 1) * COLUMNS).min(inner);
        // SAFETY: `block` is borrowed for the whole loop, `len * inner` floats; each task
        // touches only its own columns; the CPU has `vectors`' instructions (asserted above).
        unsafe { softmax_columns_on(vectors, base.get(), len, inner, columns, None) }
    });
}

/// The numerators of a softmax down `columns` of a `[len][stride]` block (`e^(x - max)`), in
/// place, and in `inverse_sums` the reciprocal of each column's sum, on the calling thread (for
/// callers that are themselves parallel tasks). Attention divides its few outputs by the sums
/// instead of dividing every score.
pub fn softmax_numerators_block(block: &mut [f32], len: usize, stride: usize, columns: std::ops::Range<usize>, inverse_sums: &mut [f32]) {
    assert!(block.len() >= len * stride && columns.end <= stride, "columns outside the block");
    assert_eq!(inverse_sums.len(), columns.len(), "one sum per column");
    // SAFETY: the block is borrowed mutably and holds `len * stride` floats, and
    // `inverse_sums` holds one float per column (asserted); the CPU has the instructions
    // `vectors()` chose.
    unsafe { softmax_columns_on(vectors(), block.as_mut_ptr(), len, stride, columns, Some(inverse_sums.as_mut_ptr())) }
}

/// [`lanes::softmax_columns`] compiled for `vectors`.
///
/// # Safety
/// As for [`lanes::softmax_columns`]; the CPU has `vectors`' features.
unsafe fn softmax_columns_on(vectors: Vectors, base: *mut f32, len: usize, stride: usize, columns: std::ops::Range<usize>, sums: Option<*mut f32>) {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// As for `softmax_columns_on`; the CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(base: *mut f32, len: usize, stride: usize, columns: std::ops::Range<usize>, sums: Option<*mut f32>) {
            // SAFETY: the caller's contract; compiled with AVX-512F.
            unsafe { lanes::softmax_columns::<super::simd::Avx512>(base, len, stride, columns, sums) }
        }
        /// # Safety
        /// As for `softmax_columns_on`; the CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(base: *mut f32, len: usize, stride: usize, columns: std::ops::Range<usize>, sums: Option<*mut f32>) {
            // SAFETY: the caller's contract; compiled with AVX2 and FMA.
            unsafe { lanes::softmax_columns::<super::simd::Avx2>(base, len, stride, columns, sums) }
        }
        match vectors {
            // SAFETY: the caller's contract (the CPU has the chosen features).
            Vectors::Avx512 => return unsafe { avx512(base, len, stride, columns, sums) },
            // SAFETY: as above.
            Vectors::Avx2 => return unsafe { avx2(base, len, stride, columns, sums) },
            Vectors::Scalar => {}
        }
    }
    // SAFETY: the caller's contract.
    unsafe { softmax_columns_scalar(base, len, stride, columns, sums) }
}

/// Defines `pub fn $name(args)`: the vector kernel `lanes::$kernel` compiled with AVX-512 or
/// AVX2+FMA, whichever [`vectors`] chose, else the scalar `$fallback`; and `$on(vectors, args)`
/// for a given choice (which must be supported).
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident / $on:ident ($($arg:ident: $ty:ty),*) => $kernel:ident, $fallback:expr) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            $on(vectors(), $($arg),*)
        }

        fn $on(vectors: Vectors, $($arg: $ty),*) {
            assert!(vectors.supported(), "this CPU lacks the chosen instructions");
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    // SAFETY: compiled with, and only called on a CPU with, AVX-512F.
                    unsafe { lanes::$kernel::<super::simd::Avx512>($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    // SAFETY: compiled with, and only called on a CPU with, AVX2 and FMA.
                    unsafe { lanes::$kernel::<super::simd::Avx2>($($arg),*) }
                }
                match vectors {
                    // SAFETY: the CPU has AVX-512F (asserted above).
                    Vectors::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the CPU has AVX2 and FMA (asserted above).
                    Vectors::Avx2 => return unsafe { avx2($($arg),*) },
                    Vectors::Scalar => {}
                }
            }
            $fallback
        }
    };
}

dispatch!(
    /// Adds `bias` to every element, then applies `activation`, in place.
    bias_activation / bias_activation_on(xs: &mut [f32], bias: f32, activation: Activation) => bias_activation,
    bias_activation_body(xs, bias, activation)
);

/// A convolution's epilogue on one output tile in a single pass: adds `biases[r]` to row `r`
/// of the `biases.len() x width` tile at `c` (rows `ldc` apart), applies `activation`, then adds
/// the matching row of `residual` (`(start, row stride)`), when given.
///
/// # Safety
/// `c` is valid for reads and writes of the tile and `residual` for reads of a tile of the same
/// shape; no other thread touches either meanwhile.
pub unsafe fn bias_activation_tile(c: *mut f32, ldc: usize, width: usize, biases: &[f32], activation: Activation, residual: Option<(*const f32, usize)>) {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// As for `bias_activation_tile`; the CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(c: *mut f32, ldc: usize, width: usize, biases: &[f32], activation: Activation, residual: Option<(*const f32, usize)>) {
            // SAFETY: the caller's contract; compiled with AVX-512F.
            unsafe { lanes::bias_activation_tile::<super::simd::Avx512>(c, ldc, width, biases, activation, residual) }
        }
        /// # Safety
        /// As for `bias_activation_tile`; the CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(c: *mut f32, ldc: usize, width: usize, biases: &[f32], activation: Activation, residual: Option<(*const f32, usize)>) {
            // SAFETY: the caller's contract; compiled with AVX2 and FMA.
            unsafe { lanes::bias_activation_tile::<super::simd::Avx2>(c, ldc, width, biases, activation, residual) }
        }
        match vectors() {
            // SAFETY: the caller's contract; `vectors()` only chooses what the CPU has.
            Vectors::Avx512 => return unsafe { avx512(c, ldc, width, biases, activation, residual) },
            // SAFETY: as above.
            Vectors::Avx2 => return unsafe { avx2(c, ldc, width, biases, activation, residual) },
            Vectors::Scalar => {}
        }
    }
    for (r, &bias) in biases.iter().enumerate() {
        // SAFETY: row `r` of each tile (the caller's contract).
        unsafe {
            let row = std::slice::from_raw_parts_mut(c.add(r * ldc), width);
            bias_activation_body(row, bias, activation);
            if let Some((res, ldr)) = residual {
                row.iter_mut().zip(std::slice::from_raw_parts(res.add(r * ldr), width)).for_each(|(a, b)| *a += b);
            }
        }
    }
}

dispatch!(
    /// Applies `f` to every element in place.
    map_inplace / map_on(xs: &mut [f32], f: UnaryFn) => map,
    map_body(xs, f)
);

dispatch!(
    /// Multiplies each row of `rows` (`scales.len()` floats each; a shorter last row is left
    /// as it is) by `scales`, element-wise.
    scale_columns / scale_columns_on(rows: &mut [f32], scales: &[f32]) => scale_columns,
    rows.chunks_exact_mut(scales.len()).for_each(|row| row.iter_mut().zip(scales).for_each(|(a, b)| *a *= b))
);

dispatch!(
    /// Replaces a row by its softmax, in place.
    softmax_inplace / softmax_on(xs: &mut [f32]) => softmax,
    softmax_body(xs)
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel variant this CPU runs, scalar included.
    fn variants() -> Vec<Vectors> {
        [Vectors::Avx512, Vectors::Avx2, Vectors::Scalar].into_iter().filter(|v| v.supported()).collect()
    }

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
    fn vector_kernels_match_the_definitions() {
        // 1011 values: whole groups of vectors (side by side) first, and a length that is not a
        // multiple of any vector, so the padded tails run too; the extremes in both.
        let extremes = [-1000.0, 1000.0, 87.5, -87.5, 0.0];
        let mut xs: Vec<f32> = extremes.to_vec();
        xs.extend((0..1001).map(|i| (i as f32 - 500.0) / 37.0));
        xs.extend(extremes);
        for v in variants() {
            let mut e = xs.clone();
            map_on(v, &mut e, UnaryFn::Exp);
            let mut sig = xs.clone();
            map_on(v, &mut sig, UnaryFn::Sigmoid);
            let mut silu = xs.clone();
            map_on(v, &mut silu, UnaryFn::Silu);
            let mut biased = xs.clone();
            bias_activation_on(v, &mut biased, 0.5, Activation::Silu);
            for (i, &x) in xs.iter().enumerate() {
                let clamped = x.clamp(-87.0, 88.0) as f64;
                let want_exp = clamped.exp();
                assert!(((e[i] as f64 - want_exp) / want_exp).abs() < 3e-6, "{v:?} exp({x}) = {}", e[i]);
                let s = |x: f64| 1.0 / (1.0 + (-x.clamp(-88.0, 87.0)).exp());
                let x64 = x as f64;
                // Relative where `f32` has its full precision: the sigmoid of a very negative
                // input is tiny, and still a score.
                let tolerance = if s(x64) >= f32::MIN_POSITIVE as f64 { 2e-6 * s(x64) } else { f32::MIN_POSITIVE as f64 };
                assert!((sig[i] as f64 - s(x64)).abs() < tolerance, "{v:?} sigmoid({x}) = {}", sig[i]);
                assert!((silu[i] as f64 - x64 * s(x64)).abs() < 1e-6 * (1.0 + x64.abs()), "{v:?} silu({x}) = {}", silu[i]);
                let b = x64 + 0.5;
                assert!((biased[i] as f64 - b * s(b)).abs() < 1e-6 * (1.0 + b.abs()), "{v:?} bias+silu({x})");
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        for v in variants() {
            for len in [5, 33, 400] {
                let mut row: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 / 3.0).collect();
                row[len - 1] = 1000.0;
                row[0] = -50.0;
                softmax_on(v, &mut row);
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{v:?} len {len}");
                assert!((row[len - 1] - 1.0).abs() < 1e-6 && row[0] < 1e-30);
            }
        }
    }

    #[test]
    fn softmax_over_a_strided_axis_matches_rows() {
        // More columns than one task takes, and not a multiple of a vector.
        let (len, inner) = (16, 2 * 1024 + 37);
        let data: Vec<f32> = (0..len * inner).map(|i| ((i * 37) % 101) as f32 / 9.0).collect();
        for v in variants() {
            let mut by_columns = data.clone();
            softmax_columns_with(v, &mut by_columns, len, inner);
            for c in 0..inner {
                let mut column: Vec<f32> = (0..len).map(|r| data[r * inner + c]).collect();
                softmax_on(Vectors::Scalar, &mut column);
                for r in 0..len {
                    assert!((column[r] - by_columns[r * inner + c]).abs() < 1e-6, "{v:?} column {c}");
                }
            }
        }
    }

    #[test]
    fn softmax_numerators_scaled_by_their_sums_are_the_softmax() {
        // Columns 3..40 of 43: a vector part and a tail, with others left alone.
        let (len, stride, columns) = (19, 43, 3..40);
        let data: Vec<f32> = (0..len * stride).map(|i| ((i * 29) % 83) as f32 / 7.0 - 4.0).collect();
        let mut want = data.clone();
        // SAFETY: the block holds `len * stride` floats; the scalar path needs no CPU features.
        unsafe { softmax_columns_scalar(want.as_mut_ptr(), len, stride, columns.clone(), None) };
        for v in variants() {
            let mut got = data.clone();
            let mut sums = vec![0.0; columns.len()];
            // SAFETY: as above, with one sum per column; the CPU has `v`'s features.
            unsafe { softmax_columns_on(v, got.as_mut_ptr(), len, stride, columns.clone(), Some(sums.as_mut_ptr())) };
            for row in got.chunks_exact_mut(stride) {
                scale_columns_on(v, &mut row[columns.clone()], &sums);
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-6, "{v:?} [{i}] {g} vs {w}");
            }
        }
    }
}
