#!/usr/bin/env bash
# After the test suite: fails if any test left a mount, a shiftfs process, a stale record or a
# test directory behind. Tests keep everything under ${TMPDIR:-/tmp}/shiftfs-tests.
set -uo pipefail
root="${TMPDIR:-/tmp}/shiftfs-tests"
bad=0

mounts="$(awk -v r="$root" 'index($5, r) == 1 {print $5 " (" $0 ")"}' /proc/self/mountinfo)"
if [ -n "$mounts" ]; then echo "leaked mounts:"; echo "$mounts" | sed 's/^/  /'; bad=1; fi

procs="$(pgrep -a -x shiftfs || true)"
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
