#!/usr/bin/env python3
"""Small reader run as a *subprocess* (so a hung FUSE read can be killed by
timeout).  Prints one JSON object on stdout.

  reader.py ttfb   PATH REF                    open + pread 4 KiB @ 0
  reader.py random PATH REF SIZE COUNT SEED MAX_SECONDS
                                               QD1 random 4 KiB preads at
                                               4 KiB-aligned offsets,
                                               POSIX_FADV_RANDOM (no readahead)
  reader.py sha256 PATH                        sha256 of a full sequential read

REF is the local copy of the image: data read through the mount is compared
with it after the timed part.
"""

import hashlib
import json
import os
import random
import sys
import time

BS = 4096


def ttfb(path, ref):
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    data = os.pread(fd, BS, 0)
    t1 = time.perf_counter()
    os.close(fd)
    with open(ref, "rb") as f:
        ok = f.read(BS) == data
    return {"ttfb_ms": (t1 - t0) * 1e3, "ok": ok}


def rand(path, ref, size, count, seed, max_s):
    rng = random.Random(seed)
    offs = [rng.randrange(size // BS) * BS for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except OSError:
        pass
    lat, got = [], []
    t0 = time.perf_counter()
    deadline = t0 + max_s
    for off in offs:
        a = time.perf_counter()
        got.append(os.pread(fd, BS, off))
        b = time.perf_counter()
        lat.append(b - a)
        if b > deadline:
            break
    total = time.perf_counter() - t0
    os.close(fd)
    bad = 0
    rfd = os.open(ref, os.O_RDONLY)
    for off, data in zip(offs, got):
        if os.pread(rfd, BS, off) != data:
            bad += 1
    os.close(rfd)
    lat.sort()
    n = len(lat)
    return {"ops": n, "requested": count, "truncated": n < count, "seconds": total,
            "iops": n / total, "mbps": n * BS / total / 1e6,
            "p50_ms": lat[n // 2] * 1e3, "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1e3,
            "max_ms": lat[-1] * 1e3, "mismatches": bad, "ok": bad == 0}


def sha(path):
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    n_total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(mv[:n])
            n_total += n
    return {"sha256": h.hexdigest(), "bytes": n_total, "seconds": time.perf_counter() - t0}


def main(argv):
    mode = argv[1]
    if mode == "ttfb":
        out = ttfb(argv[2], argv[3])
    elif mode == "random":
        out = rand(argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]), float(argv[7]))
    elif mode == "sha256":
        out = sha(argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
