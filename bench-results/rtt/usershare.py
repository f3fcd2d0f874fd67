import re, subprocess, sys
# usershare.py DATA COMM: of all samples, the share COMM's thread spent in user space doing
# work, not counting samples on the instruction after a `syscall` (kernel time that perf's
# timer sampling reports at the return to user space).
data, comm = sys.argv[1], sys.argv[2]
out = subprocess.run(["perf", "script", "-i", data, "-G", "--show-mmap-events", "-F", "comm,ip,dso"],
                     capture_output=True, text=True).stdout
maps = []
mm = re.compile(r"PERF_RECORD_MMAP2 .*\[0x([0-9a-f]+)\(0x([0-9a-f]+)\) @ 0x([0-9a-f]+) .*\]: r-xp (\S+)")
total = thread = user = atsys = 0
files = {}
for line in out.splitlines():
    m = mm.search(line)
    if m:
        maps.append((int(m[1], 16), int(m[2], 16), int(m[3], 16), m[4])); continue
    parts = line.split()
    if len(parts) < 3 or "PERF_RECORD" in line: continue
    total += 1
    if " ".join(parts[:-2]) != comm: continue
    thread += 1
    if "kernel" in parts[-1]: continue
    user += 1
    ip = int(parts[-2], 16)
    for start, ln, pgoff, path in maps:
        if start <= ip < start + ln:
            off = ip - start + pgoff
            if path not in files: files[path] = open(path, "rb").read()
            if files[path][off - 2:off] == b"\x0f\x05": atsys += 1
            break
print(f"{comm}: {100*thread/total:5.1f}% of samples; user space {100*user/total:5.2f}% "
      f"(on a syscall's return {100*atsys/total:5.2f}%): user work {100*(user-atsys)/total:5.2f}%")
