#!/usr/bin/env bash
# What one small-file operation costs the sshfs source: FUSE requests on sshfs's connection and
# SFTP requests sshfs sends, per file, through the plain sshfs mount, shiftfs FUSE and bindfs.
#
#   benches/sshfsreq.sh [--files N] [--base BIN] [SHIFTFS_BIN]     (as root)
#
# Serves a tmpfs through sshfs (`-o sshfs_debug`, which logs every SFTP request it sends) from
# a private sshd on a random port of 127.0.0.1 (its own keys, as benches/run.sh), mounts shiftfs
# FUSE (`--map b:0:100000:65536 -o uring=off,share=off`; --base adds a second shiftfs binary as
# "base") and `bindfs --uid-offset=100000` over that sshfs mount, then, for each contender and
# each phase of benches/smallfiles.py (create+write+close, stat, unlink; N files, warm: the
# phases run once untimed first), run as root of a user namespace mapped 0 100000 65536, counts
# the requests the kernel sends sshfs (the fuse:fuse_request_send tracepoint filtered on sshfs's
# connection, in a tracefs instance of its own), the SFTP requests in sshfs's log, by type, and
# for shiftfs and bindfs the requests their own FUSE connection gets (a second instance).
# Prints per-file counts.
set -euo pipefail
export LC_ALL=C
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
files=500 bin= base=
while [ $# -gt 0 ]; do
  case $1 in
    --files) files=$2; shift ;;
    --base) base=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) bin=$1 ;;
  esac
  shift
done
bin=${bin:-$repo/target/release/shiftfs}
die() { echo "sshfsreq.sh: $*" >&2; exit 1; }
. "$here/private_sshd.sh"
[ "$(id -u)" = 0 ] || die "run as root (it mounts and traces)"
[ -x "$bin" ] || die "no shiftfs binary at $bin (cargo build --release)"
[ -z "$base" ] || [ -x "$base" ] || die "no shiftfs binary at $base"
for p in sshfs bindfs ssh-keygen unshare python3; do
  command -v $p >/dev/null || die "$p is missing (apt-get install sshfs bindfs openssh-client util-linux python3)"
done
[ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd is missing (apt-get install openssh-server)"

tracing=/sys/kernel/tracing
[ -d "$tracing/events/fuse/fuse_request_send" ] || die "no fuse:fuse_request_send tracepoint in $tracing"

work=$(mktemp -d /var/tmp/shiftfs-sshfsreq.XXXXXX)
chmod 755 "$work"
inst=$tracing/instances/shiftfs-sshfsreq-$$
own=$tracing/instances/shiftfs-sshfsreq-own-$$
sshd_pid= sshfs_pid=
cleanup() {
  local i
  for i in "$inst" "$own"; do
    [ ! -d "$i" ] || { echo 0 >"$i/events/fuse/fuse_request_send/enable"; rmdir "$i"; }
  done
  local m
  for m in "$work"/m-*; do
    [ -d "$m" ] || continue
    mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
  done
  mountpoint -q "$work/src" && { umount "$work/src" 2>/dev/null || umount -l "$work/src"; }
  [ -z "$sshfs_pid" ] || wait "$sshfs_pid" 2>/dev/null || true
  [ -z "$sshd_pid" ] || { kill "$sshd_pid" 2>/dev/null; wait "$sshd_pid" 2>/dev/null || true; }
  mountpoint -q "$work/remote" && umount "$work/remote"
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

mkdir "$work/remote" "$work/src"
mount -t tmpfs -o size=1G,mode=755 shiftfs-sshfsreq "$work/remote"
d=$work/ssh
start_private_sshd "$d" || die "no sshd for the sshfs source"
port=$sshd_port
# Foreground (-f) so that sshfs_debug's log goes to a file; the mount is up once it shows.
sshfs -f -o "sshfs_debug,allow_other,port=$port,IdentityFile=$d/root_key,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes" \
  "root@127.0.0.1:$work/remote" "$work/src" 2>"$work/sftp.log" &
sshfs_pid=$!
for ((i = 0; i < 100; i++)); do
  [ "$(findmnt -n -o FSTYPE --mountpoint "$work/src" 2>/dev/null)" = fuse.sshfs ] && break
  sleep 0.1
done
[ "$(findmnt -n -o FSTYPE --mountpoint "$work/src")" = fuse.sshfs ] || die "sshfs did not mount: $(tail -c 300 "$work/sftp.log")"
conn=$(stat -c '%Hd %Ld' "$work/src" | awk '{ print $1 * 1048576 + $2 }')

contenders=(plain shiftfs)
[ -z "$base" ] || contenders+=(base)
contenders+=(bindfs)
declare -A path
for c in "${contenders[@]}"; do
  mkdir "$work/remote/w-$c"
  case $c in
    plain) chown 100000:100000 "$work/remote/w-$c"; path[$c]=$work/src/w-$c ;;
    shiftfs|base)
      b=$bin; [ $c = shiftfs ] || b=$base
      mkdir "$work/m-$c"
      "$b" mount --backend fuse --map b:0:100000:65536 -o uring=off,share=off "$work/src" "$work/m-$c" >/dev/null
      path[$c]=$work/m-$c/w-$c ;;
    bindfs)
      mkdir "$work/m-$c"
      bindfs -o allow_other --uid-offset=100000 --gid-offset=100000 "$work/src" "$work/m-$c"
      path[$c]=$work/m-$c/w-$c ;;
  esac
done

cat >"$work/phase.py" <<'EOF'
import os, sys
d, phase, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
for i in range(n):
    name = f"f{i:06d}"
    if phase == "create":
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        os.write(fd, b"x" * 100)
        os.close(fd)
    elif phase == "stat":
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    else:
        os.unlink(name, dir_fd=dfd)
EOF
NSROOT=(unshare --user --map-users=100000,0,65536 --map-groups=100000,0,65536 --setuid 0 --setgid 0 --)
mkdir "$inst" "$own"
echo 16384 >"$inst/buffer_size_kb"
echo 16384 >"$own/buffer_size_kb"
echo "connection == $conn" >"$inst/events/fuse/fuse_request_send/filter"
# Requests per file, by opcode, in the trace of instance $1: "TOTAL: OP N ...".
per_file() {
  grep -o '(FUSE_[A-Z_0-9]*)' "$1/trace" | tr -d '()' | sed 's/^FUSE_//' | sort | uniq -c \
    | awk -v n="$files" '{ t += $1; s = s sprintf(" %s %.2f", $2, $1 / n) } END { printf "%.2f:%s", t / n, s }'
}

echo "benches/sshfsreq.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), shiftfs $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo ?), $(sshfs --version 2>&1 | awk '/SSHFS version/ { print "sshfs " $3; exit }'), $files files"
echo "per file: FUSE requests sshfs gets (by opcode) | SFTP requests sshfs sends (by type) | requests the contender's own FUSE connection gets; warm"
for c in "${contenders[@]}"; do
  p=${path[$c]}
  owncon=
  [ $c = plain ] || owncon=$(stat -c '%Hd %Ld' "$work/m-$c" | awk '{ print $1 * 1048576 + $2 }')
  echo "connection == ${owncon:-0}" >"$own/events/fuse/fuse_request_send/filter"
  for phase in create stat delete; do "${NSROOT[@]}" python3 "$work/phase.py" "$p" $phase "$files"; done
  for phase in create stat delete; do
    echo >"$inst/trace"
    echo >"$own/trace"
    sync "$work/sftp.log"
    off=$(stat -c %s "$work/sftp.log")
    echo 1 >"$inst/events/fuse/fuse_request_send/enable"
    echo 1 >"$own/events/fuse/fuse_request_send/enable"
    "${NSROOT[@]}" python3 "$work/phase.py" "$p" $phase "$files"
    echo 0 >"$inst/events/fuse/fuse_request_send/enable"
    echo 0 >"$own/events/fuse/fuse_request_send/enable"
    sleep 0.2   # sshfs writes its log after the reply
    fuse=$(per_file "$inst")
    ownreq=-; [ -z "$owncon" ] || ownreq=$(per_file "$own")
    sftp=$(tail -c +"$((off + 1))" "$work/sftp.log" | grep -oE '^\[[0-9]+\] +[A-Z_]+' | awk '{ print $2 }' | sort | uniq -c \
      | awk -v n="$files" '{ t += $1; s = s sprintf(" %s %.2f", $2, $1 / n) } END { printf "%.2f:%s", t / n, s }')
    printf '%-8s %-7s FUSE %s | SFTP %s | own %s\n' "$c" "$phase" "$fuse" "$sftp" "$ownreq"
  done
done
grep -q 'LOST EVENTS' "$inst/trace" "$own/trace" && echo "warning: the trace buffer overflowed; counts are low" >&2
exit 0
