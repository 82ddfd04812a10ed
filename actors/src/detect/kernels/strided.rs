//! Views of a buffer at fixed strides: how a chain of reshapes, axis permutations and splits
//! sees the tensor it starts from, worked out without moving any data. A kernel that reads a
//! view in place, or one strided copy at the end of the chain, replaces a copy per step.

use crate::detect::kernels::parallel;

use super::attention::MatrixBatch;
use super::softmax_dot::ChannelsView;

/// One run of elements at a fixed distance: `size` of them, `stride` floats apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    size: usize,
    stride: usize,
}

/// A tensor's elements inside a buffer. Each axis is a nest of [`Run`]s (outer first): a
/// reshape that merges axes whose strides do not nest keeps them as separate runs, so every
/// chain of reshapes, permutations and splits stays a view. Element `[i0, i1, ...]` lies at
/// `offset` plus, for each axis, the position of its index in that axis's runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StridedView {
    axes: Vec<Vec<Run>>,
    offset: usize,
}

impl StridedView {
    /// A row-major tensor of `dims`.
    pub fn contiguous(dims: &[usize]) -> Self {
        let mut stride = 1;
        let mut axes = vec![Vec::new(); dims.len()];
        for (axis, &size) in axes.iter_mut().zip(dims).rev() {
            axis.push(Run { size, stride });
            stride *= size;
        }
        StridedView { axes, offset: 0 }
    }

    pub fn dims(&self) -> Vec<usize> {
        self.axes.iter().map(|runs| runs.iter().map(|r| r.size).product()).collect()
    }

    pub fn len(&self) -> usize {
        self.dims().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Axis `i` of the result is axis `perm[i]` of `self`; `None` when `perm` is not a
    /// permutation of the axes.
    pub fn permute(&self, perm: &[usize]) -> Option<Self> {
        let mut seen = vec![false; self.axes.len()];
        if perm.len() != seen.len() || perm.iter().any(|&p| p >= seen.len() || std::mem::replace(&mut seen[p], true)) {
            return None;
        }
        Some(StridedView { axes: perm.iter().map(|&p| self.axes[p].clone()).collect(), offset: self.offset })
    }

    /// Elements `start..start + len` of `axis`; `None` when they do not fit, or when the axis
    /// nests several runs and the range does not cover whole steps of the outer one.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Option<Self> {
        let dims = self.dims();
        if axis >= dims.len() || start + len > dims[axis] {
            return None;
        }
        let mut view = self.clone();
        let runs: Vec<Run> = view.axes[axis].iter().copied().filter(|r| r.size != 1).collect();
        let Some((outer, inner)) = runs.split_first() else {
            // A single element: nothing to move.
            return Some(view);
        };
        let step: usize = inner.iter().map(|r| r.size).product();
        if !start.is_multiple_of(step) || !len.is_multiple_of(step) {
            return None;
        }
        view.offset += start / step * outer.stride;
        view.axes[axis] = std::iter::once(Run { size: len / step, stride: outer.stride }).chain(inner.iter().copied()).collect();
        Some(view)
    }

    /// The same elements, in the same order, seen with `dims`; `None` when the element counts
    /// differ or a run would have to be cut into pieces whose sizes do not divide it.
    pub fn reshape(&self, dims: &[usize]) -> Option<Self> {
        if dims.iter().product::<usize>() != self.len() {
            return None;
        }
        // All runs in order (those that nest merged), innermost last; new axes take them from
        // the inside out, cutting a run in two where an axis ends inside it.
        let mut runs = self.flat_runs();
        let mut axes = vec![Vec::new(); dims.len()];
        for (axis, &size) in axes.iter_mut().zip(dims).rev() {
            let mut left = size;
            while left > 1 {
                let run = runs.pop()?;
                if run.size <= left {
                    if left % run.size != 0 {
                        return None;
                    }
                    left /= run.size;
                    axis.push(run);
                } else {
                    if run.size % left != 0 {
                        return None;
                    }
                    axis.push(Run { size: left, stride: run.stride });
                    runs.push(Run { size: run.size / left, stride: run.stride * left });
                    left = 1;
                }
            }
            if size == 0 {
                axis.push(Run { size: 0, stride: 1 });
            }
            axis.reverse();
        }
        runs.is_empty().then_some(StridedView { axes, offset: self.offset })
    }

    /// An axis as a single run, merging runs that nest; `None` when they do not.
    fn single_run(runs: &[Run]) -> Option<Run> {
        let mut merged = Run { size: 1, stride: 1 };
        for run in runs.iter().filter(|r| r.size != 1) {
            merged = if merged.size == 1 {
                *run
            } else if merged.stride == run.stride * run.size {
                Run { size: merged.size * run.size, stride: run.stride }
            } else {
                return None;
            };
        }
        Some(merged)
    }

    /// The view as a batch of matrices over its last two axes (the others are the batch);
    /// `None` when either of those axes is not a single run.
    pub fn matrices(&self) -> Option<MatrixBatch> {
        let (cols, rest) = self.axes.split_last()?;
        let (rows, batch) = rest.split_last()?;
        let (rows, cols) = (Self::single_run(rows)?, Self::single_run(cols)?);
        let batch: Vec<Run> = batch.iter().flatten().copied().collect();
        MatrixBatch::new(
            self.offset,
            batch.iter().map(|r| r.size).collect(),
            batch.iter().map(|r| r.stride).collect(),
            (rows.size, cols.size),
            (rows.stride, cols.stride),
        )
    }

    /// The view as an NCHW input whose rows are runs of adjacent floats; `None` unless it has
    /// four axes, each a single run, the last of stride one.
    pub fn channels_view(&self) -> Option<ChannelsView> {
        let [n, c, h, w] = self.axes.as_slice() else { return None };
        let [n, c, h, w] = [n, c, h, w].map(|runs| Self::single_run(runs));
        let (n, c, h, w) = (n?, c?, h?, w?);
        (w.stride == 1 || w.size == 1).then_some(ChannelsView {
            offset: self.offset,
            dims: [n.size, c.size, h.size, w.size],
            strides: [n.stride, c.stride, h.stride],
        })
    }

    /// The runs of all axes in order, neighbours that nest merged into one.
    fn flat_runs(&self) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for run in self.axes.iter().flatten().copied().filter(|r| r.size != 1) {
            match out.last_mut() {
                Some(last) if last.stride == run.stride * run.size => *last = Run { size: last.size * run.size, stride: run.stride },
                _ => out.push(run),
            }
        }
        out
    }

    /// Whether the innermost elements lie next to each other, so that a copy moves whole runs.
    pub fn rows_are_adjacent(&self) -> bool {
        self.flat_runs().last().is_none_or(|r| r.stride == 1)
    }

    /// One past the furthest element the view reaches (0 when it has none).
    pub fn extent(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        self.offset + self.axes.iter().flatten().map(|r| (r.size - 1) * r.stride).sum::<usize>() + 1
    }

    /// Copies the viewed elements of `src`, in order, into a new contiguous buffer. Runs of the
    /// innermost axis are copied in parallel, slice to slice where their elements are adjacent.
    /// The buffer is not zeroed first: the runs cover it, and zeroing it was a pass on the
    /// calling thread alone, while the others waited.
    pub fn gather(&self, src: &[f32]) -> Vec<f32> {
        assert!(self.extent() <= src.len(), "the view reaches past its buffer");
        let len = self.len();
        if len == 0 {
            return Vec::new();
        }
        let runs = self.flat_runs();
        let Some((inner, outer)) = runs.split_last() else {
            return vec![src[self.offset]];
        };
        let mut out = Vec::with_capacity(len);
        parallel::for_each_chunk_mut(&mut out.spare_capacity_mut()[..len], inner.size, |mut row, dst| {
            let mut start = self.offset;
            for run in outer.iter().rev() {
                start += row % run.size * run.stride;
                row /= run.size;
            }
            if inner.stride == 1 {
                for (d, &value) in dst.iter_mut().zip(&src[start..start + inner.size]) {
                    d.write(value);
                }
            } else {
                for (j, d) in dst.iter_mut().enumerate() {
                    d.write(src[start + j * inner.stride]);
                }
            }
        });
        // SAFETY: the chunks of `inner.size` elements cover the first `len`, and each task
        // writes every element of its chunk.
        unsafe { out.set_len(len) };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element-by-element reference: the positions `view` reads, in order.
    fn walk(view: &StridedView) -> Vec<usize> {
        let runs: Vec<Run> = view.axes.iter().flatten().copied().collect();
        let mut out = Vec::new();
        let mut index = vec![0; runs.len()];
        for _ in 0..view.len() {
            out.push(view.offset + index.iter().zip(&runs).map(|(i, r)| i * r.stride).sum::<usize>());
            for a in (0..index.len()).rev() {
                index[a] += 1;
                if index[a] < runs[a].size {
                    break;
                }
                index[a] = 0;
            }
        }
        out
    }

    #[test]
    fn reshapes_of_contiguous_tensors_keep_the_order() {
        let base = StridedView::contiguous(&[2, 3, 4]);
        for dims in [&[24][..], &[6, 4], &[2, 12], &[1, 2, 1, 12, 1], &[4, 3, 2]] {
            let view = base.reshape(dims).unwrap();
            assert_eq!(walk(&view), (0..24).collect::<Vec<_>>(), "{dims:?}");
        }
        assert_eq!(base.reshape(&[5, 5]), None);
        // Transposed, the runs are 4 (adjacent) and 3 (4 apart): axes of 2 and 6 cut the 4 in
        // two, but an axis of 4 would need 4 elements out of the run of 3.
        let t = StridedView::contiguous(&[3, 4]).permute(&[1, 0]).unwrap();
        assert_eq!(walk(&t.reshape(&[2, 6]).unwrap()), vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        assert_eq!(t.reshape(&[3, 4]), None);
    }

    #[test]
    fn a_reshape_across_a_permutation_keeps_the_runs_apart() {
        // [192, 1600] transposed, then split as a detection model's attention does.
        let t = StridedView::contiguous(&[192, 1600]).permute(&[1, 0]).unwrap();
        let view = t.reshape(&[4, 400, 2, 96]).unwrap();
        let m = view.matrices().unwrap();
        assert_eq!((m.batch_strides(), m.row_stride(), m.col_stride()), (&[400, 1][..], 96 * 1600, 1600));
        let want: Vec<usize> = (0..4 * 400 * 2 * 96)
            .map(|i| {
                let (a, n, h, c) = (i / (400 * 192), i / 192 % 400, i / 96 % 2, i % 96);
                (h * 96 + c) * 1600 + a * 400 + n
            })
            .collect();
        assert_eq!(walk(&view), want);
        // Merging the transposed axes back interleaves them: two runs in one axis, in order.
        let merged = t.reshape(&[192 * 1600]).unwrap();
        assert_eq!(walk(&merged), (0..1600).flat_map(|n| (0..192).map(move |c| c * 1600 + n)).collect::<Vec<_>>());
        assert_eq!(merged.matrices(), None);
        // The channels of two heads that sit 96 apart, and pixels cut in rows of 40.
        let v = view.narrow(3, 64, 32).unwrap().reshape(&[1, 40, 40, 64]).unwrap().permute(&[0, 3, 1, 2]).unwrap();
        assert_eq!(v.dims(), vec![1, 64, 40, 40]);
        assert!(v.rows_are_adjacent());
        let want: Vec<usize> = (0..64 * 1600).map(|i| (i / 1600 / 32 * 96 + 64 + i / 1600 % 32) * 1600 + i % 1600).collect();
        assert_eq!(walk(&v), want);
    }

    #[test]
    fn narrowing_and_gathering_pick_the_right_elements() {
        let src: Vec<f32> = (0..2 * 6 * 5).map(|i| i as f32).collect();
        let view = StridedView::contiguous(&[2, 6, 5]).narrow(1, 2, 3).unwrap().permute(&[0, 2, 1]).unwrap();
        let got = view.gather(&src);
        let want: Vec<f32> = walk(&view).into_iter().map(|i| i as f32).collect();
        assert_eq!(got, want);
        let rows = StridedView::contiguous(&[2, 6, 5]).narrow(2, 1, 3).unwrap();
        assert_eq!(rows.gather(&src), walk(&rows).into_iter().map(|i| i as f32).collect::<Vec<_>>());
        // No element, and a single one (every axis of size 1).
        assert_eq!(StridedView::contiguous(&[2, 0, 5]).gather(&src), Vec::<f32>::new());
        let one = StridedView::contiguous(&[2, 6, 5]).narrow(0, 1, 1).unwrap().narrow(1, 3, 1).unwrap().narrow(2, 4, 1).unwrap();
        assert_eq!(one.gather(&src), vec![src[30 + 15 + 4]]);
        assert_eq!(StridedView::contiguous(&[2, 6, 5]).narrow(1, 4, 3), None);
        // A split of an axis made of two runs works along whole steps of the outer one.
        let two_runs = StridedView::contiguous(&[3, 4]).permute(&[1, 0]).unwrap().reshape(&[12]).unwrap();
        assert_eq!(walk(&two_runs.narrow(0, 3, 6).unwrap()), vec![1, 5, 9, 2, 6, 10]);
        assert_eq!(two_runs.narrow(0, 2, 6), None);
        assert_eq!(StridedView::contiguous(&[2, 3]).permute(&[0, 0]), None);
    }
}
