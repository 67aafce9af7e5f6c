"""The raw/ view at the FUSE adapter: every image Glance calls qcow2 is its virtual raw disk, decoded
from the stored object through the chunk cache; an image Glance calls raw is its stored bytes, even
when they hold a qcow2 header; anything the decoder refuses is not offered. qemu-img makes the images
and is the oracle (tests/test_raw_mount.py does the same through a real kernel mount and Glance)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import subprocess

import pyfuse3
import pytest
import trio

from imgfs.backends.memory import MemoryBackend
from imgfs.cache import ChunkCache
from imgfs.catalog import Catalog
from imgfs.disks import DiskBook
from imgfs.fs import RAW, ROOT, Operations

from .qemuimg import luks_qcow2
from .test_glance_catalog import FakeGlance

QEMU_IMG = shutil.which("qemu-img")
pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img (apt-get install qemu-utils)")
MiB = 1 << 20


def raw_disk(size: int, seed: int) -> bytes:
    """Random data, a compressible run, zeros and a tail: what a cloud image looks like to a decoder."""
    rng = random.Random(seed)
    disk = bytearray(size)
    disk[0 : MiB] = rng.randbytes(MiB)
    disk[2 * MiB : 3 * MiB] = b"imgfs " * (MiB // 6) + b"imgf"
    disk[size - 100_000 :] = rng.randbytes(100_000)
    return bytes(disk)


def qcow2_of(tmp_path, raw: bytes, *options: str) -> bytes:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    src.write_bytes(raw)
    subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", *options, str(src), str(dst)], check=True)
    return dst.read_bytes()


@pytest.fixture
async def world(tmp_path, nursery):
    s3 = MemoryBackend(name="s3store")
    glance = FakeGlance()
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 30, max_count=1000, memory_bytes=0)
    await cache.open()
    catalog = Catalog([s3], refresh_interval=60, negative_ttl=0, limiter=trio.CapacityLimiter(2), source=glance)
    from imgfs.reader import ChunkFetcher

    fetcher = ChunkFetcher(cache, {"s3store": s3}, chunk_size=MiB, max_connections=2)
    fetcher.attach(nursery)
    disks = DiskBook(catalog, fetcher, prefetch_max=4 * MiB, holes_served=True)
    ops = Operations(catalog, fetcher, prefetch_max=4 * MiB, disks=disks)

    async def add(image_id: str, stored: bytes, disk_format: str) -> None:
        s3.put(image_id, stored)
        glance.add(image_id, image_id, len(stored), ["s3store"])
        body = glance.bodies[image_id]
        body["disk_format"] = disk_format
        body["os_hash_value"] = hashlib.sha512(stored).hexdigest()
        await catalog.refresh()

    return s3, add, ops


async def listing(ops, inode) -> dict[str, int]:
    fh = await ops.opendir(inode)
    entries = ops._dirs[fh]
    await ops.releasedir(fh)
    return {name.decode(): ino for name, ino in entries}


async def read_all(ops, ino: int, size: int, bs: int = 128 * 1024) -> bytes:
    info = await ops.open(ino, 0)
    out = bytearray()
    try:
        for off in range(0, size, bs):
            out += await ops.read(info.fh, off, bs)
        assert await ops.read(info.fh, size, bs) == b""  # nothing past the end
    finally:
        await ops.release(info.fh)
    return bytes(out)


@pytest.mark.parametrize("options", [("-c",), ("-c", "-o", "compression_type=zstd"), ("-o", "compat=0.10"),
                                     ("-o", "cluster_size=4096")], ids=["zlib", "zstd", "v2", "4k-clusters"])
async def test_a_qcow2_image_is_its_raw_disk_and_images_keeps_the_stored_bytes(world, tmp_path, options):
    s3, add, ops = world
    raw = raw_disk(6 * MiB + 512, 1)
    stored = qcow2_of(tmp_path, raw, *options)
    await add("img", stored, "qcow2")
    assert "raw" in await listing(ops, ROOT)
    assert list(await listing(ops, RAW)) == ["img"]
    attr = await ops.lookup(RAW, b"img")
    assert attr.st_size == len(raw) and attr.st_mode & 0o777 == 0o444
    assert await read_all(ops, attr.st_ino, len(raw)) == raw
    stored_attr = await ops.lookup(pyfuse3.ROOT_INODE + 1, b"img")  # images/<id>: the object as Glance serves it
    assert stored_attr.st_size == len(stored) and await read_all(ops, stored_attr.st_ino, len(stored)) == stored
    xattrs = {n.decode(): (await ops.getxattr(attr.st_ino, n)).decode() for n in await ops.listxattr(attr.st_ino)}
    assert xattrs["user.imgfs.decoded_from"] == "qcow2" and xattrs["user.imgfs.decodes"] == "images/img"
    assert xattrs["user.imgfs.size"] == str(len(raw)) and xattrs["user.imgfs.stored_size"] == str(len(stored))


async def test_random_reads_of_a_compressed_disk_fetch_only_what_they_touch(world, tmp_path):
    s3, add, ops = world
    raw = raw_disk(64 * MiB, 2)
    stored = qcow2_of(tmp_path, raw, "-c")
    await add("big", stored, "qcow2")
    attr = await ops.lookup(RAW, b"big")
    info = await ops.open(attr.st_ino, 0)
    for off in (0, 2 * MiB + 4096, 40 * MiB, 64 * MiB - 4096):  # data, compressible, zero (never fetched), tail
        assert bytes(await ops.read(info.fh, off, 4096)) == raw[off : off + 4096]
    await ops.release(info.fh)
    assert s3.read_bytes < len(stored) / 2, f"{s3.read_bytes} of {len(stored)} stored bytes fetched"


async def test_an_image_glance_calls_raw_is_never_decoded_even_with_a_qcow2_header(world, tmp_path):
    """A guest can write a qcow2 header at the start of its disk; reading that disk as qcow2 would make
    the header's tables (or a backing file) choose what a reader gets."""
    s3, add, ops = world
    inner = qcow2_of(tmp_path, raw_disk(4 * MiB, 3), "-c")
    await add("disk", inner, "raw")
    attr = await ops.lookup(RAW, b"disk")
    assert attr.st_size == len(inner) and await read_all(ops, attr.st_ino, len(inner)) == inner


@pytest.mark.parametrize("what", ["backing file", "encrypted", "not a qcow2", "vmdk"])
async def test_what_the_decoder_refuses_or_glance_calls_another_format_is_not_offered(world, tmp_path, what, caplog):
    s3, add, ops = world
    raw = raw_disk(4 * MiB, 4)
    if what == "backing file":
        base = tmp_path / "base.qcow2"
        base.write_bytes(qcow2_of(tmp_path, raw))
        top = tmp_path / "top.qcow2"
        subprocess.run([QEMU_IMG, "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True,
                       capture_output=True)
        stored, fmt = top.read_bytes(), "qcow2"
    elif what == "encrypted":
        out = tmp_path / "enc.qcow2"
        luks_qcow2(out, "4M")
        stored, fmt = out.read_bytes(), "qcow2"
    elif what == "not a qcow2":
        stored, fmt = raw, "qcow2"  # Glance says qcow2, the bytes are not: refused, never served raw
    else:
        stored, fmt = raw, "vmdk"
    await add("img", stored, fmt)
    caplog.set_level(logging.WARNING)
    assert await listing(ops, RAW) == {}
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(RAW, b"img")
    assert e.value.errno == errno.ENOENT
    lines = [r.getMessage() for r in caplog.records if "not offered as a raw disk" in r.getMessage()]
    assert len(lines) == (0 if fmt == "vmdk" else 1), lines
    # images/<id> is untouched: the stored bytes, whatever they are
    attr = await ops.lookup(pyfuse3.ROOT_INODE + 1, b"img")
    assert await read_all(ops, attr.st_ino, len(stored)) == stored


def seek_walk(size: int, seek) -> list[tuple[int, int, str]]:
    """(start, end, kind) runs of a file found the way cp --sparse and qemu-img do: SEEK_DATA, SEEK_HOLE,
    again, until ENXIO."""
    runs, pos = [], 0
    while pos < size:
        data = seek(pos, True)
        if data is None:
            runs.append((pos, size, "zero"))
            break
        if data > pos:
            runs.append((pos, data, "zero"))
        hole = seek(data, False)
        runs.append((data, hole, "data"))
        pos = hole
    return runs


async def test_seek_data_and_seek_hole_find_the_extents_qemu_img_maps(world, tmp_path):
    from .test_qcow2 import qemu_map

    s3, add, ops = world
    raw = raw_disk(40 * MiB, 5)
    stored = qcow2_of(tmp_path, raw, "-c")
    await add("img", stored, "qcow2")
    attr = await ops.lookup(RAW, b"img")
    info = await ops.open(attr.st_ino, 0)
    answers: dict[tuple[int, bool], int | None] = {}

    async def ask(pos: int, data: bool) -> int | None:
        try:
            answers[(pos, data)] = await ops.lseek(info.fh, pos, os.SEEK_DATA if data else os.SEEK_HOLE)
        except pyfuse3.FUSEError as e:
            assert e.errno == errno.ENXIO
            answers[(pos, data)] = None
        return answers[(pos, data)]

    # seek_walk is synchronous: ask each question first, then walk over the answers
    pos = 0
    while pos < len(raw):
        data = await ask(pos, True)
        if data is None:
            break
        pos = await ask(data, False)
    runs = seek_walk(len(raw), lambda p, d: answers[(p, d)])
    want = [(e.start, e.end, e.kind) for e in qemu_map(tmp_path / "dst.qcow2")]
    assert runs == want and any(kind == "zero" for *_, kind in runs)
    with pytest.raises(pyfuse3.FUSEError) as e:  # past the end: ENXIO, as lseek(2) says
        await ops.lseek(info.fh, len(raw), os.SEEK_DATA)
    assert e.value.errno == errno.ENXIO
    await ops.release(info.fh)
    # images/<id> (the stored object) is data from start to end
    stored_info = await ops.open((await ops.lookup(pyfuse3.ROOT_INODE + 1, b"img")).st_ino, 0)
    assert await ops.lseek(stored_info.fh, 5, os.SEEK_DATA) == 5
    assert await ops.lseek(stored_info.fh, 5, os.SEEK_HOLE) == len(stored)
    await ops.release(stored_info.fh)


async def test_one_4k_read_of_a_fresh_disk_fetches_its_tables_and_one_cluster_not_a_chunk(world, tmp_path):
    """A random reader's first 4 KiB of a decoded disk: the header and L1 (read at open), one L2 table
    and the one cluster holding the block, small verified-block reads of the stored object, never a
    whole chunk; a range the image never wrote fetches nothing at all."""
    s3, add, ops = world
    raw = raw_disk(48 * MiB, 6)
    stored = qcow2_of(tmp_path, raw, "-o", "cluster_size=65536")
    await add("img", stored, "qcow2")
    attr = await ops.lookup(RAW, b"img")
    info = await ops.open(attr.st_ino, 0)
    opened = s3.read_bytes  # the header and the L1 table (small reads next to each other grow: 64 KiB, 128...)
    assert opened <= 4 * 64 * 1024, f"opening fetched {opened} bytes"
    assert bytes(await ops.read(info.fh, 24 * MiB, 4096)) == bytes(4096)  # never written: no fetch
    assert s3.read_bytes == opened
    off = 100 * 1024
    assert bytes(await ops.read(info.fh, off, 4096)) == raw[off : off + 4096]
    # its L2 table and its cluster, 64 KiB each; the reader's small fetches grow when they land next to
    # the one before (its heuristic for random readers that are nearly sequential): at most 256 KiB
    fetched = s3.read_bytes - opened
    assert 2 * 64 * 1024 <= fetched <= 4 * 64 * 1024, f"one 4 KiB read fetched {fetched} bytes (a chunk is {MiB})"
    await ops.release(info.fh)


def reversed_layout(tmp_path, size: int) -> tuple[bytes, bytes]:
    """A qcow2 whose clusters were written last to first, so the stored object holds them in the reverse
    of their order on the disk (a guest filling a disk from its end); and its raw disk, by qemu-img."""
    path, raw = tmp_path / "rev.qcow2", tmp_path / "rev.raw"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), str(size)], check=True)
    cluster = 65536
    writes = [f"write -q -P {(i * 7) % 251 + 1} {i * cluster} {cluster}" for i in reversed(range(size // cluster))]
    args = [a for c in writes for a in ("-c", c)]
    subprocess.run([shutil.which("qemu-io"), "-f", "qcow2", *args, str(path)], check=True, capture_output=True)
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True)
    return path.read_bytes(), raw.read_bytes()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
async def test_a_sequential_reader_prefetches_the_host_ranges_whatever_the_layout(world, tmp_path):
    """Read in order, a disk whose clusters are stored last to first is fetched in runs of whole chunks
    found from its L2 tables ahead of the reader, not as hundreds of small reads going backwards."""
    s3, add, ops = world
    stored, raw = reversed_layout(tmp_path, 16 * MiB)
    await add("rev", stored, "qcow2")
    attr = await ops.lookup(RAW, b"rev")
    assert await read_all(ops, attr.st_ino, len(raw)) == raw
    reads = sum(s3.reads.values())
    assert s3.read_bytes <= 1.02 * len(stored), f"{s3.read_bytes} of {len(stored)} stored bytes fetched"
    # 17 chunks of 1 MiB: a few small reads (header, tables, the first reads), then runs of chunks
    assert reads <= 30, f"{reads} reads of the store for a {len(stored)}-byte image"


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
async def test_two_sequential_readers_of_one_disk_each_get_their_prefetch(world, tmp_path):
    """Readers of one decoded disk share its decoder; each is sequential on its own, interleaved or not."""
    s3, add, ops = world
    stored, raw = reversed_layout(tmp_path, 16 * MiB)
    await add("rev", stored, "qcow2")
    attr = await ops.lookup(RAW, b"rev")
    a, b = await ops.open(attr.st_ino, 0), await ops.open(attr.st_ino, 0)
    half, bs = len(raw) // 2, 128 * 1024
    got_a, got_b = bytearray(), bytearray()
    for off in range(0, half, bs):  # one from the start, one from the middle, in turn
        got_a += await ops.read(a.fh, off, bs)
        got_b += await ops.read(b.fh, half + off, bs)
    await ops.release(a.fh)
    await ops.release(b.fh)
    assert bytes(got_a) == raw[:half] and bytes(got_b) == raw[half:]
    reads = sum(s3.reads.values())
    assert s3.read_bytes <= 1.02 * len(stored) and reads <= 40, f"{reads} reads, {s3.read_bytes} bytes"


def vhd_of(tmp_path, raw: bytes, *options: str) -> tuple[bytes, bytes]:
    """A VHD of ``raw`` made by qemu-img, and the raw disk qemu-img reads back from it (the oracle)."""
    src, dst, back = tmp_path / "src.raw", tmp_path / "dst.vhd", tmp_path / "back.raw"
    src.write_bytes(raw)
    subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "vpc", *options, str(src), str(dst)], check=True)
    subprocess.run([QEMU_IMG, "convert", "-f", "vpc", "-O", "raw", str(dst), str(back)], check=True)
    return dst.read_bytes(), back.read_bytes()


@pytest.mark.parametrize("options", [("-o", "subformat=fixed"), ("-o", "subformat=fixed,force_size=on")],
                         ids=["sized-by-geometry", "sized-by-current-size"])
async def test_a_fixed_vhd_is_the_bytes_before_its_footer_as_qemu_reads_them(world, tmp_path, options):
    s3, add, ops = world
    stored, want = vhd_of(tmp_path, raw_disk(5 * MiB + 4096, 7), *options)
    assert stored[-512:-504] == b"conectix" and len(stored) > len(want)
    await add("vhd", stored, "vhd")
    attr = await ops.lookup(RAW, b"vhd")
    assert attr.st_size == len(want)
    assert await read_all(ops, attr.st_ino, len(want)) == want  # never a byte of the footer
    info = await ops.open(attr.st_ino, 0)
    assert await ops.read(info.fh, len(want) - 10, 4096) == want[-10:]  # short only at the disk's end
    await ops.release(info.fh)
    xattr = await ops.getxattr(attr.st_ino, b"user.imgfs.decoded_from")
    assert xattr == b"vhd"


def _resum(footer: bytearray) -> bytes:
    footer[64:68] = bytes(4)
    footer[64:68] = ((~sum(footer)) & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(footer)


@pytest.mark.parametrize("what", ["dynamic", "checksum", "larger than the file", "no footer"])
async def test_a_vhd_that_is_not_a_sound_fixed_one_is_not_offered(world, tmp_path, what, caplog):
    s3, add, ops = world
    raw = raw_disk(3 * MiB, 8)
    stored, _ = vhd_of(tmp_path, raw, "-o", "subformat=dynamic" if what == "dynamic" else "subformat=fixed,force_size=on")
    body = bytearray(stored)
    footer = bytearray(body[-512:])
    if what == "checksum":
        footer[48] ^= 1  # the size changed behind the checksum's back
        body[-512:] = footer
    elif what == "larger than the file":
        footer[48:56] = (len(raw) + 1024).to_bytes(8, "big")
        body[-512:] = _resum(footer)
    elif what == "no footer":
        body = body[:-512]
    await add("bad", bytes(body), "vhd")
    with caplog.at_level(logging.WARNING):
        with pytest.raises(pyfuse3.FUSEError) as got:
            await ops.lookup(RAW, b"bad")
    assert got.value.errno == errno.ENOENT
    said = [r.getMessage() for r in caplog.records if "not offered" in r.getMessage()]
    assert len(said) == 1 and "(vhd)" in said[0], said
    expect = {"dynamic": "dynamic VHD", "checksum": "checksum", "larger than the file": "the file holds",
              "no footer": "no footer"}[what]
    assert expect in said[0], said[0]
    assert "bad" not in await listing(ops, RAW)
    images = await ops.lookup(pyfuse3.ROOT_INODE + 1, b"bad")  # the stored bytes stay served as they are
    assert await read_all(ops, images.st_ino, len(body)) == bytes(body)
