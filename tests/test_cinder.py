"""Cinder image-volumes through a real kernel FUSE mount, on a REAL Keystone + Cinder + Ceph RBD (the
project's lab, tests/lab): imgfs authenticates with Keystone, lists image-volumes with cinderclient,
attaches read-only with the attachments API and reads through os-brick's RBD connector (librbd)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import uuid

import pytest

from .conftest import (
    host_attachments,
    is_mounted,
    sha256,
    sha256_file,
    volume_bytes,
    wait_for,
    write_cinder_config,
)

pytestmark = [pytest.mark.mount, pytest.mark.lab]
MiB = 1 << 20


@pytest.fixture
def host():
    """A host name of our own per test, so tests never see each other's attachments."""
    return f"imgfs-test-{uuid.uuid4().hex[:8]}"


def config(tmp_path, lab, host, **options):
    return write_cinder_config(tmp_path / "imgfs.conf", lab, cache_dir=tmp_path / "cache", host=host, **options)


def test_image_volume_reads_back_exactly(tmp_path, lab, cinder, image_volume, host, mounter):
    vol = image_volume(5 * MiB + 4321)
    m = mounter(config(tmp_path, lab, host), "--debug")
    path = m.images / vol.image_id
    assert path.stat().st_size == len(vol.data)  # image_size, not the 1 GiB volume
    assert sha256_file(path) == sha256(vol.data)
    assert sha256_file(m.path / "stores" / "cinderstore" / vol.image_id) == sha256(vol.data)
    assert os.getxattr(path, "user.imgfs.version").decode() == vol.volume_id
    assert os.getxattr(path, "user.imgfs.store") == b"cinderstore"
    dump = subprocess.run(["getfattr", "-d", "-m", "-", str(path)], capture_output=True, text=True, check=True).stdout
    assert m.stop() == 0
    log = m.log()
    assert "attached volume" in log and "DEBUG" in log
    keyring = open(lab["ceph"]["client_cinder_keyring"]).read()
    secrets = [lab["keystone"]["users"]["imgfs"]["password"]] + re.findall(r"key\s*=\s*(\S+)", keyring)
    assert len(secrets) == 2
    for secret in secrets:
        assert secret not in log and secret not in dump


def test_open_files_hold_nothing_and_fetches_share_one_attachment(tmp_path, lab, cinder, image_volume, host, mounter):
    """The image-volume is Glance's: imgfs holds it while chunks are fetched, plus a grace, not while
    files are open. Two readers' fetches share one attachment; with both files still open and their
    chunks cached, the attachment goes after the grace, and the files still read."""
    vol = image_volume(3 * MiB, multiattach=True)  # a volume only one host may attach gets at most 1 s
    # a grace long enough that two reads and a Cinder query fit in it on a loaded 2-core lab
    m = mounter(config(tmp_path, lab, host, attach_idle_timeout=10, memory_cache_mb=0))
    path = m.images / vol.image_id
    a, b = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        assert os.pread(a, MiB, 0) == vol.data[:MiB]
        assert os.pread(b, MiB, 2 * MiB) == vol.data[2 * MiB : 3 * MiB]
        attached = host_attachments(cinder, vol.volume_id, host)
        assert len(attached) == 1 and attached[0]["device"] == f"imgfs:cinderstore:{m.path}"
        wait_for(lambda: not host_attachments(cinder, vol.volume_id, host), 30, "the detach after the grace")
        assert cinder.volumes.get(vol.volume_id).status == "available"  # while both files are open
        os.posix_fadvise(a, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(a, MiB, 0) == vol.data[:MiB]  # from imgfs's chunk cache: no attach
        assert not host_attachments(cinder, vol.volume_id, host)
    finally:
        os.close(a)
        os.close(b)
    assert "detached volume" in m.log() and "(idle) after" in m.log()
    assert m.log().count("attached volume") == 1


def test_volume_held_by_another_host_is_never_taken(tmp_path, lab, cinder, image_volume, host, mounter):
    """Non-multiattach volume already attached by another host: EBUSY with one log line, and the other
    host's attachment untouched; with a second store holding the image, the read completes from it."""
    vol = image_volume(2 * MiB)
    other = {"host": "other-host", "platform": "x86_64", "os_type": "linux", "ip": "127.0.0.2", "multipath": False}
    theirs = cinder.attachments.create(vol.volume_id, other, mode="ro")
    cinder.attachments.complete(theirs["id"])
    try:
        m = mounter(config(tmp_path, lab, host, attach_timeout=2))
        with pytest.raises(OSError) as info:
            with open(m.images / vol.image_id, "rb") as f:
                f.read(4096)
        assert info.value.errno == errno.EBUSY
        assert [a["attachment_id"] for a in cinder.volumes.get(vol.volume_id).attachments] == [theirs["id"]]
        assert sum("not taking it" in line for line in m.log().splitlines()) >= 1
        assert m.stop() == 0

        # the same image in a file store too: the reader falls back to it and gets the right bytes
        files = tmp_path / "files"
        files.mkdir()
        (files / vol.image_id).write_bytes(vol.data)
        cfg2 = write_cinder_config(tmp_path / "fallback.conf", lab, cache_dir=tmp_path / "cache2", host=host,
                                   file_dir=files, attach_timeout=2, cinder_weight=100)  # Cinder preferred
        m2 = mounter(cfg2, name="mnt2")
        assert sha256_file(m2.images / vol.image_id) == sha256(vol.data)
        assert "reading from store 'filestore' instead" in m2.log()
        assert [a["attachment_id"] for a in cinder.volumes.get(vol.volume_id).attachments] == [theirs["id"]]
    finally:
        cinder.attachments.delete(theirs["id"])


def test_multiattach_volume_attaches_alongside_another_host(tmp_path, lab, cinder, image_volume, host, mounter):
    vol = image_volume(2 * MiB + 1, multiattach=True)
    other = {"host": "other-host", "platform": "x86_64", "os_type": "linux", "ip": "127.0.0.2", "multipath": False}
    theirs = cinder.attachments.create(vol.volume_id, other, mode="ro")
    cinder.attachments.complete(theirs["id"])
    try:
        m = mounter(config(tmp_path, lab, host))
        assert sha256_file(m.images / vol.image_id) == sha256(vol.data)
        hosts = sorted(a["host_name"] for a in cinder.volumes.get(vol.volume_id).attachments)
        assert hosts == sorted([host, "other-host"])
        assert m.stop() == 0
        assert [a["host_name"] for a in cinder.volumes.get(vol.volume_id).attachments] == ["other-host"]
    finally:
        cinder.attachments.delete(theirs["id"])


def test_sigkill_then_restart_removes_the_stale_attachment(tmp_path, lab, cinder, image_volume, host, mounter):
    vol = image_volume(MiB, multiattach=True)  # held for the 60 s grace after the read, when the kill comes
    cfg = config(tmp_path, lab, host)
    m = mounter(cfg)
    assert sha256_file(m.images / vol.image_id) == sha256(vol.data)
    assert len(host_attachments(cinder, vol.volume_id, host)) == 1
    m.stop(signal.SIGKILL)
    subprocess.run(["fusermount3", "-uz", str(m.path)], check=True)
    assert len(host_attachments(cinder, vol.volume_id, host)) == 1  # left behind by the crash
    m2 = mounter(cfg)  # the same instance (mount point) again; ready = after its stale attachments are gone
    assert host_attachments(cinder, vol.volume_id, host) == []
    assert "removed stale attachment" in m2.log()
    assert m2.stop() == 0


def test_sigterm_leaves_zero_attachments(tmp_path, lab, cinder, image_volume, host, mounter):
    # multiattach: held for attach_idle_timeout after its last fetch (a volume only one host may attach
    # goes 1 s after it, and the idle one would already be gone when counted below)
    vols = [image_volume(MiB + i, multiattach=True) for i in range(2)]
    m = mounter(config(tmp_path, lab, host, attach_idle_timeout=600))
    fd = os.open(m.images / vols[0].image_id, os.O_RDONLY)
    os.pread(fd, 4096, 0)  # one held open, one idle-but-attached
    sha256_file(m.images / vols[1].image_id)
    assert all(len(host_attachments(cinder, v.volume_id, host)) == 1 for v in vols)
    try:
        assert m.stop(signal.SIGTERM) == 0
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert not is_mounted(m.path)
    assert all(host_attachments(cinder, v.volume_id, host) == [] for v in vols)


def test_writes_refused_and_the_volume_unchanged(tmp_path, lab, cinder, rbd_pool, image_volume, host, mounter):
    vol = image_volume(MiB)
    m = mounter(config(tmp_path, lab, host))
    path = m.images / vol.image_id
    sha256_file(path)  # attached now
    for attempt in (lambda: os.open(path, os.O_WRONLY), lambda: os.open(path, os.O_RDWR), lambda: os.truncate(path, 0)):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, info.value
    assert volume_bytes(rbd_pool, vol.volume_id, len(vol.data)) == vol.data


def test_read_only_volume_offers_no_way_to_write():
    """By construction: the only object imgfs keeps of an attached volume exposes reads, nothing else."""
    from imgfs.backends.cinder import ReadOnlyVolume

    public = {name for name in dir(ReadOnlyVolume) if not name.startswith("_")}
    assert public == {"pread", "close"}


def test_the_start_sweep_spares_glances_and_another_instances_attachments_on_this_host(tmp_path, lab, cinder,
                                                                                       image_volume, host, mounter):
    """On one host: glance-api's own attachment (glance_store's mountpoint), imgfs instance A holding the
    volume, then instance B starting on the same store and host name. B's start-up sweep removes only
    what an instance of its own mount point left; a killed A, restarted on its mount point, removes its
    own stale attachment and still spares glance-api's."""
    vol = image_volume(MiB + 3, multiattach=True)
    glances = {"host": host, "platform": "x86_64", "os_type": "linux", "ip": "127.0.0.1", "multipath": False,
               "mountpoint": "glance_store"}
    theirs = cinder.attachments.create(vol.volume_id, glances, mode="ro")
    cinder.attachments.complete(theirs["id"])
    try:
        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        cfg_a = write_cinder_config(a_dir / "imgfs.conf", lab, cache_dir=a_dir / "cache", host=host, attach_idle_timeout=600)
        cfg_b = write_cinder_config(b_dir / "imgfs.conf", lab, cache_dir=b_dir / "cache", host=host)
        a = mounter(cfg_a, name="mnt-a")
        assert sha256_file(a.images / vol.image_id) == sha256(vol.data)
        devices = lambda: sorted(x["device"] for x in host_attachments(cinder, vol.volume_id, host))  # noqa: E731
        assert devices() == sorted(["glance_store", f"imgfs:cinderstore:{a.path}"])
        b = mounter(cfg_b, name="mnt-b")  # ready = after its start-up sweep
        assert "removed stale attachment" not in b.log()
        assert devices() == sorted(["glance_store", f"imgfs:cinderstore:{a.path}"])
        assert b.stop() == 0
        assert devices() == sorted(["glance_store", f"imgfs:cinderstore:{a.path}"])
        a.stop(signal.SIGKILL)
        subprocess.run(["fusermount3", "-uz", str(a.path)], check=True)
        a2 = mounter(cfg_a, name="mnt-a")
        assert "removed stale attachment" in a2.log()
        assert devices() == ["glance_store"]
        assert a2.stop() == 0
        assert devices() == ["glance_store"]
    finally:
        cinder.attachments.delete(theirs["id"])
