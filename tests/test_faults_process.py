"""Fault matrix, process rows: the daemon killed while filling its cache, and stopped under readers."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import (host_attachments, is_mounted, random_bytes, wait_for, write_cinder_config,
                       write_config)
from .faultkit import MiB, ReadResult, assert_no_leaks, assert_one_line, assert_reads_exactly, baseline, read_checked, status

pytestmark = pytest.mark.mount


def s3_image(tmp_path, s3, source: bytes):
    """The test's bucket (on moto or the lab's RGW: both run) holding one image "img"; returns the
    config of a mount of it, straight to the server."""
    s3.put_object(Bucket=s3.bucket, Key="img", Body=source)
    server = s3.server
    return write_config(tmp_path / "imgfs.conf", s3_url=server.url, bucket=s3.bucket, cache_dir=tmp_path / "cache",
                        access=server.access_key, secret=server.secret_key)


@pytest.mark.cell("process", "SIGKILL during chunk fills, then restart")
def test_sigkill_during_fills_never_serves_a_torn_chunk(tmp_path, s3, mounter, observed):
    source = random_bytes(40 * MiB + 99, 21)
    conf = s3_image(tmp_path, s3, source)
    chunks_seen, interrupted = [], []
    tmp = tmp_path / "cache" / "tmp"

    def filling() -> bool:
        try:
            return any(name != ".probe" for name in os.listdir(tmp))
        except FileNotFoundError:
            return False

    for round_ in range(3):
        m = mounter(conf, name=f"mnt{round_}")
        with ThreadPoolExecutor(4) as pool:  # readers start at different places: fills everywhere at once
            futures = [pool.submit(read_checked, m.images / "img", source, start=(i * 10 * MiB)) for i in range(4)]
            deadline = time.monotonic() + 20
            while not filling() and time.monotonic() < deadline:  # the kill lands while a fill is being written
                pass
            m.stop(signal.SIGKILL)
            interrupted.append(sum(1 for name in os.listdir(tmp) if name != ".probe"))
            subprocess.run(["fusermount3", "-uz", str(m.path)], check=True)
            results = [f.result() for f in futures]  # every byte they got was checked
        # a killed daemon cannot answer: the kernel fails its readers (ENOTCONN, ECONNABORTED)
        assert all(r.errno in (None, errno.ENOTCONN, errno.ECONNABORTED, errno.EIO) for r in results), [r.error for r in results]
        chunks_seen.append(len(list((tmp_path / "cache" / "chunks").glob("*/*"))))
    assert sum(interrupted) > 0, f"no kill landed during a fill: {interrupted}"  # else this cell tests nothing
    m = mounter(conf, name="final")
    s = status(m)
    assert not list((tmp_path / "cache" / "tmp").iterdir()), "fills a crash interrupted must be swept at start"
    assert s["cache"]["chunks"] == len(list((tmp_path / "cache" / "chunks").glob("*/*"))), "index disagrees with the disk"
    base = baseline(m)
    assert_reads_exactly(m.images / "img", source)
    s = status(m)
    assert s["cache"]["corrupt"] == 0, "a chunk file a kill left was not whole"
    observed(f"fills interrupted by each kill: {interrupted}; chunks on disk after it: {chunks_seen}; "
             f"{s['cache']['corrupt']} corrupt; sha256 OK")
    assert_no_leaks(m, base)


def readers_until_stopped(m, path, source: bytes, stop_after: int) -> list[ReadResult]:
    """8 dd-like readers of one image; SIGTERM once one of them has read ``stop_after`` bytes."""
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(read_checked, path, source, bs=MiB) for _ in range(8)]
        wait_for(lambda: status(m)["bytes_served"] >= stop_after, 60, "the readers to get going", interval=0.01)
        assert m.stop(signal.SIGTERM) == 0, m.log()
        return [f.result() for f in futures]


def check_stopped(m, results: list[ReadResult], observed) -> None:
    outcomes = sorted(r.error for r in results)
    assert all(r.errno in (None, errno.EIO) for r in results), f"readers got {outcomes} (want complete or EIO)"
    assert not is_mounted(m.path)
    assert_one_line(m, "received SIGTERM: refusing new reads, unmounting")
    observed(", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes))))


@pytest.mark.cell("process", "SIGTERM with 8 readers mid-dd")
def test_sigterm_with_readers_on_s3(tmp_path, s3, mounter, observed):
    source = random_bytes(32 * MiB, 22)
    m = mounter(s3_image(tmp_path, s3, source))
    check_stopped(m, readers_until_stopped(m, m.images / "img", source, 4 * MiB), observed)


@pytest.mark.lab
@pytest.mark.cell("process", "SIGTERM with 8 readers mid-dd")
def test_sigterm_with_readers_on_cinder(tmp_path, lab, cinder, image_volume, mounter, observed):
    host = f"imgfs-test-{uuid.uuid4().hex[:8]}"
    vol = image_volume(64 * MiB)
    m = mounter(write_cinder_config(tmp_path / "imgfs.conf", lab, cache_dir=tmp_path / "cache", host=host))
    check_stopped(m, readers_until_stopped(m, m.images / vol.image_id, vol.data, 8 * MiB), observed)
    left = host_attachments(cinder, vol.volume_id, host)
    assert left == [], "an attachment outlived the daemon"
    observed(f"{len(left)} attachments")
