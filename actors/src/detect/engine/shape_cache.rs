//! Values that depend only on the input's shape, kept from one run to the next.
//!
//! A dynamic export rebuilds its anchor grid and strides on every call from `Shape`: a chain
//! of `Shape`, `Gather`, `Range`, `Expand`, `Concat` and arithmetic whose results are the same
//! for every frame of one size (about 0.2 ms of YOLO11n's dynamic export on 2 cores). Such a
//! step is *shape-derived*: a `Shape`, or a step that reads only constants and shape-derived
//! values. Its results are computed on the first run for an input shape and reused while the
//! shape stays the same.
//!
//! This holds when the shape of every tensor follows from the input's shape alone, which is
//! the case unless an operator takes its output's shape from computed data. The plan therefore
//! caches nothing when any shape argument (a `Reshape` target, a `Slice` bound, a `Range`, ...)
//! is neither constant nor shape-derived.

use std::collections::HashSet;
use std::sync::Mutex;

use candle_core::Tensor;

use super::{Op, Step};

/// Which steps are shape-derived, and their results for the last input shape.
#[derive(Debug, Default)]
pub(super) struct ShapeCache {
    /// Per step of the plan.
    derived: Vec<bool>,
    last: Mutex<Option<Cached>>,
}

/// The shape-derived values of one input shape: `(slot, value)`.
#[derive(Debug)]
struct Cached {
    input_dims: Vec<usize>,
    values: Vec<(usize, Tensor)>,
}

impl ShapeCache {
    /// Finds the shape-derived steps of `steps` (whose `constants` are known), or none when a
    /// shape argument comes from data.
    pub(super) fn plan(steps: &[Step], constants: &HashSet<usize>) -> Self {
        let mut derived_slots: HashSet<usize> = HashSet::new();
        let mut derived = Vec::with_capacity(steps.len());
        for step in steps {
            let known = |slot: &usize| constants.contains(slot) || derived_slots.contains(slot);
            let is_derived = matches!(step.op, Op::Shape { .. }) || (step.inputs.iter().flatten().next().is_some() && step.inputs.iter().flatten().all(known));
            let arguments = shape_arguments(&step.op);
            let from_data = step.inputs.iter().enumerate().any(|(i, slot)| arguments.contains(&i) && slot.is_some_and(|slot| !known(&slot)));
            if !is_derived && from_data {
                return ShapeCache::default();
            }
            if is_derived {
                derived_slots.extend(&step.outputs);
            }
            derived.push(is_derived);
        }
        ShapeCache { derived, last: Mutex::new(None) }
    }

    /// Whether step `index` is shape-derived.
    pub(super) fn is_derived(&self, index: usize) -> bool {
        self.derived.get(index).copied().unwrap_or(false)
    }

    /// The shape-derived values for an input of `input_dims`, if the last run had that shape.
    pub(super) fn values_for(&self, input_dims: &[usize]) -> Option<Vec<(usize, Tensor)>> {
        let last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        last.as_ref().filter(|cached| cached.input_dims == input_dims).map(|cached| cached.values.clone())
    }

    /// Keeps `values` (every shape-derived step's outputs) for `input_dims`.
    pub(super) fn keep(&self, input_dims: &[usize], values: Vec<(usize, Tensor)>) {
        if self.derived.iter().any(|&d| d) {
            *self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Cached { input_dims: input_dims.to_vec(), values });
        }
    }
}

/// The inputs of `op` that set the shape of its output.
fn shape_arguments(op: &Op) -> std::ops::Range<usize> {
    match op {
        Op::Reshape | Op::Expand | Op::Split { .. } | Op::Unsqueeze { .. } | Op::Reduce { .. } => 1..2,
        Op::Slice | Op::ResizeNearest => 1..usize::MAX,
        Op::Range | Op::ConstantOfShape { .. } => 0..usize::MAX,
        _ => 0..0,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::super::Engine;
    use super::super::test_graphs::{model, node, values};
    use crate::detect::model::{Attribute, TensorData, TensorValues};

    /// `out = Reshape(x, Shape(x)) + ConstantOfShape(Shape(x), 1)`: `x + 1`, with a shape argument
    /// and a constant that follow from the input's shape.
    fn plus_one() -> Engine {
        let one = Attribute::Tensor(TensorData { shape: vec![1], values: TensorValues::F32(vec![1.0]) });
        let nodes = vec![
            node("Shape", &["x"], &["s"], &[]),
            node("Reshape", &["x", "s"], &["r"], &[]),
            node("ConstantOfShape", &["s"], &["ones"], &[("value", one)]),
            node("Add", &["r", "ones"], &["out"], &[]),
        ];
        Engine::plan(&model(nodes, &[]), &Device::Cpu).unwrap()
    }

    #[test]
    fn shape_derived_values_are_kept_per_input_shape() {
        let engine = plus_one();
        assert_eq!(engine.steps.iter().map(|s| s.op_type.as_str()).collect::<Vec<_>>(), ["Shape", "Reshape", "ConstantOfShape", "Add"]);
        assert_eq!((0..4).map(|i| engine.shape_cache.is_derived(i)).collect::<Vec<_>>(), [true, false, true, false]);
        // Another shape between two runs of the first: each run sees its own shape's values.
        for (run, dims) in [[1, 2, 3, 4], [1, 2, 5, 4], [1, 2, 3, 4], [1, 2, 3, 4]].into_iter().enumerate() {
            let x = Tensor::from_vec(values(dims.iter().product(), run as u64), &dims, &Device::Cpu).unwrap();
            let got = engine.run(x.clone()).unwrap();
            let want = (x + 1.0).unwrap();
            assert_eq!(got.dims(), dims);
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "run {run}");
        }
    }

    #[test]
    fn a_shape_taken_from_data_turns_the_cache_off() {
        // `Reshape(Shape(x), Cast(x))`: the target shape is computed from `x`'s values.
        let nodes = vec![
            node("Shape", &["x"], &["s"], &[]),
            node("Cast", &["x"], &["data_shape"], &[("to", Attribute::Int(7))]),
            node("Reshape", &["s", "data_shape"], &["out"], &[]),
        ];
        let engine = Engine::plan(&model(nodes, &[]), &Device::Cpu).unwrap();
        assert!((0..engine.steps.len()).all(|i| !engine.shape_cache.is_derived(i)));
    }
}
