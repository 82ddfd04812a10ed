//! Fusion passes: rewrites of the ONNX node list, before it is planned, that turn chains of
//! operators into one node the CPU kernels run in one pass (a convolution with its SiLU and
//! residual, a scaled or transposed product, a softmax, an attention head, a softmax over
//! channels with the 1x1 convolution that reads it).

use std::collections::HashMap;

use crate::detect::model::{Attribute, Node, TensorData, TensorValues};

/// Runs every fusion pass over `nodes`, in the order each relies on: the attention pass
/// matches what the softmax, scale and transpose passes left.
pub(super) fn fuse(nodes: &[Node], initializers: &HashMap<String, TensorData>, fixed_batch: Option<usize>) -> Vec<Node> {
    let nodes = split_joined_parts(nodes, initializers, fixed_batch);
    let nodes = fuse_conv_silu(&nodes);
    let nodes = fuse_conv_residual(&nodes, initializers);
    let nodes = fuse_softmax_conv(&nodes, initializers);
    let nodes = fuse_softmax(&nodes, initializers);
    let nodes = fuse_matmul_scale(&nodes, initializers);
    let nodes = fuse_transposed_matmul_operands(&nodes);
    fuse_attention(&nodes)
}

/// Rewrites `y = Conv(x); s = Sigmoid(y); z = Mul(y, s)` into one node `z = Conv(x)` marked with
/// a SiLU activation, when `y` and `s` are used nowhere else.
fn fuse_conv_silu(nodes: &[Node]) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    fuse_binary(nodes, "Mul", |mul, y, s, fused| {
        let (Some(&ci), Some(&si)) = (producer.get(y), producer.get(s)) else { return None };
        let (conv, sig) = (&nodes[ci], &nodes[si]);
        let fits = conv.op_type == "Conv"
            && sig.op_type == "Sigmoid"
            && sig.inputs.first().map(String::as_str) == Some(y)
            && uses.get(y) == Some(&2)
            && uses.get(s) == Some(&1)
            && !fused[ci]
            && !fused[si];
        if !fits {
            return None;
        }
        let mut node = conv.clone();
        node.outputs = mul.outputs.clone();
        node.attributes.insert("streamdet.activation".into(), Attribute::String("silu".into()));
        // The fused node takes the Mul's place, after everything the Mul waited for.
        Some((node, vec![ci, si]))
    })
}

/// Rewrites the split of a join of joined parts into the joins of the parts (a detection
/// head's: each scale's box and class channels joined, reshaped to rows, joined over the scales,
/// then split into boxes and classes again):
/// `c_i = Concat<1>(x_i, y_i); r_i = Reshape(c_i, [n, a + b, -1]); j = Concat<2>(r_0, ..);
/// x, y = Split<1, [a, b]>(j)` becomes `x = Concat<2>(Reshape(x_i, [n, a, -1]), ..)`, and the
/// same for `y`, when each `x_i` (`y_i`) is a convolution of `a` (`b`) output channels and
/// nothing else reads `c_i`, `r_i` or `j`. The class scores are then copied once, into the
/// output ([`fold::fold_nested_concats`](super::fold::fold_nested_concats)), where they were
/// copied into the join and out of it again. `n` must be 0 (the batch as it is) or the model's
/// fixed batch size, so that the reshape keeps the images apart either way.
fn split_joined_parts(nodes: &[Node], initializers: &HashMap<String, TensorData>, fixed_batch: Option<usize>) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    let ints = |name: &str| match initializers.get(name).map(|t| &t.values) {
        Some(TensorValues::I64(v)) => Some(v.clone()),
        _ => None,
    };
    let axis = |node: &Node| match node.attributes.get("axis") {
        Some(Attribute::Int(a)) => *a,
        _ => 0,
    };
    // The node that makes `value`, when nothing else reads `value`.
    let only_reader = |value: &str, op_type: &str| producer.get(value).copied().filter(|&i| nodes[i].op_type == op_type && uses.get(value) == Some(&1));
    let conv_channels = |value: &str| {
        let conv = &nodes[*producer.get(value)?];
        let weights = initializers.get(conv.inputs.get(1)?)?;
        (conv.op_type == "Conv").then(|| weights.shape.first().map(|&c| c as i64)).flatten()
    };
    let mut dropped = vec![false; nodes.len()];
    let mut replacement: HashMap<usize, Vec<Node>> = HashMap::new();
    for (si, split) in nodes.iter().enumerate() {
        let rewritten = (|| {
            if split.op_type != "Split" || !matches!(axis(split), 1 | -2) {
                return None;
            }
            let sizes = match (split.inputs.get(1).filter(|s| !s.is_empty()), split.attributes.get("split")) {
                (Some(sizes), _) => ints(sizes)?,
                (None, Some(Attribute::Ints(sizes))) => sizes.clone(),
                _ => return None,
            };
            if sizes.len() < 2 || sizes.len() != split.outputs.len() || split.outputs.iter().any(String::is_empty) {
                return None;
            }
            let total: i64 = sizes.iter().sum();
            let ji = only_reader(split.inputs.first()?, "Concat").filter(|&j| matches!(axis(&nodes[j]), 2 | -1))?;
            let mut absorbed = vec![ji];
            let mut made = Vec::new();
            let mut joins: Vec<Vec<String>> = vec![Vec::new(); sizes.len()];
            for (i, rows) in nodes[ji].inputs.iter().enumerate() {
                let ri = only_reader(rows, "Reshape")?;
                let &[batch, channels, -1] = ints(nodes[ri].inputs.get(1)?)?.as_slice() else { return None };
                // With `allowzero`, a 0 is a dimension of 0, not the input's.
                let copies_batch = batch == 0 && !matches!(nodes[ri].attributes.get("allowzero"), Some(Attribute::Int(1)));
                let keeps_images = copies_batch || fixed_batch.is_some_and(|n| n as i64 == batch);
                let ci = only_reader(nodes[ri].inputs.first()?, "Concat").filter(|&c| matches!(axis(&nodes[c]), 1 | -3))?;
                if channels != total || !keeps_images || nodes[ci].inputs.len() != sizes.len() {
                    return None;
                }
                for (k, (part, &size)) in nodes[ci].inputs.iter().zip(&sizes).enumerate() {
                    if conv_channels(part) != Some(size) {
                        return None;
                    }
                    let name = format!("{}:streamdet.part{k}.scale{i}", split.name);
                    let shape = format!("{name}.shape");
                    let attributes = HashMap::from([("value".to_string(), Attribute::Ints(vec![batch, size, -1]))]);
                    made.push(Node { name: shape.clone(), op_type: "Constant".into(), inputs: Vec::new(), outputs: vec![shape.clone()], attributes });
                    made.push(Node {
                        name: name.clone(),
                        op_type: "Reshape".into(),
                        inputs: vec![part.clone(), shape],
                        outputs: vec![name.clone()],
                        attributes: HashMap::new(),
                    });
                    joins[k].push(name);
                }
                absorbed.extend([ri, ci]);
            }
            for (k, (inputs, output)) in joins.into_iter().zip(&split.outputs).enumerate() {
                let attributes = HashMap::from([("axis".to_string(), Attribute::Int(2))]);
                made.push(Node {
                    name: format!("{}:streamdet.join{k}", split.name),
                    op_type: "Concat".into(),
                    inputs,
                    outputs: vec![output.clone()],
                    attributes,
                });
            }
            Some((made, absorbed))
        })();
        if let Some((made, absorbed)) = rewritten.filter(|(_, absorbed)| absorbed.iter().all(|&a| !dropped[a])) {
            for a in absorbed {
                dropped[a] = true;
            }
            dropped[si] = true;
            replacement.insert(si, made);
        }
    }
    nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| match replacement.remove(&i) {
            Some(made) => made,
            None if dropped[i] => Vec::new(),
            None => vec![n.clone()],
        })
        .collect()
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

/// The scaffolding of a rewriting pass: offers `fuse` each node in order, with the nodes that
/// earlier matches absorbed; a match returns the node that takes the offered node's place and
/// the nodes it absorbs, which are left out.
fn fuse_each(nodes: &[Node], mut fuse: impl FnMut(&Node, &[bool]) -> Option<(Node, Vec<usize>)>) -> Vec<Node> {
    let mut dropped = vec![false; nodes.len()];
    let mut replacement: HashMap<usize, Node> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let Some((fused, absorbed)) = fuse(node, &dropped) else { continue };
        for j in absorbed {
            dropped[j] = true;
        }
        dropped[i] = true;
        replacement.insert(i, fused);
    }
    rewrite(nodes, replacement, &dropped)
}

/// [`fuse_each`] over the binary nodes of type `op_type`, whose operands `fuse` is offered in
/// both orders (`Add` and `Mul` commute): the first order it matches wins.
fn fuse_binary(nodes: &[Node], op_type: &str, mut fuse: impl FnMut(&Node, &str, &str, &[bool]) -> Option<(Node, Vec<usize>)>) -> Vec<Node> {
    fuse_each(nodes, |node, dropped| {
        if node.op_type != op_type || node.inputs.len() != 2 {
            return None;
        }
        let (a, b) = (node.inputs[0].as_str(), node.inputs[1].as_str());
        fuse(node, a, b, dropped).or_else(|| fuse(node, b, a, dropped))
    })
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
    fuse_binary(nodes, "Add", |add, y, r, dropped| {
        let &ci = producer.get(y)?;
        let conv = &nodes[ci];
        let fits = conv.op_type == "Conv"
            && conv.inputs.len() <= 3
            && uses.get(y) == Some(&1)
            && y != r
            && !initializers.contains_key(r)
            && producer.get(r).is_none_or(|&ri| nodes[ri].op_type != "Constant")
            && !dropped[ci];
        if !fits {
            return None;
        }
        let mut node = conv.clone();
        node.inputs.resize(3, String::new());
        node.inputs.push(r.to_string());
        node.outputs = add.outputs.clone();
        // In the Add's place: after both the convolution's input and the residual exist.
        Some((node, vec![ci]))
    })
}

/// Rewrites `p = Softmax(x, axis=1); y = Conv(p)` into one `streamdet.SoftmaxConv(x, W, B)` when
/// the convolution is 1x1 with one group, unit strides and dilations, no padding, activation or
/// residual, and `p` is used nowhere else: the distribution-focal-loss decoding of YOLO heads,
/// which [`softmax_dot`](crate::detect::kernels::softmax_dot) runs in one pass.
fn fuse_softmax_conv(nodes: &[Node], initializers: &HashMap<String, TensorData>) -> Vec<Node> {
    let (uses, producer) = uses_and_producers(nodes);
    fuse_each(nodes, |conv, dropped| {
        if conv.op_type != "Conv" || conv.inputs.len() > 3 || conv.attributes.contains_key("streamdet.activation") {
            return None;
        }
        let p = conv.inputs.first()?.as_str();
        let &si = producer.get(p)?;
        let softmax = &nodes[si];
        let every = |name: &str, value: i64| match conv.attributes.get(name) {
            None => true,
            Some(Attribute::Ints(v)) => v.iter().all(|&x| x == value),
            Some(_) => false,
        };
        let fits = softmax.op_type == "Softmax"
            && matches!(softmax.attributes.get("axis"), Some(Attribute::Int(1)))
            && uses.get(p) == Some(&1)
            && !dropped[si]
            && conv.inputs.get(1).and_then(|w| initializers.get(w)).is_some_and(|w| w.shape.len() == 4 && w.shape[2..] == [1, 1])
            && conv.inputs.get(2).is_none_or(|b| b.is_empty() || initializers.contains_key(b))
            && matches!(conv.attributes.get("group"), None | Some(Attribute::Int(1)))
            && every("strides", 1)
            && every("dilations", 1)
            && every("pads", 0);
        if !fits {
            return None;
        }
        let inputs = std::iter::once(softmax.inputs.first()?.clone()).chain(conv.inputs[1..].iter().cloned()).collect();
        let node = Node { name: conv.name.clone(), op_type: "streamdet.SoftmaxConv".into(), inputs, outputs: conv.outputs.clone(), attributes: HashMap::new() };
        Some((node, vec![si]))
    })
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
    fuse_binary(nodes, "Mul", |mul, y, s, dropped| {
        let (Some(&pi), Some(alpha)) = (producer.get(y), scalar(s)) else { return None };
        if nodes[pi].op_type != "MatMul" || uses.get(y) != Some(&1) || dropped[pi] || nodes[pi].attributes.contains_key("streamdet.alpha") {
            return None;
        }
        let mut node = nodes[pi].clone();
        node.outputs = mul.outputs.clone();
        node.attributes.insert("streamdet.alpha".into(), Attribute::Float(alpha));
        Some((node, vec![pi]))
    })
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
    fuse_each(nodes, |div, dropped| {
        if div.op_type != "Div" || div.inputs.len() != 2 {
            return None;
        }
        let (e, s) = (div.inputs[0].as_str(), div.inputs[1].as_str());
        let ei = by_output(e, "Exp")?;
        let si = by_output(s, "ReduceSum")?;
        let subi = by_output(&nodes[ei].inputs[0], "Sub")?;
        let sub = &nodes[subi];
        let mi = by_output(&sub.inputs[1], "ReduceMax")?;
        let x = sub.inputs[0].as_str();
        let fits = nodes[si].inputs[0] == e
            && nodes[mi].inputs[0] == x
            && last_axis_keepdims(&nodes[si])
            && last_axis_keepdims(&nodes[mi])
            && uses.get(e) == Some(&2)
            && uses.get(s) == Some(&1)
            && uses.get(sub.outputs[0].as_str()) == Some(&1)
            && uses.get(sub.inputs[1].as_str()) == Some(&1);
        if !fits || [ei, si, subi, mi].iter().any(|&i| dropped[i]) {
            return None;
        }
        let mut attributes = HashMap::new();
        attributes.insert("axis".to_string(), Attribute::Int(-1));
        let node = Node { name: div.name.clone(), op_type: "Softmax".into(), inputs: vec![x.to_string()], outputs: div.outputs.clone(), attributes };
        Some((node, vec![ei, si, subi, mi]))
    })
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
    fuse_each(nodes, |out, dropped| {
        if out.op_type != "MatMul" || out.inputs.len() != 2 || !flag(out, "streamdet.transpose_b") || out.attributes.contains_key("streamdet.alpha") {
            return None;
        }
        let p = out.inputs[1].as_str();
        let &si = producer.get(p)?;
        let softmax = &nodes[si];
        let last_axis = matches!(softmax.attributes.get("axis"), Some(Attribute::Int(-1)));
        if softmax.op_type != "Softmax" || !last_axis || uses.get(p) != Some(&1) {
            return None;
        }
        let scores = softmax.inputs[0].as_str();
        let &mi = producer.get(scores)?;
        let product = &nodes[mi];
        if product.op_type != "MatMul" || product.inputs.len() != 2 || uses.get(scores) != Some(&1) || dropped[mi] || dropped[si] {
            return None;
        }
        let mut attributes = HashMap::new();
        // Q and K are the first product's operands, V the second's left one.
        let operand_flags = [
            (product, "streamdet.transpose_a", "streamdet.transpose_q"),
            (product, "streamdet.transpose_b", "streamdet.transpose_k"),
            (out, "streamdet.transpose_a", "streamdet.transpose_v"),
        ];
        for (node, from, to) in operand_flags {
            if flag(node, from) {
                attributes.insert(to.to_string(), Attribute::Int(1));
            }
        }
        if let Some(alpha) = product.attributes.get("streamdet.alpha") {
            attributes.insert("streamdet.alpha".to_string(), alpha.clone());
        }
        let inputs = vec![product.inputs[0].clone(), product.inputs[1].clone(), out.inputs[0].clone()];
        let node = Node { name: out.name.clone(), op_type: "streamdet.Attention".into(), inputs, outputs: out.outputs.clone(), attributes };
        Some((node, vec![mi, si]))
    })
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::{D, Tensor};

    use super::*;
    use crate::detect::engine::test_graphs::{assert_close, floats, ints, model, node, op_types, plan_and_run, scalar, tensor};

    fn int(v: i64) -> Attribute {
        Attribute::Int(v)
    }

    fn perm(p: &[i64]) -> Attribute {
        Attribute::Ints(p.to_vec())
    }

    /// `x` of `shape`, from its own seed.
    fn input(shape: &[usize]) -> Tensor {
        tensor(&floats(shape, 99))
    }

    /// Candle's convolution with `pad` on every side, plus the bias.
    fn candle_conv(x: &Tensor, w: &TensorData, b: &TensorData, pad: usize) -> Tensor {
        let channels = w.shape[0];
        x.conv2d(&tensor(w), pad, 1, 1, 1).unwrap().broadcast_add(&tensor(b).reshape((1, channels, 1, 1)).unwrap()).unwrap()
    }

    #[test]
    fn conv_sigmoid_mul_becomes_one_conv_with_silu_in_either_order() {
        let (w, b) = (floats(&[4, 3, 3, 3], 1), floats(&[4], 2));
        for product in [["y", "s"], ["s", "y"]] {
            let nodes = vec![
                node("Conv", &["x", "w", "b"], &["y"], &[("pads", perm(&[1, 1, 1, 1]))]),
                node("Sigmoid", &["y"], &["s"], &[]),
                node("Mul", &product, &["out"], &[]),
            ];
            let fused = fuse_conv_silu(&nodes);
            assert_eq!(op_types(&fused), ["Conv"]);
            assert_eq!(fused[0].outputs, ["out"]);
            assert_eq!(fused[0].attributes.get("streamdet.activation"), Some(&Attribute::String("silu".into())));

            let x = input(&[1, 3, 6, 6]);
            let (_, got) = plan_and_run(&model(nodes, &[("w", w.clone()), ("b", b.clone())]), &x);
            let y = candle_conv(&x, &w, &b, 1);
            assert_close(&got, &(&y * candle_nn::ops::sigmoid(&y).unwrap()).unwrap());
        }
    }

    #[test]
    fn channel_softmax_then_1x1_conv_becomes_one_step_that_reads_through_views() {
        // The DFL decoding: logits `[1, 64, 9]` seen as `[1, 16 bins, 4 sides, 9]`, a softmax
        // over the bins, and a convolution that weights each bin by its index (plus a second
        // output with a bias, to cover the general case).
        let w = TensorData { shape: vec![2, 16, 1, 1], values: TensorValues::F32((0..32).map(|i| (i % 16) as f32 + (i / 16) as f32 * 0.5).collect()) };
        let b = TensorData { shape: vec![2], values: TensorValues::F32(vec![0.0, -0.25]) };
        let nodes = vec![
            node("Reshape", &["x", "shape"], &["r"], &[]),
            node("Transpose", &["r"], &["t"], &[("perm", perm(&[0, 2, 1, 3]))]),
            node("Softmax", &["t"], &["p"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["p", "w", "b"], &["out"], &[("kernel_shape", perm(&[1, 1]))]),
        ];
        let initializers = [("shape", ints(&[1, 4, 16, 9])), ("w", w.clone()), ("b", b.clone())];
        let fused = fuse(&nodes, &initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), Some(1));
        assert_eq!(op_types(&fused), ["Reshape", "Transpose", "streamdet.SoftmaxConv"]);

        let x = input(&[1, 64, 9]);
        let (engine, got) = plan_and_run(&model(nodes, &initializers), &x);
        // The views fold into the fused step, which reads `x` where it lies.
        assert_eq!(engine.steps.iter().map(|s| s.op_type.as_str()).collect::<Vec<_>>(), ["streamdet.SoftmaxConv"]);
        let t = x.reshape((1, 4, 16, 9)).unwrap().permute((0, 2, 1, 3)).unwrap().contiguous().unwrap();
        let want = candle_conv(&candle_nn::ops::softmax(&t, 1).unwrap(), &w, &b, 0);
        assert_close(&got, &want);
    }

    #[test]
    fn a_softmax_over_another_axis_or_a_wider_conv_is_left_alone() {
        let conv = |kernel: &str| node("Conv", &["p", kernel], &["out"], &[]);
        let initializers: HashMap<String, TensorData> =
            [("w1", floats(&[1, 16, 1, 1], 1)), ("w3", floats(&[1, 16, 3, 3], 2))].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let softmax = |axis: i64| node("Softmax", &["x"], &["p"], &[("axis", Attribute::Int(axis))]);
        assert_eq!(op_types(&fuse_softmax_conv(&[softmax(-1), conv("w1")], &initializers)), ["Softmax", "Conv"]);
        assert_eq!(op_types(&fuse_softmax_conv(&[softmax(1), conv("w3")], &initializers)), ["Softmax", "Conv"]);
        assert_eq!(op_types(&fuse_softmax_conv(&[softmax(1), conv("w1")], &initializers)), ["streamdet.SoftmaxConv"]);
    }

    #[test]
    fn a_conv_whose_result_is_read_elsewhere_keeps_its_sigmoid() {
        let nodes = vec![
            node("Conv", &["x", "w"], &["y"], &[]),
            node("Sigmoid", &["y"], &["s"], &[]),
            node("Mul", &["y", "s"], &["z"], &[]),
            node("Add", &["z", "y"], &["out"], &[]),
        ];
        assert_eq!(op_types(&fuse_conv_silu(&nodes)), ["Conv", "Sigmoid", "Mul", "Add"]);
    }

    #[test]
    fn conv_plus_computed_tensor_adds_it_in_the_epilogue() {
        let (w, b) = (floats(&[4, 4, 3, 3], 3), floats(&[4], 4));
        let nodes = vec![
            node("Sigmoid", &["x"], &["r"], &[]),
            node("Conv", &["x", "w", "b"], &["y"], &[("pads", perm(&[1, 1, 1, 1]))]),
            node("Add", &["r", "y"], &["out"], &[]),
        ];
        let fused = fuse_conv_residual(&nodes, &HashMap::new());
        assert_eq!(op_types(&fused), ["Sigmoid", "Conv"]);
        assert_eq!(fused[1].inputs, ["x", "w", "b", "r"]);

        let x = input(&[1, 4, 6, 6]);
        let (_, got) = plan_and_run(&model(nodes, &[("w", w.clone()), ("b", b.clone())]), &x);
        let want = (candle_conv(&x, &w, &b, 1) + candle_nn::ops::sigmoid(&x).unwrap()).unwrap();
        assert_close(&got, &want);
    }

    #[test]
    fn conv_plus_constant_stays_a_broadcast_add() {
        let nodes = vec![node("Conv", &["x", "w"], &["y"], &[]), node("Add", &["y", "c"], &["out"], &[])];
        let initializers = HashMap::from([("c".to_string(), floats(&[1, 4, 1, 1], 5))]);
        assert_eq!(op_types(&fuse_conv_residual(&nodes, &initializers)), ["Conv", "Add"]);
    }

    #[test]
    fn spelled_out_softmax_becomes_one_softmax() {
        // ReduceMax with its axes as an attribute (opset 13), ReduceSum with them as an input.
        let nodes = vec![
            node("ReduceMax", &["x"], &["m"], &[("axes", perm(&[-1])), ("keepdims", int(1))]),
            node("Sub", &["x", "m"], &["d"], &[]),
            node("Exp", &["d"], &["e"], &[]),
            node("ReduceSum", &["e", "axes"], &["s"], &[]),
            node("Div", &["e", "s"], &["out"], &[]),
        ];
        let initializers = [("axes", ints(&[-1]))];
        let fused = fuse_softmax(&nodes, &initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect());
        assert_eq!(op_types(&fused), ["Softmax"]);
        assert_eq!(fused[0].inputs, ["x"]);

        let x = input(&[2, 3, 5]);
        let (_, got) = plan_and_run(&model(nodes, &initializers), &x);
        let e = x.broadcast_sub(&x.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
        assert_close(&got, &e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap());
    }

    #[test]
    fn a_softmax_over_another_axis_is_left_spelled_out() {
        let nodes = vec![
            node("ReduceMax", &["x"], &["m"], &[("axes", perm(&[1])), ("keepdims", int(1))]),
            node("Sub", &["x", "m"], &["d"], &[]),
            node("Exp", &["d"], &["e"], &[]),
            node("ReduceSum", &["e"], &["s"], &[("axes", perm(&[1]))]),
            node("Div", &["e", "s"], &["out"], &[]),
        ];
        assert_eq!(op_types(&fuse_softmax(&nodes, &HashMap::new())), ["ReduceMax", "Sub", "Exp", "ReduceSum", "Div"]);
    }

    #[test]
    fn matmul_times_constant_scalar_becomes_a_scaled_product() {
        let bm = floats(&[2, 4, 5], 6);
        // The scale as an initializer and as a Constant node, on either side of the Mul.
        let cases = [
            (vec![node("MatMul", &["x", "b"], &["y"], &[]), node("Mul", &["s", "y"], &["out"], &[])], true),
            (
                vec![
                    node("Constant", &[], &["s"], &[("value", Attribute::Tensor(scalar(0.5)))]),
                    node("MatMul", &["x", "b"], &["y"], &[]),
                    node("Mul", &["y", "s"], &["out"], &[]),
                ],
                false,
            ),
        ];
        for (nodes, initializer) in cases {
            let mut initializers = vec![("b", bm.clone())];
            if initializer {
                initializers.push(("s", scalar(0.5)));
            }
            let map = initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            let fused = fuse_matmul_scale(&nodes, &map);
            assert_eq!(op_types(&fused).last(), Some(&"MatMul"));
            assert_eq!(fused.last().unwrap().attributes.get("streamdet.alpha"), Some(&Attribute::Float(0.5)));

            let x = input(&[2, 3, 4]);
            let (_, got) = plan_and_run(&model(nodes, &initializers), &x);
            assert_close(&got, &(x.matmul(&tensor(&bm)).unwrap() * 0.5).unwrap());
        }
    }

    #[test]
    fn transposes_of_the_last_two_axes_fold_into_the_products_they_feed() {
        let nodes = vec![
            node("Transpose", &["x"], &["xt"], &[("perm", perm(&[0, 2, 1]))]),
            node("MatMul", &["xt", "x"], &["p"], &[]),
            node("Transpose", &["p"], &["pt"], &[("perm", perm(&[0, 2, 1]))]),
            node("MatMul", &["x", "pt"], &["out"], &[]),
        ];
        let fused = fuse_transposed_matmul_operands(&nodes);
        assert_eq!(op_types(&fused), ["MatMul", "MatMul"]);
        assert_eq!((fused[0].inputs.as_slice(), fused[1].inputs.as_slice()), (&["x".to_string(), "x".into()][..], &["x".to_string(), "p".into()][..]));
        assert_eq!(fused[0].attributes.get("streamdet.transpose_a"), Some(&int(1)));
        assert_eq!(fused[1].attributes.get("streamdet.transpose_b"), Some(&int(1)));

        let x = input(&[2, 4, 3]);
        let (_, got) = plan_and_run(&model(nodes, &[]), &x);
        let p = x.transpose(1, 2).unwrap().contiguous().unwrap().matmul(&x).unwrap();
        assert_close(&got, &x.matmul(&p.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap());
    }

    #[test]
    fn a_transpose_of_other_axes_stays() {
        let nodes = vec![node("Transpose", &["x"], &["xt"], &[("perm", perm(&[1, 0, 2]))]), node("MatMul", &["xt", "x"], &["out"], &[])];
        assert_eq!(op_types(&fuse_transposed_matmul_operands(&nodes)), ["Transpose", "MatMul"]);
    }

    /// An attention head over `x = [q; k; v]` (4 channels each) as an exporter writes it:
    /// `softmax(q^T k * 0.5)` mixes `v`.
    pub(in crate::detect::engine) fn attention_head() -> Vec<Node> {
        vec![
            node("Split", &["x"], &["qs", "k", "v"], &[("axis", int(1)), ("split", perm(&[4, 4, 4]))]),
            node("Transpose", &["qs"], &["q"], &[("perm", perm(&[0, 2, 1]))]),
            node("MatMul", &["q", "k"], &["scores"], &[]),
            node("Mul", &["scores", "alpha"], &["scaled"], &[]),
            node("Softmax", &["scaled"], &["p"], &[("axis", int(-1))]),
            node("Transpose", &["p"], &["pt"], &[("perm", perm(&[0, 2, 1]))]),
            node("MatMul", &["v", "pt"], &["o"], &[]),
        ]
    }

    /// Candle's attention over `x`, as [`attention_head`] spells it.
    pub(in crate::detect::engine) fn candle_attention(x: &Tensor) -> Tensor {
        let part = |i: usize| x.narrow(1, 4 * i, 4).unwrap().contiguous().unwrap();
        let scores = (part(0).transpose(1, 2).unwrap().contiguous().unwrap().matmul(&part(1)).unwrap() * 0.5).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        part(2).matmul(&p.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap()
    }

    #[test]
    fn an_attention_head_becomes_one_attention_node() {
        let mut nodes = attention_head();
        nodes.push(node("Identity", &["o"], &["out"], &[]));
        let initializers = [("alpha", scalar(0.5))];
        let fused = fuse(&nodes, &initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), Some(1));
        assert_eq!(op_types(&fused), ["Split", "streamdet.Attention", "Identity"]);
        let attention = &fused[1];
        assert_eq!(attention.inputs, ["qs", "k", "v"]);
        assert_eq!(attention.attributes.get("streamdet.transpose_q"), Some(&int(1)));
        assert_eq!(attention.attributes.get("streamdet.alpha"), Some(&Attribute::Float(0.5)));
        // The pass alone, on what the passes before it leave.
        let before = fuse_transposed_matmul_operands(&fuse_matmul_scale(&nodes, &initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()));
        assert_eq!(op_types(&fuse_attention(&before)), ["Split", "streamdet.Attention", "Identity"]);

        let x = input(&[2, 12, 5]);
        let (_, got) = plan_and_run(&model(nodes, &initializers), &x);
        assert_close(&got, &candle_attention(&x));
    }

    /// A detection head at two scales of `x` (`[1, 2, 4, 4]`): each scale's box (3 channels)
    /// and class (2) convolutions joined, reshaped to `[batch, 5, -1]`, joined over the scales
    /// and split again; the boxes through `Exp`, the classes through `Sigmoid`, joined into the
    /// output. The nodes and their initializers.
    fn split_head(batch: i64) -> (Vec<Node>, Vec<(&'static str, TensorData)>) {
        let shapes: [(&str, [usize; 4]); 5] =
            [("wb0", [3, 2, 1, 1]), ("wc0", [2, 2, 1, 1]), ("wd", [2, 2, 3, 3]), ("wb1", [3, 2, 1, 1]), ("wc1", [2, 2, 1, 1])];
        let mut initializers: Vec<(&str, TensorData)> = shapes.iter().enumerate().map(|(i, (name, shape))| (*name, floats(shape, 30 + i as u64))).collect();
        initializers.push(("rows", ints(&[batch, 5, -1])));
        initializers.push(("sizes", ints(&[3, 2])));
        let nodes = vec![
            node("Conv", &["x", "wb0"], &["b0"], &[]),
            node("Conv", &["x", "wc0"], &["c0"], &[]),
            node("Conv", &["x", "wd"], &["d"], &[("strides", perm(&[2, 2])), ("pads", perm(&[1, 1, 1, 1]))]),
            node("Conv", &["d", "wb1"], &["b1"], &[]),
            node("Conv", &["d", "wc1"], &["c1"], &[]),
            node("Concat", &["b0", "c0"], &["k0"], &[("axis", int(1))]),
            node("Reshape", &["k0", "rows"], &["r0"], &[]),
            node("Concat", &["b1", "c1"], &["k1"], &[("axis", int(1))]),
            node("Reshape", &["k1", "rows"], &["r1"], &[]),
            node("Concat", &["r0", "r1"], &["j"], &[("axis", int(2))]),
            node("Split", &["j", "sizes"], &["boxes", "classes"], &[("axis", int(1))]),
            node("Exp", &["boxes"], &["e"], &[]),
            node("Sigmoid", &["classes"], &["s"], &[]),
            node("Concat", &["e", "s"], &["out"], &[("axis", int(1))]),
        ];
        (nodes, initializers)
    }

    /// [`split_head`] by candle, with its weights.
    fn split_head_reference(x: &Tensor, initializers: &[(&str, TensorData)]) -> Tensor {
        let weights: Vec<Tensor> = initializers[..5].iter().map(|(_, w)| tensor(w)).collect();
        let conv = |x: &Tensor, w: &Tensor, pad, stride| x.conv2d(w, pad, stride, 1, 1).unwrap();
        let d = conv(x, &weights[2], 1, 2);
        let rows = |parts: [Tensor; 2]| Tensor::cat(&parts, 1).unwrap().flatten_from(2).unwrap();
        let scales = [rows([conv(x, &weights[0], 0, 1), conv(x, &weights[1], 0, 1)]), rows([conv(&d, &weights[3], 0, 1), conv(&d, &weights[4], 0, 1)])];
        let joined = Tensor::cat(&scales, 2).unwrap();
        let (boxes, classes) = (joined.narrow(1, 0, 3).unwrap(), joined.narrow(1, 3, 2).unwrap());
        Tensor::cat(&[boxes.exp().unwrap(), candle_nn::ops::sigmoid(&classes.contiguous().unwrap()).unwrap()], 1).unwrap()
    }

    #[test]
    fn a_split_of_joined_parts_becomes_the_joins_of_the_parts() {
        let x = input(&[1, 2, 4, 4]);
        let with_batch = |batch: Option<usize>, mut m: crate::detect::model::OnnxModel| {
            m.inputs[0].shape = vec![batch, Some(2), Some(4), Some(4)];
            m
        };
        // Batch 0 in the reshape keeps the images apart whatever the batch; 1 does when the
        // model's batch is fixed at 1.
        for (rows_batch, model_batch) in [(0, None), (1, Some(1))] {
            let (nodes, initializers) = split_head(rows_batch);
            let fused = split_joined_parts(&nodes, &initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), model_batch);
            let types = op_types(&fused);
            assert!(!types.contains(&"Split"), "{types:?}");
            assert_eq!(types.iter().filter(|&&t| t == "Reshape").count(), 4);
            assert_eq!(types.iter().filter(|&&t| t == "Concat").count(), 3);
            let (engine, got) = plan_and_run(&with_batch(model_batch, model(nodes, &initializers)), &x);
            // Both joins, each read only by the output's concatenation (through its function),
            // are copied by it straight from the convolutions: one concatenation is left.
            assert_eq!(engine.steps.iter().filter(|s| s.op_type == "Concat").count(), 1);
            assert_close(&got, &split_head_reference(&x, &initializers));
        }
        // A batch that may be larger than the reshape's 1: left as it is.
        let (nodes, initializers) = split_head(1);
        let fused = split_joined_parts(&nodes, &initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), None);
        assert!(op_types(&fused).contains(&"Split"));
        let (_, got) = plan_and_run(&with_batch(None, model(nodes, &initializers)), &x);
        assert_close(&got, &split_head_reference(&x, &initializers));
        // Parts whose channels the split does not follow: left as they are.
        let (mut nodes, initializers) = split_head(0);
        nodes[5].inputs.swap(0, 1);
        let fused = split_joined_parts(&nodes, &initializers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), None);
        assert!(op_types(&fused).contains(&"Split"));
    }
}
