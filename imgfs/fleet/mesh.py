"""The reading side of fleet mode: a store wrapper that reads each chunk of a large image from the node's
nginx (which finds the chunk's owner), checks what came back, and reads from the origin itself when
anything is wrong. A reader never sees the mesh fail; every fallback is counted by its cause.

What the mesh's answer must be, or it is not used: 206, ``Content-Range: bytes a-b/size`` exactly as
asked, exactly b-a+1 bytes, and ``X-Imgfs-Version`` equal to the version the reader holds (the owner's
gateway pins it, and nginx keeps it with the cached chunk). When the store holds chunk sums for that
version (sums.py), every block must also match its sum: a peer cannot forge those, so a partial read is
as safe as a full one. The bytes then go through the same checks as the origin's: the cache's block sums
once stored, Glance's digest on a full read.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import urllib3

from ..backends.base import Backend
from .. import httpbody
from ..buffers import POOL
from ..model import Location
from ..ratelimit import RateLimit
from .sums import ChunkSums, SumsBook, SumsMaker, block_for

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Imgfs-Version"
CHUNK_HEADER = "X-Imgfs-Chunk"  # what the local nginx hashes on, with the path: one owner per chunk
PATH_PREFIX = "/fleet/v1"
CONNECT_TIMEOUT = 1.0  # loopback: a local nginx that does not accept at once is not there
_PIECE = 1 << 20  # bytes per read of a body: the deadline is checked between them
# What one more ask of the mesh may mend: an owner lost mid-answer, or every owner nginx tried down.
RETRY_CAUSES = frozenset({"broken_body", "short_body", "http_502", "http_504"})


def chunk_path(loc: Location) -> str:
    """The mesh's name for one version of one copy: no credential, nothing a tenant chose but the id."""
    parts = (loc.store, loc.image_id, loc.version)
    return PATH_PREFIX + "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


class MeshRefused(Exception):
    """The mesh's answer is not the asked bytes; ``cause`` labels the fallback it leads to."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


@dataclass
class FleetStats:
    """What `imgfs status` and the metrics say of the mesh on this node (guarded by a lock: readers run
    in worker threads)."""

    mesh_bytes: int = 0  # bytes read from the mesh and used
    origin_bytes: int = 0  # bytes of large images read from the origin directly (after a fallback)
    mesh_reads: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)  # cause -> reads that went to the origin
    retries: dict[str, int] = field(default_factory=dict)  # cause -> reads asked of the mesh a second time
    bypass_bytes: int = 0  # bytes of images below min_image_mb, read from the origin as before
    served_bytes: int = 0  # bytes the gateway sent this node's nginx (for peers, or for this node)
    served_requests: int = 0
    refusals: dict[int, int] = field(default_factory=dict)  # gateway status -> requests refused
    integrity_failures: int = 0  # full reads with mesh bytes that failed their digest (a lying peer)
    sums_checked_bytes: int = 0  # mesh bytes checked block by block against the store's chunk sums
    sums: dict[str, int] = field(default_factory=dict)  # chunk-sums outcome (published, unusable...) -> n
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Add to several counters under one lock acquisition (a chunk read adds two)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def count(self, name: str, key: str | int) -> None:
        with self._lock:
            table = getattr(self, name)
            table[key] = table.get(key, 0) + 1

    def as_dict(self) -> dict:
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items() if not k.startswith("_")}


class MeshClient:
    """Ranged GETs to the local nginx (urllib3: a connection pool, timeouts, no retries of its own)."""

    def __init__(self, port: int, timeout: float, connections: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        self._pool = urllib3.HTTPConnectionPool(
            "127.0.0.1", port, maxsize=connections, block=False, retries=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=timeout),
        )

    def get(self, loc: Location, offset: int, length: int, chunk: int) -> bytearray:
        end = offset + length - 1
        try:
            r = self._pool.request(
                "GET", chunk_path(loc), headers={"Range": f"bytes={offset}-{end}", CHUNK_HEADER: str(chunk)},
                preload_content=False, redirect=False,
            )
        except urllib3.exceptions.HTTPError as e:
            raise MeshRefused("unreachable", f"local nginx at {self.base}: {type(e).__name__}") from None
        ok = False
        try:
            if r.status != 206:
                raise MeshRefused(f"http_{r.status}", f"answered {r.status}")
            want_range = f"bytes {offset}-{end}/{loc.size}"
            if r.headers.get("Content-Range") != want_range:
                raise MeshRefused("bad_range", f"Content-Range {r.headers.get('Content-Range')!r}, asked {want_range!r}")
            if r.headers.get(VERSION_HEADER) != loc.version:
                raise MeshRefused("version", f"version {r.headers.get(VERSION_HEADER)!r}, want {loc.version!r}")
            data = self._body(r, length)
            ok = True
            return data
        finally:
            if not ok:  # whatever is left of that answer must not be read as the next one's
                r.close()
            r.release_conn()

    def _body(self, r: urllib3.BaseHTTPResponse, length: int) -> bytearray:
        """Exactly ``length`` bytes, read in place (no copy per piece), within ``timeout`` in all: a peer
        that drips bytes must not hold a reader longer than one that stops."""
        buf = POOL.get(length)  # every byte is overwritten below, or the buffer is not returned
        view = memoryview(buf)
        got = 0
        deadline = time.monotonic() + self.timeout
        receive = httpbody.receiver(r)
        try:
            while got < length:
                n = receive(view[got : got + _PIECE])
                if not n:
                    raise MeshRefused("short_body", f"{got} bytes of {length}")
                got += n
                if time.monotonic() > deadline:
                    raise MeshRefused("slow", f"{got} of {length} bytes in {self.timeout:g}s")
            if r.read(1):  # a longer body is a lie too
                raise MeshRefused("long_body", f"more than the {length} bytes asked")
        except urllib3.exceptions.HTTPError as e:
            raise MeshRefused("broken_body", f"body: {type(e).__name__}") from None
        return buf

    def close(self) -> None:
        self._pool.close()


class FleetBackend:
    """A store whose large images are read through the mesh first. Listing, lookups and everything an
    operator sees are the inner store's: the catalog, versions and ETag pins stay as they are."""

    def __init__(self, inner: Backend, client: MeshClient, *, chunk_size: int, min_size: int, stats: FleetStats,
                 chunk_sums: str = "publish", elected: Callable[[Location], bool] = lambda loc: True) -> None:
        self.inner = inner
        self.name, self.kind = inner.name, inner.kind
        self.read_timeout = inner.read_timeout
        self.client = client
        self.chunk_size = chunk_size
        # one GET per chunk (each has its own owner): a prefetch run of several would fetch them one after
        # another in one worker thread, and hand none over before the last one came
        self.largest_read = chunk_size
        self.min_size = min_size
        self.stats = stats
        self.sums = SumsBook(inner, block=block_for(chunk_size), mode=chunk_sums,
                             count=lambda outcome: stats.count("sums", outcome), elected=elected)
        self._logged = RateLimit(60.0)
        # versions whose full read failed its digest with mesh bytes in it: read from the origin only
        self._distrusted: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def distrust(self, loc: Location) -> bool:
        """A full read of ``loc`` did not match its digest: bypass the mesh for this version. False if it
        was bypassed already (the origin's own bytes failed: the reader quarantines the copy)."""
        key = (loc.image_id, loc.version)
        with self._lock:
            if key in self._distrusted:
                return False
            self._distrusted.add(key)
        self.stats.add(integrity_failures=1)
        log.error("fleet: image %s (store '%s', version %s) read through the mesh failed its digest: a peer served "
                  "wrong bytes; reading it from the origin from now on", loc.image_id, loc.store, loc.version)
        return True

    def sums_maker(self, loc: Location) -> SumsMaker | None:
        """What a verified full read of ``loc`` sums its blocks with, to publish them (None: no need)."""
        return self.sums.maker(loc) if loc.size >= self.min_size else None

    def publish_sums(self, maker: SumsMaker, algo: str, digest: str) -> None:
        self.sums.publish(maker, algo, digest)

    def list_images(self) -> list[Location]:
        return self.inner.list_images()

    def stat(self, image_id: str) -> Location | None:
        return self.inner.stat(image_id)

    def describe(self) -> dict[str, str]:
        return {**self.inner.describe(), "fleet": self.client.base}

    def close(self) -> None:
        self.client.close()
        self.inner.close()

    def read(self, location: Location, offset: int, length: int) -> bytes:
        if location.size < self.min_size:
            data = self.inner.read(location, offset, length)
            self.stats.add(bypass_bytes=len(data))
            return data
        if (location.image_id, location.version) in self._distrusted:
            self.stats.count("fallbacks", "distrusted")
            data = self.inner.read(location, offset, length)
            self.stats.add(origin_bytes=len(data))
            return data
        pieces = []
        pos, end = offset, offset + length
        while pos < end:  # one GET per chunk: each chunk has its own owner
            chunk = pos // self.chunk_size
            upto = min(end, (chunk + 1) * self.chunk_size)
            pieces.append(self._piece(location, pos, upto - pos, chunk))
            pos = upto
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # type: ignore[return-value]

    def _piece(self, loc: Location, offset: int, length: int, chunk: int) -> bytes | bytearray:
        sums = self.sums.get(loc)
        # with sums, whole blocks are asked (and checked), and the asked range cut from them
        start, end = sums.aligned(offset, length) if sums is not None else (offset, offset + length)
        try:
            try:
                data = self.client.get(loc, start, end - start, chunk)
            except MeshRefused as e:
                if e.cause not in RETRY_CAUSES:
                    raise
                # The owner died under this request (nginx cannot retry a body it began to pass on) or
                # the local nginx gave up on it: nginx has marked it down by now, so one more ask goes to
                # the ring's next owner, whose one fetch serves the fleet -- the origin is the last resort.
                self.stats.count("retries", e.cause)
                data = self.client.get(loc, start, end - start, chunk)
        except MeshRefused as e:
            self.stats.count("fallbacks", e.cause)
            if self._logged.allow(e.cause):
                log.warning("fleet: chunk %d of image %s (store '%s') not from the mesh (%s: %s); reading it from the "
                            "origin", chunk, loc.image_id, loc.store, e.cause, e)
            data = self.inner.read(loc, offset, length)
            self.stats.add(origin_bytes=len(data))
            return data
        length_from_mesh = length
        if sums is not None:
            bad = sums.bad_blocks(start, data)
            if bad:
                mended = self._mend(loc, chunk, sums, start, data, bad)
                length_from_mesh = length - sum(max(0, min(b, offset + length) - max(a, offset)) for a, b in mended)
            self.stats.add(sums_checked_bytes=len(data))
        self.stats.add(mesh_bytes=length_from_mesh, mesh_reads=1)
        return data if (start, end) == (offset, offset + length) else data[offset - start : offset - start + length]

    def _mend(self, loc: Location, chunk: int, sums: ChunkSums, start: int, data: bytearray,
              bad: list[int]) -> list[tuple[int, int]]:
        """Blocks a peer got wrong, replaced in place by the store's own (the right ones are kept); the
        ranges replaced. If the store's do not match the sums either, the sums are what is wrong (the
        store is the authority), and they are dropped for this version."""
        self.stats.count("fallbacks", "chunk_sum")
        if self._logged.allow("chunk_sum"):
            log.warning("fleet: chunk %d of image %s (store '%s'): %d block(s) from the mesh do not match the chunk "
                        "sums stored with the image (a peer served wrong bytes); reading those from the origin",
                        chunk, loc.image_id, loc.store, len(bad))
        mended, wrong_sums = [], False
        for index in bad:
            at = index * sums.block
            good = self.inner.read(loc, at, min(sums.block, loc.size - at))
            self.stats.add(origin_bytes=len(good))
            if not wrong_sums and sums.bad_blocks(at, good):
                wrong_sums = True
                self.sums.reject(loc, index)
            data[at - start : at - start + len(good)] = good
            mended.append((at, at + len(good)))
        return mended
