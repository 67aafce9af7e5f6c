"""A bounded soak: 16 concurrent readers over several images on a real S3 server, faults injected at
random by the proxy, a cache small enough to evict all the time. Every byte read is checked against
its source; errors may only be the documented EIO; memory, fds and the cache stay within bounds.

Default length fits CI (``--soak-seconds``, 30 s per S3 server); run longer by hand, e.g.
``.venv/bin/python -m pytest tests/test_soak.py --soak-seconds 1800 -s``."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from .conftest import drop_page_cache, random_bytes, write_config
from .faultkit import MiB, assert_no_leaks, assert_reads_exactly, baseline, read_checked, status

pytestmark = pytest.mark.mount

READERS = 16
FAULTS = [("status", {"status": 503}), ("status", {"status": 500}), ("reset", {}), ("short", {}), ("stall", {"seconds": 2.0})]


def reader(paths: list, sources: dict, deadline: float, seed: int, tally: Counter, lock: threading.Lock,
           failures: list[str]) -> None:
    """Whole-image dd-like reads and random preads, each checked byte for byte. A wrong byte (or any
    other failure) is recorded for the test to fail on: an exception would only end this thread."""
    rng = random.Random(seed)
    try:
        while time.monotonic() < deadline:
            path = rng.choice(paths)
            source = sources[path.name]
            if rng.random() < 0.5:
                result = read_checked(path, source, bs=rng.choice([128 * 1024, MiB, 4 * MiB]))
            else:
                start = rng.randrange(len(source))
                result = read_checked(path, source, start=start, stop=min(len(source), start + rng.randrange(1, 3 * MiB)))
            with lock:
                tally["reads"] += 1
                tally["bytes"] += result.good
                tally[result.error] += 1
    except AssertionError as e:  # read_checked's byte check
        with lock:
            tally["mismatches"] += 1
            failures.append(f"reader {seed}: {e}")
    except BaseException as e:  # noqa: BLE001 - whatever it is, the test must see it
        with lock:
            failures.append(f"reader {seed}: {type(e).__name__}: {e}")


@pytest.mark.cell("soak", f"{READERS} readers, random S3 faults, small cache")
def test_soak(tmp_path, proxy, s3, mounter, observed, request):
    seconds = request.config.getoption("--soak-seconds")
    sources = {f"soak-{i}": random_bytes((4 + 2 * i) * MiB + 1000 * i, 40 + i) for i in range(4)}
    for key, data in sources.items():
        s3.put_object(Bucket=s3.bucket, Key=key, Body=data)
    limit_mb, limit_count = 16, 20  # the images add up to 28 MiB: eviction all the time
    conf = write_config(tmp_path / "imgfs.conf", s3_url=proxy.url, bucket=s3.bucket, cache_dir=tmp_path / "cache",
                        access=s3.server.access_key, secret=s3.server.secret_key, s3_read_timeout=1, s3_max_attempts=3,
                        cache_max_size_gb=limit_mb / 1024, cache_max_count=limit_count, memory_cache_mb=8)
    m = mounter(conf)
    paths = [m.images / key for key in sources]
    for path in paths:  # warm-up, so the start figures include a daemon that has served
        assert_reads_exactly(path, sources[path.name])
    base = baseline(m)
    start = status(m)["process"]

    tally: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    failures: list[str] = []
    threads = [threading.Thread(target=reader, args=(paths, sources, deadline, i, tally, lock, failures))
               for i in range(READERS)]
    for t in threads:
        t.start()
    rng, peak = random.Random(7), {"bytes": 0, "chunks": 0, "rss": 0}
    injected = 0
    while time.monotonic() < deadline:
        kind, kw = rng.choice(FAULTS)
        proxy.inject(kind, rng.choice(list(sources)), count=rng.randint(1, 4), **kw)
        injected += 1
        time.sleep(rng.uniform(0.1, 0.6))
        s = status(m)
        peak["bytes"] = max(peak["bytes"], s["cache"]["bytes"])
        peak["chunks"] = max(peak["chunks"], s["cache"]["chunks"])
        peak["rss"] = max(peak["rss"], s["process"]["rss_bytes"])
        for path in paths:  # drop what the kernel keeps, so reads keep reaching the daemon
            drop_page_cache(path)
    for t in threads:
        t.join(120)
    proxy.clear()
    alive = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not alive, f"readers {alive} still reading 120 s after the deadline (a hang)"
    assert not failures, failures[:5]

    settled = assert_no_leaks(m, base)
    end = settled["process"]
    kept_open = settled["cache"]["open_files"]  # chunk files kept open for hits: bounded by the cache's count
    errors = {k: v for k, v in tally.items() if k not in ("reads", "bytes", "complete", "mismatches")}
    observed(f"{seconds:g}s, {tally['reads']} reads, {tally['bytes'] / 2**30:.2f} GiB checked, "
             f"{tally['mismatches']} mismatches, {READERS - len(alive)}/{READERS} readers ended cleanly, "
             f"{injected} faults, errors {errors or 'none'}, RSS {start['rss_bytes'] >> 20}->{end['rss_bytes'] >> 20} MiB "
             f"(peak {peak['rss'] >> 20}), fds {start['fds']}->{end['fds']}, cache peak {peak['bytes'] >> 20} MiB/{peak['chunks']} chunks")
    assert tally["reads"] > READERS and tally["complete"] > 0
    assert set(errors) <= {"EIO"}, f"undocumented errors: {errors}"
    assert peak["bytes"] <= limit_mb * MiB and peak["chunks"] <= limit_count, f"cache over its limits: {peak}"
    assert end["rss_bytes"] <= start["rss_bytes"] * 1.5 + 32 * MiB, f"RSS grew {start['rss_bytes'] >> 20} -> {end['rss_bytes'] >> 20} MiB"
    assert kept_open <= min(limit_count, settled["cache"]["limit_open_files"])
    # Besides chunk files kept open for hits, only pooled sockets may stay: botocore keeps up to
    # 2 x backend_max_connections (8 by default) idle connections, and 16 readers with faults that
    # break connections leave the pool fuller than the warm-up did.
    pool = 2 * 8
    assert end["fds"] <= start["fds"] + kept_open + pool, \
        f"fds grew {start['fds']} -> {end['fds']} ({kept_open} chunk files open, pool of {pool})"
    for path in paths:
        assert_reads_exactly(path, sources[path.name])
