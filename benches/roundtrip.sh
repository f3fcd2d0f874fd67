#!/usr/bin/env bash
# What one FUSE round trip costs here, and how much depends on the CPU the daemon runs on.
#
#   benches/roundtrip.sh [SHIFTFS_BIN]     (as root; builds target/release/shiftfs if needed)
#
# Mounts a small tmpfs through shiftfs FUSE with attr_timeout=0 (every fstat of an open file
# is then a GETATTR round trip) and times fstat in a loop three ways: the daemon's threads
# free to run anywhere, pinned to the caller's CPU, and pinned to another CPU; then through a
# second mount served over io_uring (-o uring=on; fuse.enable_uring is set to 1 for it and put
# back), caller free and caller pinned. Needs 2+ CPUs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../target/release/shiftfs}
[ -x "$bin" ] || (cd "$here/.." && cargo build --release --quiet)
[ "$(id -u)" = 0 ] || { echo "roundtrip.sh: run as root (it mounts)" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "roundtrip.sh: needs two CPUs" >&2; exit 1; }

work=$(mktemp -d /tmp/shiftfs-rtt.XXXXXX)
uring_param=/sys/module/fuse/parameters/enable_uring uring_found=
cleanup() {
  "$bin" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  "$bin" umount "$work/mnt-uring" 2>/dev/null || umount -l "$work/mnt-uring" 2>/dev/null || true
  [ -z "$uring_found" ] || echo "$uring_found" >"$uring_param"
  rmdir "$work/mnt-uring" 2>/dev/null || true
  umount "$work/src" 2>/dev/null || true
  rmdir "$work/mnt" "$work/src" "$work" 2>/dev/null || true
}
trap cleanup EXIT
mkdir "$work/src" "$work/mnt"
mount -t tmpfs tmpfs "$work/src"
echo x >"$work/src/f"
"$bin" mount --backend fuse -o attr_timeout=0,uring=off,share=off --map b:0:100000:65536 "$work/src" "$work/mnt" >/dev/null

loop='
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
n, best = 20000, float("inf")
for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
        os.fstat(fd)
    best = min(best, (time.perf_counter() - t) / n)
print(f"{sys.argv[2]:<36} {best * 1e6:7.1f} us per fstat")
'
# The PID column, found by its header (`shiftfs list` gained columns after it).
pid=$("$bin" list | awk -v t="$work/mnt" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "PID") c = i } $1 == t { print $c }' | head -1)
[ -d "/proc/${pid:-none}" ] || { echo "roundtrip.sh: no daemon pid for $work/mnt in shiftfs list" >&2; exit 1; }
pin() { for t in /proc/"$pid"/task/*; do taskset -pc "$1" "${t##*/}" >/dev/null; done; }
python3 -c "$loop" "$work/src/f" "plain tmpfs (no round trip)"
python3 -c "$loop" "$work/mnt/f" "FUSE, daemon free"
pin 0
taskset -c 0 python3 -c "$loop" "$work/mnt/f" "FUSE, daemon on the caller's CPU"
pin 1
taskset -c 0 python3 -c "$loop" "$work/mnt/f" "FUSE, daemon on another CPU"
if [ -w "$uring_param" ]; then
  uring_found=$(cat "$uring_param")
  echo 1 >"$uring_param"
  mkdir "$work/mnt-uring"
  "$bin" mount --backend fuse -o attr_timeout=0,uring=on,share=off --map b:0:100000:65536 "$work/src" "$work/mnt-uring" >/dev/null
  python3 -c "$loop" "$work/mnt-uring/f" "FUSE over io_uring, caller free"
  taskset -c 0 python3 -c "$loop" "$work/mnt-uring/f" "FUSE over io_uring, caller on CPU 0"
else
  echo "FUSE over io_uring: $uring_param not writable, not measured"
fi
