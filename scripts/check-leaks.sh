#!/usr/bin/env bash
# After the test suite: fails if any test left a mount, a shiftfs process, a stale record or a
# test directory behind. Tests keep everything under ${TMPDIR:-/tmp}/shiftfs-tests.
set -uo pipefail
root="${TMPDIR:-/tmp}/shiftfs-tests"
bad=0

# Anything under the tests' roots, and any shiftfs FUSE mount or idmapped mount at all.
mounts="$(awk -v r="$root" 'index($5, r) == 1 || $5 ~ /^\/var\/tmp\/shiftfs-/ || / - fuse\.shiftfs / || $6 ~ /idmapped/ {print $5 " (" $0 ")"}' /proc/self/mountinfo)"
if [ -n "$mounts" ]; then echo "leaked mounts:"; echo "$mounts" | sed 's/^/  /'; bad=1; fi

# Zombies are gone in all but name: their parent (often pid 1) has not reaped them yet.
procs="$(ps -eo pid=,stat=,comm=,args= | awk '$3 == "shiftfs" && $2 !~ /^Z/')"
if [ -n "$procs" ]; then echo "shiftfs processes still running:"; echo "$procs" | sed 's/^/  /'; bad=1; fi

if [ -d /run/shiftfs ]; then
  recs="$(grep -l -s -F "$root" /run/shiftfs/* 2>/dev/null | grep -v '\.log$' || true)"
  if [ -n "$recs" ]; then echo "stale mount records:"; echo "$recs" | sed 's/^/  /'; bad=1; fi
fi

if [ -d "$root" ] && [ -n "$(ls -A "$root")" ]; then
  echo "test directories left in $root:"; ls -A "$root" | sed 's/^/  /'; bad=1
fi

[ $bad = 0 ] && echo "no leaked mounts, processes or test directories"
exit $bad
