import os, sys, time, statistics
rounds, mib = int(sys.argv[1]), int(sys.argv[2])
cs = [a.split('=', 1) for a in sys.argv[3:]]
buf = os.urandom(1 << 20)
res = {c: [] for c, _ in cs}
for r in range(rounds):
    order = cs[r % len(cs):] + cs[:r % len(cs)]
    for c, d in order:
        p = os.path.join(d, "big")
        t0 = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(mib): os.write(fd, buf)
        os.fsync(fd); os.close(fd)
        t = time.perf_counter() - t0
        os.unlink(p)
        if r: res[c].append(mib / t)
base = cs[0][0]
print(f"sequential write, {mib} MiB in 1 MiB writes + fsync, {rounds - 1} rounds after a warm-up, order rotated: MiB/s (median), median of per-round ratios to {base}")
print(" | ".join(f"{c} {statistics.median(v):6.0f} MiB/s {statistics.median([a / b for a, b in zip(v, res[base])]):.2f}x" for c, v in res.items()))
