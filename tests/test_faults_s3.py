"""Fault matrix, S3 rows: a fault-injecting proxy between imgfs and a real S3 server (moto and Ceph RGW).

Each fault is tried short (fewer failures than imgfs's retries: the reader must get every byte, and the
log says the store was flaky) and long (the store stays broken: the reader gets the documented errno
within the configured timeouts, never a wrong byte), then lifted (the same image reads exactly).
Throughout, another image of the same store keeps reading, and nothing leaks."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

import pytest

from .conftest import Mount, random_bytes, wait_for, write_config
from .faultkit import (MiB, Baseline, assert_no_leaks, assert_one_line, assert_reads_exactly, baseline, read_checked)

pytestmark = pytest.mark.mount

READ_TIMEOUT = 1.0
ATTEMPTS = 3
# The longest a read may take to fail when every attempt times out: attempts x (connect + read timeout)
# plus backoff, for the chunk the reader waits on and the prefetch run ahead of it; doubled for a busy box.
FAIL_BOUND = 2 * 2 * ATTEMPTS * (2 * READ_TIMEOUT + 1.0)


@dataclass
class Rig:
    mount: Mount
    proxy: object
    s3: object
    victim: str
    other: str
    sources: dict[str, bytes]
    base: Baseline

    def path(self, image: str):
        return self.mount.images / image


@pytest.fixture
def rig(tmp_path, proxy, s3, mounter) -> Rig:
    sources = {"victim-image": random_bytes(6 * MiB + 4097, 1), "other-image": random_bytes(3 * MiB + 5, 2)}
    for key, data in sources.items():
        s3.put_object(Bucket=s3.bucket, Key=key, Body=data)
    conf = write_config(tmp_path / "imgfs.conf", s3_url=proxy.url, bucket=s3.bucket, cache_dir=tmp_path / "cache",
                        access=s3.server.access_key, secret=s3.server.secret_key, s3_read_timeout=READ_TIMEOUT, s3_connect_timeout=READ_TIMEOUT, s3_max_attempts=ATTEMPTS)
    m = mounter(conf, "--debug")
    return Rig(m, proxy, s3, "victim-image", "other-image", sources, baseline(m))


def finish(rig: Rig) -> None:
    """After the fault is lifted: the victim reads exactly, so does the other image, nothing leaked."""
    assert_reads_exactly(rig.path(rig.victim), rig.sources[rig.victim])
    assert_reads_exactly(rig.path(rig.other), rig.sources[rig.other])
    assert_no_leaks(rig.mount, rig.base)


def broken_read(rig: Rig, observed, expect: int) -> None:
    """Reading the victim while the store stays broken: the documented errno, in bounded time, and
    every byte before it right. Meanwhile the other image still reads."""
    result = read_checked(rig.path(rig.victim), rig.sources[rig.victim])
    assert result.errno == expect, f"got {result.error} after {result.good} bytes, want {errno.errorcode[expect]}"
    assert result.seconds < FAIL_BOUND, f"the reader waited {result.seconds:.1f}s (bound {FAIL_BOUND}s)"
    observed(f"{result.error} in {result.seconds:.1f}s")
    assert_reads_exactly(rig.path(rig.other), rig.sources[rig.other])


@pytest.mark.cell("S3", "500/503 burst")
@pytest.mark.parametrize("code", [500, 503])
def test_error_bursts(rig, observed, code):
    rig.proxy.inject("status", rig.victim, count=ATTEMPTS - 1, status=code)  # the retries absorb it
    assert_reads_exactly(rig.path(rig.victim), rig.sources[rig.victim])
    # one line per request that needed retries (the burst may hit a demand and a prefetch request)
    line = assert_one_line(rig.mount, f"victim-image.*HTTP {code}.*; attempt [0-9]+ worked", exactly=False)
    observed(f"every byte; {line.rsplit(': ', 1)[-1]}")
    finish(rig)


@pytest.mark.cell("S3", "500/503 burst longer than the retries")
@pytest.mark.parametrize("code", [500, 503])
def test_long_error_bursts(rig, observed, code):
    rig.proxy.inject("status", rig.victim, status=code)
    broken_read(rig, observed, errno.EIO)
    assert_one_line(rig.mount, f"read of image victim-image failed \\(EIO\\).*HTTP {code}")
    rig.proxy.clear()
    finish(rig)


@pytest.mark.cell("S3", "slow response past the read timeout")
def test_stalled_body(rig, observed):
    rig.proxy.inject("stall", rig.victim, count=1, seconds=4 * READ_TIMEOUT)
    assert_reads_exactly(rig.path(rig.victim), rig.sources[rig.victim])
    line = assert_one_line(rig.mount, "victim-image.*failed (before the answer|mid-body): ReadTimeoutError; attempt 2 worked")
    observed("every byte; " + line.rsplit(": ", 1)[-1])
    finish(rig)


@pytest.mark.cell("S3", "stalled for good (every attempt times out)")
def test_stalled_for_good(rig, observed):
    rig.proxy.inject("stall", rig.victim, seconds=4 * READ_TIMEOUT)
    broken_read(rig, observed, errno.EIO)
    assert_one_line(rig.mount, "read of image victim-image failed \\(EIO\\).*failed (before the answer|mid-body): ReadTimeoutError")
    rig.proxy.clear()
    finish(rig)


@pytest.mark.cell("S3", "connection reset mid-body")
@pytest.mark.parametrize("persistent", [False, True], ids=["once", "always"])
def test_reset_mid_body(rig, observed, persistent):
    check_body_fault(rig, observed, "reset", persistent)


@pytest.mark.cell("S3", "body shorter than Content-Length")
@pytest.mark.parametrize("persistent", [False, True], ids=["once", "always"])
def test_short_body(rig, observed, persistent):
    check_body_fault(rig, observed, "short", persistent)


def check_body_fault(rig: Rig, observed, kind: str, persistent: bool) -> None:
    rig.proxy.inject(kind, rig.victim, count=None if persistent else 1)
    if persistent:
        broken_read(rig, observed, errno.EIO)
        assert_one_line(rig.mount, "read of image victim-image failed \\(EIO\\).*failed mid-body")
        rig.proxy.clear()
    else:
        assert_reads_exactly(rig.path(rig.victim), rig.sources[rig.victim])
        line = assert_one_line(rig.mount, "victim-image.*mid-body: [A-Za-z]+; attempt 2 worked")
        observed("every byte; " + line.rsplit("mid-body: ", 1)[-1])
    finish(rig)


@pytest.mark.cell("S3", "403 (credentials refused)")
def test_access_denied(rig, observed):
    rig.proxy.inject("status", rig.victim, status=403)
    broken_read(rig, observed, errno.EACCES)
    assert_one_line(rig.mount, "read of image victim-image failed \\(EACCES\\).*access denied.*check s3_store_access_key")
    # credentials do not heal: neither botocore nor imgfs retries a 403 (the kernel may ask again)
    assert "retrying" not in rig.mount.log() and len([r for r in rig.proxy.requests if r.status == 403]) <= 6
    rig.proxy.clear()
    finish(rig)


@pytest.mark.cell("S3", "Range ignored (200, whole object)")
def test_range_ignored(rig, observed):
    rig.proxy.inject("whole", rig.victim)
    broken_read(rig, observed, errno.EIO)
    assert_one_line(rig.mount, "read of image victim-image failed \\(EIO\\).*ignored the Range header")
    # not a transient fault: no retry, and the whole object's body is never read
    assert "retrying" not in rig.mount.log()
    rig.proxy.clear()
    finish(rig)


@pytest.mark.cell("S3", "object replaced mid-read")
def test_replaced_mid_read(rig, observed):
    old, new = rig.sources[rig.victim], random_bytes(len(rig.sources[rig.victim]) + 11, 3)
    fd = os.open(rig.path(rig.victim), os.O_RDONLY)
    try:
        first = read_checked(None, old, stop=MiB, fd=fd)
        assert first.errno is None
        rig.s3.put_object(Bucket=rig.s3.bucket, Key=rig.victim, Body=new)
        rest = read_checked(None, old, start=MiB, fd=fd)
    finally:
        os.close(fd)
    # Chunks prefetched before the replace are the old version's and may still be served; then ESTALE.
    assert rest.errno == errno.ESTALE, f"got {rest.error} after {rest.good} bytes of the old version"
    observed(f"ESTALE after {(MiB + rest.good) // MiB} MiB of the old version")
    assert_one_line(rig.mount, "read of image victim-image failed \\(ESTALE\\)")
    wait_for(lambda: os.stat(rig.path(rig.victim)).st_size == len(new), 10, "the new version to appear")
    rig.sources[rig.victim] = new
    finish(rig)


@pytest.mark.cell("S3", "object deleted mid-read")
def test_deleted_mid_read(rig, observed):
    old = rig.sources[rig.victim]
    fd = os.open(rig.path(rig.victim), os.O_RDONLY)
    try:
        assert read_checked(None, old, stop=MiB, fd=fd).errno is None
        rig.s3.delete_object(Bucket=rig.s3.bucket, Key=rig.victim)
        rest = read_checked(None, old, start=MiB, fd=fd)
    finally:
        os.close(fd)
    assert rest.errno == errno.ESTALE, f"got {rest.error} after {rest.good} bytes"
    observed(assert_one_line(rig.mount, "read of image victim-image failed \\(ESTALE\\)").rsplit("): ", 1)[-1])
    wait_for(lambda: not os.path.exists(rig.path(rig.victim)), 10, "the deleted image to disappear")
    try:
        os.stat(rig.path(rig.victim))
        then = "still there"
    except OSError as e:
        then = errno.errorcode[e.errno]
    observed(f"{errno.errorcode[rest.errno]}, then {then}")
    assert_reads_exactly(rig.path(rig.other), rig.sources[rig.other])
    assert_no_leaks(rig.mount, rig.base)
