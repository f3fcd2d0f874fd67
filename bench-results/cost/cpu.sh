#!/usr/bin/env bash
# The FUSE daemon's own CPU time per request, two binaries side by side (issue 16 item 4):
#   cpu.sh BASE_BIN NEW_BIN ROUNDS N_FILES          (SOURCE=ext4: the source is a directory of /var/tmp)
# Both mount one tmpfs source (`-o uring=off,share=off`: two daemons, not one shared); each round runs, on each mount in turn,
# benches/smallfiles.py (N_FILES) and a `tar x` + `rm -rf` of /usr/share/doc as the root of a
# user namespace mapped 0 100000 65536, and records the wall time and the daemon's user+system
# CPU time (/proc/PID/stat, all threads) of each. CPU time, unlike wall time, hardly depends
# on what else the machine runs.
set -euo pipefail
base=$1 new=$2 rounds=${3:-5} n=${4:-3000}
here=$(cd "$(dirname "$0")/../.." && pwd)
source=${SOURCE:-tmpfs}
work=$(mktemp -d /var/tmp/cost-cpu.XXXXXX)
mkdir "$work/src" "$work/m-base" "$work/m-new"
[ "$source" = ext4 ] || mount -t tmpfs tmpfs "$work/src"
tar -C /usr/share -cf "$work/doc.tar" doc
cp "$here/benches/smallfiles.py" "$work/"
chmod 755 "$work"; chmod 644 "$work/doc.tar" "$work/smallfiles.py"
cleanup() {
  "$base" umount "$work/m-base" 2>/dev/null || umount -l "$work/m-base" 2>/dev/null || true
  "$new" umount "$work/m-new" 2>/dev/null || umount -l "$work/m-new" 2>/dev/null || true
  [ "$source" = ext4 ] || umount "$work/src" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
declare -A pid bin=([base]=$base [new]=$new)
for c in base new; do
  "${bin[$c]}" mount --backend fuse --map b:0:100000:65536 -o uring=off,share=off "$work/src" "$work/m-$c" >/dev/null
  pid[$c]=$(ps -eo pid,args | awk -v m="$work/m-$c" '$0 ~ /mount/ && $2 !~ /awk$/ && index($0, m) { print $1; exit }')
done
tck=$(getconf CLK_TCK)
cpu() { awk -v t="$tck" '{ printf "%.3f\n", ($14 + $15) / t }' "/proc/$1/stat"; }
NSROOT=(unshare --user --map-users=100000,0,65536 --map-groups=100000,0,65536 --setuid 0 --setgid 0 --)
printf 'round\tcontender\tworkload\twall_s\tdaemon_cpu_s\n'
for ((r = 1; r <= rounds; r++)); do
  order=(base new); [ $((r % 2)) = 0 ] && order=(new base)
  for c in "${order[@]}"; do
    m=$work/m-$c
    c0=$(cpu "${pid[$c]}"); t0=$(date +%s.%N)
    "${NSROOT[@]}" sh -c 'mkdir "$1" && python3 "$2" "$1" "$3" >/dev/null && rmdir "$1"' sh "$m/sf" "$work/smallfiles.py" "$n"
    t1=$(date +%s.%N); c1=$(cpu "${pid[$c]}")
    printf '%s\t%s\tsmallfiles\t%.3f\t%.3f\n' "$r" "$c" "$(echo "$t1 - $t0" | bc)" "$(echo "$c1 - $c0" | bc)"
    c0=$c1; t0=$(date +%s.%N)
    "${NSROOT[@]}" sh -c 'mkdir "$1" && tar -C "$1" -xf "$2" && rm -rf "$1"' sh "$m/x" "$work/doc.tar"
    t1=$(date +%s.%N); c1=$(cpu "${pid[$c]}")
    printf '%s\t%s\textract+rm\t%.3f\t%.3f\n' "$r" "$c" "$(echo "$t1 - $t0" | bc)" "$(echo "$c1 - $c0" | bc)"
  done
done
