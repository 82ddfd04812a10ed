#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), builds streamdet in release mode, and runs the main job
# on the default model: detections for the sample photos that ship with scikit-image and
# matplotlib, one JSON line per photo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --release --locked --quiet --bin streamdet
mapfile -t photos < <(.venv/bin/python scripts/photos.py)
exec target/release/streamdet detect-image --model models/yolov12n.onnx "${photos[@]}"
