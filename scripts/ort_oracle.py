#!/usr/bin/env python3
"""Runs ONNX Runtime on raw float32 input and writes its first output as raw float32: the oracle
that streamdet's engine parity tests compare against.

usage: ort_oracle.py MODEL INPUT.f32 N,C,H,W OUTPUT.f32
Prints the output shape as comma-separated integers on stdout.
"""
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, input_path, shape, output_path = sys.argv[1:5]
    dims = tuple(int(d) for d in shape.split(","))
    x = np.fromfile(input_path, dtype="<f4").reshape(dims)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    (y,) = session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: x})
    y.astype("<f4").tofile(output_path)
    print(",".join(str(d) for d in y.shape))


if __name__ == "__main__":
    main()
