#!/usr/bin/env bash
# Builds (once) a Debian bookworm minbase root file system for tests and benchmarks and
# prints its path. Concurrent callers wait for the first one (flock).
set -euo pipefail
dir=${SHIFTFS_MINBASE:-/var/cache/shiftfs-test/minbase}
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [ ! -e "$dir/.complete" ]; then
  rm -rf "$dir.partial"
  debootstrap --variant=minbase bookworm "$dir.partial" http://deb.debian.org/debian >&2
  touch "$dir.partial/.complete"
  rm -rf "$dir"
  mv "$dir.partial" "$dir"
fi
echo "$dir"
