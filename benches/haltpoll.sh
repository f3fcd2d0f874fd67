#!/usr/bin/env bash
# How much of the FUSE overhead here is this VM's idle policy: the round-trip-bound
# workloads, run with the guest's idle halt polling as configured and then with the kernel's
# default for KVM guests (cpuidle-haltpoll, guest_halt_poll_ns=200000), side by side.
#
#   benches/haltpoll.sh [run.sh options]    (as root; default: tmpfs and ext4, plain,kernel,fuse,bindfs,
#                                            readall,extract,smallfiles, 3 runs)
#   benches/haltpoll.sh --report            only rewrite the side-by-side table from the last run
#
# It changes /sys/module/haltpoll/parameters/guest_halt_poll_ns for the second run only and
# puts the old value back on exit, also on failure or Ctrl-C. Results: bench-results/haltpoll/
# {as-configured,polling}/ and a side-by-side table in bench-results/haltpoll/README.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
knob=/sys/module/haltpoll/parameters/guest_halt_poll_ns
out=$here/../bench-results/haltpoll
report() {
  {
    echo "# FUSE round trips and the guest's idle policy"
    echo
    cat "$out/command"
    echo "Ratios to the plain directory, medians; first as configured (guest_halt_poll_ns=$old),"
    echo "then with the kernel's default idle polling for KVM guests (200000 ns)."
    for run in as-configured polling; do
      echo
      echo "## $run"
      echo
      # Each backing's heading and its ratio table.
      awk '/^### Source on/ { print "#" $0; print ""; next }
           /^\| workload \| kind/ { t = 1 }
           t && /^$/ { t = 0; print "" }
           t' "$out/$run/results.md"
    done
  } > "$out/README.md"
  cat "$out/README.md"
}

[ "$(id -u)" = 0 ] || { echo "haltpoll.sh: run as root" >&2; exit 1; }
[ -w "$knob" ] || { echo "haltpoll.sh: no cpuidle-haltpoll driver here ($knob); nothing to compare" >&2; exit 1; }
old=$(cat "$knob")
if [ "${1:-}" = --report ]; then report; exit 0; fi
trap 'echo "$old" > "$knob"' EXIT INT TERM
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--backings tmpfs,ext4 --contenders plain,kernel,fuse,bindfs
  --workloads readall,extract,smallfiles --runs 3)

"$here/run.sh" "${args[@]}" --out "$out/as-configured"
echo 200000 > "$knob"
"$here/run.sh" --no-build "${args[@]}" --out "$out/polling"
echo "$old" > "$knob"
echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; kernel $(uname -r); \`benches/haltpoll.sh ${args[*]}\`." \
  > "$out/command"
report
