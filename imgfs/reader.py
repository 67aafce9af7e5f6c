"""Turns (offset, size) reads of one image into chunk fetches: cache first, then the store.

- One fetch per chunk however many readers want it: every fetch is a task in the daemon's nursery with
  an Event readers wait on (single-flight). A reader whose request is interrupted stops waiting; the fetch
  goes on and its result still lands in the cache for the next reader.
- Demand and prefetch fetches draw on separate thread limiters, so prefetch can never take the slots a
  demand read needs ("yields to demand").
- Each open file detects sequential access: while reads follow each other the prefetch window grows
  (twice the sequential run, from one chunk up to prefetch_max); a jump resets it to nothing, so random
  readers never pay for prefetch.
- Random readers fetch small: a read that does not follow the previous one, of at most SMALL_READ bytes,
  whose chunk is neither cached nor on its way, fetches only the 64 KiB blocks it covers (one ranged
  request) and caches them as 64 KiB entries of their own (verified per block like any chunk, kept
  across restarts). A random 4 KiB read then costs the store 64 KiB, not a whole chunk, and the first
  read of an image returns before a whole chunk has arrived. Once reads follow each other, the reader
  is sequential and fetches whole chunks with prefetch again.
- Exact bytes or an error: a chunk of the wrong length is an error, never padded.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol, Sequence

import trio

from .backends.base import Backend
from .cache import BLOCK, ChunkCache
from .errors import BackendError, BackendUnavailable, Busy, ImgfsError, IntegrityError, ShortRead, StaleImage
from .model import ChunkKey, Location

log = logging.getLogger(__name__)

RUN_BYTES = 32 * 1024 * 1024  # the largest single request a sequential prefetch makes
# Random readers: blocks of the cache's own verification size, fetched for reads of at most SMALL_READ.
SMALL_BLOCK = BLOCK
SMALL_READ = 256 * 1024
# A random reader whose reads land next to its recent ones (file system metadata, a qcow2 table) gets
# larger fetches, doubling up to this; one whose reads are scattered keeps fetching 64 KiB.
SMALL_GROW_MAX = 512 * 1024
NEIGHBOURS = 8  # how many recent small reads count as neighbourhood
# A sequential reader is prefetched for at most this many seconds of its own pace ahead (and never
# less than two chunks): a slow reader (a busy qemu-img, a hash of every byte) 128 MiB ahead would
# find what was fetched for it gone from the memory tier, and read it back from the cache disk.
# Measured, 16 fleet nodes each hashing what it reads: 5.9 CPU-s/GiB and 31.9 s without, 2.8 and 19.4 s with.
LEAD_SECONDS = 2.0
# After a copy did not answer in time (a hung cinder-api, a stopped OSD), further fetches of it fail at
# once for this long: the kernel retries a failed read several times, and each retry must not cost the
# reader another full timeout (nor the sick service another request).
UNAVAILABLE_HOLD = 5.0


class Holder(Protocol):
    """A store whose locations must be made ready before reading (Cinder: attached), held while a
    fetch from them is in flight (see imgfs.attach: a short grace keeps it for the next one)."""

    def hold(self, loc: Location) -> None: ...

    def release(self, loc: Location) -> None: ...

    async def ready(self, loc: Location) -> None: ...

    def is_ready(self, loc: Location) -> bool: ...


# The cost of getting bytes from each kind of store, cheapest first: a local file, an attached block
# device, then an object store across the network.
_KIND_COST = {"file": 0, "memory": 0, "cinder": 1, "s3": 2}


# Glance's os_hash_algo values imgfs checks images against (Glance's hashing_algorithm, sha512 by default)
VERIFIED_HASHES = ("sha512", "sha256")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FullReadTap(Protocol):
    """Sees every byte of one full, verified read of ``loc``, in image order, in the verifier's worker
    thread (the fleet sums its blocks to publish them)."""

    loc: Location

    def update(self, piece: memoryview | bytes) -> None: ...


class Witness(Protocol):
    """Told of full reads that matched the catalog's digest: what they are proof of is for it to use."""

    def tap(self, loc: Location) -> FullReadTap | None:
        """Something to see a full read of ``loc`` with, or None (called on the event loop: no I/O)."""

    def matched(self, tap: FullReadTap, algo: str, digest: str) -> None:
        """That read matched ``digest`` (called in a worker thread: may do I/O)."""

    def untapped(self, loc: Location) -> None:
        """A full read of ``loc`` matched its digest with no tap (called on the event loop: no I/O)."""


@dataclass
class FetchStats:
    fetches: int = 0
    fetched_bytes: int = 0
    prefetches: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bytes_by_store: dict[str, int] = field(default_factory=dict)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, store: str, nbytes: int, seconds: float) -> None:
        self.fetches += 1
        self.fetched_bytes += nbytes
        self.bytes_by_store[store] = self.bytes_by_store.get(store, 0) + nbytes
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def latency_buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, Prometheus style."""
        total, result = 0, []
        for le, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.latency_counts):
            total += count
            result.append((le, total))
        return result


class _Flight:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: memoryview | None = None
        self.error: ImgfsError | None = None


class ChunkFetcher:
    """Single-flight chunk fetching shared by every open file of the daemon."""

    def __init__(
        self,
        cache: ChunkCache,
        backends: dict[str, Backend],
        *,
        chunk_size: int,
        max_connections: int,
        on_stale: Callable[[Location], None] = lambda loc: None,
        holders: dict[str, Holder] | None = None,
        weights: dict[str, int] | None = None,
    ) -> None:
        self.cache = cache
        self.workers = cache.workers  # one set of threads for the read path: fetches and chunk files
        self.backends = backends
        self.holders = holders or {}
        self.weights = weights or {}
        self.chunk_size = chunk_size
        self.on_stale = on_stale
        self.stats = FetchStats()
        self._inflight: dict[ChunkKey, _Flight] = {}
        self._unavailable: dict[Location, tuple[float, BackendUnavailable]] = {}  # copy -> (when, error)
        # copies whose bytes failed end-to-end verification: never read again while this version lasts
        self.quarantined: set[Location] = set()
        # Called with a copy that failed verification: True when its bytes came through a relay that is
        # now bypassed for it, so the store itself deserves a read before the copy is quarantined.
        self.second_chance: Callable[[Location], bool] | None = None
        self.witness: Witness | None = None
        # (copy, algorithm, digest) of copies read whole, from that copy alone, that matched the catalog's
        # digest: later reads of them trust their cached chunks' xxh3 blocks instead of hashing again
        # (sha512 is ~350 MB/s per core here: 3 CPU-s per GiB, every time). In memory: a restart verifies
        # each copy once more.
        self._verified: set[tuple[Location, str, str]] = set()
        self._demand = trio.CapacityLimiter(max_connections)
        self._prefetch = trio.CapacityLimiter(max(1, max_connections // 2))
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Fetch tasks live in the daemon's nursery, not in the request that first wanted the chunk."""
        self._nursery = nursery
        self.workers.attach(nursery)

    def order(self, locations: Sequence[Location]) -> list[Location]:
        """Copies in the order to read them: the store's weight (Glance's semantics, higher first), then
        copies already attached or partly cached here, then the cheapest kind of store."""

        def rank(loc: Location) -> tuple[int, int, int]:
            holder = self.holders.get(loc.store)
            local = (holder is not None and holder.is_ready(loc)) or self.cached_fraction(loc) > 0
            return (-self.weights.get(loc.store, 0), 0 if local else 1, _KIND_COST.get(self.backends[loc.store].kind, 3))

        return sorted(locations, key=rank)  # stable: ties keep the catalog's order

    def spawn(self, fn, *args) -> None:
        """Run a background task in the daemon's nursery."""
        assert self._nursery is not None, "ChunkFetcher.attach() was not called"
        self._nursery.start_soon(fn, *args)

    def verifier(self, locations: Sequence[Location], algo: str | None, digest: str | None,
                 size: int) -> "StreamVerifier | None":
        """A verifier for a reader of ``locations`` against the catalog's digest, or None when there is no
        digest to check or every one of those copies was verified before (and the witness wants no
        proof of it: a fleet node left the first read to others may make the chunk sums on its second)."""
        if algo not in VERIFIED_HASHES or not digest:
            return None
        tap = self.witness.tap(locations[0]) if self.witness is not None and locations else None
        if tap is None and all((loc, algo, digest.lower()) in self._verified for loc in locations):
            return None
        return StreamVerifier(algo, digest, size, tap=tap)

    async def witnessed(self, tap: FullReadTap, algo: str, digest: str) -> None:
        assert self.witness is not None
        try:
            await trio.to_thread.run_sync(self.witness.matched, tap, algo, digest)
        except Exception:  # what it does with the proof is optional; the read itself is done and right
            log.exception("after the verified read of image %s", tap.loc.image_id)

    def mark_verified(self, loc: Location, algo: str, digest: str) -> None:
        if (loc, algo, digest) not in self._verified:
            self._verified.add((loc, algo, digest))
            log.info("image %s: the copy in store '%s' (version %s) matched its %s digest end to end; later reads "
                     "of it rely on the cached chunks' own checksums", loc.image_id, loc.store, loc.version, algo)

    def lift_quarantine(self, image_id: str) -> int:
        """Let copies of ``image_id`` that failed end-to-end verification be read again (``imgfs evict``:
        the operator replaced or repaired them); how many were quarantined."""
        lifted = {loc for loc in self.quarantined if loc.image_id == image_id}
        self.quarantined -= lifted
        return len(lifted)

    def drop_copies(self, locations: Sequence[Location]) -> None:
        """Forget every cached chunk of copies that failed end-to-end verification (at once; their files go
        in the background).

        A copy whose bytes came through a relay (the fleet's mesh) that ``second_chance`` now bypasses for
        it is not quarantined: its next read comes from the store itself, and only a mismatch then
        quarantines it."""
        for loc in locations:
            self._verified = {v for v in self._verified if v[0] != loc}
            # forgotten now, so the very next read cannot find them; the files go in the background
            self.spawn(self.cache.remove_files, self.cache.forget(loc.store, loc.image_id))
            if self.second_chance is not None and self.second_chance(loc):
                self.quarantined.discard(loc)
                log.warning("image %s (store '%s'): the mismatch came with bytes from the mesh; reading this version "
                            "from the store itself from now on", loc.image_id, loc.store)

    @asynccontextmanager
    async def _using(self, loc: Location) -> AsyncIterator[None]:
        """Hold ``loc``'s store for one fetch (Cinder: attached while bytes move, never for an open
        file whose chunks are cached): an attachment is a guest on a volume that Glance owns."""
        holder = self.holders.get(loc.store)
        if holder is None:
            yield
            return
        holder.hold(loc)
        try:
            await holder.ready(loc)
            yield
        finally:
            holder.release(loc)

    def key(self, loc: Location, index: int) -> ChunkKey:
        return ChunkKey(loc.store, loc.image_id, loc.version, self.chunk_size, index)

    def small_key(self, loc: Location, block: int) -> ChunkKey:
        return ChunkKey(loc.store, loc.image_id, loc.version, SMALL_BLOCK, block)

    def has_chunk(self, loc: Location, index: int) -> bool:
        """The chunk is cached or being fetched: reading it costs the store nothing more."""
        key = self.key(loc, index)
        return key in self._inflight or self.cache.contains(key)

    async def read_small(self, loc: Location, offset: int, length: int, fetch_end: int = 0) -> memoryview:
        """Bytes [offset, offset+length) of the image from 64 KiB blocks: cached ones from the cache, the
        missing ones in runs, one ranged request per run, each block single-flight. A run that starts
        in the range may extend to ``fetch_end`` (blocks fetched for the reads expected next)."""
        bs = SMALL_BLOCK
        first, last = offset // bs, (offset + length - 1) // bs
        fetch_last = max(last, (min(fetch_end, loc.size) - 1) // bs)
        parts: list[memoryview] = []
        for block in range(first, last + 1):
            key = self.small_key(loc, block)
            flight = self._inflight.get(key)
            if flight is None:
                blen = min(bs, loc.size - block * bs)
                data = await self.cache.read(key, 0, blen, blen)
                if data is not None:
                    parts.append(data)
                    continue
                flight = self._inflight.get(key)  # another reader may have started it meanwhile
                if flight is None:
                    run = [block]
                    while run[-1] < fetch_last:
                        nxt = self.small_key(loc, run[-1] + 1)
                        if nxt in self._inflight or self.cache.contains(nxt):
                            break
                        run.append(run[-1] + 1)
                    flights = [(i, self.small_key(loc, i), _Flight()) for i in run]
                    for _, k, f in flights:
                        self._inflight[k] = f
                    self.spawn(self._fly_span, loc, flights, SMALL_BLOCK, self._demand, False)
                    flight = flights[0][2]
            parts.append(await self.wait(flight))
        data = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
        lo = offset - first * bs
        return data[lo : lo + length]

    def chunk_length(self, loc: Location, index: int) -> int:
        return min(self.chunk_size, loc.size - index * self.chunk_size)

    def cached_fraction(self, loc: Location) -> float:
        if loc.size == 0:
            return 1.0
        chunks = -(-loc.size // self.chunk_size)
        return min(1.0, self.cache.cached_chunks(loc.store, loc.image_id, loc.version, self.chunk_size) / chunks)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def start(self, loc: Location, index: int) -> _Flight | memoryview:
        """The chunk if it is in memory, else the flight fetching it (started if none is)."""
        key = self.key(loc, index)
        data = self.cache.get_memory(key)
        if data is not None:
            return data
        flight = self._inflight.get(key)
        if flight is None:
            assert self._nursery is not None, "ChunkFetcher.attach() was not called"
            flight = self._inflight[key] = _Flight()
            self._nursery.start_soon(self._fly, key, loc, index, flight)
        return flight

    def prefetch(self, loc: Location, first: int, last: int) -> None:
        """Prefetch chunks [first, last): on-disk ones into the page cache, the rest from the store in
        runs of adjacent chunks, one ranged request per run of up to ``RUN_BYTES``. Every request
        costs the store and us the same whatever its size (measured: 8 MiB GETs cost s3rver twice the
        CPU per GiB of 32 MiB ones)."""
        assert self._nursery is not None, "ChunkFetcher.attach() was not called"
        largest = getattr(self.backends[loc.store], "largest_read", RUN_BYTES)  # see backends.base.Backend
        per_run = max(1, min(RUN_BYTES, largest) // self.chunk_size)
        run: list[tuple[int, ChunkKey, _Flight]] = []
        for index in range(first, last + 1):
            key = self.key(loc, index) if index < last else None
            wanted = key is not None and key not in self._inflight and self.cache.get_memory(key) is None
            if wanted and self.cache.contains(key):  # type: ignore[arg-type]
                self._nursery.start_soon(self.cache.willneed, key, self.chunk_length(loc, index))
                wanted = False
            if wanted:
                run.append((index, key, _Flight()))  # type: ignore[arg-type]
            if run and (not wanted or len(run) == per_run):
                for _, k, flight in run:
                    self._inflight[k] = flight
                self._nursery.start_soon(self._fly_span, loc, run, self.chunk_size, self._prefetch, True)
                self.stats.prefetches += len(run)
                run = []

    async def _fly_span(self, loc: Location, run: list[tuple[int, ChunkKey, _Flight]], unit: int,
                        limiter: trio.CapacityLimiter, prefetch: bool) -> None:
        """Fetch adjacent units (chunks, or the 64 KiB blocks of a random reader) [run] with one ranged
        request, hand each flight its slice, then cache them."""
        first = run[0][0]
        try:
            self._check_available(loc)
            async with self._using(loc), limiter:
                end = min((run[-1][0] + 1) * unit, loc.size)
                fetch = self._fetch_range if unit == SMALL_BLOCK else self._fetch_chunks
                data = memoryview(await fetch(loc, first * unit, end - first * unit))
                for i, _, flight in run:
                    lo = (i - first) * unit
                    flight.data = data[lo : min(lo + unit, data.nbytes)]
                    flight.done.set()
                for _, key, flight in run:
                    # remembered too: a sequential reader's next READs are served from these bytes, not
                    # read back from the cache file and verified again (the tier counts the whole buffer)
                    await self.cache.put(key, flight.data)  # type: ignore[arg-type]
        except ImgfsError as e:
            for _, _, flight in run:
                flight.error = e
            self._count_error(e, loc, prefetch=prefetch)
        except Exception as e:  # a bug must fail these reads, not the daemon
            log.exception("unexpected error fetching image %s at %d", loc.image_id, first * unit)
            for _, _, flight in run:
                flight.error = BackendError(f"internal error fetching image {loc.image_id}: {type(e).__name__}")
        finally:
            for _, key, flight in run:
                del self._inflight[key]
                flight.done.set()

    async def warm(self, loc: Location, first: int, last: int) -> None:
        """Make chunks [first, last) cached, through the prefetch slots (a warm never starves demand
        reads) and single flight (a chunk being fetched anyway is not fetched twice)."""
        self.prefetch(loc, first, last)
        for index in range(first, last):
            flight = self._inflight.get(self.key(loc, index))
            if flight is not None:
                await self.wait(flight)

    def _check_available(self, loc: Location) -> None:
        held = self._unavailable.get(loc)
        if held is not None:
            if trio.current_time() - held[0] < UNAVAILABLE_HOLD:
                raise held[1]
            del self._unavailable[loc]

    def _count_error(self, e: ImgfsError, loc: Location, *, prefetch: bool) -> None:
        if isinstance(e, BackendUnavailable):  # the hold runs from the latest failure
            self._unavailable[loc] = (trio.current_time(), e)
        self.stats.errors[type(e).__name__] = self.stats.errors.get(type(e).__name__, 0) + 1
        if isinstance(e, StaleImage):
            self.on_stale(loc)
        # The reader that gets this error logs it (fs.py, rate limited); a prefetch error nobody reads is noise.
        log.debug("%s fetch failed: %s", "prefetch" if prefetch else "demand", e)

    async def get(self, loc: Location, index: int) -> memoryview:
        got = self.start(loc, index)
        if isinstance(got, memoryview):
            return got
        return await self.wait(got)

    @staticmethod
    async def wait(flight: _Flight) -> memoryview:
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    async def read(self, loc: Location, index: int, start: int, end: int) -> memoryview:
        """Verified bytes [start, end) of one chunk: memory, else disk, else the store (single flight)."""
        key = self.key(loc, index)
        length = self.chunk_length(loc, index)
        if key not in self._inflight:
            data = await self.cache.read(key, start, end, length)
            if data is not None:
                return data
        return (await self.get(loc, index))[start:end]

    async def _fly(self, key: ChunkKey, loc: Location, index: int, flight: _Flight) -> None:
        try:
            data = await self.cache.get(key, self.chunk_length(loc, index))
            if data is None:
                self._check_available(loc)
                # Attached before taking a fetch slot: an attach waiting out another host's transitional
                # state must not starve reads of every other image.
                async with self._using(loc), self._demand:
                    data = memoryview(await self._fetch(loc, index))
                    flight.data = data
                    flight.done.set()
                    # Still holding the slot: a store faster than the cache disk slows fetching down
                    # instead of piling chunks up in memory.
                    await self.cache.put(key, data)
            flight.data = data
        except ImgfsError as e:
            flight.error = e
            self._count_error(e, loc, prefetch=False)
        except Exception as e:  # a bug must fail this read, not the daemon
            log.exception("unexpected error fetching chunk %d of image %s", index, loc.image_id)
            flight.error = BackendError(f"internal error fetching image {loc.image_id}: {type(e).__name__}")
        finally:
            del self._inflight[key]
            flight.done.set()

    async def _fetch(self, loc: Location, index: int) -> bytes | bytearray:
        return await self._fetch_chunks(loc, index * self.chunk_size, self.chunk_length(loc, index))

    async def _fetch_chunks(self, loc: Location, offset: int, length: int) -> bytes | bytearray:
        """Chunk-aligned bytes [offset, offset+length) from the store, except the 64 KiB blocks a random
        reader of the same image already cached: those are read from the cache, so a byte range is
        fetched once whatever mix of random and sequential readers asked for it. Blocks still in flight
        are fetched again rather than waited for: this holds a fetch slot that their fetch may need."""
        bs = SMALL_BLOCK
        end = offset + length
        # (a reader's first READs come as small blocks before it is seen to be sequential: the chunks
        # after them hold none, and must not cost a copy of every byte into a new buffer)
        if not self.cache.holds_any(loc.store, loc.image_id, loc.version, bs) or \
                not any(self.cache.contains(self.small_key(loc, b)) for b in range(offset // bs, -(-end // bs))):
            return await self._fetch_range(loc, offset, length)
        out = bytearray(length)
        view = memoryview(out)
        missing_from: int | None = None  # the first block of the run of missing blocks so far
        for block in range(offset // bs, -(-end // bs) + 1):
            lo = block * bs
            have = False
            if lo < end:
                key = self.small_key(loc, block)
                if self.cache.contains(key):
                    blen = min(bs, loc.size - lo)
                    data = await self.cache.read(key, 0, blen, blen)
                    if data is not None:
                        view[lo - offset : lo - offset + blen] = data
                        have = True
                if not have:
                    missing_from = block if missing_from is None else missing_from
                    continue
            if missing_from is not None:  # a run of missing blocks ends here: one ranged request
                start = missing_from * bs
                view[start - offset : min(lo, end) - offset] = await self._fetch_range(loc, start, min(lo, end) - start)
                missing_from = None
        return out

    async def _fetch_range(self, loc: Location, offset: int, length: int) -> bytes:
        backend = self.backends[loc.store]
        started = trio.current_time()
        # A read touches no shared state, so neither a shutdown nor a reader need wait out a hung store:
        # the thread is left to finish (or fail) on its own.
        with trio.move_on_after(backend.read_timeout or math.inf) as waited:
            data = await self.workers.run(backend.read, loc, offset, length, abandon_on_cancel=True)
        if waited.cancelled_caught:
            raise BackendUnavailable(f"store '{loc.store}': reading image {loc.image_id} at {offset}+{length} took over "
                                     f"{backend.read_timeout:g}s (volume_read_timeout); is the storage behind it healthy?")
        log.debug("fetched %d bytes at %d of image %s from store '%s' in %.1f ms", length, offset, loc.image_id,
                  loc.store, (trio.current_time() - started) * 1e3)
        if len(data) != length:  # backends promise this; bytes are too important to trust a promise
            raise ShortRead(f"store '{loc.store}': image {loc.image_id} at {offset}: got {len(data)} bytes, expected {length}")
        self.stats.observe(loc.store, length, trio.current_time() - started)
        return data


class StreamVerifier:
    """Hashes what one open file returns, in image order, and checks it against the catalog's digest
    once the whole image went through (Glance's os_hash_value: sha512).

    The kernel's readahead keeps several requests in flight, so pieces may arrive a little out of
    order: up to ``window`` bytes of them wait for the gap to fill. A reader that jumps further gives
    up verification for this open (random readers are not verified; ``imgfs verify`` reads in order).
    Verification only ever withholds a verdict, never invents one: a piece it cannot place leaves the
    image unverified for this open, not failed.
    Hashing runs in a worker thread: 1 MiB of sha512 is ~1 ms the event loop should not spend.
    """

    def __init__(self, algo: str, expected: str, size: int, window: int = 16 * 1024 * 1024,
                 tap: FullReadTap | None = None) -> None:
        self.algo_name = algo
        self.tap = tap  # sees the same bytes, in the same worker thread
        self.expected = expected.lower()
        self.size = size
        self.window = window
        self._hash = hashlib.new(algo)
        self._done = 0  # bytes [0, _done) are hashed
        self._pending: dict[int, memoryview | bytes] = {}
        self._pending_bytes = 0
        self._lock = trio.Lock()
        self.active = True

    @property
    def algo(self) -> str:
        return self._hash.name

    async def feed(self, offset: int, data: memoryview | bytes) -> bool | None:
        """None while incomplete; True/False once the whole image was hashed."""
        if not self.active or offset + len(data) <= self._done:
            return None
        if offset > self._done:
            if offset - self._done > self.window or self._pending_bytes + len(data) > self.window:
                self.active, self._pending = False, {}
                return None
            self._pending[offset] = data
            self._pending_bytes += len(data)
            return None
        async with self._lock:
            pieces = [memoryview(data)[self._done - offset :]]
            end = offset + len(data)
            while end in self._pending:
                nxt = self._pending.pop(end)
                self._pending_bytes -= len(nxt)
                pieces.append(nxt)
                end += len(nxt)
            self._done = end
            for piece in pieces:
                await trio.to_thread.run_sync(self._update, piece)
            if self._done >= self.size:
                self.active = False
                return self._hash.hexdigest() == self.expected
        return None

    def _update(self, piece: memoryview | bytes) -> None:
        self._hash.update(piece)
        if self.tap is not None:
            self.tap.update(piece)


class SequentialRun:
    """Whether one open file's reads follow each other, and how far ahead of them to prefetch: twice
    the run so far, up to ``prefetch_max``, and, once its pace is known, no more than LEAD_SECONDS of it
    (never less than two units)."""

    def __init__(self, slack: int) -> None:
        self.slack = slack  # how far from the expected offset a read may land and still continue the run
        self.next = 0  # where a sequential reader reads next
        self.bytes = 0  # read sequentially so far
        self.began = 0.0  # when the current run began (trio clock)

    def track(self, offset: int, end: int) -> bool:
        """Count the read [offset, end); False when it broke the run (prefetch starts over)."""
        if self.next - self.slack <= offset <= self.next + self.slack and (offset or self.next):
            if not self.bytes:
                self.began = trio.current_time()
            self.bytes += end - offset
        else:
            self.bytes = 0
        self.next = max(end, self.next) if self.bytes else end
        return self.bytes > 0

    def window(self, prefetch_max: int, unit: int) -> int:
        window = min(prefetch_max, max(unit, 2 * self.bytes))
        elapsed = trio.current_time() - self.began
        if elapsed > LEAD_SECONDS:  # its pace is known
            window = min(window, max(2 * unit, int(self.bytes / elapsed * LEAD_SECONDS)))
        return window


class ImageReader:
    """One open file: reads of pinned versions of one image, with sequential prefetch.

    ``locations`` are the copies it may read, in preference order (one for stores/<store>/<id>, every
    store's for images/<id>). When a chunk cannot be had from the current copy (store down, volume
    held elsewhere, I/O error) the reader moves on to the next copy of the same size and stays there;
    only when every copy failed does the reader see the error. A changed copy (ESTALE) is not a
    failure to route around: the open file is pinned to what it opened.
    """

    def __init__(
        self,
        fetcher: ChunkFetcher,
        locations: Sequence[Location],
        *,
        prefetch_max: int,
        verify: StreamVerifier | None = None,
        on_integrity_error: Callable[[Sequence[Location]], None] = lambda locs: None,
    ) -> None:
        self.fetcher = fetcher
        self.verify = verify
        self.on_integrity_error = on_integrity_error
        self.failed = False
        self.locations = list(locations)
        self.loc = self.locations[0]
        self.prefetch_max = prefetch_max
        self._held = [self.loc]  # the copies this open file read from (quarantined together on a mismatch)
        self._copies_read: set[Location] = set()  # while verifying: the copies bytes came from
        # The kernel's readahead keeps several requests in flight, so they may arrive slightly out of
        # order: anything within one chunk of the expected offset still counts as sequential.
        self._seq = SequentialRun(slack=fetcher.chunk_size)
        self._prefetched = 0  # chunks [.., _prefetched) have been asked for
        # Bytes read in a row before the reader counts as sequential (whole chunks, prefetch): a random
        # reader's read lands near its previous one now and then, and must not cost a chunk each time.
        self._sequential = min(2 * SMALL_READ, fetcher.chunk_size)
        self._recent: deque[int] = deque(maxlen=NEIGHBOURS)  # first blocks of the latest small reads
        self._grow = SMALL_BLOCK  # how much a small read fetches from its first block

    def close(self) -> None:
        """Nothing to give back: stores are held per fetch, not per open file."""

    @property
    def _run(self) -> int:
        return self._seq.bytes

    def _track(self, offset: int, end: int) -> None:
        if not self._seq.track(offset, end):
            self._prefetched = 0

    def _prefetch(self, end: int) -> None:
        if not self.prefetch_max or self._run < self._sequential:
            return
        cs = self.fetcher.chunk_size
        window = self._seq.window(self.prefetch_max, cs)
        first = max(self._prefetched, (end + cs - 1) // cs)
        total = (self.loc.size + cs - 1) // cs
        last = min((end + window + cs - 1) // cs, total)
        # Ask in batches (a quarter of the window, at most one run) rather than a chunk at a time, so the
        # store sees a few large requests instead of many small ones.
        batch = max(1, min(RUN_BYTES, window // 4) // cs)
        if last - first >= batch or (last == total and last > first):
            self.fetcher.prefetch(self.loc, first, last)
            self._prefetched = last

    def _cached_copy(self, index: int) -> Location:
        """The current copy, unless only another copy of the same image has this chunk cached: local
        bytes beat any store (the copies are the same image, and end-to-end verification checks it)."""
        cache = self.fetcher.cache
        if len(self.locations) == 1 or cache.contains(self.fetcher.key(self.loc, index)):
            return self.loc
        for loc in self.locations:
            if loc is not self.loc and loc.size == self.loc.size and loc not in self.fetcher.quarantined \
                    and cache.contains(self.fetcher.key(loc, index)):
                return loc
        return self.loc

    def _fail_over(self, error: ImgfsError) -> bool:
        """Switch to the next copy after ``error``; False when there is none left."""
        position = self.locations.index(self.loc)
        for loc in self.locations[position + 1 :]:
            if loc.size == self.loc.size:
                log.warning("image %s: %s; reading from store '%s' instead", loc.image_id, error, loc.store)
                self.loc = loc
                self._held.append(loc)
                self._prefetched = 0
                return True
        return False

    def _small_fetch_end(self, offset: int, chunk_end: int) -> int:
        """Where a small read at ``offset`` fetches up to: its own blocks, or more when it lands next to
        (within two blocks of) a recent small read, doubling per neighbour up to SMALL_GROW_MAX;
        never past its chunk (whole chunks are the sequential reader's)."""
        block = offset // SMALL_BLOCK
        if any(abs(block - b) <= 2 for b in self._recent):
            self._grow = min(2 * self._grow, SMALL_GROW_MAX)
        else:
            self._grow = SMALL_BLOCK
        self._recent.append(block)
        return min(block * SMALL_BLOCK + self._grow, chunk_end)

    async def _chunk(self, index: int, start: int, end: int) -> memoryview:
        small_end: int | None = None  # decided once per read: a retry on another copy is not a neighbour
        while True:
            try:
                if self.loc in self.fetcher.quarantined:
                    raise IntegrityError(f"image {self.loc.image_id}: the copy in store '{self.loc.store}' failed verification")
                copy = self._cached_copy(index)
                if self.verify is not None:
                    self._copies_read.add(copy)
                if self._run < self._sequential and end - start <= SMALL_READ and not self.fetcher.has_chunk(copy, index):
                    cs = self.fetcher.chunk_size  # a random reader: the blocks it needs, not the chunk
                    offset = index * cs + start
                    if small_end is None:
                        small_end = self._small_fetch_end(offset, (index + 1) * cs)
                    data = await self.fetcher.read_small(copy, offset, end - start, small_end)
                else:
                    data = await self.fetcher.read(copy, index, start, end)
                if data.nbytes != end - start:
                    raise ShortRead(f"image {self.loc.image_id} chunk {index}: {data.nbytes} bytes, expected {end - start}")
                return data
            except StaleImage:
                raise
            except (BackendError, Busy, IntegrityError) as e:
                if not self._fail_over(e):
                    raise

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """The bytes at [offset, offset+size), short only at the end of the image.

        After an integrity failure every read of this open file fails: the kernel retries a failed
        readahead with a fresh read, which must not quietly return the bytes that failed.

        A read inside one chunk returns a view of the chunk's bytes: pyfuse3 replies from any buffer,
        so the 1 MiB copy per kernel request is saved (it was 17% of the daemon's GIL time)."""
        if self.failed:
            raise IntegrityError(f"image {self.loc.image_id}: bytes do not match the catalog's digest")
        end = min(offset + size, self.loc.size)
        if offset >= end:
            return b""
        self._track(offset, end)
        cs = self.fetcher.chunk_size
        first, last = offset // cs, (end - 1) // cs
        if last > first and (self._run >= self._sequential or end - offset > SMALL_READ):  # spans chunks: start every missing fetch now, so they run in parallel
            for i in range(first, last + 1):
                copy = self._cached_copy(i)
                if not self.fetcher.cache.contains(self.fetcher.key(copy, i)):
                    self.fetcher.start(copy, i)
        self._prefetch(end)
        parts = []
        for i in range(first, last + 1):
            base = i * cs
            parts.append(await self._chunk(i, max(offset, base) - base, min(end, base + cs) - base))
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.verify is not None and self.verify.active:
            verdict = await self.verify.feed(offset, data)
            if verdict is True and len(self._copies_read) == 1:  # one copy, read whole: that copy is right
                copy = next(iter(self._copies_read))
                self.fetcher.mark_verified(copy, self.verify.algo_name, self.verify.expected)
                tap = self.verify.tap
                if tap is not None and tap.loc == copy:
                    self.fetcher.spawn(self.fetcher.witnessed, tap, self.verify.algo_name, self.verify.expected)
                elif self.fetcher.witness is not None:
                    self.fetcher.witness.untapped(copy)
            if verdict is False:
                # The whole image went through and is not what the catalog says: the read that would
                # complete it fails, so a copy made with dd or qemu-img fails too instead of succeeding.
                log.error("integrity error: image %s read end to end does not match its %s digest; quarantined "
                          "the copies read (%s) and dropped their cached chunks", self.loc.image_id, self.verify.algo,
                          ", ".join(loc.store for loc in self._held))
                self.failed = True
                self.fetcher.quarantined.update(self._held)
                self.on_integrity_error(self._held)
                raise IntegrityError(f"image {self.loc.image_id}: bytes do not match the catalog's digest")
        return data
