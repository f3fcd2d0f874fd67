#!/usr/bin/env python3
"""Per FUSE request type: how many requests, the daemon's syscalls per request (besides the
read of the request and the writev of the reply), by name, and the daemon's time from the end
of the read to the end of the reply (strace-inflated). Input: `strace -f -y -T -ttt -xx` of a
daemon serving through /dev/fuse.  usage: reqprof.py TRACE"""
import collections
import re
import sys

OPS = {1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
       8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN",
       15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR",
       22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH", 27: "OPENDIR",
       28: "READDIR", 29: "RELEASEDIR", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT",
       42: "BATCH_FORGET", 43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK"}
LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
DUR = re.compile(r"<(\d+\.\d+)>\s*$")
HEX = re.compile(r'"((?:\\x[0-9a-f]{2})+)')

FUSEHEX = "<" + "".join(f"\\x{c:02x}" for c in b"/dev/fuse") + ">"
count = collections.Counter()
calls = collections.defaultdict(collections.Counter)
time = collections.Counter()
cur = {}  # tid -> (op, start)
pending = {}  # tid -> text of an unfinished call


def finish(tid, end):
    if tid in cur:
        op, start = cur.pop(tid)
        count[op] += 1
        time[op] += end - start


for raw in open(sys.argv[1], errors="replace"):
    m = LINE.match(raw)
    if not m:
        continue
    tid, ts, rest = m.group(1), float(m.group(2)), m.group(3)
    if rest.endswith("<unfinished ...>"):
        pending[tid] = (rest[: -len("<unfinished ...>")], ts)
        continue
    began = ts
    if rest.startswith("<... "):
        text, began = pending.pop(tid, ("", ts))
        rest = text + rest.split("resumed>", 1)[-1]
    d = DUR.search(rest)
    dur = float(d.group(1)) if d else 0.0
    name = rest.split("(", 1)[0]
    fuse = rest.split(",", 1)[0].endswith(("</dev/fuse>", FUSEHEX))
    if fuse and name == "read":
        finish(tid, began)  # a request without a reply (FORGET) ends where the next read begins
        h = HEX.search(rest)
        if h and " = -1 " not in rest:
            b = bytes(int(x, 16) for x in h.group(1).split("\\x")[1:])
            if len(b) >= 8:
                op = OPS.get(int.from_bytes(b[4:8], "little"), f"op{int.from_bytes(b[4:8], 'little')}")
                cur[tid] = (op, ts + dur if not raw.split()[2].startswith("<...") else ts)
        continue
    if fuse and name in ("writev", "write"):
        finish(tid, ts + dur)
        continue
    if tid in cur and name and not name.startswith("+++") and not name.startswith("---"):
        calls[cur[tid][0]][name] += 1

total = sum(count.values())
print(f"{'request':<13}{'count':>7}{'per op':>8}{'syscalls':>10}{'us/req':>9}  syscalls per request")
for op, n in count.most_common():
    per = sum(calls[op].values()) / n
    detail = ", ".join(f"{k} {v / n:.2f}" for k, v in calls[op].most_common())
    print(f"{op:<13}{n:>7}{n / total:>8.2f}{per:>10.2f}{time[op] / n * 1e6:>9.1f}  {detail}")
allc = sum(sum(c.values()) for c in calls.values())
print(f"{'total':<13}{total:>7}{'':>8}{allc / max(total, 1):>10.2f}")
