"""The read path on the in-memory store: exact bytes, single flight, prefetch, errors never padded."""

from __future__ import annotations

import random

import pytest
import trio

from imgfs.backends.memory import MemoryBackend
from imgfs.cache import ChunkCache
from imgfs.errors import BackendError, ShortRead, StaleImage
from imgfs.reader import ChunkFetcher, ImageReader

CS = 64 * 1024


@pytest.fixture
async def parts(tmp_path, nursery):
    backend = MemoryBackend(name="mem")
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes=1 << 30, max_count=10_000, memory_bytes=4 * CS)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"mem": backend}, chunk_size=CS, max_connections=4)
    fetcher.attach(nursery)
    return backend, cache, fetcher


async def settle(fetcher: ChunkFetcher) -> None:
    """Wait until every fetch, and the cache fill that follows it, is done."""
    while fetcher.inflight:
        await trio.sleep(0.005)


def image(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_exact_bytes_at_every_boundary(parts):
    backend, _, fetcher = parts
    data = image(5 * CS + 123)
    loc = backend.put("img", data)
    reader = ImageReader(fetcher, [loc], prefetch_max=0)
    cases = [(0, 1), (0, CS), (CS - 1, 2), (CS - 1, CS + 2), (3 * CS + 5, 2 * CS), (len(data) - 1, 10),
             (len(data), 10), (len(data) + 100, 10), (0, len(data) + 1000), (0, 0)]
    for offset, size in cases:
        assert await reader.read(offset, size) == data[offset : offset + size], (offset, size)


async def test_concurrent_readers_fetch_each_chunk_once(parts):
    backend, _, fetcher = parts
    backend.latency = 0.02  # keep fetches in flight while the other readers arrive
    data = image(8 * CS)
    loc = backend.put("img", data)
    results = {}

    async def read_all(n):
        reader = ImageReader(fetcher, [loc], prefetch_max=4 * CS)
        out = bytearray()
        for off in range(0, len(data), 16 * 1024):
            out += await reader.read(off, 16 * 1024)
        results[n] = bytes(out)

    async with trio.open_nursery() as n:
        for i in range(12):
            n.start_soon(read_all, i)
    assert all(r == data for r in results.values())
    assert backend.read_bytes == len(data)  # every byte fetched once (in chunks or runs of chunks)
    assert set(backend.reads.values()) == {1}


async def test_second_read_comes_from_cache(parts):
    backend, cache, fetcher = parts
    data = image(6 * CS)
    loc = backend.put("img", data)
    await ImageReader(fetcher, [loc], prefetch_max=0).read(0, len(data))
    await settle(fetcher)  # let the background fills land
    before, hits = sum(backend.reads.values()), cache.stats.hits
    cache._memory.clear()  # force the disk tier
    assert await ImageReader(fetcher, [loc], prefetch_max=0).read(0, len(data)) == data
    assert sum(backend.reads.values()) == before
    assert cache.stats.hits - hits == 6


async def test_sequential_reads_prefetch_and_random_reads_do_not(parts):
    backend, _, fetcher = parts
    data = image(40 * CS)
    loc = backend.put("seq", data)
    reader = ImageReader(fetcher, [loc], prefetch_max=8 * CS)
    for off in range(0, 4 * CS, 16 * 1024):
        assert await reader.read(off, 16 * 1024) == data[off : off + 16 * 1024]
    await settle(fetcher)
    ahead = [off // CS for (_, off) in backend.reads if off >= 4 * CS]
    assert ahead, "a sequential reader must prefetch beyond what it read"
    assert max(ahead) <= 4 + 8  # never more than the window

    loc2 = backend.put("rand", image(40 * CS, seed=2))
    reader2 = ImageReader(fetcher, [loc2], prefetch_max=8 * CS)
    rng = random.Random(5)
    offsets = rng.sample(range(0, 40 * CS - 4096, 4096 * 37), 15)
    for off in offsets:
        await reader2.read(off, 4096)
    await settle(fetcher)
    fetched = {off for (img, off) in backend.reads if img == "rand"}
    assert fetched <= {off // CS * CS for off in offsets}  # only the chunks asked for
    assert fetcher.stats.prefetches >= 1


async def test_short_store_read_is_an_error_not_zeros(parts):
    backend, cache, fetcher = parts
    loc = backend.put("img", image(3 * CS))
    backend.short_reads = 1
    with pytest.raises(ShortRead):
        await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 100)
    assert not cache.contains(fetcher.key(loc, 0))  # nothing wrong was cached
    assert await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 100) == backend.images["img"][0][:100]


async def test_store_failure_is_eio_and_not_cached(parts):
    backend, cache, fetcher = parts
    loc = backend.put("img", image(2 * CS))
    backend.fail_reads = 1
    with pytest.raises(BackendError) as info:
        await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 10)
    assert info.value.errno == 5  # EIO
    assert await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 10) == backend.images["img"][0][:10]


async def test_replaced_image_gives_estale_never_mixed_bytes(parts):
    backend, cache, fetcher = parts
    stale = []
    fetcher.on_stale = stale.append
    old = image(4 * CS, seed=1)
    loc = backend.put("img", old)
    reader = ImageReader(fetcher, [loc], prefetch_max=0)
    assert await reader.read(0, CS) == old[:CS]
    new = image(4 * CS, seed=2)
    backend.put("img", new)
    got = bytearray(await reader.read(0, CS))  # cached: the same old version
    with pytest.raises(StaleImage) as info:
        got += await reader.read(CS, CS)  # would need the store: refused, not mixed
    assert info.value.errno == 116  # ESTALE
    assert bytes(got) == old[:CS]
    assert stale == [loc]


async def test_interrupted_reader_does_not_break_the_fetch(parts):
    backend, _, fetcher = parts
    backend.latency = 0.2
    data = image(CS)
    loc = backend.put("img", data)
    with trio.move_on_after(0.05):
        await ImageReader(fetcher, [loc], prefetch_max=0).read(0, CS)
    assert await ImageReader(fetcher, [loc], prefetch_max=0).read(0, CS) == data
    assert backend.reads[("img", 0)] == 1  # the second reader joined the first fetch


async def test_a_hung_store_read_fails_after_its_read_timeout(parts, monkeypatch):
    """A volume read that hangs (a stopped OSD) is EIO after read_timeout; for UNAVAILABLE_HOLD after
    that, reads of the copy fail at once without asking the store; then they work again."""
    monkeypatch.setattr("imgfs.reader.UNAVAILABLE_HOLD", 0.5)
    backend, _, fetcher = parts
    data = image(2 * CS)
    loc = backend.put("img", data)
    backend.latency, backend.read_timeout = 1.0, 0.1
    started = trio.current_time()
    with pytest.raises(BackendError, match="took over 0.1s") as info:
        await ImageReader(fetcher, [loc], prefetch_max=0).read(0, CS)
    assert info.value.errno == 5 and trio.current_time() - started < 0.9
    backend.latency = 0.0
    reads = backend.read_bytes
    with pytest.raises(BackendError, match="took over 0.1s"):  # held: the same error at once
        await ImageReader(fetcher, [loc], prefetch_max=0).read(CS, CS)
    # the abandoned read (still sleeping its 1 s in its thread) finishes on its own: wait for exactly
    # that, bounded, rather than for a guessed time
    with trio.fail_after(10):
        while backend.read_bytes < reads + CS:
            await trio.sleep(0.01)
    await trio.sleep(max(0.0, started + 0.5 + 0.1 - trio.current_time()))  # and the 0.5 s hold is over
    assert backend.read_bytes == reads + CS, "a held copy was asked again"
    assert await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 2 * CS) == data


async def test_a_stuck_attach_does_not_starve_other_stores(tmp_path, nursery):
    """Many readers waiting on one volume (another host's 'attaching') hold no fetch slot."""
    stuck, other = MemoryBackend(name="cinder"), MemoryBackend(name="s3")

    class Attaching:
        def hold(self, loc):
            pass

        def release(self, loc):
            pass

        async def ready(self, loc):
            await trio.sleep_forever()

    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"cinder": stuck, "s3": other}, chunk_size=CS, max_connections=2,
                           holders={"cinder": Attaching()})
    fetcher.attach(nursery)
    waiting = stuck.put("img", image(8 * CS))
    for i in range(8):  # far more than the 2 demand slots
        nursery.start_soon(ImageReader(fetcher, [waiting], prefetch_max=0).read, i * CS, 10)
    await trio.sleep(0.05)
    data = image(3 * CS, seed=9)
    loc = other.put("img2", data)
    with trio.fail_after(5):
        assert await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 3 * CS) == data
    nursery.cancel_scope.cancel()


async def test_end_to_end_verification(parts):
    """A sequential read of the whole image is hashed and checked against the catalog's sha512; a
    mismatch fails the read that completes the image (EIO) and drops the image's chunks."""
    import hashlib

    from imgfs.errors import IntegrityError
    from imgfs.reader import StreamVerifier

    backend, cache, fetcher = parts
    data = image(5 * CS + 99)
    loc = backend.put("img", data)
    good = hashlib.sha512(data).hexdigest()

    ok = ImageReader(fetcher, [loc], prefetch_max=0, verify=StreamVerifier("sha512", good, len(data)))
    offsets = list(range(0, len(data), 32 * 1024))
    offsets[2], offsets[3] = offsets[3], offsets[2]  # readahead reorders a little: still verified
    got = {off: bytes(await ok.read(off, 32 * 1024)) for off in offsets}
    assert b"".join(got[o] for o in sorted(got)) == data
    assert not ok.verify.active  # done, and it matched (no error raised)

    dropped = []
    bad = ImageReader(fetcher, [loc], prefetch_max=0, verify=StreamVerifier("sha512", "00" * 64, len(data)),
                      on_integrity_error=dropped.extend)
    with pytest.raises(IntegrityError) as info:
        for off in range(0, len(data), 64 * 1024):
            await bad.read(off, 64 * 1024)
    assert info.value.errno == 5 and off + 64 * 1024 >= len(data)  # only the completing read fails
    assert dropped == [loc]
    with pytest.raises(IntegrityError):  # and stays failed: the kernel retries failed readahead
        await bad.read(0, 100)
    with pytest.raises(IntegrityError):  # the copy is quarantined for new opens too
        await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 100)
    assert fetcher.lift_quarantine("other") == 0 and loc in fetcher.quarantined
    assert fetcher.lift_quarantine("img") == 1  # imgfs evict img: new opens read the copy again
    assert bytes(await ImageReader(fetcher, [loc], prefetch_max=0).read(0, 100)) == data[:100]

    jumpy = ImageReader(fetcher, [loc], prefetch_max=0, verify=StreamVerifier("sha512", "00" * 64, len(data), window=CS))
    await jumpy.read(4 * CS, 100)  # a random reader: verification gives up quietly
    assert not jumpy.verify.active
    for off in range(0, len(data), 64 * 1024):
        await jumpy.read(off, 64 * 1024)  # no error: not verified, not failed


async def test_a_chunk_cached_from_another_copy_is_used(tmp_path, nursery):
    a, b = MemoryBackend(name="a"), MemoryBackend(name="b")
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"a": a, "b": b}, chunk_size=CS, max_connections=2)
    fetcher.attach(nursery)
    data = image(3 * CS)
    la, lb = a.put("img", data), b.put("img", data)
    assert await ImageReader(fetcher, [lb], prefetch_max=0).read(0, 3 * CS) == data  # cached via store b
    await settle(fetcher)
    assert await ImageReader(fetcher, [la, lb], prefetch_max=0).read(0, 3 * CS) == data
    assert sum(a.reads.values()) == 0  # store a, though preferred, was not asked: b's chunks are local


async def test_copies_ordered_by_weight_then_local_then_cheapest(tmp_path, nursery):
    s3, blk, files = MemoryBackend(name="s3", kind="s3"), MemoryBackend(name="blk", kind="cinder"), MemoryBackend(name="f", kind="file")
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"s3": s3, "blk": blk, "f": files}, chunk_size=CS, max_connections=2, weights={"s3": 10})
    fetcher.attach(nursery)
    data = image(2 * CS)
    ls3, lblk, lf = s3.put("i", data), blk.put("i", data), files.put("i", data)
    assert [l.store for l in fetcher.order([lblk, ls3, lf])] == ["s3", "f", "blk"]  # weight, then cost
    fetcher.weights = {}
    assert [l.store for l in fetcher.order([ls3, lblk, lf])] == ["f", "blk", "s3"]  # cheapest first
    await ImageReader(fetcher, [lblk], prefetch_max=0).read(0, 10)
    await settle(fetcher)
    assert [l.store for l in fetcher.order([ls3, lblk, lf])] == ["blk", "f", "s3"]  # partly cached here: first


async def test_a_copy_verified_once_is_not_hashed_again(tmp_path, nursery):
    """Once a copy was read whole, from that copy alone, and matched the digest, later readers of it get
    no verifier (its cached chunks are guarded by their xxh3 blocks); another digest, a reader that also
    has an unverified copy, a stream mixed from two copies, or a quarantine all keep verification on."""
    import hashlib

    a, b = MemoryBackend(name="a"), MemoryBackend(name="b")
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"a": a, "b": b}, chunk_size=CS, max_connections=2)
    fetcher.attach(nursery)
    data = image(3 * CS + 5)
    la, lb = a.put("img", data), b.put("img", data)
    good = hashlib.sha512(data).hexdigest()
    assert fetcher.verifier([la], "md5", "x", len(data)) is None  # nothing to check against
    first = ImageReader(fetcher, [la], prefetch_max=0, verify=fetcher.verifier([la], "sha512", good, len(data)))
    assert first.verify is not None
    for off in range(0, len(data), CS):
        await first.read(off, CS)
    assert fetcher.verifier([la], "sha512", good, len(data)) is None
    assert fetcher.verifier([la], "sha512", "0" * 128, len(data)) is not None
    assert fetcher.verifier([la, lb], "sha512", good, len(data)) is not None  # b was never verified
    await settle(fetcher)
    # b's reader finds a's chunks cached and reads them: the stream mixes copies, so b is not marked
    mixed = ImageReader(fetcher, [lb, la], prefetch_max=0, verify=fetcher.verifier([lb, la], "sha512", good, len(data)))
    for off in range(0, len(data), CS):
        await mixed.read(off, CS)
    assert fetcher.verifier([lb], "sha512", good, len(data)) is not None
    fetcher.drop_copies([la])
    assert fetcher.verifier([la], "sha512", good, len(data)) is not None


async def test_a_store_is_held_for_fetches_not_for_open_files(tmp_path, nursery):
    """Cinder's image-volumes are Glance's: a copy is held while a fetch from it runs, never merely
    because a file is open, and a read served from the cache holds nothing."""
    backend = MemoryBackend(name="cinder")

    class Counting:
        def __init__(self) -> None:
            self.held = self.holds = 0

        def hold(self, loc):
            self.held += 1
            self.holds += 1

        def release(self, loc):
            self.held -= 1

        async def ready(self, loc):
            assert self.held > 0  # ready only inside a hold

        def is_ready(self, loc):
            return False

    holder = Counting()
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"cinder": backend}, chunk_size=CS, max_connections=2, holders={"cinder": holder})
    fetcher.attach(nursery)
    data = image(4 * CS)
    loc = backend.put("img", data)
    reader = ImageReader(fetcher, [loc], prefetch_max=0)  # open
    assert holder.holds == 0
    assert await reader.read(0, 4 * CS) == data
    await settle(fetcher)
    assert holder.held == 0 and holder.holds == 4  # one hold per chunk fetched, none left while still open
    assert await reader.read(0, 4 * CS) == data  # from the cache
    assert holder.holds == 4
    reader.close()


async def test_random_readers_fetch_64k_blocks_and_keep_them(tmp_path, nursery):
    """Chunks of 1 MiB: a random 4 KiB read costs the store one 64 KiB block, not the chunk; the blocks
    are cached (across a restart too); a reader that goes sequential fetches whole chunks again."""
    big = 16 * CS  # 1 MiB chunks
    backend = MemoryBackend(name="mem")
    data = image(8 * big + 777)
    loc = backend.put("img", data)

    async def fetcher_on(cache_dir) -> ChunkFetcher:
        cache = ChunkCache(str(cache_dir), max_bytes=1 << 30, max_count=10_000, memory_bytes=0)
        await cache.open()
        f = ChunkFetcher(cache, {"mem": backend}, chunk_size=big, max_connections=4)
        f.attach(nursery)
        return f

    fetcher = await fetcher_on(tmp_path / "cache")
    reader = ImageReader(fetcher, [loc], prefetch_max=4 * big)
    assert await reader.read(0, 4096) == data[:4096]  # the first read of an image: one block
    assert fetcher.stats.fetched_bytes == CS
    rng = random.Random(5)
    # scattered: no two reads within two blocks of each other (neighbours grow the fetch, tested below)
    offsets = [3 * CS * b + rng.randrange(CS - 4096) for b in rng.sample(range(1, len(data) // (3 * CS)), 40)]
    for off in offsets:
        assert await reader.read(off, 4096) == data[off : off + 4096], off
    await settle(fetcher)
    blocks = {o // CS for o in offsets} | {(o + 4095) // CS for o in offsets} | {0}
    # each block touched fetched once, nothing else: no chunk, no prefetch
    assert (len(blocks) - 1) * CS < fetcher.stats.fetched_bytes <= len(blocks) * CS
    assert fetcher.stats.prefetches == 0 and fetcher.stats.fetches <= len(blocks)

    fetched = fetcher.stats.fetched_bytes
    fetcher.cache.close()
    again = await fetcher_on(tmp_path / "cache")  # a restart: the blocks are on disk
    reader = ImageReader(again, [loc], prefetch_max=4 * big)
    for off in offsets:
        assert await reader.read(off, 4096) == data[off : off + 4096], off
    assert again.stats.fetched_bytes == 0

    seq = ImageReader(again, [loc], prefetch_max=4 * big)  # sequential from the start: whole chunks
    out = bytearray()
    for off in range(0, len(data), 128 * 1024):
        out += await seq.read(off, 128 * 1024)
    assert bytes(out) == data
    await settle(again)
    # the reads before the reader counted as sequential (512 KiB) came in blocks, then the chunks, which
    # reuse every block already cached. The one exception is the design's: a block whose fetch has
    # handed its bytes to the reader but whose cache fill has not landed when the chunk is fetched is
    # fetched again -- at most the blocks of the read just before (128 KiB: two), seen on a loaded box.
    assert len(data) - fetched <= again.stats.fetched_bytes <= len(data) - fetched + 2 * CS
    # the chunks (9), at most 8 blocks before that, and one more request per cached block splitting a run
    assert again.stats.fetches <= 9 + 8 + len(blocks)
    assert fetched  # (the first pass fetched something)
    again.cache.close()


async def test_a_random_reader_whose_reads_are_neighbours_gets_growing_fetches(tmp_path, nursery):
    """Reads landing next to recent ones (metadata, a qcow2 table) double the fetch, up to 512 KiB and
    never past the chunk; a read far from them starts again at one block."""
    big = 16 * CS  # 1 MiB chunks
    backend = MemoryBackend(name="mem")
    data = image(8 * big)
    loc = backend.put("img", data)
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes=1 << 30, max_count=10_000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"mem": backend}, chunk_size=big, max_connections=4)
    fetcher.attach(nursery)
    reader = ImageReader(fetcher, [loc], prefetch_max=4 * big)
    expected = [(20, 1), (21, 2), (22, 0), (24, 8), (28, 0), (100, 1)]  # block read -> blocks fetched
    for block, fetched in expected:
        before = fetcher.stats.fetched_bytes
        off = block * CS + 100
        assert await reader.read(off, 4096) == data[off:off + 4096]
        await settle(fetcher)
        assert fetcher.stats.fetched_bytes - before == fetched * CS, block
    # 24 grew to 512 KiB but stopped at its chunk's end (block 31); one GET per fetch
    assert fetcher.stats.fetches == 4 and fetcher.stats.prefetches == 0
    cache.close()


async def test_a_chunk_fetch_reuses_the_cached_blocks_and_refetches_a_bad_one(tmp_path, nursery):
    """A random reader cached blocks 1, 2 and 5 of chunk 0; then the whole chunk is wanted: the store is
    asked only for what is missing (two requests around blocks 1-2), block 5 failing verification is
    fetched with its run, and the chunk is byte for byte the image."""
    big = 16 * CS
    backend = MemoryBackend(name="mem")
    data = image(2 * big + 5)
    loc = backend.put("img", data)
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes=1 << 30, max_count=10_000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"mem": backend}, chunk_size=big, max_connections=4)
    fetcher.attach(nursery)
    for block in (1, 2, 5):
        assert await fetcher.read_small(loc, block * CS + 7, 4096) == data[block * CS + 7 : block * CS + 7 + 4096]
    await settle(fetcher)
    victim = next(p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file() and b", 65536, 5]" in p.read_bytes())
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    before_bytes, before_gets = fetcher.stats.fetched_bytes, fetcher.stats.fetches
    assert bytes(await fetcher.get(loc, 0)) == data[:big]
    assert fetcher.stats.fetched_bytes - before_bytes == big - 2 * CS  # blocks 1 and 2 reused, 5 refetched
    assert fetcher.stats.fetches - before_gets == 2 and cache.stats.corrupt == 1
    assert bytes(await fetcher.get(loc, 2)) == data[2 * big:]  # a chunk no block of which is cached
    cache.close()


async def test_a_failing_small_fetch_fails_over_and_never_pads(tmp_path, nursery):
    backend = MemoryBackend(name="mem")
    other = MemoryBackend(name="other")
    big = 16 * CS
    data = image(4 * big)
    bad, good = backend.put("img", data), other.put("img", data)
    cache = ChunkCache(str(tmp_path / "c2"), max_bytes=1 << 30, max_count=10_000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"mem": backend, "other": other}, chunk_size=big, max_connections=4)
    fetcher.attach(nursery)
    backend.fail_reads = 1
    reader = ImageReader(fetcher, [bad, good], prefetch_max=0)
    assert await reader.read(big + 100, 4096) == data[big + 100 : big + 4196]
    assert reader.loc is good and other.read_bytes == CS  # one block from the other copy
    backend.short_reads = 1
    reader = ImageReader(fetcher, [bad], prefetch_max=0)
    with pytest.raises(ShortRead):  # a store one byte short: an error, never padded
        await reader.read(3 * big + 5, 4096)
    cache.close()
