"""Which images exist and where: every store's listing, merged, refreshed on a timer.

A store that fails to list keeps its last good listing (a network blip must not make images vanish
under running VMs); the failure is logged once when it starts and once when it ends. A lookup of an id
nobody has listed yet asks the stores directly before answering "no such image", with a short negative
cache so shell completion cannot hammer the store.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

import trio

from .backends.base import Backend
from .errors import ImgfsError
from .model import Image, Location

if TYPE_CHECKING:
    from .glance import GlanceImage, GlanceSource

log = logging.getLogger(__name__)

SNAPSHOT_LAYOUT = 1  # of Catalog.snapshot(): a successor of another layout lists afresh

# (image id, the image before, the image now); None means absent
ChangeListener = Callable[[str, Image | None, Image | None], Awaitable[None]]


@dataclass
class StoreState:
    reachable: bool | None = None  # None until the first listing finished
    error: str = ""
    images: int = 0
    last_listed: float = 0.0


class Catalog:
    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        refresh_interval: float,
        negative_ttl: float,
        limiter: trio.CapacityLimiter,
        source: GlanceSource | None = None,
    ) -> None:
        self.backends = list(backends)  # preference order: the default store first
        self.source = source
        self._glance: dict[str, GlanceImage] = {}
        self._names: dict[str, str] = {}
        self.refresh_interval = refresh_interval
        self.negative_ttl = negative_ttl
        self._limiter = limiter
        self._listings: dict[str, dict[str, Location]] = {b.name: {} for b in self.backends}
        self._images: dict[str, Image] = {}
        self._missing: dict[str, float] = {}  # image id -> monotonic time it was found missing
        self.stores: dict[str, StoreState] = {b.name: StoreState() for b in self.backends}
        if source is not None:
            self.stores["glance"] = StoreState()  # the catalog's own health, shown like a store's
        self.listeners: list[ChangeListener] = []

    # ---- queries ------------------------------------------------------------------------------------

    def image(self, image_id: str) -> Image | None:
        return self._images.get(image_id)

    def location(self, store: str | None, image_id: str) -> Location | None:
        if store is None:
            image = self._images.get(image_id)
            return None if image is None else image.primary
        loc = self._listings.get(store, {}).get(image_id)
        return loc if loc is not None and self._shown(store, image_id) else None

    def image_ids(self, store: str | None = None) -> list[str]:
        if store is None:
            return sorted(self._images)
        return sorted(i for i in self._listings.get(store, {}) if self._shown(store, i))

    def _shown(self, store: str, image_id: str) -> bool:
        """Whether stores/<store>/<id> is shown: with the stores as the catalog, whatever the store
        holds; with Glance as the catalog, only a copy Glance counts for an image it calls active (not
        a deactivated, deleted or unknown one, nor a copy whose size is not Glance's)."""
        if self.source is None:
            return True
        image = self._images.get(image_id)
        return image is not None and any(loc.store == store for loc in image.locations)

    @property
    def store_names(self) -> list[str]:
        return [b.name for b in self.backends]

    def names(self) -> dict[str, str]:
        return self._names

    def _compute_names(self) -> dict[str, str]:
        """by-name/ entries -> image id. Glance names are not unique: the newest image (created_at)
        takes the plain name, every other one ``<name>~<id>``; '/' becomes '_'; nameless images have none."""
        by_name: dict[str, list[Image]] = {}
        for image in self._images.values():
            if image.name:
                by_name.setdefault(image.name.replace("/", "_").replace("\0", "_"), []).append(image)
        result: dict[str, str] = {}
        for name, images in by_name.items():
            images.sort(key=lambda i: (i.created_at, i.id), reverse=True)
            result[name] = images[0].id
            for other in images[1:]:
                result[f"{name}~{other.id}"] = other.id
        return {n: i for n, i in result.items() if len(n.encode()) <= 255 and n not in (".", "..")}

    # ---- updates ------------------------------------------------------------------------------------

    async def _blocking(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def refresh(self) -> None:
        """List every store (and Glance) once, concurrently, and publish the changes."""
        async with trio.open_nursery() as nursery:
            for backend in self.backends:
                nursery.start_soon(self._list_store, backend)
            if self.source is not None:
                nursery.start_soon(self._list_glance)
        await self._publish()

    async def _list_glance(self) -> None:
        assert self.source is not None
        state = self.stores["glance"]
        try:
            images = await self._blocking(self.source.list_images)
        except ImgfsError as e:
            if state.reachable is not False or state.error != str(e):
                log.error("%s; keeping the last listing (%d images) and retrying every %gs", e, len(self._glance), self.refresh_interval)
            state.reachable, state.error = False, str(e)
            return
        if state.reachable is False:
            log.info("Glance is reachable again")
        state.reachable, state.error = True, ""
        state.images, state.last_listed = len(images), time.time()
        self._glance = {image.id: image for image in images}

    async def _list_store(self, backend: Backend) -> None:
        state = self.stores[backend.name]
        try:
            locations = await self._blocking(backend.list_images)
        except ImgfsError as e:
            if state.reachable is not False or state.error != str(e):
                log.error("%s; keeping the last listing (%d images) and retrying every %gs", e, len(self._listings[backend.name]), self.refresh_interval)
            state.reachable, state.error = False, str(e)
            return
        if state.reachable is False:
            log.info("store '%s' is reachable again", backend.name)
        state.reachable, state.error = True, ""
        state.images, state.last_listed = len(locations), time.time()
        self._listings[backend.name] = {loc.image_id: loc for loc in locations}

    def _merge(self) -> dict[str, Image]:
        if self.source is not None:
            return self._merge_glance()
        merged: dict[str, list[Location]] = {}
        for backend in self.backends:
            for image_id, loc in self._listings[backend.name].items():
                merged.setdefault(image_id, []).append(loc)
        return {image_id: Image(image_id, tuple(locs)) for image_id, locs in merged.items()}

    def _merge_glance(self) -> dict[str, Image]:
        """Glance says what exists; each copy is read through imgfs's own stanza of the store Glance
        names, in imgfs's preference order. A copy whose size differs from Glance's is not that image."""
        images = {}
        for g in self._glance.values():
            locations = []
            for backend in self.backends:
                if g.stores and backend.name not in g.stores:
                    continue
                loc = self._listings[backend.name].get(g.id)
                if loc is None:
                    continue
                if loc.size != g.size:
                    log.debug("image %s: store '%s' holds %d bytes, Glance says %d; not using that copy", g.id, backend.name, loc.size, g.size)
                    continue
                locations.append(loc)
            if locations:
                images[g.id] = Image(g.id, tuple(locations), name=g.name, created_at=g.created_at, meta=g.meta)
        return images

    async def _publish(self) -> None:
        before, after = self._images, self._merge()
        self._images = after
        if self.source is not None:
            self._names = self._compute_names()
        for image_id in before.keys() | after.keys():
            old, new = before.get(image_id), after.get(image_id)
            if old != new:
                if new is not None:
                    self._missing.pop(image_id, None)
                if old is not None and new is not None and old.locations != new.locations:
                    log.info("image %s changed: %s", image_id, _describe(new))
                elif old is not None and new is None:
                    log.info("image %s is gone from every store", image_id)
                for listener in self.listeners:
                    await listener(image_id, old, new)

    async def lookup(self, image_id: str) -> Image | None:
        """The image, asking each store directly if no listing has it yet."""
        image = self._images.get(image_id)
        if image is not None:
            return image
        missing_since = self._missing.get(image_id)
        if missing_since is not None and time.monotonic() - missing_since < self.negative_ttl:
            return None
        found = False
        if self.source is not None:
            try:
                g = await self._blocking(self.source.get, image_id)
            except ImgfsError as e:
                log.warning("%s", e)
                g = None
            if g is None:
                self._missing[image_id] = time.monotonic()
                return None
            self._glance[g.id] = g
        for backend in self.backends:
            try:
                loc = await self._blocking(backend.stat, image_id)
            except ImgfsError as e:
                log.warning("%s", e)
                continue
            if loc is not None:
                self._listings[backend.name][image_id] = loc
                found = True
        if not found:
            self._missing[image_id] = time.monotonic()
            if len(self._missing) > 10_000:  # bound the negative cache against scans of random names
                self._missing.clear()
            return None
        await self._publish()
        return self._images.get(image_id)

    async def recheck(self, loc: Location) -> None:
        """A reader saw ``loc`` change: ask its store now rather than at the next refresh."""
        backend = next(b for b in self.backends if b.name == loc.store)
        try:
            current = await self._blocking(backend.stat, loc.image_id)
        except ImgfsError as e:
            log.warning("%s", e)
            return
        if current is None:
            self._listings[loc.store].pop(loc.image_id, None)
        else:
            self._listings[loc.store][loc.image_id] = current
        await self._publish()

    # ---- the last listing, carried across a restart ------------------------------------------------

    def snapshot(self) -> bytes:
        """Every store's last listing (and Glance's), for the next imgfs process to start from."""
        stores = {name: [[loc.image_id, loc.size, loc.version, loc.mtime] for loc in locs.values()]
                  for name, locs in self._listings.items()}
        glance = [[g.id, g.name, g.size, list(g.stores), [list(kv) for kv in g.meta]] for g in self._glance.values()]
        return json.dumps({"layout": SNAPSHOT_LAYOUT, "stores": stores,
                           "glance": glance if self.source is not None else None}).encode()

    async def restore(self, blob: bytes) -> int:
        """Start from a predecessor's listings, so the mount answers at once with what it showed (the
        first refresh follows right away). Only stores of the same name, and Glance's listing only if
        Glance is the catalog both times; the number of images shown. A snapshot that does not parse
        is ignored (0)."""
        from .glance import GlanceImage

        try:
            snap = json.loads(blob)
            if snap.get("layout") != SNAPSHOT_LAYOUT:
                raise ValueError(f"layout {snap.get('layout')!r}")
            listings = {name: {r[0]: Location(name, str(r[0]), int(r[1]), str(r[2]), float(r[3])) for r in rows}
                        for name, rows in snap["stores"].items() if name in self._listings}
            glance = None
            if self.source is not None and snap["glance"] is not None:
                glance = {r[0]: GlanceImage(str(r[0]), str(r[1]), int(r[2]), tuple(map(str, r[3])),
                                            tuple((str(k), str(v)) for k, v in r[4])) for r in snap["glance"]}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            log.warning("ignoring the listing the last imgfs left (%s); listing the stores afresh", e)
            return 0
        if self.source is not None and glance is None:
            return 0  # no Glance listing to show anything by
        self._listings.update(listings)
        if glance is not None:
            self._glance = glance
        await self._publish()
        return len(self._images)

    async def run(self, listed: trio.Event) -> None:
        """Refresh forever; ``listed`` is set once the first listing is done."""
        await self.refresh()
        listed.set()
        while True:
            await trio.sleep(refresh_delay(self.refresh_interval))
            await self.refresh()


REFRESH_JITTER = 0.2
_jitter = random.Random()


def refresh_delay(interval: float) -> float:
    """The wait before the next listing: ``interval`` give or take 20%, drawn anew each time. Nodes
    started together (a fleet-wide restart, an upgrade wave) would otherwise list the stores and page
    through Glance in step for ever; with this they spread over the interval within a few rounds."""
    return interval * _jitter.uniform(1 - REFRESH_JITTER, 1 + REFRESH_JITTER)


def _describe(image: Image) -> str:
    return ", ".join(f"{loc.store} size {loc.size} version {loc.version}" for loc in image.locations)
