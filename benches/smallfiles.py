#!/usr/bin/env python3
"""Creates N small files in DIR, stats each, deletes each; prints the seconds of each phase.

usage: smallfiles.py DIR N
Output: `create SECONDS stat SECONDS delete SECONDS` on one line. DIR must exist and be
empty-ish; the files are named f000000... and removed again. Standard library only, so
the system python runs it as the root of a user namespace.
"""

import os
import sys
import time

PAYLOAD = b"x" * 100


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2])
    d, n = sys.argv[1], int(sys.argv[2])
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    names = [f"f{i:06d}" for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

    t0 = time.perf_counter()
    for name in names:
        fd = os.open(name, flags, 0o644, dir_fd=dfd)
        os.write(fd, PAYLOAD)
        os.close(fd)
    t1 = time.perf_counter()
    for name in names:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if st.st_size != len(PAYLOAD):
            sys.exit(f"smallfiles: {name}: size {st.st_size}, wrote {len(PAYLOAD)}")
    t2 = time.perf_counter()
    for name in names:
        os.unlink(name, dir_fd=dfd)
    t3 = time.perf_counter()
    print(f"create {t1 - t0:.6f} stat {t2 - t1:.6f} delete {t3 - t2:.6f}")


if __name__ == "__main__":
    main()
