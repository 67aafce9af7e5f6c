"""A restart hands the Cinder attachments over: the REAL lab's Cinder on Ceph RBD, read through librbd
on this host, and a service manager of the tests' own (fdstorekit) standing in for systemd's fd store
(the container that runs a real systemd has no librbd nor the lab). A reader holding a file open reads
on through the adopted attachment; Cinder never sees a second one; nothing is left after a stop."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid

import pytest

from .conftest import host_attachments, is_mounted, write_cinder_config
from .fdstorekit import FdStoreManager

pytestmark = [pytest.mark.mount, pytest.mark.lab]
MiB = 1 << 20


@pytest.fixture
def service(tmp_path, lab):
    """(host name, start(config) -> manager, mount point, reader(path) -> Reader): one imgfs under the
    tests' fd store."""
    host, mnt = f"imgfs-test-{uuid.uuid4().hex[:8]}", tmp_path / "mnt"
    mnt.mkdir()
    managers: list[FdStoreManager] = []
    readers: list[Reader] = []

    def reader(path) -> Reader:
        readers.append(Reader(path))
        return readers[-1]

    def start(**options) -> FdStoreManager:
        cfg = write_cinder_config(tmp_path / "imgfs.conf", lab, cache_dir=tmp_path / "cache", host=host,
                                  # every read a fetch of its own 1 MiB chunk: the successor must fetch
                                  prefetch_max_mb=0, memory_cache_mb=0, attach_idle_timeout=600, **options)
        manager = FdStoreManager(tmp_path, [sys.executable, "-m", "imgfs", "mount", str(mnt), "--config-file", str(cfg),
                                            "--debug"], tmp_path / "imgfs.log")
        managers.append(manager)
        manager.start(mnt)
        return manager

    yield host, start, mnt, reader
    # A reader killed while nobody serves the mount (a failed hand-over) waits in its exit for the
    # FLUSH of its file until the last fd of the connection is closed: kill, close what is kept, reap.
    for r in readers:
        r.kill()
    for manager in managers:
        manager.close()
    for r in readers:
        r.proc.wait(60)
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        pytest.fail(f"{mnt} still mounted after the test")


# A reader in a process of its own: whoever forks the next imgfs must hold no file of the mount (its
# child's close of it waits for a FLUSH answer only the next imgfs can give; systemd holds none).
_READER = """
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
def part(start, end):
    return hashlib.sha256(b"".join(os.pread(fd, min(1 << 20, end - at), at) for at in range(start, end, 1 << 20)))
print(part(0, 1 << 20).hexdigest(), flush=True)
sys.stdin.readline()
print(part(1 << 20, size).hexdigest(), flush=True)
"""


class Reader:
    """Holds the image open across a restart: its first MiB before, the rest after."""

    def __init__(self, path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _READER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.first = self.proc.stdout.readline().strip()

    def rest(self) -> str:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        rest = self.proc.stdout.readline().strip()
        assert self.proc.wait(60) == 0
        return rest

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_restart_leaves_the_attachment_to_the_next_imgfs(service, cinder, image_volume):
    host, start, mnt, open_reader = service
    vol = image_volume(6 * MiB + 123, multiattach=True)
    manager = start()
    reader = open_reader(mnt / "images" / vol.image_id)
    assert reader.first == sha(vol.data[:MiB])
    [mine] = host_attachments(cinder, vol.volume_id, host)

    assert manager.hand_over() == 0
    assert "attachments" in manager.names() and is_mounted(mnt)
    # between the two processes the attachment stays in Cinder, and the mount with the kernel
    assert [a["attachment_id"] for a in host_attachments(cinder, vol.volume_id, host)] == [mine["attachment_id"]]
    first = manager.log()
    assert f"leaving 1 attachments of store 'cinderstore' to the next imgfs: {mine['attachment_id']}" in first

    manager.start(mnt)
    assert reader.rest() == sha(vol.data[MiB:])  # the open file reads on, from the volume
    assert [a["attachment_id"] for a in host_attachments(cinder, vol.volume_id, host)] == [mine["attachment_id"]]
    after = manager.log()[len(first):]
    assert f"adopted attachment {mine['attachment_id']} of volume {vol.volume_id}" in after
    assert "attached volume" not in after and "removed stale attachment" not in after
    assert "attachments" not in manager.names()  # taken: a later crash does not adopt it again
    assert manager.stop() == 0
    assert host_attachments(cinder, vol.volume_id, host) == [] and not is_mounted(mnt)


def test_an_attachment_deleted_during_the_restart_is_made_anew(service, cinder, image_volume):
    host, start, mnt, open_reader = service
    vol = image_volume(3 * MiB, multiattach=True)
    manager = start()
    reader = open_reader(mnt / "images" / vol.image_id)
    assert reader.first == sha(vol.data[:MiB])
    [mine] = host_attachments(cinder, vol.volume_id, host)
    assert manager.hand_over() == 0
    cinder.attachments.delete(mine["attachment_id"])  # an operator, or Cinder, between the two
    first = manager.log()
    manager.start(mnt)
    assert reader.rest() == sha(vol.data[MiB:])
    after = manager.log()[len(first):]
    assert f"attachment {mine['attachment_id']} of volume {vol.volume_id} is gone" in after
    assert "attached volume" in after
    [anew] = host_attachments(cinder, vol.volume_id, host)
    assert anew["attachment_id"] != mine["attachment_id"]
    assert manager.stop() == 0
    assert host_attachments(cinder, vol.volume_id, host) == []
