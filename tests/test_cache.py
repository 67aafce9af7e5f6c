"""The chunk cache: verified, bounded, persistent, and never able to fail a read."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imgfs.cache import ALIGN, ChunkCache
from imgfs.model import ChunkKey

CS = 64 * 1024


def key(index: int, image: str = "img", version: str = "v1", store: str = "s") -> ChunkKey:
    return ChunkKey(store, image, version, CS, index)


def data(index: int, size: int = CS) -> bytes:
    return bytes([index % 251]) * (size - 8) + index.to_bytes(8, "big")


def make(root: Path, *, max_bytes=100 * CS, max_count=1000, memory=0) -> ChunkCache:
    return ChunkCache(str(root), max_bytes=max_bytes, max_count=max_count, memory_bytes=memory)


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "chunks").rglob("*") if p.is_file())


async def test_roundtrip_and_survives_restart(tmp_path):
    cache = make(tmp_path)
    await cache.open()
    for i in range(5):
        await cache.put(key(i), data(i))
    assert cache.count == 5 and len(chunk_files(tmp_path)) == 5
    assert bytes(await cache.get(key(3), CS)) == data(3)

    again = make(tmp_path)
    await again.open()
    assert again.count == 5
    for i in range(5):
        assert bytes(await again.get(key(i), CS)) == data(i)
    assert await again.get(key(9), CS) is None
    assert again.stats.hits == 5 and again.stats.misses == 1


async def test_other_version_or_chunk_size_is_a_miss(tmp_path):
    cache = make(tmp_path)
    await cache.open()
    await cache.put(key(0), data(0))
    assert await cache.get(key(0, version="v2"), CS) is None
    assert await cache.get(ChunkKey("s", "img", "v1", CS * 2, 0), CS) is None
    assert await cache.get(key(0, store="other"), CS) is None


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "delete", "garbage_header"])
async def test_damaged_chunk_is_dropped_never_returned(tmp_path, damage):
    cache = make(tmp_path)
    await cache.open()
    await cache.put(key(0), data(0))
    (path,) = chunk_files(tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "bitflip":
        raw[-100] ^= 0x01
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"\x00" * 64 + raw[64:])
    assert await cache.get(key(0), CS) is None
    assert not path.exists()
    assert cache.count == 0
    assert cache.stats.corrupt == (0 if damage == "delete" else 1)
    # and a fresh fill works again
    await cache.put(key(0), data(0))
    assert bytes(await cache.get(key(0), CS)) == data(0)


async def test_small_reads_verify_only_their_blocks(tmp_path):
    from imgfs.cache import BLOCK

    size = 8 * BLOCK + 100
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    cache = make(tmp_path)
    await cache.open()
    k = ChunkKey("s", "img", "v1", size, 0)
    await cache.put(k, payload)
    assert bytes(await cache.read(k, 5, 4101, size)) == payload[5:4101]
    assert bytes(await cache.read(k, 3 * BLOCK - 10, 5 * BLOCK + 7, size)) == payload[3 * BLOCK - 10 : 5 * BLOCK + 7]
    assert bytes(await cache.read(k, size - 50, size, size)) == payload[-50:]
    (path,) = chunk_files(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) - size + 6 * BLOCK + 3] ^= 0xFF  # damage block 6 only
    path.write_bytes(raw)
    assert bytes(await cache.read(k, 0, 100, size)) == payload[:100]  # block 0 is intact and verified
    assert await cache.read(k, 6 * BLOCK, 6 * BLOCK + 10, size) is None  # block 6 is not: the file goes
    assert not path.exists() and cache.stats.corrupt == 1
    assert await cache.read(k, 0, 100, size) is None


async def test_lru_eviction_by_size_and_count(tmp_path):
    entry = CS + ALIGN  # data + header, key and one block digest, padded to 4 KiB
    cache = make(tmp_path, max_bytes=4 * entry)
    await cache.open()
    for i in range(4):
        await cache.put(key(i), data(i))
    assert await cache.get(key(0), CS) is not None  # 0 is now the most recently used
    await cache.put(key(4), data(4))
    assert cache.count == 4 and cache.stats.evictions == 1
    assert not cache.contains(key(1)) and cache.contains(key(0))
    assert cache.used_bytes <= 4 * entry

    counted = make(tmp_path / "c", max_count=2)
    await counted.open()
    for i in range(3):
        await counted.put(key(i), data(i))
    assert counted.count == 2 and len(chunk_files(tmp_path / "c")) == 2


async def test_limits_enforced_at_start_and_lru_order_kept(tmp_path):
    cache = make(tmp_path)
    await cache.open()
    for i in range(6):
        await cache.put(key(i), data(i))
    for i in (0, 1):  # make 0 and 1 the most recently used (hits refresh the file's mtime)
        os.utime(next(p for p in chunk_files(tmp_path) if p.name.endswith(f".{i}")), (2e9, 2e9))
    smaller = make(tmp_path, max_count=2)
    await smaller.open()
    assert smaller.count == 2 and smaller.contains(key(0)) and smaller.contains(key(1))
    assert len(chunk_files(tmp_path)) == 2


async def test_drop_other_versions(tmp_path):
    cache = make(tmp_path, memory=10 * CS)
    await cache.open()
    await cache.put(key(0, version="old"), data(0))
    await cache.put(key(1, version="old"), data(1))
    await cache.put(key(0, version="new"), data(7))
    await cache.put(key(0, image="other", version="old"), data(0))
    assert await cache.drop("s", "img", keep_version="new") == 2
    assert cache.get_memory(key(0, version="old")) is None
    assert await cache.get(key(0, version="old"), CS) is None
    assert bytes(await cache.get(key(0, version="new"), CS)) == data(7)
    assert cache.contains(key(0, image="other", version="old"))
    assert cache.cached_chunks("s", "img", "new", CS) == 1


async def test_stray_files_and_interrupted_fills_are_cleaned(tmp_path):
    cache = make(tmp_path)
    await cache.open()
    await cache.put(key(0), data(0))
    (tmp_path / "tmp" / "half-written").write_bytes(b"x" * 100)
    (tmp_path / "chunks" / "junk-file").write_bytes(b"x")
    image_dir = chunk_files(tmp_path)[0].parent
    (image_dir / "not-a-chunk-name").write_bytes(b"x")
    again = make(tmp_path)
    await again.open()
    assert again.count == 1
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "chunks" / "junk-file").exists()
    assert not (image_dir / "not-a-chunk-name").exists()


async def test_unusable_cache_dir_means_no_disk_cache_not_failure(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    cache = make(blocker / "cache")  # cannot create a directory under a file
    await cache.open()
    assert not cache.disk_ok
    await cache.put(key(0), data(0))  # no exception
    assert await cache.get(key(0), CS) is None
    assert "serving without a disk cache" in caplog.text


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


async def test_full_disk_logs_and_keeps_going(tiny_fs, caplog):
    cache = make(tiny_fs, max_bytes=100 * CS, memory=0)  # the limit allows far more than the disk holds
    await cache.open()
    for i in range(8):  # 8 x 64 KiB > 256 KiB
        await cache.put(key(i), data(i))
    assert cache.stats.fill_failures >= 4
    assert "No space left on device" in caplog.text and "lower cache_max_size_gb" in caplog.text
    assert caplog.text.count("cannot store chunks") == 1  # rate limited: one line, not one per chunk
    assert cache.count == cache.stats.fills  # the index holds exactly what is on disk
    assert not list((tiny_fs / "tmp").iterdir())  # failed fills leave nothing behind
    for i in range(8):
        got = await cache.get(key(i), CS)
        assert got is None or bytes(got) == data(i)
    cache.close()  # the files kept open for hits: the file system is unmounted next


async def test_fills_are_direct_writes_with_the_data_aligned(tmp_path):
    """Fills bypass the page cache (O_DIRECT) on a file system that takes it; the data starts at a 4 KiB
    boundary, every length (a short last chunk too) reads back exact, and status says so."""
    import imgfs.cache as cache_mod

    cache = make(tmp_path, max_bytes=1 << 30)
    await cache.open()
    sizes = [CS, 3 * CS + 17, 100, 2 * 1024 * 1024 + 4095]  # a last chunk's odd length; one over a piece
    for i, size in enumerate(sizes):
        await cache.put(ChunkKey("s", "img", "v1", 4 * 1024 * 1024, i), data(i, size), remember=False)
    assert cache.direct.enabled and cache.stats.direct_fills == len(sizes) == cache.stats.fills
    for i, size in enumerate(sizes):
        k = ChunkKey("s", "img", "v1", 4 * 1024 * 1024, i)
        path = tmp_path / "chunks" / cache._rel(k)
        raw = path.read_bytes()
        assert raw[-size:] == data(i, size)
        assert (len(raw) - size) % ALIGN == 0, "the data does not start on a 4 KiB boundary"
        assert bytes(await cache.get(k, size)) == data(i, size)
    assert not list((tmp_path / "tmp").iterdir())
    assert len(cache.direct._free) <= cache_mod._DirectWrites.KEPT  # the aligned buffers kept are bounded
    cache.close()


@pytest.fixture
def ramfs(tmp_path):
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)  # no O_DIRECT on ramfs
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


async def test_a_file_system_without_o_direct_gets_buffered_fills(ramfs, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="imgfs.cache")
    cache = make(ramfs)
    await cache.open()
    for i in range(3):
        await cache.put(key(i), data(i))
    assert not cache.direct.enabled and cache.direct.refused == "Invalid argument"
    assert cache.stats.fills == 3 and cache.stats.direct_fills == 0
    assert caplog.text.count("does not take O_DIRECT writes") == 1  # said once, not per fill
    for i in range(3):
        assert bytes(await cache.get(key(i), CS)) == data(i)
    assert not list((ramfs / "tmp").iterdir())
    cache.close()


async def test_chunk_files_an_older_imgfs_wrote_are_still_served(tmp_path):
    """The format before aligned data (magic IMGFSCK2, the data right after the digests): a restart
    onto an existing cache serves those files, and damage in them is still caught."""
    import struct

    import xxhash

    from imgfs.cache import _HEADER, BLOCK, _key_bytes

    cache = make(tmp_path)
    await cache.open()
    await cache.put(key(0), data(0))
    cache.close()
    path = chunk_files(tmp_path)[0]
    k, payload = _key_bytes(key(0)), data(0)
    digests = [xxhash.xxh3_64_intdigest(payload[i:i + BLOCK]) for i in range(0, len(payload), BLOCK)]
    path.write_bytes(_HEADER.pack(b"IMGFSCK2", len(k), len(payload), BLOCK) + k
                     + struct.pack(f"<{len(digests)}Q", *digests) + payload)
    again = make(tmp_path)
    await again.open()
    assert bytes(await again.get(key(0), CS)) == payload
    again.close()
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(raw)
    third = make(tmp_path)
    await third.open()
    assert await third.get(key(0), CS) is None and third.stats.corrupt == 1


async def test_pinned_images_survive_eviction_and_restarts(tmp_path):
    entry = CS + ALIGN
    cache = make(tmp_path, max_bytes=4 * entry)
    await cache.open()
    for i in range(2):
        await cache.put(key(i, image="gold"), data(i))
    await cache.pin("s", "gold")
    for i in range(6):  # pressure: more than the limit in other images
        await cache.put(key(i, image="other"), data(i))
    assert cache.contains(key(0, image="gold")) and cache.contains(key(1, image="gold"))
    again = make(tmp_path, max_bytes=4 * entry)  # a restart remembers the pin
    await again.open()
    assert again.pinned == [("s", "gold")]
    for i in range(6, 10):
        await again.put(key(i, image="other"), data(i))
    assert again.contains(key(0, image="gold"))
    await again.pin("s", "gold", pinned=False)
    for i in range(10, 14):
        await again.put(key(i, image="other"), data(i))
    assert not again.contains(key(0, image="gold"))


async def test_a_cache_full_of_pins_refuses_fills_not_reads(tmp_path, caplog):
    entry = CS + ALIGN
    cache = make(tmp_path, max_bytes=2 * entry)
    await cache.open()
    for i in range(2):
        await cache.put(key(i, image="gold"), data(i))
    await cache.pin("s", "gold")
    await cache.put(key(0, image="new"), data(0))  # no room, nothing evictable: skipped, logged
    assert not cache.contains(key(0, image="new")) and cache.count == 2
    assert "full of pinned images" in caplog.text


async def test_resident_hits_are_read_on_the_loop_and_still_verified(tmp_path, monkeypatch):
    """The first read opens and checks the chunk file in a worker thread and keeps it open; later reads
    whose pages are resident are served on the trio thread (RWF_NOWAIT), with no thread hop, and still
    verified: a block damaged behind the open descriptor is caught, dropped and never returned."""
    import trio

    import imgfs.cache as cache_mod

    hops = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        hops.append(fn.__name__)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(cache_mod.trio.to_thread, "run_sync", counting)
    size = 4 * CS  # four 64 KiB blocks
    cache = make(tmp_path, max_bytes=100 * size)
    await cache.open()
    await cache.put(key(0), data(0, size))
    hops.clear()
    # (fills are O_DIRECT writes: a chunk is resident once read, not once written)
    assert bytes(await cache.read(key(0), 5, size, size)) == data(0, size)[5:]
    assert hops == ["_open_verified"]
    for start in (0, CS - 10, 3 * CS):  # resident now (read once)
        assert bytes(await cache.read(key(0), start, start + 4096, size)) == data(0, size)[start:start + 4096]
    assert hops == ["_open_verified"], "a resident hit took a thread hop"
    assert cache.nowait

    path = chunk_files(tmp_path)[0]
    with open(path, "r+b") as f:  # flip one byte of block 2 in place (same inode as the open fd)
        f.seek(-2 * CS, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    assert await cache.read(key(0), 2 * CS, 2 * CS + 10, size) is None
    assert cache.stats.corrupt == 1 and not path.exists() and cache.count == 0
    cache.close()


async def test_without_rwf_nowait_every_hit_reads_in_a_thread(tmp_path, monkeypatch):
    import imgfs.cache as cache_mod

    cache = make(tmp_path)
    cache.nowait = False  # a kernel or file system without RWF_NOWAIT
    await cache.open()
    await cache.put(key(1), data(1))
    calls = []
    real = cache_mod._read_dup
    monkeypatch.setattr(cache_mod, "_read_dup", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):
        assert bytes(await cache.get(key(1), CS)) == data(1)
    assert len(calls) == 1  # the first read opened the file; the second read its dup in a thread
    cache.close()


async def test_an_evicted_chunk_closes_its_file(tmp_path):
    entry = CS + ALIGN
    cache = make(tmp_path, max_bytes=2 * entry)
    await cache.open()
    await cache.put(key(0), data(0))
    assert bytes(await cache.get(key(0), CS)) == data(0)
    assert len(cache._fds) == 1
    await cache.put(key(1), data(1))
    await cache.put(key(2), data(2))  # evicts chunk 0
    assert not cache.contains(key(0)) and len(cache._fds) == 0
    cache.close()


def test_a_read_buffer_is_reused_only_once_nothing_refers_to_it():
    from imgfs.cache import _Buffers

    pool = _Buffers()
    size = 1 << 20
    held = memoryview(pool.get(size))[10:20]  # a reply still being sent, a piece the verifier keeps
    first = id(held.obj)
    other = pool.get(size)
    assert other is not held.obj  # still referred to: never handed out again
    second = id(other)
    del other
    again = pool.get(size)
    assert id(again) == second  # nothing refers to it any more: reused, not reallocated
    del held
    assert id(pool.get(size)) in (first, second)
    assert pool.get(4096) is not pool.get(4096)  # small ones are not pooled


async def test_memory_tier_counts_each_buffer_once_at_its_whole_size(tmp_path):
    """Chunks fetched by one GET are slices of one buffer: the tier keeps that buffer alive while any slice
    is kept, so it must count the buffer (not the slices) against memory_cache_mb."""
    cache = make(tmp_path, memory=6 * CS)
    run_a = memoryview(b"".join(data(i) for i in range(4)))
    run_b = memoryview(b"".join(data(i) for i in range(4, 8)))
    cache.remember(key(0), run_a[:CS])  # one slice keeps all four chunks' bytes alive
    assert cache._memory_used == 4 * CS
    for i in range(1, 4):
        cache.remember(key(i), run_a[i * CS:(i + 1) * CS])
    assert cache._memory_used == 4 * CS
    for i in range(4, 8):  # 8 chunks' worth would exceed 6: run A goes as a whole
        cache.remember(key(i), run_b[(i - 4) * CS:(i - 3) * CS])
    assert cache._memory_used == 4 * CS
    assert [cache.get_memory(key(i)) is not None for i in range(8)] == [False] * 4 + [True] * 4
    assert bytes(await cache.read(key(5), 10, 20, CS)) == data(5)[10:20]
    cache.remember(key(4), data(4))  # replacing a slice by its own buffer
    assert cache._memory_used == 5 * CS
    await cache.drop("s", "img")
    assert cache._memory_used == 0 and not cache._held
    cache.remember(key(9), memoryview(b"x" * (7 * CS))[:CS])  # a buffer larger than the tier: not kept
    assert cache._memory_used == 0 and cache.get_memory(key(9)) is None


async def test_willneed_opens_the_chunk_so_its_reads_start_on_the_event_loop(tmp_path):
    cache = make(tmp_path)
    await cache.open()
    for i in range(2):
        await cache.put(key(i), data(i))
    again = make(tmp_path)  # a restart: nothing open yet
    await again.open()
    await again.willneed(key(0), CS)
    assert again.open_files == 1
    # Fills are O_DIRECT, so the chunk's pages come from willneed's readahead, which the kernel does in
    # the background: on a busy machine the read below could come first and rightly hop to a thread.
    # Reading every chunk file here puts their pages in the page cache, as that readahead soon would,
    # so what decides each read below is only whether its file was opened ahead.
    for p in chunk_files(tmp_path):
        p.read_bytes()
    assert bytes(await again.read(key(0), 100, 4196, CS)) == data(0)[100:4196]
    assert again.stats.loop_hits == 1  # no open, no thread hop
    assert bytes(await again.read(key(1), 0, 4096, CS)) == data(1)[:4096]
    assert again.stats.loop_hits == 1  # not prefetched: opened (and verified) in a worker thread

    # a damaged header is not kept open; the read that follows finds it and drops the chunk
    third = make(tmp_path)
    await third.open()
    victim = next(p for p in chunk_files(tmp_path) if p.read_bytes().find(b'"img", "v1", 65536, 0]') > 0)
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0xFF
    victim.write_bytes(bytes(raw))
    await third.willneed(key(0), CS)
    assert third.open_files == 0
    assert await third.read(key(0), 0, 4096, CS) is None and third.stats.corrupt == 1


async def test_holds_any_tracks_entries_by_image_version_and_size(tmp_path):
    cache = make(tmp_path)
    await cache.open()
    assert not cache.holds_any("s", "img", "v1", CS)
    await cache.put(key(0), data(0))
    await cache.put(key(1), data(1))
    assert cache.holds_any("s", "img", "v1", CS)
    assert not cache.holds_any("s", "img", "v2", CS) and not cache.holds_any("s", "img", "v1", 2 * CS)
    again = make(tmp_path)  # rebuilt from disk at start
    await again.open()
    assert again.holds_any("s", "img", "v1", CS)
    await cache.drop("s", "img")
    assert not cache.holds_any("s", "img", "v1", CS)
