#!/usr/bin/env bash
# Puts the default model at models/yolov12n.onnx, obtained through cargo from the easy-yolo crate
# (see models/README.md). Idempotent and quiet when the model is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/models/yolov12n.onnx"
[ -s "$out" ] && exit 0

manifest="$root/models/easy-yolo-source/Cargo.toml"
echo "fetching the default model (crate easy-yolo 0.1.3) ..." >&2
cargo fetch --quiet --manifest-path "$manifest"
pkg_dir="$(cargo metadata --format-version 1 --manifest-path "$manifest" |
  python3 -c 'import json,sys,os
m = json.load(sys.stdin)
p = next(p for p in m["packages"] if p["name"] == "easy-yolo")
print(os.path.dirname(p["manifest_path"]))')"
zip="$(find "$pkg_dir" -name 'yolov12n.onnx.zip' | head -n 1)"
[ -n "$zip" ] || { echo "yolov12n.onnx.zip not found in $pkg_dir" >&2; exit 1; }
tmp="$out.partial"
python3 - "$zip" "$tmp" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z:
    # Only the model itself: the archive also holds macOS resource-fork junk.
    with z.open("yolov12n.onnx") as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$tmp" "$out"
echo "default model ready: $out" >&2
