"""The Cinder multi-attach rules' timing, on the lab's real Cinder (docs/openstack.md, "How imgfs
holds volumes"): every API call imgfs makes goes through a recording proxy in front of cinder-api
(``cinder_endpoint_template``), so each rule is checked against when Cinder was actually asked.

- a volume in a passing state is waited out with backoff: 0.5 s, doubling, at most 5 s apart;
- a volume another host holds is waited for up to ``attach_timeout``, then EBUSY;
- a volume only one host may attach is let go within 1 s of its last fetch; a multiattach one after
  ``attach_idle_timeout``;
- concurrent fetches share one attachment;
- an idle volume whose image leaves the catalog is let go at once, not after the grace;
- attachments a failed attach left are deleted every 10 s while the daemon runs, and at the stop;
- a detach waits for glance-api's ``glance_store-<volume_id>`` lock.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid

import pytest

from .conftest import host_attachments, sha256, sha256_file, wait_for, wait_volume, write_cinder_config
from .faultkit import status
from .s3proxy import CountingProxy

pytestmark = [pytest.mark.mount, pytest.mark.lab]
MiB = 1 << 20
# What one Cinder round trip (GET volume, then a refused POST) may add to a backoff step on the lab's
# two shared cores, with Ceph beside it. The lower bounds below are exact: imgfs sleeps between tries.
API_SLACK = 1.5


@pytest.fixture
def host():
    return f"imgfs-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cinder_proxy(lab):
    with CountingProxy(lab["cinder"]["endpoint"]) as proxy:
        yield proxy


def config(tmp_path, lab, host, proxy: CountingProxy, **options):
    path = write_cinder_config(tmp_path / "imgfs.conf", lab, cache_dir=tmp_path / "cache", host=host, **options)
    text = path.read_text().replace("[cinderstore]\n", f"[cinderstore]\ncinder_endpoint_template = {proxy.url}/v3/%(project_id)s\n", 1)
    path.write_text(text)
    return path


def reserves(proxy: CountingProxy) -> list[float]:
    """When imgfs asked Cinder for an attachment (POST /attachments; not .../action, the complete)."""
    return [r.at for r in proxy.calls("POST", "/attachments") if r.path.split("?")[0].endswith("/attachments")]


def deletes(proxy: CountingProxy, attachment_id: str = "") -> list[float]:
    return [r.at for r in proxy.calls("DELETE", f"/attachments/{attachment_id}")]


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in zip(times, times[1:])]


def assert_backoff(observed: list[float], expected: list[float]) -> None:
    """Each gap between tries is at least imgfs's sleep and at most the sleep plus a round trip."""
    assert len(observed) >= len(expected), f"gaps {observed}, want at least {expected}"
    for got, want in zip(observed, expected):
        assert want <= got <= want + API_SLACK, f"gaps between tries {observed}, want {expected} (+{API_SLACK}s each)"


def reset(cinder, volume_id: str, state: str) -> None:
    cinder.volumes.reset_state(volume_id, state)
    wait_volume(cinder, volume_id, state, timeout=30)


def test_a_volume_in_a_passing_state_is_waited_out_with_backoff(tmp_path, lab, cinder, image_volume, host, cinder_proxy, mounter):
    """'attaching' left by someone else: Cinder refuses each reservation; imgfs tries again 0.5, 1, 2, 4,
    5, 5 s later (never faster, never slower than a round trip more), and reads once the volume is free."""
    vol = image_volume(2 * MiB + 3)
    reset(cinder, vol.volume_id, "attaching")
    m = mounter(config(tmp_path, lab, host, cinder_proxy, attach_timeout=60))
    result: dict = {}

    def read() -> None:
        try:
            result["sha"] = sha256_file(m.images / vol.image_id)
        except OSError as e:
            result["error"] = e

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_for(lambda: len(reserves(cinder_proxy)) >= 7, 40, "seven refused reservations")
    finally:
        reset(cinder, vol.volume_id, "available")
        reader.join(60)
    assert not reader.is_alive() and result == {"sha": sha256(vol.data)}, result
    tries = reserves(cinder_proxy)
    assert_backoff(gaps(tries[:7]), [0.5, 1, 2, 4, 5, 5])
    assert [r.status for r in cinder_proxy.calls("POST", "/attachments")][:7] == [400] * 7  # refused, none completed
    assert "is attaching; retrying in 0.5s" in m.log()


def test_a_volume_another_host_holds_is_waited_for_up_to_attach_timeout(tmp_path, lab, cinder, image_volume, host, cinder_proxy, mounter):
    """A volume only one host may attach, in use by another host: waited for as a passing state, then
    EBUSY once the next wait would pass ``attach_timeout`` -- and the other host's attachment untouched."""
    vol = image_volume(2 * MiB)
    other = {"host": "other-host", "platform": "x86_64", "os_type": "linux", "ip": "127.0.0.2", "multipath": False}
    theirs = cinder.attachments.create(vol.volume_id, other, mode="ro")
    cinder.attachments.complete(theirs["id"])
    try:
        m = mounter(config(tmp_path, lab, host, cinder_proxy, attach_timeout=6))
        began = time.monotonic()
        with pytest.raises(OSError) as info:
            with open(m.images / vol.image_id, "rb") as f:
                f.read(4096)
        waited = time.monotonic() - began
        assert info.value.errno == errno.EBUSY
        tries = reserves(cinder_proxy)
        # 0.5 + 1 + 2 s of waits; the next (4 s) would end past the 6 s timeout, so the reader is told
        assert_backoff(gaps(tries[:4]), [0.5, 1, 2])
        assert 3.5 <= tries[3] - began and waited < 6 + 4 * API_SLACK, f"EBUSY after {waited:.1f}s, tries at {gaps([began] + tries)}"
        assert [a["attachment_id"] for a in cinder.volumes.get(vol.volume_id).attachments] == [theirs["id"]]
        assert not deletes(cinder_proxy)
    finally:
        cinder.attachments.delete(theirs["id"])


@pytest.mark.parametrize("multiattach, grace, expected", [(False, 30, 1.0), (True, 3, 3.0)], ids=["single-attach", "multiattach"])
def test_the_attachment_goes_its_grace_after_the_last_fetch(tmp_path, lab, cinder, image_volume, host, cinder_proxy, mounter,
                                                             multiattach, grace, expected):
    """A volume only one host may attach is held at most 1 s after its last fetch (however long the
    configured grace), so glance-api and other hosts can have it; a multiattach one for the grace."""
    vol = image_volume(4 * MiB + 11, multiattach=multiattach)
    m = mounter(config(tmp_path, lab, host, cinder_proxy, attach_idle_timeout=grace, memory_cache_mb=0))
    assert sha256_file(m.images / vol.image_id) == sha256(vol.data)
    read_done = time.monotonic()  # the last fetch ended before this
    wait_for(lambda: deletes(cinder_proxy), expected + 30, "the detach")
    (deleted,) = deletes(cinder_proxy)
    (reserved,) = reserves(cinder_proxy)
    after = deleted - read_done
    # not before the grace could have ended (a fetch ends before its read returns, by at most the
    # reply's way through FUSE), and not later than a round trip (os-brick's disconnect, Cinder) after it
    assert expected - 0.5 <= after <= expected + API_SLACK, f"detached {after:.2f}s after the read, want ~{expected}s"
    assert reserved < read_done
    wait_for(lambda: not host_attachments(cinder, vol.volume_id, host), 30, "Cinder to drop the attachment")


def test_concurrent_fetches_share_one_attachment(tmp_path, lab, cinder, image_volume, host, cinder_proxy, mounter):
    """Two readers of different chunks while the attach is under way (Cinder slowed to 2 s per
    reservation): both fetches wait for the one attachment and hold it together (refcount 2), and
    Cinder is asked for exactly one."""
    vol = image_volume(8 * MiB, multiattach=True)
    m = mounter(config(tmp_path, lab, host, cinder_proxy, attach_idle_timeout=30, memory_cache_mb=0))
    cinder_proxy.inject("delay", "/attachments", method="POST", seconds=2.0, count=1)
    got: dict[int, bytes | OSError] = {}
    start = threading.Barrier(2)

    def read(offset: int) -> None:
        with open(m.images / vol.image_id, "rb", buffering=0) as f:
            start.wait()
            try:
                got[offset] = os.pread(f.fileno(), MiB, offset)
            except OSError as e:
                got[offset] = e

    readers = [threading.Thread(target=read, args=(off,)) for off in (0, 6 * MiB)]
    for t in readers:
        t.start()
    refs = []
    wait_for(lambda: refs.extend(a["refcount"] for a in status(m)["attachments"]) or max(refs, default=0) >= 2, 20,
             "two fetches holding the volume at once")
    for t in readers:
        t.join(60)
    assert not any(t.is_alive() for t in readers)
    assert got == {0: vol.data[:MiB], 6 * MiB: vol.data[6 * MiB : 7 * MiB]}
    assert len(reserves(cinder_proxy)) == 1
    assert len(host_attachments(cinder, vol.volume_id, host)) == 1
    totals = status(m)["attachment_totals"][0]
    assert totals["attaches"] == 1 and totals["fetches"] >= 2


def test_an_idle_volume_whose_image_leaves_the_catalog_is_let_go_at_once(tmp_path, lab, cinder, image_volume, host, cinder_proxy, mounter):
    """Within its 60 s grace, Cinder starts migrating the volume: the next refresh (1 s) drops the image,
    and imgfs detaches at once instead of at the end of the grace, and does not attach it again.

    (A migration, not a status: Cinder sets an image-volume's status back to available when its last
    attachment goes, so a status reset would be undone by imgfs's own detach.)"""
    vol = image_volume(2 * MiB, multiattach=True)
    m = mounter(config(tmp_path, lab, host, cinder_proxy, attach_idle_timeout=60, refresh_interval=1))
    assert sha256_file(m.images / vol.image_id) == sha256(vol.data)
    assert not deletes(cinder_proxy)
    cinder.volumes.reset_state(vol.volume_id, "in-use", migration_status="migrating")
    changed = time.monotonic()
    try:
        wait_for(lambda: deletes(cinder_proxy), 30, "the detach")
        after = deletes(cinder_proxy)[0] - changed
        # one refresh (1 s, jittered) and a listing, then the detach: far inside the 60 s grace
        assert after <= 1.2 + 3 * API_SLACK, f"detached {after:.1f}s after the volume left, want at the next refresh"
        wait_for(lambda: not host_attachments(cinder, vol.volume_id, host), 30, "Cinder to drop the attachment")
        wait_for(lambda: "(image left the catalog)" in m.log(), 10, "the detach line")
        wait_for(lambda: not (m.images / vol.image_id).exists(), 10, "the image to leave the mount")
        with pytest.raises(FileNotFoundError):
            open(m.images / vol.image_id, "rb")
        assert len(reserves(cinder_proxy)) == 1
    finally:
        cinder.volumes.reset_state(vol.volume_id, "available", migration_status="none")
        wait_volume(cinder, vol.volume_id, "available", timeout=30)


def volume_attachments(cinder, volume_id: str) -> list[str]:
    """Every attachment of the volume, reservations included (a reservation has no host yet)."""
    return [a.id for a in cinder.attachments.list(search_opts={"volume_id": volume_id})]


def test_attachments_a_failed_attach_left_are_deleted_every_10s_and_at_the_stop(tmp_path, lab, cinder, image_volume, host, cinder_proxy, mounter):
    """The connector step fails (Cinder answers 400 to the update) and so does the delete that should
    undo the reservation: the attachment is an orphan. imgfs tries again every 10 s while it runs
    (deleted once Cinder lets it); one that is still refused at the stop is tried once more and named
    in one line."""
    from imgfs.attach import ORPHAN_RETRY

    vol = image_volume(2 * MiB, multiattach=True)
    m = mounter(config(tmp_path, lab, host, cinder_proxy, attach_timeout=5))
    update = cinder_proxy.inject("status", "/attachments/", method="PUT", status=400)
    refuse = cinder_proxy.inject("status", "/attachments/", method="DELETE", status=400)
    with pytest.raises(OSError) as info:
        read_one(m.images / vol.image_id, 0)
    # EIO; or EBUSY, when the kernel retried the read and met the volume 'reserved' by the orphan itself
    assert info.value.errno in (errno.EIO, errno.EBUSY)
    cinder_proxy.faults.remove(update)
    assert volume_attachments(cinder, vol.volume_id), "the failed attach left no reservation: nothing was tested"
    first = cinder_proxy.calls("DELETE", "/attachments/")[0].path.rsplit("/", 1)[-1]  # the undo's own delete
    wait_for(lambda: len(deletes(cinder_proxy, first)) >= 3, 3 * ORPHAN_RETRY + 10, "two retries of the delete")
    cinder_proxy.faults.remove(refuse)
    wait_for(lambda: not volume_attachments(cinder, vol.volume_id), ORPHAN_RETRY + 10, "the orphans deleted while imgfs runs")
    # The proxy records a request once it relayed the answer, so Cinder may show the attachment gone
    # a moment before the delete that did it is on record.
    wait_for(lambda: len(deletes(cinder_proxy, first)) >= 4, 10, "the delete that worked, on record")
    tries = deletes(cinder_proxy, first)
    assert_backoff(gaps(tries[:4]), [ORPHAN_RETRY] * 3)
    assert f"deleted attachment {first} of volume {vol.volume_id} that a failed attach left" in m.log()

    # again, and Cinder never lets go: the stop tries once more and says what is left
    update = cinder_proxy.inject("status", "/attachments/", method="PUT", status=400)
    cinder_proxy.inject("status", "/attachments/", method="DELETE", status=400)
    with pytest.raises(OSError):
        read_one(m.images / vol.image_id, MiB)
    left = volume_attachments(cinder, vol.volume_id)
    assert left
    stopping = time.monotonic()
    assert m.stop() == 0
    try:
        wait_for(lambda: any(t >= stopping for t in deletes(cinder_proxy, left[0])), 5, "the stop's own try of the delete")
        lines = [line for line in m.log().splitlines() if "Cinder did not let us delete" in line]
        assert len(lines) == 1 and all(a in lines[0] for a in left), lines
    finally:
        for a in left:
            cinder.attachments.delete(a)


def read_one(path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 4096, offset)
    finally:
        os.close(fd)


def test_a_detach_waits_for_glance_apis_lock_on_the_volume(tmp_path, lab, cinder, image_volume, host, cinder_proxy, mounter):
    """glance-api holds ``glance_store-<volume_id>`` in lock_path while it attaches, reads or detaches:
    imgfs's detach takes the same lock, so it cannot delete the attachment until glance-api lets go."""
    from oslo_concurrency import lockutils

    vol = image_volume(2 * MiB, multiattach=True)
    locks = tmp_path / "locks"  # write_cinder_config's lock_path
    m = mounter(config(tmp_path, lab, host, cinder_proxy, attach_idle_timeout=1))
    with lockutils.external_lock(vol.volume_id, lock_file_prefix="glance_store-", lock_path=str(locks)):
        assert sha256_file(m.images / vol.image_id) == sha256(vol.data)
        time.sleep(1 + 3)  # the grace, then time for a detach that ignored the lock to reach Cinder
        assert not deletes(cinder_proxy), "imgfs deleted its attachment while glance-api held the volume's lock"
        released = time.monotonic()
    wait_for(lambda: deletes(cinder_proxy), 30, "the detach once the lock is free")
    assert deletes(cinder_proxy)[0] >= released
    wait_for(lambda: not host_attachments(cinder, vol.volume_id, host), 30, "Cinder to drop the attachment")
