//! Chains of view operators — `Reshape`, `Transpose`, one output of a `Split` — as the planner
//! folds them into the step that reads their end: worked out as a [`StridedView`] of the
//! tensor the chain starts from when that is possible, run one operator at a time otherwise.
//! Attention models spend a copy per step on such chains (split heads, move axes, merge them
//! back); folded, the attention kernel reads its operands and writes its output in place.

use candle_core::{Result as CResult, Tensor};

use super::kernels::strided::StridedView;

/// One operator of a chain, with the constants it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewStep {
    /// ONNX `Reshape` to a constant shape (`0` keeps an axis, `-1` takes what is left).
    Reshape(Vec<i64>),
    /// Axis `i` of the result is axis `perm[i]` of the input (reversed when absent).
    Permute(Option<Vec<usize>>),
    /// Elements `start..start + len` of `axis` (one output of a `Split`).
    Narrow { axis: i64, start: usize, len: usize },
}

/// The dims of an ONNX `Reshape` of a tensor of `dims` to `spec`.
pub fn reshape_dims(dims: &[usize], spec: &[i64]) -> CResult<Vec<usize>> {
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            0 => out.push(*dims.get(i).ok_or_else(|| candle_core::Error::Msg(format!("reshape {spec:?} copies axis {i} of {dims:?}")))?),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            d if d > 0 => out.push(d as usize),
            d => candle_core::bail!("bad reshape dimension {d} in {spec:?}"),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !count.is_multiple_of(known) {
            candle_core::bail!("cannot reshape {dims:?} to {spec:?}");
        }
        out[i] = count / known;
    }
    if out.iter().product::<usize>() != count {
        candle_core::bail!("cannot reshape {dims:?} to {spec:?}");
    }
    Ok(out)
}

fn axis(axis: i64, rank: usize) -> CResult<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank {
        candle_core::bail!("axis {axis} out of range for rank {rank}");
    }
    Ok(a as usize)
}

fn permutation(perm: &Option<Vec<usize>>, rank: usize) -> Vec<usize> {
    perm.clone().unwrap_or_else(|| (0..rank).rev().collect())
}

impl ViewStep {
    /// The dims of this step's result for an input of `dims`.
    pub fn dims(&self, dims: &[usize]) -> CResult<Vec<usize>> {
        match self {
            ViewStep::Reshape(spec) => reshape_dims(dims, spec),
            ViewStep::Permute(perm) => {
                let perm = permutation(perm, dims.len());
                let view =
                    StridedView::contiguous(dims).permute(&perm).ok_or_else(|| candle_core::Error::Msg(format!("bad permutation {perm:?} of {dims:?}")))?;
                Ok(view.dims())
            }
            ViewStep::Narrow { axis: a, start, len } => {
                let a = axis(*a, dims.len())?;
                if start + len > dims[a] {
                    candle_core::bail!("split {start}..{} of an axis of {}", start + len, dims[a]);
                }
                let mut out = dims.to_vec();
                out[a] = *len;
                Ok(out)
            }
        }
    }

    /// `view` seen through this step; `Ok(None)` when that needs a copy.
    fn view(&self, view: &StridedView) -> CResult<Option<StridedView>> {
        let dims = self.dims(&view.dims())?;
        Ok(match self {
            ViewStep::Reshape(_) => view.reshape(&dims),
            ViewStep::Permute(perm) => view.permute(&permutation(perm, dims.len())),
            ViewStep::Narrow { axis: a, start, len } => view.narrow(axis(*a, dims.len())?, *start, *len),
        })
    }

    /// Runs this step on `t` with candle (a copy where candle needs one).
    pub fn apply(&self, t: &Tensor) -> CResult<Tensor> {
        match self {
            ViewStep::Reshape(spec) => t.reshape(reshape_dims(t.dims(), spec)?),
            ViewStep::Permute(perm) => t.permute(permutation(perm, t.rank())),
            ViewStep::Narrow { axis: a, start, len } => t.narrow(axis(*a, t.rank())?, *start, *len),
        }
    }
}

/// How a contiguous tensor of `dims` is seen at the end of `chain`; `Ok(None)` when some step
/// needs a copy. Errors are steps that do not fit their input.
pub fn view_through(dims: &[usize], chain: &[ViewStep]) -> CResult<Option<StridedView>> {
    let mut view = StridedView::contiguous(dims);
    for step in chain {
        match step.view(&view)? {
            Some(next) => view = next,
            None => return Ok(None),
        }
    }
    Ok(Some(view))
}

/// Runs `chain` on `t` one step at a time with candle.
#[cfg(test)]
fn apply_chain(t: &Tensor, chain: &[ViewStep]) -> CResult<Tensor> {
    chain.iter().try_fold(t.clone(), |t, step| step.apply(&t))
}

/// For a result of `dims` that goes through `chain` (reshapes and permutations only): the dims
/// at the chain's end, and where each element of the result lands in that contiguous end
/// tensor — so a kernel can write it there directly. `Ok(None)` when some step cannot be
/// undone without a copy.
pub fn placement_through(dims: &[usize], chain: &[ViewStep]) -> CResult<Option<(Vec<usize>, StridedView)>> {
    let mut shapes = vec![dims.to_vec()];
    for step in chain {
        let next = step.dims(shapes.last().expect("starts with one shape"))?;
        shapes.push(next);
    }
    let end = shapes.last().expect("starts with one shape").clone();
    // Undo the steps from the end: the inverse of a permutation is a permutation, that of a
    // reshape a reshape back.
    let mut view = StridedView::contiguous(&end);
    for (step, before) in chain.iter().zip(&shapes).rev() {
        let undone = match step {
            ViewStep::Reshape(_) => view.reshape(before),
            ViewStep::Permute(perm) => {
                let perm = permutation(perm, before.len());
                let mut inverse = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                view.permute(&inverse)
            }
            ViewStep::Narrow { .. } => None,
        };
        match undone {
            Some(v) => view = v,
            None => return Ok(None),
        }
    }
    Ok(Some((end, view)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn attention_output_chain() -> Vec<ViewStep> {
        vec![ViewStep::Permute(Some(vec![0, 3, 1, 2])), ViewStep::Reshape(vec![1, 40, 40, 64]), ViewStep::Permute(Some(vec![0, 3, 1, 2]))]
    }

    #[test]
    fn a_placement_puts_each_element_where_the_chain_takes_it() {
        let dims = [4, 2, 32, 400];
        let (end, placed) = placement_through(&dims, &attention_output_chain()).unwrap().unwrap();
        assert_eq!(end, vec![1, 64, 40, 40]);
        let m = placed.matrices().unwrap();
        assert_eq!((m.batch_strides(), m.row_stride(), m.col_stride()), (&[400, 32 * 1600][..], 1600, 1));
        // The attention kernel takes it as its output: no two elements share an offset.
        assert!(crate::detect::kernels::attention::OutputView::new(m).is_some());
        // The same as running the chain on a tensor that holds each element's index.
        let count: usize = dims.iter().product();
        let source = Tensor::arange(0f32, count as f32, &Device::Cpu).unwrap().reshape(&dims[..]).unwrap();
        let moved: Vec<f32> = apply_chain(&source, &attention_output_chain()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut scattered = vec![0f32; count];
        let gathered_order = placed.gather(&(0..count).map(|i| i as f32).collect::<Vec<_>>());
        for (i, &position) in gathered_order.iter().enumerate() {
            scattered[position as usize] = i as f32;
        }
        assert_eq!(scattered, moved);
    }

    #[test]
    fn a_chain_seen_as_a_view_matches_running_it() {
        let dims = [1, 192, 40, 40];
        let chain = [
            ViewStep::Reshape(vec![1, 192, -1]),
            ViewStep::Permute(Some(vec![0, 2, 1])),
            ViewStep::Reshape(vec![4, 400, 2, 96]),
            ViewStep::Narrow { axis: 3, start: 32, len: 32 },
            ViewStep::Permute(Some(vec![0, 2, 3, 1])),
        ];
        let count: usize = dims.iter().product();
        let data: Vec<f32> = (0..count).map(|i| i as f32).collect();
        let view = view_through(&dims, &chain).unwrap().unwrap();
        let source = Tensor::from_vec(data.clone(), &dims[..], &Device::Cpu).unwrap();
        let want: Vec<f32> = apply_chain(&source, &chain).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(view.dims(), vec![4, 2, 32, 400]);
        assert_eq!(view.gather(&data), want);
        // A bad step is an error.
        assert!(view_through(&dims, &[ViewStep::Reshape(vec![7, -1])]).is_err());
        assert!(view_through(&dims, &[ViewStep::Narrow { axis: 1, start: 190, len: 3 }]).is_err());
    }
}
