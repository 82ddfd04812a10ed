#!/usr/bin/env python3
"""Compare two builds of streamdet step by step on one model (A/B of an engine change).

    scripts/ab-steps.py A B [--model M] [--batch N] [--rounds R] [--show REGEX] [--threads T]

A and B are streamdet binaries, each optionally followed by environment settings
(`target/release/streamdet,STREAMDET_WINOGRAD=off`). Each round runs `bench-model --profile
steps` of both; the script prints, per operator type and in all, the sum over steps of each
step's 10th-percentile time across rounds, and B's ratio to A; `--show` adds the steps whose
operator type and layer match REGEX.

By default the two run at the same time, one thread each, each pinned to its own core (they
swap cores every round): on a shared machine whose speed drifts by a tenth or more between
minutes, both builds then meet the same spells, and the ratios hold to a few per cent where
runs one after the other do not. `--threads T` runs them one after the other instead,
interleaved, with T threads each (needs no more than T cores free). Steps the change does not
touch should come out level; if they do not, the rounds were too few.
"""

import argparse
import collections
import json
import os
import re
import subprocess


def command(spec, model, batch, threads, core):
    path, *settings = spec.split(",")
    env = dict(os.environ, **dict(s.split("=", 1) for s in settings))
    args = [path, "bench-model", "--model", model, "--threads", str(threads), "--runs", "10", "--batch", str(batch), "--profile", "steps"]
    if core is not None:
        args = ["taskset", "-c", str(core)] + args
    return args, env


def record(output, steps, meta):
    for line in output.splitlines():
        event = json.loads(line)
        if event["type"] == "steps":
            for step in event["steps"]:
                steps[step["index"]].append(step["ms"])
                meta[step["index"]] = (step["op"], step["layer"], step["input"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--model", default="models/yolov12n.onnx")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--show", default=None)
    parser.add_argument("--threads", type=int, default=None)
    opts = parser.parse_args()
    builds = [opts.a, opts.b]
    steps = [collections.defaultdict(list) for _ in builds]
    meta = {}
    for round_ in range(opts.rounds):
        if opts.threads is None:
            runs = []
            for i, spec in enumerate(builds):
                args, env = command(spec, opts.model, opts.batch, 1, (i + round_) % 2)
                runs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True))
            for i, run in enumerate(runs):
                record(run.communicate()[0], steps[i], meta)
        else:
            for i in ([0, 1] if round_ % 2 == 0 else [1, 0]):
                args, env = command(builds[i], opts.model, opts.batch, opts.threads, None)
                record(subprocess.run(args, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout, steps[i], meta)

    def p10(values):
        return sorted(values)[len(values) // 10]

    by_op = collections.defaultdict(lambda: [0.0, 0.0])
    for index in sorted(meta):
        a, b = (p10(s[index]) for s in steps)
        op, layer, shape = meta[index]
        by_op[op][0] += a
        by_op[op][1] += b
        if opts.show and re.search(opts.show, f"{op} {layer}"):
            print(f"{a:8.3f} {b:8.3f} {b / a:6.2f}  step {index} {op} {layer} {shape}")
    print(f"{'A ms':>8} {'B ms':>8} {'B/A':>6}")
    for op, (a, b) in sorted(by_op.items(), key=lambda item: -item[1][0]):
        print(f"{a:8.3f} {b:8.3f} {b / a if a else float('nan'):6.2f}  {op}")
    a, b = (sum(v[i] for v in by_op.values()) for i in (0, 1))
    print(f"{a:8.3f} {b:8.3f} {b / a:6.2f}  all steps")


if __name__ == "__main__":
    main()
