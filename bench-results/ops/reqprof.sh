#!/usr/bin/env bash
# Syscalls and time per FUSE request TYPE in the shiftfs daemon (issue 16), for one binary:
#   reqprof.sh BIN OUT_PREFIX [N_FILES]
# Mounts a tmpfs source through BIN with `-o uring=off` (each request is then one read of
# /dev/fuse, whose first bytes carry the opcode, and its reply one writev), traces the daemon
# with `strace -f -T -ttt -xx` during benches/smallfiles.py (N_FILES) and a `tar x` + `rm -rf`
# of /usr/share/doc, both as the root of a user namespace mapped 0 100000 65536, and hands the
# trace to reqprof.py, which attributes every syscall between a request's read and its reply
# to that request's opcode. Times are strace's (inflated by the tracing; compare ratios).
set -euo pipefail
bin=$1 out=$2 n=${3:-1000}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/ops-prof.XXXXXX)
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
[ -n "${KEEP_TRACE:-}" ] && trap "cp $work/*.trace /tmp/ 2>/dev/null; cleanup" EXIT
"$bin" mount --backend fuse --map b:0:100000:65536 -o uring=off,share=off "$work/src" "$work/mnt" >/dev/null
pid=$(ps -eo pid,args | awk -v m="$work/mnt" '$0 ~ /mount/ && $2 !~ /awk$/ && index($0, m) { print $1; exit }')
[ -n "$pid" ] || { echo "no daemon found" >&2; exit 1; }
NSROOT=(unshare --user --map-users=100000,0,65536 --map-groups=100000,0,65536 --setuid 0 --setgid 0 --)
# Warm: the first create in a fresh mount learns whether the source honours owners.
"${NSROOT[@]}" sh -c 'mkdir "$1" && python3 "$2" "$1" 50 >/dev/null && rm -rf "$1"' sh "$work/mnt/w" "$work/smallfiles.py"
for w in smallfiles extract; do
  strace -f -y -T -ttt -xx -s 16 -o "$work/$w.trace" -p "$pid" 2>/dev/null &
  spid=$!
  sleep 1.5
  case $w in
    smallfiles) "${NSROOT[@]}" sh -c 'mkdir "$1" && python3 "$2" "$1" "$3"' sh "$work/mnt/sf" "$work/smallfiles.py" "$n" ;;
    extract) "${NSROOT[@]}" sh -c 'mkdir "$1" && tar -C "$1" -xf "$2" && rm -rf "$1"' sh "$work/mnt/x" "$work/doc.tar" ;;
  esac
  sleep 0.5
  kill -INT "$spid"; wait "$spid" 2>/dev/null || true
  python3 "$here/bench-results/ops/reqprof.py" "$work/$w.trace" > "$out-$w.txt"
  echo "== $(basename "$out") $w"; cat "$out-$w.txt"
done
