//! Executes an ONNX detection graph on candle tensors.
//!
//! Loading turns the graph into a plan once: every operator is parsed into a typed [`Op`]
//! (an operator or attribute we do not support is an error naming the node; [`parse`]), `Conv →
//! Sigmoid → Mul` chains become one convolution with a fused SiLU (and skip connection), an
//! attention head's `MatMul → Softmax → MatMul` one fused op ([`fuse`]), convolution weights are
//! laid out for the CPU kernel, everything that depends only on constants is folded, and each
//! value gets a slot that is freed after its last use. On the CPU the plan then moves less data:
//! chains of reshapes, transposes and splits fold into the step that reads them
//! ([`fold::fold_views`]), and convolutions read a channel concatenation where its parts lie
//! ([`fold::fold_concats_into_convs`]), and the tensors that only pointwise convolutions pass
//! between them stay in blocks of 8 channels ([`blocked`]). Running the plan is a loop over
//! steps ([`eval`]).
//!
//! On the CPU, convolutions, attention and most element-wise work run on streamdet's own
//! kernels ([`super::kernels`], wrapped as candle operations in [`custom_ops`]); on other
//! devices they use candle's operations.
//!
//! This module holds the plan's types and the [`Engine`] that builds and runs it.

mod blocked;
mod custom_ops;
mod eval;
mod fold;
mod fuse;
mod parse;
mod shape_cache;
mod spread;
#[cfg(test)]
mod test_graphs;
mod upsampled;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::DetectError;
use super::kernels::activation::UnaryFn;
use super::kernels::conv::Conv2d;
use super::kernels::softmax_dot::SoftmaxDot;
use super::model::{OnnxModel, TensorData, TensorValues};
use super::views::ViewStep;
use shape_cache::ShapeCache;

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
    /// `CONV_MORE_PARTS..`; see [`fold::fold_concats_into_convs`].
    concat_parts: usize,
    /// Set when one of those parts arrives before its nearest-neighbour upsampling; see
    /// [`upsampled::fold_upsampled_parts`].
    upsampled: Option<upsampled::UpsampledPart>,
    /// The weights as candle's `conv2d` takes them, on plans that run candle's operations.
    candle: Option<CandleConv>,
    /// Whether the output's channel planes may lie further apart than their size (every
    /// reader takes them in place); see [`spread::mark_spread_outputs`].
    spread_output: bool,
    /// Whether the output stays in blocks of 8 channels (every reader takes them in place);
    /// see [`blocked::mark_blocked_outputs`].
    blocked_output: bool,
}

/// A convolution's weights for candle's `conv2d`, on the execution device.
#[derive(Debug)]
struct CandleConv {
    /// `[out, in / groups, kh, kw]`.
    weight: Tensor,
    /// The groups `weight` is for: 1 when a grouped convolution's kernels are spread into one
    /// block-diagonal kernel (see [`parse::candle_conv`]).
    groups: usize,
    /// `[1, out, 1, 1]`.
    bias: Tensor,
}

#[derive(Debug)]
enum Op {
    Conv(Box<ConvOp>),
    Unary(UnaryFn),
    Binary(BinaryOp),
    Split {
        axis: i64,
        sizes: Option<Vec<i64>>,
        /// The input is a blocked tensor ([`blocked`]) split into whole blocks of channels:
        /// the outputs are views of its blocks.
        of_blocked: bool,
    },
    Concat {
        axis: i64,
        /// Per part, an element-wise function applied as it is copied, folded from the step
        /// that made it ([`fold::fold_unary_into_concats`]); empty when none is.
        maps: Vec<Option<UnaryFn>>,
        /// Per part, the concatenation that made it when that one is folded in
        /// ([`fold::fold_nested_concats`]): its inputs stand in the part's place among the
        /// step's inputs. Empty when no part is one.
        nested: Vec<Option<NestedConcat>>,
    },
    MaxPool {
        kernel: (usize, usize),
        stride: (usize, usize),
        pads: (usize, usize, usize, usize),
    },
    ResizeNearest,
    Reshape,
    Transpose {
        perm: Option<Vec<usize>>,
    },
    Softmax {
        axis: i64,
    },
    Slice,
    /// A matrix product; a flag means that operand arrives with its last two axes swapped (a
    /// transpose folded into the product's packing).
    /// `alpha * A x B`, each operand possibly read transposed.
    MatMul {
        a_transposed: bool,
        b_transposed: bool,
        alpha: f32,
    },
    /// `V x softmax(alpha * Q x K)^T` over the last two axes (attention, with `Q` rows as
    /// queries): inputs `Q`, `K`, `V`, each possibly stored with its last two axes swapped.
    /// `views` holds the view chains folded into it (see [`fold::fold_views`]).
    Attention {
        q_transposed: bool,
        k_transposed: bool,
        v_transposed: bool,
        alpha: f32,
        views: Box<AttentionViews>,
    },
    SoftmaxConv(Box<SoftmaxConvOp>),
    /// The end of a chain of views, copied out of the tensor the chain starts from in one pass.
    View(Vec<ViewStep>),
    Reduce {
        kind: ReduceKind,
        axes: Option<Vec<i64>>,
        keepdims: bool,
    },
    /// The input's shape; `of_blocked`: the input is a blocked tensor
    /// ([`blocked`]), whose shape is its logical `[n, c, h, w]`.
    Shape {
        of_blocked: bool,
    },
    Gather {
        axis: i64,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Range,
    Cast {
        to: DType,
    },
    ConstantOfShape {
        value: TensorData,
    },
    Expand,
    Constant(TensorData),
    Identity,
}

/// A concatenation folded into the one that reads it ([`fold::fold_nested_concats`]): its
/// `parts` inputs, joined along `axis`, then reshaped to each of `reshapes` in turn, make one
/// part of the outer concatenation.
#[derive(Debug, Clone, PartialEq)]
struct NestedConcat {
    axis: i64,
    parts: usize,
    reshapes: Vec<Vec<i64>>,
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

/// Milliseconds and step count per operator type.
pub type OpProfile = std::collections::BTreeMap<String, (f64, usize)>;

/// One step of a timed run ([`Engine::describe`]): its place in the plan, its entry in an
/// [`OpProfile`] (`op`), the layer it runs when that says more (a convolution's channels,
/// kernel and stride: `"64->64 k3 s2"`), the shape of its first input, and its wall time.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTime {
    pub index: usize,
    pub op: String,
    pub layer: String,
    pub input: Vec<usize>,
    pub ms: f64,
}

/// The wall time of each step of one run ([`Engine::run_timed`]), unnamed.
#[derive(Debug)]
pub struct StepTimes(Vec<RawStepTime>);

/// A step's time as [`Engine::run_steps`] records it, without allocating.
#[derive(Debug)]
struct RawStepTime {
    index: usize,
    input: Dims,
    ms: f64,
}

/// A tensor's dimensions, up to [`Dims::MAX`] of them (the engine's tensors have at most 5:
/// a tensor in blocks of channels), without a heap allocation.
#[derive(Debug, Default)]
struct Dims {
    dims: [usize; Dims::MAX],
    len: usize,
}

impl Dims {
    const MAX: usize = 8;

    /// `dims`, the first [`Dims::MAX`] of them.
    fn of(dims: &[usize]) -> Dims {
        let len = dims.len().min(Self::MAX);
        let mut out = Dims { dims: [0; Self::MAX], len };
        out.dims[..len].copy_from_slice(&dims[..len]);
        out
    }

    fn to_vec(&self) -> Vec<usize> {
        self.dims[..self.len].to_vec()
    }
}

/// A softmax over channels and the 1x1 convolution that reads it, as one step
/// ([`fuse::fuse_softmax_conv`]); `view` is the chain of views folded into its input.
#[derive(Debug)]
struct SoftmaxConvOp {
    dot: SoftmaxDot,
    view: Vec<ViewStep>,
    /// `[outputs, channels]` and `[outputs]` on the execution device, for the candle path.
    weight: Tensor,
    bias: Tensor,
}

/// The view chains folded into an attention step: per operand, from the tensor the step reads
/// to the operand; and from the step's result to the tensor it produces.
#[derive(Debug, Default)]
struct AttentionViews {
    operands: [Vec<ViewStep>; 3],
    result: Vec<ViewStep>,
}

/// Which kernels a plan runs on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// streamdet's own kernels wherever they apply (the CPU only).
    #[default]
    Native,
    /// candle's operations for every step, as on a GPU: the path a CUDA build takes, run on the
    /// CPU so that the tests can hold it against ONNX Runtime.
    Generic,
}

/// Where a plan runs, and whether its steps may use streamdet's CPU kernels.
#[derive(Debug, Clone)]
struct Target {
    device: Device,
    native: bool,
}

impl Target {
    fn new(device: &Device, kernels: Kernels) -> Target {
        Target { device: device.clone(), native: device.is_cpu() && kernels == Kernels::Native }
    }

    /// Whether `t` may go to a CPU kernel.
    fn native_f32(&self, t: &Tensor) -> bool {
        self.native && t.device().is_cpu() && t.dtype() == DType::F32
    }
}

/// A planned graph, ready to run.
#[derive(Debug)]
pub struct Engine {
    target: Target,
    steps: Vec<Step>,
    slot_count: usize,
    constants: Vec<(usize, Tensor)>,
    input_slot: usize,
    output_slot: usize,
    shape_cache: ShapeCache,
}

fn tensor_from_data(data: &TensorData, device: &Device) -> CResult<Tensor> {
    match &data.values {
        TensorValues::F32(v) => Tensor::from_vec(v.clone(), data.shape.as_slice(), device),
        TensorValues::I64(v) => Tensor::from_vec(v.clone(), data.shape.as_slice(), device),
    }
}

impl Engine {
    /// Plans `model` for `device`, with streamdet's kernels on the CPU.
    pub fn plan(model: &OnnxModel, device: &Device) -> Result<Self, DetectError> {
        Self::plan_with(model, device, Kernels::Native)
    }

    /// Plans `model` for `device`, with the given kernels.
    pub fn plan_with(model: &OnnxModel, device: &Device, kernels: Kernels) -> Result<Self, DetectError> {
        let target = Target::new(device, kernels);
        let input = model.inputs.first().ok_or_else(|| DetectError::BadModelText("the graph has no input".into()))?;
        let output = model.outputs.first().ok_or_else(|| DetectError::BadModelText("the graph has no output".into()))?;
        // A fixed batch size: the model's first input dimension when it is not symbolic.
        let fixed_batch = input.shape.first().copied().flatten();
        let nodes = fuse::fuse(&model.nodes, &model.initializers, fixed_batch);

        let mut slots: HashMap<String, usize> = HashMap::new();
        let slot_of = |name: &str, slots: &mut HashMap<String, usize>| {
            let next = slots.len();
            *slots.entry(name.to_string()).or_insert(next)
        };
        let mut constants: HashMap<usize, Tensor> = HashMap::new();
        // Constants are folded on the CPU, then moved to the device once.
        let cpu = Target::new(&Device::Cpu, kernels);
        for (name, data) in &model.initializers {
            let slot = slot_of(name, &mut slots);
            let tensor = tensor_from_data(data, &cpu.device).map_err(|e| DetectError::BadModelText(format!("initializer {name:?}: {e}")))?;
            constants.insert(slot, tensor);
        }
        let input_slot = slot_of(&input.name, &mut slots);

        let mut steps = Vec::new();
        for node in &nodes {
            let op = parse::parse_op(node, &model.initializers, &target)?;
            let inputs: Vec<Option<usize>> = node.inputs.iter().map(|name| (!name.is_empty()).then(|| slot_of(name, &mut slots))).collect();
            let outputs: Vec<usize> = node.outputs.iter().map(|name| slot_of(name, &mut slots)).collect();
            let foldable = !matches!(op, Op::Conv(_)) && inputs.iter().flatten().all(|s| constants.contains_key(s));
            let step = Step { node: node.name.clone(), op_type: node.op_type.clone(), op, inputs, outputs, release: Vec::new() };
            if foldable {
                // Everything this node reads is known now: compute it once, on the CPU.
                let args: Vec<Option<&Tensor>> = step.inputs.iter().map(|s| s.map(|s| &constants[&s])).collect();
                let results = eval::eval(&step.op, &args, &cpu).map_err(|e| execution_error(&step, e))?;
                for (slot, value) in step.outputs.iter().zip(results) {
                    constants.insert(*slot, value);
                }
            } else {
                steps.push(step);
            }
        }
        let output_slot = *slots.get(output).ok_or_else(|| DetectError::BadModelText(format!("output {output:?} is never produced")))?;
        let steps = fold::fold_views(steps, &constants, output_slot, &target);
        let steps = fold::fold_concats_into_convs(steps, output_slot, &target);
        let steps = upsampled::fold_upsampled_parts(steps, &constants, output_slot, &target);
        let steps = fold::fold_unary_into_concats(steps, output_slot, &target);
        let steps = fold::fold_nested_concats(steps, &constants, output_slot, &target);
        let steps = spread::mark_spread_outputs(steps, output_slot, &target);
        let mut steps = blocked::mark_blocked_outputs(steps, &constants, output_slot, &target);

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
        let shape_cache = ShapeCache::plan(&steps, &constant_slots.iter().copied().collect());
        Ok(Engine { target, steps, slot_count: slots.len(), constants: used_constants, input_slot, output_slot, shape_cache })
    }

    pub fn device(&self) -> &Device {
        &self.target.device
    }

    /// Runs the graph on `input` and returns its first output.
    pub fn run(&self, input: Tensor) -> Result<Tensor, DetectError> {
        self.run_steps(input, None)
    }

    /// Like [`run`](Self::run), and returns the wall time of each step it runs (steps whose
    /// results are kept from an earlier run of the same input shape do not run), for
    /// [`describe`](Self::describe) to name.
    ///
    /// The times go into a buffer allocated before the first step, and are named (strings,
    /// shapes) only afterwards, best on another thread: allocations of their own between the
    /// steps, or kept from one run to the next on the thread that runs them, take pieces of the
    /// blocks that the steps' outputs free, so that later outputs no longer fit there and come
    /// from fresh pages. Named step by step and kept on that thread (`bench-model --profile
    /// steps`, YOLOv12n, 2 threads), the timed calls page-faulted 450-600 times each, against 12
    /// so and 7 untimed, and the step that most often got the fresh pages (48 -> 64 channels at
    /// 160x160) read 1.9-2.7 ms (its median in each of six processes) against 1.2-1.5 so.
    pub fn run_timed(&self, input: Tensor) -> Result<(Tensor, StepTimes), DetectError> {
        let mut times = Vec::with_capacity(self.steps.len());
        let output = self.run_steps(input, Some(&mut times))?;
        Ok((output, StepTimes(times)))
    }

    /// The entries of a timed run's steps ([`run_timed`](Self::run_timed)), in the order they
    /// ran; times from another engine's run name only the steps this one has.
    pub fn describe(&self, times: &StepTimes) -> Vec<StepTime> {
        times
            .0
            .iter()
            .filter_map(|time| {
                let step = self.steps.get(time.index)?;
                Some(StepTime { index: time.index, op: profile_key(step), layer: layer_of(step), input: time.input.to_vec(), ms: time.ms })
            })
            .collect()
    }

    /// Runs the steps; with `times`, pushes each step's wall time there (it has room for them
    /// all: see [`run_timed`](Self::run_timed)).
    fn run_steps(&self, input: Tensor, mut times: Option<&mut Vec<RawStepTime>>) -> Result<Tensor, DetectError> {
        let mut values: Vec<Option<Tensor>> = vec![None; self.slot_count];
        for (slot, tensor) in &self.constants {
            values[*slot] = Some(tensor.clone());
        }
        let input_dims = input.dims().to_vec();
        values[self.input_slot] = Some(input);
        // The values that follow from the input's shape: kept from the last run of this shape,
        // or collected during this one.
        let cached = self.shape_cache.values_for(&input_dims);
        let mut shape_derived = Vec::new();
        for (slot, value) in cached.iter().flatten() {
            values[*slot] = Some(value.clone());
        }
        // Bytes of step outputs written so far, and how far that count had got when each slot
        // was written: a convolution's input written more than the cores' L2 caches hold before
        // the step runs is cold ([`eval::conv_step`]).
        let mut written = 0usize;
        let mut written_at = vec![0usize; self.slot_count];
        let cold_after = super::kernels::cache::l2_bytes() * super::kernels::parallel::threads();
        for (index, step) in self.steps.iter().enumerate() {
            let derived = self.shape_cache.is_derived(index);
            if derived && cached.is_some() {
                for slot in &step.release {
                    values[*slot] = None;
                }
                continue;
            }
            let args: Vec<Option<&Tensor>> = step.inputs.iter().map(|s| s.and_then(|s| values[s].as_ref())).collect();
            let started = times.is_some().then(std::time::Instant::now);
            let results = match &step.op {
                Op::Conv(c) => {
                    let cold: Vec<bool> = step.inputs.iter().map(|s| s.is_some_and(|s| written - written_at[s] > cold_after)).collect();
                    eval::conv_step(c, &args, &cold, &self.target).map(|out| vec![out])
                }
                op => eval::eval(op, &args, &self.target),
            }
            .map_err(|e| execution_error(step, e))?;
            if let (Some(times), Some(started)) = (times.as_deref_mut(), started) {
                // A GPU runs the step's kernels after they are queued: its time is known once
                // they have finished.
                self.target.device.synchronize().map_err(|e| execution_error(step, e))?;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let input = args.first().copied().flatten().map_or_else(Dims::default, |t| Dims::of(t.dims()));
                debug_assert!(times.len() < times.capacity(), "room for every step");
                times.push(RawStepTime { index, input, ms });
            }
            if derived {
                shape_derived.extend(step.outputs.iter().copied().zip(results.iter().cloned()));
            }
            for (slot, value) in step.outputs.iter().zip(results) {
                written_at[*slot] = written;
                written += value.elem_count() * value.dtype().size_in_bytes();
                values[*slot] = Some(value);
            }
            for slot in &step.release {
                values[*slot] = None;
            }
        }
        if cached.is_none() {
            self.shape_cache.keep(&input_dims, shape_derived);
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

/// What a step's layer is, beyond its operator type: a convolution's channels, kernel and
/// stride (`"64->64 k3 s2"`); empty for other steps.
fn layer_of(step: &Step) -> String {
    match &step.op {
        Op::Conv(c) => {
            let spec = c.conv.spec();
            format!("{}->{} k{} s{}", spec.in_channels, spec.out_channels, spec.kernel.0, spec.stride.0)
        }
        _ => String::new(),
    }
}

fn execution_error(step: &Step, err: candle_core::Error) -> DetectError {
    DetectError::Execution { node: step.node.clone(), op: step.op_type.clone(), message: err.to_string() }
}
