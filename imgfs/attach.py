"""Cinder multi-attach semantics, enforced by the daemon (the policy; backends/cinder.py does the calls).

- One attachment per volume per host, shared by every fetch from it (a refcount of fetches in flight,
  not of open files: the image-volume is Glance's, imgfs a guest on it). Attaching is lazy: the first
  chunk that must come from the volume attaches it, so a fully cached image never touches Cinder. When
  the last fetch ends, a short grace (``idle_timeout``) keeps the attachment for the next one (a
  sequential reader attaches once); a volume that is not multiattach gets at most NON_MULTIATTACH_GRACE,
  so glance-api and other hosts can have it.
- Stepping aside: when the catalog no longer shows the image on that volume (deleted in Glance, no
  longer active, the volume deleting or migrating), the volume is detached as soon as its fetches in
  flight end, and not attached again while it stays gone.
- Attach and detach of one volume never race (one lock per volume), and once begun they finish
  (shielded): an attachment is never left half-made or forgotten.
- A volume another host holds is never taken over. Cinder refuses the attachment (HTTP 400, status
  ``in-use``); transitional states (``attaching``, ``detaching``, ...) are waited out with backoff up to
  ``attach_timeout``, and so is a volume that is not multiattach and ``in-use`` (its holder, Glance's
  download or another host's imgfs, holds it only while it reads); then the reader falls back to
  another store or gets EBUSY. A multiattach volume ``in-use`` is not waited for.
- Start-up removes attachments a crashed daemon of this host left behind (before the mount; after a
  takeover of a mount a predecessor handed over, meanwhile, with attaches waiting for it); shutdown
  detaches everything, shielded, within ``detach_deadline``.
- A hand-over (a restart) leaves the attachments in Cinder: the old process closes its connections
  and names them to the next, which adopts them (connects with the connection info Cinder kept, no
  new attachment) before any attach, and detaches them when idle as its own. One it cannot adopt is
  deleted; one left for a configuration without its store is named in the log.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .errors import BackendError, Busy, ImgfsError
from .model import HandedAttachment, Location

log = logging.getLogger(__name__)

ORPHAN_RETRY = 10.0  # seconds between attempts to delete attachments a failed attach left
# A volume only one host may attach is held no longer than a read needs: consecutive fetches of a
# sequential reader follow each other within milliseconds; another host waits at most this long.
NON_MULTIATTACH_GRACE = 1.0


class VolumeOps(Protocol):
    """The blocking operations a cinder backend provides (run in worker threads)."""

    name: str

    def attach(self, volume_id: str) -> object: ...

    def detach(self, volume_id: str) -> None: ...

    def stale_attachments(self) -> list[tuple[str, str]]: ...

    def delete_attachment(self, attachment_id: str) -> None: ...

    def orphans(self) -> list[tuple[str, str]]: ...

    def prepare(self) -> None: ...

    def hand_over(self, volume_id: str) -> HandedAttachment | None: ...

    def adopt(self, handed: list[HandedAttachment]) -> None: ...

    def take_adopted(self, attachment_id: str) -> object: ...

    def adopted(self) -> list[HandedAttachment]: ...


@dataclass
class _Volume:
    volume_id: str
    refs: int = 0
    attached: bool = False
    attached_at: float = 0.0
    idle_since: float | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    idle_scope: trio.CancelScope | None = None
    multiattach: bool = True  # as Cinder said at the last attach
    gone: str | None = None  # why the catalog no longer shows it: never attached again
    fetches: int = 0  # fetches during the current attachment
    # (when, error) of the last attach that gave up: the answer for every fetch that waited on the lock
    # meanwhile, so that N fetches of one read do not wait out attach_timeout N times in a row
    refused: tuple[float, ImgfsError] | None = None


class Attachments:
    def __init__(
        self,
        ops: VolumeOps,
        *,
        idle_timeout: float,
        attach_timeout: float,
        detach_deadline: float,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.ops = ops
        self.idle_timeout = idle_timeout
        self.attach_timeout = attach_timeout
        self.detach_deadline = detach_deadline
        self._limiter = limiter
        self._volumes: dict[str, _Volume] = {}
        self._nursery: trio.Nursery | None = None
        self._sweeping = False
        self._cleared: trio.Event | None = None  # set once clear_stale is done: no attach before
        self.attaches = 0
        self.detaches = 0
        self.detaches_gone = 0  # detached because the image left the catalog
        self.fetches = 0  # fetches that held an attachment
        self.held_seconds = 0.0  # total time attachments were held (finished ones)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def _sweep_later(self) -> None:
        """After a failed attach: if it left attachments Cinder would not delete, keep trying."""
        if not self._sweeping and self._nursery is not None and self.ops.orphans():
            self._sweeping = True
            self._nursery.start_soon(self._sweep_orphans)

    async def _sweep_orphans(self) -> None:
        try:
            while self.ops.orphans():
                await trio.sleep(ORPHAN_RETRY)
                await self._delete_orphans()
        finally:
            self._sweeping = False

    async def _delete_orphans(self) -> None:
        for volume_id, attachment_id in self.ops.orphans():
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.ops.delete_attachment, attachment_id, limiter=self._limiter)
            except ImgfsError as e:
                log.debug("%s; retrying in %gs", e, ORPHAN_RETRY)
                continue
            log.info("deleted attachment %s of volume %s that a failed attach left", attachment_id, volume_id)

    def hold_attaches(self) -> None:
        """No attach until clear_stale has run (called before it is started: a fetch may come first)."""
        self._cleared = trio.Event()

    async def clear_stale(self) -> None:
        """Start-up: delete what an earlier imgfs of this host left in Cinder, and ready os-brick. A
        fetch that needs a volume meanwhile waits: a new attachment must not be taken, and then
        deleted as stale, or refused for a volume a stale one still holds."""
        try:
            try:
                await self.remove_stale()
            except ImgfsError as e:
                log.error("%s; stale attachments of this host may remain in Cinder", e)
            await self.prepare()
            await self._take_adopted()
        finally:
            if self._cleared is not None:
                self._cleared.set()

    def adopt(self, handed: list[HandedAttachment]) -> None:
        """The attachments the last imgfs handed over: not stale; connected by clear_stale."""
        self.ops.adopt(handed)

    async def _take_adopted(self) -> None:
        for handed in self.ops.adopted():
            v = self._volume(handed.volume_id)
            started = trio.current_time()
            async with v.lock:
                try:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self.ops.take_adopted, handed.attachment_id, limiter=self._limiter)
                except ImgfsError as e:
                    log.warning("%s; attaching volume %s anew when a read needs it", e, handed.volume_id)
                    self._sweep_later()
                    if not v.refs:
                        self._volumes.pop(v.volume_id, None)
                    continue
                v.attached, v.attached_at, v.fetches = True, time.monotonic(), 0
                v.multiattach = handed.multiattach
            log.info("adopted attachment %s of volume %s (store '%s') from the last imgfs in %.2fs",
                     handed.attachment_id, handed.volume_id, self.ops.name, trio.current_time() - started)
            if v.refs == 0 and self._nursery is not None:  # held the usual grace, as after a fetch
                v.idle_since = time.monotonic()
                self._nursery.start_soon(self._detach_when_idle, v)

    async def prepare(self) -> None:
        """Ready os-brick before serving, so the first read does not pay for it."""
        try:
            await trio.to_thread.run_sync(self.ops.prepare, limiter=self._limiter)
        except Exception as e:  # noqa: BLE001 - the first attach will try again and report properly
            log.warning("store '%s': preparing os-brick failed (%s); will retry at the first attach", self.ops.name, type(e).__name__)

    def _volume(self, volume_id: str) -> _Volume:
        v = self._volumes.get(volume_id)
        if v is None:
            v = self._volumes[volume_id] = _Volume(volume_id)
        return v

    # ---- what open files do -------------------------------------------------------------------------

    def hold(self, loc: Location) -> None:
        v = self._volume(loc.version)
        v.refs += 1
        v.fetches += 1
        self.fetches += 1
        v.idle_since = None
        if v.idle_scope is not None:
            v.idle_scope.cancel()
            v.idle_scope = None

    def release(self, loc: Location) -> None:
        v = self._volumes.get(loc.version)
        if v is None or v.refs == 0:
            return
        v.refs -= 1
        if v.refs == 0:
            v.idle_since = time.monotonic()
            if v.attached and self._nursery is not None:
                self._nursery.start_soon(self._detach_when_idle, v)
            elif not v.attached and v.gone is None:
                self._volumes.pop(v.volume_id, None)

    def _grace(self, v: _Volume) -> float:
        if v.gone is not None:
            return 0.0
        return self.idle_timeout if v.multiattach else min(self.idle_timeout, NON_MULTIATTACH_GRACE)

    def step_aside(self, loc: Location, why: str) -> None:
        """The catalog no longer shows this copy: detach the volume once its fetches in flight end (they
        finish or fail cleanly), and refuse to attach it again while it stays gone."""
        v = self._volume(loc.version)
        if v.gone is None:
            log.info("volume %s of image %s (store '%s'): %s; %s", v.volume_id, loc.image_id, self.ops.name, why,
                     "detaching it now" if v.attached and not v.refs else
                     "detaching it when the fetches in flight end" if v.attached else "not attaching it again")
        v.gone = why
        if v.attached and v.refs == 0 and self._nursery is not None:
            if v.idle_scope is not None:
                v.idle_scope.cancel()
            self._nursery.start_soon(self._detach_when_idle, v)

    def welcome(self, loc: Location) -> None:
        """The catalog shows this copy (again): it may be attached when a fetch needs it."""
        v = self._volumes.get(loc.version)
        if v is not None and v.gone is not None:
            v.gone = None
            if not v.attached and not v.refs:
                self._volumes.pop(v.volume_id, None)

    def is_ready(self, loc: Location) -> bool:
        v = self._volumes.get(loc.version)
        return v is not None and v.attached

    async def ready(self, loc: Location) -> None:
        """Make the volume readable on this host: attach it unless an attachment is already shared."""
        if self._cleared is not None and not self._cleared.is_set():
            await self._cleared.wait()
        v = self._volume(loc.version)
        if v.gone is not None:
            raise BackendError(f"store '{self.ops.name}': image {loc.image_id} is no longer on volume {v.volume_id} "
                               f"({v.gone}); not attaching it again")
        if v.attached:
            return
        asked = trio.current_time()
        async with v.lock:
            if v.refused is not None and v.refused[0] > asked:
                raise v.refused[1]  # Cinder refused while this fetch waited: that is its answer too
            if not v.attached:
                try:
                    await self._attach(v, loc)
                except ImgfsError as e:
                    v.refused = (trio.current_time(), e)
                    raise
                finally:
                    self._sweep_later()

    # ---- attach and detach --------------------------------------------------------------------------

    async def _attach(self, v: _Volume, loc: Location) -> None:
        deadline = trio.current_time() + self.attach_timeout
        delay = 0.5
        while True:
            started = trio.current_time()
            try:
                # Once Cinder is asked, see it through: a cancelled attach would leave an attachment
                # nobody knows to delete.
                with trio.CancelScope(shield=True):
                    made = await trio.to_thread.run_sync(self.ops.attach, v.volume_id, limiter=self._limiter)
            except Busy as e:
                if getattr(e, "transitional", False) and trio.current_time() + delay < deadline:
                    log.info("volume %s of image %s is %s; retrying in %.1fs", v.volume_id, loc.image_id, getattr(e, "status", "busy"), delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                log.debug("%s", e)  # the reader's failure (or its fail-over) is logged where it happens
                raise
            v.attached, v.attached_at, v.fetches = True, time.monotonic(), v.refs
            v.multiattach = bool(getattr(made, "multiattach", True))
            self.attaches += 1
            log.info("attached volume %s (image %s, store '%s') read-only in %.2fs", v.volume_id, loc.image_id, self.ops.name, trio.current_time() - started)
            if v.refs == 0 and self._nursery is not None:  # every reader left while we attached
                v.idle_since = time.monotonic()
                self._nursery.start_soon(self._detach_when_idle, v)
            return

    async def _detach_when_idle(self, v: _Volume) -> None:
        with trio.CancelScope() as scope:
            v.idle_scope = scope
            await trio.sleep(self._grace(v))
        if scope.cancelled_caught:
            return
        async with v.lock:
            if v.refs == 0 and v.attached:
                await self._detach(v, "image left the catalog" if v.gone is not None else "idle")
                if v.refs == 0 and not v.attached and v.gone is None:
                    self._volumes.pop(v.volume_id, None)
                elif v.refs == 0 and self._nursery is not None:  # Cinder refused: try again later
                    self._nursery.start_soon(self._detach_when_idle, v)

    async def _detach(self, v: _Volume, why: str) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self.ops.detach, v.volume_id, limiter=self._limiter)
            except ImgfsError as e:
                log.error("%s; will retry", e)
                return
        v.attached = False
        held = time.monotonic() - v.attached_at
        self.detaches += 1
        self.detaches_gone += v.gone is not None
        self.held_seconds += held
        log.info("detached volume %s from store '%s' (%s) after %.1fs and %d fetches", v.volume_id, self.ops.name, why,
                 held, v.fetches)

    # ---- start-up and shutdown ----------------------------------------------------------------------

    async def remove_stale(self) -> int:
        """Delete the attachments a previous run of imgfs on this host left in Cinder (crash, SIGKILL)."""
        stale = await trio.to_thread.run_sync(self.ops.stale_attachments, limiter=self._limiter)
        for volume_id, attachment_id in stale:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.ops.delete_attachment, attachment_id, limiter=self._limiter)
            log.info("removed stale attachment %s of volume %s left by an earlier imgfs on this host", attachment_id, volume_id)
        return len(stale)

    async def close(self) -> None:
        """Detach every volume, concurrently, within ``detach_deadline``; whatever remains is named."""
        attached = [v for v in self._volumes.values() if v.attached]
        if not attached and not self.ops.orphans():
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.detach_deadline):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._delete_orphans)
                    for v in attached:
                        nursery.start_soon(self._detach_locked, v)
        left = [v.volume_id for v in attached if v.attached]
        if left:
            log.error("shutdown: %d volumes still attached after %gs: %s; the next start removes them", len(left), self.detach_deadline, ", ".join(left))
        orphans = self.ops.orphans()
        if orphans:
            log.error("shutdown: Cinder did not let us delete %d attachments of failed attaches: %s; delete them with "
                      "'cinder attachment-delete'", len(orphans), ", ".join(a for _, a in orphans))

    async def hand_over(self) -> list[HandedAttachment]:
        """A restart: leave each attached volume's attachment for the next imgfs (after the mount is
        handed over: no fetch is left), within ``detach_deadline``. A volume whose image left the
        catalog, or one a hung read still holds, is detached as at a stop."""
        handed: list[HandedAttachment] = []

        async def leave(v: _Volume) -> None:
            async with v.lock:
                if not v.attached:
                    return
                if v.gone is None:
                    kept = await trio.to_thread.run_sync(self.ops.hand_over, v.volume_id, limiter=self._limiter)
                    if kept is not None:
                        v.attached = False
                        self.held_seconds += time.monotonic() - v.attached_at
                        handed.append(kept)
                        return
                await self._detach(v, "hand-over")

        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.detach_deadline):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._delete_orphans)
                    for v in [v for v in self._volumes.values() if v.attached]:
                        nursery.start_soon(leave, v)
        left = [v.volume_id for v in self._volumes.values() if v.attached]
        if left:
            log.error("hand-over: %d volumes still attached after %gs: %s; the next start removes them", len(left),
                      self.detach_deadline, ", ".join(left))
        if handed:
            log.info("leaving %d attachments of store '%s' to the next imgfs: %s", len(handed), self.ops.name,
                     ", ".join(h.attachment_id for h in handed))
        return handed

    async def _detach_locked(self, v: _Volume) -> None:
        async with v.lock:
            if v.attached:
                await self._detach(v, "shutdown")

    def totals(self) -> dict:
        """What `imgfs status` and the metrics say of this store's attachments since the start."""
        now = time.monotonic()
        held = self.held_seconds + sum(now - v.attached_at for v in self._volumes.values() if v.attached)
        return {"store": self.ops.name, "attaches": self.attaches, "detaches": self.detaches,
                "detaches_image_gone": self.detaches_gone, "seconds_held": round(held, 1), "fetches": self.fetches,
                "fetches_per_attach": round(self.fetches / self.attaches, 1) if self.attaches else None}

    def status(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "store": self.ops.name,
                "volume_id": v.volume_id,
                "refcount": v.refs,
                "attached": v.attached,
                "attached_for": round(now - v.attached_at, 1) if v.attached else None,
                "idle_for": None if v.idle_since is None else round(now - v.idle_since, 1),
                "fetches": v.fetches,
                "multiattach": v.multiattach,
                "gone": v.gone,
            }
            for v in self._volumes.values()
            if v.attached or v.refs or v.gone is None  # a gone volume let go of is history (see totals())
        ]


# ---- what a hand-over leaves: {store: [attachment, ...]} as bytes --------------------------------------

HANDED_FORMAT = 1


def encode_handed(handed: dict[str, list[HandedAttachment]]) -> bytes:
    return json.dumps({"format": HANDED_FORMAT, "stores": {
        store: [{"volume_id": h.volume_id, "attachment_id": h.attachment_id, "multiattach": h.multiattach} for h in hs]
        for store, hs in handed.items() if hs}}).encode()


def decode_handed(data: bytes) -> dict[str, list[HandedAttachment]]:
    """What encode_handed wrote; ValueError for anything else (a successor then adopts nothing, and the
    attachments are removed as stale)."""
    try:
        doc = json.loads(data)
        if doc.get("format") != HANDED_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, not {HANDED_FORMAT}")
        return {str(store): [HandedAttachment(str(a["volume_id"]), str(a["attachment_id"]), bool(a["multiattach"]))
                             for a in items]
                for store, items in doc["stores"].items()}
    except (AttributeError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a list of attachments ({type(e).__name__})") from None
