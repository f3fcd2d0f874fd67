#!/usr/bin/env bash
# Syscalls the shiftfs FUSE daemon makes per request (issue 16 item 4), for one binary:
#   profile.sh BIN OUT_PREFIX [N_FILES]
# Mounts a tmpfs source through BIN (`-o uring=off`: the transport's own syscalls are then
# one read and one writev per request), runs benches/smallfiles.py as the root of a user
# namespace mapped 0 100000 65536 and a `tar x` of /usr/share/doc the same way, with
# `strace -f -c` on the daemon. Each request is one read of /dev/fuse: the reads count them.
set -euo pipefail
bin=$1 out=$2 n=${3:-2000}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/cost-prof.XXXXXX)
mkdir "$work/src" "$work/mnt"
mount -t tmpfs tmpfs "$work/src"
tar -C /usr/share -cf "$work/doc.tar" doc
cp "$here/benches/smallfiles.py" "$work/"
chmod 755 "$work"; chmod 644 "$work/doc.tar" "$work/smallfiles.py"
cleanup() {
  "$bin" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  umount "$work/src" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$bin" mount --backend fuse --map b:0:100000:65536 -o uring=off "$work/src" "$work/mnt" >/dev/null
pid=$(ps -eo pid,args | awk -v m="$work/mnt" '$0 ~ /mount/ && $2 !~ /awk$/ && index($0, m) { print $1; exit }')
[ -n "$pid" ] || { echo "no daemon found" >&2; exit 1; }
NSROOT=(unshare --user --map-users=100000,0,65536 --map-groups=100000,0,65536 --setuid 0 --setgid 0 --)
for w in smallfiles extract; do
  strace -f -c -o "$out-$w-strace.txt" -p "$pid" 2>/dev/null &
  spid=$!
  sleep 1.5
  case $w in
    smallfiles) "${NSROOT[@]}" sh -c 'mkdir "$1" && python3 "$2" "$1" "$3"' sh "$work/mnt/sf" "$work/smallfiles.py" "$n" ;;
    extract) "${NSROOT[@]}" sh -c 'mkdir "$1" && tar -C "$1" -xf "$2" && rm -rf "$1"' sh "$work/mnt/x" "$work/doc.tar" ;;
  esac
  sleep 0.5
  kill -INT "$spid"; wait "$spid" 2>/dev/null || true
  reqs=$(awk '$NF == "read" { print $4 }' "$out-$w-strace.txt")
  calls=$(awk '$NF == "total" { print $(NF-2) }' "$out-$w-strace.txt")
  io=$(awk '$NF == "read" || $NF == "writev" || $NF == "write" { s += $4 } END { print s + 0 }' "$out-$w-strace.txt")
  printf '%s %s: %s requests, %s syscalls, %s read/write(v), %.2f other syscalls per request\n' \
    "$(basename "$out")" "$w" "$reqs" "$calls" "$io" "$(echo "($calls - $io) / $reqs" | bc -l)" | tee -a "$out-summary.txt"
done
