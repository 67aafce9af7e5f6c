"""Fault matrix, Cinder rows, on the real lab: cinder-api, RabbitMQ or the Ceph OSD stopped (SIGSTOP: a
hung service, the hard case: connections open but nothing answers) around reads of an image-volume,
and the volume held by another host.

A file store serves another image throughout: the daemon must keep serving it while Cinder is sick.
Every stopped daemon is resumed (SIGCONT) whatever happens, so the lab stays usable."""

from __future__ import annotations

import errno
import os
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from imgfs.reader import UNAVAILABLE_HOLD

from .conftest import LAB_DIR, ImageVolume, Mount, random_bytes, wait_for, write_cinder_config
from .faultkit import (MiB, Baseline, assert_no_leaks, assert_one_line, assert_reads_exactly, baseline, read_checked)

pytestmark = [pytest.mark.mount, pytest.mark.lab]

API_TIMEOUT = 4.0
VOLUME_READ_TIMEOUT = 3.0


@contextmanager
def stopped(name: str):
    """SIGSTOP a lab daemon's process group (its pid file: "PID STARTTIME ARGV0"), SIGCONT at the end."""
    pid, start, _ = (LAB_DIR / "data" / "pids" / f"{name}.pid").read_text().split(maxsplit=2)
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[19] == start, f"{name}'s pid {pid} is not the lab's any more"
    os.killpg(int(pid), signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(int(pid), signal.SIGCONT)


@dataclass
class Rig:
    mount: Mount
    vol: ImageVolume
    other: bytes
    host: str
    base: Baseline

    @property
    def victim(self):
        return self.mount.images / self.vol.image_id

    def attachments(self, cinder) -> list[dict]:
        return cinder.volumes.get(self.vol.volume_id).attachments

    def other_reads(self) -> None:
        assert_reads_exactly(self.mount.images / "other-image", self.other)


@pytest.fixture
def rig(tmp_path, lab, image_volume, mounter) -> Rig:
    """A multiattach image-volume: imgfs keeps its attachment for the grace (60 s here) after a fetch,
    so a fault injected between two reads meets an attached volume."""
    return make_rig(tmp_path, lab, image_volume, mounter, multiattach=True)


@pytest.fixture
def single_rig(tmp_path, lab, image_volume, mounter) -> Rig:
    """A volume only one host may attach (the lab's default type)."""
    return make_rig(tmp_path, lab, image_volume, mounter, multiattach=False)


def make_rig(tmp_path, lab, image_volume, mounter, *, multiattach: bool) -> Rig:
    files = tmp_path / "files"
    files.mkdir()
    other = random_bytes(3 * MiB + 1, 31)
    (files / "other-image").write_bytes(other)
    host = f"imgfs-test-{uuid.uuid4().hex[:8]}"
    vol = image_volume(16 * MiB + 77, multiattach=multiattach)
    conf = write_cinder_config(tmp_path / "imgfs.conf", lab, cache_dir=tmp_path / "cache", host=host, file_dir=files,
                               cinder_api_timeout=API_TIMEOUT, volume_read_timeout=VOLUME_READ_TIMEOUT, attach_timeout=5)
    m = mounter(conf, "--debug")
    return Rig(m, vol, other, host, baseline(m))


def fails_cleanly(rig: Rig, observed, *, within: float, expect: int = errno.EIO, **read) -> None:
    result = read_checked(rig.victim, rig.vol.data, **read)
    assert result.errno == expect, f"got {result.error} after {result.good} bytes, want {errno.errorcode[expect]}"
    assert result.seconds < within, f"the reader waited {result.seconds:.1f}s (bound {within}s)"
    observed(f"{result.error} in {result.seconds:.1f}s")


def recovers(rig: Rig, cinder) -> None:
    """The same image reads exactly once the fault is gone; at the stop nothing is left in Cinder."""
    time.sleep(UNAVAILABLE_HOLD)  # a copy that did not answer is not asked again for this long
    assert_reads_exactly(rig.victim, rig.vol.data)
    rig.other_reads()
    assert_no_leaks(rig.mount, rig.base)
    assert rig.mount.stop() == 0
    wait_for(lambda: not rig.attachments(cinder), 60, "every attachment of the volume to be gone")


@pytest.mark.parametrize("daemon", [
    pytest.param("cinder-api", marks=pytest.mark.cell("cinder", "cinder-api down (hung) at open")),
    pytest.param("rabbitmq", marks=pytest.mark.cell("cinder", "RabbitMQ down (hung) at attach")),
])
def test_cinder_not_answering(rig, cinder, observed, daemon):
    """cinder-api hung: the volume lookup gets no answer. RabbitMQ hung: the attachment is reserved, but
    handing over the connector needs cinder-volume and gets no answer; the reservation is deleted."""
    with stopped(daemon):
        fails_cleanly(rig, observed, within=6 * API_TIMEOUT)
        rig.other_reads()
    assert_one_line(rig.mount, f"read of image {rig.vol.image_id} failed \\(EIO\\).*cinderstore.*no answer within cinder_api_timeout")
    # while imgfs still runs (a stop would delete orphans anyway): what the hung attach left is deleted
    began = time.monotonic()
    # the attachments API lists reservations too (the volume's own list shows attached ones only)
    every = lambda: cinder.attachments.list(search_opts={"volume_id": rig.vol.volume_id})  # noqa: E731
    wait_for(lambda: not every(), 45, "the reservation of the hung attach to be deleted, imgfs running")
    observed(f"attachment reservations left while running: 0 after {time.monotonic() - began:.0f}s")
    recovers(rig, cinder)
    observed(f"{len(rig.attachments(cinder))} attachments left")


@pytest.mark.cell("cinder", "ceph-osd stopped mid-read")
def test_osd_stopped_mid_read(rig, cinder, observed):
    fd = os.open(rig.victim, os.O_RDONLY)
    try:
        assert read_checked(None, rig.vol.data, stop=2 * MiB, fd=fd).errno is None  # attached, reading
        with stopped("ceph-osd"):
            rest = read_checked(None, rig.vol.data, start=2 * MiB, fd=fd)
            rig.other_reads()
    finally:
        os.close(fd)
    # chunks prefetched before the stop may still be served (they are the volume's bytes); then EIO
    assert rest.errno == errno.EIO, f"got {rest.error} after {rest.good} more bytes"
    assert rest.seconds < 4 * VOLUME_READ_TIMEOUT, f"the reader waited {rest.seconds:.1f}s"
    observed(f"EIO in {rest.seconds:.1f}s")
    assert_one_line(rig.mount, f"read of image {rig.vol.image_id} failed \\(EIO\\).*took over 3s \\(volume_read_timeout\\)")
    recovers(rig, cinder)


@pytest.mark.cell("cinder", "volume attached by another host")
def test_volume_held_by_another_host(single_rig, cinder, observed):
    rig = single_rig
    other = {"host": "other-host", "platform": "x86_64", "os_type": "linux", "ip": "127.0.0.2", "multipath": False}
    theirs = cinder.attachments.create(rig.vol.volume_id, other, mode="ro")
    try:
        cinder.attachments.complete(theirs["id"])
        fails_cleanly(rig, observed, within=30, expect=errno.EBUSY)
        rig.other_reads()
        assert [a["attachment_id"] for a in rig.attachments(cinder)] == [theirs["id"]], "the other host's attachment changed"
        assert_one_line(rig.mount, f"read of image {rig.vol.image_id} failed \\(EBUSY\\).*not taking it")
    finally:
        cinder.attachments.delete(theirs["id"])
    wait_for(lambda: not rig.attachments(cinder), 30, "the other host to let go")
    recovers(rig, cinder)


@pytest.mark.cell("cinder", "ceph-osd stopped mid-read")
def test_stop_while_the_osd_is_stopped(rig, cinder, observed):
    """A read hung in librbd must not hang the daemon's stop: the attachment is deleted, the hung
    connection is left to end with the process."""
    fd = os.open(rig.victim, os.O_RDONLY)
    try:
        assert read_checked(None, rig.vol.data, stop=MiB, fd=fd).errno is None
        with stopped("ceph-osd"):
            assert read_checked(None, rig.vol.data, start=MiB, fd=fd).errno == errno.EIO
            os.close(fd)
            fd = -1
            began = time.monotonic()
            assert rig.mount.stop(timeout=60) == 0
            took = time.monotonic() - began
            assert not rig.attachments(cinder), "the attachment outlived the daemon"
    finally:
        if fd >= 0:
            os.close(fd)
    observed(f"stop with the OSD still stopped: exit 0 in {took:.1f}s, 0 attachments")
    assert_one_line(rig.mount, "a read of volume .* is still hung after 3s")
