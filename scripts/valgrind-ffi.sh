#!/usr/bin/env bash
# Runs the tests that exercise the FFmpeg FFI — every test of the `decode` module: custom I/O
# callbacks, cancellation, bad and damaged inputs, size limits — under valgrind: invalid
# reads/writes or definite leaks fail the run. Selecting the module, not test names, keeps a
# renamed or new test in the run. Two tests cannot pass under valgrind and are skipped: one
# compares how far an upload paced in real time got (valgrind decodes some 30 times slower), the
# other measures a child process started from /proc/self/exe, which under valgrind is valgrind.
# Needs `bash scripts/setup.sh` and valgrind (apt-get install valgrind).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/make-fixtures.sh
binary="$(cargo test --locked --no-run --message-format=json --test streamdet-tests 2>/dev/null |
  .venv/bin/python -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "streamdet-tests":
        print(m["executable"])')"
exec valgrind --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite -q \
  "$binary" decode:: --test-threads 1 \
  --skip streamable_formats_give_frames_before_half_the_upload \
  --skip first_frame_over_the_limit_is_refused_before_allocation
