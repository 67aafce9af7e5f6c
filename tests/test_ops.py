"""The FUSE Operations object driven directly, with no kernel in the way."""

from __future__ import annotations

import errno
import os
import random
import stat

import pyfuse3
import pytest
import trio
import trio.testing

from imgfs.backends.memory import MemoryBackend
from imgfs.cache import ChunkCache
from imgfs.catalog import Catalog
from imgfs.fs import IMAGES, ROOT, STORES, Operations
from imgfs.reader import ChunkFetcher

CS = 64 * 1024


@pytest.fixture
async def world(tmp_path, nursery):
    a, b = MemoryBackend(name="alpha"), MemoryBackend(name="beta")
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    catalog = Catalog([a, b], refresh_interval=60, negative_ttl=5, limiter=trio.CapacityLimiter(2))
    fetcher = ChunkFetcher(cache, {"alpha": a, "beta": b}, chunk_size=CS, max_connections=2)
    fetcher.attach(nursery)
    ops = Operations(catalog, fetcher, prefetch_max=0)
    invalidated = []

    async def record(ino):
        invalidated.append(ino)

    forgotten = []

    async def forget(parent, name):
        forgotten.append((parent, name))

    ops.invalidate = record
    ops.invalidated = invalidated
    ops.forget_name = forget
    ops.forgotten = forgotten
    return a, b, catalog, ops


async def test_tree_attributes_and_reads(world):
    a, b, catalog, ops = world
    one = os.urandom(3 * CS + 7)
    a.put("one", one)
    b.put("one", one)
    b.put("two", b"x" * 10)
    await catalog.refresh()

    assert stat.S_ISDIR((await ops.getattr(ROOT)).st_mode)
    assert [n for n, _ in ops._children(ROOT)] == ["images", "stores"]
    assert [n for n, _ in ops._children(IMAGES)] == ["one", "two"]
    assert [n for n, _ in ops._children(STORES)] == ["alpha", "beta"]

    attr = await ops.lookup(IMAGES, b"one")
    assert stat.S_ISREG(attr.st_mode) and attr.st_mode & 0o777 == 0o444 and attr.st_size == len(one)
    assert (await ops.getattr(attr.st_ino)).st_size == len(one)

    info = await ops.open(attr.st_ino, os.O_RDONLY)
    assert info.keep_cache
    assert await ops.read(info.fh, CS - 3, 10) == one[CS - 3 : CS + 7]
    assert await ops.read(info.fh, len(one) - 2, 100) == one[-2:]
    await ops.release(info.fh)

    beta_dir = await ops.lookup(STORES, b"beta")
    two = await ops.lookup(beta_dir.st_ino, b"two")
    assert two.st_size == 10
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup((await ops.lookup(STORES, b"alpha")).st_ino, b"two")
    assert e.value.errno == errno.ENOENT


async def test_xattrs(world):
    a, b, catalog, ops = world
    a.put("img", b"y" * (2 * CS))
    b.put("img", b"y" * (2 * CS))
    await catalog.refresh()
    ino = (await ops.lookup(IMAGES, b"img")).st_ino
    names = await ops.listxattr(ino)
    assert set(names) >= {b"user.imgfs.size", b"user.imgfs.stores", b"user.imgfs.version", b"user.imgfs.cached_fraction"}
    assert await ops.getxattr(ino, b"user.imgfs.stores") == b"alpha,beta"
    assert await ops.getxattr(ino, b"user.imgfs.store") == b"alpha"
    assert await ops.getxattr(ino, b"user.imgfs.cached_fraction") == b"0.0000"
    fh = (await ops.open(ino, os.O_RDONLY)).fh
    await ops.read(fh, 0, 10)
    while ops.fetcher.inflight:
        await trio.sleep(0.01)
    assert await ops.getxattr(ino, b"user.imgfs.cached_fraction") == b"0.5000"


async def test_the_store_xattr_names_the_copy_a_read_starts_with(world):
    """Equal weights and kinds: the catalog's order (alpha); once beta's copy is partly cached here, a
    read of images/img starts on beta, and the xattr says so."""
    a, b, catalog, ops = world
    a.put("img", b"y" * (2 * CS))
    b.put("img", b"y" * (2 * CS))
    await catalog.refresh()
    ino = (await ops.lookup(IMAGES, b"img")).st_ino
    assert await ops.getxattr(ino, b"user.imgfs.store") == b"alpha"
    beta = (await ops.lookup((await ops.lookup(STORES, b"beta")).st_ino, b"img")).st_ino
    fh = (await ops.open(beta, os.O_RDONLY)).fh
    await ops.read(fh, 0, 10)
    await ops.release(fh)
    while ops.fetcher.inflight:
        await trio.sleep(0.01)
    assert await ops.getxattr(beta, b"user.imgfs.store") == b"beta"
    assert await ops.getxattr(ino, b"user.imgfs.store") == b"beta"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(ino, b"user.other")
    assert e.value.errno == pyfuse3.ENOATTR
    for other in (b"security.selinux", b"system.posix_acl_access", b"trusted.x"):  # namespaces imgfs lacks
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getxattr(ino, other)
        assert e.value.errno == errno.EOPNOTSUPP, other
    assert await ops.listxattr(IMAGES) == []


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND])
async def test_open_for_write_is_refused(world, flags):
    a, _, catalog, ops = world
    a.put("img", b"z")
    await catalog.refresh()
    ino = (await ops.lookup(IMAGES, b"img")).st_ino
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(ino, flags)
    assert e.value.errno == errno.EROFS


async def test_every_modifying_request_is_erofs(world):
    for call in (ops_call for ops_call in ("setattr", "create", "mkdir", "mknod", "symlink", "link", "unlink",
                                           "rmdir", "rename", "setxattr", "removexattr", "write", "fsync")):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await getattr(world[3], call)(IMAGES, b"x", 0, None)
        assert e.value.errno == errno.EROFS, call


async def test_unknown_id_asks_the_store_before_enoent(world):
    a, _, catalog, ops = world
    await catalog.refresh()
    a.put("late", b"arrived after the listing")
    attr = await ops.lookup(IMAGES, b"late")  # no refresh in between
    assert attr.st_size == len(b"arrived after the listing")
    for bad in (b"missing", b"\xff\xfe", b"..", b"a" * 255):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(IMAGES, bad)
        assert e.value.errno == errno.ENOENT


async def test_changed_image_invalidates_kernel_cache_and_pins_open_version(world):
    a, _, catalog, ops = world
    old = os.urandom(2 * CS)
    a.put("img", old)
    await catalog.refresh()
    ino = (await ops.lookup(IMAGES, b"img")).st_ino
    fh = (await ops.open(ino, os.O_RDONLY)).fh
    assert await ops.read(fh, 0, 100) == old[:100]
    new = os.urandom(3 * CS)
    a.put("img", new)
    await catalog.refresh()
    assert ino in ops.invalidated
    assert (await ops.getattr(ino)).st_size == len(new)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(fh, CS, 100)  # the old version's chunk 1 is not cached: refused, not mixed
    assert e.value.errno == errno.ESTALE
    assert not ops.forgotten  # changed, not gone: the name stays
    fh2 = (await ops.open(ino, os.O_RDONLY)).fh
    assert await ops.read(fh2, 0, 3 * CS) == new


async def test_kernel_keeps_file_attributes_long_and_forgets_names_that_go(world):
    """Images are immutable per version: entry and attribute timeouts are long for files (ls -l of
    thousands of images stays in the kernel), short for directories; a removed image's names are
    invalidated in every view that showed it."""
    a, b, catalog, ops = world
    a.put("img", b"x" * 100)
    b.put("img", b"x" * 100)
    await catalog.refresh()
    attr = await ops.lookup(IMAGES, b"img")
    assert attr.entry_timeout >= 3600 and attr.attr_timeout >= 3600
    assert (await ops.getattr(IMAGES)).attr_timeout <= 1
    store_dir = (await ops.lookup(STORES, b"alpha")).st_ino
    await ops.lookup(store_dir, b"img")
    a.delete("img")
    await catalog.refresh()
    await trio.testing.wait_all_tasks_blocked()  # names are forgotten in the background
    assert ops.forgotten == [(store_dir, "img")]  # still in images/ (from beta)
    b.delete("img")
    await catalog.refresh()
    await trio.testing.wait_all_tasks_blocked()
    assert (IMAGES, "img") in ops.forgotten


async def test_removed_image_disappears(world):
    a, _, catalog, ops = world
    a.put("gone", b"bytes")
    await catalog.refresh()
    ino = (await ops.lookup(IMAGES, b"gone")).st_ino
    a.delete("gone")
    await catalog.refresh()
    assert [n for n, _ in ops._children(IMAGES)] == []
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(ino)


async def test_store_listing_failure_keeps_last_listing(world, caplog):
    a, _, catalog, ops = world
    a.put("img", b"bytes")
    await catalog.refresh()

    def broken():
        from imgfs.errors import BackendUnavailable

        raise BackendUnavailable("store 'alpha': cannot connect")

    a.list_images = broken
    await catalog.refresh()
    await catalog.refresh()
    assert [n for n, _ in ops._children(IMAGES)] == ["img"]
    assert catalog.stores["alpha"].reachable is False
    assert caplog.text.count("cannot connect") == 1  # said once, not every refresh


async def test_a_bug_in_a_handler_is_eio_for_that_request_not_the_end_of_the_daemon(world, caplog):
    """pyfuse3 ends its main loop on any exception but FUSEError: that would take the mount (and the
    Image API endpoint in the same process) down for one bad request."""
    a, b, catalog, ops = world
    a.put("one", b"x" * 100)
    await catalog.refresh()
    attr = await ops.lookup(IMAGES, b"one")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    ops.fetcher.verifier = broken
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.open(attr.st_ino, os.O_RDONLY)
    assert info.value.errno == errno.EIO
    assert "internal error in the FUSE open handler" in caplog.text and "RuntimeError: a bug" in caplog.text
    del ops.fetcher.verifier  # the next open works again
    info = await ops.open(attr.st_ino, os.O_RDONLY)
    assert await ops.read(info.fh, 0, 10) == b"x" * 10


def test_refresh_waits_are_the_interval_give_or_take_a_fifth_drawn_anew(monkeypatch):
    import imgfs.catalog as catalog_mod
    from imgfs.catalog import refresh_delay

    monkeypatch.setattr(catalog_mod, "_jitter", random.Random(20261202))  # the same draws every run

    waits = [refresh_delay(60) for _ in range(2000)]
    assert all(48 <= w <= 72 for w in waits)
    assert min(waits) < 50 and max(waits) > 70  # the whole band is used
    assert len(set(waits)) == len(waits)
    # two nodes started together: after ten rounds their listings are seconds apart, not in step
    a, b = sum(refresh_delay(60) for _ in range(10)), sum(refresh_delay(60) for _ in range(10))
    assert abs(a - b) > 1.0


async def test_the_refresh_loop_waits_a_jittered_delay_between_listings(monkeypatch, nursery):
    import imgfs.catalog as catalog_mod

    asked: list[float] = []

    def delay(interval: float) -> float:
        asked.append(interval)
        return 0.01

    monkeypatch.setattr(catalog_mod, "refresh_delay", delay)
    backend = MemoryBackend(name="alpha")
    calls = []
    real = backend.list_images
    backend.list_images = lambda: calls.append(1) or real()  # type: ignore[method-assign]
    catalog = Catalog([backend], refresh_interval=60, negative_ttl=5, limiter=trio.CapacityLimiter(2))
    nursery.start_soon(catalog.run, trio.Event())
    with trio.fail_after(10):
        while len(calls) < 5:
            await trio.sleep(0.01)
    assert asked[:4] == [60, 60, 60, 60]
