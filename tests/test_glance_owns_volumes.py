"""imgfs never stands in Glance's way (lab: real Glance, Cinder, Ceph): an image-volume is attached
while chunks are fetched from it, plus a short grace, and let go for good once the image leaves the
catalog, so Glance can delete it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from .conftest import wait_for
from .test_glance import glance, glance_image, imgfs_config, start  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.mount, pytest.mark.lab]
MiB = 1 << 20


def status(m) -> dict:
    out = subprocess.run([sys.executable, "-m", "imgfs", "status", "--json", "--mount", str(m.path)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def attached(m) -> list[str]:
    return [a["volume_id"] for a in status(m)["attachments"] if a["attached"]]


def test_glance_deletes_an_image_imgfs_has_read_from_its_volume(tmp_path, lab, glance, glance_image, mounter):
    img, data = glance_image(3 * MiB + 5, copy_to=("cinderstore",))
    m = start(mounter, tmp_path, imgfs_config(tmp_path, lab, attach_idle_timeout=2, memory_cache_mb=0))
    path = m.path / "stores" / "cinderstore" / img["id"]
    wait_for(path.exists, 30, "the image-volume in the mount")
    volume_id = os.getxattr(path, "user.imgfs.version").decode()
    assert path.read_bytes() == data
    t = status(m)["attachment_totals"][0]
    assert t["attaches"] == 1 and t["fetches"] >= 1
    # the attachment outlives the last fetch by the grace only, though nobody closed anything yet
    wait_for(lambda: volume_id not in attached(m), 2 + 10, "imgfs to let go of the image-volume")
    glance("DELETE", f"/v2/images/{img['id']}")  # the fixture asserts < 400: no HTTP 500 from a held volume
    wait_for(lambda: img["id"] not in os.listdir(m.path / "stores" / "cinderstore"), 20, "the mount to drop the image")
    assert volume_id not in attached(m)
    assert "detached volume " + volume_id in m.log() and "(idle) after" in m.log()


def test_an_open_file_of_a_deleted_image_gets_a_clean_error_never_other_bytes(tmp_path, lab, glance, glance_image,
                                                                            mounter):
    """The file is open and fully cached when Glance deletes the image. Before the catalog notices, a
    read gets the right bytes (page cache or chunk cache). Once it shows the image gone, imgfs drops the
    kernel's cache of the file and the image's chunks and never attaches the volume again: the kernel,
    revalidating the file's attributes, is told the image no longer exists (ENOENT); a read that got
    as far as the reader would fail with EIO. Never other bytes."""
    img, data = glance_image(2 * MiB, copy_to=("cinderstore",))
    m = start(mounter, tmp_path, imgfs_config(tmp_path, lab, attach_idle_timeout=1, memory_cache_mb=0))
    path = m.path / "stores" / "cinderstore" / img["id"]
    wait_for(path.exists, 30, "the image-volume in the mount")
    volume_id = os.getxattr(path, "user.imgfs.version").decode()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 0) == data
        wait_for(lambda: volume_id not in attached(m), 1 + 10, "imgfs to let go of the image-volume")
        glance("DELETE", f"/v2/images/{img['id']}")
        try:  # before the catalog notices (a refresh may already have): the right bytes, or ENOENT/EIO
            assert os.pread(fd, MiB, 0) == data[:MiB]  # maybe the page cache, maybe imgfs's chunk cache
        except OSError as e:
            assert e.errno in (errno.ENOENT, errno.EIO), e
        wait_for(lambda: img["id"] not in os.listdir(m.path / "stores" / "cinderstore"), 20, "the catalog to drop it")

        def refused() -> bool:
            """Dropping the kernel's cache and the chunks runs in the background once the catalog has
            dropped the image: until then a read may still get the image's own bytes, never others."""
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                got = os.pread(fd, MiB, MiB)
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.EIO), e
                return True
            assert got == data[MiB:2 * MiB], "other bytes from an open file of a deleted image"
            return False

        wait_for(refused, 15, "reads of the deleted image to fail")
    finally:
        os.close(fd)
    assert volume_id not in attached(m)
    assert "not attaching it again" in m.log() or "detaching it" in m.log()
    assert status(m)["attachment_totals"][0]["attaches"] == 1  # the gone volume was not attached again


def test_a_single_attach_image_volume_is_shared_in_turns_by_imgfs_glance_and_another_host(
        tmp_path, lab, glance, glance_image, mounter):
    """A cinder store on a volume type that is not multiattach (most clouds' default): one holder at a
    time. While host A's imgfs reads the image slowly (so it holds the volume throughout), glance-api
    downloads the same image and host B's imgfs reads it. Cinder refuses both at first (`in-use`):
    glance_store retries, imgfs on B waits with backoff, and A lets go a second after its last fetch.
    Everyone gets every byte."""
    store = lab["glance"]["single_attach_store"]
    size = 24 * MiB
    img, data = glance_image(size, copy_to=(store,))
    mounts = {}
    for host in ("a", "b"):
        d = tmp_path / host
        d.mkdir()
        mounts[host] = start(mounter, d, imgfs_config(d, lab, memory_cache_mb=0, host=f"imgfs-single-{host}-{os.getpid()}"),
                             name=f"mnt-{host}")
    path = {h: m.path / "stores" / store / img["id"] for h, m in mounts.items()}
    for p in path.values():
        wait_for(p.exists, 30, "the single-attach image-volume in the mount")
    volume_id = os.getxattr(path["a"], "user.imgfs.version").decode()
    results: dict[str, object] = {}

    def host_a_reads_slowly():
        # one 1 MiB chunk every 0.2 s, in random order (no readahead, no prefetch): each is a fetch, so A
        # keeps the volume for ~5 s
        order = random.Random(7).sample(range(size // MiB), size // MiB)
        got = bytearray(size)
        fd = os.open(path["a"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for i in order:
                got[i * MiB:(i + 1) * MiB] = os.pread(fd, MiB, i * MiB)
                time.sleep(0.2)
        finally:
            os.close(fd)
        results["a"] = hashlib.sha256(got).hexdigest()

    def glance_downloads():
        results["glance"] = hashlib.sha256(glance("GET", f"/v2/images/{img['id']}/file").content).hexdigest()

    def host_b_reads():
        results["b"] = hashlib.sha256(path["b"].read_bytes()).hexdigest()

    def run(name, fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001  (reported below, with the name)
            results[name] = e

    a = threading.Thread(target=run, args=("a", host_a_reads_slowly))
    a.start()
    wait_for(lambda: volume_id in attached(mounts["a"]), 30, "host A to attach the image-volume")
    others = [threading.Thread(target=run, args=(n, f)) for n, f in (("glance", glance_downloads), ("b", host_b_reads))]
    for t in others:
        t.start()
    for t in (a, *others):
        t.join(180)
        assert not t.is_alive(), "a reader hung"
    want = hashlib.sha256(data).hexdigest()
    assert results == {"a": want, "glance": want, "b": want}, results
    # B met the volume held (by A, or by Glance) and waited; neither host took it from the other
    assert f"volume {volume_id} of image {img['id']} is in-use; retrying" in mounts["b"].log()
    for m in mounts.values():
        wait_for(lambda m=m: volume_id not in attached(m), 10, "imgfs to let go of the single-attach volume")
        t = status(m)["attachment_totals"]
        assert sum(x["attaches"] for x in t) >= 1
