#!/usr/bin/env python3
"""Set streamdet's convolutions beside OpenVINO's, layer by layer, on one model.

    scripts/layers-vs-openvino.py [--model M] [--threads T] [--batch N] [--rounds R] [--runs K]
                                  [--show N] [--streamdet BIN]

Each round runs `streamdet bench-model --profile steps` and OpenVINO's CPU plugin with its
per-node profiling (fp32, latency hint, one stream, the same threads), one after the other
(OpenVINO first every other round), K calls each. Every convolution step of streamdet is matched
to the model's Conv node of the same kind (depthwise or not), channels, kernel, stride and input
size, in order of occurrence (a 1x1 convolution that streamdet runs before a 2x upsampling, on a
quarter of the pixels, to the node at twice its input size, and counted there), and OpenVINO's
time for that node (its name, or its name with `/WithoutBiases`) is taken: both include what
each runtime fused into the convolution (bias, SiLU, a residual). The script prints, per kind
and input size, both runtimes' milliseconds (the median over rounds of each layer's median
over its K calls, summed), their ratio and GFLOP/s (2 per multiply-add), then the N layers
with the largest gap. Medians, not means: on a shared machine a thread that loses its core
stalls the layer it is in, and a few such stalls raise a mean far more than a median.

Read a ratio within one run only: on a shared machine a whole round can run slow, for both
runtimes alike. OpenVINO's per-node times add up to its whole call (its layout reorders and
copies are nodes of their own, not counted here).
Needs the venv that scripts/setup.sh makes (onnx, openvino, numpy).
"""

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import onnx
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints


def model_convs(path, batch):
    """The model's Conv nodes in graph order: (name, signature, multiply-adds)."""
    model = onnx.load(path)
    for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim, [batch, 3, 640, 640]):
        if not dim.HasField("dim_value"):
            dim.dim_value = size
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(model.graph.value_info) + list(model.graph.input)}
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights or node.input[0] not in shapes:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        cout, cin_g, kh, _ = weights[node.input[1]]
        groups = attrs.get("group", 1)
        _, cin, h, w = shapes[node.input[0]]
        stride = attrs.get("strides", [1, 1])[0]
        depthwise = groups > 1 and groups == cin
        signature = (depthwise, cin, cout, kh, stride, h)
        macs = batch * cout * cin_g * kh * kh * (h // stride) * (w // stride)
        convs.append((node.name, signature, macs))
    return convs


def step_signature(step):
    """A streamdet step's signature, as `model_convs` makes it; None for other steps."""
    if not step["op"].startswith("Conv"):
        return None
    channels, kernel, stride = step["layer"].split()[:3]
    cin, cout = (int(c) for c in channels.split("->"))
    return (step["op"] == "Conv depthwise", cin, cout, int(kernel[1:]), int(stride[1:]), step["input"][2])


def streamdet_round(args):
    out = subprocess.run(
        [args.streamdet, "bench-model", "--model", args.model, "--threads", str(args.threads), "--batch", str(args.batch),
         "--runs", str(args.runs), "--profile", "steps"],
        capture_output=True, text=True, check=True,
    ).stdout
    steps = next(json.loads(line) for line in out.splitlines() if '"steps"' in line and '"type":"steps"' in line)["steps"]
    return [(step_signature(s), s["ms"]) for s in steps if step_signature(s) is not None]


def openvino_request(args):
    core = ov.Core()
    model = core.read_model(args.model)
    if model.inputs[0].get_partial_shape().is_dynamic:
        model.reshape([args.batch, 3, 640, 640])
    config = {
        props.inference_num_threads: args.threads,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.inference_precision: ov.Type.f32,
        props.num_streams: 1,
        props.enable_profiling: True,
    }
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x = np.random.default_rng(0).random((args.batch, 3, 640, 640), dtype=np.float32)
    for _ in range(3):
        request.infer({0: x})
    return request, x


def openvino_round(request, x, runs):
    """Each executed node's median milliseconds over `runs` calls, as streamdet's steps."""
    ms = collections.defaultdict(list)
    for _ in range(runs):
        request.infer({0: x})
        for node in request.profiling_info:
            if node.status == node.Status.EXECUTED:
                ms[node.node_name].append(node.real_time.total_seconds() * 1000)
    return {name: statistics.median(times) for name, times in ms.items()}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(root, "models", "yolov12n.onnx"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--show", type=int, default=15)
    ap.add_argument("--streamdet", default=os.path.join(root, "target", "release", "streamdet"))
    args = ap.parse_args()

    convs = model_convs(args.model, args.batch)
    request, x = openvino_request(args)
    ours_rounds, theirs_rounds = [], []
    for r in range(args.rounds):
        if r % 2:
            theirs_rounds.append(openvino_round(request, x, args.runs))
            ours_rounds.append(streamdet_round(args))
        else:
            ours_rounds.append(streamdet_round(args))
            theirs_rounds.append(openvino_round(request, x, args.runs))

    # Match each streamdet convolution step to the next unmatched Conv node of its signature.
    by_signature = collections.defaultdict(list)
    for name, signature, macs in convs:
        by_signature[signature].append((name, macs))
    taken = collections.Counter()
    layers, unmatched = [], 0
    for i, (signature, _) in enumerate(ours_rounds[0]):
        candidates = by_signature.get(signature, [])
        if taken[signature] >= len(candidates) and signature[3] == 1:
            # streamdet runs a 1x1 convolution that follows a 2x nearest upsampling before it,
            # on a quarter of the pixels: it matches the node at twice the size.
            signature = signature[:5] + (2 * signature[5],)
            candidates = by_signature.get(signature, [])
        if taken[signature] >= len(candidates):
            unmatched += 1
            continue
        name, macs = candidates[taken[signature]]
        taken[signature] += 1
        theirs = [t.get(name + "/WithoutBiases", t.get(name)) for t in theirs_rounds]
        if None in theirs:
            unmatched += 1
            continue
        ours = statistics.median(o[i][1] for o in ours_rounds)
        layers.append((signature, name, macs, ours, statistics.median(theirs)))

    groups = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])
    for (depthwise, cin, cout, k, stride, h), _, macs, ours, theirs in layers:
        kind = "depthwise" if depthwise else ("1x1" if k == 1 else f"{k}x{k} s{stride}")
        g = groups[(kind, h)]
        g[0] += 1
        g[1] += ours
        g[2] += theirs
        g[3] += macs
    print(f"{args.model}, {args.threads} threads, batch {args.batch}, {args.rounds} rounds of {args.runs} calls; "
          f"{len(layers)} convolutions matched, {unmatched} not")
    print(f"{'kind':>10} {'input':>6} {'layers':>6} {'streamdet ms':>13} {'OpenVINO ms':>12} {'ratio':>6} {'GFLOP/s':>8} {'OV GFLOP/s':>10}")
    total = [0.0, 0.0]
    for (kind, h), (n, ours, theirs, macs) in sorted(groups.items(), key=lambda kv: kv[1][2] - kv[1][1]):
        total[0] += ours
        total[1] += theirs
        print(f"{kind:>10} {h:>6} {n:>6} {ours:>13.2f} {theirs:>12.2f} {ours / theirs:>6.2f} {2e-6 * macs / ours:>8.0f} {2e-6 * macs / theirs:>10.0f}")
    print(f"{'all':>10} {'':>6} {len(layers):>6} {total[0]:>13.2f} {total[1]:>12.2f} {total[0] / total[1]:>6.2f}")
    if args.show:
        print(f"\nthe {args.show} layers with the largest gap:")
        for (depthwise, cin, cout, k, stride, h), name, _, ours, theirs in sorted(layers, key=lambda l: l[4] - l[3])[: args.show]:
            label = f"{cin}->{cout} k{k} s{stride}{' dw' if depthwise else ''} @{h}"
            print(f"  {label:<24} {ours:7.3f} ms against {theirs:7.3f} ({ours / theirs:.2f})  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
