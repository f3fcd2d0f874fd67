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
# First pass: FUSE mounts through /dev/fuse (uring=off).
SHIFTFS_TEST_URING=off cargo test --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# Second pass, FUSE over io_uring: the suites that make FUSE mounts again, every mount with
# uring=on (it fails rather than fall back), with fuse.enable_uring on for the pass only.
uring_param=/sys/module/fuse/parameters/enable_uring
if [ $# -eq 0 ] && [ -w "$uring_param" ]; then
    found=$(cat "$uring_param")
    trap 'echo "$found" > "$uring_param"; rm -f "$log"' EXIT
    echo 1 > "$uring_param"
    SHIFTFS_TEST_URING=on cargo test --no-fail-fast --test uring --test fuse_backend \
        --test cli_mount --test permissions --test acl_caps --test acl_setgid \
        --test sandbox --test userns --test coherence --test idmappable --test pjdfstest 2>&1 | tee -a "$log" || status=$?
    echo "$found" > "$uring_param"
elif [ $# -eq 0 ]; then
    echo "FUSE over io_uring: $uring_param not writable (kernel < 6.14 or no CONFIG_FUSE_IO_URING); second pass not run" | tee -a "$log"
    if [ "${CI:-}" = true ]; then status=1; fi
fi
scripts/check-leaks.sh || status=1
# One closing line for the whole run (cargo's own last line is the doc tests' "0 passed").
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit $status
