"""The multi-attach policy (imgfs.attach) on a fake Cinder, with trio's autojump clock: refcounts,
lazy attach, idle detach, retries only on transitional states, shutdown. The same rules run against
the real Cinder in test_cinder.py; here every interleaving is deterministic."""

from __future__ import annotations

import threading

import pytest
import trio

from imgfs.attach import Attachments, decode_handed, encode_handed
from imgfs.backends.cinder import VolumeBusy
from imgfs.errors import ImgfsError
from imgfs.model import HandedAttachment, Location


class FakeCinder:
    name = "fake"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attached: dict[str, int] = {}  # volume -> attachments of ours
        self.calls: list[tuple[str, str]] = []
        self.refuse: dict[str, list[str]] = {}  # volume -> statuses to answer with, in order
        self.single_attach: set[str] = set()  # volumes whose type is not multiattach
        self.stale: list[tuple[str, str]] = []
        self.left: dict[str, str] = {}  # attachment -> volume: a failed attach could not delete them
        self.deletable = True  # False: Cinder refuses deletes (RabbitMQ down)
        self.hung: set[str] = set()  # volumes a hung read holds: not handed over
        self.handed: dict[str, HandedAttachment] = {}
        self.gone_attachments: set[str] = set()  # deleted in Cinder during a hand-over

    def attach(self, volume_id: str) -> object:
        with self.lock:
            self.calls.append(("attach", volume_id))
            statuses = self.refuse.get(volume_id)
            if statuses:
                status = statuses.pop(0)
                raise VolumeBusy(f"volume {volume_id} is {status}", status, single_attach=volume_id in self.single_attach)
            self.attached[volume_id] = self.attached.get(volume_id, 0) + 1
        return object()

    def detach(self, volume_id: str) -> None:
        with self.lock:
            self.calls.append(("detach", volume_id))
            self.attached[volume_id] -= 1

    def stale_attachments(self) -> list[tuple[str, str]]:
        return list(self.stale)

    def delete_attachment(self, attachment_id: str) -> None:
        self.calls.append(("delete", attachment_id))
        if not self.deletable:
            raise ImgfsError(f"cannot delete {attachment_id}")
        self.left.pop(attachment_id, None)

    def orphans(self) -> list[tuple[str, str]]:
        return [(volume, attachment) for attachment, volume in self.left.items()]

    def prepare(self) -> None:
        pass

    # a hand-over: the attachment stays in Cinder, named to the next process
    def hand_over(self, volume_id: str) -> HandedAttachment | None:
        with self.lock:
            self.calls.append(("hand over", volume_id))
            if volume_id in self.hung:
                return None
            return HandedAttachment(volume_id, "att-" + volume_id, True)

    def adopt(self, handed: list[HandedAttachment]) -> None:
        self.handed = {h.attachment_id: h for h in handed}

    def take_adopted(self, attachment_id: str) -> object:
        with self.lock:
            self.calls.append(("adopt", attachment_id))
            handed = self.handed.pop(attachment_id)
            if attachment_id in self.gone_attachments:
                raise ImgfsError(f"attachment {attachment_id} is gone")
        return object()  # the attachment Cinder already counts: none added

    def adopted(self) -> list[HandedAttachment]:
        return list(self.handed.values())


async def until(predicate) -> None:
    """Let worker threads finish (the autojump clock does not wait for them)."""
    for _ in range(10_000):
        if predicate():
            return
        await trio.sleep(0.001)
    raise AssertionError("condition never became true")


def loc(volume: str) -> Location:
    return Location("fake", "img-" + volume, 10, volume, 0.0)


@pytest.fixture
async def policy(nursery):
    fake = FakeCinder()
    a = Attachments(fake, idle_timeout=60, attach_timeout=30, detach_deadline=10, limiter=trio.CapacityLimiter(4))
    a.start(nursery)
    return fake, a


async def test_one_attachment_shared_then_idle_detach(policy, autojump_clock):
    fake, a = policy
    a.hold(loc("v1"))
    a.hold(loc("v1"))
    async with trio.open_nursery() as n:  # many concurrent first reads: one attach
        for _ in range(5):
            n.start_soon(a.ready, loc("v1"))
    assert fake.attached == {"v1": 1} and fake.calls == [("attach", "v1")]
    a.release(loc("v1"))
    await trio.sleep(120)
    assert fake.attached == {"v1": 1}  # one reader still holds it
    a.release(loc("v1"))
    await trio.sleep(59)
    assert fake.attached == {"v1": 1}  # idle, not yet timed out
    await trio.sleep(2)
    await until(lambda: fake.attached == {"v1": 0})
    assert fake.calls[-1] == ("detach", "v1")


async def test_reopen_during_idle_keeps_the_attachment(policy, autojump_clock):
    fake, a = policy
    a.hold(loc("v1"))
    await a.ready(loc("v1"))
    a.release(loc("v1"))
    await trio.sleep(30)
    a.hold(loc("v1"))
    await a.ready(loc("v1"))
    await trio.sleep(600)
    assert fake.calls == [("attach", "v1")] and fake.attached == {"v1": 1}


async def test_transitional_states_are_waited_out(policy, autojump_clock):
    fake, a = policy
    fake.refuse["v1"] = ["attaching", "detaching", "reserved"]
    a.hold(loc("v1"))
    start = trio.current_time()
    await a.ready(loc("v1"))
    assert fake.attached == {"v1": 1} and len(fake.calls) == 4
    assert 0 < trio.current_time() - start < 30


async def test_in_use_elsewhere_is_refused_at_once(policy, autojump_clock):
    fake, a = policy
    fake.refuse["v1"] = ["in-use"]
    a.hold(loc("v1"))
    start = trio.current_time()
    with pytest.raises(VolumeBusy) as info:
        await a.ready(loc("v1"))
    assert info.value.errno == 16  # EBUSY
    assert trio.current_time() == start and fake.calls == [("attach", "v1")]


async def test_a_single_attach_volume_in_use_is_waited_for(policy, autojump_clock):
    """Not multiattach: its holder (Glance's download, another host's imgfs) holds it only for a read."""
    fake, a = policy
    fake.single_attach.add("v1")
    fake.refuse["v1"] = ["in-use", "in-use", "in-use"]
    a.hold(loc("v1"))
    start = trio.current_time()
    await a.ready(loc("v1"))
    assert fake.attached == {"v1": 1} and len(fake.calls) == 4
    assert 0 < trio.current_time() - start < 30


def test_which_refusals_are_worth_waiting_for():
    assert VolumeBusy("m", "attaching").transitional
    assert not VolumeBusy("m", "in-use").transitional  # multiattach: another holder may keep it for hours
    assert VolumeBusy("m", "in-use", single_attach=True).transitional
    assert not VolumeBusy("m", "error", single_attach=True).transitional


async def test_transitional_state_that_lasts_gives_ebusy_after_the_timeout(policy, autojump_clock):
    fake, a = policy
    fake.refuse["v1"] = ["attaching"] * 1000
    a.hold(loc("v1"))
    start = trio.current_time()
    with pytest.raises(VolumeBusy):
        await a.ready(loc("v1"))
    assert 25 < trio.current_time() - start <= 30


async def test_fetches_that_waited_on_a_refused_attach_get_its_answer_not_a_wait_of_their_own(policy, autojump_clock):
    """The kernel sends a read as several READs: each fetch that queued behind an attach Cinder kept
    refusing gets that refusal when it ends, rather than waiting out attach_timeout again in turn."""
    fake, a = policy
    fake.refuse["v1"] = ["attaching"] * 1000
    for _ in range(3):
        a.hold(loc("v1"))
    start = trio.current_time()
    ended: list[float] = []

    async def fetch() -> None:
        with pytest.raises(VolumeBusy):
            await a.ready(loc("v1"))
        ended.append(trio.current_time() - start)

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(fetch)
    assert len(ended) == 3 and max(ended) <= 30, ended
    tries = len([c for c in fake.calls if c == ("attach", "v1")])
    await trio.sleep(1)
    with pytest.raises(VolumeBusy):  # asked again later: Cinder is asked again
        await a.ready(loc("v1"))
    assert len([c for c in fake.calls if c == ("attach", "v1")]) > tries


async def test_close_detaches_everything_and_stale_ones_are_removed(policy):  # real clock: the deadline must not jump
    fake, a = policy
    fake.stale = [("v9", "att-9")]
    assert await a.remove_stale() == 1 and ("delete", "att-9") in fake.calls
    for v in ("v1", "v2"):
        a.hold(loc(v))
        await a.ready(loc(v))
    a.release(loc("v2"))  # one open, one idle
    await a.close()
    assert fake.attached == {"v1": 0, "v2": 0}
    assert [s["attached"] for s in a.status()] == [False, False]


async def test_attachments_a_failed_attach_left_are_deleted_once_cinder_answers(policy, monkeypatch):
    # real time, short sweeps: the sweeps' deletes run in threads, which the autojump clock outruns
    monkeypatch.setattr("imgfs.attach.ORPHAN_RETRY", 0.02)
    fake, a = policy
    fake.left, fake.deletable = {"att-1": "v1"}, False
    fake.refuse["v1"] = ["in-use"]  # the attach that left it failed
    with pytest.raises(VolumeBusy):
        await a.ready(loc("v1"))
    await eventually(lambda: fake.calls.count(("delete", "att-1")) >= 2)  # sweeps, refused
    assert fake.left
    fake.deletable = True
    await eventually(lambda: not fake.left)


async def eventually(predicate, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)


async def test_shutdown_tries_the_orphans_once_more(policy, autojump_clock):
    fake, a = policy
    fake.left = {"att-2": "v2"}
    await a.close()
    assert not fake.left and fake.calls == [("delete", "att-2")]


async def test_a_volume_that_left_the_catalog_is_let_go_and_never_attached_again(policy, autojump_clock):
    fake, a = policy
    a.hold(loc("v1"))
    await a.ready(loc("v1"))  # a fetch in flight
    a.step_aside(loc("v1"), "the image left the catalog")
    await trio.sleep(30)
    assert fake.attached == {"v1": 1}  # the fetch in flight finishes first
    a.release(loc("v1"))
    await until(lambda: a.totals()["detaches_image_gone"] == 1)  # then at once: no grace for a gone volume
    assert fake.attached == {"v1": 0}
    a.hold(loc("v1"))
    with pytest.raises(ImgfsError) as info:
        await a.ready(loc("v1"))
    assert "not attaching it again" in str(info.value) and info.value.errno == 5
    a.release(loc("v1"))
    assert fake.calls.count(("attach", "v1")) == 1
    a.welcome(loc("v1"))  # back in the catalog (the volume is available again): attachable
    a.hold(loc("v1"))
    await a.ready(loc("v1"))
    assert fake.attached == {"v1": 1}


async def test_an_idle_volume_that_left_the_catalog_is_detached_at_once(policy, autojump_clock):
    fake, a = policy
    a.hold(loc("v1"))
    await a.ready(loc("v1"))
    a.release(loc("v1"))  # idle, within its 60 s grace
    await trio.sleep(1)
    began = trio.current_time()
    a.step_aside(loc("v1"), "the image left the catalog")
    await until(lambda: a.totals()["detaches_image_gone"] == 1)
    assert fake.attached == {"v1": 0}
    assert trio.current_time() - began < 30  # not the 60 s grace (until() itself may let 10 s pass)


async def test_a_volume_only_one_host_may_attach_gets_a_short_grace(policy, autojump_clock):
    """Another host (or glance-api) waits for a non-multiattach volume: imgfs keeps it only for the
    fetches of a read, not for its idle timeout."""
    from imgfs.attach import NON_MULTIATTACH_GRACE

    fake, a = policy

    class Single:
        multiattach = False

    fake.attach = lambda volume_id, _attach=fake.attach: (_attach(volume_id), Single())[1]
    for _ in range(3):  # three fetches in a row share one attachment
        a.hold(loc("v1"))
        await a.ready(loc("v1"))
        a.release(loc("v1"))
        await trio.sleep(NON_MULTIATTACH_GRACE / 2)
    assert fake.calls == [("attach", "v1")]
    await trio.sleep(NON_MULTIATTACH_GRACE)
    await until(lambda: fake.attached == {"v1": 0})
    t = a.totals()
    assert (t["attaches"], t["fetches"], t["fetches_per_attach"]) == (1, 3, 3.0)


def test_cinders_refusal_names_the_status_whole():
    from imgfs.backends.cinder import _IN_USE

    # Cinder's wording (volume/api.py, _attachment_reserve): the status has a hyphen
    message = ("Invalid volume: Volume 5d1c status must be available or downloading to reserve, but the current "
               "status is in-use. (HTTP 400)")
    assert _IN_USE.search(message).group(1) == "in-use"


async def test_a_hand_over_leaves_the_attachments_and_detaches_what_it_cannot_leave(policy):
    fake, a = policy
    for v in ("v1", "v2", "v3"):
        a.hold(loc(v))
        await a.ready(loc(v))
        a.release(loc(v))
    fake.hung.add("v2")  # a read still hangs on it: detached as at a stop
    a.step_aside(loc("v3"), "deleted in Glance")  # its image is gone: detached, not left
    await until(lambda: fake.attached.get("v3") == 0)
    handed = await a.hand_over()
    assert handed == [HandedAttachment("v1", "att-v1", True)]
    assert fake.attached == {"v1": 1, "v2": 0, "v3": 0}  # v1's attachment stays in Cinder
    await a.close()
    assert ("detach", "v1") not in fake.calls  # close has nothing left to detach


async def test_the_next_process_adopts_before_any_attach_and_lets_go_when_idle(policy, autojump_clock):
    fake, a = policy
    fake.attached = {"v1": 1}  # what the last process left
    fake.stale = [("v9", "att-9")]
    a.adopt([HandedAttachment("v1", "att-v1", True)])
    a.hold_attaches()
    a.hold(loc("v1"))
    async with trio.open_nursery() as n:
        n.start_soon(a.ready, loc("v1"))  # a reader that came before the adoption waits for it
        n.start_soon(a.clear_stale)
    assert ("attach", "v1") not in fake.calls and ("adopt", "att-v1") in fake.calls
    assert ("delete", "att-9") in fake.calls and ("delete", "att-v1") not in fake.calls
    assert a.is_ready(loc("v1")) and fake.attached == {"v1": 1}
    a.release(loc("v1"))
    await trio.sleep(61)
    await until(lambda: fake.attached == {"v1": 0})  # then idle, like any of its own


async def test_an_attachment_gone_during_the_hand_over_is_attached_anew(policy, autojump_clock):
    fake, a = policy
    fake.gone_attachments.add("att-v1")
    a.adopt([HandedAttachment("v1", "att-v1", True)])
    a.hold_attaches()
    await a.clear_stale()
    assert not a.is_ready(loc("v1"))
    a.hold(loc("v1"))
    await a.ready(loc("v1"))
    assert fake.calls[-1] == ("attach", "v1") and fake.attached == {"v1": 1}


def test_what_a_hand_over_leaves_reads_back_and_nothing_else_does():
    left = {"cinderstore": [HandedAttachment("v1", "a1", True), HandedAttachment("v2", "a2", False)], "empty": []}
    assert decode_handed(encode_handed(left)) == {"cinderstore": left["cinderstore"]}
    for bad in (b"", b"\xff", b"[]", b'{"format": 2, "stores": {}}', b'{"format": 1, "stores": {"s": [{}]}}',
                b'{"format": 1}', b'{"format": 1, "stores": []}'):
        with pytest.raises(ValueError):
            decode_handed(bad)
