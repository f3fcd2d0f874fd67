#!/bin/sh
# Shifting the Debian minbase tree with `shiftfs shift` compared side by side with
# `chown -R` of the same tree to a single owner. Not a timed test: it prints the times and
# the ratio. Needs root. Usage:
#   cargo build --release && benches/shift_vs_chown.sh [MINBASE_DIR] [ROUNDS]
# MINBASE_DIR defaults to the tree scripts/minbase.sh builds (once) with debootstrap.
#
# The comparison flatters chown: it writes one owner and nothing else, while the shift
# translates every owner, ACL entry and capability root id, restores the setuid/setgid
# bits and capabilities that chown clears, journals its plan (fsynced) first and syncs the
# file system before recording the new map. So a second line compares with chown + syncfs.
set -eu
if [ $# -ge 1 ]; then MB=$1; else MB=$("$(dirname "$0")/../scripts/minbase.sh"); fi
ROUNDS=${2:-5}
BIN=${SHIFTFS:-$(dirname "$0")/../target/release/shiftfs}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
[ -n "$MB" ] && [ -f "$MB/etc/debian_version" ] || { echo "no Debian tree at '$MB' (scripts/minbase.sh builds one)" >&2; exit 2; }
WORK=$(mktemp -d /var/tmp/shiftfs-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT INT TERM

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

inodes=$(find "$MB" -xdev -printf '%i\n' | sort -u | wc -l)
echo "tree: $MB ($inodes inodes), $(nproc) cores, $ROUNDS rounds, page cache warm"
: > "$WORK/shift.t"; : > "$WORK/chown.t"; : > "$WORK/chownsync.t"
i=0
while [ "$i" -lt "$ROUNDS" ]; do
    rm -rf "$WORK/a" "$WORK/b" "$WORK/c"
    cp -a "$MB" "$WORK/a"; cp -a "$MB" "$WORK/b"; cp -a "$MB" "$WORK/c"
    sync
    find "$WORK/a" "$WORK/b" "$WORK/c" -xdev > /dev/null
    t0=$(now); "$BIN" shift --map b:0:100000:65536 "$WORK/a" > /dev/null; t1=$(now)
    chown -R 100000:100000 "$WORK/b"; t2=$(now)
    chown -R 100000:100000 "$WORK/c"; sync -f "$WORK/c"; t3=$(now)
    awk "BEGIN {print $t1 - $t0}" >> "$WORK/shift.t"
    awk "BEGIN {print $t2 - $t1}" >> "$WORK/chown.t"
    awk "BEGIN {print $t3 - $t2}" >> "$WORK/chownsync.t"
    i=$((i + 1))
done
s=$(median < "$WORK/shift.t"); c=$(median < "$WORK/chown.t"); cs=$(median < "$WORK/chownsync.t")
printf 'shiftfs shift --map b:0:100000:65536: %.3f s (median)\n' "$s"
printf 'chown -R 100000:100000:              %.3f s (median)\n' "$c"
printf 'chown -R 100000:100000 + syncfs:     %.3f s (median)\n' "$cs"
awk "BEGIN {printf \"ratio shift/chown: %.2f   (shift/(chown+syncfs), both durable: %.2f)\\n\", $s / $c, $s / $cs}"
