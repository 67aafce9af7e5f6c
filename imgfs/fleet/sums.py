"""Chunk sums: the sha256 of every block of one version of an image, kept beside the image at the origin,
so a chunk a peer serves is checked before any reader gets it.

Why at the origin: a peer serves chunks, so it can forge anything it serves, a list of digests included.
The list is read from the store itself, with the node's own credentials, like the image: whoever can
forge it could also rewrite the image. It is made once, by the first node that reads the image whole
and finds it equal to the catalog's digest (Glance's sha512), and every node then checks each block it
gets from the mesh against it: a partial read of a chunk from a lying peer is caught, not only a full
read.

Who makes it: a fleet's first wave reads a new image on every node at once, and summing it is 0.55
CPU-s per GiB a node spends for a list one node suffices to store. So a first full read makes it only
on the PUBLISHERS members ranked highest for that version by a hash of member and version (the same
ranking on every node, with no talk between them); any other node makes it on the full read after
one it verified without summing, if the list is still missing then (the publishers never read it, or
could not store it). Opens that read part of the image (qemu-img info) do not count.

The list is one small object (32 bytes per MiB: 320 KiB for a 10 GiB image): a header line of JSON
naming the image, the version the sums belong to, its size, the block size and the digest the read
matched, then the raw sums. A list for another version or size is not used (the image was replaced);
a malformed one is ignored with one log line. Neither ever yields wrong bytes: without a usable list a
block is used as before, checked by the full read's digest only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BackendAccessDenied, BackendError
from ..model import Location
from ..ratelimit import RateLimit

log = logging.getLogger(__name__)

FORMAT = "imgfs-chunk-sums"
BLOCK = 1 << 20  # bytes per sum, or the chunk size if smaller: a chunk is checked block by block
MIN_BLOCK = 64 << 10
SUM = 32  # sha256
MAX_HEADER = 4096
PUBLISHERS = 2  # members that make an image version's list on their first full read of it
KIND = "chunk-sums"  # the store's sidecar kind (see Backend)
ABSENT_FOR = 10.0  # seconds a missing (or unreadable) list is believed missing: another node may publish one
KEPT = 256  # lists (or their absence) remembered: a few hundred images are in use on a node at once


def elected(members: tuple[str, ...], me: str, loc: Location, publishers: int = PUBLISHERS) -> bool:
    """Whether ``me`` is among the ``publishers`` members ranked highest for ``loc`` (rendezvous
    hashing: every node computes the same ranking, and a members change moves few images). A node
    missing from the list publishes: a configuration error must not leave every image without sums."""
    if me not in members:
        return True
    version = f"{loc.store}\0{loc.image_id}\0{loc.version}".encode()
    ranked = sorted(members, key=lambda m: hashlib.blake2b(m.encode() + b"\0" + version, digest_size=8).digest())
    return me in ranked[:publishers]


class SumsError(ValueError):
    """A list that cannot be used for the image it is read for (the reason, for one log line)."""


def blocks_of(size: int, block: int) -> int:
    return (size + block - 1) // block


def block_for(chunk_size: int) -> int | None:
    """The block size for a fleet of this chunk size (every member reads with the same), such that no
    block straddles two chunks (each chunk has its own owner); None if that would be uselessly small."""
    block = math.gcd(chunk_size, BLOCK)
    return block if block >= MIN_BLOCK else None


@dataclass(frozen=True)
class ChunkSums:
    image_id: str
    version: str
    size: int
    sums: bytes  # SUM bytes per block, in order
    block: int
    made_from: str = ""  # "<algo>:<digest>" of the full read the sums were made from

    def aligned(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest range of whole blocks (the last one may end with the image) holding the range."""
        start = offset - offset % self.block
        end = min(self.size, -(-(offset + length) // self.block) * self.block)
        return start, end

    def bad_blocks(self, start: int, data: bytes | bytearray | memoryview) -> list[int]:
        """The blocks of ``data`` (whole blocks from ``start``, as ``aligned`` gives) that do not match
        their sums, by index in the image; empty when every one does."""
        assert start % self.block == 0 and start + len(data) <= self.size
        view = memoryview(data)
        bad = []
        for pos in range(0, len(view), self.block):
            index = (start + pos) // self.block
            piece = view[pos : pos + self.block]
            if len(piece) != min(self.block, self.size - start - pos):
                bad.append(index)  # not a whole block: nothing to check it against
            elif hashlib.sha256(piece).digest() != self.sums[index * SUM : (index + 1) * SUM]:
                bad.append(index)
        return bad

    def encode(self) -> bytes:
        header = {"format": FORMAT, "v": 1, "image": self.image_id, "version": self.version, "size": self.size,
                  "block": self.block, "algo": "sha256", "made_from": self.made_from}
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + self.sums

    @classmethod
    def decode(cls, raw: bytes, loc: Location, block: int) -> "ChunkSums":
        """The list in ``raw``, if it is one for exactly ``loc`` (image, version, size); SumsError if not.
        Every field is checked before anything is sized from it: the list comes from a store, and a
        store's contents are not code."""
        newline = raw.find(b"\n", 0, MAX_HEADER)
        if newline < 0:
            raise SumsError("no header line")
        try:
            header = json.loads(raw[:newline])
        except (ValueError, UnicodeDecodeError):
            raise SumsError("the header is not JSON") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("v") != 1:
            raise SumsError("not an imgfs chunk-sums list of a known version")
        if header.get("algo") != "sha256" or header.get("block") != block:
            raise SumsError(f"sums of {header.get('algo')!r} per {header.get('block')!r} bytes (this fleet uses sha256 per {block})")
        if header.get("image") != loc.image_id:
            raise SumsError(f"made for image {header.get('image')!r}")
        if header.get("version") != loc.version or header.get("size") != loc.size:
            raise SumsError(f"made for version {header.get('version')!r} ({header.get('size')!r} bytes), not this one")
        body = raw[newline + 1 :]
        if len(body) != blocks_of(loc.size, block) * SUM:
            raise SumsError(f"{len(body)} bytes of sums, want {blocks_of(loc.size, block) * SUM}")
        made_from = header.get("made_from")
        return cls(loc.image_id, loc.version, loc.size, bytes(body), block, made_from if isinstance(made_from, str) else "")

    @staticmethod
    def largest(size: int, block: int) -> int:
        """The most bytes a list for an image of ``size`` may take (what a read of one is bounded by)."""
        return MAX_HEADER + blocks_of(size, block) * SUM


class SumsMaker:
    """Sums every block of a full read, fed in image order (by the read's verifier, in its worker thread).
    The sums mean something only once that read matched the catalog's digest."""

    def __init__(self, loc: Location, block: int, skip: Callable[[], bool] = lambda: False) -> None:
        self.loc, self.block = loc, block
        self._skip = skip  # True once a list turned out to exist already: nothing left to make
        self.stopped = False
        self._sums = bytearray()
        self._block = hashlib.sha256()
        self._in_block = 0
        self._fed = 0

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        if self.stopped or self._skip():
            self.stopped = True
            return
        view = memoryview(piece)
        self._fed += len(view)
        while view:
            take = min(len(view), self.block - self._in_block)
            self._block.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == self.block:
                self._sums += self._block.digest()
                self._block, self._in_block = hashlib.sha256(), 0

    def finish(self, made_from: str) -> ChunkSums | None:
        """The list, or None if the read was not exactly the whole image."""
        if self.stopped or self._fed != self.loc.size:
            return None
        sums = bytes(self._sums) + (self._block.digest() if self._in_block else b"")
        if len(sums) != blocks_of(self.loc.size, self.block) * SUM:
            return None
        return ChunkSums(self.loc.image_id, self.loc.version, self.loc.size, sums, self.block, made_from)


class SumsBook:
    """One store's chunk sums as this node knows them: read from the store once per image version
    (single flight: readers run in worker threads), remembered, and published after a verified full
    read when the store holds none. Counts what happened in ``counts`` (outcome -> n)."""

    def __init__(self, inner, *, block: int | None, mode: str, count: Callable[[str], None],
                 elected: Callable[[Location], bool] = lambda loc: True) -> None:
        self.inner = inner
        self.elected = elected
        self.block = block
        self.enabled = block is not None and mode != "off" and hasattr(inner, "get_sidecar")
        self.publishing = self.enabled and mode == "publish" and hasattr(inner, "put_sidecar")
        self._count = count
        self._known: OrderedDict[tuple[str, str], tuple[ChunkSums | None, float]] = OrderedDict()
        self._flights: dict[tuple[str, str], threading.Lock] = {}
        # versions this node read whole and verified without summing them (not one of their publishers)
        self._passed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self._logged = RateLimit(300.0)

    def _remembered(self, key: tuple[str, str]) -> tuple[bool, ChunkSums | None]:
        with self._lock:
            found = self._known.get(key)
            if found is None or found[1] < time.monotonic():
                return False, None
            self._known.move_to_end(key)
            return True, found[0]

    def _remember(self, key: tuple[str, str], sums: ChunkSums | None, seconds: float) -> None:
        with self._lock:
            self._known[key] = (sums, time.monotonic() + seconds)
            self._known.move_to_end(key)
            while len(self._known) > KEPT:
                self._known.popitem(last=False)

    def known(self, loc: Location) -> bool:
        """A usable list for ``loc`` is in hand (nothing to make)."""
        return self._remembered((loc.image_id, loc.version))[1] is not None

    def get(self, loc: Location) -> ChunkSums | None:
        """The list for exactly ``loc``, read from the store the first time (in the caller's worker thread)."""
        if not self.enabled:
            return None
        key = (loc.image_id, loc.version)
        hit, sums = self._remembered(key)
        if hit:
            return sums
        with self._lock:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:  # one read of the list per image, whatever the number of readers
            hit, sums = self._remembered(key)
            if not hit:
                sums = self._read(loc)
                self._remember(key, sums, float("inf") if sums is not None else ABSENT_FOR)
        with self._lock:
            self._flights.pop(key, None)
        return sums

    def _read(self, loc: Location) -> ChunkSums | None:
        assert self.block is not None
        try:
            raw = self.inner.get_sidecar(KIND, loc.image_id, ChunkSums.largest(loc.size, self.block))
        except BackendError as e:
            self._count("read_failed")
            if self._logged.allow(("read", loc.image_id)):
                log.warning("fleet: cannot read the chunk sums of image %s: %s; blocks from peers are checked only by "
                            "full reads meanwhile", loc.image_id, e)
            return None
        if raw is None:
            return None
        try:
            return ChunkSums.decode(raw, loc, self.block)
        except SumsError as e:
            self._count("unusable")
            if self._logged.allow(("unusable", loc.image_id)):
                log.warning("fleet: the chunk sums stored for image %s (store '%s') are not for this copy (%s); not "
                            "used, and replaced after the next verified full read", loc.image_id, loc.store, e)
            return None

    def reject(self, loc: Location, block: int) -> None:
        """The store's own bytes do not match the list: the list is wrong, never the store. Not used again
        for this version (a verified full read replaces it)."""
        self._remember((loc.image_id, loc.version), None, float("inf"))
        self._count("rejected")
        log.error("fleet: block %d of image %s (store '%s', version %s) read from the store does not match the chunk "
                  "sums stored beside it; those sums are wrong and no longer used", block, loc.image_id, loc.store,
                  loc.version)

    def maker(self, loc: Location) -> SumsMaker | None:
        """Something to sum a full read of ``loc`` with, if this node would publish its list."""
        if not self.publishing or self.known(loc):
            return None
        if not self.elected(loc):
            with self._lock:
                if (loc.image_id, loc.version) not in self._passed:
                    return None  # left to the publishers, until this node read it whole once without
        assert self.block is not None
        return SumsMaker(loc, self.block, skip=lambda: self.known(loc))

    def passed(self, loc: Location) -> None:
        """A full read of ``loc`` matched the catalog's digest without summing it (this node is not one
        of its publishers): if the list is still missing at the next full read, that one makes it."""
        if not self.publishing or self.known(loc) or self.elected(loc):
            return
        with self._lock:
            self._passed[(loc.image_id, loc.version)] = None
            while len(self._passed) > KEPT:
                self._passed.popitem(last=False)
        self._count("left_to_publishers")

    def publish(self, maker: SumsMaker, algo: str, digest: str) -> None:
        """Store the list of a full read that matched the catalog's digest, unless the store holds a
        usable one already (several nodes may finish a first read at once: their lists are equal)."""
        loc = maker.loc
        sums = maker.finish(f"{algo}:{digest}")
        if sums is None or self.known(loc):
            return
        key = (loc.image_id, loc.version)
        existing = self._read(loc)
        if existing is not None:
            self._remember(key, existing, float("inf"))
            return
        try:
            self.inner.put_sidecar(KIND, loc.image_id, sums.encode())
        except BackendAccessDenied as e:
            self._count("publish_refused")
            # no more summing of reads for a list this node cannot store (a verified copy's later reads
            # would otherwise be hashed again for it, every time)
            self.publishing = False
            if self._logged.allow(("refused", loc.store)):
                log.warning("fleet: cannot store chunk sums in store '%s' (%s); this node's credentials only read: set "
                            "[fleet] chunk_sums = use on it, and publish from a node that may write", loc.store, e)
            return
        except BackendError as e:
            self._count("publish_failed")
            log.warning("fleet: storing the chunk sums of image %s failed: %s", loc.image_id, e)
            return
        self._remember(key, sums, float("inf"))
        self._count("published")
        log.info("fleet: stored the chunk sums of image %s (store '%s', version %s, %d blocks), made from a read that "
                 "matched its %s digest", loc.image_id, loc.store, loc.version, len(sums.sums) // SUM, algo)
