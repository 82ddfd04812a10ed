#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/make-fixtures.sh
cargo test --workspace --locked "$@"
