"""The raw disk of each image (the mount's ``raw/`` view): the stored bytes themselves for an image
Glance calls ``raw``, the virtual disk decoded by ``imgfs.formats`` for one it calls ``qcow2``, the
bytes before the footer for a fixed VHD (``vhd``).

Only Glance's ``disk_format`` decides: a qcow2 header found inside an image Glance calls raw is that
disk's content (a guest may write one), never a reason to decode it. An image of another format, or a
qcow2 the decoder refuses (a backing file, encryption, ...) or a dynamic VHD, has no raw disk: the view does not offer
it, and one log line says why.

Knows the catalog, the reader and the formats; nothing of FUSE.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import trio

from .buffers import ReceivePool
from .catalog import Catalog
from .errors import ImgfsError
from .formats import VHD_FOOTER, FormatError, FormatUnsupported, Limits, Qcow2Image, parse_vhd_footer
from .model import Image, Location
from .reader import SMALL_READ, ChunkFetcher, ImageReader, SequentialRun

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2", "vhd")
KEPT_OPEN = 64  # decoders kept open: each holds its L1 table (bounded by Limits) and small caches
OPENING = 8  # decoders opened at once when a listing needs their sizes
LIST_WAIT = 10.0  # seconds a listing of raw/ waits for sizes; images still unknown then are left out
SEEK_WINDOW = 1 << 30  # virtual bytes of extents asked at a time while seeking data or a hole
# Decoded reads' buffers, reused once the adapter's reply let go of them: a FUSE read is at most
# 1 MiB, and a few are in flight at once.
REPLY_BUFFERS = 8
REPLY_BUFFERS_BYTES = 8 << 20
# Virtual bytes a reader of raw/ reads in a row before it counts as sequential (its stored ranges
# prefetched), and how far from its expected offset a read may land and still continue the run: the
# kernel keeps several reads in flight, of at most 1 MiB each.
SEQUENTIAL = 2 * SMALL_READ
SLACK = 4 << 20


@dataclass
class Disk:
    """One version of one image's raw disk."""

    image_id: str
    format: str  # "raw" (the stored bytes), "qcow2" (decoded) or "vhd" (the stored bytes before the footer)
    size: int  # the virtual disk's size
    primary: Location  # the copy a read starts with (the stored object decoded)
    decoder: Qcow2Image | None = None
    stored: ImageReader | None = None  # the decoder's reads of the stored object (shared by every open)
    allocated: int | None = None  # virtual bytes in data clusters (st_blocks), when holes are served

    async def seek(self, offset: int, data: bool) -> int | None:
        """The first offset >= ``offset`` in data (``data``) or in a hole; the end of the disk counts as a
        hole. None when there is no such offset (lseek's ENXIO)."""
        if offset >= self.size:
            return None
        if self.decoder is None:
            return offset if data else self.size
        pos = offset
        while pos < self.size:
            n = min(self.size - pos, SEEK_WINDOW)
            for extent in await self.decoder.extents(pos, n):
                if (extent.kind == "data") == data:
                    return max(extent.start, offset)
            pos += n
        return None if data else self.size


def _key(image: Image) -> tuple:
    return image.id, tuple((loc.store, loc.version, loc.size) for loc in image.locations)


class DiskBook:
    """Which images have a raw disk and how large it is; their decoders, opened once and shared by every
    reader (their table and cluster caches with them)."""

    def __init__(self, catalog: Catalog, fetcher: ChunkFetcher, *, prefetch_max: int, holes_served: bool,
                 limits: Limits = Limits()) -> None:
        self.catalog, self.fetcher, self.limits = catalog, fetcher, limits
        # Whether the adapter answers SEEK_DATA/SEEK_HOLE (the FUSE one: with the patched pyfuse3). Without
        # that, a smaller st_blocks would only make cp and tar read holes as zeros: it stays full.
        self.holes_served = holes_served
        self.prefetch_max = prefetch_max
        self._inflate = trio.CapacityLimiter(max(1, limits.inflate_concurrency))  # for every image together
        self._replies = ReceivePool(kept=REPLY_BUFFERS, kept_bytes=REPLY_BUFFERS_BYTES, min_size=128 << 10)
        self._open: OrderedDict[tuple, Disk] = OrderedDict()
        self._sizes: dict[tuple, int] = {}  # decoded sizes, kept after their decoder is closed
        self._allocated: dict[tuple, int] = {}  # and their data bytes (only when holes are served)
        self._refused: dict[tuple, str] = {}  # image versions the decoder refused: not offered
        self._flights: dict[tuple, trio.Event] = {}
        catalog.listeners.append(self._on_change)

    @staticmethod
    def format_of(image: Image) -> str | None:
        fmt = image.get("disk_format")
        return fmt if fmt in FORMATS and image.locations else None

    def size(self, image: Image) -> int | None:
        """The raw disk's size if it is known without I/O; None if not (yet), or if it has none."""
        fmt = self.format_of(image)
        if fmt == "raw":
            return image.primary.size
        if fmt in ("qcow2", "vhd"):
            return self._sizes.get(_key(image))
        return None

    def allocated(self, image: Image) -> int | None:
        """Virtual bytes in data clusters, when known without I/O and holes are served (else None)."""
        return self._allocated.get(_key(image))

    def offered(self, image: Image) -> bool:
        return self.format_of(image) is not None and _key(image) not in self._refused

    async def learn_sizes(self, images: list[Image]) -> None:
        """Open the decoders of the qcow2 and VHD images whose size is unknown, a few at once, for a listing; any
        not open within LIST_WAIT seconds (a slow store) is left out of it, not waited for."""
        todo = [i for i in images if self.offered(i) and self.size(i) is None]
        if not todo:
            return
        limiter = trio.CapacityLimiter(OPENING)

        async def one(image: Image) -> None:
            async with limiter:
                try:
                    await self.open(image)
                except ImgfsError:
                    pass  # logged by open; the listing leaves the image out

        with trio.move_on_after(LIST_WAIT):
            async with trio.open_nursery() as nursery:
                for image in todo:
                    nursery.start_soon(one, image)

    async def open(self, image: Image) -> Disk:
        """The image's raw disk, decoding its header and L1 table (a VHD: its footer) the first time
        (single flight)."""
        fmt = self.format_of(image)
        if fmt is None:
            raise FormatUnsupported(f"image {image.id}: disk_format {image.get('disk_format')!r} has no raw disk here")
        key = _key(image)
        if fmt == "raw":
            return Disk(image.id, "raw", image.primary.size, image.primary)
        while True:
            refused = self._refused.get(key)
            if refused is not None:
                raise FormatUnsupported(refused)
            disk = self._open.get(key)
            if disk is not None:
                self._open.move_to_end(key)
                return disk
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.wait()
        self._flights[key] = flight = trio.Event()
        try:
            disk = await (self._decode(image, key) if fmt == "qcow2" else self._fixed_vhd(image, key))
        finally:
            del self._flights[key]
            flight.set()
        self._open[key] = disk
        self._sizes[key] = disk.size
        if disk.allocated is not None:
            self._allocated[key] = disk.allocated
        while len(self._open) > KEPT_OPEN:
            self._open.popitem(last=False)
        return disk

    async def _decode(self, image: Image, key: tuple) -> Disk:
        # One reader for the decoder's own reads (header, tables, clusters): they go through the chunk
        # cache like any read, small ones as small verified blocks. It prefetches nothing itself: the
        # decoder's reads follow the image's layout, not any one reader, so each open file of raw/
        # prefetches the stored ranges under its own virtual reads instead (DiskReader).
        stored = ImageReader(self.fetcher, self.fetcher.order(image.locations), prefetch_max=0)

        async def read(offset: int, length: int) -> bytes | memoryview:
            return await stored.read(offset, length)  # the decoder copies only what it keeps

        try:
            decoder = await Qcow2Image.open(read, image.primary.size, self.limits, self._inflate, self._replies.get)
        except FormatError as e:
            raise self._refuse(image, key, "qcow2", e) from None
        # every L2 table once (a 10 GiB disk of 64 KiB clusters: 20 small reads), for an honest st_blocks
        allocated = await decoder.allocated_bytes() if self.holes_served else None
        log.info("image %s: qcow2 v%d, %s, %d-byte clusters, a %d-byte raw disk (%s)", image.id, decoder.version,
                 decoder.compression, decoder.cluster_size, decoder.virtual_size,
                 f"{allocated} bytes in data clusters; holes served" if allocated is not None else
                 "holes not served: stock pyfuse3, see patches/pyfuse3")
        return Disk(image.id, "qcow2", decoder.virtual_size, image.primary, decoder, stored, allocated)

    async def _fixed_vhd(self, image: Image, key: tuple) -> Disk:
        size = image.primary.size
        stored = ImageReader(self.fetcher, self.fetcher.order(image.locations), prefetch_max=0)
        footer = bytes(await stored.read(max(0, size - VHD_FOOTER), VHD_FOOTER)) if size >= VHD_FOOTER else b""
        try:
            vhd = parse_vhd_footer(footer, size)
        except FormatError as e:
            raise self._refuse(image, key, "vhd", e) from None
        log.info("image %s: fixed VHD made by %r, a %d-byte raw disk (its %s)", image.id, vhd.creator,
                 vhd.virtual_size, vhd.sized_by)
        return Disk(image.id, "vhd", vhd.virtual_size, image.primary)

    def _refuse(self, image: Image, key: tuple, fmt: str, e: FormatError) -> FormatError:
        """Refused for good (this version): a malformed or unsupported image does not mend itself. A
        store failing is not the image's fault, and is not remembered (it is not a FormatError)."""
        why = f"image {image.id} ({fmt}) is not offered as a raw disk: {e}"
        self._refused[key] = why
        log.warning("%s", why)
        return type(e)(why)

    async def _on_change(self, image_id: str, old: Image | None, new: Image | None) -> None:
        """A new version is a new disk: forget what was known of the old one."""
        if old is None:
            return
        key = _key(old)
        if new is not None and _key(new) == key:
            return
        self._open.pop(key, None)
        self._sizes.pop(key, None)
        self._allocated.pop(key, None)
        self._refused.pop(key, None)


class DiskReader:
    """One open file of raw/: reads of one version of one image's raw disk, short only at its end.

    A sequential reader of a decoded disk gets prefetch of the stored object's host ranges under the
    virtual bytes ahead of it, found in the L2 tables: whatever order the clusters were written in, it
    asks the chunks it will need, in runs, before it needs them; zero and unallocated ranges ask
    nothing. A random reader prefetches nothing, and fetches only the clusters it touches.
    """

    def __init__(self, disk: Disk, stored: ImageReader | None, fetcher: ChunkFetcher | None = None,
                 prefetch_max: int = 0) -> None:
        self.disk = disk
        self.loc = disk.primary  # for the adapter's log lines
        self._stored = stored  # a raw image's own reader (the bytes as they are)
        self.fetcher = fetcher
        self.prefetch_max = prefetch_max if fetcher is not None else 0
        self._seq = SequentialRun(slack=SLACK)
        self._asked = 0  # virtual bytes [.., _asked) have had their stored ranges prefetched
        self._planning = False  # a search of the L2 tables for the next window is under way

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        if self.disk.decoder is not None:
            self._prefetch(offset, min(offset + size, self.disk.size))
            return await self.disk.decoder.read(offset, size)
        assert self._stored is not None
        size = min(size, self.disk.size - offset)  # a fixed VHD's disk ends where its footer begins
        return await self._stored.read(offset, size) if size > 0 else b""

    def _prefetch(self, offset: int, end: int) -> None:
        if offset >= end:
            return
        if not self._seq.track(offset, end):
            self._asked = 0
        if not self.prefetch_max or self._seq.bytes < SEQUENTIAL or self._planning:
            return
        assert self.fetcher is not None
        window = self._seq.window(self.prefetch_max, self.fetcher.chunk_size)
        start, stop = max(self._asked, end), min(self.disk.size, end + window)
        # in batches of a quarter of the window: a few searches and runs of chunks, not one per read
        if stop - start < window // 4 and stop < self.disk.size or stop <= start:
            return
        self._asked = stop
        self._planning = True
        self.fetcher.spawn(self._prefetch_range, start, stop)

    async def _prefetch_range(self, start: int, stop: int) -> None:
        decoder, stored, fetcher = self.disk.decoder, self.disk.stored, self.fetcher
        assert decoder is not None and stored is not None and fetcher is not None
        try:
            ranges = await decoder.host_ranges(start, stop - start)
        except ImgfsError as e:  # the reads themselves will meet it, and say so
            log.debug("image %s: no prefetch of the raw disk at %d: %s", self.disk.image_id, start, e)
            return
        finally:
            self._planning = False
        cs = fetcher.chunk_size
        for first, last in _chunk_spans(ranges, cs):
            fetcher.prefetch(stored.loc, first, last)  # the copy the decoder reads now

    def close(self) -> None:
        if self._stored is not None:
            self._stored.close()


def _chunk_spans(ranges: list[tuple[int, int]], chunk_size: int) -> list[tuple[int, int]]:
    """The chunks [first, last) that hold the byte ranges, as ascending runs of adjacent chunks."""
    chunks = sorted({i for off, n in ranges if n > 0 for i in range(off // chunk_size, (off + n - 1) // chunk_size + 1)})
    spans: list[tuple[int, int]] = []
    for i in chunks:
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def reader_for(book: DiskBook, disk: Disk, image: Image) -> DiskReader:
    """A reader of ``disk`` for one open file: a raw image gets its own reader (sequential prefetch, and
    the catalog's digest checked on a full read, as images/ does); a fixed VHD too, with no digest to
    check (its reader never reads the footer the digest covers); a qcow2 one shares its decoder and
    prefetches the stored ranges under its own reads."""
    fetcher = book.fetcher
    if disk.decoder is not None:
        return DiskReader(disk, None, fetcher, book.prefetch_max)
    locations = fetcher.order(image.locations)
    verify = None if disk.format == "vhd" else \
        fetcher.verifier(locations, image.get("os_hash_algo"), image.get("os_hash_value"), disk.size)
    return DiskReader(disk, ImageReader(fetcher, locations, prefetch_max=book.prefetch_max, verify=verify,
                                        on_integrity_error=fetcher.drop_copies))
