//! Folding on the planned steps, on the CPU: chains of views into the steps that read them,
//! and channel concatenations into the convolutions that read them, so that less data moves.

use std::collections::HashMap;

use candle_core::Tensor;

use super::eval::ints;
use super::{NestedConcat, Op, Step, Target};
use crate::detect::views::ViewStep;

/// The view a step makes of its input, when it is one: a `Transpose`, a `Reshape` to a
/// constant shape, or output `slot` of a `Split` with constant sizes.
fn view_step(step: &Step, slot: usize, constants: &HashMap<usize, Tensor>) -> Option<ViewStep> {
    step.inputs.first().copied().flatten()?;
    let constant = |i: usize| step.inputs.get(i).copied().flatten().and_then(|s| constants.get(&s)).and_then(|t| ints(t).ok());
    match &step.op {
        Op::Transpose { perm } => Some(ViewStep::Permute(perm.clone())),
        Op::Reshape => Some(ViewStep::Reshape(constant(1)?)),
        Op::Split { axis, sizes, .. } => {
            let sizes = match sizes {
                Some(s) => s.clone(),
                None => constant(1)?,
            };
            let index = step.outputs.iter().position(|&o| o == slot)?;
            let start: i64 = sizes.get(..index)?.iter().sum();
            let len = *sizes.get(index)?;
            (sizes.iter().all(|&s| s >= 0)).then_some(ViewStep::Narrow { axis: *axis, start: start as usize, len: len as usize })
        }
        _ => None,
    }
}

/// Folds chains of views (`Reshape`, `Transpose`, `Split`; see [`views`](crate::detect::views)) into the steps at
/// their ends, on the CPU:
/// - an attention step reads each operand through the chain that leads to it, and writes its
///   result through the reshapes and transposes that follow it, into the tensor at their end;
/// - a fused softmax and convolution reads its input through the chain that leads to it;
/// - any other step reading the end of a chain of two or more views that moves or splits axes
///   gets it from one [`Op::View`] copy instead of a copy per step.
///
/// Steps whose results nobody reads any more are dropped.
pub(super) fn fold_views(mut steps: Vec<Step>, constants: &HashMap<usize, Tensor>, output_slot: usize, target: &Target) -> Vec<Step> {
    if !target.native {
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
    let producer: HashMap<usize, usize> =
        steps.iter().enumerate().filter(|(i, _)| !dead[*i]).flat_map(|(i, s)| s.outputs.iter().map(move |&o| (o, i))).collect();
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
            let folded: Vec<(usize, Vec<ViewStep>)> =
                steps[i].inputs.iter().take(3).map(|s| s.map_or((usize::MAX, Vec::new()), |s| chain_to(&steps, s))).collect();
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
        if matches!(steps[i].op, Op::SoftmaxConv(_))
            && let Some(slot) = steps[i].inputs[0]
        {
            let (base, chain) = chain_to(&steps, slot);
            if !chain.is_empty() {
                steps[i].inputs[0] = Some(base);
                if let Op::SoftmaxConv(op) = &mut steps[i].op {
                    op.view = chain;
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
            if let (true, Some(p)) = (chain.len() >= 2 && moves_data, p)
                && steps[p].outputs.len() == 1
            {
                views_made.push((p, base, chain));
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
        let mut read: std::collections::HashSet<usize> =
            steps.iter().zip(&dead).filter(|(_, d)| !**d).flat_map(|(s, _)| s.inputs.iter().flatten().copied()).collect();
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
pub(super) const CONV_MORE_PARTS: usize = 4;

/// Lets convolutions read a concatenation along channels where its parts lie, on the CPU: a
/// `Concat` over axis 1 whose result only convolutions read, as their input, goes away, and
/// each of them takes the parts instead (the first as its input, the others from
/// [`CONV_MORE_PARTS`] on).
pub(super) fn fold_concats_into_convs(mut steps: Vec<Step>, output_slot: usize, target: &Target) -> Vec<Step> {
    if !target.native {
        return steps;
    }
    let mut dead = vec![false; steps.len()];
    for i in 0..steps.len() {
        let Op::Concat { axis: 1 | -3, ref maps, .. } = steps[i].op else { continue };
        if !maps.is_empty() {
            continue;
        }
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

/// Lets a `Concat` apply an element-wise function to an input as it copies it, on the CPU, when
/// that input is the result of a unary step (the sigmoid of a detection head's class scores)
/// that nothing else reads: the unary step goes, and with it a pass over its tensor and the
/// tensor itself.
pub(super) fn fold_unary_into_concats(mut steps: Vec<Step>, output_slot: usize, target: &Target) -> Vec<Step> {
    if !target.native {
        return steps;
    }
    let mut dead = vec![false; steps.len()];
    for i in 0..steps.len() {
        if !matches!(steps[i].op, Op::Concat { .. }) {
            continue;
        }
        let mut maps = vec![None; steps[i].inputs.len()];
        for (part, map) in maps.iter_mut().enumerate() {
            let Some(slot) = steps[i].inputs[part] else { continue };
            let reads = steps.iter().flat_map(|s| &s.inputs).filter(|&&s| s == Some(slot)).count();
            let Some(producer) = steps.iter().position(|s| s.outputs == [slot]) else { continue };
            let Op::Unary(f) = steps[producer].op else { continue };
            let Some(&Some(source)) = steps[producer].inputs.first() else { continue };
            if reads != 1 || slot == output_slot || dead[producer] {
                continue;
            }
            steps[i].inputs[part] = Some(source);
            *map = Some(f);
            dead[producer] = true;
        }
        if maps.iter().any(Option::is_some)
            && let Op::Concat { maps: folded, .. } = &mut steps[i].op
        {
            *folded = maps;
        }
    }
    steps.into_iter().zip(dead).filter(|(_, d)| !d).map(|(s, _)| s).collect()
}

/// Lets a `Concat` copy the inputs of a concatenation that only it reads, possibly through
/// reshapes to constant shapes, straight into its own result, on the CPU: the inner
/// concatenation and the reshapes go, and with them a copy of every element they carry (a
/// detection head joins each scale's box and class channels, and then the scales).
pub(super) fn fold_nested_concats(mut steps: Vec<Step>, constants: &HashMap<usize, Tensor>, output_slot: usize, target: &Target) -> Vec<Step> {
    if !target.native {
        return steps;
    }
    let mut dead = vec![false; steps.len()];
    for i in 0..steps.len() {
        let Op::Concat { nested, .. } = &steps[i].op else { continue };
        if !nested.is_empty() || steps[i].inputs.iter().any(Option::is_none) {
            continue;
        }
        let found: Vec<Option<(NestedConcat, Vec<usize>)>> =
            steps[i].inputs.iter().map(|&slot| slot.and_then(|slot| nested_concat(&steps, slot, constants, output_slot))).collect();
        if found.iter().all(Option::is_none) {
            continue;
        }
        let mut inputs = Vec::new();
        let mut nested = Vec::new();
        for (&input, found) in steps[i].inputs.iter().zip(found) {
            match found {
                Some((concat, chain)) => {
                    let inner = *chain.last().expect("the chain ends at the concatenation");
                    inputs.extend(steps[inner].inputs.iter().copied());
                    nested.push(Some(concat));
                    for step in chain {
                        dead[step] = true;
                    }
                }
                None => {
                    inputs.push(input);
                    nested.push(None);
                }
            }
        }
        steps[i].inputs = inputs;
        if let Op::Concat { nested: folded, .. } = &mut steps[i].op {
            *folded = nested;
        }
    }
    steps.into_iter().zip(dead).filter(|(_, d)| !d).map(|(s, _)| s).collect()
}

/// The concatenation that makes `slot` through reshapes to constant shapes, when nothing else
/// reads it or them: the concatenation as a part of another, and the steps of the chain (the
/// concatenation last). Only a plain one qualifies: every input present, no function of a
/// part, no nested part.
fn nested_concat(steps: &[Step], slot: usize, constants: &HashMap<usize, Tensor>, output_slot: usize) -> Option<(NestedConcat, Vec<usize>)> {
    let mut chain = Vec::new();
    let mut reshapes = Vec::new();
    let mut slot = slot;
    loop {
        let reads = steps.iter().flat_map(|s| &s.inputs).filter(|&&s| s == Some(slot)).count();
        if slot == output_slot || reads != 1 {
            return None;
        }
        let producer = steps.iter().position(|s| s.outputs == [slot])?;
        let step = &steps[producer];
        chain.push(producer);
        match &step.op {
            Op::Reshape => {
                let shape = step.inputs.get(1).copied().flatten().and_then(|s| constants.get(&s))?;
                reshapes.push(ints(shape).ok()?);
                slot = step.inputs.first().copied().flatten()?;
            }
            Op::Concat { axis, maps, nested } if maps.iter().all(Option::is_none) && nested.is_empty() && step.inputs.iter().all(Option::is_some) => {
                // Walked from the outer concatenation back: the last reshape found is the first applied.
                reshapes.reverse();
                return Some((NestedConcat { axis: *axis, parts: step.inputs.len(), reshapes }, chain));
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;
    use crate::detect::engine::fuse::tests::{attention_head, candle_attention};
    use crate::detect::engine::test_graphs::{assert_close, floats, ints, model, node, plan_and_run, scalar, tensor};
    use crate::detect::kernels::activation::UnaryFn;
    use crate::detect::model::{Attribute, TensorData};

    fn perm(p: &[i64]) -> Attribute {
        Attribute::Ints(p.to_vec())
    }

    fn step_types(steps: &[Step]) -> Vec<&str> {
        steps.iter().map(|s| s.op_type.as_str()).collect()
    }

    #[test]
    fn a_chain_of_views_that_moves_data_becomes_one_view_copy() {
        // Split, then a reshape and a transpose of one part, read by an element-wise step.
        let nodes = vec![
            node("Split", &["x"], &["a", "b"], &[("axis", Attribute::Int(1)), ("split", perm(&[2, 4]))]),
            node("Reshape", &["b", "shape"], &["r"], &[]),
            node("Transpose", &["r"], &["t"], &[("perm", perm(&[0, 3, 1, 2]))]),
            node("Sigmoid", &["t"], &["out"], &[]),
        ];
        let x = tensor(&floats(&[1, 6, 4], 7));
        let (engine, got) = plan_and_run(&model(nodes, &[("shape", ints(&[1, 2, 2, 4]))]), &x);
        assert_eq!(step_types(&engine.steps), ["streamdet.View", "Sigmoid"]);
        assert!(matches!(&engine.steps[0].op, Op::View(chain) if chain.len() == 3));

        let t = x.narrow(1, 2, 4).unwrap().reshape((1, 2, 2, 4)).unwrap().permute((0, 3, 1, 2)).unwrap();
        assert_close(&got, &candle_nn::ops::sigmoid(&t.contiguous().unwrap()).unwrap());
    }

    #[test]
    fn a_chain_of_reshapes_alone_is_left_as_it_is() {
        let nodes = vec![node("Reshape", &["x", "s1"], &["r1"], &[]), node("Reshape", &["r1", "s2"], &["r2"], &[]), node("Sigmoid", &["r2"], &["out"], &[])];
        let x = tensor(&floats(&[2, 6], 8));
        let (engine, got) = plan_and_run(&model(nodes, &[("s1", ints(&[3, 4])), ("s2", ints(&[4, 3]))]), &x);
        assert_eq!(step_types(&engine.steps), ["Reshape", "Reshape", "Sigmoid"]);
        assert_close(&got, &candle_nn::ops::sigmoid(&x.reshape((4, 3)).unwrap()).unwrap());
    }

    #[test]
    fn attention_reads_its_operands_and_writes_its_result_through_the_views_around_it() {
        let mut nodes = attention_head();
        nodes.push(node("Reshape", &["o", "shape"], &["r"], &[]));
        nodes.push(node("Transpose", &["r"], &["out"], &[("perm", perm(&[0, 2, 1]))]));
        let x = tensor(&floats(&[2, 12, 5], 9));
        let (engine, got) = plan_and_run(&model(nodes, &[("alpha", scalar(0.5)), ("shape", ints(&[1, 8, 5]))]), &x);
        // The split before and the reshape and transpose after are gone into the one step.
        assert_eq!(step_types(&engine.steps), ["streamdet.Attention"]);
        let Op::Attention { views, .. } = &engine.steps[0].op else { unreachable!() };
        assert!(views.operands.iter().all(|chain| chain.len() == 1), "{views:?}");
        assert_eq!(views.result.len(), 2);
        assert_eq!(engine.steps[0].inputs, [Some(engine.input_slot); 3]);

        let want = candle_attention(&x).reshape((1, 8, 5)).unwrap().transpose(1, 2).unwrap();
        assert_close(&got, &want.contiguous().unwrap());
    }

    #[test]
    fn convolutions_read_a_channel_concatenation_where_its_parts_lie() {
        let (w1, b1, w2, b2) = (floats(&[3, 4, 3, 3], 10), floats(&[3], 11), floats(&[2, 4, 1, 1], 12), floats(&[2], 13));
        let nodes = vec![
            node("Sigmoid", &["x"], &["a"], &[]),
            node("Mul", &["x", "x"], &["b"], &[]),
            node("Concat", &["a", "b"], &["c"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["c", "w1", "b1"], &["y1"], &[("pads", perm(&[1, 1, 1, 1]))]),
            node("Conv", &["c", "w2", "b2"], &["y2"], &[]),
            node("Concat", &["y1", "y2"], &["out"], &[("axis", Attribute::Int(1))]),
        ];
        let initializers = [("w1", w1.clone()), ("b1", b1.clone()), ("w2", w2.clone()), ("b2", b2.clone())];
        let x = tensor(&floats(&[1, 2, 5, 5], 14));
        let (engine, got) = plan_and_run(&model(nodes.clone(), &initializers), &x);
        // Only the concatenation that is the output remains.
        assert_eq!(step_types(&engine.steps), ["Sigmoid", "Mul", "Conv", "Conv", "Concat"]);
        for step in &engine.steps[2..4] {
            assert!(matches!(&step.op, Op::Conv(c) if c.concat_parts == 1));
            assert_eq!(step.inputs.len(), CONV_MORE_PARTS + 1);
        }

        let c = Tensor::cat(&[&candle_nn::ops::sigmoid(&x).unwrap(), &(&x * &x).unwrap()], 1).unwrap();
        let conv = |w: &TensorData, b: &TensorData, pad: usize| {
            let channels = w.shape[0];
            c.conv2d(&tensor(w), pad, 1, 1, 1).unwrap().broadcast_add(&tensor(b).reshape((1, channels, 1, 1)).unwrap()).unwrap()
        };
        assert_close(&got, &Tensor::cat(&[conv(&w1, &b1, 1), conv(&w2, &b2, 0)], 1).unwrap());

        // A concatenation that something other than a convolution reads stays.
        let mut nodes = nodes;
        nodes.pop();
        nodes.push(node("Sigmoid", &["c"], &["s"], &[]));
        nodes.push(node("Concat", &["y1", "y2", "s"], &["out"], &[("axis", Attribute::Int(1))]));
        let (engine, _) = plan_and_run(&model(nodes, &initializers), &x);
        assert_eq!(engine.steps.iter().filter(|s| s.op_type == "Concat").count(), 2);
    }

    #[test]
    fn a_concatenation_applies_the_function_of_a_part_that_only_it_reads() {
        let nodes = vec![
            node("Sigmoid", &["x"], &["s"], &[]),
            node("Exp", &["x"], &["e"], &[]),
            node("Mul", &["e", "e"], &["m"], &[]),
            node("Concat", &["s", "e", "m"], &["out"], &[("axis", Attribute::Int(2))]),
        ];
        let x = tensor(&floats(&[2, 3, 5], 18));
        let (engine, got) = plan_and_run(&model(nodes, &[]), &x);
        // The sigmoid goes into the concatenation; the exponential, which `Mul` reads too, stays.
        assert_eq!(step_types(&engine.steps), ["Exp", "Mul", "Concat"]);
        assert!(matches!(&engine.steps[2].op, Op::Concat { maps, .. } if maps == &[Some(UnaryFn::Sigmoid), None, None]));
        let e = x.exp().unwrap();
        assert_close(&got, &Tensor::cat(&[candle_nn::ops::sigmoid(&x).unwrap(), e.clone(), (&e * &e).unwrap()], 2).unwrap());

        // A part read twice keeps its own step.
        let nodes = vec![node("Sigmoid", &["x"], &["s"], &[]), node("Concat", &["s", "x", "s"], &["out"], &[("axis", Attribute::Int(1))])];
        let (engine, got) = plan_and_run(&model(nodes, &[]), &x);
        assert_eq!(step_types(&engine.steps), ["Sigmoid", "Concat"]);
        let s = candle_nn::ops::sigmoid(&x).unwrap();
        assert_close(&got, &Tensor::cat(&[&s, &x, &s], 1).unwrap());
    }

    #[test]
    fn a_concatenation_copies_the_parts_of_one_that_only_it_reads_into_place() {
        // A detection head's shape: two concatenations along channels, each reshaped to rows,
        // joined along the rows' axis.
        let nodes = vec![
            node("Exp", &["x"], &["e"], &[]),
            node("Mul", &["x", "x"], &["m"], &[]),
            node("Concat", &["x", "e"], &["c1"], &[("axis", Attribute::Int(1))]),
            node("Reshape", &["c1", "rows"], &["r1"], &[]),
            node("Concat", &["m", "x", "e"], &["c2"], &[("axis", Attribute::Int(1))]),
            node("Reshape", &["c2", "rows"], &["r2"], &[]),
            node("Concat", &["r1", "r2"], &["out"], &[("axis", Attribute::Int(2))]),
        ];
        let x = tensor(&floats(&[2, 2, 3, 4], 19));
        let initializers = [("rows", ints(&[0, 2, -1]))];
        let (engine, got) = plan_and_run(&model(nodes, &initializers), &x);
        assert_eq!(step_types(&engine.steps), ["Exp", "Mul", "Concat"]);
        let nested = |parts: usize| Some(NestedConcat { axis: 1, parts, reshapes: vec![vec![0, 2, -1]] });
        assert!(matches!(&engine.steps[2].op, Op::Concat { nested: n, .. } if n == &[nested(2), nested(3)]), "{:?}", engine.steps[2].op);
        let (e, m) = (x.exp().unwrap(), (&x * &x).unwrap());
        let r1 = Tensor::cat(&[&x, &e], 1).unwrap().reshape((2, 2, 24)).unwrap();
        let r2 = Tensor::cat(&[&m, &x, &e], 1).unwrap().reshape((2, 2, 36)).unwrap();
        assert_close(&got, &Tensor::cat(&[r1, r2], 2).unwrap());

        // Through the function of a part, along another axis, twice in one step; a
        // concatenation that something else reads stays.
        let nodes = vec![
            node("Exp", &["x"], &["e"], &[]),
            node("Concat", &["x", "x"], &["t"], &[("axis", Attribute::Int(3))]),
            node("Concat", &["e", "x"], &["j"], &[("axis", Attribute::Int(3))]),
            node("Sigmoid", &["j"], &["s"], &[]),
            node("Concat", &["e", "e"], &["kept"], &[("axis", Attribute::Int(3))]),
            node("Mul", &["kept", "kept"], &["k"], &[]),
            node("Concat", &["t", "s", "k", "kept"], &["out"], &[("axis", Attribute::Int(1))]),
        ];
        let (engine, got) = plan_and_run(&model(nodes, &[]), &x);
        assert_eq!(step_types(&engine.steps), ["Exp", "Concat", "Mul", "Concat"]);
        let nested = Some(NestedConcat { axis: 3, parts: 2, reshapes: Vec::new() });
        assert!(matches!(&engine.steps[3].op, Op::Concat { nested: n, maps, .. }
            if n == &[nested.clone(), nested, None, None] && maps == &[None, Some(UnaryFn::Sigmoid), None, None]));
        let e = x.exp().unwrap();
        let kept = Tensor::cat(&[&e, &e], 3).unwrap();
        let want =
            [Tensor::cat(&[&x, &x], 3).unwrap(), candle_nn::ops::sigmoid(&Tensor::cat(&[&e, &x], 3).unwrap()).unwrap(), (&kept * &kept).unwrap(), kept.clone()];
        assert_close(&got, &Tensor::cat(&want, 1).unwrap());
    }

    #[test]
    fn a_convolution_of_a_concatenation_still_adds_its_residual() {
        let (w, b) = (floats(&[2, 4, 3, 3], 15), floats(&[2], 16));
        let nodes = vec![
            node("Sigmoid", &["x"], &["a"], &[]),
            node("Exp", &["x"], &["e"], &[]),
            node("Concat", &["a", "e"], &["c"], &[("axis", Attribute::Int(1))]),
            node("Conv", &["c", "w", "b"], &["y"], &[("pads", perm(&[1, 1, 1, 1]))]),
            node("Add", &["y", "x"], &["out"], &[]),
        ];
        let x = tensor(&floats(&[1, 2, 4, 6], 17));
        let (engine, got) = plan_and_run(&model(nodes, &[("w", w.clone()), ("b", b.clone())]), &x);
        assert_eq!(step_types(&engine.steps), ["Sigmoid", "Exp", "Conv"]);
        assert!(matches!(&engine.steps[2].op, Op::Conv(c) if c.concat_parts == 1));
        assert_eq!(engine.steps[2].inputs[3], Some(engine.input_slot));

        let c = Tensor::cat(&[candle_nn::ops::sigmoid(&x).unwrap(), x.exp().unwrap()], 1).unwrap();
        let y = c.conv2d(&tensor(&w), 1, 1, 1, 1).unwrap().broadcast_add(&tensor(&b).reshape((1, 2, 1, 1)).unwrap()).unwrap();
        assert_close(&got, &(y + &x).unwrap());
    }
}
