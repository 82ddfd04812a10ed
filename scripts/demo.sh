#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), builds streamdet in release mode, makes the sample
# videos (scripts/make-fixtures.sh), and runs the main job on the default model: detections for a
# sample video made from the photos that ship with scikit-image and matplotlib, streamed through
# the pipeline as NDJSON events (start, one frame line per frame, end).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/make-fixtures.sh
cargo build --release --locked --quiet --bin streamdet
exec target/release/streamdet detect fixtures/photos.mp4
