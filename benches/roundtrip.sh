#!/usr/bin/env bash
# What one FUSE round trip costs here, and how much depends on the CPU the daemon runs on.
#
#   benches/roundtrip.sh [SHIFTFS_BIN]     (as root; builds target/release/shiftfs if needed)
#
# Env: SHIFTFS_BASE_BIN, another shiftfs binary (an earlier commit's) whose io_uring mount is
# timed next to this one's; PASSTHROUGH_HP, libfuse's example/passthrough_hp (built with
# io_uring), timed the same way as a reference daemon with no work of its own.
#
# Mounts a small tmpfs through shiftfs FUSE with attr_timeout=0 (every fstat of an open file
# is then a GETATTR round trip) and times fstat in a loop three ways: the daemon's threads
# free to run anywhere, pinned to the caller's CPU, and pinned to another CPU; then through a
# second mount served over io_uring (-o uring=on; fuse.enable_uring is set to 1 for it and put
# back), caller free and caller pinned. The io_uring mounts (this binary's, and the others
# above when given) are timed interleaved, round by round, per call: median and 90th
# percentile of single fstat calls, the timer's own cost taken off. Needs 2+ CPUs.
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
  for m in "$work"/mnt-uring*; do
    [ -d "$m" ] || continue
    "$bin" umount "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    rmdir "$m" 2>/dev/null || true
  done
  [ -z "$uring_found" ] || echo "$uring_found" >"$uring_param"
  # passthrough_hp leaves in its own time after its unmount, holding the source meanwhile.
  for _ in 1 2 3 4 5 6 7 8 9 10; do umount "$work/src" 2>/dev/null && break; sleep 0.2; done
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
  paths=("$work/src/f" "$work/mnt-uring/f") names=("plain tmpfs" "FUSE over io_uring")
  if [ -n "${SHIFTFS_BASE_BIN:-}" ]; then
    mkdir "$work/mnt-uring-base"
    "$SHIFTFS_BASE_BIN" mount --backend fuse -o attr_timeout=0,uring=on,share=off --map b:0:100000:65536 \
      "$work/src" "$work/mnt-uring-base" >/dev/null
    paths+=("$work/mnt-uring-base/f") names+=("FUSE over io_uring, SHIFTFS_BASE_BIN")
  fi
  if [ -n "${PASSTHROUGH_HP:-}" ]; then
    mkdir "$work/mnt-uring-hp"
    "$PASSTHROUGH_HP" --nocache --nopassthrough -o io_uring "$work/src" "$work/mnt-uring-hp"
    paths+=("$work/mnt-uring-hp/f") names+=("FUSE over io_uring, passthrough_hp")
  fi
  percall='
import os, sys, time, statistics
paths = sys.argv[2::2]; names = sys.argv[3::2]
fds = [os.open(p, os.O_RDONLY) for p in paths]
samples = [[] for _ in fds]
pc = time.perf_counter_ns
for _ in range(5):
    for fd, s in zip(fds, samples):
        for _ in range(4000):
            t = pc(); os.fstat(fd); s.append(pc() - t)
tc = statistics.median([-pc() + pc() for _ in range(1000)])
for name, s in zip(names, samples):
    s.sort()
    med, p90 = (s[len(s) // 2] - tc) / 1e3, (s[len(s) * 9 // 10] - tc) / 1e3
    print(f"{name + sys.argv[1]:<56} {med:6.1f} us per fstat (median; p90 {p90:.1f})")
'
  args=(); for i in "${!paths[@]}"; do args+=("${paths[$i]}" "${names[$i]}"); done
  python3 -c "$percall" ", caller free" "${args[@]}"
  taskset -c 0 python3 -c "$percall" ", caller on CPU 0" "${args[@]}"
else
  echo "FUSE over io_uring: $uring_param not writable, not measured"
fi
