#!/usr/bin/env bash
# The engine benchmark of issue "Detection engine": streamdet's `bench-model` next to ONNX
# Runtime (../shared/peers/ort_bench.py) on the same model files, same thread count, interleaved
# in one run; prints both medians and the ratio per case. Needs `bash scripts/setup.sh` first.
#   scripts/bench-engine.sh [THREADS] [RUNS] [ROUNDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads="${1:-2}"; runs="${2:-10}"; rounds="${3:-3}"
ort="../shared/peers/ort_bench.py"
[ -f "$ort" ] || { echo "SKIPPED: $ort is not here" >&2; exit 0; }
cargo build --release --locked --quiet --bin streamdet
cases=("models/yolov12n.onnx 1")
if [ -f ../shared/models/yolo11n-random-dynamic.onnx ]; then
  cases+=("../shared/models/yolo11n-random-dynamic.onnx 1" "../shared/models/yolo11n-random-dynamic.onnx 4")
fi
for case in "${cases[@]}"; do
  set -- $case
  model="$1"; batch="$2"; ours=(); theirs=()
  for _ in $(seq "$rounds"); do
    ours+=("$(target/release/streamdet bench-model --model "$model" --batch "$batch" --threads "$threads" --runs "$runs" | .venv/bin/python -c 'import json,sys; print(json.loads(sys.stdin.readline())["median_ms"])')")
    theirs+=("$(.venv/bin/python "$ort" "$model" --batch "$batch" --threads "$threads" --runs "$runs" | .venv/bin/python -c 'import json,sys; print(json.loads(sys.stdin.readline())["median_ms"])')")
  done
  .venv/bin/python - "$model" "$batch" "$threads" "${ours[*]}" "${theirs[*]}" <<'PY'
import json, statistics, sys
model, batch, threads, ours, theirs = sys.argv[1:]
o = statistics.median(map(float, ours.split())); t = statistics.median(map(float, theirs.split()))
print(json.dumps({"model": model, "batch": int(batch), "threads": int(threads),
                  "streamdet_ms": o, "onnxruntime_ms": t, "ratio": round(o / t, 2)}))
PY
done
