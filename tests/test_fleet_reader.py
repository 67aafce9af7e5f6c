"""The reading side of fleet mode against a real HTTP server standing in for the local nginx (a lying
or broken mesh is what this tests; tests/test_fleet.py runs the real nginx mesh): every wrong answer
falls back to the origin, never reaches a reader, and is counted by its cause; a peer that flips a bit
is caught by the full read's digest, and the image is then read from the origin, right."""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio

from imgfs.backends.memory import MemoryBackend
from imgfs.cache import ChunkCache
from imgfs.errors import IntegrityError
from imgfs.fleet.mesh import VERSION_HEADER, FleetBackend, FleetStats, MeshClient
from imgfs.fleet.sums import ChunkSums
from imgfs.model import Location
from imgfs.reader import ChunkFetcher, ImageReader, StreamVerifier

CS = 256 * 1024


class FakeMesh:
    """Serves ranges of ``data`` the way the mesh does, or wrongly, as ``mode`` says."""

    def __init__(self, data: bytes, version: str) -> None:
        self.data, self.version, self.mode, self.after = data, version, "good", "short"
        self.requests = 0
        self.delay = 0.0  # seconds before each answer: a far owner
        mesh = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                mesh.requests += 1
                time.sleep(mesh.delay)
                if mesh.mode == "short-once":  # an owner lost under one answer, then the next one answers
                    mesh.mode = "short"
                elif mesh.mode == "short":
                    mesh.mode = mesh.after
                a, b = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
                body = bytearray(mesh.data[a : b + 1])
                status, content_range, version = 206, f"bytes {a}-{b}/{len(mesh.data)}", mesh.version
                if mesh.mode == "flip":
                    body[len(body) // 2] ^= 0x01
                elif mesh.mode == "short":
                    body = body[:-1]
                elif mesh.mode == "range":
                    content_range = f"bytes {a + 1}-{b + 1}/{len(mesh.data)}"
                elif mesh.mode == "version":
                    version = "older"
                elif mesh.mode == "503":
                    status, body = 503, bytearray(b"busy")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if mesh.mode != "short" else len(body) + 1))
                if status == 206:
                    self.send_header("Content-Range", content_range)
                    self.send_header(VERSION_HEADER, version)
                self.end_headers()
                self.wfile.write(bytes(body))
                if mesh.mode == "short":
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
async def rig(tmp_path, nursery):
    data = random.Random(7).randbytes(6 * CS + 1000)
    origin = MemoryBackend(name="s3", kind="s3")
    loc = origin.put("img", data)
    mesh = FakeMesh(data, loc.version)
    stats = FleetStats()
    fleet = FleetBackend(origin, MeshClient(mesh.port, timeout=5, connections=4), chunk_size=CS, min_size=0, stats=stats)
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes=1 << 30, max_count=10_000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"s3": fleet}, chunk_size=CS, max_connections=4)
    fetcher.second_chance = fleet.distrust
    fetcher.attach(nursery)
    yield data, loc, mesh, stats, fetcher, origin
    mesh.close()


async def read_whole(fetcher, loc, data, digest=None) -> bytes:
    digest = digest or hashlib.sha512(data).hexdigest()
    # as the mount and the endpoint make it (the fetcher's witness taps it), but always checked here
    verify = fetcher.verifier([loc], "sha512", digest, len(data)) or StreamVerifier("sha512", digest, len(data))
    reader = ImageReader(fetcher, [loc], prefetch_max=0, verify=verify, on_integrity_error=fetcher.drop_copies)
    out = bytearray()
    for off in range(0, len(data), 64 * 1024):
        out += await reader.read(off, 64 * 1024)
    return bytes(out)


@pytest.mark.parametrize("mode, cause", [("short", "broken_body"), ("range", "bad_range"), ("version", "version"),
                                         ("503", "http_503")])
async def test_a_wrong_answer_is_read_from_the_origin_and_counted(rig, mode, cause):
    data, loc, mesh, stats, fetcher, origin = rig
    mesh.mode = mode
    assert await read_whole(fetcher, loc, data) == data
    assert set(stats.fallbacks) == {cause} and stats.mesh_bytes == 0
    assert stats.origin_bytes == origin.read_bytes >= len(data)  # every byte the reader got came from the origin


async def test_an_answer_cut_short_is_asked_of_the_mesh_once_more_before_the_origin(rig):
    data, loc, mesh, stats, fetcher, origin = rig
    mesh.mode, mesh.after = "short-once", "good"
    assert await read_whole(fetcher, loc, data) == data
    assert stats.retries == {"broken_body": 1} and stats.fallbacks == {} and origin.read_bytes == 0


async def test_an_unreachable_mesh_is_read_from_the_origin(rig):
    data, loc, mesh, stats, fetcher, origin = rig
    mesh.close()
    assert await read_whole(fetcher, loc, data) == data
    assert set(stats.fallbacks) == {"unreachable"} and stats.mesh_bytes == 0


async def test_a_good_mesh_answers_every_chunk_and_the_origin_sends_nothing(rig):
    data, loc, mesh, stats, fetcher, origin = rig
    assert await read_whole(fetcher, loc, data) == data
    assert stats.mesh_bytes == len(data) and stats.fallbacks == {} and origin.read_bytes == 0


async def test_a_prefetch_through_the_mesh_asks_for_each_chunk_apart_and_at_once(rig):
    """A sequential prefetch joins adjacent chunks into one request to a store; through the mesh each
    chunk is a GET of its own anyway (its own owner), so a run would fetch them one after another in
    one worker thread. Each chunk is its own flight instead: here two at a time (the prefetch slots of
    4 connections), so six far chunks take three round trips, not six."""
    data, loc, mesh, stats, fetcher, origin = rig
    mesh.delay = 0.3
    started = trio.current_time()
    await fetcher.warm(loc, 0, 7)
    elapsed = trio.current_time() - started
    assert mesh.requests == 7 and stats.mesh_bytes == len(data)
    assert elapsed < 0.3 * 7 * 0.7, f"{elapsed:.2f} s: the chunks came one after another"
    assert await read_whole(fetcher, loc, data) == data and mesh.requests == 7


async def test_a_peer_that_flips_a_bit_never_yields_a_wrong_full_image(rig):
    """The flipped chunks pass the mesh's own checks (status, range, length, version): the full read's
    digest catches them. That read fails (EIO); the mesh is bypassed for the version, and the next full
    read comes from the origin, right. Partial reads of flipped chunks are not caught: chunk digests a
    peer cannot forge are the next step (docs/fleet.md)."""
    data, loc, mesh, stats, fetcher, origin = rig
    mesh.mode = "flip"
    with pytest.raises(IntegrityError):
        await read_whole(fetcher, loc, data)
    assert stats.integrity_failures == 1 and loc not in fetcher.quarantined
    asked = mesh.requests
    while fetcher.inflight:
        await trio.sleep(0.01)
    assert await read_whole(fetcher, loc, data) == data
    assert mesh.requests == asked and stats.fallbacks.get("distrusted", 0) >= 1
    # the origin's own bytes failing their digest quarantine the copy, as without the fleet
    with pytest.raises(IntegrityError):
        await read_whole(fetcher, loc, data, digest="00" * 64)
    assert loc in fetcher.quarantined


# --- chunk sums: per-block digests kept at the origin, made from a verified full read ----------------

class Witness:
    """What FleetNode is to the fetcher, for the one store of these tests."""

    def __init__(self, fleet: FleetBackend) -> None:
        self.fleet = fleet

    def tap(self, loc):
        return self.fleet.sums_maker(loc)

    def matched(self, tap, algo, digest):
        self.fleet.publish_sums(tap, algo, digest)

    def untapped(self, loc):
        self.fleet.sums.passed(loc)


async def another_node(tmp_path, name, origin, mesh, nursery):
    """A second node of the same fleet: its own cache and its own memory of sums, the same origin and mesh."""
    stats = FleetStats()
    fleet = FleetBackend(origin, MeshClient(mesh.port, timeout=5, connections=4), chunk_size=CS, min_size=0, stats=stats)
    cache = ChunkCache(str(tmp_path / name), max_bytes=1 << 30, max_count=10_000, memory_bytes=0)
    await cache.open()
    fetcher = ChunkFetcher(cache, {"s3": fleet}, chunk_size=CS, max_connections=4)
    fetcher.second_chance, fetcher.witness = fleet.distrust, Witness(fleet)
    fetcher.attach(nursery)
    return stats, fetcher


async def settle(fetcher):
    while fetcher.inflight:
        await trio.sleep(0.01)
    await trio.sleep(0.2)  # the publish runs in the background after the read


def expected_sums(data: bytes) -> bytes:
    return b"".join(hashlib.sha256(data[i : i + CS]).digest() for i in range(0, len(data), CS))


async def test_a_verified_full_read_stores_chunk_sums_and_a_peer_flipping_a_bit_is_then_caught_block_by_block(
        rig, tmp_path, nursery):
    data, loc, mesh, stats, fetcher, origin = rig
    fetcher.witness = Witness(fetcher.backends["s3"])
    assert await read_whole(fetcher, loc, data) == data
    await settle(fetcher)
    raw = origin.sidecars[f".imgfs/chunk-sums/{loc.image_id}"]
    assert ChunkSums.decode(raw, loc, CS).sums == expected_sums(data) and stats.sums == {"published": 1}
    # the sums are the origin's now: a second node checks every block a peer serves against them
    mesh.mode = "flip"
    stats2, fetcher2 = await another_node(tmp_path, "node2", origin, mesh, nursery)
    reader = ImageReader(fetcher2, [loc], prefetch_max=0)
    assert bytes(await reader.read(3 * CS + 100, 10_000)) == data[3 * CS + 100 : 3 * CS + 10_100]  # a partial read
    assert stats2.fallbacks == {"chunk_sum": 1} and origin.read_bytes == CS  # the flipped block, from the origin
    assert await read_whole(fetcher2, loc, data) == data  # and a full one: no reader error at all
    assert stats2.integrity_failures == 0 and stats2.mesh_bytes == 0 and stats2.sums_checked_bytes >= len(data)
    assert set(stats2.fallbacks) == {"chunk_sum"} and stats2.sums == {}
    # a good peer's blocks are checked and used
    mesh.mode = "good"
    stats3, fetcher3 = await another_node(tmp_path, "node3", origin, mesh, nursery)
    assert await read_whole(fetcher3, loc, data) == data
    # (a small read asks the mesh for the whole blocks around it: more is checked than used)
    assert stats3.mesh_bytes == len(data) <= stats3.sums_checked_bytes and stats3.fallbacks == {}


async def test_chunk_sums_the_origin_contradicts_are_dropped_and_never_cost_a_right_byte(rig):
    data, loc, mesh, stats, fetcher, origin = rig
    lie = ChunkSums(loc.image_id, loc.version, loc.size, bytes(len(expected_sums(data))), CS)  # all zero: wrong
    origin.put_sidecar("chunk-sums", loc.image_id, lie.encode())
    assert await read_whole(fetcher, loc, data) == data
    assert stats.fallbacks == {"chunk_sum": 1} and stats.sums == {"rejected": 1}
    assert origin.read_bytes == CS and stats.mesh_bytes >= len(data) - CS  # one block from the origin, then the mesh


@pytest.mark.parametrize("what, outcome", [
    ("another version", "unusable"), ("another image", "unusable"), ("one sum short", "unusable"),
    ("not JSON", "unusable"), ("no header line", "unusable"), ("another block size", "unusable"),
    ("larger than any list", "read_failed")])
async def test_a_stored_list_that_is_not_for_this_copy_is_not_used(rig, what, outcome):
    data, loc, mesh, stats, fetcher, origin = rig
    good = ChunkSums(loc.image_id, loc.version, loc.size, expected_sums(data), CS).encode()
    head, body = good.split(b"\n", 1)
    raw = {"another version": good.replace(loc.version.encode(), b"v999"),
           "another image": good.replace(b'"image":"img"', b'"image":"other"'),
           "one sum short": good[:-32], "not JSON": b"{nope\n" + body, "no header line": b"x" * 1000,
           "another block size": good.replace(f'"block":{CS}'.encode(), b'"block":1048576'),
           "larger than any list": good + bytes(10_000)}[what]
    assert raw != good
    origin.put_sidecar("chunk-sums", loc.image_id, raw)
    mesh.mode = "flip"  # so that a list wrongly used would show as chunk_sum fallbacks
    with pytest.raises(IntegrityError):  # no usable list: only the full read's digest catches the peer
        await read_whole(fetcher, loc, data)
    assert stats.sums == {outcome: 1} and "chunk_sum" not in stats.fallbacks


async def test_credentials_that_only_read_publish_no_sums_and_say_so_once(rig, caplog):
    data, loc, mesh, stats, fetcher, origin = rig
    fetcher.witness = Witness(fetcher.backends["s3"])
    origin.sidecars_read_only = True
    assert await read_whole(fetcher, loc, data) == data
    await settle(fetcher)
    assert stats.sums == {"publish_refused": 1} and not origin.sidecars
    lines = [r.getMessage() for r in caplog.records if "cannot store chunk sums" in r.getMessage()]
    assert len(lines) == 1 and "chunk_sums = use" in lines[0]


def test_publishers_are_the_same_two_members_on_every_node_and_a_members_change_moves_few():
    from imgfs.fleet.sums import PUBLISHERS, elected

    members = tuple(f"10.0.0.{i}:8443" for i in range(1, 33))
    locs = [Location("s3", f"img-{i}", 1 << 30, f"etag-{i}", 0.0) for i in range(200)]
    for loc in locs:  # each node decides alone, and all come to the same PUBLISHERS members
        assert sum(elected(members, me, loc) for me in members) == PUBLISHERS
    spread = {me for loc in locs for me in members if elected(members, me, loc)}
    assert len(spread) > len(members) * 0.9  # the work is spread, not always the same two nodes
    # a 33rd node joining takes over only the images it now ranks high for
    bigger = members + ("10.0.0.99:8443",)
    moved = sum(any(elected(members, me, loc) != elected(bigger, me, loc) for me in members) for loc in locs)
    assert moved < len(locs) * 0.2
    assert elected(members, "10.9.9.9:8443", locs[0])  # a node missing from members publishes (fails open)


async def test_a_node_not_elected_leaves_the_first_read_to_the_publishers_and_sums_its_second(rig):
    """The fleet's first wave: a node not among the image's publishers does not sum its first full
    read (the elected ones do); if the sums are still missing at its second, it makes and stores them."""
    data, loc, mesh, stats, fetcher, origin = rig
    fleet = fetcher.backends["s3"]
    fleet.sums.elected = lambda _loc: False
    fetcher.witness = Witness(fleet)
    reader = ImageReader(fetcher, [loc], prefetch_max=0)  # a partial read (qemu-img info) does not count
    assert bytes(await reader.read(0, 4096)) == data[:4096]
    assert fetcher.verifier([loc], "sha512", hashlib.sha512(data).hexdigest(), len(data)).tap is None
    assert await read_whole(fetcher, loc, data) == data
    await settle(fetcher)
    assert not origin.sidecars and stats.sums == {"left_to_publishers": 1}
    await fetcher.cache.drop("s3", loc.image_id)
    assert await read_whole(fetcher, loc, data) == data
    await settle(fetcher)
    raw = origin.sidecars[f".imgfs/chunk-sums/{loc.image_id}"]
    assert ChunkSums.decode(raw, loc, CS).sums == expected_sums(data)
    assert stats.sums == {"left_to_publishers": 1, "published": 1}


async def test_chunk_sums_off_neither_reads_nor_publishes(tmp_path, nursery):
    data = random.Random(8).randbytes(3 * CS)
    origin = MemoryBackend(name="s3", kind="s3")
    loc = origin.put("img", data)
    fleet = FleetBackend(origin, MeshClient(1, timeout=1, connections=1), chunk_size=CS, min_size=0,
                         stats=FleetStats(), chunk_sums="off")
    assert fleet.sums_maker(loc) is None and fleet.sums.get(loc) is None


async def test_only_the_blocks_a_peer_got_wrong_are_read_from_the_origin(tmp_path, nursery):
    """A chunk of two 1 MiB blocks whose second one is flipped: the first is used from the mesh, only the
    second comes from the origin."""
    mib = 1 << 20
    data = random.Random(9).randbytes(4 * mib + 1000)
    origin = MemoryBackend(name="s3", kind="s3")
    loc = origin.put("img", data)
    sums = b"".join(hashlib.sha256(data[i : i + mib]).digest() for i in range(0, len(data), mib))
    origin.put_sidecar("chunk-sums", "img", ChunkSums("img", loc.version, len(data), sums, mib).encode())
    mesh = FakeMesh(data, loc.version)
    mesh.mode = "flip"  # the middle byte of each answer: the second block of a whole 2 MiB chunk
    stats = FleetStats()
    fleet = FleetBackend(origin, MeshClient(mesh.port, timeout=5, connections=4), chunk_size=2 * mib, min_size=0,
                         stats=stats)
    try:
        for chunk in range(2):
            assert fleet.read(loc, chunk * 2 * mib, 2 * mib) == data[chunk * 2 * mib : (chunk + 1) * 2 * mib]
        assert stats.fallbacks == {"chunk_sum": 2} and stats.mesh_bytes == 2 * mib
        assert origin.read_bytes == 2 * mib and sorted(off for _, off in origin.reads) == [mib, 3 * mib]
    finally:
        mesh.close()
