#!/usr/bin/env bash
# How many FUSE requests each operation of the round-trip-bound workloads costs.
#
#   benches/fusereq.sh [--uring on|off] [--files N] [SHIFTFS_BIN]     (as root)
#
# Mounts a tmpfs holding the Debian minbase tree through shiftfs FUSE (-o uring=on by default;
# fuse.enable_uring is set to 1 for it and put back), then counts, by opcode, the requests the
# kernel sends that mount (the fuse:fuse_request_send tracepoint, filtered on the mount's
# connection, in a tracefs instance of its own) during each workload, warm as benches/run.sh
# runs them: read every file (tar c), extract the rootfs tarball and N small files
# created, stat'ed and deleted, both as root of a user namespace mapped 0 100000 65536.
# Prints requests per file (per entry for extract) by opcode.
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
uring=on files=2000 bin=
while [ $# -gt 0 ]; do
  case $1 in
    --uring) uring=$2; shift ;;
    --files) files=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) bin=$1 ;;
  esac
  shift
done
bin=${bin:-$repo/target/release/shiftfs}
[ "$(id -u)" = 0 ] || { echo "fusereq.sh: run as root (it mounts and traces)" >&2; exit 1; }
[ -x "$bin" ] || { echo "fusereq.sh: no shiftfs binary at $bin (cargo build --release)" >&2; exit 1; }

tracing=/sys/kernel/tracing traced_mounted=
if [ ! -d "$tracing/events/fuse" ]; then
  mount -t tracefs nodev "$tracing" || { echo "fusereq.sh: cannot mount tracefs on $tracing" >&2; exit 1; }
  traced_mounted=1
fi
[ -d "$tracing/events/fuse/fuse_request_send" ] \
  || { echo "fusereq.sh: this kernel has no fuse:fuse_request_send tracepoint" >&2; exit 1; }

work=$(mktemp -d /var/tmp/shiftfs-fusereq.XXXXXX)
chmod 755 "$work"
inst=$tracing/instances/shiftfs-fusereq-$$
uring_param=/sys/module/fuse/parameters/enable_uring uring_found=
cleanup() {
  [ ! -d "$inst" ] || { echo 0 >"$inst/events/fuse/fuse_request_send/enable"; rmdir "$inst"; }
  "$bin" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  [ -z "$uring_found" ] || echo "$uring_found" >"$uring_param"
  local i
  for ((i = 0; i < 50; i++)); do umount "$work/src" 2>/dev/null && break; sleep 0.2; done
  rm -rf --one-file-system "$work"
  [ -z "$traced_mounted" ] || umount "$tracing" 2>/dev/null || true
}
trap cleanup EXIT

if [ "$uring" = on ]; then
  uring_found=$(cat "$uring_param")
  echo 1 >"$uring_param"
fi
minbase=$("$repo/scripts/minbase.sh")
mkdir "$work/src" "$work/mnt"
mount -t tmpfs -o size=4G,mode=755 shiftfs-fusereq "$work/src"
cp -a "$minbase" "$work/src/rootfs"
mkdir "$work/src/w"
tar -cf "$work/rootfs.tar" --numeric-owner --exclude=./dev -C "$minbase" .
install -m 644 "$here/smallfiles.py" "$work/smallfiles.py"
chmod 644 "$work/rootfs.tar"
"$bin" mount --backend fuse --map b:0:100000:65536 -o "uring=$uring" "$work/src" "$work/mnt" >/dev/null
m=$work/mnt
# The tracepoint's connection is the kernel's dev_t of the mount (major << 20 | minor).
conn=$(stat -c '%Hd %Ld' "$m" | awk '{ print $1 * 1048576 + $2 }')
mkdir "$inst"
echo 16384 >"$inst/buffer_size_kb"
echo "connection == $conn" >"$inst/events/fuse/fuse_request_send/filter"

NSROOT=(unshare --user --map-users=100000,0,65536 --map-groups=100000,0,65536 --setuid 0 --setgid 0 --)
regular=$(find "$minbase" -xdev -type f | wc -l)
entries=$(tar -tf "$work/rootfs.tar" | wc -l)

w_readall() { tar -cf - -C "$m/rootfs" . | cat >/dev/null; }
w_extract() {
  "${NSROOT[@]}" sh -c 'rm -rf "$1" && mkdir "$1" && tar -xf "$2" -C "$1"' sh "$m/w/x" "$work/rootfs.tar"
}
w_extract_clean() { "${NSROOT[@]}" rm -rf "$m/w/x"; }
w_smallfiles() {
  "${NSROOT[@]}" sh -c 'rm -rf "$1" && mkdir "$1" && /usr/bin/python3 "$2" "$1" "$3"' sh "$m/w/sf" "$work/smallfiles.py" "$files" >/dev/null
}

count() {   # WORKLOAD PER_WHAT N
  local w=$1 what=$2 n=$3
  "w_$w"   # warm, as benches/run.sh
  [ "$w" != extract ] || w_extract_clean
  echo >"$inst/trace"
  echo 1 >"$inst/events/fuse/fuse_request_send/enable"
  "w_$w"
  echo 0 >"$inst/events/fuse/fuse_request_send/enable"
  echo "== $w: FUSE requests per $what ($n ${what}s; -o uring=$uring; warm)"
  grep -o '(FUSE_[A-Z_0-9]*)' "$inst/trace" | tr -d '()' | sort | uniq -c | sort -rn \
    | awk -v n="$n" '{ t += $1; printf "  %8d  %6.2f  %s\n", $1, $1 / n, $2 } END { printf "  %8d  %6.2f  total\n", t, t / n }'
  [ "$w" != extract ] || w_extract_clean
}

echo "benches/fusereq.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), shiftfs $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo ?)"
echo "columns: requests, requests per operation, opcode"
count readall file "$regular"
count extract entry "$entries"
count smallfiles file "$files"
if grep -q 'LOST EVENTS\|CPU:.*buffer' "$inst/trace"; then echo "warning: the trace buffer overflowed; counts are low" >&2; fi
