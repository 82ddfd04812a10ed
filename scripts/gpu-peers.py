#!/usr/bin/env python3
"""Times the GPU peers of `streamdet bench-model` on GPU 0: ONNX Runtime's CUDA provider, and
PyTorch running the same ONNX graph (converted by onnx2torch) in fp32 with TF32 off, so that both
compute what candle's CUDA backend computes. A peer that cannot run here is reported as skipped,
with the reason.

usage: gpu-peers.py MODEL.onnx [--batch B] [--runs R] [--warmup W] [--size S]
prints one JSON line per peer, like ort_bench.py's, with "device": "cuda"; or
{"runtime": …, "skipped": reason}

One call takes the input from the host and brings the output back, as `streamdet bench-model`
times it.
Needs: numpy, onnx; onnxruntime-gpu (or an onnxruntime built with CUDA); torch with CUDA and
onnx2torch.
"""
import argparse, json, statistics, time

import numpy as np


def timed(call, warmup, runs):
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "runs": runs}


def onnx_runtime(a, x):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDA provider "
                           f"(providers: {', '.join(ort.get_available_providers())})"}
    s = ort.InferenceSession(a.model, providers=["CUDAExecutionProvider"])
    if s.get_providers()[0] != "CUDAExecutionProvider":
        return {"skipped": f"the CUDA provider did not load (session providers: {s.get_providers()})"}
    name = s.get_inputs()[0].name
    call = lambda: s.run(None, {name: x})[0]
    return {"version": ort.__version__, "max_diff": max_diff_to_cpu(a, x, call()), **timed(call, a.warmup, a.runs)}


def pytorch(a, x):
    import onnx
    import torch
    try:
        from onnx2torch import convert
    except ImportError as e:
        return {"skipped": f"onnx2torch is not installed ({e})"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    model = onnx.load(a.model)
    use_older_converters(model)
    net = convert(model).eval().cuda()

    def call():
        with torch.inference_mode():
            out = net(torch.from_numpy(x).cuda())
            out = out[0] if isinstance(out, (list, tuple)) else out
            return out.cpu().numpy()

    return {"version": torch.__version__, "gpu": torch.cuda.get_device_name(0),
            "max_diff": max_diff_to_cpu(a, x, call()), **timed(call, a.warmup, a.runs)}


def use_older_converters(model):
    """onnx2torch has no converters for some operators' opset-18 versions (Split, which gained
    `num_outputs`; the reductions, whose `axes` became an input): those the model uses get the
    converter of the newest older version, and a reduction's constant `axes` input becomes the
    attribute that version reads. The output is checked against ONNX Runtime's on the CPU
    (`max_diff`)."""
    import onnx.defs
    import onnx.numpy_helper
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum" and len(node.input) == 2 \
                and node.input[1] in constants:
            node.attribute.append(onnx.helper.make_attribute("axes", constants[node.input[1]].tolist()))
            del node.input[1]
    for op in {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}:
        version = onnx.defs.get_schema(op, opset).since_version
        wanted = OperationDescription(domain="", operation_type=op, version=version)
        older = sorted((d.version for d in _CONVERTER_REGISTRY if d.domain == "" and d.operation_type == op and d.version < version))
        if wanted not in _CONVERTER_REGISTRY and older:
            _CONVERTER_REGISTRY[wanted] = _CONVERTER_REGISTRY[OperationDescription(domain="", operation_type=op, version=older[-1])]


def max_diff_to_cpu(a, x, out):
    """The largest difference between a peer's output and ONNX Runtime's on the CPU."""
    import onnxruntime as ort
    s = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    ref = s.run(None, {s.get_inputs()[0].name: x})[0]
    return float(np.abs(out - ref).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--size", type=int, default=640)
    a = ap.parse_args()
    x = np.random.default_rng(0).random((a.batch, 3, a.size, a.size), dtype=np.float32)
    for runtime, peer in [("onnxruntime", onnx_runtime), ("pytorch", pytorch)]:
        try:
            result = peer(a, x)
        except Exception as e:  # a peer that fails is reported, and the other still runs
            result = {"skipped": f"{type(e).__name__}: {e}"}
        print(json.dumps({"runtime": runtime, "device": "cuda", "model": a.model, "batch": a.batch,
                          **result}), flush=True)


if __name__ == "__main__":
    main()
