"""Prefetch and warm run in slots of their own: a boot storm's warm of many images, or a sequential
reader's read-ahead, never makes a demand read wait behind it (docs/operating.md's promise for `imgfs warm`)."""

from __future__ import annotations

import random

import trio

from imgfs.backends.memory import MemoryBackend
from imgfs.cache import ChunkCache
from imgfs.reader import ChunkFetcher, ImageReader

CS = 64 * 1024
LATENCY = 0.3  # seconds per store request


async def test_warms_saturating_the_prefetch_slots_never_delay_a_demand_read(tmp_path, nursery):
    backend = MemoryBackend(name="mem", latency=LATENCY)
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes=1 << 30, max_count=10_000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"mem": backend}, chunk_size=CS, max_connections=2)  # demand 2, prefetch 1
    fetcher.attach(nursery)
    rng = random.Random(5)
    warmed = [backend.put(f"warm-{i}", rng.randbytes(4 * CS)) for i in range(6)]
    wanted_data = rng.randbytes(CS)
    wanted = backend.put("wanted", wanted_data)

    done: list[float] = []

    async def warm(loc):
        await fetcher.warm(loc, 0, 4)
        done.append(trio.current_time())

    began = trio.current_time()
    for loc in warmed:  # six warms, one ranged request each, through one prefetch slot: ~6 x LATENCY
        nursery.start_soon(warm, loc)
    await trio.sleep(LATENCY / 3)  # the warms have queued on the prefetch slot
    assert fetcher.inflight >= 6 * 4
    reader = ImageReader(fetcher, [wanted], prefetch_max=0)
    t = trio.current_time()
    assert bytes(await reader.read(0, CS)) == wanted_data
    demand = trio.current_time() - t
    with trio.fail_after(6 * LATENCY * 4):
        while len(done) < len(warmed):
            await trio.sleep(0.01)
    warm_all = max(done) - began
    # the demand read cost one store request, not a place in the warms' queue (behind them it would
    # wait ~6 x LATENCY: measured with prefetch on the demand slots, the test fails)
    assert demand < 3 * LATENCY, (demand, warm_all)
    assert warm_all > 5 * LATENCY, warm_all  # the warms really were queued behind each other
