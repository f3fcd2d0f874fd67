#!/usr/bin/env bash
# The project's test command: installs what the tests need, checks formatting and lints,
# then runs every test (unit, real mounts on both backends, offline shift, pjdfstest). As root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --no-fail-fast "$@"
