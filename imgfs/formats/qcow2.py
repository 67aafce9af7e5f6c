"""A read-only qcow2 (v2 and v3) decoder: the virtual disk's bytes, holes and host ranges.

Self-contained format layer: it knows nothing of FUSE, HTTP or stores. The caller hands ``open`` an
async ``read(offset, length)`` over the *stored object* (the .qcow2 file's bytes, already verified by
whatever sits below) and its size. Only the header, the active L1 table and L2 tables are read;
refcounts, snapshots, bitmaps and most header extensions are never looked at (reads do not need them).

Everything in the image is attacker-controlled, so every field is checked before it is used
(qemu's qcow2_do_open and qcow2_get_host_offset, and the CVEs fixed there, are the model):
a malformed image raises ``Qcow2Error`` for the range it breaks, and memory, fetch sizes and inflate
output stay bounded by ``Limits`` whatever the image says.

Refused at open, each with a one-line message. ``Qcow2Unsupported`` (EOPNOTSUPP: a valid image using a
feature we do not serve) for all but the corrupt bit and malformed fields, which are ``Qcow2Error`` (EIO):
  * backing file            -- unallocated clusters would read from a host path named by the image
  * external data file      -- the data itself lives at a host path (CVE-2024-32498)
  * encryption              -- needs a key; we only serve the stored bytes
  * corrupt bit             -- qemu itself marked the metadata inconsistent
  * extended L2, unknown incompatible bits, unknown compression type -- not implemented (Qcow2Unsupported)
Accepted: the dirty bit (it only says refcounts may be stale; reads never use refcounts, so the guest
view is still exact), lazy refcounts, bitmaps, snapshots (the active L1 is what qemu presents).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import trio

from ..errors import ImgfsError, ShortRead
from .errors import FormatError, FormatUnsupported
from .inflate import InflateError, inflate_zlib, inflate_zstd
from .lru import LoadingCache

log = logging.getLogger(__name__)

# Returns bytes-like (bytes, bytearray or memoryview): the decoder copies what it keeps.
ReadFn = Callable[[int, int], Awaitable[bytes | bytearray | memoryview]]
# Gives a bytearray of the size asked, its content undefined (the decoder writes every byte of it).
AllocFn = Callable[[int], bytearray]

# Copied into the parts of a read that are zero or unallocated when its buffer was not made zeroed.
_ZEROS = memoryview(bytes(1 << 20))  # sliced without a copy


class Qcow2Error(FormatError):
    """The image is not a qcow2 we can decode correctly (malformed, or marked corrupt)."""


class Qcow2Unsupported(Qcow2Error, FormatUnsupported):
    """A valid qcow2 feature imgfs deliberately does not serve (backing file, encryption, ...)."""


@dataclass(frozen=True)
class Limits:
    """Resource bounds for one open image. Defaults fit every image qemu itself opens."""

    # Cluster 0 is read once for the header and its extensions. qemu-img writes a few dozen bytes of
    # extensions; 64 KiB covers the default cluster and keeps a 2 MiB-cluster image from costing 2 MiB.
    max_header_bytes: int = 64 << 10
    # qemu's QCOW_MAX_L1_SIZE (32 MiB = 4 Mi entries): with 64 KiB clusters that maps 2 PiB, with 512 B
    # clusters 128 GiB. The L1 is kept in memory as bytes (not a Python list) for the image's life.
    max_l1_bytes: int = 32 << 20
    min_cluster_bits: int = 9   # the spec's minimum (512 B)
    max_cluster_bits: int = 21  # qemu's maximum (2 MiB); bigger clusters make each fetch/inflate huge
    # Virtual sizes beyond this are refused: a sanity cap, far above any cloud image (64 TiB).
    max_virtual_size: int = 64 << 40
    # One L2 table is one cluster and maps cluster_size**2/8 bytes (512 MiB at 64 KiB clusters), so
    # 4 MiB holds 64 tables = 32 GiB of disk at the default cluster size. At least one is always kept.
    l2_cache_bytes: int = 4 << 20
    # Inflated clusters: FUSE reads of 128 KiB over 64 KiB clusters, and readahead, revisit the
    # cluster just inflated; 8 MiB = 128 default clusters, or 4 of the largest.
    cluster_cache_bytes: int = 8 << 20
    # Concurrent inflates in worker threads (zlib and zstd release the GIL). qemu uses 4; 2 keeps one
    # image from taking every core of a small host. One limiter passed to every ``open`` bounds all
    # open images together.
    inflate_concurrency: int = 2
    # Clusters this small inflate on the trio thread: a thread hop costs more than inflating 4 KiB.
    inline_inflate_max: int = 4096


Kind = Literal["data", "zero"]


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    kind: Kind  # "data" (standard or compressed) or "zero" (unallocated, or the v3 zero flag)

    @property
    def end(self) -> int:
        return self.start + self.length


# Cluster descriptor kinds after validation.
_ZERO, _DATA, _COMPRESSED = 0, 1, 2

_L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00     # bits 9..55
_L1_RESERVED = 0x7F000000000001FF        # bits 0..8 and 56..62
_L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00     # standard: bits 9..55
_L2_STD_RESERVED = 0x3F000000000001FE    # standard: bits 1..8 and 56..61
_L2_COMPRESSED = 1 << 62
_L2_ZERO = 1

_INCOMPAT_DIRTY, _INCOMPAT_CORRUPT, _INCOMPAT_DATA_FILE = 1, 2, 4
_INCOMPAT_COMPRESSION, _INCOMPAT_EXTL2 = 8, 16
_INCOMPAT_KNOWN = 0x1F

_EXT_END, _EXT_DATA_FILE = 0, 0x44415441
_MAGIC = b"QFI\xfb"
_COMPRESSION = {0: "zlib", 1: "zstd"}


@dataclass(frozen=True)
class _Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    incompatible: int
    compression: str


def _parse_header(buf: bytes, file_size: int, limits: Limits) -> _Header:
    if len(buf) < 72 or buf[:4] != _MAGIC:
        raise Qcow2Error("qcow2: bad magic (not a qcow2 image)")
    (version, backing_offset, _backing_len, cluster_bits, size, crypt, l1_size, l1_offset) = struct.unpack_from(
        ">IQIIQIIQ", buf, 4)
    if version not in (2, 3):
        raise Qcow2Unsupported(f"qcow2: version {version} (supported: 2 and 3)")
    if not limits.min_cluster_bits <= cluster_bits <= limits.max_cluster_bits:
        raise Qcow2Error(
            f"qcow2: cluster_bits {cluster_bits} out of range {limits.min_cluster_bits}..{limits.max_cluster_bits}")
    cluster_size = 1 << cluster_bits
    incompatible, header_length, compression_type = 0, 72, 0
    if version == 3:
        if len(buf) < 104:
            raise Qcow2Error("qcow2: v3 header truncated")
        incompatible, _compat, _autoclear, refcount_order, header_length = struct.unpack_from(">QQQII", buf, 72)
        if refcount_order > 6:  # reads never use refcounts, but qemu refuses this, so the image is bad
            raise Qcow2Error(f"qcow2: refcount_order {refcount_order} invalid (max 6)")
        if header_length < 104 or header_length % 8 or header_length > cluster_size:
            raise Qcow2Error(f"qcow2: header_length {header_length} invalid (needs 104..cluster size, multiple of 8)")
        if header_length > 104:
            if len(buf) < 105:
                raise Qcow2Error("qcow2: header truncated")
            compression_type = buf[104]
    if backing_offset != 0:
        raise Qcow2Unsupported("qcow2: backing file set (not supported: imgfs serves self-contained images only)")
    if crypt != 0:
        raise Qcow2Unsupported(f"qcow2: encrypted (crypt_method {crypt}; imgfs serves unencrypted images only)")
    if incompatible & _INCOMPAT_CORRUPT:
        raise Qcow2Error("qcow2: image is marked corrupt (run qemu-img check -r all on a copy)")
    if incompatible & _INCOMPAT_DATA_FILE:
        raise Qcow2Unsupported("qcow2: external data file (not supported: data would live outside the image)")
    if incompatible & _INCOMPAT_EXTL2:
        raise Qcow2Unsupported("qcow2: extended L2 entries / subclusters (not supported)")
    if incompatible & ~_INCOMPAT_KNOWN:
        raise Qcow2Unsupported(f"qcow2: unknown incompatible feature bits {incompatible & ~_INCOMPAT_KNOWN:#x}")
    if compression_type not in _COMPRESSION:
        raise Qcow2Unsupported(f"qcow2: unknown compression type {compression_type}")
    if bool(compression_type) != bool(incompatible & _INCOMPAT_COMPRESSION):
        raise Qcow2Error(
            f"qcow2: compression type {compression_type} inconsistent with the compression feature bit")
    if size > limits.max_virtual_size:
        raise Qcow2Error(f"qcow2: virtual size {size} exceeds the limit {limits.max_virtual_size}")
    l2_entries = cluster_size // 8
    needed = -(-size // (cluster_size * l2_entries))
    if l1_size < needed:
        raise Qcow2Error(f"qcow2: L1 table too small ({l1_size} entries, virtual size needs {needed})")
    if l1_size * 8 > limits.max_l1_bytes:
        raise Qcow2Error(f"qcow2: L1 table too large ({l1_size} entries, limit {limits.max_l1_bytes // 8})")
    if needed:
        if l1_offset % cluster_size or l1_offset < cluster_size:
            raise Qcow2Error(f"qcow2: L1 table offset {l1_offset:#x} not cluster-aligned or inside the header")
        if l1_offset + l1_size * 8 > file_size:
            raise Qcow2Error(f"qcow2: L1 table at {l1_offset:#x}+{l1_size * 8} beyond end of file ({file_size})")
    _walk_extensions(buf, header_length, cluster_size)
    if incompatible & _INCOMPAT_DIRTY:
        log.info("qcow2: dirty bit set; refcounts may be stale, which reads do not use")
    return _Header(version, cluster_bits, size, l1_size, l1_offset, incompatible, _COMPRESSION[compression_type])


def _walk_extensions(buf: bytes, pos: int, cluster_size: int) -> None:
    """Header extensions live in cluster 0 after the header: type u32, len u32, data padded to 8."""
    end = min(len(buf), cluster_size)
    while pos + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", buf, pos)
        if ext_type == _EXT_END:
            return
        if ext_type == _EXT_DATA_FILE:
            raise Qcow2Unsupported("qcow2: external data file (not supported: data would live outside the image)")
        padded = (ext_len + 7) & ~7
        if pos + 8 + padded > cluster_size:
            raise Qcow2Error(f"qcow2: header extension {ext_type:#x} too large ({ext_len} bytes)")
        pos += 8 + padded
    if end < cluster_size and pos + 8 > end:
        # We stopped at our read budget, not at the end marker or the end of cluster 0.
        raise Qcow2Unsupported(f"qcow2: header extensions extend past {end} bytes (limit max_header_bytes)")


class Qcow2Image:
    """An open qcow2 image. Safe for concurrent use from tasks of one trio run."""

    def __init__(self, read: ReadFn, file_size: int, header: _Header, l1: bytes, limits: Limits,
                 limiter: trio.CapacityLimiter, alloc: AllocFn | None = None) -> None:
        self._read = read
        self._alloc = alloc
        self._file_size = file_size
        self._h = header
        self._l1 = l1  # only the entries the virtual size needs
        self._limits = limits
        self._limiter = limiter
        self._cb = header.cluster_bits
        self._cs = 1 << header.cluster_bits
        self._l2_bits = header.cluster_bits - 3
        # Compressed descriptor: bits 0..x-1 host offset, x..61 additional 512-byte sectors.
        self._cx = 62 - (header.cluster_bits - 8)
        self._inflate = inflate_zstd if header.compression == "zstd" else inflate_zlib
        self.l2_cache = LoadingCache(limits.l2_cache_bytes)
        self.cluster_cache = LoadingCache(limits.cluster_cache_bytes)

    @classmethod
    async def open(cls, read: ReadFn, size: int, limits: Limits = Limits(),
                   limiter: trio.CapacityLimiter | None = None, alloc: AllocFn | None = None) -> Qcow2Image:
        """Parse and validate the header and load the L1 table; ``size`` is the stored object's size.

        ``alloc`` makes the buffers reads return (e.g. reused ones, once the caller is done with them);
        without it each read makes a zeroed bytearray of its own."""
        head_len = min(size, limits.max_header_bytes)
        if head_len < 72:
            raise Qcow2Error(f"qcow2: file too short for a header ({size} bytes)")
        buf = await _exact(read, 0, head_len)
        header = _parse_header(buf, size, limits)
        needed = -(-header.size // (1 << (2 * header.cluster_bits - 3)))
        l1 = await _exact(read, header.l1_offset, needed * 8) if needed else b""
        log.debug("qcow2: v%d, %d-byte clusters, virtual size %d, %s, L1 %d/%d entries at %#x",
                  header.version, 1 << header.cluster_bits, header.size, header.compression, needed,
                  header.l1_size, header.l1_offset)
        return cls(read, size, header, l1, limits,
                   limiter or trio.CapacityLimiter(max(1, limits.inflate_concurrency)), alloc)

    @property
    def virtual_size(self) -> int:
        return self._h.size

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def version(self) -> int:
        return self._h.version

    @property
    def compression(self) -> str:
        return self._h.compression

    @property
    def dirty(self) -> bool:
        return bool(self._h.incompatible & _INCOMPAT_DIRTY)

    # ---- mapping -------------------------------------------------------------------------------

    async def _l2_table(self, l1_index: int) -> bytes | None:
        """The L2 table for one L1 slot, or None if the whole slot is unallocated."""
        (entry,) = struct.unpack_from(">Q", self._l1, l1_index * 8)
        if entry & _L1_RESERVED:
            raise Qcow2Error(f"qcow2: L1 entry {l1_index} has reserved bits set ({entry:#018x})")
        offset = entry & _L1_OFFSET_MASK
        if offset == 0:
            return None
        if offset % self._cs or offset < self._cs or offset + self._cs > self._file_size:
            raise Qcow2Error(f"qcow2: L1 entry {l1_index}: L2 table offset {offset:#x} unaligned or outside the file")
        return await self.l2_cache.get(offset, lambda: _exact(self._read, offset, self._cs))

    def _decode(self, entry: int, vcluster: int) -> tuple[int, int, int]:
        """Validate one L2 entry: (kind, host offset, host length)."""
        vstart = vcluster << self._cb
        if entry & _L2_COMPRESSED:
            coff = entry & ((1 << self._cx) - 1)
            sectors = (entry >> self._cx) & ((1 << (self._cb - 8)) - 1)
            clen = (sectors + 1) * 512 - (coff & 511)
            if coff >> 56 or coff < self._cs or coff >= self._file_size:
                raise Qcow2Error(f"qcow2: compressed cluster at virtual {vstart:#x}: host offset {coff:#x} invalid")
            # The last compressed cluster's sector-rounded span may end past EOF (nbdkit clips too).
            return _COMPRESSED, coff, min(clen, self._file_size - coff)
        if entry & _L2_STD_RESERVED:
            raise Qcow2Error(f"qcow2: L2 entry for virtual {vstart:#x} has reserved bits set ({entry:#018x})")
        offset = entry & _L2_OFFSET_MASK
        if entry & _L2_ZERO and self._h.version < 3:
            raise Qcow2Error(f"qcow2: zero-cluster flag in a v2 image (virtual {vstart:#x})")
        if offset:
            if offset % self._cs:
                raise Qcow2Error(f"qcow2: cluster at virtual {vstart:#x}: host offset {offset:#x} not cluster-aligned")
            need = min(self._cs, self._h.size - vstart)  # the last cluster may be short in the file
            if offset < self._cs or offset + need > self._file_size:
                raise Qcow2Error(f"qcow2: cluster at virtual {vstart:#x}: host offset {offset:#x} outside the file")
        if entry & _L2_ZERO or offset == 0:
            return _ZERO, 0, 0
        return _DATA, offset, self._cs

    async def _clusters(self, start: int, end: int):
        """Yield (first vcluster, count, kind, host offset, host length) covering [start, end).

        count > 1 only for an unallocated L1 slot (one whole L2 table's worth of zeros, nothing
        fetched), so walks over huge holes cost one step per L1 entry, never one per cluster.
        """
        first, last = start >> self._cb, (end - 1) >> self._cb
        per_table = 1 << self._l2_bits
        vc = first
        while vc <= last:
            l1_index = vc >> self._l2_bits
            stop = min(last + 1, (l1_index + 1) * per_table)
            table = await self._l2_table(l1_index)
            if table is None:
                yield vc, stop - vc, _ZERO, 0, 0
            else:
                entries = struct.unpack_from(f">{stop - vc}Q", table, (vc - l1_index * per_table) * 8)
                for c, entry in enumerate(entries, vc):
                    yield (c, 1, *self._decode(entry, c))
            vc = stop

    def _clamp(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        return offset, min(offset + length, self._h.size)

    # ---- public API ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """The virtual disk's bytes [offset, offset+length).

        Exactly ``length`` bytes, except that the range is clamped at ``virtual_size``: a read that
        crosses the end returns only the bytes before it, and one at or past the end returns b"".
        Memory is O(length): callers pass bounded lengths (FUSE's max_read).
        """
        start, end = self._clamp(offset, length)
        if start >= end:
            return b""
        std_runs: list[list[int]] = []  # [out_pos, host_off, length], host-contiguous runs merged
        compressed: list[tuple[int, int, int, int, int]] = []  # (out_pos, in_off, n, coff, clen)
        zeros: list[list[int]] = []  # [out_pos, length], adjacent runs merged
        async for vc, count, kind, host, hlen in self._clusters(start, end):
            cstart = vc << self._cb
            lo, hi = max(start, cstart), min(end, (vc + count) << self._cb)
            pos, in_off, n = lo - start, lo - cstart, hi - lo
            if kind == _ZERO:
                if zeros and zeros[-1][0] + zeros[-1][1] == pos:
                    zeros[-1][1] += n
                else:
                    zeros.append([pos, n])
            elif kind == _DATA:
                run = std_runs[-1] if std_runs else None
                if run and run[0] + run[2] == pos and run[1] + run[2] == host + in_off:
                    run[2] += n
                else:
                    std_runs.append([pos, host + in_off, n])
            elif kind == _COMPRESSED:
                compressed.append((pos, in_off, n, host, hlen))
        if not compressed and len(std_runs) == 1 and std_runs[0][2] == end - start:
            return await _span(self._read, std_runs[0][1], end - start)  # one host run: no copy to make
        # A fresh bytearray is made zeroed, but its pages are faulted in one by one: 1 MiB of them cost
        # as much as inflating a quarter of it on this VM (py-spy of a warm dd of raw/). A reused
        # buffer is zeroed only where the read is zero or unallocated.
        if self._alloc is None:
            out = bytearray(end - start)
        else:
            out = self._alloc(end - start)
            for pos, n in zeros:
                while n:
                    k = min(n, len(_ZEROS))
                    out[pos:pos + k] = _ZEROS[:k]
                    pos, n = pos + k, n - k
        for pos, host, n in std_runs:
            out[pos:pos + n] = await _span(self._read, host, n)
        if compressed:
            await self._read_compressed(out, start, compressed)
        return out  # bytes-like; not copied once more into bytes

    async def _read_compressed(self, out: bytearray, start: int,
                               clusters: list[tuple[int, int, int, int, int]]) -> None:
        # qemu-img writes compressed clusters back to back in guest order, so the spans of one read
        # merge into a few host reads (a _Window) instead of one per cluster.
        #
        # A cluster the read covers whole (every read the kernel's readahead makes) inflates straight
        # into ``out``, in at most inflate_concurrency batches of one worker-thread call each: a thread
        # hop per 64 KiB cluster cost as much as its inflate, and the cluster cache only churned, since
        # nothing reads such a cluster again before the page cache would. A cluster the read covers in
        # part goes through the cluster cache, single flight: the next read wants the rest of it.
        whole: list[tuple[int, int, int]] = []  # (out_pos, coff, clen)
        partial: list[tuple[int, int, int, int, int]] = []
        for item in clusters:
            pos, in_off, n, coff, clen = item
            cached = self.cluster_cache.peek((coff, clen))
            if cached is not None:
                out[pos:pos + n] = memoryview(cached)[in_off:in_off + n]
            elif n == self._cs:
                whole.append((pos, coff, clen))
            else:
                partial.append(item)
        if not whole and not partial:
            return
        window = _Window(self._read, [(c, n) for _, c, n in whole] + [(c, n) for *_, c, n in partial])
        failed: list[ImgfsError] = []

        async def one(pos: int, in_off: int, n: int, coff: int, clen: int) -> None:
            vstart = start + pos - in_off
            try:
                data = await self.cluster_cache.get((coff, clen), lambda: self._inflate_at(vstart, coff, clen, window))
            except ImgfsError as e:
                # Raise the error itself, not an ExceptionGroup: callers catch Qcow2Error/BackendError.
                failed.append(e)
                nursery.cancel_scope.cancel()
                return
            out[pos:pos + n] = memoryview(data)[in_off:in_off + n]

        async def batch(items: list[tuple[int, int, int]]) -> None:
            try:
                jobs = [(pos, coff, await window.get(coff, clen)) for pos, coff, clen in items]
                if self._cs <= self._limits.inline_inflate_max:
                    self._inflate_into(out, start, jobs)
                else:
                    await trio.to_thread.run_sync(self._inflate_into, out, start, jobs, limiter=self._limiter)
            except ImgfsError as e:
                failed.append(e)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for item in partial:
                nursery.start_soon(one, *item)
            if whole:
                k = min(len(whole), max(1, self._limiter.total_tokens))
                step = -(-len(whole) // k)
                for i in range(0, len(whole), step):
                    nursery.start_soon(batch, whole[i:i + step])
        if failed:
            raise failed[0]

    def _inflate_into(self, out: bytearray, start: int, jobs: list[tuple[int, int, memoryview]]) -> None:
        """Inflate whole clusters into their places in ``out`` (in a worker thread, or inline when small).
        Each batch writes only its own clusters' bytes; the reader of ``out`` waits for every batch."""
        cs = self._cs
        for pos, coff, data in jobs:
            try:
                out[pos:pos + cs] = self._inflate(data, cs)
            except InflateError as e:
                raise Qcow2Error(f"qcow2: compressed cluster at virtual {start + pos:#x} "
                                 f"(host {coff:#x}+{len(data)}): {e}") from None

    async def _inflate_at(self, vstart: int, coff: int, clen: int, window: _Window) -> bytes:
        data = await window.get(coff, clen)
        try:
            if self._cs <= self._limits.inline_inflate_max:
                return self._inflate(data, self._cs)
            return await trio.to_thread.run_sync(self._inflate, data, self._cs, limiter=self._limiter)
        except InflateError as e:
            raise Qcow2Error(f"qcow2: compressed cluster at virtual {vstart:#x} (host {coff:#x}+{clen}): {e}") from None

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and zero extents covering [offset, offset+length) clamped at virtual_size, merged.

        Unallocated L1 slots are skipped without fetching anything, so this is cheap over big holes.
        """
        start, end = self._clamp(offset, length)
        result: list[Extent] = []
        async for vc, count, kind, _h, _l in self._clusters(start, end) if start < end else _empty():
            lo, hi = max(start, vc << self._cb), min(end, (vc + count) << self._cb)
            k: Kind = "zero" if kind == _ZERO else "data"
            if result and result[-1].kind == k and result[-1].end == lo:
                result[-1] = Extent(result[-1].start, hi - result[-1].start, k)
            else:
                result.append(Extent(lo, hi - lo, k))
        return result

    async def allocated_bytes(self) -> int:
        """Virtual bytes backed by data clusters (standard or compressed), for st_blocks.

        Walks every L2 table once (at most L1-size fetches of one cluster each, through the bounded
        L2 cache). It counts what a sparse raw copy would allocate, not the compressed host bytes.
        """
        return sum(e.length for e in await self.extents(0, self._h.size) if e.kind == "data")

    async def host_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(host offset, length) ranges of the stored object that ``read(offset, length)`` fetches, merged.

        Data only: the L2 tables needed to answer are fetched by this call itself (through the cache).
        Compressed clusters are listed whole (they inflate whole), even if already in the cluster cache.
        """
        start, end = self._clamp(offset, length)
        spans: list[tuple[int, int]] = []
        async for vc, _count, kind, host, hlen in self._clusters(start, end) if start < end else _empty():
            if kind == _DATA:
                cstart = vc << self._cb
                lo, hi = max(start, cstart), min(end, cstart + self._cs)
                spans.append((host + lo - cstart, hi - lo))
            elif kind == _COMPRESSED:
                spans.append((host, hlen))
        return _merge(spans)


class _Window:
    """Host spans one read() will need, each fetched at most once, lazily, by the first loader needing it.

    Lazy because a cluster another reader is already inflating is waited for (single flight), and
    its bytes need not be fetched again by us.
    """

    def __init__(self, read: ReadFn, spans: list[tuple[int, int]]) -> None:
        self._read = read
        self._spans = _merge(spans)
        self._cache = LoadingCache(max_bytes=1 << 62)  # lives for one read; bounded by the read's spans

    async def get(self, offset: int, length: int) -> memoryview:
        for s, n in self._spans:
            if s <= offset and offset + length <= s + n:
                buf = await self._cache.get(s, lambda: _span(self._read, s, n))
                return memoryview(buf)[offset - s:offset - s + length]
        return memoryview(await _span(self._read, offset, length))  # was cached when planned, evicted since


async def _empty():
    return
    yield  # pragma: no cover - makes this an async generator


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping or touching (offset, length) spans."""
    merged: list[tuple[int, int]] = []
    for s, n in sorted(spans):
        if merged and s <= merged[-1][0] + merged[-1][1]:
            ps, pn = merged[-1]
            merged[-1] = (ps, max(pn, s + n - ps))
        else:
            merged.append((s, n))
    return merged


async def _span(read: ReadFn, offset: int, length: int) -> bytes | memoryview:
    """Exactly ``length`` bytes at ``offset``, as the read function gave them (no copy): for bytes a read
    uses at once. Anything kept in a cache goes through ``_exact``, so it never pins a larger buffer."""
    data = await read(offset, length)
    if len(data) != length:
        raise ShortRead(f"qcow2: store returned {len(data)} bytes for {length} at {offset:#x}")
    return data


async def _exact(read: ReadFn, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes at ``offset``, as bytes of their own."""
    return bytes(await _span(read, offset, length))
