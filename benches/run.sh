#!/usr/bin/env bash
# Side-by-side benchmark of shifting mounts (issue 5). One command, as root:
#
#   benches/run.sh            full run (~20 min on 2 cores), results in bench-results/
#   benches/run.sh --quick    smoke test (~2 min: small sizes, 1 timed run), bench-results/tmp/quick/
#   benches/run.sh --scale    1,000,000-entry tree walked twice through shiftfs FUSE, daemon peak RSS
#   benches/run.sh --profile W  perf profile of the shiftfs FUSE daemon during workload W, and a count
#                             of the FUSE requests it got, by opcode
#                             (tmpfs; perf report in bench-results/tmp/profile/)
#
# Contenders, each over the same source tree (on-disk 0 shown as host 100000 where the tool can):
#   plain    the source directory itself (the baseline of every ratio)
#   kernel   kernel idmapped mount: `shiftfs mount --backend kernel` (falls back to
#            benches/idmap_mount.py, the same syscalls, while that backend is unavailable)
#   fuse     `shiftfs mount --backend fuse --map b:0:100000:65536 -o uring=off,share=off` (classic /dev/fuse)
#   fuse-uring the same with `-o uring=on,share=off`: FUSE over io_uring, one ring per possible CPU; the run
#            sets fuse.enable_uring=1 while it is among the contenders and puts back what it found
#   bindfs   `bindfs --uid-offset=100000 --gid-offset=100000` (+ allow_other)
#   overlay  `fuse-overlayfs -o uidmapping=0:100000:65536,gidmapping=0:100000:65536` (+ allow_other)
#   fuse-base the FUSE backend of another shiftfs binary, $SHIFTFS_BASE_BIN (an earlier commit's
#            release build), to measure a change side by side; not in the default set
# on up to three backings: a tmpfs (the filesystem layer alone), ext4 (/var/tmp here) and sshfs
# (--backings sshfs: a network filesystem, the case the FUSE backend exists for; this kernel has
# no NFS client). The sshfs backing serves a tmpfs through sshfs from a private sshd on a random
# port of 127.0.0.1 (its own host key, root's login by a key made here, none of the system's ssh
# configuration, killed at exit); there "plain" is the sshfs mount itself and the kernel idmapped
# mount is not a contender (a FUSE server that does not opt in cannot be idmapped).
#
# Pinned variants (--workloads readall_pinned,extract_pinned,smallfiles_pinned): the round-trip
# bound workloads with the caller pinned to CPU 0 (taskset), next to the same workloads with the
# caller free; metrics get the suffix _pinned.
#
# "Warm": every workload runs once untimed on every contender (filling the page cache, the
# dentry/inode caches and the FUSE daemons' caches), then RUNS timed runs (5; extract, seq
# write and small files at most 3), interleaved round-robin across contenders so background
# load hits them alike; the median is reported.
# Caches are never dropped. Reads run as host root; writes (seq write, extract, small files)
# run as root of a user namespace mapped 0 100000 65536, as a container would (host root
# has no id inside the map, so shifted mounts refuse its creates with EOVERFLOW).
#
# Options: --quick, --scale, --runs N, --backings tmpfs,ext4, --contenders plain,kernel,...,
#          --workloads walk,readall,..., --out DIR, --no-build, --keep (leave the work dir).
# Env: SHIFTFS_BIN (use this binary, skip the build), SHIFTFS_BASE_BIN (for fuse-base),
#      BENCH_WORKDIR (default /var/tmp),
#      SHIFTFS_FUSE_OPTS (extra -o for the shiftfs FUSE mount, e.g. attr_timeout=60).
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

quick=0 scale=0 runs= build=1 keep=0 out= profile=
backings=tmpfs,ext4
contenders=plain,kernel,fuse,fuse-uring,bindfs,overlay
workloads=walk,readall,seqread,randread,seqwrite,extract,smallfiles
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --scale) scale=1 ;;
    --profile) profile=$2; shift ;;
    --runs) runs=$2; shift ;;
    --backings) backings=$2; shift ;;
    --contenders) contenders=$2; shift ;;
    --workloads) workloads=$2; shift ;;
    --out) out=$2; shift ;;
    --no-build) build=0 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ $quick = 1 ]; then
  : "${runs:=1}"; big_mib=128; walk_loops=2; rr_secs=1; small_n=2000; scale_dirs=100
else
  : "${runs:=5}"; big_mib=1024; walk_loops=5; rr_secs=3; small_n=10000; scale_dirs=1000
fi
scale_files=1000
if [ -n "$profile" ]; then
  workloads=$profile
  [ "$backings" = tmpfs,ext4 ] && backings=tmpfs
  [ "$contenders" = plain,kernel,fuse,fuse-uring,bindfs,overlay ] && contenders=plain,kernel,fuse
  : "${out:=$repo/bench-results/tmp/profile}"
  command -v perf >/dev/null || need_perf=1
fi
if [ -z "$out" ]; then
  if [ $quick = 1 ]; then out=$repo/bench-results/tmp/quick; else out=$repo/bench-results; fi
fi

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the benchmark mounts)"

# ---------------------------------------------------------------- prerequisites
need_pkgs=()
for p in bindfs:bindfs fuse-overlayfs:fuse-overlayfs fio:fio unshare:util-linux \
         python3:python3 find:findutils tar:tar taskset:util-linux; do
  command -v "${p%%:*}" >/dev/null || need_pkgs+=("${p#*:}")
done
[ -x /usr/bin/python3 ] || need_pkgs+=(python3)
[ -z "${need_perf:-}" ] || need_pkgs+=(linux-perf)
if [[ ,$backings, == *,sshfs,* ]]; then
  for p in sshfs:sshfs ssh-keygen:openssh-client; do
    command -v "${p%%:*}" >/dev/null || need_pkgs+=("${p#*:}")
  done
  [ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]} (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
[ -e /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse)"
for f in /etc/subuid /etc/subgid; do
  grep -q '^root:100000:65536$' "$f" 2>/dev/null || echo 'root:100000:65536' >> "$f"
done
# The chart: matplotlib from PyPI for the python3 on PATH, else Debian's for /usr/bin/python3.
pyplot=python3
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib"
  if ! python3 -m pip install --quiet matplotlib >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib >/dev/null \
      && pyplot=/usr/bin/python3 || log "no matplotlib: results without the PNG chart"
  fi
fi

if [ -n "${SHIFTFS_BIN:-}" ]; then
  shiftfs=$SHIFTFS_BIN
else
  shiftfs=$repo/target/release/shiftfs
  if [ $build = 1 ]; then
    log "cargo build --release"
    (cd "$repo" && cargo build --release --quiet)
  fi
fi
[ -x "$shiftfs" ] || die "no shiftfs binary at $shiftfs (build it, or set SHIFTFS_BIN)"

minbase=$("$repo/scripts/minbase.sh")
[ -d "$minbase/usr" ] || die "scripts/minbase.sh gave no root file system ($minbase)"

# ---------------------------------------------------------------- work dir and cleanup
work=$(mktemp -d "${BENCH_WORKDIR:-/var/tmp}/shiftfs-bench.XXXXXX")
chmod 755 "$work"   # the namespace root (host 100000) must reach the mounts below
mounts=()           # "KIND PATH", unmounted in reverse order on exit

uring_param=/sys/module/fuse/parameters/enable_uring uring_found=
sshd_pid=
cleanup() {
  local rc=$? i kind path bin
  trap - EXIT INT TERM
  [ -z "$uring_found" ] || echo "$uring_found" >"$uring_param" || log "cannot restore $uring_param to $uring_found"
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    kind=${mounts[i]%% *} path=${mounts[i]#* }
    if [ "$kind" = shiftfs ] || [ "$kind" = shiftfs-base ]; then
      bin=$shiftfs; [ "$kind" = shiftfs ] || bin=$SHIFTFS_BASE_BIN
      "$bin" umount "$path" 2>/dev/null || "$bin" umount --lazy "$path" 2>/dev/null \
        || umount -l "$path" 2>/dev/null || true
    else
      umount "$path" 2>/dev/null || umount -l "$path" 2>/dev/null || true
    fi
  done
  # After the sshfs mounts are gone: only the sshd this run started, by its pid.
  [ -z "$sshd_pid" ] || { kill "$sshd_pid" 2>/dev/null; wait "$sshd_pid" 2>/dev/null || true; }
  # Never rm -rf through a mount that is still there: it would delete the source.
  if grep -q " ${work}[/ ]" /proc/self/mountinfo; then
    log "mounts left under $work; not removing it:"; grep " ${work}[/ ]" /proc/self/mountinfo >&2 || true
  elif [ $keep = 0 ]; then
    rm -rf --one-file-system "$work"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM
if [[ ,$contenders, == *,fuse-uring,* ]]; then
  if [ -w "$uring_param" ]; then
    uring_found=$(cat "$uring_param")
    echo 1 >"$uring_param"
  else
    log "fuse-uring: $uring_param is not writable (kernel < 6.14 or no CONFIG_FUSE_IO_URING); its mounts will fail"
  fi
fi

# Forgets a mount that was unmounted on purpose before exit.
forget_mount() {
  local i
  for i in "${!mounts[@]}"; do [ "${mounts[i]#* }" = "$1" ] && unset 'mounts[i]'; done
  mounts=("${mounts[@]}")
}

warming=0
PIN=()   # taskset -c 0 while a pinned variant runs
NSROOT=(unshare --user --map-users=100000,0,65536 --map-groups=100000,0,65536 --setuid 0 --setgid 0 --)
now() { echo "$EPOCHREALTIME"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", a - b }'; }

# ---------------------------------------------------------------- mounting contenders
declare -A notes=()
# mount_contender BACKING_BASE CONTENDER: sets $mpath, the path the workloads use. Not in a
# subshell: it records the mount for cleanup.
mount_contender() {
  local base=$1 c=$2 mnt=$1/mnt-$2 err
  mpath=
  if [ "$c" = plain ]; then mpath=$base/src; return 0; fi
  mkdir -p "$mnt"
  err=$work/mount-$c.err
  case $c in
    kernel)
      if "$shiftfs" mount --backend kernel --map b:0:100000:65536 "$base/src" "$mnt" >/dev/null 2>"$err"; then
        mounts+=("shiftfs $mnt"); notes[kernel]="shiftfs mount --backend kernel"
      else
        log "kernel: shiftfs mount --backend kernel failed ($(tr '\n' ' ' <"$err")); using benches/idmap_mount.py"
        /usr/bin/python3 "$here/idmap_mount.py" 0 100000 65536 "$base/src" "$mnt" 2>"$err" || return 1
        mounts+=("umount $mnt"); notes[kernel]="benches/idmap_mount.py (shiftfs kernel backend unavailable)"
      fi ;;
    fuse|fuse-uring)
      local uring=off extra=; [ "$c" = fuse ] || uring=on
      # share=off: a daemon per contender, as before mounts of one source shared one (and a
      # uring=on mount cannot join a daemon serving /dev/fuse: ENOSYS setting up its rings).
      "$shiftfs" mount --backend fuse --map b:0:100000:65536 -o uring=$uring,share=off ${extra:+-o $extra} \
        ${SHIFTFS_FUSE_OPTS:+-o "$SHIFTFS_FUSE_OPTS"} "$base/src" "$mnt" >/dev/null 2>"$err" || return 1
      mounts+=("shiftfs $mnt")
      [ -z "${SHIFTFS_FUSE_OPTS:-}" ] || notes[fuse_options]="-o $SHIFTFS_FUSE_OPTS" ;;
    fuse-base)
      [ -x "${SHIFTFS_BASE_BIN:-}" ] || { echo "fuse-base needs SHIFTFS_BASE_BIN, a shiftfs binary" >"$err"; return 1; }
      "$SHIFTFS_BASE_BIN" mount --backend fuse --map b:0:100000:65536 "$base/src" "$mnt" >/dev/null 2>"$err" || return 1
      mounts+=("shiftfs-base $mnt") ;;
    bindfs)
      bindfs -o allow_other --uid-offset=100000 --gid-offset=100000 "$base/src" "$mnt" 2>"$err" || return 1
      mounts+=("umount $mnt") ;;
    overlay)
      mkdir -p "$base/ovl-upper" "$base/ovl-work"
      fuse-overlayfs -o "allow_other,lowerdir=$base/src,upperdir=$base/ovl-upper,workdir=$base/ovl-work,uidmapping=0:100000:65536,gidmapping=0:100000:65536" \
        "$mnt" 2>"$err" || return 1
      mounts+=("umount $mnt") ;;
    *) echo "unknown contender $c" >"$err"; return 1 ;;
  esac
  # A contender that does not shift as promised would make every number meaningless.
  local owner
  owner=$(stat -c %u:%g "$mnt/rootfs" 2>>"$err") || return 1
  [ "$owner" = 100000:100000 ] || { echo "rootfs shows owner $owner, want 100000:100000" >>"$err"; return 1; }
  mpath=$mnt
}

unmount_contender() {
  local mnt=$1/mnt-$2
  [ "$2" = plain ] && return 0
  local i kind
  for i in "${!mounts[@]}"; do
    [ "${mounts[i]#* }" = "$mnt" ] || continue
    kind=${mounts[i]%% *}
    case $kind in
      shiftfs) "$shiftfs" umount "$mnt" ;;
      shiftfs-base) "$SHIFTFS_BASE_BIN" umount "$mnt" ;;
      *) umount "$mnt" ;;
    esac
    forget_mount "$mnt"
    return 0
  done
}

# Pid of the shiftfs FUSE daemon serving MNT, from its record (what `shiftfs list` shows).
daemon_pid() {
  "$shiftfs" list 2>/dev/null \
    | awk -v t="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "PID") c = i } $1 == t && $NF == "active" { print $c }' | head -1
}

# ---------------------------------------------------------------- workloads
# Each prints one or more "METRIC VALUE" lines, or fails. $1 = path of the contender's
# view of the source, $2 = its scratch dir (writable by the namespace root).
fio_common=(--ioengine=psync --invalidate=0 --fallocate=none --output-format=terse --terse-version=3)

w_walk() {
  local t0 t1 i
  t0=$(now)
  for ((i = 0; i < walk_loops; i++)); do find "$1/rootfs" -printf '%U %G %m %s\n' >/dev/null; done
  t1=$(now)
  echo "walk $(awk -v d="$(sub "$t1" "$t0")" -v n=$walk_loops 'BEGIN { printf "%.6f", d / n }')"
}
w_readall() {
  local t0 t1
  # Through a pipe: GNU tar skips reading file data when its archive is /dev/null.
  t0=$(now); "${PIN[@]}" tar -cf - -C "$1/rootfs" . | "${PIN[@]}" cat >/dev/null; t1=$(now)
  echo "readall $(sub "$t1" "$t0")"
}
w_seqread() {
  local r
  r=$(fio --name=seqread --filename="$1/big.dat" --rw=read --bs=1M --size=${big_mib}M "${fio_common[@]}")
  echo "seqread $(echo "$r" | awk -F';' '{ printf "%.1f", $7 / 1024 }')"
}
w_randread() {
  local r
  # The warm-up is short: the sequential read before it has already cached the file.
  r=$(fio --name=randread --filename="$1/big.dat" --rw=randread --bs=4k --size=${big_mib}M \
        --time_based --runtime=$([ "$warming" = 1 ] && echo 1 || echo $rr_secs) --norandommap "${fio_common[@]}")
  echo "randread $(echo "$r" | awk -F';' '{ print $8 }')"
}
w_seqwrite() {
  local r
  "${NSROOT[@]}" rm -f "$2/seq.dat"
  r=$("${NSROOT[@]}" fio --name=seqwrite --filename="$2/seq.dat" --rw=write --bs=1M --size=${big_mib}M \
        "${fio_common[@]}")
  "${NSROOT[@]}" rm -f "$2/seq.dat"
  echo "seqwrite $(echo "$r" | awk -F';' '{ printf "%.1f", $48 / 1024 }')"
}
w_extract() {
  local t0 t1
  "${NSROOT[@]}" rm -rf "$2/x"
  t0=$(now)
  "${PIN[@]}" "${NSROOT[@]}" sh -c 'mkdir "$1" && tar -xf "$2" -C "$1"' sh "$2/x" "$work/rootfs.tar"
  t1=$(now)
  "${NSROOT[@]}" rm -rf "$2/x"
  echo "extract $(sub "$t1" "$t0")"
}
w_smallfiles() {
  local r
  "${NSROOT[@]}" rm -rf "$2/sf"
  r=$("${PIN[@]}" "${NSROOT[@]}" sh -c 'mkdir "$1" && /usr/bin/python3 "$2" "$1" "$3"' sh "$2/sf" "$work/smallfiles.py" $small_n)
  "${NSROOT[@]}" rm -rf "$2/sf"
  echo "$r" | awk '{ printf "small_create %s\nsmall_stat %s\nsmall_delete %s\nsmall_total %.6f\n", $2, $4, $6, $2 + $4 + $6 }'
}

# The round-trip-bound workloads again with the caller on CPU 0: FUSE over io_uring then
# always finds its request on the ring of that CPU, and the classic daemon's threads may or
# may not be there.
pinned() {
  local w=$1 res
  shift
  PIN=(taskset -c 0)
  res=$("w_$w" "$@") || { PIN=(); return 1; }
  PIN=()
  awk '{ $1 = $1 "_pinned"; print }' <<<"$res"
}
w_readall_pinned() { pinned readall "$@"; }
w_extract_pinned() { pinned extract "$@"; }
w_smallfiles_pinned() { pinned smallfiles "$@"; }

# The private sshd for the sshfs backing, started once (benches/private_sshd.sh).
. "$here/private_sshd.sh"
sshd_port=
start_sshd() {
  [ -z "$sshd_pid" ] || return 0
  start_private_sshd "$work/ssh" || die "no sshd for the sshfs backing"
}

# ---------------------------------------------------------------- scale mode
run_scale() {
  local dirs=$scale_dirs files=$scale_files base=$work/scale mnt pid want
  mkdir -p "$base/src" "$out"
  mount -t tmpfs -o size=8G,nr_inodes=4M,mode=755 shiftfs-bench-scale "$base/src"
  mounts+=("umount $base/src")
  log "scale: making $dirs dirs x $files empty files on tmpfs"
  /usr/bin/python3 - "$base/src" "$dirs" "$files" <<'EOF'
import os, sys
root, dirs, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for d in range(dirs):
    dp = os.path.join(root, f"d{d:04d}")
    os.mkdir(dp)
    dfd = os.open(dp, os.O_RDONLY | os.O_DIRECTORY)
    for f in range(files):
        os.close(os.open(f"f{f:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd))
    os.close(dfd)
EOF
  want=$((dirs * files + dirs + 1))
  mnt=$base/mnt && mkdir -p "$mnt"
  "$shiftfs" mount --backend fuse --map b:0:100000:65536 "$base/src" "$mnt" >/dev/null
  mounts+=("shiftfs $mnt")
  pid=$(daemon_pid "$mnt")
  [ -n "$pid" ] || die "scale: no daemon pid for $mnt in shiftfs list"
  local report=$out/scale.md tmp=$work/scale.out
  {
    echo "# shiftfs FUSE: walk of a $want-entry tree"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), $(nproc) cores; tree: $dirs dirs x $files empty files on tmpfs,"
    echo "mounted with \`shiftfs mount --backend fuse --map b:0:100000:65536\`; each walk is"
    echo "\`find MNT -printf '%U %G %m %s\\n'\` (counts lines, checks exit status, stderr and the shifted owner)."
    echo
    echo "| walk | entries seen | errors | owners not 100000 | seconds | daemon VmHWM (peak RSS) | daemon VmRSS | daemon open fds (limit) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  } >"$report"
  local ok=1 i t0 t1 n errs bad hwm rss fds lim
  for i in 1 2; do
    t0=$(now)
    set +e
    find "$mnt" -printf '%U %G %m %s\n' >"$tmp" 2>"$work/scale.err"
    local rc=$?
    set -e
    t1=$(now)
    n=$(wc -l <"$tmp")
    bad=$(awk '$1 != 100000' "$tmp" | wc -l)
    errs=$(wc -l <"$work/scale.err")
    [ $rc = 0 ] || errs="$errs (exit $rc)"
    hwm=$(awk '/^VmHWM/ { print $2 " " $3 }' "/proc/$pid/status")
    lim=$(awk '/^Max open files/ { print $4 }' "/proc/$pid/limits")
    rss=$(awk '/^VmRSS/ { print $2 " " $3 }' "/proc/$pid/status")
    fds=$(ls "/proc/$pid/fd" | wc -l)
    log "scale walk $i: $n entries (want $want), $errs errors, $(sub "$t1" "$t0") s, VmHWM $hwm, fds $fds"
    if [ "$n" != "$want" ] || [ "$errs" != 0 ] || [ "$bad" != 0 ]; then
      ok=0; sort "$work/scale.err" | awk -F': ' '{ print $NF }' | uniq -c | head -5 >&2
    fi
    echo "| $i | $n | $errs | $bad | $(sub "$t1" "$t0") | $hwm | $rss | $fds ($lim) |" >>"$report"
  done
  t0=$(now); find "$base/src" -printf '%U %G %m %s\n' >/dev/null; t1=$(now)
  {
    echo
    echo "Same walk on the plain tmpfs directory: $(sub "$t1" "$t0") s. Expected entries: $want."
    if [ $ok = 1 ]; then echo "Result: PASS (both walks complete, no errors, every owner shifted)."
    else echo "Result: FAIL (see the table)."; fi
  } >>"$report"
  "$shiftfs" umount "$mnt" && forget_mount "$mnt"
  cat "$report"
  [ $ok = 1 ]
}

if [ $scale = 1 ]; then
  run_scale
  exit
fi

# ---------------------------------------------------------------- the benchmark
mkdir -p "$out"
raw=$out/raw.tsv
: >"$raw"
log "work dir $work; results to $out; runs=$runs big file ${big_mib} MiB"
# The machine is shared: the load before and after goes into env.txt.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# The rootfs tarball for the extract workload: ids as on disk (0...), no device nodes
# (a namespace root may not create them).
# Quick mode extracts a part (etc, usr/bin, var: ~1/4 of the entries).
tar_what=(.)
[ $quick = 1 ] && tar_what=(./etc ./usr/bin ./var)
tar -cf "$work/rootfs.tar" --numeric-owner --exclude=./dev -C "$minbase" "${tar_what[@]}"
# The namespace root (host 100000) runs these; the repository may not be readable to it.
install -m 644 "$here/smallfiles.py" "$work/smallfiles.py"
chmod 644 "$work/rootfs.tar"

IFS=, read -r -a B <<<"$backings"
IFS=, read -r -a C <<<"$contenders"
IFS=, read -r -a W <<<"$workloads"

for b in "${B[@]}"; do
  base=$work/$b
  mkdir -p "$base"
  case $b in
    tmpfs) mount -t tmpfs -o size=12G,mode=755 shiftfs-bench "$base"; mounts+=("umount $base") ;;
    ext4) fs=$(stat -f -c %T "$work"); [ "$fs" = ext2/ext3 ] || die "$work is on $fs, not ext4 (set BENCH_WORKDIR)" ;;
    sshfs)
      # The served tree lives on a tmpfs, filled on the server's side.
      mkdir -p "$base/remote"
      mount -t tmpfs -o size=12G,mode=755 shiftfs-bench-remote "$base/remote"; mounts+=("umount $base/remote") ;;
    *) die "unknown backing $b" ;;
  esac
  fill=$base/src
  [ "$b" = sshfs ] && fill=$base/remote
  log "$b: copying the minbase root file system and writing a ${big_mib} MiB file"
  mkdir -p "$fill"
  cp -a "$minbase" "$fill/rootfs"
  head -c ${big_mib}M /dev/urandom >"$fill/big.dat"
  for c in "${C[@]}"; do
    mkdir -p "$fill/w-$c"
    # The plain directory is written by the namespace root as itself (host 100000).
    [ "$c" = plain ] && chown 100000:100000 "$fill/w-$c"
  done
  sync
  if [ "$b" = sshfs ]; then
    start_sshd
    mkdir -p "$base/src"
    # allow_other: the namespace root (host 100000) writes through the plain sshfs mount too.
    sshfs -o "allow_other,port=$sshd_port,IdentityFile=$work/ssh/root_key,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes" \
      "root@127.0.0.1:$base/remote" "$base/src"
    mounts+=("umount $base/src")
    [ "$(findmnt -n -o FSTYPE --mountpoint "$base/src")" = fuse.sshfs ] \
      || die "sshfs: $base/src is not an sshfs mount"
    notes[sshfs]="sshfs $(sshfs --version 2>&1 | awk '/SSHFS version/ { print $3; exit }') to a private sshd on 127.0.0.1 ($(/usr/sbin/sshd -V 2>&1 | head -1 | cut -d, -f1)) serving a tmpfs, default options + allow_other"
  fi

  declare -A path=()
  active=()
  for c in "${C[@]}"; do
    if mount_contender "$base" "$c"; then
      path[$c]=$mpath; active+=("$c")
    else
      log "$b/$c: mount failed, skipped: $(tr '\n' ' ' <"$work/mount-$c.err")"
      notes[$c]="mount failed: $(head -c 200 "$work/mount-$c.err" | tr '\n|' '  ')"
    fi
  done

  for w in "${W[@]}"; do
    declare -F "w_$w" >/dev/null || die "unknown workload $w"
    declare -A dead=()
    warming=1
    for c in "${active[@]}"; do   # warm-up, untimed
      "w_$w" "${path[$c]}" "${path[$c]}/w-$c" >/dev/null 2>"$work/err" \
        || { dead[$c]=1; log "$b/$w/$c: warm-up failed: $(head -c 300 "$work/err" | tr '\n' ' ')"; }
    done
    warming=0
    perf_pid=
    if [ -n "$profile" ] && [ -n "${path[fuse]:-}" ] && [ -z "${dead[fuse]:-}" ]; then
      # DWARF call graphs: release builds keep debug info but no frame pointers.
      perf record -F 999 --call-graph dwarf,16384 -o "$out/perf-$b-$w.data" -p "$(daemon_pid "${path[fuse]}")" \
        >/dev/null 2>"$work/perf.err" &
      perf_pid=$!
      # And every request the kernel sends this mount's daemon, by opcode.
      perf record -e fuse:fuse_request_send -a --filter "connection == $(stat -c %d "${path[fuse]}")" \
        -o "$out/fusereq-$b-$w.data" >/dev/null 2>>"$work/perf.err" &
      perf_req_pid=$!
      sleep 1
    fi
    # The slowest contenders of the write workloads (bindfs writes at ~40 MiB/s here;
    # extraction and small files through bindfs and fuse-overlayfs) stop after 3 timed runs,
    # keeping a full run near 20 minutes; the others get all of theirs.
    nruns=$runs slow=
    case $w in
      seqwrite) slow=" bindfs " ;;
      extract|smallfiles|extract_pinned|smallfiles_pinned) slow=" bindfs overlay " ;;
    esac
    for ((r = 1; r <= nruns; r++)); do
      # Each round starts at another contender, so none always runs right after the
      # heaviest writer (ext4 writeback of the previous run's data lands on the next one).
      n=${#active[@]} order=()
      for ((i = 0; i < n; i++)); do order+=("${active[(i + r - 1) % n]}"); done
      for c in "${order[@]}"; do
        [ -z "${dead[$c]:-}" ] || continue
        [ "$r" -gt 3 ] && [[ $slow == *" $c "* ]] && continue
        if res=$("w_$w" "${path[$c]}" "${path[$c]}/w-$c" 2>"$work/err"); then
          while read -r metric value; do
            printf '%s\t%s\t%s\t%s\t%s\n' "$b" "$metric" "$c" "$r" "$value" >>"$raw"
          done <<<"$res"
        else
          dead[$c]=1; log "$b/$w/$c: run $r failed: $(head -c 300 "$work/err" | tr '\n' ' ')"
        fi
      done
    done
    if [ -n "$perf_pid" ]; then
      kill -INT "$perf_pid" "$perf_req_pid"; wait "$perf_pid" "$perf_req_pid" || true
      perf script -i "$out/fusereq-$b-$w.data" -F trace 2>/dev/null \
        | grep -o '(FUSE_[A-Z_0-9]*)' | tr -d '()' | sort | uniq -c | sort -rn \
        | awk -v n="$nruns" 'BEGIN { print "FUSE requests to the shiftfs daemon during the timed runs (" n " runs)\n\n  total  per run  opcode" }
                             { printf "%7d %8.0f  %s\n", $1, $1 / n, $2 }' >"$out/fusereq-$b-$w.txt"
      perf report -i "$out/perf-$b-$w.data" --no-children --stdio --sort sym --percent-limit 0.5 -g none \
        >"$out/profile-$b-$w.txt" 2>/dev/null || true
      perf report -i "$out/perf-$b-$w.data" --no-children --stdio --percent-limit 2 -g caller,0.5,callee,function \
        >"$out/profile-$b-$w-callgraph.txt" 2>/dev/null || true
      log "$b: $w: profile of the shiftfs FUSE daemon in $out/profile-$b-$w.txt"
    fi
    log "$b: $w done"
    unset dead
  done

  if [ -n "${path[fuse]:-}" ] && pid=$(daemon_pid "${path[fuse]}") && [ -r "/proc/${pid:-none}/status" ]; then
    notes[fuse_hwm_$b]=$(awk '/^VmHWM/ { print $2 " " $3 }' "/proc/$pid/status")
  fi
  for c in "${active[@]}"; do unmount_contender "$base" "$c"; done
  unset path
  # FUSE daemons close their fds on the source a moment after their unmount returns.
  for m in $([ "$b" = tmpfs ] && echo "$base"; [ "$b" = sshfs ] && echo "$base/src $base/remote"); do
    for ((i = 0; i < 50; i++)); do umount "$m" 2>/dev/null && break; sleep 0.2; done
    [ $i -lt 50 ] || umount -l "$m"
    forget_mount "$m"
  done
  rm -rf --one-file-system "$base"
done

{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "load=1/5/15-minute load average $load_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
  echo "mode=$([ $quick = 1 ] && echo quick || echo full) runs=$runs big_file_mib=$big_mib walk_loops=$walk_loops randread_secs=$rr_secs small_files=$small_n"
  # Idle vCPUs that halt at once make every FUSE round trip dearer (see benches/haltpoll.sh).
  idle=$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)
  [ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ] &&
    idle="$idle, guest_halt_poll_ns=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)"
  echo "machine=$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r), cpuidle $idle"
  echo "versions=shiftfs $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo ?), $(bindfs --version 2>&1 | head -1), fuse-overlayfs $(fuse-overlayfs --version 2>&1 | awk '/^fuse-overlayfs: version/ { print $NF; exit }'), $(fio --version)"
  echo "rootfs=Debian bookworm minbase, $(find "$minbase" | wc -l) entries, $(du -sm "$minbase" | cut -f1) MiB"
  for k in "${!notes[@]}"; do echo "note_$k=${notes[$k]}"; done
} >"$out/env.txt"

"$pyplot" "$here/report.py" "$raw" "$out/env.txt" "$out"
