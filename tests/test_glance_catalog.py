"""The Glance-shaped catalog on a fake Image API: what exists, names, metadata, which copies count.
The same code runs against a real Glance in the lab tests."""

from __future__ import annotations

import errno
import stat

import pyfuse3
import pytest
import trio

from imgfs.backends.memory import MemoryBackend
from imgfs.cache import ChunkCache
from imgfs.catalog import Catalog
from imgfs.fs import BY_NAME, IMAGES, ROOT, Operations
from imgfs.glance import parse
from imgfs.reader import ChunkFetcher


class FakeGlance:
    def __init__(self) -> None:
        self.bodies: dict[str, dict] = {}

    def add(self, image_id, name, size, stores, *, status="active", created="2026-01-01T00:00:00Z", checksum="c1"):
        self.bodies[image_id] = {"id": image_id, "name": name, "size": size, "status": status, "stores": ",".join(stores),
                                 "created_at": created, "updated_at": created, "checksum": checksum,
                                 "disk_format": "raw", "container_format": "bare", "os_hash_algo": "sha512",
                                 "os_hash_value": "ab" * 64, "visibility": "public", "owner": "p1",
                                 "locations": [{"url": "s3://AKIA:SECRET@host/glance/" + image_id, "metadata": {"store": s}} for s in stores]}

    def list_images(self):
        return [g for g in map(parse, self.bodies.values()) if g is not None]

    def get(self, image_id):
        body = self.bodies.get(image_id)
        return None if body is None else parse(body)


@pytest.fixture
async def world(tmp_path, nursery):
    s3, files = MemoryBackend(name="s3store"), MemoryBackend(name="filestore")
    glance = FakeGlance()
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    catalog = Catalog([s3, files], refresh_interval=60, negative_ttl=0, limiter=trio.CapacityLimiter(2), source=glance)
    fetcher = ChunkFetcher(cache, {"s3store": s3, "filestore": files}, chunk_size=64 * 1024, max_connections=2)
    fetcher.attach(nursery)
    ops = Operations(catalog, fetcher, prefetch_max=0)
    return s3, files, glance, catalog, ops


async def test_glance_decides_what_exists_and_which_copies_count(world):
    s3, files, glance, catalog, ops = world
    s3.put("a", b"x" * 100)
    files.put("a", b"x" * 100)
    glance.add("a", "ubuntu", 100, ["s3store", "filestore"])
    s3.put("stray", b"not in glance")  # an object Glance does not know: not an image
    glance.add("queued", "new", 5, ["s3store"], status="queued")  # not readable yet
    s3.put("queued", b"12345")
    files.put("b", b"y" * 50)
    glance.add("b", "cirros", 51, ["filestore"])  # the copy's size disagrees with Glance: not that image
    await catalog.refresh()
    assert catalog.image_ids() == ["a"]
    assert [l.store for l in catalog.image("a").locations] == ["s3store", "filestore"]
    assert [n for n, _ in ops._children(ROOT)] == ["images", "stores", "by-name"]
    # each store's own view follows Glance too: no stray object, no queued image, no copy of the wrong size
    assert catalog.image_ids("s3store") == ["a"] and catalog.image_ids("filestore") == ["a"]
    assert catalog.location("s3store", "stray") is None and catalog.location("filestore", "b") is None
    glance.bodies["a"]["status"] = "deactivated"  # deactivated in Glance: gone from every view
    await catalog.refresh()
    assert catalog.image_ids() == [] and catalog.image_ids("s3store") == [] and catalog.location("s3store", "a") is None


async def test_stores_come_from_locations_when_glance_gives_no_stores_field(world):
    """Older Glance (or a policy hiding `stores`) names each copy's store only in locations[].metadata."""
    s3, files, glance, catalog, ops = world
    s3.put("a", b"x" * 100)
    files.put("a", b"x" * 100)
    glance.add("a", "ubuntu", 100, ["filestore", "s3store"])
    del glance.bodies["a"]["stores"]
    await catalog.refresh()
    assert catalog.image_ids() == ["a"]
    assert sorted(l.store for l in catalog.image("a").locations) == ["filestore", "s3store"]
    glance.bodies["a"]["locations"] = [{"url": "s3://elsewhere", "metadata": {"store": "s3store"}}]
    await catalog.refresh()
    assert [l.store for l in catalog.image("a").locations] == ["s3store"]  # only the store Glance names
    glance.bodies["a"]["locations"] = []  # a user who may not see locations: every store holding it counts
    await catalog.refresh()
    assert sorted(l.store for l in catalog.image("a").locations) == ["filestore", "s3store"]


async def test_names_newest_wins_others_get_their_id(world):
    s3, files, glance, catalog, ops = world
    for image_id, created in (("old", "2025-01-01T00:00:00Z"), ("new", "2026-06-01T00:00:00Z")):
        s3.put(image_id, b"z" * 10)
        glance.add(image_id, "ubuntu/22.04", 10, ["s3store"], created=created)
    await catalog.refresh()
    assert catalog.names() == {"ubuntu_22.04": "new", "ubuntu_22.04~old": "old"}
    link = await ops.lookup(BY_NAME, b"ubuntu_22.04")
    assert stat.S_ISLNK(link.st_mode)
    assert await ops.readlink(link.st_ino) == b"../images/new"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(BY_NAME, b"nope")
    assert e.value.errno == errno.ENOENT


async def test_xattrs_carry_glance_metadata_never_location_urls(world):
    s3, files, glance, catalog, ops = world
    s3.put("a", b"x" * 10)
    glance.add("a", "img", 10, ["s3store"])
    await catalog.refresh()
    ino = (await ops.lookup(IMAGES, b"a")).st_ino
    names = {n.decode() for n in await ops.listxattr(ino)}
    for key in ("disk_format", "container_format", "checksum", "os_hash_algo", "os_hash_value", "owner",
                "visibility", "updated_at", "name", "stores", "cached_fraction"):
        assert f"user.imgfs.{key}" in names
    values = b"".join([await ops.getxattr(ino, n.encode()) for n in names])
    assert b"SECRET" not in values and b"s3://" not in values
    glance.bodies["a"]["disk_format"] = "qcow2"  # metadata updated in Glance: the xattr follows
    await catalog.refresh()
    assert await ops.getxattr(ino, b"user.imgfs.disk_format") == b"qcow2"


async def test_deleted_in_glance_disappears_and_lookup_asks_glance(world):
    s3, files, glance, catalog, ops = world
    s3.put("a", b"x" * 10)
    glance.add("a", "img", 10, ["s3store"])
    await catalog.refresh()
    del glance.bodies["a"]
    await catalog.refresh()
    assert catalog.image_ids() == [] and catalog.names() == {}
    s3.put("late", b"q" * 7)
    glance.add("late", "late", 7, ["s3store"])
    assert (await ops.lookup(IMAGES, b"late")).st_size == 7  # before any refresh
