"""Fault matrix, cache rows: the chunk cache damaged or starved behind a running daemon's back.

The store is a real directory (a Glance file store): these faults are about the cache, and a local
store makes every refetch countable (status' fetched_bytes) and fast. The memory tier is off, so every
read after the damage goes to the chunk files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import random_bytes, write_config
from .faultkit import MiB, assert_no_leaks, assert_one_line, assert_reads_exactly, baseline, settled

pytestmark = pytest.mark.mount

SIZE = 8 * MiB + 123


@pytest.fixture
def files(tmp_path) -> dict[str, bytes]:
    d = tmp_path / "files"
    d.mkdir()
    sources = {"victim-image": random_bytes(SIZE, 11), "other-image": random_bytes(3 * MiB + 7, 12)}
    for name, data in sources.items():
        (d / name).write_bytes(data)
    return sources


def start(tmp_path, mounter, cache_dir: Path):
    conf = write_config(tmp_path / "imgfs.conf", s3_url=None, bucket=None, cache_dir=cache_dir,
                        file_dir=tmp_path / "files", memory_cache_mb=0, prefetch_max_mb=0)
    m = mounter(conf)
    return m, baseline(m)


def chunk_file(cache_dir: Path, index: int) -> Path:
    (path,) = (cache_dir / "chunks").glob(f"*/*.{MiB}.{index}")
    return path


def fetched(m) -> int:
    return settled(m)["fetched_bytes"]


@pytest.mark.cell("cache", "chunk file bit flip / truncated / deleted")
@pytest.mark.parametrize("damage", ["bitflip", "truncate", "delete"])
def test_damaged_chunk_is_refetched_exactly(tmp_path, files, mounter, observed, damage):
    cache = tmp_path / "cache"
    m, base = start(tmp_path, mounter, cache)
    victim = m.images / "victim-image"
    assert_reads_exactly(victim, files["victim-image"])  # fills the cache
    before = fetched(m)
    path = chunk_file(cache, 5)
    if damage == "bitflip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 1000)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        path.unlink()
    assert_reads_exactly(victim, files["victim-image"])
    refetched = fetched(m) - before
    assert refetched == MiB, f"refetched {refetched} bytes, want exactly the damaged chunk ({MiB})"
    observed(f"{damage}: refetched 1 chunk")
    line = "vanished from" if damage == "delete" else "chunk 5 of image victim-image failed verification"
    assert_one_line(m, line)
    assert settled(m)["cache"]["corrupt"] == (0 if damage == "delete" else 1)
    assert_reads_exactly(m.images / "other-image", files["other-image"])
    assert_no_leaks(m, base)


def tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "imgfs-test-cache", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A cache dir on its own small tmpfs; unmounted at the end."""
    path = tmp_path / "cache"
    tmpfs(path, "4m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.cell("cache", "cache disk full")
def test_full_cache_disk_serves_from_the_store(tmp_path, files, mounter, small_disk, observed):
    # cache_max_size_gb far above the disk: the disk runs out first, as when something else fills it
    m, base = start(tmp_path, mounter, small_disk)
    victim = m.images / "victim-image"
    for _ in range(2):
        assert_reads_exactly(victim, files["victim-image"])
    s = settled(m)
    assert s["cache"]["fill_failures"] > 0 and s["cache"]["chunks"] < 8, s["cache"]
    observed(f"{s['cache']['chunks']} chunks cached, {s['cache']['fill_failures']} fills refused")
    assert_one_line(m, r"cannot store chunks in .* \(No space left on device\).*free space")
    assert_reads_exactly(m.images / "other-image", files["other-image"])
    assert_no_leaks(m, base)


@pytest.mark.cell("cache", "cache directory unwritable (read-only)")
def test_read_only_cache_dir_serves_from_the_store(tmp_path, files, mounter, small_disk, observed):
    m, base = start(tmp_path, mounter, small_disk)
    other = m.images / "other-image"
    assert_reads_exactly(other, files["other-image"])  # 3 chunks cached while writable
    # Root ignores permission bits: only a read-only filesystem makes a directory unwritable for it.
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = fetched(m)
    assert_reads_exactly(m.images / "victim-image", files["victim-image"])
    assert_reads_exactly(other, files["other-image"])
    from_store = fetched(m) - before
    assert from_store == SIZE, "the chunks cached before must still be served from the cache"
    observed(f"{from_store / MiB:.1f} MiB from the store (the uncached image only); cached chunks still served")
    assert_one_line(m, r"cannot store chunks in .* \(Read-only file system\)")
    assert_no_leaks(m, base)
