"""What one cache fill costs the daemon: a chunk file written through the page cache, against O_DIRECT.

Writes --gib GiB of 8 MiB chunks with imgfs's own fill (imgfs.cache._write_atomic) into a directory on
the cache's file system, buffered and direct in turn (--rounds pairs), and prints the writing thread's
CPU seconds per GiB and the wall time. Run: .venv/bin/python bench/fill_cost.py [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgfs.cache import _DirectWrites, _write_atomic  # noqa: E402

CHUNK = 8 << 20


def one(root: Path, gib: float, direct: bool, data: bytes) -> tuple[float, float]:
    writes = _DirectWrites()
    writes.enabled = direct
    work = Path(tempfile.mkdtemp(dir=root, prefix="imgfs-fill-cost-"))
    (work / "tmp").mkdir()
    try:
        cpu0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.monotonic()
        for i in range(int(gib * 2**30) // CHUNK):
            _write_atomic(str(work / "tmp"), str(work / "c" / str(i)), b'{"key": 1}', data, writes)
        cpu1 = resource.getrusage(resource.RUSAGE_THREAD)
        seconds = time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if direct and not writes.enabled:
        raise SystemExit(f"{root} refuses O_DIRECT ({writes.refused}): nothing to compare")
    return ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / gib, seconds / gib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="a directory on the file system the cache would use")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = os.urandom(CHUNK)
    rows: dict[str, list[tuple[float, float]]] = {"buffered": [], "O_DIRECT": []}
    for _ in range(args.rounds):
        for name in rows:
            rows[name].append(one(Path(args.dir), args.gib, name == "O_DIRECT", data))
    for name, runs in rows.items():
        cpu = ", ".join(f"{c:.2f}" for c, _ in runs)
        wall = ", ".join(f"{w:.2f}" for _, w in runs)
        print(f"{name:<9} CPU s/GiB {cpu}   wall s/GiB {wall}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
