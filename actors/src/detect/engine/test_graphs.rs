//! Tiny hand-built graphs for the pass tests: node and constant builders, a model around them,
//! and the comparison against candle running the unfused graph.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::Engine;
use crate::detect::model::{Attribute, GraphInput, Node, OnnxModel, TensorData, TensorValues};

/// The tolerance of every comparison with candle: the kernels sum in another order.
const TOLERANCE: f32 = 1e-5;

/// A node named after its first output.
pub(super) fn node(op_type: &str, inputs: &[&str], outputs: &[&str], attributes: &[(&str, Attribute)]) -> Node {
    Node {
        name: format!("{op_type}:{}", outputs[0]),
        op_type: op_type.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

/// Deterministic values in `[-1, 1)`, different for each `seed`.
pub(super) fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A float constant of `shape` with [`values`] from `seed`.
pub(super) fn floats(shape: &[usize], seed: u64) -> TensorData {
    TensorData { shape: shape.to_vec(), values: TensorValues::F32(values(shape.iter().product(), seed)) }
}

/// A float scalar constant.
pub(super) fn scalar(value: f32) -> TensorData {
    TensorData { shape: vec![], values: TensorValues::F32(vec![value]) }
}

/// A 1-D integer constant (a shape, axes, sizes).
pub(super) fn ints(v: &[i64]) -> TensorData {
    TensorData { shape: vec![v.len()], values: TensorValues::I64(v.to_vec()) }
}

/// A graph with one input `x` and one output `out`.
pub(super) fn model(nodes: Vec<Node>, initializers: &[(&str, TensorData)]) -> OnnxModel {
    OnnxModel {
        nodes,
        initializers: initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        inputs: vec![GraphInput { name: "x".into(), shape: Vec::new() }],
        outputs: vec!["out".into()],
        metadata: HashMap::new(),
    }
}

/// A constant as a CPU tensor, for the candle reference.
pub(super) fn tensor(data: &TensorData) -> Tensor {
    super::tensor_from_data(data, &Device::Cpu).unwrap()
}

/// The operator types of `nodes`, in order.
pub(super) fn op_types(nodes: &[Node]) -> Vec<&str> {
    nodes.iter().map(|n| n.op_type.as_str()).collect()
}

/// Plans `model` on the CPU (every fusion and folding pass) and runs it on `x`.
pub(super) fn plan_and_run(model: &OnnxModel, x: &Tensor) -> (Engine, Tensor) {
    let engine = Engine::plan(model, &Device::Cpu).unwrap();
    let out = engine.run(x.clone()).unwrap();
    (engine, out)
}

/// Asserts that `got` has `want`'s shape and its elements within [`TOLERANCE`].
pub(super) fn assert_close(got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims());
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (g, w)) in flat(got).into_iter().zip(flat(want)).enumerate() {
        assert!((g - w).abs() <= TOLERANCE, "element {i}: {g} against candle's {w}");
    }
}
