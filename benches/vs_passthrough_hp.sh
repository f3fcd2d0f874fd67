#!/usr/bin/env bash
# shiftfs FUSE over io_uring next to libfuse's reference passthrough daemon over io_uring.
#
#   PASSTHROUGH_HP=/path/to/passthrough_hp benches/vs_passthrough_hp.sh [ROUNDS] [SHIFTFS_BIN]
#
# passthrough_hp is libfuse master's example/passthrough_hp (3.17+, built with liburing: `meson
# setup build && ninja -C build`; Debian's libfuse3 has no io_uring). Both daemons serve one
# tmpfs over io_uring (fuse.enable_uring is set to 1 for the run and put back) with
# default_permissions, shiftfs with the identity map (passthrough_hp shifts nothing, and
# creates as its own user, so every workload runs as host root). Times, interleaved with the
# plain tmpfs over ROUNDS rounds (5) after one warm-up: the small-files workload
# (benches/smallfiles.py, 5,000 files) and the extract of a Debian minbase tarball; then the
# FUSE requests each daemon's connection gets for both (fuse:fuse_request_send tracepoint).
# Prints medians and ratios to the plain directory.
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
rounds=${1:-5}
bin=${2:-$here/../target/release/shiftfs}
hp=${PASSTHROUGH_HP:-}
[ "$(id -u)" = 0 ] || { echo "vs_passthrough_hp.sh: run as root (it mounts and traces)" >&2; exit 1; }
[ -x "$hp" ] || { echo "vs_passthrough_hp.sh: set PASSTHROUGH_HP to libfuse master's passthrough_hp" >&2; exit 1; }
[ -x "$bin" ] || { echo "vs_passthrough_hp.sh: no shiftfs binary at $bin (cargo build --release)" >&2; exit 1; }
tracing=/sys/kernel/tracing
[ -d "$tracing/events/fuse/fuse_request_send" ] || { echo "vs_passthrough_hp.sh: no fuse tracepoint in $tracing" >&2; exit 1; }

work=$(mktemp -d /var/tmp/shiftfs-vs-hp.XXXXXX)
param=/sys/module/fuse/parameters/enable_uring
found=$(cat "$param")
inst=$tracing/instances/shiftfs-vs-hp-$$
cleanup() {
  [ ! -d "$inst" ] || { echo 0 >"$inst/events/fuse/fuse_request_send/enable"; rmdir "$inst"; }
  "$bin" umount "$work/sf" 2>/dev/null || umount -l "$work/sf" 2>/dev/null || true
  umount "$work/hp" 2>/dev/null || umount -l "$work/hp" 2>/dev/null || true
  local i
  # passthrough_hp leaves in its own time after its unmount, holding the source meanwhile.
  for ((i = 0; i < 50; i++)); do umount "$work/src" 2>/dev/null && break; sleep 0.2; done
  echo "$found" >"$param"
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
echo 1 >"$param"

minbase=$("$here/../scripts/minbase.sh")
mkdir "$work/src" "$work/hp" "$work/sf"
tar -cf "$work/rootfs.tar" --numeric-owner --exclude=./dev -C "$minbase" .
mount -t tmpfs -o size=4G,mode=755 shiftfs-vs-hp "$work/src"
mkdir "$work/src/plain" "$work/src/hp" "$work/src/sf"
"$hp" -o io_uring,allow_other,default_permissions "$work/src" "$work/hp"
"$bin" mount --backend fuse --map b:0:0:65536 -o uring=on,share=off "$work/src" "$work/sf" >/dev/null
# Each contender works in a directory of its own: a change made behind the other daemon's back
# would meet its cached entries.
declare -A dir=([plain]=$work/src/plain [hp]=$work/hp/hp [shiftfs]=$work/sf/sf)
names=(plain hp shiftfs)

now() { date +%s.%N; }
smallfiles() {
  rm -rf "$1/s" && mkdir "$1/s"
  python3 "$here/smallfiles.py" "$1/s" 5000 | awk '{print $2 + $4 + $6}'
}
extract() {
  rm -rf "$1/x" && mkdir "$1/x"
  local t0 t1
  t0=$(now); tar -xf "$work/rootfs.tar" -C "$1/x"; t1=$(now)
  rm -rf "$1/x"
  echo "$t1 - $t0" | bc
}

declare -A times
for ((r = 0; r <= rounds; r++)); do
  for c in "${names[@]}"; do
    s=$(smallfiles "${dir[$c]}") e=$(extract "${dir[$c]}")
    [ "$r" = 0 ] || times[$c]+="$s $e"$'\n'
  done
done

echo "vs_passthrough_hp.sh, $(date -u '+%F %H:%M') UTC, kernel $(uname -r), $(nproc) CPUs," \
  "load $(cut -d' ' -f1-3 /proc/loadavg), guest_halt_poll_ns=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo n/a)"
echo "$("$bin" --version 2>/dev/null | head -1) ($(git -C "$here" rev-parse --short HEAD 2>/dev/null)); passthrough_hp $hp; $rounds rounds after a warm-up, medians"
echo
printf '%-10s %14s %10s %14s %10s\n' contender "small files s" "vs plain" "extract s" "vs plain"
median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
ps=$(printf '%s' "${times[plain]}" | awk '{print $1}' | median)
pe=$(printf '%s' "${times[plain]}" | awk '{print $2}' | median)
for c in "${names[@]}"; do
  s=$(printf '%s' "${times[$c]}" | awk '{print $1}' | median)
  e=$(printf '%s' "${times[$c]}" | awk '{print $2}' | median)
  printf '%-10s %14.3f %9.2fx %14.3f %9.2fx\n' "$c" "$s" "$(echo "$s / $ps" | bc -l)" "$e" "$(echo "$e / $pe" | bc -l)"
done

count() {
  local mnt=$1 conn
  shift
  conn=$(awk -v m="$mnt" '$5 == m {split($3, a, ":"); print a[2]}' /proc/self/mountinfo)
  mkdir "$inst"
  echo 65536 >"$inst/buffer_size_kb"
  echo "connection == $conn" >"$inst/events/fuse/fuse_request_send/filter"
  echo 1 >"$inst/events/fuse/fuse_request_send/enable"
  "$@" >/dev/null
  echo 0 >"$inst/events/fuse/fuse_request_send/enable"
  grep -o '(FUSE_[A-Z_0-9]*)' "$inst/trace" | tr -d '()' | sort | uniq -c | sort -rn | awk '{printf "  %7d %s\n", $1, $2}'
  rmdir "$inst"
}
for c in hp shiftfs; do
  m=$work/$([ "$c" = hp ] && echo hp || echo sf)
  echo
  echo "== $c: FUSE requests for 5,000 small files"
  count "$m" smallfiles "${dir[$c]}"
  echo "== $c: FUSE requests for the extract and its rm -rf ($(tar -tf "$work/rootfs.tar" | wc -l) entries)"
  count "$m" extract "${dir[$c]}"
done
