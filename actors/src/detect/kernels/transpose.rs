//! Axis permutation of a contiguous `f32` tensor.
//!
//! Axes that stay neighbours are merged first; what remains in detection models is either a
//! batched 2-D transpose (done in cache-sized blocks) or a permutation that keeps the innermost
//! axis (done as row copies). Anything else falls back to a strided gather.

use crate::detect::kernels::parallel;

/// Below this many elements the work is not split across threads.
const PARALLEL_MIN: usize = 1 << 15;
/// Rows and columns per block of a 2-D transpose: a source block and its destination
/// (8 KiB together) stay in L1 while the block is copied.
const BLOCK: usize = 32;
const _: () = assert!(2 * BLOCK * BLOCK * std::mem::size_of::<f32>() <= super::cache::L1_BYTES / 2);

/// Merges output axes that are consecutive in the input. Returns the input dims and the
/// permutation of the merged tensor.
fn collapse(dims: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    // Groups of output axes whose input axes are consecutive.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &axis in perm {
        match groups.last_mut() {
            Some(g) if *g.last().expect("groups are never empty") + 1 == axis => g.push(axis),
            _ => groups.push(vec![axis]),
        }
    }
    // Input order of the groups gives the merged input dims.
    let mut by_input: Vec<usize> = (0..groups.len()).collect();
    by_input.sort_by_key(|&g| groups[g][0]);
    let merged_dims: Vec<usize> = by_input.iter().map(|&g| groups[g].iter().map(|&a| dims[a]).product()).collect();
    let mut position = vec![0; groups.len()];
    for (i, &g) in by_input.iter().enumerate() {
        position[g] = i;
    }
    (merged_dims, position)
}

/// Returns `input` (with `dims`) permuted so that output axis `i` is input axis `perm[i]`.
pub fn permute(input: &[f32], dims: &[usize], perm: &[usize]) -> Vec<f32> {
    assert_eq!(input.len(), dims.iter().product::<usize>());
    let (dims, perm) = collapse(dims, perm);
    let mut out = vec![0.0f32; input.len()];
    if input.is_empty() {
        return out;
    }
    match (dims.as_slice(), perm.as_slice()) {
        (_, [0]) => out.copy_from_slice(input),
        (&[rows, cols], [1, 0]) => transpose_2d_batched(input, 1, rows, cols, &mut out),
        (&[batch, rows, cols], [0, 2, 1]) => transpose_2d_batched(input, batch, rows, cols, &mut out),
        _ if perm.last() == Some(&(perm.len() - 1)) => permute_rows(input, &dims, &perm, &mut out),
        _ => permute_gather(input, &dims, &perm, &mut out),
    }
    out
}

fn transpose_2d_batched(input: &[f32], batch: usize, rows: usize, cols: usize, out: &mut [f32]) {
    let plane = rows * cols;
    // Work items: (batch, block of output rows = input columns).
    let col_blocks = cols.div_ceil(BLOCK);
    let vectors = super::isa::Isa::detect().is_some();
    let run = |b: usize, cb: usize, dst: &mut [f32]| {
        // `dst` holds output rows c0..c1 of plane b (each `rows` long).
        let src = &input[b * plane..][..plane];
        let c0 = cb * BLOCK;
        let c1 = (c0 + BLOCK).min(cols);
        for r0 in (0..rows).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(rows);
            // Whole 8x8 tiles as eight vector registers; the edges one element at a time.
            let (r8, c8) = if vectors { (r0 + (r1 - r0) / 8 * 8, c0 + (c1 - c0) / 8 * 8) } else { (r0, c0) };
            for r in (r0..r8).step_by(8) {
                for c in (c0..c8).step_by(8) {
                    // SAFETY: rows `r..r + 8` and columns `c..c + 8` lie inside the plane
                    // (`r8 <= rows`, `c8 <= cols`), and output rows `c - c0..c - c0 + 8`,
                    // columns `r..r + 8`, inside `dst`; the CPU has AVX (a microkernel ISA
                    // implies it).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        transpose_8x8(src.as_ptr().add(r * cols + c), cols, dst.as_mut_ptr().add((c - c0) * rows + r), rows)
                    };
                }
            }
            for c in c0..c1 {
                let d = &mut dst[(c - c0) * rows..][r0..r1];
                let done = if c < c8 { r8 - r0 } else { 0 };
                for (r, v) in (r0 + done..r1).zip(d[done..].iter_mut()) {
                    *v = src[r * cols + c];
                }
            }
        }
    };
    let chunk = BLOCK * rows;
    if input.len() < PARALLEL_MIN {
        for b in 0..batch {
            for (cb, dst) in out[b * plane..][..plane].chunks_mut(chunk).enumerate() {
                run(b, cb, dst);
            }
        }
    } else {
        // Blocks of output rows of each plane; the last of a plane may be short.
        let blocks = plane.div_ceil(chunk);
        let ranges: Vec<std::ops::Range<usize>> =
            (0..batch * blocks).map(|i| (i / blocks * plane + i % blocks * chunk)..(i / blocks * plane + (i % blocks * chunk + chunk).min(plane))).collect();
        parallel::for_each_range_mut(out, &ranges, |index, dst| run(index / blocks, index % blocks, dst));
    }
    debug_assert!(col_blocks * chunk >= plane);
}

/// Writes the transpose of the 8x8 block at `src` (rows `src_stride` apart) to `dst` (rows
/// `dst_stride` apart): interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
///
/// # Safety
/// The CPU has AVX; both blocks are inside their buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract covers the 8 rows read and the 8 rows written.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
        });
        // s[4g + j]: from t pairs (4g + 0, 4g + 2) and (4g + 1, 4g + 3).
        let s: [__m256; 8] = std::array::from_fn(|i| {
            let (g, j) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + j / 2], t[4 * g + j / 2 + 2]);
            if j % 2 == 0 { _mm256_shuffle_ps::<0x44>(a, b) } else { _mm256_shuffle_ps::<0xEE>(a, b) }
        });
        for i in 0..4 {
            _mm256_storeu_ps(dst.add(i * dst_stride), _mm256_permute2f128_ps::<0x20>(s[i], s[i + 4]));
            _mm256_storeu_ps(dst.add((i + 4) * dst_stride), _mm256_permute2f128_ps::<0x31>(s[i], s[i + 4]));
        }
    }
}

/// Input strides of the output axes.
fn strides_for(dims: &[usize], perm: &[usize]) -> Vec<usize> {
    let mut input_strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        input_strides[i] = input_strides[i + 1] * dims[i + 1];
    }
    perm.iter().map(|&a| input_strides[a]).collect()
}

/// The innermost axis stays innermost: copy whole rows.
fn permute_rows(input: &[f32], dims: &[usize], perm: &[usize], out: &mut [f32]) {
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    let strides = strides_for(dims, perm);
    let row = *out_dims.last().expect("rank >= 1");
    let outer = &out_dims[..out_dims.len() - 1];
    let copy_row = |r: usize, dst: &mut [f32]| {
        let mut rem = r;
        let mut offset = 0;
        for (d, s) in outer.iter().zip(&strides).rev() {
            offset += (rem % d) * s;
            rem /= d;
        }
        dst.copy_from_slice(&input[offset..offset + row]);
    };
    if input.len() < PARALLEL_MIN {
        out.chunks_mut(row).enumerate().for_each(|(r, dst)| copy_row(r, dst));
    } else {
        parallel::for_each_chunk_mut(out, row, copy_row);
    }
}

fn permute_gather(input: &[f32], dims: &[usize], perm: &[usize], out: &mut [f32]) {
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    let strides = strides_for(dims, perm);
    for (i, v) in out.iter_mut().enumerate() {
        let mut rem = i;
        let mut offset = 0;
        for (d, s) in out_dims.iter().zip(&strides).rev() {
            offset += (rem % d) * s;
            rem /= d;
        }
        *v = input[offset];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(input: &[f32], dims: &[usize], perm: &[usize]) -> Vec<f32> {
        let mut out = vec![0.0; input.len()];
        permute_gather(input, dims, perm, &mut out);
        out
    }

    #[test]
    fn matches_the_definition_for_model_shapes() {
        for (dims, perm) in [
            (vec![4, 40, 2, 32], vec![0, 2, 3, 1]),
            (vec![1, 20, 20, 64], vec![0, 3, 1, 2]),
            (vec![1, 192, 160], vec![0, 2, 1]),
            (vec![4, 40, 2, 32], vec![0, 2, 1, 3]),
            (vec![4, 2, 40, 40], vec![0, 1, 3, 2]),
            (vec![1, 4, 16, 840], vec![0, 2, 1, 3]),
            (vec![3, 5, 7], vec![2, 0, 1]),
            (vec![2, 3, 4, 5], vec![3, 1, 0, 2]),
            (vec![7], vec![0]),
            (vec![64, 300], vec![1, 0]),
            (vec![2, 67, 45], vec![0, 2, 1]),
            (vec![1, 192, 1600], vec![0, 2, 1]),
            // Large enough to run in parallel, with planes that end inside a block of rows.
            (vec![3, 200, 70], vec![0, 2, 1]),
        ] {
            let input: Vec<f32> = (0..dims.iter().product::<usize>()).map(|i| i as f32).collect();
            assert_eq!(permute(&input, &dims, &perm), reference(&input, &dims, &perm), "{dims:?} {perm:?}");
        }
    }
}
