"""Real kernel FUSE mounts of imgfs (a child process, as systemd runs it) against a real S3 server on
loopback (moto in server mode), with a counting proxy between them to see every request."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import (ACCESS_KEY, SECRET_KEY, drop_page_cache, is_mounted, sha256, sha256_file, start_moto, wait_for,
                       write_config)

pytestmark = pytest.mark.mount
MiB = 1 << 20
IMAGE_A = "6f1b2f5e-9a7c-4a57-9d0e-2f6a1c7d3b11"
IMAGE_B = "0c9d8e7f-1a2b-4c3d-8e9f-a0b1c2d3e4f5"


SMALL_FETCH_MAX = 512 * 1024  # a random reader's block fetch, grown by neighbouring reads (imgfs.reader)


def fetched_once(proxy, key: str, size: int, small_overlaps: int = 0) -> None:
    """The GETs of ``key`` cover the image and add up to exactly it: every byte fetched once. With
    ``small_overlaps``, what the design allows when random and sequential readers mix: a chunk fetch
    fetches again a 64 KiB block still in flight for a random reader (waiting on it could deadlock),
    so a span may overlap another only where one of the two is a small block fetch, at most that many
    times."""
    spans = sorted(tuple(map(int, r.range.removeprefix("bytes=").split("-"))) for r in proxy.gets(key))
    covered, overlaps, extra = 0, 0, 0
    for start, end in spans:
        if start < covered:
            overlaps += 1
            extra += min(end + 1, covered) - start
            small = (end - start + 1) <= SMALL_FETCH_MAX or any(
                e - s + 1 <= SMALL_FETCH_MAX and s <= start <= e for s, e in spans if (s, e) != (start, end))
            assert small, f"two chunk fetches overlap at {start}: {spans}"
        assert start <= covered, f"bytes {covered}-{start} never fetched: {spans}"
        covered = max(covered, end + 1)
    assert covered == size and overlaps <= small_overlaps, f"{overlaps} overlapping fetches: {spans}"
    assert sum(end - start + 1 for start, end in spans) == size + extra == sum(r.body_bytes for r in proxy.gets(key))


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def store(s3, tmp_path):
    """Two images in S3 (one with a size that is not a chunk multiple), one in a file store."""
    images = {IMAGE_A: blob(5 * MiB + 12345, 1), IMAGE_B: blob(2 * MiB, 2)}
    for key, data in images.items():
        s3.put_object(Bucket=s3.bucket, Key=key, Body=data)
    file_dir = tmp_path / "filestore"
    file_dir.mkdir()
    file_image = blob(3 * MiB + 1, 3)
    (file_dir / "f00d0000-0000-4000-8000-000000000001").write_bytes(file_image)
    return images, file_dir, {"f00d0000-0000-4000-8000-000000000001": file_image}


def config_for(tmp_path, proxy, s3, file_dir=None, **options):
    return write_config(tmp_path / "imgfs.conf", s3_url=proxy.url, bucket=s3.bucket, cache_dir=tmp_path / "cache",
                        file_dir=file_dir, access=s3.server.access_key, secret=s3.server.secret_key, **options)


def test_every_image_reads_back_exactly(tmp_path, proxy, s3, store, mounter):
    s3_images, file_dir, file_images = store
    m = mounter(config_for(tmp_path, proxy, s3, file_dir))
    listing = {p.name: p.stat().st_size for p in m.images.iterdir()}
    expected = {**s3_images, **file_images}
    assert listing == {k: len(v) for k, v in expected.items()}
    for image_id, data in expected.items():
        path = m.images / image_id
        st = path.stat()
        assert oct(st.st_mode & 0o777) == "0o444"
        assert sha256_file(path) == sha256(data), image_id
    for image_id, data in s3_images.items():
        assert sha256_file(m.path / "stores" / "s3store" / image_id) == sha256(data)
    for image_id, data in file_images.items():
        assert sha256_file(m.path / "stores" / "filestore" / image_id) == sha256(data)
    assert sorted(os.listdir(m.path / "stores")) == ["filestore", "s3store"]
    # mtime comes from the object
    head = s3.head_object(Bucket=s3.bucket, Key=IMAGE_A)
    assert abs((m.images / IMAGE_A).stat().st_mtime - head["LastModified"].timestamp()) < 1
    # and bytes via dd with a large block size, as a hypervisor would copy it
    out = tmp_path / "copy.raw"
    subprocess.run(["dd", f"if={m.images / IMAGE_A}", f"of={out}", "bs=4M", "status=none"], check=True)
    assert sha256_file(out) == sha256(s3_images[IMAGE_A])


def test_second_read_makes_no_backend_get(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3, memory_cache_mb=0))
    path = m.images / IMAGE_A
    assert sha256_file(path) == sha256(store[0][IMAGE_A])
    fetched_once(proxy, IMAGE_A, len(store[0][IMAGE_A]))
    gets = len(proxy.gets(IMAGE_A))
    drop_page_cache(path)
    assert sha256_file(path) == sha256(store[0][IMAGE_A])
    assert len(proxy.gets(IMAGE_A)) == gets
    # ... and after a restart of the daemon too: the cache persists (once every fill has landed: a
    # fill still in flight at SIGTERM is dropped, costing a refetch, never a wrong byte)
    wait_for(lambda: os.getxattr(path, "user.imgfs.cached_fraction") == b"1.0000", 10, "the cache to fill")
    assert m.stop() == 0
    m2 = mounter(m.config, name="mnt2")
    assert sha256_file(m2.images / IMAGE_A) == sha256(store[0][IMAGE_A])
    assert len(proxy.gets(IMAGE_A)) == gets


def test_concurrent_cold_readers_fetch_each_chunk_once(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3))
    path = m.images / IMAGE_A
    digests, errors = [], []

    def reader(bs):
        try:
            digests.append(sha256_file(path, bs))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # each read size twice: small readers fetch 64 KiB blocks, the others whole chunks (a fixed mix, so a
    # failure can be run again as it was)
    threads = [threading.Thread(target=reader, args=(bs,)) for bs in [4096, 65536, MiB, 4 * MiB] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert digests == [sha256(store[0][IMAGE_A])] * 8
    fetched_once(proxy, IMAGE_A, len(store[0][IMAGE_A]), small_overlaps=8)


def test_corrupted_cache_chunk_is_refetched(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3, memory_cache_mb=0))
    path = m.images / IMAGE_B
    data = store[0][IMAGE_B]
    assert sha256_file(path) == sha256(data)

    def chunk_files():
        return sorted(p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file())

    wait_for(lambda: len(chunk_files()) == 2, 10, "both chunks to be cached")
    victim = next(p for p in chunk_files() if p.name.endswith(".1"))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(raw)
    proxy.reset()
    drop_page_cache(path)
    assert sha256_file(path) == sha256(data)
    assert [r.range for r in proxy.gets(IMAGE_B)] == [f"bytes={MiB}-{2 * MiB - 1}"]
    assert "failed verification" in m.log()


def test_replaced_object_never_mixes_bytes(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3, refresh_interval=1, memory_cache_mb=0, prefetch_max_mb=0))
    path = m.images / IMAGE_A
    old, new = store[0][IMAGE_A], blob(len(store[0][IMAGE_A]), 99)
    fd = os.open(path, os.O_RDONLY)
    try:
        first = os.pread(fd, MiB, 0)
        assert first == old[:MiB]
        s3.put_object(Bucket=s3.bucket, Key=IMAGE_A, Body=new)
        got = bytearray(first)
        with pytest.raises(OSError) as info:
            for off in range(MiB, len(old), MiB):
                got += os.pread(fd, MiB, off)
        assert info.value.errno in (errno.ESTALE, errno.EIO)
        assert bytes(got) == old[: len(got)]  # whatever was returned is the old version only
    finally:
        os.close(fd)
    # after the catalog notices (refresh every 1 s), a reopen reads the new version, whole
    def reads_new_version() -> bool:
        try:
            return sha256_file(path) == sha256(new)
        except OSError as e:  # a reopen racing the catalog's refresh still gets the old version: ESTALE
            assert e.errno in (errno.ESTALE, errno.EIO), e
            return False

    wait_for(reads_new_version, 30, "the new version")
    version = os.getxattr(path, "user.imgfs.version").decode()
    assert version == s3.head_object(Bucket=s3.bucket, Key=IMAGE_A)["ETag"].strip('"')
    assert "dropped" in m.log()  # the old chunks left the cache


def test_writes_are_refused(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3))
    path = m.images / IMAGE_B
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as info:
            os.open(path, flags)
        assert info.value.errno == errno.EROFS, info.value  # docs/semantics.md's promise, for every kind of write
    checks = [
        lambda: os.truncate(path, 0),
        lambda: os.unlink(path),
        lambda: os.mkdir(m.images / "new"),
        lambda: os.open(m.images / "new", os.O_CREAT | os.O_WRONLY),
        lambda: os.rename(path, m.images / "renamed"),
        lambda: os.chmod(path, 0o666),
        lambda: os.setxattr(path, "user.imgfs.size", b"1"),
        lambda: os.symlink("x", m.images / "link"),
    ]
    for check in checks:
        with pytest.raises(OSError) as info:
            check()
        assert info.value.errno == errno.EROFS, info.value
    assert sha256_file(path) == sha256(store[0][IMAGE_B])


def test_new_object_found_by_lookup_and_removed_one_disappears(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3, refresh_interval=2))
    late = "1a7e0000-0000-4000-8000-00000000abcd"
    data = blob(MiB // 2, 7)
    s3.put_object(Bucket=s3.bucket, Key=late, Body=data)
    assert (m.images / late).stat().st_size == len(data)  # a lookup asks the store before ENOENT
    assert sha256_file(m.images / late) == sha256(data)
    assert not (m.images / "no-such-image").exists()
    s3.delete_object(Bucket=s3.bucket, Key=IMAGE_B)
    wait_for(lambda: IMAGE_B not in os.listdir(m.images), 20, "the deleted image to disappear")
    # the kernel may trust a name for an hour: imgfs tells it to forget this one, from a worker thread
    # just after the listing changed (so a moment after the listing shows it gone)
    wait_for(lambda: not (m.images / IMAGE_B).exists(), 5, "the kernel to forget the deleted image's name")


def test_xattrs_describe_without_secrets(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3))
    path = m.images / IMAGE_B
    names = os.listxattr(path)
    assert {"user.imgfs.size", "user.imgfs.stores", "user.imgfs.version", "user.imgfs.cached_fraction"} <= set(names)
    assert os.getxattr(path, "user.imgfs.size") == str(2 * MiB).encode()
    assert os.getxattr(path, "user.imgfs.cached_fraction") == b"0.0000"
    sha256_file(path)
    wait_for(lambda: os.getxattr(path, "user.imgfs.cached_fraction") == b"1.0000", 10, "the cache to fill")
    dump = subprocess.run(["getfattr", "-d", "-m", "-", str(path)], capture_output=True, text=True, check=True).stdout
    assert re.search(r'^user\.imgfs\.store="[^"]+"$', dump, re.M), dump  # the store xattr itself, not "stores"
    assert s3.server.secret_key not in dump and s3.server.access_key not in dump


def test_secrets_never_in_logs_or_errors(tmp_path, proxy, s3, store, mounter):
    """At DEBUG, through a good read and through a real S3 server that refuses our credentials (HTTP 403):
    neither key appears in the daemon's log, in check-config's output or in what a reader sees."""
    m = mounter(config_for(tmp_path, proxy, s3), "--debug")
    sha256_file(m.images / IMAGE_B)
    assert m.stop() == 0
    good_log = m.log()
    assert "DEBUG imgfs.reader: fetched " in good_log

    url, moto = start_moto(tmp_path / "moto-auth.log", INITIAL_NO_AUTH_ACTION_COUNT="0")  # IAM auth enforced
    try:
        refused = write_config(tmp_path / "refused.conf", s3_url=url, bucket="glance", cache_dir=tmp_path / "cache2")
        m2 = mounter(refused, "--debug", name="mnt2")
        with pytest.raises(FileNotFoundError) as info:
            (m2.images / IMAGE_A).stat()
        assert m2.stop() == 0
        check = subprocess.run([sys.executable, "-m", "imgfs", "check-config", "--probe", "--config-file", str(refused)],
                               capture_output=True, text=True, timeout=60)
    finally:
        moto.terminate()
        moto.wait(10)
    assert check.returncode == 1
    assert "access denied while listing the bucket (HTTP 403" in check.stdout
    assert "check s3_store_access_key / s3_store_secret_key" in m2.log()
    everything = good_log + m2.log() + str(info.value) + check.stdout + check.stderr
    for secret in (SECRET_KEY, ACCESS_KEY, s3.server.access_key, s3.server.secret_key):
        assert secret not in everything


def test_sigterm_unmounts_cleanly_even_with_a_reader(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3))
    fd = os.open(m.images / IMAGE_B, os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        assert m.stop(signal.SIGTERM) == 0
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert not is_mounted(m.path)
    assert "received SIGTERM" in m.log() and "unmounted" in m.log()


def test_unreachable_store_still_mounts_and_says_why(tmp_path, mounter):
    dead = f"http://127.0.0.1:{_closed_port()}"
    cfg = write_config(tmp_path / "dead.conf", s3_url=dead, bucket="glance", cache_dir=tmp_path / "cache",
                       s3_max_attempts=1, s3_connect_timeout=1)
    start = time.monotonic()
    m = mounter(cfg)
    assert time.monotonic() - start < 30
    assert os.listdir(m.images) == []
    lines = [line for line in m.log().splitlines() if "cannot connect" in line]
    assert len(lines) == 1 and "check s3_store_host" in lines[0]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_imgfs_verify_uses_the_etag_md5_without_glance(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3))
    result = subprocess.run([sys.executable, "-m", "imgfs", "verify", str(m.images / IMAGE_B)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "md5 OK" in result.stderr, result.stderr


def test_readahead_is_tuned_even_under_an_escaped_mount_point(tmp_path, mounter):
    """imgfs raises its mount's readahead (opens wait until it has: a file keeps the readahead it was
    opened with), under a mount point whose name /proc/self/mountinfo escapes too."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "img").write_bytes(b"x" * 4096)
    conf = write_config(tmp_path / "imgfs.conf", s3_url=None, bucket=None, cache_dir=tmp_path / "cache",
                        file_dir=files, read_ahead_kb=4096)
    m = mounter(conf, name="mount point")
    dev = os.stat(m.path).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    # the mount is visible a moment before the daemon has tuned it (opens wait for it; this read does not)
    wait_for(lambda: "mounted " in m.log(), 30, "the daemon's 'mounted' line, logged once tuned")
    assert int(bdi.read_text()) == 4096
    with open(m.images / "img", "rb") as f:  # and an open made now gets it
        assert f.read() == b"x" * 4096
    assert "cannot set" not in m.log()


def test_a_second_instance_on_the_same_cache_dir_is_refused_with_one_line(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3))
    (tmp_path / "mnt2").mkdir()
    result = subprocess.run([sys.executable, "-m", "imgfs", "mount", str(tmp_path / "mnt2"), "--config-file",
                             str(m.config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"is in use by the imgfs of {m.path} (pid {m.proc.pid})" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not is_mounted(tmp_path / "mnt2")
    assert sha256_file(m.images / IMAGE_A) == sha256(store[0][IMAGE_A])  # the first one never noticed
    assert m.stop() == 0
    m2 = mounter(m.config, name="mnt2")  # free again once the holder is gone
    assert m2.stop() == 0


def test_sighup_is_one_line_and_the_mount_serves_on(tmp_path, proxy, s3, store, mounter):
    m = mounter(config_for(tmp_path, proxy, s3))
    m.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "received SIGHUP: ignored" in m.log(), 10, "the SIGHUP line")
    assert m.proc.poll() is None and sha256_file(m.images / IMAGE_A) == sha256(store[0][IMAGE_A])
    assert m.stop() == 0
