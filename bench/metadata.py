"""Metadata at scale: `ls -l` and `stat` of 10,000 images, and mount start -> first file visible.

The catalog and the FUSE metadata path are the same whatever the store, so the images are 10,000
sparse 1 MiB files in a file store (no backend traffic): what is measured is imgfs's own metadata
path and the kernel's caching of it, next to `ls -l` of the same directory on the local disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import procs
from procs import BenchError, clean_env, log, spawn
from systems import IMGFS_BIN

COUNT = 10_000


def _ls(path: Path) -> float:
    t0 = time.monotonic()
    r = subprocess.run(["ls", "-l", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError(f"ls -l {path} failed: {r.stderr.decode().strip()}")
    lines = r.stdout.count(b"\n") - 1  # "total N"
    if lines != COUNT:
        raise BenchError(f"ls -l {path} listed {lines} entries, expected {COUNT}")
    return dt


def _stat_all(path: Path) -> float:
    names = os.listdir(path)
    t0 = time.monotonic()
    for n in names:
        os.stat(path / n)
    return time.monotonic() - t0


def measure(base: Path, log_dir: Path) -> dict:
    """{"local": {...}, "imgfs": {...}}: ls -l (first, then median of 3 more), stat of each, start."""
    src, mnt, cache = base / "src", base / "mnt", base / "cache"
    for d in (src, mnt, cache):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(COUNT):
        with open(src / str(uuid.UUID(int=i + 1)), "wb") as f:
            f.truncate(1 << 20)
    conf = base / "imgfs.conf"
    conf.write_text(f"""[DEFAULT]
enabled_backends = files:file
[glance_store]
default_backend = files
[files]
filesystem_store_datadir = {src}
[imgfs]
cache_dir = {cache}
""")
    out: dict[str, dict] = {}
    procs.drop_caches()
    first = _ls(src)
    warm = sorted(_ls(src) for _ in range(3))[1]
    out["local"] = {"ls_first_s": first, "ls_warm_s": warm, "stat_all_s": _stat_all(src)}

    procs.drop_caches()
    probe = mnt / "images" / str(uuid.UUID(int=COUNT))
    t0 = time.monotonic()
    proc = spawn("imgfs-metadata", [str(IMGFS_BIN), "mount", str(mnt), "--config-file", str(conf)],
                 log_dir / "imgfs-metadata.log", env=clean_env())
    procs.register_mount(mnt)
    try:
        procs.wait_for(lambda: probe.exists(), 30, "imgfs metadata mount", proc, log_dir / "imgfs-metadata.log",
                       interval=0.005)
        start = time.monotonic() - t0
        c0 = procs.cpu_seconds(proc.pid)
        first = _ls(mnt / "images")
        c1 = procs.cpu_seconds(proc.pid)
        warm = sorted(_ls(mnt / "images") for _ in range(3))[1]
        c2 = procs.cpu_seconds(proc.pid)
        out["imgfs"] = {"ls_first_s": first, "ls_warm_s": warm, "stat_all_s": _stat_all(mnt / "images"),
                        "start_s": start, "cpu_ls_first_s": c1 - c0, "cpu_ls_warm_s": (c2 - c1) / 3}
    finally:
        rc = procs.stop(proc, timeout=30)
        procs.unmount(mnt)
        if rc not in (0, None):
            log(f"imgfs (metadata) exited with {rc}")
        shutil.rmtree(base, ignore_errors=True)
    log(f"  metadata: ls -l of {COUNT} images: local {out['local']['ls_warm_s']:.2f}s, imgfs first "
        f"{out['imgfs']['ls_first_s']:.2f}s then {out['imgfs']['ls_warm_s']:.2f}s; start -> visible "
        f"{out['imgfs']['start_s']:.2f}s")
    return out
