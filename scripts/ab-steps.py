#!/usr/bin/env python3
"""Compare two builds of streamdet step by step on one model (A/B of an engine change).

    scripts/ab-steps.py A B [--model M] [--batch N] [--rounds R] [--threads T] [--show REGEX]

A and B are streamdet binaries, each optionally followed by environment settings
(`target/release/streamdet,STREAMDET_WINOGRAD=off`). Each round runs `bench-model --profile
steps` of both, one after the other (B first every other round); the script prints, per
operator type and in all, the sum over steps of each step's 10th-percentile time across the
rounds, B's ratio to A, and the geometric mean over rounds of B's ratio to A within a round
(`paired`: the two runs of a round are seconds apart, so a slow spell of the machine that spans
them cancels; the order alternates, so an advantage of running first or second cancels too);
`--show` adds the steps whose operator type and layer match REGEX.

On a shared machine the ratios drift: the same build against itself came out at 0.96 and 1.06
(two sets of eight rounds, 2 threads, the 2-core Xeon of an earlier docs/benchmarks run), and at 0.96-0.98 by
operator type in the paired column (six rounds). Read a change by the steps it touches against
those it does not, which should come out level.
"""

import argparse
import collections
import json
import math
import os
import re
import subprocess


def run(spec, opts):
    """One `bench-model --profile steps` of build `spec`: {key: (index, ms)}, keyed by operator
    type, layer, input shape and occurrence, so that the steps of two builds match up when one
    of them has steps the other lacks (a fused or folded step)."""
    path, *settings = spec.split(",")
    env = dict(os.environ, **dict(s.split("=", 1) for s in settings))
    args = [path, "bench-model", "--model", opts.model, "--threads", str(opts.threads), "--runs", "10", "--batch", str(opts.batch), "--profile", "steps"]
    output = subprocess.run(args, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    steps = {}
    seen = collections.Counter()
    for line in output.splitlines():
        event = json.loads(line)
        if event["type"] == "steps":
            for step in event["steps"]:
                what = (step["op"], step["layer"], tuple(step["input"]))
                seen[what] += 1
                steps[what + (seen[what],)] = (step["index"], step["ms"])
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--model", default="models/yolov12n.onnx")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show", default=None)
    opts = parser.parse_args()
    times = [collections.defaultdict(list), collections.defaultdict(list)]
    order = {}
    # Per round: each build's sum by operator type (and in all, under None).
    round_sums = []
    for round_ in range(opts.rounds):
        sums = [collections.Counter(), collections.Counter()]
        for i in [0, 1] if round_ % 2 == 0 else [1, 0]:
            for key, (index, ms) in run([opts.a, opts.b][i], opts).items():
                times[i][key].append(ms)
                order.setdefault(key, (index, i))
                sums[i][key[0]] += ms
                sums[i][None] += ms
        round_sums.append(sums)

    def paired(op):
        """The geometric mean over rounds of B's sum over `op`'s steps to A's in the round."""
        logs = [math.log(b[op] / a[op]) for a, b in round_sums if a[op] and b[op]]
        return f"{math.exp(sum(logs) / len(logs)):6.2f}" if logs else "     -"

    def p10(values):
        """The 10th percentile; 0 for a step this build does not have."""
        return sorted(values)[len(values) // 10] if values else 0.0

    by_op = collections.defaultdict(lambda: [0.0, 0.0])
    for key in sorted(order, key=lambda k: order[k]):
        a, b = (p10(t.get(key, [])) for t in times)
        op, layer, shape, _ = key
        by_op[op][0] += a
        by_op[op][1] += b
        if opts.show and re.search(opts.show, f"{op} {layer}"):
            ratio = f"{b / a:6.2f}" if a and b else "     -"
            print(f"{a:8.3f} {b:8.3f} {ratio}  step {order[key][0]} {op} {layer} {list(shape)}")
    print(f"{'A ms':>8} {'B ms':>8} {'B/A':>6} {'paired':>6}")
    for op, (a, b) in sorted(by_op.items(), key=lambda item: -item[1][0]):
        print(f"{a:8.3f} {b:8.3f} {b / a if a else float('nan'):6.2f} {paired(op)}  {op}")
    a, b = (sum(v[i] for v in by_op.values()) for i in (0, 1))
    print(f"{a:8.3f} {b:8.3f} {b / a:6.2f} {paired(None)}  all steps")


if __name__ == "__main__":
    main()
