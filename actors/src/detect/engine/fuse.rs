//! Fusion passes: rewrites of the ONNX node list, before it is planned, that turn chains of
//! operators into one node the CPU kernels run in one pass (a convolution with its SiLU and
//! residual, a scaled or transposed product, a softmax, an attention head).

use std::collections::HashMap;

use crate::detect::model::{Attribute, Node, TensorData, TensorValues};

/// Runs every fusion pass over `nodes`, in the order each relies on: the attention pass
/// matches what the softmax, scale and transpose passes left.
pub(super) fn fuse(nodes: &[Node], initializers: &HashMap<String, TensorData>) -> Vec<Node> {
    let nodes = fuse_conv_silu(nodes);
    let nodes = fuse_conv_residual(&nodes, initializers);
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
        let node = Node { name: out.name.clone(), op_type: "streamdet.Attention".into(), inputs, outputs: out.outputs.clone(), attributes };
        Some((node, vec![mi, si]))
    })
}
