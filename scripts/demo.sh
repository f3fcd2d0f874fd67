#!/usr/bin/env bash
# Builds shiftfs and shows a shifted mount on a small image: the same tree seen with its
# on-disk owners and shifted by b:0:100000:65536, written to by the root of a user namespace
# mapped 0 100000 65536, and shared with a second mount of another map; then unmounted.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it mounts)" >&2; exit 1; }
# A fresh Debian has no newuidmap (uidmap) and no subordinate ids for root: install them.
scripts/setup.sh --demo
cargo build --release --quiet
bin=$PWD/target/release/shiftfs

work=$(mktemp -d /var/tmp/shiftfs-demo.XXXXXX)
chmod 755 "$work"   # the container root must be able to reach the mount points
img=$work/image mnt=$work/mnt
cleanup() {
  for m in "$mnt"-fuse "$mnt"-auto; do "$bin" umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$img/etc" "$img/home/user" "$img/bin" "$mnt-fuse" "$mnt-auto"
echo "root:x:0:0::/root:/bin/sh" > "$img/etc/passwd"
printf '#!/bin/sh\necho "hello from the image, running as uid $(id -u)"\n' > "$img/bin/hello"
chmod 755 "$img/bin/hello"
echo "notes" > "$img/home/user/notes.txt"
chown -R 1000:1000 "$img/home/user"
echo "not in the map" > "$img/stray" && chown 70000:70000 "$img/stray"

echo "== the image on disk (canonical ids)"
ls -lnR "$img" | sed 's/^/   /'

echo; echo "== shiftfs mount --backend fuse --map b:0:100000:65536"
"$bin" mount --backend fuse --map b:0:100000:65536 "$img" "$mnt-fuse"
ls -lnR "$mnt-fuse" | sed 's/^/   /'

echo; echo "== root of a user namespace mapped 0 100000 65536 writes through the mount"
unshare --user --map-users=100000,0,65536 --map-groups=100000,0,65536 --setuid 0 --setgid 0 -- sh -c "
  $mnt-fuse/bin/hello
  echo written > $mnt-fuse/home/user/new.txt && chown 1000:1000 $mnt-fuse/home/user/new.txt
  mkdir $mnt-fuse/var && ls -ln $mnt-fuse/home/user $mnt-fuse | sed 's/^/   (inside) /'"
echo "   on disk:"; ls -ln "$img" "$img/home/user" | sed 's/^/   /'

echo; echo "== a second container with another map shares the same image:"
echo "   shiftfs mount --map b:0:200000:65536 (backend auto: the kernel's idmapped mount where it can)"
"$bin" mount --map b:0:200000:65536 "$img" "$mnt-auto"
"$bin" list | sed 's/^/   /'
ls -ln "$mnt-auto" | sed 's/^/   /'

echo; echo "== shiftfs umount"
"$bin" umount "$mnt-fuse" "$mnt-auto"
"$bin" list | sed 's/^/   /'
