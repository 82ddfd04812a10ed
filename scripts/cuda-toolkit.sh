#!/usr/bin/env bash
# Makes a CUDA 13.0 toolkit for building `--features cuda` from NVIDIA's wheels on PyPI, on a
# machine with no CUDA installed (no GPU needed): nvcc and its compilers, the headers, and the
# libraries the build links (cuBLAS, cuRAND, NVRTC, the runtime). The driver's libcuda comes with
# a GPU's driver; a machine without one gets a stand-in to link against, made from cuda.h, whose
# functions do nothing (the real one is loaded where the program runs).
#
# usage: bash scripts/cuda-toolkit.sh [DIR]      (default: .cuda, ignored by git)
# then:  export CUDA_ROOT=$DIR PATH=$DIR/bin:$PATH CUDA_COMPUTE_CAP=90   # 90: H100/H200
#        cargo build --release --features cuda
#
# 13.0 is the CUDA of NVIDIA's 580 drivers: kernels compiled by a newer nvcc may not load there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(realpath -m "${1:-$root/.cuda}")"
[ -x "$dir/bin/nvcc" ] && [ -e "$dir/lib/libcuda.so" ] && { echo "$dir is ready"; exit 0; }
# DIR is replaced below: only an earlier (partial) toolkit or an empty folder may be.
if [ -n "$(ls -A "$dir" 2>/dev/null)" ] && [ ! -e "$dir/bin/nvcc" ]; then
  echo "$dir holds something other than a CUDA toolkit: not replacing it" >&2
  exit 1
fi
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64 -d "$download" "${wheels[@]}"
mkdir -p "$download/unpacked"
for wheel in "$download"/*.whl; do
  python3 -m zipfile -e "$wheel" "$download/unpacked"
done
rm -rf "$dir"
mv "$download/unpacked/nvidia/cu13" "$dir"
chmod +x "$dir"/bin/* "$dir"/nvvm/bin/*
# The linker looks for unversioned names.
for lib in cublas cublasLt curand nvrtc cudart; do
  ln -sf "$(cd "$dir/lib" && ls "lib$lib.so".* | head -1)" "$dir/lib/lib$lib.so"
done
# The driver API's stand-in: every function cuda.h declares, after its macros pick the versioned
# names (cuMemAlloc is cuMemAlloc_v2), returning CUDA_ERROR_UNKNOWN.
gcc -E -P -I"$dir/include" "$dir/include/cuda.h" | tr '\n' ' ' \
  | grep -oP '\bCUresult\s+(CUDAAPI\s+)?\K(cu\w+)(?=\s*\()' | sort -u \
  | sed 's/.*/int &(void) { return 999; }/' > "$download/libcuda.c"
gcc -shared -fPIC -o "$dir/lib/libcuda.so" "$download/libcuda.c" -Wl,-soname,libcuda.so.1
echo "CUDA 13.0 toolkit in $dir: export CUDA_ROOT=$dir PATH=$dir/bin:\$PATH"
