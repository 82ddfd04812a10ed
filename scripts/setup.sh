#!/usr/bin/env bash
# Installs everything streamdet needs on a Debian machine with a Rust toolchain: FFmpeg's
# development libraries, clang for bindgen, the ffmpeg CLI (test fixtures), a Python venv with
# ONNX Runtime and the photo packages (the tests' oracle and fixtures), and the default model.
# Idempotent, and quiet when everything is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { echo "setup: $*" >&2; }

# --- Debian packages -------------------------------------------------------------------------
# chromium and chromium-driver: the browser tests of the web page; nginx-light, haproxy and
# systemd (systemd-analyze): the tests of the load-balancer set-ups in deploy/.
packages=(pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev
  libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev ffmpeg chromium chromium-driver
  nginx-light haproxy systemd)
python3 -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  # The tests start their own nginx and HAProxy; the system services these packages start (nginx
  # on port 80, HAProxy with Debian's example file) are stopped and disabled when installed here.
  for service in nginx haproxy; do
    if [[ " ${missing[*]} " == *" ${service/nginx/nginx-light} "* ]] && command -v systemctl >/dev/null; then
      "${sudo_cmd[@]}" systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
  done
fi

command -v cargo >/dev/null || { say "cargo not found: install a Rust toolchain (rustup) first"; exit 1; }

# --- Python venv ------------------------------------------------------------------------------
# onnxruntime, numpy, onnx: the engine's oracle and benchmark peer; openvino: the other engine
# the model benchmark compares with; scikit-image, matplotlib: the
# photos the fixtures are made of; fastapi, uvicorn, av, pillow: the Python seed service, a
# benchmark peer; selenium: drives chromium in the page's tests; motmetrics (MOTChallenge ground
# truth and scoring) and supervision (a Python ByteTrack; it was removed in 0.31): the tracker's
# measurement.
requirements="onnxruntime openvino numpy onnx scikit-image matplotlib fastapi uvicorn av pillow selenium motmetrics==1.4.0 supervision==0.30.9"
stamp=".venv/.streamdet-requirements"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$requirements" ]; then
  say "making the Python venv (.venv): $requirements"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check $requirements
  echo "$requirements" > "$stamp"
fi

# --- The default model -----------------------------------------------------------------------
bash scripts/fetch-model.sh
