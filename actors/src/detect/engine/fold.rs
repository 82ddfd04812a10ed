//! Folding on the planned steps, on the CPU: chains of views into the steps that read them,
//! and channel concatenations into the convolutions that read them, so that less data moves.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::eval::ints;
use super::{Op, Step};
use crate::detect::views::ViewStep;

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
            (sizes.iter().all(|&s| s >= 0)).then_some(ViewStep::Narrow { axis: *axis, start: start as usize, len: len as usize })
        }
        _ => None,
    }
}

/// Folds chains of views (`Reshape`, `Transpose`, `Split`; see [`views`](crate::detect::views)) into the steps at
/// their ends, on the CPU:
/// - an attention step reads each operand through the chain that leads to it, and writes its
///   result through the reshapes and transposes that follow it, into the tensor at their end;
/// - any other step reading the end of a chain of two or more views that moves or splits axes
///   gets it from one [`Op::View`] copy instead of a copy per step.
///
/// Steps whose results nobody reads any more are dropped.
pub(super) fn fold_views(mut steps: Vec<Step>, constants: &HashMap<usize, Tensor>, output_slot: usize, device: &Device) -> Vec<Step> {
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
pub(super) const CONV_MORE_PARTS: usize = 4;

/// Lets convolutions read a concatenation along channels where its parts lie, on the CPU: a
/// `Concat` over axis 1 whose result only convolutions read, as their input, goes away, and
/// each of them takes the parts instead (the first as its input, the others from
/// [`CONV_MORE_PARTS`] on).
pub(super) fn fold_concats_into_convs(mut steps: Vec<Step>, output_slot: usize, device: &Device) -> Vec<Step> {
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
