#!/usr/bin/env python3
"""Measures a multi-object tracker against MOTChallenge ground truth that nobody here wrote.

The ground truth is the pair of MOT15 sequences that the `motmetrics` package ships inside its
wheel (motmetrics/data/TUD-Campus and TUD-Stadtmitte: 640x480 at 25 fps, pedestrians only).
From it this script makes realistic detections (jittered, some dropped, false positives added,
per-box confidences, all from a fixed seed), runs a Python ByteTrack on them as the peer, and
scores any tracker's output with motmetrics (MOTA, IDF1, ID switches).

usage:
  mot_eval.py info SEQ                          sequence facts as one JSON line
  mot_eval.py make-detections SEQ OUT.csv [--seed N] [--drop P] [--fp-rate L] ...
  mot_eval.py peer SEQ DETS.csv OUT.csv [--tracker supervision|trackers|trackforge] [--params P]
  mot_eval.py score SEQ TRACKS.csv [--stride K]  MOTA / IDF1 / IDSW as one JSON line
  mot_eval.py selftest                          checks the scorer against motmetrics' figures
  mot_eval.py run [--seeds 1 2 3]               make-detections + peer + score, every sequence
  mot_eval.py score-runs NAME [--seeds 1 2 3]   scores WORKDIR/SEQ.seedN.NAME.csv of every run

SEQ is a sequence name (TUD-Campus, TUD-Stadtmitte) or the path of a MOT15 gt.txt.

File formats (CSV, one header line, frames numbered from 1 as in MOTChallenge):
  detections  frame,x1,y1,x2,y2,conf,pts     pts: the frame's time in seconds, (frame-1)/fps
  tracks      frame,id,x1,y1,x2,y2           one row per output box; id >= 1
A tracker must be stepped through every frame 1..frames (see `info`), including frames with no
detection rows; with --stride K only frames where (frame-1) % K == 0 are processed and scored.

Versions: prints the numpy / motmetrics / supervision / trackers / trackforge versions it used
on stderr. sv.ByteTrack was removed in supervision 0.31.0: use supervision<0.31 (0.30.9 tested)
or the `trackers` package (--tracker trackers). --tracker trackforge runs the candidate Rust
crate's ByteTrack through its own PyPI binding (`trackforge`), for comparison.
motmetrics 1.4.0 calls np.asfarray, which numpy 2 removed, so this script computes the IoU
distances itself and uses only motmetrics' accumulator and metrics; `selftest` shows that the
result equals the figures motmetrics publishes for its sample tracker output.
"""
import argparse
import csv
import json
import os
import sys
import warnings
from importlib import metadata

import numpy as np

# motmetrics 1.4.0 emits pandas FutureWarnings on recent pandas; they are not ours to fix.
warnings.filterwarnings("ignore", category=FutureWarning)

# Facts the shipped gt.txt files do not carry (MOT15 seqinfo.ini of each sequence).
SEQINFO = {
    "TUD-Campus": {"width": 640, "height": 480, "fps": 25.0, "frames": 71},
    "TUD-Stadtmitte": {"width": 640, "height": 480, "fps": 25.0, "frames": 179},
}
SEQUENCES = list(SEQINFO)

# motmetrics' own README table for its sample tracker output (data/*/test.txt), used by selftest.
PUBLISHED = {
    "TUD-Campus": {"mota": 0.526, "idf1": 0.558, "idsw": 7},
    "TUD-Stadtmitte": {"mota": 0.564, "idf1": 0.645, "idsw": 7},
}


def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def say(*parts):
    print("mot_eval:", *parts, file=sys.stderr)


def report_versions(*dists):
    say(", ".join(f"{d} {version(d) or 'not installed'}" for d in ("numpy",) + dists))


# --- sequences and ground truth -------------------------------------------------------------


def motmetrics_data_dir():
    import motmetrics

    return os.path.join(os.path.dirname(motmetrics.__file__), "data")


def resolve(seq):
    """Returns (name, gt path, info dict) for a sequence name or a gt.txt path."""
    if os.path.isfile(seq):
        path = seq
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    else:
        name = seq
        path = os.path.join(motmetrics_data_dir(), name, "gt.txt")
        if not os.path.isfile(path):
            sys.exit(f"mot_eval: no ground truth for {seq!r} (looked for {path})")
    info = dict(SEQINFO.get(name, {}))
    gt = load_gt(path)
    info.setdefault("frames", max(gt))
    info.setdefault("fps", 25.0)
    info.setdefault("width", None)
    info.setdefault("height", None)
    return name, path, info


def load_gt(path):
    """Reads a MOT15 gt.txt: frame,id,x,y,w,h,conf,wx,wy,wz. Returns {frame: [(id, x, y, w, h)]}.

    MOT15 has no class column (every row is a pedestrian; columns 8-10 are world coordinates or
    -1), so a row is kept when its conf/active flag (column 7) is not 0, as motmetrics'
    `loadtxt(min_confidence=1)` does for these files.
    """
    gt = {}
    with open(path) as f:
        for row in csv.reader(f):
            if not row or not row[0].strip():
                continue
            frame, oid = int(float(row[0])), int(float(row[1]))
            x, y, w, h = (float(v) for v in row[2:6])
            if len(row) > 6 and float(row[6]) == 0:
                continue
            gt.setdefault(frame, []).append((oid, x, y, w, h))
    for boxes in gt.values():
        boxes.sort()
    return gt


def evaluated_frames(info, stride):
    return [f for f in range(1, info["frames"] + 1) if (f - 1) % stride == 0]


# --- CSV helpers ---------------------------------------------------------------------------


def read_rows(path):
    """Yields the numeric rows of a CSV, skipping a header line (any row that is not numeric)."""
    with open(path) as f:
        for row in csv.reader(f):
            if not row:
                continue
            try:
                yield [float(v) for v in row]
            except ValueError:
                continue


def read_detections(path):
    """Returns {frame: float array (n, 5) of x1,y1,x2,y2,conf}."""
    per_frame = {}
    for r in read_rows(path):
        per_frame.setdefault(int(r[0]), []).append(r[1:6])
    return {f: np.asarray(v, dtype=np.float64) for f, v in per_frame.items()}


def read_tracks(path):
    """Returns {frame: [(id, x1, y1, x2, y2)]}."""
    per_frame = {}
    for r in read_rows(path):
        per_frame.setdefault(int(r[0]), []).append((int(r[1]), *r[2:6]))
    return per_frame


# --- detections from ground truth -----------------------------------------------------------


def make_detections(gt, info, seed, drop, jitter, weak, fp_rate):
    """Turns ground-truth boxes into what a decent person detector would output.

    For each ground-truth box, in frame order and then id order, from one seeded generator:
      - it is missed with probability `drop`;
      - otherwise its centre moves by N(0, jitter * w) and N(0, jitter * h), and its width and
        height are scaled by exp(N(0, jitter)), independently;
      - its confidence: with probability `weak` a "hard" detection, uniform in [0.15, 0.5) (what
        ByteTrack's second, low-score association exists for); otherwise N(0.8, 0.1) clipped to
        [0.5, 0.99].
    Per frame, Poisson(fp_rate) false positives: 60 % beside a real person (a copy of its box
    moved sideways by 30-70 % of its width and rescaled by 0.8-1.2, like a partial or split
    detection), 40 % anywhere, with the size of a random ground-truth box. Their confidence is
    N(0.3, 0.12) clipped to [0.02, 0.95].
    Every box is clipped to the frame, as a detector's would be, and boxes under 2 px dropped.
    Returns rows (frame, x1, y1, x2, y2, conf, pts).
    """
    rng = np.random.default_rng(seed)
    width, height, fps = info["width"], info["height"], info["fps"]
    sizes = [(w, h) for boxes in gt.values() for (_, _, _, w, h) in boxes]
    rows = []

    def emit(frame, cx, cy, w, h, conf):
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if width:
            x1, x2 = max(0.0, x1), min(float(width), x2)
        if height:
            y1, y2 = max(0.0, y1), min(float(height), y2)
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            rows.append((frame, x1, y1, x2, y2, conf, (frame - 1) / fps))

    for frame in range(1, info["frames"] + 1):
        boxes = gt.get(frame, [])
        for _, x, y, w, h in boxes:
            if rng.random() < drop:
                continue
            cx = x + w / 2 + rng.normal(0, jitter * w)
            cy = y + h / 2 + rng.normal(0, jitter * h)
            dw, dh = np.exp(rng.normal(0, jitter, size=2))
            if rng.random() < weak:
                conf = rng.uniform(0.15, 0.5)
            else:
                conf = float(np.clip(rng.normal(0.8, 0.1), 0.5, 0.99))
            emit(frame, cx, cy, w * dw, h * dh, conf)
        for _ in range(rng.poisson(fp_rate)):
            near = boxes and rng.random() < 0.6
            if near:
                _, x, y, w, h = boxes[rng.integers(len(boxes))]
                side = 1 if rng.random() < 0.5 else -1
                cx = x + w / 2 + side * rng.uniform(0.3, 0.7) * w
                cy = y + h / 2
                w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
            else:
                w, h = sizes[rng.integers(len(sizes))]
                cx = rng.uniform(0, width or 640)
                cy = rng.uniform(0, height or 480)
            conf = float(np.clip(rng.normal(0.3, 0.12), 0.02, 0.95))
            emit(frame, cx, cy, w, h, conf)
    return rows


def write_detections(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["frame", "x1", "y1", "x2", "y2", "conf", "pts"])
        for frame, x1, y1, x2, y2, conf, pts in rows:
            out.writerow([frame, f"{x1:.2f}", f"{y1:.2f}", f"{x2:.2f}", f"{y2:.2f}",
                          f"{conf:.4f}", f"{pts:.6f}"])


# --- the peer: a Python ByteTrack from PyPI --------------------------------------------------

# ByteTrack's reference code (FoundationVision/ByteTrack, tools/track.py): track_thresh 0.5
# (new tracks need score >= track_thresh + 0.1), low threshold 0.1, match_thresh 0.8
# (IoU >= 0.2), track_buffer 30 frames at 30 fps.
PAPER = {"track_activation_threshold": 0.5, "lost_track_buffer": 30,
         "minimum_matching_threshold": 0.8}


def make_tracker(kind, params, fps):
    """Returns step(d) -> [(id, x1, y1, x2, y2)] for d, a float array (n, 5) of x1,y1,x2,y2,conf.

    Every detection is given class 0: the sequences hold one class (pedestrians).
    """
    if kind == "trackforge":
        # The candidate Rust crate, through its own Python binding (the same Rust code).
        import trackforge

        # Its defaults are the reference code's (0.5, 30, 0.8, 0.6) in both --params modes; the
        # 30-frame buffer is scaled to the frame rate as the reference code and supervision do.
        tracker = trackforge.BYTETRACK(track_buffer=int(fps / 30.0 * 30))

        def step(d):
            tlwh = [([x1, y1, x2 - x1, y2 - y1], conf, 0) for x1, y1, x2, y2, conf in d.tolist()]
            return [(t[0], t[1][0], t[1][1], t[1][0] + t[1][2], t[1][1] + t[1][3])
                    for t in tracker.update(tlwh)]

        return step

    import supervision as sv

    if kind == "supervision":
        if not hasattr(sv, "ByteTrack"):
            sys.exit("mot_eval: this supervision has no ByteTrack (removed in 0.31.0); "
                     "install supervision<0.31 or use --tracker trackers")
        kwargs = {"frame_rate": fps}  # the rest: supervision's defaults ...
        if params == "paper":
            kwargs.update(PAPER)  # ... or the ByteTrack paper's
        update = sv.ByteTrack(**kwargs).update_with_detections
    elif kind == "trackers":
        from trackers import ByteTrackTracker

        kwargs = {"frame_rate": fps}
        if params == "paper":
            kwargs.update(lost_track_buffer=30, high_conf_det_threshold=0.5,
                          track_activation_threshold=0.6, minimum_iou_threshold=0.2)
        update = ByteTrackTracker(**kwargs).update
    else:
        sys.exit(f"mot_eval: unknown tracker {kind!r}")

    def step(d):
        tracked = update(sv.Detections(xyxy=d[:, :4].astype(np.float32),
                                       confidence=d[:, 4].astype(np.float32),
                                       class_id=np.zeros(len(d), dtype=int)))
        # The `trackers` package reports boxes of not-yet-confirmed tracks with id -1.
        return [(int(tid), *(float(v) for v in box))
                for box, tid in zip(tracked.xyxy, tracked.tracker_id) if tid >= 1]

    return step


def run_peer(info, dets, kind, params, stride):
    """Steps a tracker through every processed frame; returns rows (frame, id, x1, y1, x2, y2)."""
    step = make_tracker(kind, params, info["fps"] / stride)
    rows = []
    for frame in evaluated_frames(info, stride):
        for track in step(dets.get(frame, np.empty((0, 5)))):
            rows.append((frame, *track))
    return rows


def write_tracks(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["frame", "id", "x1", "y1", "x2", "y2"])
        for frame, tid, x1, y1, x2, y2 in rows:
            out.writerow([frame, tid, f"{x1:.2f}", f"{y1:.2f}", f"{x2:.2f}", f"{y2:.2f}"])


# --- scoring with motmetrics -----------------------------------------------------------------


def iou_distance(gt_xywh, hyp_xywh, max_distance=0.5):
    """1 - IoU between every ground-truth and hypothesis box, NaN where IoU < 1 - max_distance.

    The same quantity as motmetrics.distances.iou_matrix (which fails on numpy 2).
    """
    a = np.asarray(gt_xywh, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(hyp_xywh, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.empty((len(a), len(b)))
    a_lo, a_hi = a[:, None, :2], a[:, None, :2] + a[:, None, 2:]
    b_lo, b_hi = b[None, :, :2], b[None, :, :2] + b[None, :, 2:]
    wh = np.clip(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    dist = 1.0 - iou
    dist[dist > max_distance] = np.nan
    return dist


def score(gt, hyp, frames, name, max_distance=0.5):
    """Scores hyp {frame: [(id, x, y, w, h)]} against gt over `frames`. Returns a dict."""
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=False)
    for frame in frames:
        g, h = gt.get(frame, []), hyp.get(frame, [])
        acc.update([o[0] for o in g], [t[0] for t in h],
                   iou_distance([o[1:] for o in g], [t[1:] for t in h], max_distance),
                   frameid=frame)
    names = {"mota": "mota", "idf1": "idf1", "num_switches": "idsw", "motp": "motp",
             "num_false_positives": "fp", "num_misses": "fn", "num_objects": "gt_boxes",
             "num_unique_objects": "gt_ids", "mostly_tracked": "mt", "mostly_lost": "ml",
             "num_fragmentations": "frag", "num_frames": "frames"}
    summary = mm.metrics.create().compute(acc, metrics=list(names), name=name)
    out = {"seq": name}
    for metric, key in names.items():
        v = summary[metric].iloc[0]
        out[key] = round(float(v), 4) if isinstance(v, (float, np.floating)) else int(v)
    out["tracks"] = len({t[0] for boxes in hyp.values() for t in boxes})
    return out


def xyxy_to_xywh(tracks):
    return {f: [(tid, x1, y1, x2 - x1, y2 - y1) for tid, x1, y1, x2, y2 in boxes]
            for f, boxes in tracks.items()}


# --- subcommands -----------------------------------------------------------------------------


def cmd_info(args):
    name, path, info = resolve(args.seq)
    print(json.dumps({"seq": name, "gt": path, **info}))


def cmd_make_detections(args):
    report_versions("motmetrics")
    name, path, info = resolve(args.seq)
    rows = make_detections(load_gt(path), info, args.seed, args.drop, args.jitter, args.weak,
                           args.fp_rate)
    write_detections(args.out, rows)
    say(f"{name}: {len(rows)} detections over {info['frames']} frames -> {args.out}")


def cmd_peer(args):
    report_versions("supervision", "trackers", "trackforge")
    name, path, info = resolve(args.seq)
    rows = run_peer(info, read_detections(args.dets), args.tracker, args.params, args.stride)
    write_tracks(args.out, rows)
    say(f"{name}: {args.tracker} ByteTrack ({args.params} params), {len(rows)} boxes, "
        f"{len({r[1] for r in rows})} ids -> {args.out}")


def cmd_score(args):
    report_versions("motmetrics")
    name, path, info = resolve(args.seq)
    result = score(load_gt(path), xyxy_to_xywh(read_tracks(args.tracks)),
                   evaluated_frames(info, args.stride), name, 1.0 - args.iou)
    result["motmetrics"] = version("motmetrics")
    print(json.dumps(result))


def cmd_selftest(args):
    """Scores motmetrics' own sample tracker output and compares with its published table."""
    report_versions("motmetrics")
    ok = True
    for name in SEQUENCES:
        _, path, info = resolve(name)
        test = load_gt(os.path.join(os.path.dirname(path), "test.txt"))
        result = score(load_gt(path), test, evaluated_frames(info, 1), name)
        want = PUBLISHED[name]
        good = (abs(result["mota"] - want["mota"]) < 1e-3
                and abs(result["idf1"] - want["idf1"]) < 1e-3 and result["idsw"] == want["idsw"])
        ok &= good
        print(json.dumps({"seq": name, "ok": good, "got": {k: result[k] for k in want},
                          "published": want}))
    sys.exit(0 if ok else 1)


def cmd_run(args):
    """The whole peer measurement: every sequence x seed, one JSON line each."""
    report_versions("motmetrics", "supervision", "trackers", "trackforge")
    os.makedirs(args.workdir, exist_ok=True)
    for name in args.sequences:
        _, path, info = resolve(name)
        gt = load_gt(path)
        for seed in args.seeds:
            dets = os.path.join(args.workdir, f"{name}.seed{seed}.dets.csv")
            write_detections(dets, make_detections(gt, info, seed, args.drop, args.jitter,
                                                   args.weak, args.fp_rate))
            rows = run_peer(info, read_detections(dets), args.tracker, args.params, args.stride)
            tracks = {}
            for frame, tid, *box in rows:
                tracks.setdefault(frame, []).append((tid, *box))
            result = score(gt, xyxy_to_xywh(tracks), evaluated_frames(info, args.stride), name)
            print(json.dumps({"seed": seed, "tracker": args.tracker, "params": args.params,
                              "stride": args.stride, **result}), flush=True)


def cmd_score_runs(args):
    """Scores another tracker's output on the detections `run` made: one JSON line per run."""
    report_versions("motmetrics")
    for name in args.sequences:
        _, path, info = resolve(name)
        gt = load_gt(path)
        for seed in args.seeds:
            tracks = os.path.join(args.workdir, f"{name}.seed{seed}.{args.name}.csv")
            result = score(gt, xyxy_to_xywh(read_tracks(tracks)), evaluated_frames(info, args.stride), name)
            print(json.dumps({"seed": seed, "tracker": args.name, "stride": args.stride, **result}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def detection_options(q):
        q.add_argument("--drop", type=float, default=0.15, help="share of boxes missed")
        q.add_argument("--jitter", type=float, default=0.03, help="box noise, share of size")
        q.add_argument("--weak", type=float, default=0.15, help="share of low-score true boxes")
        q.add_argument("--fp-rate", type=float, default=0.8, help="false positives per frame")

    def peer_options(q):
        q.add_argument("--tracker", choices=["supervision", "trackers", "trackforge"],
                       default="supervision")
        q.add_argument("--params", choices=["default", "paper"], default="default",
                       help="the library's defaults, or the ByteTrack paper's thresholds")
        q.add_argument("--stride", type=int, default=1, help="process every K-th frame")

    q = sub.add_parser("info", help="sequence facts as JSON")
    q.add_argument("seq")
    q.set_defaults(func=cmd_info)

    q = sub.add_parser("make-detections", help="detections made from ground truth")
    q.add_argument("seq")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=1)
    detection_options(q)
    q.set_defaults(func=cmd_make_detections)

    q = sub.add_parser("peer", help="run a Python ByteTrack on detections")
    q.add_argument("seq")
    q.add_argument("dets")
    q.add_argument("out")
    peer_options(q)
    q.set_defaults(func=cmd_peer)

    q = sub.add_parser("score", help="MOTA / IDF1 / IDSW of a tracks CSV")
    q.add_argument("seq")
    q.add_argument("tracks")
    q.add_argument("--stride", type=int, default=1, help="score only the processed frames")
    q.add_argument("--iou", type=float, default=0.5, help="IoU a match needs (MOTChallenge: 0.5)")
    q.set_defaults(func=cmd_score)

    q = sub.add_parser("selftest", help="check the scorer against motmetrics' published figures")
    q.set_defaults(func=cmd_selftest)

    q = sub.add_parser("run", help="make-detections + peer + score for sequences x seeds")
    q.add_argument("--sequences", nargs="+", default=SEQUENCES)
    q.add_argument("--seeds", nargs="+", type=int, default=[1])
    q.add_argument("--workdir", default="target/mot-eval")
    detection_options(q)
    peer_options(q)
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("score-runs", help="score another tracker's output on the runs' detections")
    q.add_argument("name", help="the tracker's name in the file names: SEQ.seedN.NAME.csv")
    q.add_argument("--sequences", nargs="+", default=SEQUENCES)
    q.add_argument("--seeds", nargs="+", type=int, default=[1])
    q.add_argument("--workdir", default="target/mot-eval")
    q.add_argument("--stride", type=int, default=1, help="score only the processed frames")
    q.set_defaults(func=cmd_score_runs)

    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
