import os, sys, time, statistics
# usage: interleave.py ROUNDS N name=dir ...   (run as the namespace root)
rounds, n = int(sys.argv[1]), int(sys.argv[2])
cs = [a.split('=', 1) for a in sys.argv[3:]]
res = {c: {p: [] for p in ('create', 'stat', 'delete', 'total')} for c, _ in cs}
for r in range(rounds):
    order = cs[r % len(cs):] + cs[:r % len(cs)]
    for c, d in order:
        sub = os.path.join(d, f"r{r}")
        os.mkdir(sub)
        dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        names = [f"f{i:06d}" for i in range(n)]
        t0 = time.perf_counter()
        for name in names:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            os.write(fd, b"x" * 100); os.close(fd)
        t1 = time.perf_counter()
        for name in names:
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
        t2 = time.perf_counter()
        for name in names:
            os.unlink(name, dir_fd=dfd)
        t3 = time.perf_counter()
        os.close(dfd); os.rmdir(sub)
        if r == 0: continue  # warm-up round
        for p, t in (('create', t1 - t0), ('stat', t2 - t1), ('delete', t3 - t2), ('total', t3 - t0)):
            res[c][p].append(t / n * 1e6)
base = cs[0][0]
print(f"{rounds - 1} rounds (after one warm-up), {n} files per round, order rotated each round; per-file microseconds (median) and median of per-round ratios to {base}")
for p in ('create', 'stat', 'delete', 'total'):
    row = [f"{p:7s}"]
    for c, _ in cs:
        v = res[c][p]
        ratios = [a / b for a, b in zip(v, res[base][p])]
        row.append(f"{c} {statistics.median(v):7.0f} us {statistics.median(ratios):5.2f}x")
    print(" | ".join(row))
