#!/usr/bin/env python3
"""Kernel idmapped bind mount of SOURCE at TARGET, for the benchmark only.

The benchmark prefers `shiftfs mount --backend kernel`; this is its fallback while that
backend is not available, so the kernel contender can still be measured. It does what
`mount-idmapped --map-mount b:INNER:OUTER:COUNT` does: a user namespace whose uid_map and
gid_map are `INNER OUTER COUNT`, then open_tree(CLONE) -> mount_setattr(IDMAP, nosuid,
nodev, like shiftfs' defaults) -> move_mount. Unmount with umount(8).

usage: idmap_mount.py INNER OUTER COUNT SOURCE TARGET
"""

import ctypes
import os
import signal
import sys

# x86_64 and aarch64 share these numbers (the new-mount-API calls were added to all
# architectures with one number).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000
CLONE_NEWUSER = 0x10000000


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def userns_fd(inner, outer, count):
    """A user namespace fd with the map `inner outer count`, held by a child we then end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        try:
            check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        except OSError:
            os._exit(1)
        os.read(r, 1)  # wait until the parent has written our maps and opened the ns
        os._exit(0)
    os.close(r)
    try:
        ns_path = f"/proc/{pid}/ns/user"
        # The child has unshared once its ns link differs from ours.
        mine = os.readlink("/proc/self/ns/user")
        for _ in range(10000):
            if os.readlink(ns_path) != mine:
                break
            os.sched_yield()
        else:
            raise OSError("the child never entered its user namespace")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"{inner} {outer} {count}\n")
        return os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__.strip().splitlines()[-1])
    inner, outer, count = (int(x) for x in sys.argv[1:4])
    source, target = sys.argv[4], sys.argv[5]
    ns = userns_fd(inner, outer, count)
    tree = check(
        libc.syscall(
            SYS_OPEN_TREE, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
        ),
        f"open_tree {source}",
    )
    attr = MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, ns)
    check(
        libc.syscall(
            SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)
        ),
        "mount_setattr(MOUNT_ATTR_IDMAP)",
    )
    check(
        libc.syscall(
            SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
        ),
        f"move_mount to {target}",
    )


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        main()
    except OSError as e:
        sys.exit(f"idmap_mount: {e}")
