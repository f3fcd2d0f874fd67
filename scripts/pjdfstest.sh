#!/usr/bin/env bash
# Runs the POSIX suite pjdfstest on a directory (typically a shifted mount), as root or as root
# of a user namespace, and optionally compares it case by case with a plain directory.
#
#   scripts/pjdfstest.sh [--userns "0 100000 65536"] [--baseline PLAIN_DIR] DIR [PATTERN...]
#
# --userns MAP       run as uid/gid 0 of a new user namespace whose uid_map and gid_map are MAP
#                    (the namespace keeps the host's mount namespace, so it sees DIR's mount)
# --baseline PLAIN   also run on PLAIN (same caller) and list the cases that pass there but not
#                    on DIR; exit 1 if there are any
# PATTERN            only cases whose name contains PATTERN (pjdfstest's filter)
#
# Installs pjdfstest (cargo install --locked) and creates the `tests` user and group if they
# are missing. Logs go to a temporary directory that is printed at the end. As root.
# Give DIR and PLAIN paths of the same length: pjdfstest's *::enametoolong_path cases fail
# ("capacity overflow") for some base path lengths.
set -euo pipefail

userns=""
baseline=""
while [ $# -gt 0 ]; do
  case "$1" in
    --userns) userns="$2"; shift 2 ;;
    --baseline) baseline="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "pjdfstest.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--userns MAP] [--baseline PLAIN_DIR] DIR [PATTERN...]" >&2; exit 2; }
dir="$1"; shift
[ "$(id -u)" = 0 ] || { echo "pjdfstest.sh: run as root" >&2; exit 1; }

if ! command -v pjdfstest >/dev/null && [ ! -x "$HOME/.cargo/bin/pjdfstest" ]; then
  echo "installing pjdfstest (cargo install --locked pjdfstest, about a minute)" >&2
  cargo install --locked --quiet pjdfstest
fi
pjd="$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")"
getent group tests >/dev/null || groupadd tests
getent passwd tests >/dev/null || useradd -M -g tests -s /usr/sbin/nologin tests

# A work dir any uid can read: a namespace root cannot reach ~/.cargo/bin.
work="$(mktemp -d /tmp/pjdfstest.XXXXXX)"
chmod 755 "$work"
cp "$pjd" "$work/pjdfstest"
cp "$(dirname "$0")/../tests/pjdfstest.toml" "$work/cfg.toml"

holder=""
cleanup() { [ -n "$holder" ] && kill "$holder" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
if [ -n "$userns" ]; then
  unshare --user -- sleep 86400 &
  holder=$!
  for _ in $(seq 500); do
    [ "$(readlink /proc/$holder/ns/user)" != "$(readlink /proc/self/ns/user)" ] && break
    sleep 0.01
  done
  echo "$userns" > /proc/$holder/uid_map
  echo "$userns" > /proc/$holder/gid_map
fi

# run_suite DIR LOG [PATTERN...]: the per-case lines of one run go to LOG.
run_suite() {
  local target log
  target="$(realpath "$1")"; log="$2"; shift 2
  local -a wrap=()
  [ -n "$holder" ] && wrap=(nsenter --user --target="$holder" --setuid=0 --setgid=0 --)
  (cd "$work" && NO_COLOR=1 "${wrap[@]}" ./pjdfstest -c cfg.toml -p "$target" "$@") > "$log" 2>&1 || true
  grep '^Summary:' "$log" || { echo "pjdfstest did not finish on $target; see $log" >&2; return 1; }
}

# cases LOG OUTCOME: names of the cases with that outcome.
cases() { grep -E "^[^[:space:]]+ +$2\$" "$1" | awk '{print $1}' | sort; }

echo "== $dir"
run_suite "$dir" "$work/mount.log" "$@"
grep -E ' FAILED$' "$work/mount.log" | awk '{print "  FAILED " $1}' || true

status=0
if [ -n "$baseline" ]; then
  echo "== baseline $baseline"
  run_suite "$baseline" "$work/baseline.log" "$@"
  lost="$(comm -23 <(cases "$work/baseline.log" ok) <(cases "$work/mount.log" ok))"
  if [ -n "$lost" ]; then
    echo "== pass on $baseline but not on $dir:"
    echo "$lost" | sed 's/^/  /'
    status=1
  else
    echo "== every case that passes on $baseline passes on $dir"
  fi
fi
echo "logs: $work"
exit $status
