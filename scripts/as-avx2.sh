#!/usr/bin/env bash
# Runs a command as if this CPU had AVX2 and FMA but no AVX-512, AMX or AVX-VNNI:
#
#     bash scripts/as-avx2.sh .venv/bin/python scripts/model-runs.py --runs 5
#
# The command and everything it starts (streamdet, ONNX Runtime, OpenVINO) read the CPU's
# features through the `cpuid` instruction, which scripts/avx2/cpuid_avx2.c answers with
# those features cleared; glibc's own choice is capped through GLIBC_TUNABLES. That is how
# the three runtimes' AVX2 kernels are compared on an AVX-512 machine: ONNX Runtime has no
# switch of its own to cap them. Needs Linux's CPUID faulting (`cpuid_fault` in /proc/cpuinfo)
# and a C compiler; the library is built once under target/avx2-cpuid/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! grep -qw cpuid_fault /proc/cpuinfo; then
    echo "as-avx2: this CPU or hypervisor offers no CPUID faulting (no cpuid_fault in /proc/cpuinfo)" >&2
    exit 2
fi
if [ $# -eq 0 ]; then
    echo "usage: bash scripts/as-avx2.sh COMMAND [ARGS...]" >&2
    exit 2
fi
source="$root/scripts/avx2/cpuid_avx2.c"
library="$root/target/avx2-cpuid/libcpuid_avx2.so"
if [ ! -f "$library" ] || [ "$source" -nt "$library" ]; then
    mkdir -p "$(dirname "$library")"
    cc -O2 -Wall -Wextra -Werror -shared -fPIC -o "$library" "$source" -ldl
fi
avx512="-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL,-AVX512ER,-AVX512PF"
export GLIBC_TUNABLES="glibc.cpu.hwcaps=$avx512${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
export LD_PRELOAD="$library${LD_PRELOAD:+ $LD_PRELOAD}"
exec "$@"
