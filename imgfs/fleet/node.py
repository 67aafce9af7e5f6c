"""One node's part in the fleet, wired into the daemon: the stores its reader sees (wrapped to ask the
mesh first), and the origin gateway its nginx fetches through."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..backends.base import Backend
from ..catalog import Catalog
from ..config import FleetConfig
from ..errors import ConfigError
from ..model import Location
from ..ratelimit import RateLimit
from . import gateway as gw
from .mesh import FleetBackend, FleetStats, MeshClient
from .sums import SumsMaker, block_for, elected

log = logging.getLogger(__name__)

# Stores whose chunks go through the mesh. A Cinder image-volume is read by attaching it, and an
# attachment per owner per volume is what Cinder's multi-attach rules make expensive: not in the mesh.
MESH_KINDS = ("s3", "file")
RECHECK_EVERY = 5.0  # seconds between two store lookups of one image asked at a version we do not hold


class _CatalogOrigin:
    """The gateway's view of this daemon: what the catalog shows now, read from the store itself."""

    def __init__(self, catalog: Catalog, backends: dict[str, Backend], limiter: trio.CapacityLimiter) -> None:
        self.catalog, self.backends, self.limiter = catalog, backends, limiter
        self._rechecks = RateLimit(RECHECK_EVERY)

    async def locate(self, store: str, image_id: str, version: str) -> Location | None:
        if store not in self.backends:
            return None
        loc = self.catalog.location(store, image_id)
        if loc is None:
            await self.catalog.lookup(image_id)  # asks the stores; a miss is remembered (negative_lookup_ttl)
            loc = self.catalog.location(store, image_id)
        elif loc.version != version and self._rechecks.allow((store, image_id)):
            # a peer knows another version than this node's listing: ask the store now, at most once per
            # RECHECK_EVERY per image (a peer still asking for an old version must not cost a HEAD a chunk)
            await self.catalog.recheck(loc)
            loc = self.catalog.location(store, image_id)
        return loc

    async def read(self, loc: Location, offset: int, length: int) -> bytes:
        backend = self.backends[loc.store]
        return await trio.to_thread.run_sync(backend.read, loc, offset, length, limiter=self.limiter)


@dataclass
class FleetNode:
    config: FleetConfig
    stats: FleetStats
    gateway: gw.Gateway
    fetch_backends: dict[str, Backend]  # what the reader reads through

    @classmethod
    def build(cls, config: FleetConfig, backends: dict[str, Backend], catalog: Catalog, *, chunk_size: int,
              connections: int) -> "FleetNode":
        try:
            secret = gw.load_secret(config.secret_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"[fleet] secret_file {config.secret_file}: {getattr(e, 'strerror', None) or e}; "
                              "'imgfs fleet render' writes it with the nginx configuration") from None
        stats = FleetStats()
        if config.chunk_sums != "off" and block_for(chunk_size) is None:
            log.warning("fleet: chunk_size %d has no block of at least 64 KiB dividing it: chunks from peers are "
                        "checked by full reads only (no chunk sums)", chunk_size)
        direct = {name: b for name, b in backends.items() if b.kind in MESH_KINDS}
        origin = _CatalogOrigin(catalog, direct, trio.CapacityLimiter(connections))
        client = MeshClient(config.local_port, config.timeout, connections)
        wrapped: dict[str, Backend] = dict(backends)
        for name, backend in direct.items():
            wrapped[name] = FleetBackend(backend, client, chunk_size=chunk_size, min_size=config.min_image_mb << 20,
                                         stats=stats, chunk_sums=config.chunk_sums,
                                         elected=lambda loc: elected(config.members, config.mesh_listen, loc))
        return cls(config, stats, gw.Gateway(origin, secret, stats), wrapped)

    def distrust(self, loc: Location) -> bool:
        backend = self.fetch_backends.get(loc.store)
        return isinstance(backend, FleetBackend) and backend.distrust(loc)

    # The fetcher's Witness: a full read that matched Glance's digest makes the image's chunk sums.
    def tap(self, loc: Location) -> SumsMaker | None:
        backend = self.fetch_backends.get(loc.store)
        return backend.sums_maker(loc) if isinstance(backend, FleetBackend) else None

    def matched(self, tap: SumsMaker, algo: str, digest: str) -> None:
        backend = self.fetch_backends.get(tap.loc.store)
        if isinstance(backend, FleetBackend):
            backend.publish_sums(tap, algo, digest)

    def untapped(self, loc: Location) -> None:
        backend = self.fetch_backends.get(loc.store)
        if isinstance(backend, FleetBackend):
            backend.sums.passed(loc)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await gw.serve(self.gateway, self.config.gateway_port, task_status=task_status)

    def status(self) -> dict:
        return {"members": len(self.config.members), "mesh": f"127.0.0.1:{self.config.local_port}",
                "gateway": f"127.0.0.1:{self.config.gateway_port}", **self.stats.as_dict()}
