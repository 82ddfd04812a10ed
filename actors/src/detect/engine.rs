//! Executes an ONNX detection graph on candle tensors.
//!
//! Loading turns the graph into a plan once: every operator is parsed into a typed [`Op`]
//! (an operator or attribute we do not support is an error naming the node), `Conv → Sigmoid →
//! Mul` chains become one convolution with a fused SiLU (and skip connection), an attention
//! head's `MatMul → Softmax → MatMul` one fused op, convolution weights are laid out for the CPU
//! kernel, everything that depends only on constants is folded, and each value gets a slot that
//! is freed after its last use. On the CPU the plan then moves less data: chains of reshapes,
//! transposes and splits fold into the step that reads them ([`fold_views`]), and convolutions
//! read a channel concatenation where its parts lie ([`fold_concats_into_convs`]). Running the
//! plan is a loop over steps.
//!
//! On the CPU, convolutions, attention and most element-wise work run on streamdet's own
//! kernels ([`super::kernels`]); on other devices they use candle's operations.

use std::collections::HashMap;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::DetectError;
use super::kernels::activation::{Activation, UnaryFn};
use super::kernels::conv::{Conv2d, ConvSpec};
use super::kernels::{self, activation, attention, packed_gemm, transpose};
use super::model::{Attribute, Node, OnnxModel, TensorData, TensorValues};
use super::views::{self, ViewStep};

type CResult<T> = candle_core::Result<T>;

#[derive(Debug, Clone, Copy)]
enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy)]
enum ReduceKind {
    Max,
    Sum,
}

/// A convolution, ready for the CPU kernel and for candle's `conv2d`.
#[derive(Debug)]
struct ConvOp {
    conv: Conv2d,
    /// How many more parts of a channel concatenation follow the first (input 0), as inputs
    /// `CONV_MORE_PARTS..`; see [`fold_concats_into_convs`].
    concat_parts: usize,
    /// `[out, in/groups, kh, kw]` on the execution device, for non-CPU devices.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
}

#[derive(Debug)]
enum Op {
    Conv(Box<ConvOp>),
    Unary(UnaryFn),
    Binary(BinaryOp),
    Split { axis: i64, sizes: Option<Vec<i64>> },
    Concat { axis: i64 },
    MaxPool { kernel: (usize, usize), stride: (usize, usize), pads: (usize, usize, usize, usize) },
    ResizeNearest,
    Reshape,
    Transpose { perm: Option<Vec<usize>> },
    Softmax { axis: i64 },
    Slice,
    /// A matrix product; a flag means that operand arrives with its last two axes swapped (a
    /// transpose folded into the product's packing).
    /// `alpha * A x B`, each operand possibly read transposed.
    MatMul { a_transposed: bool, b_transposed: bool, alpha: f32 },
    /// `V x softmax(alpha * Q x K)^T` over the last two axes (attention, with `Q` rows as
    /// queries): inputs `Q`, `K`, `V`, each possibly stored with its last two axes swapped.
    /// `views` holds the view chains folded into it (see [`fold_views`]).
    Attention { q_transposed: bool, k_transposed: bool, v_transposed: bool, alpha: f32, views: Box<AttentionViews> },
    /// The end of a chain of views, copied out of the tensor the chain starts from in one pass.
    View(Vec<ViewStep>),
    Reduce { kind: ReduceKind, axes: Option<Vec<i64>>, keepdims: bool },
    Shape,
    Gather { axis: i64 },
    Unsqueeze { axes: Option<Vec<i64>> },
    Range,
    Cast { to: DType },
    ConstantOfShape { value: TensorData },
    Expand,
    Constant(TensorData),
    Identity,
}

#[derive(Debug)]
struct Step {
    node: String,
    op_type: String,
    op: Op,
    /// Input slots; `None` for an omitted optional input.
    inputs: Vec<Option<usize>>,
    outputs: Vec<usize>,
    /// Slots whose last use is this step.
    release: Vec<usize>,
}

/// Milliseconds and step count per operator type, from [`Engine::run_profiled`].
pub type OpProfile = std::collections::BTreeMap<String, (f64, usize)>;

/// The view chains folded into an attention step: per operand, from the tensor the step reads
/// to the operand; and from the step's result to the tensor it produces.
#[derive(Debug, Default)]
struct AttentionViews {
    operands: [Vec<ViewStep>; 3],
    result: Vec<ViewStep>,
}

/// A planned graph, ready to run.
#[derive(Debug)]
pub struct Engine {
    device: Device,
    steps: Vec<Step>,
    slot_count: usize,
    constants: Vec<(usize, Tensor)>,
    input_slot: usize,
    output_slot: usize,
}

fn unsupported(node: &Node, what: impl std::fmt::Display) -> DetectError {
    DetectError::Unsupported { node: node.name.clone(), op: node.op_type.clone(), message: what.to_string() }
}

fn attr_int(node: &Node, name: &str, default: i64) -> Result<i64, DetectError> {
    match node.attributes.get(name) {
        None => Ok(default),
        Some(Attribute::Int(v)) => Ok(*v),
        Some(_) => Err(unsupported(node, format!("attribute {name} is not an integer"))),
    }
}

fn attr_ints(node: &Node, name: &str) -> Result<Option<Vec<i64>>, DetectError> {
    match node.attributes.get(name) {
        None => Ok(None),
        Some(Attribute::Ints(v)) => Ok(Some(v.clone())),
        Some(Attribute::Int(v)) => Ok(Some(vec![*v])),
        Some(_) => Err(unsupported(node, format!("attribute {name} is not a list of integers"))),
    }
}

fn attr_string<'a>(node: &'a Node, name: &str) -> Option<&'a str> {
    match node.attributes.get(name) {
        Some(Attribute::String(s)) => Some(s),
        _ => None,
    }
}

/// The scale a fusion pass folded into a product (`streamdet.alpha`), 1 when there is none.
fn scale_attribute(node: &Node) -> f32 {
    match node.attributes.get("streamdet.alpha") {
        Some(Attribute::Float(v)) => *v,
        _ => 1.0,
    }
}

fn pair(node: &Node, values: Option<Vec<i64>>, default: usize) -> Result<(usize, usize), DetectError> {
    match values.as_deref() {
        None => Ok((default, default)),
        Some(&[a, b]) if a >= 0 && b >= 0 => Ok((a as usize, b as usize)),
        Some(v) => Err(unsupported(node, format!("expected two non-negative values, got {v:?}"))),
    }
}

fn pads4(node: &Node) -> Result<(usize, usize, usize, usize), DetectError> {
    if let Some(mode) = attr_string(node, "auto_pad") {
        if mode != "NOTSET" {
            return Err(unsupported(node, format!("auto_pad={mode}")));
        }
    }
    match attr_ints(node, "pads")?.as_deref() {
        None => Ok((0, 0, 0, 0)),
        Some(&[t, l, b, r]) if t >= 0 && l >= 0 && b >= 0 && r >= 0 => Ok((t as usize, l as usize, b as usize, r as usize)),
        Some(v) => Err(unsupported(node, format!("pads {v:?}"))),
    }
}

fn tensor_from_data(data: &TensorData, device: &Device) -> CResult<Tensor> {
    match &data.values {
        TensorValues::F32(v) => Tensor::from_vec(v.clone(), data.shape.as_slice(), device),
        TensorValues::I64(v) => Tensor::from_vec(v.clone(), data.shape.as_slice(), device),
    }
}

impl Engine {
    /// Plans `model` for `device`.
    pub fn plan(model: &OnnxModel, device: &Device) -> Result<Self, DetectError> {
        let input = model.inputs.first().ok_or_else(|| DetectError::BadModelText("the graph has no input".into()))?;
        let output = model.outputs.first().ok_or_else(|| DetectError::BadModelText("the graph has no output".into()))?;
        let nodes = fuse_conv_silu(&model.nodes);
        let nodes = fuse_conv_residual(&nodes, &model.initializers);
        let nodes = fuse_softmax(&nodes, &model.initializers);
        let nodes = fuse_matmul_scale(&nodes, &model.initializers);
        let nodes = fuse_transposed_matmul_operands(&nodes);
        let nodes = fuse_attention(&nodes);

        let mut slots: HashMap<String, usize> = HashMap::new();
        let slot_of = |name: &str, slots: &mut HashMap<String, usize>| {
            let next = slots.len();
            *slots.entry(name.to_string()).or_insert(next)
        };
        let mut constants: HashMap<usize, Tensor> = HashMap::new();
        let cpu = Device::Cpu;
        for (name, data) in &model.initializers {
            let slot = slot_of(name, &mut slots);
            let tensor = tensor_from_data(data, &cpu).map_err(|e| DetectError::BadModelText(format!("initializer {name:?}: {e}")))?;
            constants.insert(slot, tensor);
        }
        let input_slot = slot_of(&input.name, &mut slots);

        let mut steps = Vec::new();
        for node in &nodes {
            let op = parse_op(node, &model.initializers, device)?;
            let inputs: Vec<Option<usize>> =
                node.inputs.iter().map(|name| (!name.is_empty()).then(|| slot_of(name, &mut slots))).collect();
            let outputs: Vec<usize> = node.outputs.iter().map(|name| slot_of(name, &mut slots)).collect();
            let foldable = !matches!(op, Op::Conv(_)) && inputs.iter().flatten().all(|s| constants.contains_key(s));
            let step = Step { node: node.name.clone(), op_type: node.op_type.clone(), op, inputs, outputs, release: Vec::new() };
            if foldable {
                // Everything this node reads is known now: compute it once, on the CPU.
                let args: Vec<Option<&Tensor>> = step.inputs.iter().map(|s| s.map(|s| &constants[&s])).collect();
                let results = eval(&step.op, &args, &cpu).map_err(|e| execution_error(&step, e))?;
                for (slot, value) in step.outputs.iter().zip(results) {
                    constants.insert(*slot, value);
                }
            } else {
                steps.push(step);
            }
        }
        let output_slot = *slots.get(output).ok_or_else(|| DetectError::BadModelText(format!("output {output:?} is never produced")))?;
        let steps = fold_views(steps, &constants, output_slot, device);
        let mut steps = fold_concats_into_convs(steps, output_slot, device);

        // Keep only the constants that a step reads, moved to the device once.
        let mut last_use: HashMap<usize, usize> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            for slot in step.inputs.iter().flatten() {
                last_use.insert(*slot, i);
            }
        }
        let mut used_constants = Vec::new();
        for (slot, tensor) in constants {
            if last_use.contains_key(&slot) || slot == output_slot {
                let on_device = tensor.to_device(device).map_err(DetectError::from_candle)?;
                used_constants.push((slot, on_device));
            }
        }
        let constant_slots: Vec<usize> = used_constants.iter().map(|(s, _)| *s).collect();
        for (slot, i) in last_use {
            if slot != output_slot && slot != input_slot && !constant_slots.contains(&slot) {
                steps[i].release.push(slot);
            }
        }
        Ok(Engine { device: device.clone(), steps, slot_count: slots.len(), constants: used_constants, input_slot, output_slot })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the graph on `input` and returns its first output.
    pub fn run(&self, input: Tensor) -> Result<Tensor, DetectError> {
        self.run_profiled(input, None)
    }

    /// Like [`run`](Self::run); when `profile` is given, adds each step's wall time to the
    /// entry of its operator type (fused convolutions count as `Conv`).
    pub fn run_profiled(&self, input: Tensor, mut profile: Option<&mut OpProfile>) -> Result<Tensor, DetectError> {
        let mut values: Vec<Option<Tensor>> = vec![None; self.slot_count];
        for (slot, tensor) in &self.constants {
            values[*slot] = Some(tensor.clone());
        }
        values[self.input_slot] = Some(input);
        for step in &self.steps {
            let args: Vec<Option<&Tensor>> = step.inputs.iter().map(|s| s.and_then(|s| values[s].as_ref())).collect();
            let started = profile.is_some().then(std::time::Instant::now);
            let results = eval(&step.op, &args, &self.device).map_err(|e| execution_error(step, e))?;
            if let (Some(profile), Some(started)) = (profile.as_deref_mut(), started) {
                let entry = profile.entry(profile_key(step)).or_default();
                entry.0 += started.elapsed().as_secs_f64() * 1000.0;
                entry.1 += 1;
            }
            for (slot, value) in step.outputs.iter().zip(results) {
                values[*slot] = Some(value);
            }
            for slot in &step.release {
                values[*slot] = None;
            }
        }
        values[self.output_slot].take().ok_or_else(|| DetectError::BadModelText("the output was never computed".into()))
    }
}

/// The profile entry of a step: its operator type, with convolutions split by kind since
/// their kernels differ.
fn profile_key(step: &Step) -> String {
    match &step.op {
        Op::Conv(c) => {
            let conv = c.conv.spec();
            let kind = if conv.groups > 1 && conv.groups == conv.in_channels {
                "depthwise"
            } else if conv.kernel == (1, 1) {
                "1x1"
            } else {
                "kxk"
            };
            format!("Conv {kind}")
        }
        _ => step.op_type.clone(),
    }
}

fn execution_error(step: &Step, err: candle_core::Error) -> DetectError {
    DetectError::Execution { node: step.node.clone(), op: step.op_type.clone(), message: err.to_string() }
}

/// Rewrites `y = Conv(x); s = Sigmoid(y); z = Mul(y, s)` into one node `z = Conv(x)` marked with
/// a SiLU activation, when `y` and `s` are used nowhere else.
fn fuse_conv_silu(nodes: &[Node]) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    let mut fused = vec![false; nodes.len()];
    let mut replacement: HashMap<usize, Node> = HashMap::new();
    for (mi, mul) in nodes.iter().enumerate() {
        if mul.op_type != "Mul" || mul.inputs.len() != 2 {
            continue;
        }
        for (a, b) in [(0, 1), (1, 0)] {
            let (y, s) = (mul.inputs[a].as_str(), mul.inputs[b].as_str());
            let (Some(&ci), Some(&si)) = (producer.get(y), producer.get(s)) else { continue };
            let (conv, sig) = (&nodes[ci], &nodes[si]);
            if conv.op_type == "Conv"
                && sig.op_type == "Sigmoid"
                && sig.inputs.first().map(String::as_str) == Some(y)
                && uses.get(y) == Some(&2)
                && uses.get(s) == Some(&1)
                && !fused[ci]
                && !fused[si]
            {
                let mut node = conv.clone();
                node.outputs = mul.outputs.clone();
                node.attributes.insert("streamdet.activation".into(), Attribute::String("silu".into()));
                fused[ci] = true;
                fused[si] = true;
                fused[mi] = true;
                // The fused node takes the Mul's place, after everything the Mul waited for.
                replacement.insert(mi, node);
                break;
            }
        }
    }
    rewrite(nodes, replacement, &fused)
}

/// How often each value is read, and which node produces it.
fn uses_and_producers(nodes: &[Node]) -> (HashMap<&str, usize>, HashMap<&str, usize>) {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for node in nodes {
        for input in &node.inputs {
            *uses.entry(input.as_str()).or_default() += 1;
        }
    }
    let producer = nodes.iter().enumerate().flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i))).collect();
    (uses, producer)
}

/// Keeps `nodes` in order with `replacement[i]` in place of node `i` and the `dropped` ones left
/// out.
fn rewrite(nodes: &[Node], mut replacement: HashMap<usize, Node>, dropped: &[bool]) -> Vec<Node> {
    nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match replacement.remove(&i) {
            Some(node) => Some(node),
            None if dropped[i] => None,
            None => Some(n.clone()),
        })
        .collect()
}

/// Rewrites `y = Conv(x); z = Add(y, r)` (either order) into one convolution that adds `r` in
/// its epilogue — a residual connection — when `y` is used nowhere else and `r` is computed (a
/// constant would be a broadcast bias, not a residual). The shapes are checked when it runs.
fn fuse_conv_residual(nodes: &[Node], initializers: &HashMap<String, TensorData>) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    let mut dropped = vec![false; nodes.len()];
    let mut replacement: HashMap<usize, Node> = HashMap::new();
    for (ai, add) in nodes.iter().enumerate() {
        if add.op_type != "Add" || add.inputs.len() != 2 {
            continue;
        }
        for (a, b) in [(0, 1), (1, 0)] {
            let (y, r) = (add.inputs[a].as_str(), add.inputs[b].as_str());
            let Some(&ci) = producer.get(y) else { continue };
            let conv = &nodes[ci];
            let fits = conv.op_type == "Conv"
                && conv.inputs.len() <= 3
                && uses.get(y) == Some(&1)
                && y != r
                && !initializers.contains_key(r)
                && producer.get(r).is_none_or(|&ri| nodes[ri].op_type != "Constant")
                && !dropped[ci];
            if !fits {
                continue;
            }
            let mut node = conv.clone();
            node.inputs.resize(3, String::new());
            node.inputs.push(r.to_string());
            node.outputs = add.outputs.clone();
            dropped[ci] = true;
            dropped[ai] = true;
            // In the Add's place: after both the convolution's input and the residual exist.
            replacement.insert(ai, node);
            break;
        }
    }
    rewrite(nodes, replacement, &dropped)
}

/// Rewrites `y = MatMul(a, b); z = Mul(y, s)` with a constant scalar `s` (attention's scale)
/// into one product `z = s * a x b`, when `y` is used nowhere else.
fn fuse_matmul_scale(nodes: &[Node], initializers: &HashMap<String, TensorData>) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    let scalar = |name: &str| -> Option<f32> {
        let data = match initializers.get(name) {
            Some(data) => data.clone(),
            None => match producer.get(name).map(|&i| &nodes[i]) {
                Some(n) if n.op_type == "Constant" => match n.attributes.get("value") {
                    Some(Attribute::Tensor(t)) => t.clone(),
                    Some(Attribute::Float(v)) => return Some(*v),
                    _ => return None,
                },
                _ => return None,
            },
        };
        match data.values {
            TensorValues::F32(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    };
    let mut dropped = vec![false; nodes.len()];
    let mut replacement: HashMap<usize, Node> = HashMap::new();
    for (mi, mul) in nodes.iter().enumerate() {
        if mul.op_type != "Mul" || mul.inputs.len() != 2 {
            continue;
        }
        for (a, b) in [(0, 1), (1, 0)] {
            let (y, s) = (mul.inputs[a].as_str(), mul.inputs[b].as_str());
            let (Some(&pi), Some(alpha)) = (producer.get(y), scalar(s)) else { continue };
            if nodes[pi].op_type != "MatMul" || uses.get(y) != Some(&1) || dropped[pi] || nodes[pi].attributes.contains_key("streamdet.alpha") {
                continue;
            }
            let mut node = nodes[pi].clone();
            node.outputs = mul.outputs.clone();
            node.attributes.insert("streamdet.alpha".into(), Attribute::Float(alpha));
            dropped[pi] = true;
            dropped[mi] = true;
            replacement.insert(mi, node);
            break;
        }
    }
    rewrite(nodes, replacement, &dropped)
}

/// Rewrites the softmax that attention blocks spell out —
/// `e = Exp(x - ReduceMax(x, -1)); y = e / ReduceSum(e, -1)` — into one `Softmax(x, axis=-1)`,
/// when the intermediate values are used nowhere else.
fn fuse_softmax(nodes: &[Node], initializers: &HashMap<String, TensorData>) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    let last_axis_keepdims = |n: &Node| {
        let axes = match (n.inputs.get(1), n.attributes.get("axes")) {
            (Some(name), _) => initializers.get(name).map(|t| t.as_i64()),
            (None, Some(Attribute::Ints(v))) => Some(v.clone()),
            _ => None,
        };
        let keepdims = !matches!(n.attributes.get("keepdims"), Some(Attribute::Int(0)));
        axes.as_deref() == Some(&[-1]) && keepdims
    };
    let by_output = |name: &str, op: &str| producer.get(name).copied().filter(|&i| nodes[i].op_type == op);
    let mut drop = vec![false; nodes.len()];
    let mut replacement: HashMap<usize, Node> = HashMap::new();
    for (di, div) in nodes.iter().enumerate() {
        if div.op_type != "Div" || div.inputs.len() != 2 {
            continue;
        }
        let (e, s) = (div.inputs[0].as_str(), div.inputs[1].as_str());
        let Some(ei) = by_output(e, "Exp") else { continue };
        let Some(si) = by_output(s, "ReduceSum") else { continue };
        let Some(subi) = by_output(&nodes[ei].inputs[0], "Sub") else { continue };
        let sub = &nodes[subi];
        let Some(mi) = by_output(&sub.inputs[1], "ReduceMax") else { continue };
        let x = sub.inputs[0].as_str();
        let fits = nodes[si].inputs[0] == e
            && nodes[mi].inputs[0] == x
            && last_axis_keepdims(&nodes[si])
            && last_axis_keepdims(&nodes[mi])
            && uses.get(e) == Some(&2)
            && uses.get(s) == Some(&1)
            && uses.get(sub.outputs[0].as_str()) == Some(&1)
            && uses.get(sub.inputs[1].as_str()) == Some(&1);
        if !fits || [ei, si, subi, mi].iter().any(|&i| drop[i]) {
            continue;
        }
        for i in [ei, si, subi, mi] {
            drop[i] = true;
        }
        let mut attributes = HashMap::new();
        attributes.insert("axis".to_string(), Attribute::Int(-1));
        replacement.insert(
            di,
            Node { name: div.name.clone(), op_type: "Softmax".into(), inputs: vec![x.to_string()], outputs: div.outputs.clone(), attributes },
        );
    }
    rewrite(nodes, replacement, &drop)
}

/// Folds a `Transpose` that only swaps the last two axes into the `MatMul` it feeds (when it
/// feeds nothing else): the product packs its operands anyway, and can read them transposed.
fn fuse_transposed_matmul_operands(nodes: &[Node]) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    let swaps_last_two = |n: &Node| match n.attributes.get("perm") {
        Some(Attribute::Ints(p)) if p.len() >= 2 => {
            let r = p.len();
            p[..r - 2].iter().enumerate().all(|(i, &v)| v == i as i64) && p[r - 2] == r as i64 - 1 && p[r - 1] == r as i64 - 2
        }
        _ => false,
    };
    let mut drop = vec![false; nodes.len()];
    let mut out: Vec<Node> = nodes.to_vec();
    for (mi, node) in nodes.iter().enumerate() {
        if node.op_type != "MatMul" || node.inputs.len() != 2 {
            continue;
        }
        for (slot, flag) in [(0, "streamdet.transpose_a"), (1, "streamdet.transpose_b")] {
            let name = node.inputs[slot].as_str();
            let Some(&ti) = producer.get(name) else { continue };
            let t = &nodes[ti];
            if t.op_type == "Transpose" && swaps_last_two(t) && uses.get(name) == Some(&1) && !drop[ti] {
                drop[ti] = true;
                out[mi].inputs[slot] = t.inputs[0].clone();
                out[mi].attributes.insert(flag.into(), Attribute::Int(1));
            }
        }
    }
    out.into_iter().enumerate().filter(|(i, _)| !drop[*i]).map(|(_, n)| n).collect()
}

/// Rewrites `s = MatMul(q, k); p = Softmax(s, axis=-1); o = MatMul(v, p^T)` — an attention
/// head, after the passes above folded its scale and transposes into the products — into one
/// `streamdet.Attention(q, k, v)` node, when `s` and `p` are used nowhere else. The fused kernel
/// never writes the `queries x keys` matrices to memory.
fn fuse_attention(nodes: &[Node]) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    let flag = |n: &Node, name: &str| matches!(n.attributes.get(name), Some(Attribute::Int(v)) if *v != 0);
    let mut dropped = vec![false; nodes.len()];
    let mut replacement: HashMap<usize, Node> = HashMap::new();
    for (oi, out) in nodes.iter().enumerate() {
        if out.op_type != "MatMul" || out.inputs.len() != 2 || !flag(out, "streamdet.transpose_b") || out.attributes.contains_key("streamdet.alpha") {
            continue;
        }
        let p = out.inputs[1].as_str();
        let Some(&si) = producer.get(p) else { continue };
        let softmax = &nodes[si];
        let last_axis = matches!(softmax.attributes.get("axis"), Some(Attribute::Int(-1)));
        if softmax.op_type != "Softmax" || !last_axis || uses.get(p) != Some(&1) {
            continue;
        }
        let scores = softmax.inputs[0].as_str();
        let Some(&mi) = producer.get(scores) else { continue };
        let product = &nodes[mi];
        if product.op_type != "MatMul" || product.inputs.len() != 2 || uses.get(scores) != Some(&1) || dropped[mi] || dropped[si] {
            continue;
        }
        let mut attributes = HashMap::new();
        // Q and K are the first product's operands, V the second's left one.
        let operand_flags = [(product, "streamdet.transpose_a", "streamdet.transpose_q"), (product, "streamdet.transpose_b", "streamdet.transpose_k"), (out, "streamdet.transpose_a", "streamdet.transpose_v")];
        for (node, from, to) in operand_flags {
            if flag(node, from) {
                attributes.insert(to.to_string(), Attribute::Int(1));
            }
        }
        if let Some(alpha) = product.attributes.get("streamdet.alpha") {
            attributes.insert("streamdet.alpha".to_string(), alpha.clone());
        }
        let inputs = vec![product.inputs[0].clone(), product.inputs[1].clone(), out.inputs[0].clone()];
        dropped[mi] = true;
        dropped[si] = true;
        dropped[oi] = true;
        replacement.insert(oi, Node { name: out.name.clone(), op_type: "streamdet.Attention".into(), inputs, outputs: out.outputs.clone(), attributes });
    }
    rewrite(nodes, replacement, &dropped)
}

/// The view a step makes of its input, when it is one: a `Transpose`, a `Reshape` to a
/// constant shape, or output `slot` of a `Split` with constant sizes.
fn view_step(step: &Step, slot: usize, constants: &HashMap<usize, Tensor>) -> Option<ViewStep> {
    step.inputs.first().copied().flatten()?;
    let constant = |i: usize| step.inputs.get(i).copied().flatten().and_then(|s| constants.get(&s)).and_then(|t| ints(t).ok());
    match &step.op {
        Op::Transpose { perm } => Some(ViewStep::Permute(perm.clone())),
        Op::Reshape => Some(ViewStep::Reshape(constant(1)?)),
        Op::Split { axis, sizes } => {
            let sizes = match sizes {
                Some(s) => s.clone(),
                None => constant(1)?,
            };
            let index = step.outputs.iter().position(|&o| o == slot)?;
            let start: i64 = sizes.get(..index)?.iter().sum();
            let len = *sizes.get(index)?;
            (sizes.iter().all(|&s| s >= 0)).then(|| ViewStep::Narrow { axis: *axis, start: start as usize, len: len as usize })
        }
        _ => None,
    }
}

/// Folds chains of views (`Reshape`, `Transpose`, `Split`; see [`views`]) into the steps at
/// their ends, on the CPU:
/// - an attention step reads each operand through the chain that leads to it, and writes its
///   result through the reshapes and transposes that follow it, into the tensor at their end;
/// - any other step reading the end of a chain of two or more views that moves or splits axes
///   gets it from one [`Op::View`] copy instead of a copy per step.
///
/// Steps whose results nobody reads any more are dropped.
fn fold_views(mut steps: Vec<Step>, constants: &HashMap<usize, Tensor>, output_slot: usize, device: &Device) -> Vec<Step> {
    if !device.is_cpu() {
        return steps;
    }
    let mut dead = vec![false; steps.len()];
    // Results first: the steps after an attention step that only reshape or permute its result.
    for i in 0..steps.len() {
        if !matches!(steps[i].op, Op::Attention { .. }) || steps[i].outputs.len() != 1 {
            continue;
        }
        let mut slot = steps[i].outputs[0];
        let mut chain = Vec::new();
        while slot != output_slot {
            let readers: Vec<usize> = (0..steps.len()).filter(|&j| !dead[j] && steps[j].inputs.contains(&Some(slot))).collect();
            let &[r] = readers.as_slice() else { break };
            let reader = &steps[r];
            let reads_once = reader.inputs.iter().filter(|&&s| s == Some(slot)).count() == 1 && reader.inputs[0] == Some(slot);
            match view_step(reader, reader.outputs[0], constants) {
                Some(step @ (ViewStep::Reshape(_) | ViewStep::Permute(_))) if reads_once && reader.outputs.len() == 1 => {
                    chain.push(step);
                    dead[r] = true;
                    slot = reader.outputs[0];
                }
                _ => break,
            }
        }
        steps[i].outputs[0] = slot;
        if let Op::Attention { views, .. } = &mut steps[i].op {
            views.result = chain;
        }
    }
    let producer: HashMap<usize, usize> = steps.iter().enumerate().filter(|(i, _)| !dead[*i]).flat_map(|(i, s)| s.outputs.iter().map(move |&o| (o, i))).collect();
    // The chain that ends in `slot`: the slot it starts from and its steps, in order.
    let chain_to = |steps: &[Step], mut slot: usize| {
        let mut chain = Vec::new();
        while let Some(&p) = producer.get(&slot) {
            let Some(view) = view_step(&steps[p], slot, constants) else { break };
            chain.push(view);
            slot = steps[p].inputs[0].expect("a view step has an input");
        }
        chain.reverse();
        (slot, chain)
    };
    let mut views_made: Vec<(usize, usize, Vec<ViewStep>)> = Vec::new();
    for i in (0..steps.len()).filter(|&i| !dead[i]) {
        if matches!(steps[i].op, Op::Attention { .. }) {
            let folded: Vec<(usize, Vec<ViewStep>)> = steps[i].inputs.iter().take(3).map(|s| s.map_or((usize::MAX, Vec::new()), |s| chain_to(&steps, s))).collect();
            for (operand, (base, chain)) in folded.into_iter().enumerate() {
                if chain.is_empty() {
                    continue;
                }
                steps[i].inputs[operand] = Some(base);
                if let Op::Attention { views, .. } = &mut steps[i].op {
                    views.operands[operand] = chain;
                }
            }
            continue;
        }
        if view_step(&steps[i], steps[i].outputs[0], constants).is_some() {
            continue;
        }
        for slot in steps[i].inputs.iter().flatten() {
            let (base, chain) = chain_to(&steps, *slot);
            let moves_data = chain.iter().any(|v| !matches!(v, ViewStep::Reshape(_)));
            let p = producer.get(slot).copied();
            if let (true, Some(p)) = (chain.len() >= 2 && moves_data, p) {
                if steps[p].outputs.len() == 1 {
                    views_made.push((p, base, chain));
                }
            }
        }
    }
    for (p, base, chain) in views_made {
        let step = &mut steps[p];
        step.op_type = "streamdet.View".into();
        step.op = Op::View(chain);
        step.inputs = vec![Some(base)];
    }
    // Drop what nobody reads any more, until nothing changes.
    loop {
        let mut read: std::collections::HashSet<usize> = steps.iter().zip(&dead).filter(|(_, d)| !**d).flat_map(|(s, _)| s.inputs.iter().flatten().copied()).collect();
        read.insert(output_slot);
        let mut changed = false;
        for (step, dead) in steps.iter().zip(dead.iter_mut()) {
            if !*dead && step.outputs.iter().all(|o| !read.contains(o)) {
                *dead = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    steps.into_iter().zip(dead).filter(|(_, d)| !d).map(|(s, _)| s).collect()
}

/// Where a convolution's inputs for the further parts of a concatenation start: after its
/// input, weights, bias and residual.
const CONV_MORE_PARTS: usize = 4;

/// Lets convolutions read a concatenation along channels where its parts lie, on the CPU: a
/// `Concat` over axis 1 whose result only convolutions read, as their input, goes away, and
/// each of them takes the parts instead (the first as its input, the others from
/// [`CONV_MORE_PARTS`] on).
fn fold_concats_into_convs(mut steps: Vec<Step>, output_slot: usize, device: &Device) -> Vec<Step> {
    if !device.is_cpu() {
        return steps;
    }
    let mut dead = vec![false; steps.len()];
    for i in 0..steps.len() {
        let Op::Concat { axis: 1 | -3 } = steps[i].op else { continue };
        let Some(parts) = steps[i].inputs.iter().copied().collect::<Option<Vec<usize>>>() else { continue };
        let &[slot] = steps[i].outputs.as_slice() else { continue };
        if slot == output_slot || parts.len() < 2 {
            continue;
        }
        let readers: Vec<usize> = (0..steps.len()).filter(|&j| j != i && steps[j].inputs.contains(&Some(slot))).collect();
        let convs_read_it = |j: &usize| {
            let step = &steps[*j];
            let as_input = step.inputs[0] == Some(slot) && step.inputs.iter().filter(|&&s| s == Some(slot)).count() == 1;
            as_input && matches!(&step.op, Op::Conv(c) if c.concat_parts == 0)
        };
        if readers.is_empty() || !readers.iter().all(convs_read_it) {
            continue;
        }
        for &j in &readers {
            let step = &mut steps[j];
            step.inputs[0] = Some(parts[0]);
            step.inputs.resize(CONV_MORE_PARTS, None);
            step.inputs.extend(parts[1..].iter().map(|&p| Some(p)));
            if let Op::Conv(c) = &mut step.op {
                c.concat_parts = parts.len() - 1;
            }
        }
        dead[i] = true;
    }
    steps.into_iter().zip(dead).filter(|(_, d)| !d).map(|(s, _)| s).collect()
}

fn parse_op(node: &Node, initializers: &HashMap<String, TensorData>, device: &Device) -> Result<Op, DetectError> {
    Ok(match node.op_type.as_str() {
        "Conv" => Op::Conv(Box::new(parse_conv(node, initializers, device)?)),
        "Sigmoid" => Op::Unary(UnaryFn::Sigmoid),
        "Exp" => Op::Unary(UnaryFn::Exp),
        "Add" => Op::Binary(BinaryOp::Add),
        "Sub" => Op::Binary(BinaryOp::Sub),
        "Mul" => Op::Binary(BinaryOp::Mul),
        "Div" => Op::Binary(BinaryOp::Div),
        "Split" => Op::Split { axis: attr_int(node, "axis", 0)?, sizes: attr_ints(node, "split")? },
        "Concat" => Op::Concat { axis: attr_int(node, "axis", 0)? },
        "MaxPool" => {
            if attr_int(node, "ceil_mode", 0)? != 0 || node.outputs.len() > 1 {
                return Err(unsupported(node, "ceil_mode or indices output"));
            }
            let dilations = pair(node, attr_ints(node, "dilations")?, 1)?;
            if dilations != (1, 1) {
                return Err(unsupported(node, "dilated pooling"));
            }
            let kernel = pair(node, attr_ints(node, "kernel_shape")?, 1)?;
            Op::MaxPool { kernel, stride: pair(node, attr_ints(node, "strides")?, 1)?, pads: pads4(node)? }
        }
        "Resize" => {
            let mode = attr_string(node, "mode").unwrap_or("nearest");
            let transform = attr_string(node, "coordinate_transformation_mode").unwrap_or("half_pixel");
            let nearest = attr_string(node, "nearest_mode").unwrap_or("round_prefer_floor");
            if mode != "nearest" || transform != "asymmetric" || nearest != "floor" {
                return Err(unsupported(node, format!("mode={mode} coordinate_transformation_mode={transform} nearest_mode={nearest}")));
            }
            Op::ResizeNearest
        }
        "Reshape" => {
            if attr_int(node, "allowzero", 0)? != 0 {
                return Err(unsupported(node, "allowzero=1"));
            }
            Op::Reshape
        }
        "Transpose" => Op::Transpose {
            perm: attr_ints(node, "perm")?.map(|p| p.into_iter().map(|v| v as usize).collect()),
        },
        "Softmax" => Op::Softmax { axis: attr_int(node, "axis", -1)? },
        "Slice" => Op::Slice,
        "MatMul" => Op::MatMul {
            a_transposed: attr_int(node, "streamdet.transpose_a", 0)? != 0,
            b_transposed: attr_int(node, "streamdet.transpose_b", 0)? != 0,
            alpha: scale_attribute(node),
        },
        "streamdet.Attention" => Op::Attention {
            q_transposed: attr_int(node, "streamdet.transpose_q", 0)? != 0,
            k_transposed: attr_int(node, "streamdet.transpose_k", 0)? != 0,
            v_transposed: attr_int(node, "streamdet.transpose_v", 0)? != 0,
            alpha: scale_attribute(node),
            views: Box::default(),
        },
        "ReduceMax" | "ReduceSum" => {
            if attr_int(node, "noop_with_empty_axes", 0)? != 0 {
                return Err(unsupported(node, "noop_with_empty_axes=1"));
            }
            Op::Reduce {
                kind: if node.op_type == "ReduceMax" { ReduceKind::Max } else { ReduceKind::Sum },
                axes: attr_ints(node, "axes")?,
                keepdims: attr_int(node, "keepdims", 1)? != 0,
            }
        }
        "Shape" => {
            if node.attributes.contains_key("start") || node.attributes.contains_key("end") {
                return Err(unsupported(node, "start/end"));
            }
            Op::Shape
        }
        "Gather" => Op::Gather { axis: attr_int(node, "axis", 0)? },
        "Unsqueeze" => Op::Unsqueeze { axes: attr_ints(node, "axes")? },
        "Range" => Op::Range,
        "Cast" => Op::Cast {
            to: match attr_int(node, "to", 0)? {
                1 | 11 => DType::F32,
                6 | 7 | 9 => DType::I64,
                other => return Err(unsupported(node, format!("cast to element type {other}"))),
            },
        },
        "ConstantOfShape" => Op::ConstantOfShape {
            value: match node.attributes.get("value") {
                Some(Attribute::Tensor(t)) => t.clone(),
                _ => TensorData { shape: vec![1], values: TensorValues::F32(vec![0.0]) },
            },
        },
        "Expand" => Op::Expand,
        "Constant" => match node.attributes.get("value") {
            Some(Attribute::Tensor(t)) => Op::Constant(t.clone()),
            Some(Attribute::Ints(v)) => Op::Constant(TensorData { shape: vec![v.len()], values: TensorValues::I64(v.clone()) }),
            Some(Attribute::Int(v)) => Op::Constant(TensorData { shape: vec![], values: TensorValues::I64(vec![*v]) }),
            Some(Attribute::Float(v)) => Op::Constant(TensorData { shape: vec![], values: TensorValues::F32(vec![*v]) }),
            _ => return Err(unsupported(node, "a Constant without a value")),
        },
        "Identity" => Op::Identity,
        _ => return Err(unsupported(node, "operator not supported")),
    })
}

fn parse_conv(node: &Node, initializers: &HashMap<String, TensorData>, device: &Device) -> Result<ConvOp, DetectError> {
    let constant = |i: usize| node.inputs.get(i).filter(|n| !n.is_empty()).map(|n| initializers.get(n));
    let weight = match constant(1) {
        Some(Some(TensorData { shape, values: TensorValues::F32(v) })) if shape.len() == 4 => (shape.clone(), v.clone()),
        _ => return Err(unsupported(node, "weights must be a constant 4-D float tensor")),
    };
    let (wshape, weights) = weight;
    let (out_channels, cin_g, kh, kw) = (wshape[0], wshape[1], wshape[2], wshape[3]);
    if [out_channels, cin_g, kh, kw].contains(&0) {
        return Err(unsupported(node, format!("empty weights {wshape:?}")));
    }
    let groups = usize::try_from(attr_int(node, "group", 1)?).map_err(|_| unsupported(node, "negative group"))?;
    if groups == 0 || out_channels % groups != 0 {
        return Err(unsupported(node, format!("group={groups} with {out_channels} output channels")));
    }
    let bias = match constant(2) {
        None => vec![0.0; out_channels],
        Some(Some(TensorData { values: TensorValues::F32(v), .. })) if v.len() == out_channels => v.clone(),
        Some(_) => return Err(unsupported(node, "bias must be a constant float vector")),
    };
    if let Some(k) = attr_ints(node, "kernel_shape")? {
        if k != [kh as i64, kw as i64] {
            return Err(unsupported(node, "kernel_shape disagrees with the weights"));
        }
    }
    let activation = match attr_string(node, "streamdet.activation") {
        Some("silu") => Activation::Silu,
        _ => Activation::Identity,
    };
    let spec = ConvSpec {
        in_channels: cin_g * groups,
        out_channels,
        groups,
        kernel: (kh, kw),
        stride: pair(node, attr_ints(node, "strides")?, 1)?,
        dilation: pair(node, attr_ints(node, "dilations")?, 1)?,
        pads: pads4(node)?,
        activation,
    };
    let conv = Conv2d::new(spec, weights, bias).map_err(|e| unsupported(node, e.to_string()))?.with_packed_weights();
    let (weight, bias) = if device.is_cpu() {
        (None, None)
    } else {
        let w = Tensor::from_vec(conv.weights().to_vec(), (out_channels, cin_g, kh, kw), device).map_err(DetectError::from_candle)?;
        let b = Tensor::from_vec(conv.bias().to_vec(), (1, out_channels, 1, 1), device).map_err(DetectError::from_candle)?;
        (Some(w), Some(b))
    };
    Ok(ConvOp { conv, concat_parts: 0, weight, bias })
}

impl CustomOp1 for Conv2d {
    fn name(&self) -> &'static str {
        "streamdet-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let &[n, c, h, w] = layout.dims() else {
            candle_core::bail!("conv input must be 4-D, got {:?}", layout.dims());
        };
        if c != self.spec().in_channels {
            candle_core::bail!("conv expects {} input channels, got {c}", self.spec().in_channels);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("conv input must be contiguous");
        };
        let input = &storage.as_slice::<f32>()?[start..end];
        let Some((oh, ow)) = self.output_size(h, w) else {
            candle_core::bail!("conv input {h}x{w} is smaller than the kernel");
        };
        let out = self.run(input, n, h, w, None);
        Ok((CpuStorage::F32(out), Shape::from((n, self.spec().out_channels, oh, ow))))
    }
}

/// A convolution whose output gets a residual of its own shape added in the epilogue.
struct ConvWithResidual<'a>(&'a Conv2d);

impl CustomOp2 for ConvWithResidual<'_> {
    fn name(&self) -> &'static str {
        "streamdet-conv2d-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let conv = self.0;
        let &[n, c, h, w] = l1.dims() else {
            candle_core::bail!("conv input must be 4-D, got {:?}", l1.dims());
        };
        let Some((oh, ow)) = conv.output_size(h, w) else {
            candle_core::bail!("conv input {h}x{w} is smaller than the kernel");
        };
        if c != conv.spec().in_channels || l2.dims() != [n, conv.spec().out_channels, oh, ow] {
            candle_core::bail!("conv of {:?} cannot take a residual of {:?}", l1.dims(), l2.dims());
        }
        let (input, residual) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let out = conv.run(input, n, h, w, Some(residual));
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }
}

/// Element-wise arithmetic on the CPU, in parallel: two tensors of one shape, or a tensor and a
/// scalar.
struct CpuBinary(BinaryOp);

impl CustomOp2 for CpuBinary {
    fn name(&self) -> &'static str {
        "streamdet-binary"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        const CHUNK: usize = 1 << 14;
        let (a, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let f: fn(f32, f32) -> f32 = match self.0 {
            BinaryOp::Add => |x, y| x + y,
            BinaryOp::Sub => |x, y| x - y,
            BinaryOp::Mul => |x, y| x * y,
            BinaryOp::Div => |x, y| x / y,
        };
        // Written once, straight into the output (no copy of `a` to overwrite).
        let out: Vec<f32> = match b {
            &[scalar] => a.par_iter().with_min_len(CHUNK).map(|&x| f(x, scalar)).collect(),
            _ if b.len() == a.len() => a.par_iter().zip(b.par_iter()).with_min_len(CHUNK).map(|(&x, &y)| f(x, y)).collect(),
            _ => candle_core::bail!("element-wise operands {:?} and {:?}", l1.dims(), l2.dims()),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> CResult<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Concatenation of contiguous CPU `f32` tensors along `axis`, copying in parallel (candle's
/// `cat` copies on one thread); `None` for anything else, which candle then concatenates.
fn concat_cpu(parts: &[&Tensor], axis: usize) -> CResult<Option<Tensor>> {
    let dims = parts[0].dims();
    if parts.iter().any(|p| p.rank() != dims.len() || p.dims()[..axis] != dims[..axis] || p.dims()[axis + 1..] != dims[axis + 1..]) {
        candle_core::bail!("Concat of mismatched shapes {:?}", parts.iter().map(|p| p.dims()).collect::<Vec<_>>());
    }
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let widths: Vec<usize> = parts.iter().map(|p| p.dims()[axis] * inner).collect();
    let total = outer * widths.iter().sum::<usize>();
    let Some(offsets) = parts.iter().map(|t| t.layout().contiguous_offsets()).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    // Parts may be views of one storage (the halves of a split): one read guard per storage.
    let out = with_cpu_storages(parts, |buffers| {
        let sources: Vec<&[f32]> = buffers.iter().zip(&offsets).map(|(data, &(start, end))| &data[start..end]).collect();
        gather_blocks(&sources, &widths, outer, total)
    })?;
    let Some(out) = out else { return Ok(None) };
    let mut shape = dims.to_vec();
    shape[axis] = parts.iter().map(|p| p.dims()[axis]).sum();
    Ok(Some(Tensor::from_vec(out, shape, &Device::Cpu)?))
}

/// For each of `outer` rows, each source's next `width` floats, in order: the body of a
/// concatenation, copied in parallel pieces.
fn gather_blocks(sources: &[&[f32]], widths: &[usize], outer: usize, total: usize) -> Vec<f32> {
    /// Floats per copy task: enough to amortise a task, few enough to share among threads.
    const PIECE: usize = 1 << 15;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    // The output in order is, for each outer index, each part's block: cut it into pieces
    // paired with their sources, then copy the pieces in parallel.
    let mut pieces = Vec::new();
    let mut rest = &mut out.spare_capacity_mut()[..total];
    for o in 0..outer {
        for (source, &width) in sources.iter().zip(widths) {
            for chunk in source[o * width..][..width].chunks(PIECE) {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(chunk.len());
                pieces.push((dst, chunk));
                rest = tail;
            }
        }
    }
    pieces.into_par_iter().for_each(|(dst, src)| {
        for (d, &v) in dst.iter_mut().zip(src) {
            d.write(v);
        }
    });
    // SAFETY: the pieces tile the first `total` elements exactly, and each was written.
    unsafe { out.set_len(total) };
    out
}

/// Element-wise functions on the CPU with streamdet's vectorised kernels.
struct CpuUnary(UnaryFn);

impl CustomOp1 for CpuUnary {
    fn name(&self) -> &'static str {
        "streamdet-unary"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        const CHUNK: usize = 1 << 14;
        let input = contiguous_f32(storage, layout)?;
        let mut out = input.to_vec();
        out.par_chunks_mut(CHUNK).for_each(|chunk| activation::map_inplace(chunk, self.0));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Softmax over one axis on the CPU: rows in cache for the last axis, column-wise passes
/// (vectorised across the contiguous inner axes) for any other.
struct CpuSoftmax {
    axis: usize,
}

impl CustomOp1 for CpuSoftmax {
    fn name(&self) -> &'static str {
        "streamdet-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let len = dims[self.axis];
        let inner: usize = dims[self.axis + 1..].iter().product();
        let mut out = contiguous_f32(storage, layout)?.to_vec();
        if len > 0 && inner > 0 {
            if inner == 1 {
                // Rows are short (attention's are 400): a task takes many.
                let rows_per_task = (16384 / len).max(1);
                out.par_chunks_mut(len * rows_per_task).for_each(|rows| rows.chunks_exact_mut(len).for_each(activation::softmax_inplace));
            } else {
                out.par_chunks_mut(len * inner).for_each(|block| activation::softmax_columns_inplace(block, len, inner));
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Axis permutation on the CPU (blocked transposes and row copies).
struct CpuPermute(Vec<usize>);

impl CustomOp1 for CpuPermute {
    fn name(&self) -> &'static str {
        "streamdet-permute"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let mut seen = vec![false; dims.len()];
        if self.0.len() != dims.len() || self.0.iter().any(|&a| a >= dims.len() || std::mem::replace(&mut seen[a], true)) {
            candle_core::bail!("permutation {:?} does not fit rank {}", self.0, dims.len());
        }
        let out = transpose::permute(contiguous_f32(storage, layout)?, dims, &self.0);
        let out_dims: Vec<usize> = self.0.iter().map(|&a| dims[a]).collect();
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// Batched matrix product with equal batch dimensions, on the packed microkernel.
struct CpuMatMul {
    a_transposed: bool,
    b_transposed: bool,
    alpha: f32,
}

impl CustomOp2 for CpuMatMul {
    fn name(&self) -> &'static str {
        "streamdet-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        let (m, k) = if self.a_transposed { (da[r - 1], da[r - 2]) } else { (da[r - 2], da[r - 1]) };
        let (kb, n) = if self.b_transposed { (db[r - 1], db[r - 2]) } else { (db[r - 2], db[r - 1]) };
        if kb != k {
            candle_core::bail!("matmul of {da:?} and {db:?}");
        }
        let batch: usize = da[..r - 2].iter().product();
        let (a, b) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let out = packed_gemm::batched_matmul(a, b, batch, m, k, n, self.a_transposed, self.b_transposed, self.alpha);
        let mut dims = da.to_vec();
        dims[r - 2] = m;
        dims[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Nearest-neighbour upsampling of NCHW planes by integer factors on the CPU, in parallel over
/// planes: each input row is widened once, then copied to its output rows.
struct CpuUpsample {
    height: usize,
    width: usize,
}

impl CustomOp1 for CpuUpsample {
    fn name(&self) -> &'static str {
        "streamdet-upsample"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let &[n, c, h, w] = layout.dims() else {
            candle_core::bail!("upsampling needs a 4-D input, got {:?}", layout.dims());
        };
        let (oh, ow) = (self.height, self.width);
        if h == 0 || w == 0 || oh % h != 0 || ow % w != 0 {
            candle_core::bail!("only integer upsampling is supported ({h}x{w} to {oh}x{ow})");
        }
        let (fy, fx) = (oh / h, ow / w);
        let input = contiguous_f32(storage, layout)?;
        let mut out = vec![0.0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).zip(input.par_chunks(h * w)).for_each(|(dst, src)| {
            for (row, rows_out) in src.chunks_exact(w).zip(dst.chunks_exact_mut(fy * ow)) {
                let (first, rest) = rows_out.split_at_mut(ow);
                for (pixels, &v) in first.chunks_exact_mut(fx).zip(row) {
                    pixels.fill(v);
                }
                for copy in rest.chunks_exact_mut(ow) {
                    copy.copy_from_slice(first);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// Max pooling of NCHW planes on the CPU, in parallel over planes: a pass along rows, then one
/// along columns (`2k` comparisons per output instead of `k * k`). Padding never wins a max.
struct CpuMaxPool {
    kernel: (usize, usize),
    stride: (usize, usize),
    pads: (usize, usize, usize, usize),
}

impl CustomOp1 for CpuMaxPool {
    fn name(&self) -> &'static str {
        "streamdet-maxpool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let &[n, c, h, w] = layout.dims() else {
            candle_core::bail!("max pooling needs a 4-D input, got {:?}", layout.dims());
        };
        let ((kh, kw), (sh, sw), (pt, pl, pb, pr)) = (self.kernel, self.stride, self.pads);
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || h + pt + pb < kh || w + pl + pr < kw || pt >= kh || pb >= kh || pl >= kw || pr >= kw {
            candle_core::bail!("max pooling {kh}x{kw} stride {sh}x{sw} pads {:?} does not fit {h}x{w}", self.pads);
        }
        let (oh, ow) = ((h + pt + pb - kh) / sh + 1, (w + pl + pr - kw) / sw + 1);
        let input = contiguous_f32(storage, layout)?;
        // The input columns `ox * sw - pl + kx` that exist, for each output column range.
        let window = |o: usize, s: usize, pad: usize, k: usize, len: usize| -> std::ops::Range<usize> {
            let start = (o * s).saturating_sub(pad);
            let end = (o * s + k).saturating_sub(pad).min(len);
            start..end
        };
        let mut out = vec![0.0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).zip(input.par_chunks(h * w)).for_each(|(dst, src)| {
            // Rows first: `rows[y][ox]` is the max of row `y` over output column `ox`'s window.
            let mut rows = vec![f32::NEG_INFINITY; h * ow];
            for (row_max, row) in rows.chunks_exact_mut(ow).zip(src.chunks_exact(w)) {
                for (ox, m) in row_max.iter_mut().enumerate() {
                    *m = row[window(ox, sw, pl, kw, w)].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                }
            }
            for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
                out_row.fill(f32::NEG_INFINITY);
                for y in window(oy, sh, pt, kh, h) {
                    for (o, &m) in out_row.iter_mut().zip(&rows[y * ow..][..ow]) {
                        *o = o.max(m);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// Calls `f` with the elements of a contiguous CPU `f32` tensor.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("expected a contiguous CPU f32 tensor");
    };
    Ok(f(&data[start..end]))
}

/// Calls `f` with the CPU `f32` storage of each of `tensors` (the whole buffer, to be read
/// through the tensor's layout); `Ok(None)` when one is not such a tensor. Holds one read guard
/// per distinct storage: tensors that share one (the operands of a folded attention, the parts
/// of a split that a convolution reads back together) share its guard, since a second read
/// lock on a storage this thread already holds would deadlock once a writer waits for it.
fn with_cpu_storages<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> CResult<Option<R>> {
    // A storage's identity is its address, which the tensors keep alive; read with one lock
    // held at a time.
    let key = |t: &Tensor| std::ptr::from_ref::<candle_core::Storage>(&t.storage_and_layout().0).addr();
    let keys: Vec<usize> = tensors.iter().map(|t| key(t)).collect();
    let mut guards = Vec::with_capacity(tensors.len());
    for (t, &k) in tensors.iter().zip(&keys) {
        if !guards.iter().any(|(held, _)| *held == k) {
            guards.push((k, t.storage_and_layout().0));
        }
    }
    let mut buffers = Vec::with_capacity(tensors.len());
    for k in &keys {
        let (_, storage) = guards.iter().find(|(held, _)| held == k).expect("a guard per storage");
        let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &**storage else { return Ok(None) };
        buffers.push(data.as_slice());
    }
    Ok(Some(f(&buffers)))
}

/// Runs a chain of views one step at a time (transposes of CPU `f32` tensors on their own
/// kernel), for when it cannot be read in place.
fn run_chain(t: &Tensor, chain: &[ViewStep]) -> CResult<Tensor> {
    chain.iter().try_fold(t.clone(), |t, step| match step {
        ViewStep::Permute(perm) if is_cpu_f32(&t) => {
            let perm = perm.clone().unwrap_or_else(|| (0..t.rank()).rev().collect());
            t.contiguous()?.apply_op1_no_bwd(&CpuPermute(perm))
        }
        _ => step.apply(&t),
    })
}

/// [`Op::Attention`] on the CPU with its view chains folded: the operands are read where they
/// lie in the tensors the step reads, and the result is written where the chain after it
/// would put it. `Ok(None)` when a chain cannot be seen as a view.
fn attention_in_place(operands: [&Tensor; 3], transposed: [bool; 3], alpha: f32, views: &AttentionViews) -> CResult<Option<Tensor>> {
    let bases = operands.map(|t| t.contiguous());
    let [q, k, v] = bases;
    let (q, k, v) = (q?, k?, v?);
    let mut matrices = Vec::with_capacity(3);
    let mut batch_dims = Vec::with_capacity(3);
    for ((base, chain), transposed) in [&q, &k, &v].into_iter().zip(&views.operands).zip(transposed) {
        let Some(view) = views::view_through(base.dims(), chain)? else { return Ok(None) };
        let dims = view.dims();
        if dims.len() < 2 {
            candle_core::bail!("attention operand of {dims:?} has fewer than two axes");
        }
        let Some(m) = view.matrices() else { return Ok(None) };
        batch_dims.push(dims[..dims.len() - 2].to_vec());
        matrices.push(if transposed { m.transposed() } else { m });
    }
    let [qm, km, vm]: [attention::MatrixBatch; 3] = matrices.try_into().expect("three operands");
    let (queries, depth, keys, channels) = (qm.rows(), qm.cols(), km.cols(), vm.rows());
    if km.rows() != depth || vm.cols() != keys || keys == 0 || depth == 0 || batch_dims[1] != batch_dims[0] || batch_dims[2] != batch_dims[0] {
        candle_core::bail!("attention of {:?}, {:?} and {:?}", q.dims(), k.dims(), v.dims());
    }
    let mut result_dims = batch_dims.swap_remove(0);
    result_dims.extend([channels, queries]);
    let Some((end_dims, placed)) = views::placement_through(&result_dims, &views.result)? else { return Ok(None) };
    let Some(out) = placed.matrices().and_then(attention::OutputView::new) else { return Ok(None) };
    let operands = [&q, &k, &v];
    let result = with_cpu_storages(&operands, |buffers| {
        // Each base is contiguous: its view starts at the layout's offset.
        let mut parts = operands.iter().zip(buffers).zip([qm, km, vm]).map(|((t, data), view)| attention::Operand::new(&data[t.layout().start_offset()..], view));
        let (Some(q), Some(k), Some(v)) = (parts.next().flatten(), parts.next().flatten(), parts.next().flatten()) else {
            candle_core::bail!("an attention operand's view reaches past its tensor");
        };
        Ok(attention::attention_strided(q, k, v, alpha, &out))
    })?;
    let Some(result) = result.transpose()? else { candle_core::bail!("expected CPU f32 attention operands") };
    Ok(Some(Tensor::from_vec(result, end_dims, &Device::Cpu)?))
}

/// [`Op::Attention`] on operands that are already what the step multiplies.
fn attention_unfolded(q: &Tensor, k: &Tensor, v: &Tensor, [q_transposed, k_transposed, v_transposed]: [bool; 3], alpha: f32, device: &Device) -> CResult<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let rank = q.rank();
    let same_batch = rank >= 2 && [&k, &v].iter().all(|t| t.rank() == rank && t.dims()[..rank - 2] == q.dims()[..rank - 2]);
    if [&q, &k, &v].iter().all(|t| is_cpu_f32(t)) && same_batch && packed_gemm::available() {
        let op = CpuAttention { q_transposed, k_transposed, v_transposed, alpha };
        return q.apply_op3_no_bwd(&k, &v, &op);
    }
    // The three steps it fuses, on whatever device holds the tensors.
    let product = Op::MatMul { a_transposed: q_transposed, b_transposed: k_transposed, alpha };
    let scores = eval(&product, &[Some(&q), Some(&k)], device)?.remove(0);
    let weights = eval(&Op::Softmax { axis: -1 }, &[Some(&scores)], device)?.remove(0);
    let mix = Op::MatMul { a_transposed: v_transposed, b_transposed: true, alpha: 1.0 };
    Ok(eval(&mix, &[Some(&v), Some(&weights)], device)?.remove(0))
}

/// [`Op::Attention`] on the CPU: [`attention::attention`] over contiguous operands.
struct CpuAttention {
    q_transposed: bool,
    k_transposed: bool,
    v_transposed: bool,
    alpha: f32,
}

impl candle_core::CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "streamdet-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (dq, dk, dv) = (l1.dims(), l2.dims(), l3.dims());
        let r = dq.len();
        let last_two = |d: &[usize], swapped: bool| if swapped { (d[r - 1], d[r - 2]) } else { (d[r - 2], d[r - 1]) };
        let (queries, depth) = last_two(dq, self.q_transposed);
        let (depth_k, keys) = last_two(dk, self.k_transposed);
        let (channels, keys_v) = last_two(dv, self.v_transposed);
        if depth_k != depth || keys_v != keys || keys == 0 || depth == 0 {
            candle_core::bail!("attention of {dq:?}, {dk:?} and {dv:?}");
        }
        let batch: usize = dq[..r - 2].iter().product();
        let shape = attention::AttentionShape { batch, queries, keys, depth, channels };
        let layout = attention::AttentionLayout { q_transposed: self.q_transposed, k_transposed: self.k_transposed, v_transposed: self.v_transposed };
        let (q, k, v) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?, contiguous_f32(s3, l3)?);
        let out = attention::attention(q, k, v, shape, layout, self.alpha);
        let mut dims = dq.to_vec();
        dims[r - 2] = channels;
        dims[r - 1] = queries;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

fn normalize_axis(axis: i64, rank: usize) -> CResult<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank.max(1) {
        candle_core::bail!("axis {axis} out of range for rank {rank}");
    }
    Ok(a as usize)
}

fn input<'a>(args: &[Option<&'a Tensor>], i: usize) -> CResult<&'a Tensor> {
    args.get(i).copied().flatten().ok_or_else(|| candle_core::Error::Msg(format!("missing input {i}")))
}

fn ints(t: &Tensor) -> CResult<Vec<i64>> {
    t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()
}

fn eval(op: &Op, args: &[Option<&Tensor>], device: &Device) -> CResult<Vec<Tensor>> {
    let x = || input(args, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Conv(c) if c.concat_parts > 0 => {
            let parts = std::iter::once(args.first()).chain(args.iter().skip(CONV_MORE_PARTS).map(Some));
            let parts: Vec<&Tensor> = parts.map(|a| a.copied().flatten()).collect::<Option<_>>().ok_or_else(|| candle_core::Error::Msg("missing concatenation part".into()))?;
            one(conv_of_parts(c, &parts, args.get(3).copied().flatten())?)
        }
        Op::Conv(c) => one(conv(c, x()?, args.get(3).copied().flatten())?),
        Op::Unary(f) if is_cpu_f32(x()?) => one(x()?.contiguous()?.apply_op1_no_bwd(&CpuUnary(*f))?),
        Op::Unary(f) => one(match f {
            UnaryFn::Sigmoid => candle_nn::ops::sigmoid(x()?)?,
            UnaryFn::Exp => x()?.exp()?,
            UnaryFn::Silu => x()?.silu()?,
        }),
        Op::Binary(b) => {
            let (l, r) = (x()?, input(args, 1)?);
            if is_cpu_f32(l) && is_cpu_f32(r) && (l.dims() == r.dims() || r.elem_count() == 1) {
                return one(l.contiguous()?.apply_op2_no_bwd(&r.contiguous()?, &CpuBinary(*b))?);
            }
            one(match b {
                BinaryOp::Add => l.broadcast_add(r)?,
                BinaryOp::Sub => l.broadcast_sub(r)?,
                BinaryOp::Mul => l.broadcast_mul(r)?,
                BinaryOp::Div => l.broadcast_div(r)?,
            })
        }
        Op::Split { axis, sizes } => {
            let t = x()?;
            let axis = normalize_axis(*axis, t.rank())?;
            let dim = t.dim(axis)?;
            let sizes: Vec<usize> = match (args.get(1).copied().flatten(), sizes) {
                (Some(s), _) => ints(s)?.into_iter().map(|v| v as usize).collect(),
                (None, Some(s)) => s.iter().map(|&v| v as usize).collect(),
                (None, None) => candle_core::bail!("Split without sizes is not supported"),
            };
            if sizes.iter().sum::<usize>() != dim {
                candle_core::bail!("split sizes {sizes:?} do not add up to {dim}");
            }
            let mut start = 0;
            let mut parts = Vec::with_capacity(sizes.len());
            for s in sizes {
                parts.push(t.narrow(axis, start, s)?);
                start += s;
            }
            Ok(parts)
        }
        Op::Concat { axis } => {
            let parts: Vec<&Tensor> = args.iter().flatten().copied().collect();
            let first = parts.first().ok_or_else(|| candle_core::Error::Msg("Concat of nothing".into()))?;
            let axis = normalize_axis(*axis, first.rank())?;
            match concat_cpu(&parts, axis)? {
                Some(t) => one(t),
                None => one(Tensor::cat(&parts, axis)?),
            }
        }
        Op::MaxPool { kernel, stride, pads } => {
            let t = x()?;
            if is_cpu_f32(t) && t.rank() == 4 {
                let pool = CpuMaxPool { kernel: *kernel, stride: *stride, pads: *pads };
                one(t.contiguous()?.apply_op1_no_bwd(&pool)?)
            } else {
                one(max_pool(t, *kernel, *stride, *pads)?)
            }
        }
        Op::ResizeNearest => {
            let t = x()?;
            let (h, w) = (t.dim(2)?, t.dim(3)?);
            let (oh, ow) = match (args.get(3).copied().flatten(), args.get(2).copied().flatten()) {
                (Some(sizes), _) => match ints(sizes)?.as_slice() {
                    &[_, _, oh, ow] if oh > 0 && ow > 0 => (oh as usize, ow as usize),
                    other => candle_core::bail!("Resize sizes {other:?} are not [n, c, h, w]"),
                },
                (None, Some(scales)) => {
                    let s = scales.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    if s.len() != 4 || s[0] != 1.0 || s[1] != 1.0 {
                        candle_core::bail!("only spatial resize is supported, scales {s:?}");
                    }
                    ((h as f32 * s[2]).floor() as usize, (w as f32 * s[3]).floor() as usize)
                }
                _ => candle_core::bail!("Resize needs scales or sizes"),
            };
            if h == 0 || w == 0 || oh % h != 0 || ow % w != 0 {
                candle_core::bail!("only integer upsampling is supported ({h}x{w} to {oh}x{ow})");
            }
            if is_cpu_f32(t) && t.rank() == 4 {
                one(t.contiguous()?.apply_op1_no_bwd(&CpuUpsample { height: oh, width: ow })?)
            } else {
                one(t.upsample_nearest2d(oh, ow)?)
            }
        }
        Op::Reshape => {
            let t = x()?;
            one(t.reshape(views::reshape_dims(t.dims(), &ints(input(args, 1)?)?)?)?)
        }
        Op::Transpose { perm } => {
            let t = x()?;
            let perm = perm.clone().unwrap_or_else(|| (0..t.rank()).rev().collect());
            if is_cpu_f32(t) {
                one(t.contiguous()?.apply_op1_no_bwd(&CpuPermute(perm))?)
            } else {
                one(t.permute(perm)?.contiguous()?)
            }
        }
        Op::Softmax { axis } => {
            let t = x()?;
            let axis = normalize_axis(*axis, t.rank())?;
            if is_cpu_f32(t) {
                one(t.contiguous()?.apply_op1_no_bwd(&CpuSoftmax { axis })?)
            } else if axis + 1 == t.rank() {
                one(candle_nn::ops::softmax_last_dim(&t.contiguous()?)?)
            } else {
                one(candle_nn::ops::softmax(t, axis)?)
            }
        }
        Op::Slice => {
            let t = x()?;
            let starts = ints(input(args, 1)?)?;
            let ends = ints(input(args, 2)?)?;
            let axes = match args.get(3).copied().flatten() {
                Some(a) => ints(a)?,
                None => (0..starts.len() as i64).collect(),
            };
            if let Some(steps) = args.get(4).copied().flatten() {
                if ints(steps)?.iter().any(|&s| s != 1) {
                    candle_core::bail!("Slice with steps other than 1 is not supported");
                }
            }
            let mut out = t.clone();
            for ((&s, &e), &a) in starts.iter().zip(&ends).zip(&axes) {
                let axis = normalize_axis(a, t.rank())?;
                let dim = t.dim(axis)? as i64;
                let clamp = |v: i64| if v < 0 { (v + dim).max(0) } else { v.min(dim) };
                let (s, e) = (clamp(s), clamp(e));
                out = out.narrow(axis, s as usize, (e - s).max(0) as usize)?;
            }
            one(out)
        }
        Op::MatMul { a_transposed, b_transposed, alpha } => {
            let (a, b) = (x()?.contiguous()?, input(args, 1)?.contiguous()?);
            let same_batch = a.rank() >= 2 && a.rank() == b.rank() && a.dims()[..a.rank() - 2] == b.dims()[..b.rank() - 2];
            if is_cpu_f32(&a) && is_cpu_f32(&b) && same_batch && packed_gemm::available() {
                let op = CpuMatMul { a_transposed: *a_transposed, b_transposed: *b_transposed, alpha: *alpha };
                one(a.apply_op2_no_bwd(&b, &op)?)
            } else {
                let swap = |t: Tensor, swapped: bool| if swapped { t.transpose(t.rank() - 2, t.rank() - 1)?.contiguous() } else { Ok(t) };
                let product = swap(a, *a_transposed)?.broadcast_matmul(&swap(b, *b_transposed)?)?;
                one(if *alpha == 1.0 { product } else { product.affine(f64::from(*alpha), 0.0)? })
            }
        }
        Op::View(chain) => {
            let t = x()?;
            if is_cpu_f32(t) {
                let t = t.contiguous()?;
                if let Some(view) = views::view_through(t.dims(), chain)? {
                    // Rows that are runs of adjacent floats copy fast; anything else goes step by
                    // step, where transposes have their own kernel.
                    if view.rows_are_adjacent() {
                        let out = with_cpu_f32(&t, |data| view.gather(data))?;
                        return one(Tensor::from_vec(out, view.dims(), t.device())?);
                    }
                }
            }
            one(run_chain(t, chain)?)
        }
        Op::Attention { q_transposed, k_transposed, v_transposed, alpha, views } => {
            let operands = [x()?, input(args, 1)?, input(args, 2)?];
            if operands.iter().all(|t| is_cpu_f32(t)) && packed_gemm::available() {
                if let Some(result) = attention_in_place(operands, [*q_transposed, *k_transposed, *v_transposed], *alpha, views)? {
                    return one(result);
                }
            }
            let [q, k, v] = operands;
            let (q, k, v) = (run_chain(q, &views.operands[0])?, run_chain(k, &views.operands[1])?, run_chain(v, &views.operands[2])?);
            let result = attention_unfolded(&q, &k, &v, [*q_transposed, *k_transposed, *v_transposed], *alpha, device)?;
            one(run_chain(&result, &views.result)?)
        }
        Op::Reduce { kind, axes, keepdims } => {
            let t = x()?;
            let axes: Vec<i64> = match (args.get(1).copied().flatten(), axes) {
                (Some(a), _) => ints(a)?,
                (None, Some(a)) => a.clone(),
                (None, None) => (0..t.rank() as i64).collect(),
            };
            let mut axes: Vec<usize> = axes.iter().map(|&a| normalize_axis(a, t.rank())).collect::<CResult<_>>()?;
            axes.sort_unstable();
            let mut out = t.clone();
            for &a in axes.iter().rev() {
                out = match kind {
                    ReduceKind::Max => out.max_keepdim(a)?,
                    ReduceKind::Sum => out.sum_keepdim(a)?,
                };
                if !keepdims {
                    out = out.squeeze(a)?;
                }
            }
            one(out)
        }
        Op::Shape => {
            let dims: Vec<i64> = x()?.dims().iter().map(|&d| d as i64).collect();
            let len = dims.len();
            one(Tensor::from_vec(dims, len, &Device::Cpu)?)
        }
        Op::Gather { axis } => {
            let t = x()?;
            let indices = input(args, 1)?;
            let axis = normalize_axis(*axis, t.rank())?;
            let dim = t.dim(axis)? as i64;
            let idx: Vec<i64> = ints(indices)?.into_iter().map(|i| if i < 0 { i + dim } else { i }).collect();
            if idx.iter().any(|&i| i < 0 || i >= dim) {
                candle_core::bail!("Gather index out of range");
            }
            let flat = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), t.device())?;
            let picked = t.index_select(&flat, axis)?;
            let mut dims: Vec<usize> = t.dims()[..axis].to_vec();
            dims.extend_from_slice(indices.dims());
            dims.extend_from_slice(&t.dims()[axis + 1..]);
            one(picked.reshape(dims)?)
        }
        Op::Unsqueeze { axes } => {
            let t = x()?;
            let axes = match (args.get(1).copied().flatten(), axes) {
                (Some(a), _) => ints(a)?,
                (None, Some(a)) => a.clone(),
                (None, None) => candle_core::bail!("Unsqueeze without axes"),
            };
            let rank = t.rank() + axes.len();
            let mut axes: Vec<usize> = axes.iter().map(|&a| normalize_axis(a, rank)).collect::<CResult<_>>()?;
            axes.sort_unstable();
            let mut dims = t.dims().to_vec();
            for a in axes {
                dims.insert(a, 1);
            }
            one(t.reshape(dims)?)
        }
        Op::Range => {
            let scalar = |i| -> CResult<Tensor> { input(args, i)?.flatten_all() };
            let (s, l, d) = (scalar(0)?, scalar(1)?, scalar(2)?);
            if s.dtype() == DType::F32 {
                let v = |t: &Tensor| -> CResult<f32> { Ok(t.to_vec1::<f32>()?[0]) };
                one(Tensor::arange_step(v(&s)?, v(&l)?, v(&d)?, &Device::Cpu)?)
            } else {
                let v = |t: &Tensor| -> CResult<i64> { Ok(ints(t)?[0]) };
                one(Tensor::arange_step(v(&s)?, v(&l)?, v(&d)?, &Device::Cpu)?)
            }
        }
        Op::Cast { to } => one(x()?.to_dtype(*to)?),
        Op::ConstantOfShape { value } => {
            let dims: Vec<usize> = ints(x()?)?.into_iter().map(|d| d.max(0) as usize).collect();
            one(match &value.values {
                TensorValues::F32(v) => Tensor::full(v.first().copied().unwrap_or(0.0), dims, &Device::Cpu)?,
                TensorValues::I64(v) => Tensor::full(v.first().copied().unwrap_or(0), dims, &Device::Cpu)?,
            })
        }
        Op::Expand => {
            let t = x()?;
            let shape: Vec<usize> = ints(input(args, 1)?)?.into_iter().map(|d| d.max(0) as usize).collect();
            let target = broadcast_shape(t.dims(), &shape)?;
            one(t.broadcast_as(target)?.contiguous()?)
        }
        Op::Constant(data) => one(tensor_from_data(data, device)?),
        Op::Identity => one(x()?.clone()),
    }
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> CResult<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= rank { s[i + s.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => Err(candle_core::Error::Msg(format!("cannot broadcast {x} with {y}"))),
        })
        .collect()
}

/// A convolution, plus `residual` when the graph adds one to its output.
fn conv(c: &ConvOp, x: &Tensor, residual: Option<&Tensor>) -> CResult<Tensor> {
    let Some(residual) = residual else { return conv_alone(c, x) };
    let fits = match (x.dims(), residual.dims()) {
        (&[n, _, h, w], &[rn, rc, rh, rw]) => {
            c.weight.is_none() && is_cpu_f32(residual) && c.conv.output_size(h, w) == Some((rh, rw)) && (n, c.conv.spec().out_channels) == (rn, rc)
        }
        _ => false,
    };
    if fits {
        let x = x.contiguous()?.to_dtype(DType::F32)?;
        x.apply_op2_no_bwd(&residual.contiguous()?, &ConvWithResidual(&c.conv))
    } else {
        conv_alone(c, x)?.broadcast_add(residual)
    }
}

/// A convolution of the concatenation of `parts` along channels. On the CPU it reads each part
/// where it lies; otherwise the parts are concatenated first.
fn conv_of_parts(c: &ConvOp, parts: &[&Tensor], residual: Option<&Tensor>) -> CResult<Tensor> {
    if let Some(out) = conv_of_parts_in_place(c, parts, residual)? {
        return Ok(out);
    }
    let axis = 1;
    let x = match concat_cpu(parts, axis)? {
        Some(t) => t,
        None => Tensor::cat(parts, axis)?,
    };
    conv(c, &x, residual)
}

/// [`conv_of_parts`] on the CPU kernel, when every part is a CPU `f32` tensor of the same
/// `[n, _, h, w]` whose channel planes are contiguous; `Ok(None)` otherwise.
fn conv_of_parts_in_place(c: &ConvOp, parts: &[&Tensor], residual: Option<&Tensor>) -> CResult<Option<Tensor>> {
    let conv = &c.conv;
    let Some(&[n, _, h, w]) = parts.first().map(|p| p.dims()) else { return Ok(None) };
    let Some((oh, ow)) = conv.output_size(h, w) else {
        candle_core::bail!("conv input {h}x{w} is smaller than the kernel");
    };
    let out_dims = [n, conv.spec().out_channels, oh, ow];
    let usable = |t: &Tensor| {
        let planes_contiguous = matches!(t.layout().stride(), &[_, s1, s2, 1] if s1 == h * w && s2 == w);
        is_cpu_f32(t) && matches!(t.dims(), &[pn, _, ph, pw] if (pn, ph, pw) == (n, h, w)) && planes_contiguous
    };
    let residual_fits = residual.is_none_or(|r| is_cpu_f32(r) && r.dims() == out_dims);
    if c.weight.is_some() || !parts.iter().all(|t| usable(t)) || !residual_fits {
        return Ok(None);
    }
    let channels: usize = parts.iter().map(|p| p.dims()[1]).sum();
    if channels != conv.spec().in_channels {
        candle_core::bail!("conv expects {} input channels, its parts have {channels}", conv.spec().in_channels);
    }
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    // The residual is a tensor of its own (made contiguous, it may share a part's storage):
    // read under the same guards as the parts.
    let mut tensors = parts.to_vec();
    tensors.extend(residual.as_ref());
    let out = with_cpu_storages(&tensors, |buffers| {
        let input_parts = parts
            .iter()
            .zip(buffers)
            .map(|(t, data)| kernels::conv::InputPart { data: &data[t.layout().start_offset()..], channels: t.dims()[1], image_stride: t.layout().stride()[0] })
            .collect();
        let input = kernels::conv::ConvInput::new(input_parts, n, h, w)?;
        let residual = residual.as_ref().zip(buffers.last()).map(|(r, data)| {
            let (start, end) = r.layout().contiguous_offsets().expect("made contiguous above");
            &data[start..end]
        });
        Some(conv.run_input(&input, residual))
    })?;
    let Some(Some(out)) = out else { return Ok(None) };
    Ok(Some(Tensor::from_vec(out, &out_dims[..], &Device::Cpu)?))
}

fn conv_alone(c: &ConvOp, x: &Tensor) -> CResult<Tensor> {
    match (&c.weight, &c.bias) {
        (Some(weight), Some(bias)) => {
            let conv = c.conv.spec();
            let (t, l, b, r) = conv.pads;
            let (x, pad) = if t == b && l == r && t == l {
                (x.clone(), t)
            } else {
                (x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0)
            };
            if conv.stride.0 != conv.stride.1 || conv.dilation.0 != conv.dilation.1 {
                candle_core::bail!("anisotropic stride or dilation needs the CPU kernel");
            }
            let y = x.conv2d(weight, pad, conv.stride.0, conv.dilation.0, conv.groups)?.broadcast_add(bias)?;
            match conv.activation {
                Activation::Identity => Ok(y),
                Activation::Silu => y.silu(),
            }
        }
        _ => x.contiguous()?.to_dtype(DType::F32)?.apply_op1_no_bwd(&c.conv),
    }
}

fn max_pool(x: &Tensor, kernel: (usize, usize), stride: (usize, usize), pads: (usize, usize, usize, usize)) -> CResult<Tensor> {
    if kernel.0 != kernel.1 || stride.0 != stride.1 {
        candle_core::bail!("only square pooling is supported");
    }
    let (t, l, b, r) = pads;
    if t >= kernel.0 || l >= kernel.1 || b >= kernel.0 || r >= kernel.1 {
        candle_core::bail!("pooling padding must be smaller than the kernel");
    }
    // Padding by repeating the edge equals padding with -inf for a max: every window that covers
    // padding also covers the edge value it repeats.
    let padded = x.pad_with_same(2, t, b)?.pad_with_same(3, l, r)?;
    padded.max_pool2d_with_stride(kernel.0, stride.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_that_share_a_storage_share_one_read_guard() {
        // Two halves of one tensor, read together while another thread waits to write it: a
        // second read lock on the storage would queue behind the writer, which waits for the
        // first, and never return.
        let whole = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap();
        let (first, second) = (whole.narrow(0, 0, 4).unwrap(), whole.narrow(0, 4, 4).unwrap());
        let other = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let ones = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        std::thread::scope(|scope| {
            let read = with_cpu_storages(&[&first, &other, &second], |buffers| {
                let writer = scope.spawn(|| whole.slice_set(&ones, 0, 0));
                // Let the writer queue on the lock before the buffers are used.
                std::thread::sleep(std::time::Duration::from_millis(100));
                assert!(!writer.is_finished(), "the writer waits while the storage is read");
                (buffers.len(), std::ptr::eq(buffers[0], buffers[2]), buffers[2][4..].to_vec(), buffers[1].len())
            });
            assert_eq!(read.unwrap(), Some((3, true, vec![4.0, 5.0, 6.0, 7.0], 3)));
        });
        assert_eq!(whole.to_vec1::<f32>().unwrap()[..4], [1.0; 4]);
    }

    #[test]
    fn cpu_upsampling_matches_candles() {
        let input: Vec<f32> = (0..2 * 3 * 5 * 7).map(|i| i as f32).collect();
        let x = Tensor::from_vec(input, (2, 3, 5, 7), &Device::Cpu).unwrap();
        for (height, width) in [(10, 14), (15, 7), (5, 21)] {
            let want = x.upsample_nearest2d(height, width).unwrap();
            let got = x.apply_op1_no_bwd(&CpuUpsample { height, width }).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{height}x{width}");
        }
    }

    #[test]
    fn cpu_max_pool_matches_candles() {
        let input: Vec<f32> = (0..2 * 3 * 9 * 11).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let x = Tensor::from_vec(input, (2, 3, 9, 11), &Device::Cpu).unwrap();
        for (kernel, stride, pads) in [((5, 5), (1, 1), (2, 2, 2, 2)), ((3, 3), (2, 2), (1, 1, 1, 1)), ((2, 2), (2, 2), (0, 0, 0, 0)), ((3, 3), (1, 1), (0, 2, 1, 0))] {
            let want = max_pool(&x, kernel, stride, pads).unwrap();
            let got = x.apply_op1_no_bwd(&CpuMaxPool { kernel, stride, pads }).unwrap();
            assert_eq!(got.dims(), want.dims(), "{kernel:?} {stride:?} {pads:?}");
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{kernel:?} {stride:?} {pads:?}");
        }
    }
}
