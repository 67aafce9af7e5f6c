"""The chunk cache: verified chunks on local disk, with a small in-memory tier in front.

Plain storage that can never fail a read: a miss, a corrupt or vanished file, a full or unwritable disk
all end as "not cached" (and a log line), and the reader goes to the store.

On disk, each chunk is one file ``chunks/<image tag>/<version tag>.<chunk size>.<index>`` holding a header
(magic, key length, data length, block size), the full key as JSON (so a hash collision of the tags can
never serve another image's bytes), one xxh3-64 per 64 KiB block of data, zeros up to the next 4 KiB,
then the data (files an older imgfs wrote, with the data right after the digests, are read as they
are). Per-block digests let a 4 KiB random read load and verify 64 KiB instead of the whole chunk (measured with
whole-chunk digests: ~250 random 4 KiB reads/s from a warm cache). Fills are atomic: written to ``tmp/``, then
renamed, so no reader ever sees a half-written chunk. They are not fsynced: every read from disk
re-checks length, key and xxh3, so what a power cut could leave behind (an empty or partial file) is
detected and dropped like any corruption, and an fsync per chunk halved fill throughput here (measured:
0.9 vs 1.8 GB/s).
Fills are written with O_DIRECT where the file system takes it (a few reused, aligned buffers; the
4 KiB-aligned data is why): a chunk a reader already holds in memory need not be copied into new
page-cache pages as well. On this VM those pages cost 0.3 to 3.4 CPU seconds per GiB written,
depending on whether the kernel has free pages at hand or must get them back from the hypervisor
(`bench/fill_cost.py`); in a 16-node fleet they were the largest single cost (18% of all CPU), and a
warm took 1.8-2.2 CPU-s/GiB with O_DIRECT against 4.2-4.7. On any node they would also evict what the
host caches for its VMs. Where O_DIRECT is refused (EINVAL: a file system without it), fills are
buffered writes, said once in the log and in status.
The directory *is* the index: a restart rescans it (file mtimes give the LRU order, refreshed on every
hit), so there is no separate index file that could disagree with the data.

All bookkeeping runs on the trio loop; worker threads only move bytes between memory and files.

A hit whose pages the kernel holds costs no thread hop: the chunk's file stays open (a bounded LRU of
descriptors, closed when the chunk goes) and the trio thread reads it with ``preadv(RWF_NOWAIT)``, which
returns at once or says it would block; only then does a worker thread read it (from a dup of the
descriptor, so an eviction meanwhile cannot hand the worker another file). Every byte read from the
cache disk is checked against its block's xxh3 on every read, on either path.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
from typing import Any
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import trio
import xxhash

from .buffers import ReceivePool
from .model import ChunkKey
from .ratelimit import RateLimit
from .workers import Workers

log = logging.getLogger(__name__)

_MAGIC = b"IMGFSCK3"  # the data at a 4 KiB-aligned offset
_MAGIC_UNALIGNED = b"IMGFSCK2"  # the data right after the digests (older imgfs): still read
_HEADER = struct.Struct("<8sIQI")  # magic, key length, data length, block size; then key, digests, data
ALIGN = 4096  # O_DIRECT: file offsets, lengths and memory aligned to the largest logical block size
_DIRECT_PIECE = 1 << 20  # bytes per O_DIRECT write: the size of each reused aligned buffer
_KEY_LEN = struct.Struct("<I")  # the key length alone, at offset 8
BLOCK = 64 * 1024
_CORRUPT = object()
# Open chunk files kept for hits (each pins an inode, no memory to speak of); bounded by RLIMIT_NOFILE too.
OPEN_FILES = 1024
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def data_offset(key_len: int, length: int, aligned: bool = True) -> int:
    """Where a chunk file's data starts: after the header, the key and one digest per block (rounded up
    to ALIGN in the current format)."""
    n = _HEADER.size + key_len + 8 * -(-length // BLOCK)
    return -(-n // ALIGN) * ALIGN if aligned else n


def _image_tag(store: str, image_id: str) -> str:
    return xxhash.xxh3_128_hexdigest(f"{store}\0{image_id}".encode())


def _version_tag(version: str) -> str:
    return xxhash.xxh3_64_hexdigest(version.encode())


def _key_bytes(key: ChunkKey) -> bytes:
    return json.dumps([key.store, key.image_id, key.version, key.chunk_size, key.index]).encode()


@dataclass
class CacheStats:
    hits: int = 0
    loop_hits: int = 0  # of the hits: read from the page cache on the event loop, no thread hop
    memory_hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    fills: int = 0
    fill_failures: int = 0
    direct_fills: int = 0  # of the fills: written with O_DIRECT


@dataclass(slots=True)
class _Entry:
    size: int
    ready: bool  # False while its fill is being written: counted against the limits, never read


class ChunkCache:
    def __init__(self, root: str, *, max_bytes: int, max_count: int, memory_bytes: int, io_threads: int = 8,
                 direct_writes: bool = True, workers: Workers | None = None) -> None:
        self.root = root
        # the threads a read or fill of a chunk file runs in (the daemon's, shared with the fetches)
        self.workers = workers if workers is not None else Workers()
        self.chunks_dir = os.path.join(root, "chunks")
        self.tmp_dir = os.path.join(root, "tmp")
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.memory_bytes = memory_bytes
        self.stats = CacheStats()
        self.disk_ok = False
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # relative path -> entry, LRU first
        self._by_image: dict[str, set[str]] = {}
        self._kinds: dict[str, int] = {}  # "<image>/<version>.<chunk size>" -> how many entries
        self._bytes = 0
        self._heads: OrderedDict[str, bytes] = OrderedDict()  # rel -> verified header + digest table (no padding)
        self._pinned: dict[str, tuple[str, str]] = {}  # image tag -> (store, image id): never evicted
        self.pins_path = os.path.join(root, "pinned.json")
        self._memory: OrderedDict[ChunkKey, memoryview] = OrderedDict()
        self._memory_used = 0  # bytes of the distinct buffers the tier keeps alive
        self._held: dict[int, list[Any]] = {}  # id(buffer) -> [buffer, how many kept chunks slice it]
        self._limiter = trio.CapacityLimiter(io_threads)
        self._fds: OrderedDict[str, int] = OrderedDict()  # rel -> open O_RDONLY descriptor, LRU first
        self.max_open = _open_files_limit()
        self.nowait = bool(_NOWAIT)  # False: every hit reads in a worker thread (tests flip it)
        self._buffers = _Buffers()
        # Fills with O_DIRECT until the file system refuses it; then why, for status and one log line.
        self.direct = _DirectWrites()
        if not direct_writes:
            self.direct.enabled, self.direct.refused = False, "cache_direct_writes = false"
        self._warn = RateLimit(60.0)
        self._evicted_since_log = 0

    # ---- startup -------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directories and index what a previous run left (never fails: a broken cache dir
        means running without a disk cache, said once in the log)."""
        try:
            found = await trio.to_thread.run_sync(self._scan)
        except OSError as e:
            log.error(
                "cache directory %s is unusable (%s); serving without a disk cache -- fix its permissions or "
                "cache_dir",
                self.root,
                os.strerror(e.errno or errno.EIO),
            )
            return
        for rel, size, _mtime in sorted(found, key=lambda f: f[2]):
            self._add(rel, size, ready=True)
        self._pinned = await trio.to_thread.run_sync(self._load_pins)
        self.disk_ok = True
        victims = self._make_room(0)
        await self._unlink(victims)
        log.info(
            "cache %s: %d chunks, %.1f MiB of %.1f MiB (limit %d chunks)",
            self.root, len(self._entries), self._bytes / 2**20, self.max_bytes / 2**20, self.max_count,
        )

    def _load_pins(self) -> dict[str, tuple[str, str]]:
        try:
            with open(self.pins_path) as f:
                pins = json.load(f)
            # anything but [store, image id] string pairs would break sorting the pins later
            if not isinstance(pins, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pins
            ):
                raise TypeError("not a list of [store, image id] pairs")
            return {_image_tag(store, image_id): (store, image_id) for store, image_id in pins}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError):
            log.warning("cache: %s is unreadable; starting with no pinned images", self.pins_path)
            return {}

    async def pin(self, store: str, image_id: str, pinned: bool = True) -> None:
        """Keep (or stop keeping) an image's chunks from eviction; remembered across restarts."""
        tag = _image_tag(store, image_id)
        if pinned:
            self._pinned[tag] = (store, image_id)
        else:
            self._pinned.pop(tag, None)
        pins = sorted(self._pinned.values())

        def save() -> None:
            tmp = self.pins_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(pins, f)
            os.rename(tmp, self.pins_path)

        try:
            await trio.to_thread.run_sync(save)
        except OSError as e:  # the pin holds in memory; only remembering it across a restart failed
            log.warning("cache: cannot save %s (%s); pins hold until the daemon stops", self.pins_path,
                        os.strerror(e.errno or errno.EIO))

    @property
    def pinned(self) -> list[tuple[str, str]]:
        return sorted(self._pinned.values())

    def _scan(self) -> list[tuple[str, int, float]]:
        os.makedirs(self.chunks_dir, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # fills a crash interrupted: never renamed, never valid
        os.makedirs(self.tmp_dir, exist_ok=True)
        probe = os.path.join(self.tmp_dir, ".probe")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
        found = []
        for image_dir in os.scandir(self.chunks_dir):
            if not image_dir.is_dir(follow_symlinks=False):
                _unlink_quiet(image_dir.path)
                continue
            for f in os.scandir(image_dir.path):
                parts = f.name.split(".")
                try:
                    st = f.stat(follow_symlinks=False)
                    ok = len(parts) == 3 and all(parts) and parts[1].isdigit() and parts[2].isdigit() and f.is_file(follow_symlinks=False)
                except OSError:
                    continue
                if ok:
                    found.append((f"{image_dir.name}/{f.name}", st.st_size, st.st_mtime))
                else:
                    _unlink_quiet(f.path)
        return found

    # ---- bookkeeping (trio loop only) ---------------------------------------------------------------

    @staticmethod
    @lru_cache(maxsize=65536)  # asked several times per kernel read; two hashes and a format each
    def _rel(key: ChunkKey) -> str:
        return f"{_image_tag(key.store, key.image_id)}/{_version_tag(key.version)}.{key.chunk_size}.{key.index}"

    def _add(self, rel: str, size: int, *, ready: bool) -> None:
        if rel not in self._entries:
            kind = rel.rpartition(".")[0]
            self._kinds[kind] = self._kinds.get(kind, 0) + 1
        self._entries[rel] = _Entry(size, ready)
        self._by_image.setdefault(rel.partition("/")[0], set()).add(rel)
        self._bytes += size

    def _remove(self, rel: str) -> None:
        self._heads.pop(rel, None)
        self._close(rel)
        entry = self._entries.pop(rel, None)
        if entry is None:
            return
        kind = rel.rpartition(".")[0]
        if self._kinds.get(kind, 0) > 1:
            self._kinds[kind] -= 1
        else:
            self._kinds.pop(kind, None)
        self._bytes -= entry.size
        tag = rel.partition("/")[0]
        names = self._by_image.get(tag)
        if names is not None:
            names.discard(rel)
            if not names:
                del self._by_image[tag]

    def _make_room(self, size: int) -> list[str]:
        """Evict least recently used ready chunks until ``size`` more bytes (and one more chunk) fit."""
        over_bytes = self._bytes + size - self.max_bytes
        over_count = len(self._entries) + (1 if size else 0) - self.max_count
        if over_bytes <= 0 and over_count <= 0:
            return []
        victims = []
        for rel, entry in self._entries.items():
            if over_bytes <= 0 and over_count <= 0:
                break
            if entry.ready and rel.partition("/")[0] not in self._pinned:
                victims.append(rel)
                over_bytes -= entry.size
                over_count -= 1
        for rel in victims:
            self._remove(rel)
        self.stats.evictions += len(victims)
        self._evicted_since_log += len(victims)
        if self._evicted_since_log and self._warn.allow("evicted"):  # a summary a minute, not a line per chunk
            log.info("cache: evicted %d least recently used chunks to stay within %.1f GiB / %d chunks",
                     self._evicted_since_log, self.max_bytes / 2**30, self.max_count)
            self._evicted_since_log = 0
        return victims

    def _close(self, rel: str) -> None:
        fd = self._fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close the chunk files kept open for hits (at shutdown; the cache stays as it is on disk)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _remember_head(self, rel: str, head: bytes) -> None:
        self._heads[rel] = head
        if len(self._heads) > 4096:  # ~1 KiB each for 8 MiB chunks
            self._heads.popitem(last=False)

    def _keep_open(self, rel: str, fd: int) -> None:
        if rel in self._fds or rel not in self._entries:  # raced with another reader, or removed meanwhile
            os.close(fd)
            return
        self._fds[rel] = fd
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])

    async def _unlink(self, rels: list[str]) -> None:
        if rels:
            paths = [os.path.join(self.chunks_dir, rel) for rel in rels]
            async with self._limiter:
                await trio.to_thread.run_sync(_unlink_all, paths)

    # ---- the memory tier ----------------------------------------------------------------------------

    def get_memory(self, key: ChunkKey) -> memoryview | None:
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
        return data

    def remember(self, key: ChunkKey, data: bytes | memoryview) -> None:
        """Keep a chunk in memory. A chunk may be a slice of a larger buffer (one GET for a run of
        chunks): the tier counts each buffer it keeps alive once, at its whole size, for as long as any
        slice of it is kept, so ``memory_cache_mb`` bounds what the tier really holds."""
        view = memoryview(data)
        base = view.obj if view.obj is not None else view
        size = memoryview(base).nbytes
        if size > self.memory_bytes:
            return
        self._forget(key)
        held = self._held.get(id(base))
        if held is None:
            self._held[id(base)] = [base, 1]
            self._memory_used += size
        else:
            held[1] += 1
        self._memory[key] = view
        while self._memory_used > self.memory_bytes and self._memory:
            self._forget(next(iter(self._memory)))

    def _forget(self, key: ChunkKey) -> None:
        view = self._memory.pop(key, None)
        if view is None:
            return
        base = view.obj if view.obj is not None else view
        held = self._held[id(base)]
        held[1] -= 1
        if held[1] == 0:
            del self._held[id(base)]
            self._memory_used -= memoryview(base).nbytes

    # ---- the public interface -----------------------------------------------------------------------

    def holds_any(self, store: str, image_id: str, version: str, chunk_size: int) -> bool:
        """Whether any entry of this version of the image, of this chunk size, is cached or being filled
        (a dict lookup: asked before every chunk fetch)."""
        return f"{_image_tag(store, image_id)}/{_version_tag(version)}.{chunk_size}" in self._kinds

    def contains(self, key: ChunkKey) -> bool:
        if key in self._memory:
            return True
        entry = self._entries.get(self._rel(key))
        return entry is not None and entry.ready

    async def read(self, key: ChunkKey, start: int, end: int, length: int) -> memoryview | None:
        """Verified bytes [start, end) of a chunk whose full length is ``length``, from memory or disk;
        None on a miss or a bad file (which is then deleted)."""
        data = self.get_memory(key)
        if data is not None:
            return data[start:end] if data.nbytes == length else None
        rel = self._rel(key)
        entry = self._entries.get(rel)
        if entry is None or not entry.ready:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(rel)
        head = self._heads.get(rel)
        fd = self._fds.get(rel)
        result: Any = None
        if head is not None and fd is not None:
            self._fds.move_to_end(rel)
            if self.nowait:  # resident pages: read and verify right here, no thread hop
                result = _read_blocks(fd, head, start, end, length, _NOWAIT, self._buffers)
                if result is not _WOULD_BLOCK:
                    self.stats.loop_hits += result is not _CORRUPT
                    return self._served(key, rel, entry, result)
            mine = os.dup(fd)  # the worker's own: an eviction meanwhile closes ours, not its
            async with self._limiter:
                result = await self.workers.run(_read_dup, mine, head, start, end, length)
            return self._served(key, rel, entry, result)
        path = os.path.join(self.chunks_dir, rel)
        async with self._limiter:
            result = await self.workers.run(_open_verified, path, _key_bytes(key), start, end, length)
        if isinstance(result, tuple):
            result, head, fd = result
            self._remember_head(rel, head)
            self._keep_open(rel, fd)
        return self._served(key, rel, entry, result)

    def _served(self, key: ChunkKey, rel: str, entry: _Entry, result: Any) -> memoryview | None:
        if result is None or result is _CORRUPT:
            ours = self._entries.get(rel) is entry  # not a fill of the same chunk made meanwhile
            if ours:
                self._remove(rel)
            if result is _CORRUPT:
                self.stats.corrupt += 1
                log.warning("cache: chunk %d of image %s failed verification; dropped it, refetching", key.index, key.image_id)
                if ours:
                    _unlink_quiet(os.path.join(self.chunks_dir, rel))  # one unlink, rare: on the loop
            elif self._warn.allow("vanished"):
                log.warning("cache: chunk %d of image %s vanished from %s (removed behind imgfs's back?); refetching; "
                            "use 'imgfs evict' to drop cached images", key.index, key.image_id, self.chunks_dir)
            self.stats.misses += 1
            return None
        assert isinstance(result, memoryview)
        self.stats.hits += 1
        return result

    async def get(self, key: ChunkKey, length: int) -> memoryview | None:
        """The whole chunk, verified (see ``read``)."""
        return await self.read(key, 0, length, length)

    async def willneed(self, key: ChunkKey, length: int) -> None:
        """Have the kernel read an on-disk chunk ahead into the page cache: the prefetch of a warm chunk,
        costing no memory of ours (the read that follows still verifies it). The chunk file is opened
        and its header checked here, and kept open, so the reads that follow start on the event loop
        (measured: after a restart, 418 of 1024 warm 1 MiB reads stayed on the loop when the first read
        of each chunk opened it; 890 when the file was already open)."""
        rel = self._rel(key)
        entry = self._entries.get(rel)
        if entry is None or not entry.ready:
            return
        fd = self._fds.get(rel)
        if fd is not None and rel in self._heads:
            mine = os.dup(fd)
            async with self._limiter:
                await self.workers.run(_advise_dup, mine)
            return
        async with self._limiter:
            result = await self.workers.run(_open_ahead, os.path.join(self.chunks_dir, rel), _key_bytes(key), length)
        if isinstance(result, tuple):
            self._remember_head(rel, result[0])
            self._keep_open(rel, result[1])

    async def put(self, key: ChunkKey, data: bytes | memoryview, *, remember: bool = True) -> None:
        """Store a chunk; failure is logged and swallowed (the reader already has its bytes).

        ``remember=False`` keeps it out of the memory tier."""
        if remember:
            self.remember(key, data)
        if not self.disk_ok:
            return
        rel = self._rel(key)
        if rel in self._entries:
            return
        nbytes = memoryview(data).nbytes
        size = data_offset(len(_key_bytes(key)), nbytes) + nbytes
        if size > self.max_bytes:
            return
        victims = self._make_room(size)
        if self._bytes + size > self.max_bytes or len(self._entries) + 1 > self.max_count:
            await self._unlink(victims)
            self.stats.fill_failures += 1
            if self._warn.allow("pinned"):
                log.warning("cache: full of pinned images (%d MiB); serving from the store without caching -- "
                            "unpin images or raise cache_max_size_gb", self._bytes >> 20)
            return
        self._add(rel, size, ready=False)
        entry = self._entries[rel]
        await self._unlink(victims)
        try:
            async with self._limiter:
                direct = await self.workers.run(_write_atomic, self.tmp_dir, os.path.join(self.chunks_dir, rel),
                                                       _key_bytes(key), data, self.direct)
        except OSError as e:
            if self._entries.get(rel) is entry:
                self._remove(rel)
            self.stats.fill_failures += 1
            reason = os.strerror(e.errno or errno.EIO)
            if self._warn.allow(reason):
                hint = "free space or lower cache_max_size_gb" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check cache_dir"
                log.warning("cache: cannot store chunks in %s (%s); serving from the store without caching -- %s", self.root, reason, hint)
            return
        if self._entries.get(rel) is entry:
            entry.ready = True
            self.stats.fills += 1
            self.stats.direct_fills += direct
        else:
            # dropped (image invalidated) while we were writing: the file must not outlive its entry
            await self._unlink([rel])

    async def drop(self, store: str, image_id: str, keep_version: str | None = None) -> int:
        """Forget every cached chunk of one image except those of ``keep_version``; returns the count."""
        rels = self.forget(store, image_id, keep_version)
        await self._unlink(rels)
        return len(rels)

    def forget(self, store: str, image_id: str, keep_version: str | None = None) -> list[str]:
        """The part of drop() that takes effect at once: no read finds those chunks after this returns.
        Returns their files, for remove_files()."""
        keep = None if keep_version is None else _version_tag(keep_version) + "."
        rels = [r for r in self._by_image.get(_image_tag(store, image_id), ()) if keep is None or not r.partition("/")[2].startswith(keep)]
        for rel in rels:
            self._remove(rel)
        for key in [k for k in self._memory if k.store == store and k.image_id == image_id and k.version != keep_version]:
            self._forget(key)
        return rels

    async def remove_files(self, rels: list[str]) -> None:
        await self._unlink(rels)

    def cached_chunks(self, store: str, image_id: str, version: str, chunk_size: int) -> int:
        prefix = f"{_version_tag(version)}.{chunk_size}."
        return sum(
            1
            for rel in self._by_image.get(_image_tag(store, image_id), ())
            if rel.partition("/")[2].startswith(prefix) and self._entries[rel].ready
        )

    @property
    def used_bytes(self) -> int:
        return self._bytes

    @property
    def open_files(self) -> int:
        """Chunk files kept open for hits (at most ``max_open``)."""
        return len(self._fds)

    @property
    def count(self) -> int:
        return len(self._entries)


# ---- worker-thread functions: bytes and files only -------------------------------------------------


_WOULD_BLOCK = object()


class _Buffers(ReceivePool):
    """Read buffers reused on the event loop: buffers.py's pool, smaller buffers pooled too. A fresh 1 MiB
    bytearray is zero-filled and page-faulted in on every read (measured: a quarter of the daemon's CPU
    on warm sequential reads); a buffer still referred to (the reply pyfuse3 is still sending, a piece
    the end-to-end verifier holds back, a body the HTTP endpoint is writing) is never overwritten."""

    def __init__(self) -> None:
        super().__init__(kept=4, min_size=256 * 1024)


def _open_files_limit() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    return max(16, min(OPEN_FILES, soft // 4 if soft > 0 else OPEN_FILES))


def _open_header(path: str, key: bytes, length: int) -> Any:
    """Open a chunk file and check its header (magic, key, lengths): (the verified header + digest
    table, the open descriptor) for the caller to keep; None if it is gone, _CORRUPT if it is not what
    it claims."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return _CORRUPT
    try:
        aligned = data_offset(len(key), length)
        head = os.pread(fd, aligned, 0)
        # the format is the magic's: the data 4 KiB-aligned, or (an older imgfs's file) right after the digests
        data_off = aligned if head[:8] == _MAGIC else data_offset(len(key), length, False) \
            if head[:8] == _MAGIC_UNALIGNED else -1
        if data_off < 0 or len(head) < data_off or os.fstat(fd).st_size != data_off + length:
            os.close(fd)
            return _CORRUPT
        head = head[:data_offset(len(key), length, False)]  # kept per open chunk: without the padding
        _magic, key_len, data_len, block = _HEADER.unpack_from(head)
        if key_len != len(key) or data_len != length or block != BLOCK or head[_HEADER.size:_HEADER.size + key_len] != key:
            os.close(fd)
            return _CORRUPT
        return head, fd
    except BaseException:
        os.close(fd)
        raise


def _open_verified(path: str, key: bytes, start: int, end: int, length: int) -> Any:
    """Bytes [start, end) of a chunk file with its checked header and open descriptor (see
    ``_open_header``), or None / _CORRUPT."""
    try:
        opened = _open_header(path, key, length)
    except OSError:
        return _CORRUPT
    if not isinstance(opened, tuple):
        return opened
    head, fd = opened
    try:
        data = _read_blocks(fd, head, start, end, length, 0)
    except BaseException:
        os.close(fd)
        raise
    if not isinstance(data, memoryview):
        os.close(fd)
        return data
    return data, head, fd


def _open_ahead(path: str, key: bytes, length: int) -> Any:
    """``_open_header``, then have the kernel read the whole chunk into the page cache."""
    try:
        opened = _open_header(path, key, length)
        if isinstance(opened, tuple):
            os.posix_fadvise(opened[1], 0, 0, os.POSIX_FADV_WILLNEED)
        return opened
    except OSError:
        return None  # the read that follows finds out what is wrong


def _read_dup(fd: int, head: bytes, start: int, end: int, length: int) -> Any:
    try:
        return _read_blocks(fd, head, start, end, length, 0)
    finally:
        os.close(fd)


def _read_blocks(fd: int, head: bytes, start: int, end: int, length: int, flags: int,
                 buffers: _Buffers | None = None) -> Any:
    """Bytes [start, end) of an open chunk file whose header ``head`` was verified, each covering 64 KiB
    block checked against its digest: a memoryview, _CORRUPT, or (with RWF_NOWAIT in ``flags``)
    _WOULD_BLOCK when the kernel would have to go to the disk for any of them."""
    first, last = start // BLOCK, (end - 1) // BLOCK
    lo, hi = first * BLOCK, min((last + 1) * BLOCK, length)
    data_off = len(head) if head[:8] == _MAGIC_UNALIGNED else -(-len(head) // ALIGN) * ALIGN
    buf = bytearray(hi - lo) if buffers is None else buffers.get(hi - lo)
    try:
        got = os.preadv(fd, [buf], data_off + lo, flags) if flags else os.preadv(fd, [buf], data_off + lo)
    except BlockingIOError:
        return _WOULD_BLOCK
    except OSError as e:
        if flags and e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no RWF_NOWAIT on this file system
            return _WOULD_BLOCK
        return _CORRUPT
    if got != hi - lo:
        return _WOULD_BLOCK if flags else _CORRUPT  # RWF_NOWAIT: only part was resident
    key_len = _KEY_LEN.unpack_from(head, 8)[0]
    digests = struct.unpack_from(f"<{last - first + 1}Q", head, _HEADER.size + key_len + 8 * first)
    view = memoryview(buf)
    for i, digest in enumerate(digests):
        if xxhash.xxh3_64_intdigest(view[i * BLOCK : (i + 1) * BLOCK]) != digest:
            return _CORRUPT
    if start == 0:
        try:  # marks the chunk used for the LRU order the next start rebuilds (once per pass)
            os.utime(fd)
        except OSError:  # a read-only cache dir still serves what it holds
            pass
    return view[start - lo : end - lo]


def _advise_dup(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class _DirectWrites:
    """Whether fills use O_DIRECT, and the aligned buffers they copy through (mmap memory is page
    aligned; a few are reused, so their pages are faulted in once). Shared by the worker threads."""

    KEPT = 8  # buffers kept for reuse: the cache's io_threads by default

    def __init__(self) -> None:
        self.enabled = True
        self.refused: str | None = None  # why the file system refused O_DIRECT, once it did
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, _DIRECT_PIECE)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self.KEPT:
                self._free.append(buf)
                return
        buf.close()

    def refuse(self, path: str, e: OSError) -> None:
        with self._lock:
            first, self.enabled = self.enabled, False
            self.refused = self.refused or os.strerror(e.errno or errno.EINVAL)
        if first:
            log.info("cache: %s does not take O_DIRECT writes (%s); filling the cache with buffered writes",
                     os.path.dirname(path), self.refused)


def _write_atomic(tmp_dir: str, path: str, key: bytes, data: bytes | memoryview, direct: _DirectWrites) -> bool:
    """Write one chunk file under ``tmp_dir`` and rename it to ``path``; True if with O_DIRECT."""
    view = memoryview(data)
    digests = [xxhash.xxh3_64_intdigest(view[i : i + BLOCK]) for i in range(0, view.nbytes, BLOCK)]
    header = _HEADER.pack(_MAGIC, len(key), view.nbytes, BLOCK) + key + struct.pack(f"<{len(digests)}Q", *digests)
    header += bytes(data_offset(len(key), view.nbytes) - len(header))
    tmp = os.path.join(tmp_dir, f"{os.getpid()}-{time.monotonic_ns()}-{os.path.basename(path)}")
    try:
        written = direct.enabled and _write_direct(tmp, header, view, direct)
        if not written:
            with open(tmp, "wb", buffering=0) as f:
                for part in (header, view):
                    part = memoryview(part)
                    while part.nbytes:
                        part = part[f.write(part):]
        for attempt in (1, 2):  # an eviction may remove the image's emptied directory between the two calls
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.rename(tmp, path)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return written


def _write_direct(tmp: str, header: bytes, data: memoryview, direct: _DirectWrites) -> bool:
    """``header`` (ALIGN-sized) then ``data``, with O_DIRECT, through an aligned buffer: False (and
    nothing left behind) if the file system refuses it. The last piece is padded to ALIGN and the
    file cut back to its length."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        direct.refuse(tmp, e)
        return False
    buf = direct.take()
    mv = memoryview(buf)
    try:
        size, filled = len(header) + data.nbytes, 0
        for part in (memoryview(header), data):
            while part.nbytes:
                n = min(part.nbytes, _DIRECT_PIECE - filled)
                mv[filled:filled + n] = part[:n]
                filled, part = filled + n, part[n:]
                if filled == _DIRECT_PIECE:
                    _write_all(fd, mv)
                    filled = 0
        if filled:
            padded = -(-filled // ALIGN) * ALIGN
            mv[filled:padded] = bytes(padded - filled)
            _write_all(fd, mv[:padded])
            os.ftruncate(fd, size)
        return True
    except OSError as e:
        os.close(fd)
        fd = -1
        _unlink_quiet(tmp)
        if e.errno != errno.EINVAL:
            raise
        direct.refuse(tmp, e)  # opened, but the writes refused (an alignment the device wants larger)
        return False
    finally:
        if fd >= 0:
            os.close(fd)
        mv.release()
        direct.give(buf)


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        view = view[os.write(fd, view):]


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        _unlink_quiet(path)
        try:
            os.rmdir(os.path.dirname(path))  # the image's directory, once empty
        except OSError:
            pass
