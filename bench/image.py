"""Build (once, then reuse) the test disk image.

kind "ext4" (default): a real ext4 filesystem image of SIZE MiB, ~85% filled (75% below 512 MiB)
with files of random (incompressible) content of mixed sizes (4 KiB .. 48 MiB)
via ``mkfs.ext4 -d``, then written out densely (``cp --sparse=never``) so the
free space is real zero blocks on disk, not holes -- the local-file dd limit
would otherwise be inflated by holes.
kind "ext4-mixed": the same, with every other file compressible the way text and binaries are (the
hex of random bytes: zlib keeps ~55% of it), so a compressed qcow2 of it holds compressed clusters
beside stored ones, as cloud images do.
kind "random": SIZE MiB of /dev/urandom bytes.

The image is cached as .bench/images/<kind>-<size>MiB.img with its sha256
next to it; it is re-verified on every run.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

from procs import BenchError, log

MiB = 1 << 20


def sha256_file(path: Path, bufsize: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bufsize)
        mv = memoryview(buf)
        while n := f.readinto(buf):
            h.update(mv[:n])
    return h.hexdigest()


def _fill_dir(root: Path, total: int, seed: int = 1234, mixed: bool = False) -> int:
    rng = random.Random(seed)
    written, i = 0, 0
    sizes = [x for x in (4 << 10, 64 << 10, 1 * MiB, 4 * MiB, 16 * MiB, 48 * MiB)
             if x <= total // 16] or [4 << 10]
    while written < total:
        d = root / f"d{i // 50:03d}"
        d.mkdir(exist_ok=True)
        sz = min(rng.choice(sizes), total - written)
        with open(d / f"f{i:05d}.bin", "wb") as f:
            left = sz
            text = mixed and i % 2 == 1
            while left:
                n = min(left, 8 * MiB)
                f.write(os.urandom(-(-n // 2)).hex().encode()[:n] if text else os.urandom(n))
                left -= n
        written += sz
        i += 1
    return i


def ensure_image(images_dir: Path, size_mib: int, kind: str) -> tuple[Path, str]:
    images_dir.mkdir(parents=True, exist_ok=True)
    img = images_dir / f"{kind}-{size_mib}MiB.img"
    sumf = img.with_suffix(".sha256")
    if img.exists() and sumf.exists() and img.stat().st_size == size_mib * MiB:
        digest = sha256_file(img)
        if digest == sumf.read_text().strip():
            return img, digest
        log(f"{img} does not match its sha256; rebuilding")
    for p in (img, sumf):
        if p.exists():
            p.unlink()
    tmp = images_dir / f"tmp-{kind}-{size_mib}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if kind == "random":
            log(f"creating {size_mib} MiB of random bytes")
            with open(tmp / "img", "wb") as f:
                for _ in range(size_mib):
                    f.write(os.urandom(MiB))
            os.replace(tmp / "img", img)
        elif kind in ("ext4", "ext4-mixed"):
            log(f"creating a {size_mib} MiB ext4 image filled with random files (once; cached)")
            fill = tmp / "root"
            fill.mkdir()
            nfiles = _fill_dir(fill, int(size_mib * MiB * (0.85 if size_mib >= 512 else 0.75)), mixed=kind == "ext4-mixed")
            sparse = tmp / "sparse.img"
            r = subprocess.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0",
                                "-L", "imgfs-bench", "-i", "65536", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                                "-d", str(fill), str(sparse), f"{size_mib}M"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"mkfs.ext4 failed: {r.stderr}")
            r = subprocess.run(["e2fsck", "-fn", str(sparse)], capture_output=True, text=True)
            if r.returncode != 0:
                raise BenchError(f"e2fsck of the new image failed: {r.stdout}{r.stderr}")
            subprocess.run(["cp", "--sparse=never", str(sparse), str(tmp / "dense.img")], check=True)
            os.replace(tmp / "dense.img", img)
            log(f"ext4 image with {nfiles} random files written")
        else:
            raise BenchError(f"unknown image kind {kind}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if img.stat().st_size != size_mib * MiB:
        raise BenchError(f"{img} has size {img.stat().st_size}, expected {size_mib * MiB}")
    digest = sha256_file(img)
    sumf.write_text(digest + "\n")
    return img, digest


QCOW2_MIB = 256  # the raw disk behind the qcow2 row: a few hundred MiB, as cloud images ship


def ensure_qcow2(images_dir: Path, size_mib: int = QCOW2_MIB, kind: str = "ext4") -> tuple[Path, Path, str]:
    """A compressed qcow2 of an ext4 disk (how cloud images ship), built once with `qemu-img convert -c`
    from the ``kind`` image of ``size_mib``: (qcow2, the raw disk it holds, sha256 of that raw disk)."""
    raw, raw_sha = ensure_image(images_dir, size_mib, kind)
    qcow2 = images_dir / f"{kind}-{size_mib}MiB.qcow2"
    stamp = qcow2.with_suffix(".qcow2.of")
    if not (qcow2.exists() and stamp.exists() and stamp.read_text() == raw_sha):
        log(f"building {qcow2} (qemu-img convert -c -O qcow2)")
        tmp = qcow2.with_suffix(".tmp")
        r = subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"qemu-img convert -c failed: {r.stderr.strip()}")
        tmp.rename(qcow2)
        stamp.write_text(raw_sha)
    return qcow2, raw, raw_sha
