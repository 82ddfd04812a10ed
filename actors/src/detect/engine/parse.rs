//! ONNX operators to plan steps: each node's operator and attributes become a typed [`Op`],
//! and anything we do not support is an error naming the node.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::{BinaryOp, CandleConv, ConvOp, Op, ReduceKind, SoftmaxConvOp, Target};
use crate::detect::DetectError;
use crate::detect::kernels::activation::{Activation, UnaryFn};
use crate::detect::kernels::conv::{Conv2d, ConvSpec};
use crate::detect::kernels::pool::MaxPool;
use crate::detect::kernels::softmax_dot::SoftmaxDot;
use crate::detect::model::{Attribute, Node, TensorData, TensorValues};

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
    if let Some(mode) = attr_string(node, "auto_pad")
        && mode != "NOTSET"
    {
        return Err(unsupported(node, format!("auto_pad={mode}")));
    }
    match attr_ints(node, "pads")?.as_deref() {
        None => Ok((0, 0, 0, 0)),
        Some(&[t, l, b, r]) if t >= 0 && l >= 0 && b >= 0 && r >= 0 => Ok((t as usize, l as usize, b as usize, r as usize)),
        Some(v) => Err(unsupported(node, format!("pads {v:?}"))),
    }
}

pub(super) fn parse_op(node: &Node, initializers: &HashMap<String, TensorData>, target: &Target) -> Result<Op, DetectError> {
    Ok(match node.op_type.as_str() {
        "Conv" => Op::Conv(Box::new(parse_conv(node, initializers, target)?)),
        "Sigmoid" => Op::Unary(UnaryFn::Sigmoid),
        "Exp" => Op::Unary(UnaryFn::Exp),
        "Add" => Op::Binary(BinaryOp::Add),
        "Sub" => Op::Binary(BinaryOp::Sub),
        "Mul" => Op::Binary(BinaryOp::Mul),
        "Div" => Op::Binary(BinaryOp::Div),
        "Split" => Op::Split { axis: attr_int(node, "axis", 0)?, sizes: attr_ints(node, "split")?, of_blocked: false },
        "Concat" => Op::Concat { axis: attr_int(node, "axis", 0)?, maps: Vec::new(), nested: Vec::new() },
        "MaxPool" => {
            if attr_int(node, "ceil_mode", 0)? != 0 || node.outputs.len() > 1 {
                return Err(unsupported(node, "ceil_mode or indices output"));
            }
            let dilations = pair(node, attr_ints(node, "dilations")?, 1)?;
            if dilations != (1, 1) {
                return Err(unsupported(node, "dilated pooling"));
            }
            let (kernel, stride, pads) = (pair(node, attr_ints(node, "kernel_shape")?, 1)?, pair(node, attr_ints(node, "strides")?, 1)?, pads4(node)?);
            if MaxPool::new(kernel, stride, pads).is_none() {
                return Err(unsupported(node, "a zero window or stride, or padding as wide as the window"));
            }
            Op::MaxPool { kernel, stride, pads }
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
        "Transpose" => Op::Transpose { perm: attr_ints(node, "perm")?.map(|p| p.into_iter().map(|v| v as usize).collect()) },
        "Softmax" => Op::Softmax { axis: attr_int(node, "axis", -1)? },
        "Slice" => Op::Slice,
        "MatMul" => Op::MatMul {
            a_transposed: attr_int(node, "streamdet.transpose_a", 0)? != 0,
            b_transposed: attr_int(node, "streamdet.transpose_b", 0)? != 0,
            alpha: scale_attribute(node),
        },
        "streamdet.SoftmaxConv" => Op::SoftmaxConv(Box::new(parse_softmax_conv(node, initializers, target)?)),
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
            Op::Shape { of_blocked: false }
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

/// A fused softmax and 1x1 convolution ([`fuse`](super::fuse)): inputs `x`, the weights
/// `[outputs, channels, 1, 1]` and optionally the biases, both constant.
fn parse_softmax_conv(node: &Node, initializers: &HashMap<String, TensorData>, target: &Target) -> Result<SoftmaxConvOp, DetectError> {
    let constant = |i: usize| node.inputs.get(i).filter(|n| !n.is_empty()).and_then(|n| initializers.get(n));
    let Some(TensorData { shape, values: TensorValues::F32(weights) }) = constant(1) else {
        return Err(unsupported(node, "weights must be a constant float tensor"));
    };
    let (outputs, channels) = match shape.as_slice() {
        &[o, c, 1, 1] => (o, c),
        other => return Err(unsupported(node, format!("weights of {other:?} are not 1x1"))),
    };
    let bias = match constant(2) {
        None => vec![0.0; outputs],
        Some(TensorData { values: TensorValues::F32(b), .. }) => b.clone(),
        Some(_) => return Err(unsupported(node, "bias must be a constant float vector")),
    };
    let on_device = |values: &[f32], dims: &[usize]| Tensor::from_vec(values.to_vec(), dims, &target.device).map_err(DetectError::from_candle);
    let (weight, bias_tensor) = (on_device(weights, &[outputs, channels])?, on_device(&bias, &[outputs])?);
    let dot = SoftmaxDot::new(weights.clone(), bias, channels).ok_or_else(|| unsupported(node, "weights and biases disagree"))?;
    Ok(SoftmaxConvOp { dot, view: Vec::new(), weight, bias: bias_tensor })
}

fn parse_conv(node: &Node, initializers: &HashMap<String, TensorData>, target: &Target) -> Result<ConvOp, DetectError> {
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
    if let Some(k) = attr_ints(node, "kernel_shape")?
        && k != [kh as i64, kw as i64]
    {
        return Err(unsupported(node, "kernel_shape disagrees with the weights"));
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
    // The CPU kernel packs the weights itself; candle's conv2d takes them as a tensor.
    let candle = if target.native { None } else { Some(candle_conv(&conv, &target.device).map_err(DetectError::from_candle)?) };
    Ok(ConvOp { conv, concat_parts: 0, upsampled: None, candle, spread_output: false, blocked_output: false })
}

/// The most floats a grouped convolution's kernels may take once spread into one dense kernel
/// (64 MiB): YOLO's largest, a 7x7 depthwise kernel on 256 channels, takes 3.2 million.
const SPREAD_MAX_FLOATS: usize = 16 << 20;

/// `conv`'s weights for candle's `conv2d` on `device`. A grouped convolution's kernels are
/// spread into one block-diagonal kernel (zeros between the groups), where that stays within
/// [`SPREAD_MAX_FLOATS`]: candle runs a grouped `conv2d` as one convolution per group, which on
/// a GPU is several kernel launches per channel of a depthwise layer, while the dense kernel is
/// one matrix product: the zeros cost a GPU far less than the launches (on an H200, YOLO11n
/// went from 31.1 to 8.9 ms a call and YOLOv12n from 53.0 to 12.1), and the sums are the same
/// products of the same weights, since the zeros add nothing (to finite inputs).
fn candle_conv(conv: &Conv2d, device: &Device) -> candle_core::Result<CandleConv> {
    let spec = conv.spec();
    let (out_channels, groups, (kh, kw)) = (spec.out_channels, spec.groups, spec.kernel);
    let cin_g = spec.in_channels / groups;
    let bias = Tensor::from_vec(conv.bias().to_vec(), (1, out_channels, 1, 1), device)?;
    let spread_floats = out_channels * spec.in_channels * kh * kw;
    if groups == 1 || spread_floats > SPREAD_MAX_FLOATS {
        let weight = Tensor::from_vec(conv.weights().to_vec(), (out_channels, cin_g, kh, kw), device)?;
        return Ok(CandleConv { weight, groups, bias });
    }
    let (taps, out_per_group) = (kh * kw, out_channels / groups);
    let mut dense = vec![0f32; spread_floats];
    for (o, kernel) in conv.weights().chunks_exact(cin_g * taps).enumerate() {
        let first_input = o / out_per_group * cin_g;
        let row = &mut dense[o * spec.in_channels * taps..][first_input * taps..][..cin_g * taps];
        row.copy_from_slice(kernel);
    }
    let weight = Tensor::from_vec(dense, (out_channels, spec.in_channels, kh, kw), device)?;
    Ok(CandleConv { weight, groups: 1, bias })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn a_spread_grouped_kernel_convolves_as_its_groups() {
        // Depthwise 3x3 stride 2, and 2 groups of 3 inputs to 4 outputs each, 5x5.
        for (cin, cout, groups, k, stride) in [(6, 6, 6, 3, 2), (6, 8, 2, 5, 1)] {
            let spec = ConvSpec::square(cin, cout, groups, k, stride, k / 2, Activation::Identity);
            let conv = Conv2d::new(spec, values(cout * cin / groups * k * k, 1), values(cout, 2)).unwrap();
            let candle = candle_conv(&conv, &Device::Cpu).unwrap();
            assert_eq!((candle.groups, candle.weight.dims()), (1, &[cout, cin, k, k][..]));
            let x = Tensor::from_vec(values(2 * cin * 9 * 11, 3), (2, cin, 9, 11), &Device::Cpu).unwrap();
            let grouped = Tensor::from_vec(conv.weights().to_vec(), (cout, cin / groups, k, k), &Device::Cpu).unwrap();
            let want = x.conv2d(&grouped, k / 2, stride, 1, groups).unwrap();
            let got = x.conv2d(&candle.weight, k / 2, stride, 1, 1).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{cin}->{cout} in {groups} groups: {diff}");
        }
        // Kernels too large to spread stay grouped.
        let wide = 2048;
        let conv = Conv2d::new(ConvSpec::square(wide, wide, wide, 3, 1, 1, Activation::Identity), values(wide * 9, 1), values(wide, 2)).unwrap();
        assert_eq!(candle_conv(&conv, &Device::Cpu).unwrap().groups, wide);
    }
}
