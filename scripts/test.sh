#!/usr/bin/env bash
# The project's test command: installs what the tests need, checks formatting and lints,
# then runs every test (unit, real mounts on both backends, offline shift, pjdfstest). As root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
status=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
scripts/check-leaks.sh || status=1
# One closing line for the whole run (cargo's own last line is the doc tests' "0 passed").
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit $status
