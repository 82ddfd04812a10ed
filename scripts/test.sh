#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), checks formatting and lints (warnings are errors), and
# runs every test of the workspace.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/make-fixtures.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
