#!/usr/bin/env python3
"""How each step of a model scales from one thread to several: where the threads lose time.

    scripts/thread-scaling.py [--model M] [--batch N] [--threads T] [--rounds R] [--show N]
                              [--streamdet BIN]

Each round runs `streamdet bench-model --profile steps` at one thread and at T (one after the
other, T first every other round); each step's time is its best over the rounds at each count.
A step's loss is its time at T threads less its time at one divided by T: what it would save if
it scaled perfectly. The script prints the total loss, then per operator type and input size
the losses, times and speed-ups, largest loss first, then the N steps that lose most.

A step that scales worse than the rest of the model points at its schedule (too few or uneven
tasks, a serial part), or at what the threads share (the L3 cache, memory). Read it beside
`scripts/layers-vs-openvino.py --threads 1` and `--threads T`, which shows whether OpenVINO
scales those layers better.
"""

import argparse
import collections
import json
import os
import subprocess


def run(opts, threads):
    """One `bench-model --profile steps` at `threads`: {(index, op, layer, input): ms}."""
    args = [opts.streamdet, "bench-model", "--model", opts.model, "--batch", str(opts.batch), "--threads", str(threads), "--runs", "10", "--profile", "steps"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    steps = {}
    for line in output.splitlines():
        event = json.loads(line)
        if event["type"] == "steps":
            for step in event["steps"]:
                steps[(step["index"], step["op"], step["layer"], tuple(step["input"]))] = step["ms"]
    return steps


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(root, "models", "yolov12n.onnx"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--show", type=int, default=15)
    parser.add_argument("--streamdet", default=os.path.join(root, "target", "release", "streamdet"))
    opts = parser.parse_args()
    counts = [1, opts.threads]
    best = {count: {} for count in counts}
    for round_ in range(opts.rounds):
        for count in counts if round_ % 2 else counts[::-1]:
            for key, ms in run(opts, count).items():
                best[count][key] = min(best[count].get(key, float("inf")), ms)
    rows = []
    for key, one in best[1].items():
        if key in best[opts.threads]:
            many = best[opts.threads][key]
            rows.append((many - one / opts.threads, key, one, many))
    rows.sort(key=lambda row: -row[0])
    one_total, many_total = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"{opts.model}, batch {opts.batch}: steps sum to {one_total:.2f} ms at 1 thread, {many_total:.2f} at {opts.threads} ({one_total / many_total:.2f}x); lost {sum(r[0] for r in rows):.2f} ms")
    by_kind = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for lost, (_, op, _, shape), one, many in rows:
        kind = by_kind[(op, shape[-1] if len(shape) == 4 else "")]
        kind[0] += lost
        kind[1] += one
        kind[2] += many
    print(f"{'operator':>22} {'input':>6} {'lost ms':>8} {'1 thread':>9} {f'{opts.threads} threads':>10} {'speed-up':>9}")
    for (op, size), (lost, one, many) in sorted(by_kind.items(), key=lambda item: -item[1][0]):
        print(f"{op:>22} {size:>6} {lost:8.3f} {one:9.3f} {many:10.3f} {one / many if many else 0:9.2f}")
    print(f"\nthe {opts.show} steps that lose most:")
    for lost, (index, op, layer, shape), one, many in rows[: opts.show]:
        print(f"  step {index:<4} {op} {layer} {list(shape)}: {one:.3f} -> {many:.3f} ms ({one / many if many else 0:.2f}x), lost {lost:.3f}")


if __name__ == "__main__":
    main()
