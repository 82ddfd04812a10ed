#!/usr/bin/env python3
"""Repeated runs of `streamdet bench --only model`: the engine's figures against its peers.

    scripts/model-runs.py [--runs N] [--threads T ...] [--streamdet BIN] [--out DIR]

Runs `streamdet bench --only model --threads T` N times for each thread count given (all the
runs at the first count, then at the next), keeps each run's `results.json` under DIR, and
prints per model and batch: the medians of streamdet's, ONNX Runtime's and OpenVINO's times
over the runs, then the median of the per-run ratios with their range, to each peer and to the
faster of the two (a peer a run skipped is left out of that run's ratios).

On a shared machine a whole run can go slow, for every runtime alike; its ratios hold up better
than its times, and the range says how far one run can stray. The engine's goal is judged so:
five runs at 2 threads (the default), medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_once(opts, threads, index):
    """One `bench --only model` run at `threads`: its `model` rows."""
    out = os.path.join(opts.out, f"t{threads}-run{index}")
    subprocess.run([opts.streamdet, "bench", "--only", "model", "--threads", str(threads), "--out", out], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["model"]


def ratios(rows, peer):
    """Per-run ratios of streamdet's time to `peer`'s (a function of a row), where both ran."""
    return [row["ours_ms"] / peer(row) for row in rows if row.get("ours_ms") and peer(row)]


def summary(values):
    if not values:
        return "skipped"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def median_ms(rows, key):
    values = [row[key] for row in rows if row.get(key)]
    return f"{statistics.median(values):.1f}" if values else "-"


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--streamdet", default=os.path.join(root, "target", "release", "streamdet"))
    parser.add_argument("--out", default=os.path.join(root, "bench-results", "model-runs"))
    opts = parser.parse_args()
    if opts.runs < 1:
        sys.exit("--runs must be at least 1")
    print("| model, batch | threads | streamdet ms | ONNX Runtime ms | OpenVINO ms | to ONNX Runtime | to OpenVINO | to the faster |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in opts.threads:
        by_model = {}
        for index in range(1, opts.runs + 1):
            for row in run_once(opts, threads, index):
                by_model.setdefault((row["model"], row["batch"]), []).append(row)
        for (model, batch), rows in by_model.items():
            to_ort = ratios(rows, lambda r: r.get("ort_ms"))
            to_openvino = ratios(rows, lambda r: r.get("openvino_ms"))
            to_faster = ratios(rows, lambda r: min((r[k] for k in ("ort_ms", "openvino_ms") if r.get(k)), default=None))
            print(
                f"| {model}, {batch} | {threads} | {median_ms(rows, 'ours_ms')} | {median_ms(rows, 'ort_ms')} | {median_ms(rows, 'openvino_ms')} "
                f"| {summary(to_ort)} | {summary(to_openvino)} | {summary(to_faster)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
