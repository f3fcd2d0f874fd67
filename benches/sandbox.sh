#!/usr/bin/env bash
# What the FUSE daemon's sandbox costs: the same workloads, in one run, through two mounts of
# the same kind of source, one with `-o sandbox=on` (the default) and one with `sandbox=off`,
# alternating so both see the same machine state.
#
#   benches/sandbox.sh [SHIFTFS_BIN] [ROUNDS]   (as root; builds target/release/shiftfs if needed)
#
# Workloads: a GETATTR round trip (fstat of an open file with attr_timeout=0, as roundtrip.sh),
# and small files (create, stat, read and delete 2000 files of 4 KiB). Prints the best time of
# ROUNDS (default 5) per workload and mount, and the ratio on/off.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../target/release/shiftfs}
rounds=${2:-5}
[ -x "$bin" ] || (cd "$here/.." && cargo build --release --quiet)
[ "$(id -u)" = 0 ] || { echo "sandbox.sh: run as root (it mounts)" >&2; exit 1; }

work=$(mktemp -d /tmp/shiftfs-sandbox.XXXXXX)
export SHIFTFS_RUN_DIR=$work/run
cleanup() {
  for m in on off; do
    "$bin" umount "$work/mnt-$m" 2>/dev/null || umount -l "$work/mnt-$m" 2>/dev/null || true
    umount "$work/src-$m" 2>/dev/null || true
  done
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT
for m in on off; do
  mkdir -p "$work/src-$m" "$work/mnt-$m"
  mount -t tmpfs tmpfs "$work/src-$m"
  echo x >"$work/src-$m/f"
  "$bin" mount --backend fuse -o attr_timeout=0,sandbox=$m --map b:0:0:65536 \
    "$work/src-$m" "$work/mnt-$m" >/dev/null
done

python3 - "$work" "$rounds" <<'EOF'
import os, sys, time
work, rounds = sys.argv[1], int(sys.argv[2])

def fstat_loop(mnt):
    fd = os.open(f"{mnt}/f", os.O_RDONLY)
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        os.fstat(fd)
    os.close(fd)
    return (time.perf_counter() - t) / n * 1e6

def small_files(mnt):
    d = f"{mnt}/d"
    os.mkdir(d)
    data = b"x" * 4096
    t = time.perf_counter()
    for i in range(2000):
        with open(f"{d}/{i}", "wb") as f:
            f.write(data)
    for i in range(2000):
        os.stat(f"{d}/{i}")
    for i in range(2000):
        with open(f"{d}/{i}", "rb") as f:
            f.read()
    for i in range(2000):
        os.unlink(f"{d}/{i}")
    el = time.perf_counter() - t
    os.rmdir(d)
    return el * 1e3

for name, fn, unit in [("fstat round trip", fstat_loop, "us"), ("2000 small files", small_files, "ms")]:
    best = {"on": float("inf"), "off": float("inf")}
    for _ in range(rounds):
        for m in ("on", "off"):
            best[m] = min(best[m], fn(f"{work}/mnt-{m}"))
    print(f"{name:<18} sandbox=on {best['on']:8.1f} {unit}   sandbox=off {best['off']:8.1f} {unit}"
          f"   on/off {best['on'] / best['off']:.3f}")
EOF
