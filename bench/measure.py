"""Measurements: dd sequential reads, N concurrent readers, TTFB, random 4 KiB
reads and sha256 verification.  Every read runs in a child process with a
timeout, so a hung FUSE daemon cannot hang the benchmark.

MB/s are decimal (10^6 bytes/s, like dd).  Throughput is wall-clock around
the whole dd process (exec + open + read), bytes = image size; dd's own
figure is kept in the JSON as dd_mbps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import BenchError

HERE = Path(__file__).resolve().parent
READER = HERE / "reader.py"
_DD_RX = re.compile(r"^(\d+) bytes .* copied, ([0-9.eE+-]+) s", re.M)


def _dd_bytes(stderr: str) -> tuple[int, float]:
    m = _DD_RX.search(stderr)
    if not m:
        raise BenchError(f"cannot parse dd output: {stderr!r}")
    return int(m.group(1)), float(m.group(2))


def dd(path: Path, bs: str, size: int, timeout: float) -> dict:
    t0 = time.monotonic()
    try:
        r = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={bs}"],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"dd bs={bs} of {path} did not finish within {timeout:.0f}s")
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError(f"dd bs={bs} of {path} failed: {r.stderr.strip()}")
    nbytes, dd_s = _dd_bytes(r.stderr)
    if nbytes != size:
        raise BenchError(f"dd of {path} read {nbytes} bytes, expected {size}")
    return {"seconds": dt, "mbps": size / dt / 1e6, "dd_mbps": size / dd_s / 1e6 if dd_s else None}


def concurrent(path: Path, n: int, bs: str, size: int, timeout: float) -> dict:
    """n dd readers started together; wall = first start .. last finish."""
    tmp = tempfile.TemporaryDirectory(prefix="bench-conc-")
    procs, files, finish = [], [], {}
    try:
        t0 = time.monotonic()
        for i in range(n):
            fh = open(Path(tmp.name) / f"{i}.err", "w+")
            files.append(fh)
            procs.append(subprocess.Popen(["dd", f"if={path}", "of=/dev/null", f"bs={bs}"],
                                          stdout=subprocess.DEVNULL, stderr=fh))
        deadline = t0 + timeout
        while len(finish) < n:
            now = time.monotonic()
            for i, p in enumerate(procs):
                if i not in finish and p.poll() is not None:
                    finish[i] = now
            if now > deadline:
                raise BenchError(f"{n} concurrent readers of {path} did not finish within "
                                 f"{timeout:.0f}s ({len(finish)} done)")
            time.sleep(0.01)
        wall = max(finish.values()) - t0
        per = []
        for i, (p, fh) in enumerate(zip(procs, files)):
            fh.seek(0)
            err = fh.read()
            if p.returncode != 0:
                raise BenchError(f"concurrent reader {i} failed: {err.strip()}")
            nbytes, _ = _dd_bytes(err)
            if nbytes != size:
                raise BenchError(f"concurrent reader {i} read {nbytes} bytes, expected {size}")
            per.append(finish[i] - t0)
        per.sort()
        return {"readers": n, "wall_s": wall, "agg_mbps": n * size / wall / 1e6,
                "first_done_s": per[0], "median_done_s": per[len(per) // 2]}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in files:
            fh.close()
        tmp.cleanup()


def reader(args: list[str], timeout: float) -> dict:
    try:
        r = subprocess.run([sys.executable, str(READER)] + [str(a) for a in args],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"reader {args[:2]} did not finish within {timeout:.0f}s")
    if r.returncode != 0:
        raise BenchError(f"reader {args[:2]} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def ttfb(path: Path, ref: Path, timeout: float = 60) -> dict:
    out = reader(["ttfb", path, ref], timeout)
    if not out["ok"]:
        raise BenchError(f"BYTE MISMATCH: first 4 KiB of {path} differ from the source image")
    return out


def random_reads(path: Path, ref: Path, size: int, count: int, seed: int, max_s: float) -> dict:
    out = reader(["random", path, ref, size, count, seed, max_s], max_s + 120)
    if not out["ok"]:
        raise BenchError(f"BYTE MISMATCH: {out['mismatches']} of {out['ops']} random 4 KiB "
                         f"reads of {path} differ from the source image")
    return out


def verify(path: Path, size: int, expected: str, timeout: float = 600) -> dict:
    out = reader(["sha256", path], timeout)
    if out["bytes"] != size or out["sha256"] != expected:
        raise BenchError(f"BYTE MISMATCH: full read of {path} gave {out['bytes']} bytes, "
                         f"sha256 {out['sha256']}, expected {size} bytes, sha256 {expected}")
    return out
