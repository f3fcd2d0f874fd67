#!/usr/bin/env bash
# Installs what shiftfs' tests and benchmarks need on a Debian 12 machine, as root. Idempotent.
# `setup.sh --demo` installs only what scripts/demo.sh needs (newuidmap and root's subordinate ids).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
demo=false
[ "${1:-}" = --demo ] && demo=true

if $demo; then
  pkgs=(uidmap util-linux)
else
  pkgs=(acl attr libcap2-bin uidmap fuse3 bindfs fuse-overlayfs fio debootstrap util-linux gcc python3 e2fsprogs systemd sshfs openssh-server runc crun podman busybox-static strace bc)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Namespace tests and the demo want subordinate ids for root.
for f in /etc/subuid /etc/subgid; do
  grep -q '^root:100000:65536$' "$f" 2>/dev/null || echo 'root:100000:65536' >> "$f"
done
$demo && exit 0

# pjdfstest wants a `tests` user and group.
getent group tests >/dev/null || groupadd tests
getent passwd tests >/dev/null || useradd -M -g tests -s /usr/sbin/nologin tests

# The POSIX suite, from crates.io.
command -v pjdfstest >/dev/null || cargo install --locked --quiet pjdfstest
