"""Frozen values shared by every layer: what an image is and where its bytes live."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Location:
    """One copy of an image in one store.

    ``version`` identifies the exact bytes of this copy (an S3 ETag, a file's size+mtime): chunks cached
    under one version are never served for another.
    """

    store: str
    image_id: str
    size: int
    version: str
    mtime: float


@dataclass(frozen=True, slots=True)
class Image:
    """An image and every location that holds it, in preference order.

    ``name`` and ``meta`` come from Glance when it is the catalog (disk_format, checksum, os_hash_value,
    owner, ...): what an operator sees as xattrs. Never a location URL: those may carry credentials."""

    id: str
    locations: tuple[Location, ...] = field(default_factory=tuple)
    name: str = ""
    created_at: str = ""
    meta: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        for k, v in self.meta:
            if k == key:
                return v
        return None

    @property
    def primary(self) -> Location:
        return self.locations[0]

    @property
    def size(self) -> int:
        return self.primary.size

    @property
    def mtime(self) -> float:
        return self.primary.mtime

    def at(self, store: str) -> Location | None:
        for loc in self.locations:
            if loc.store == store:
                return loc
        return None


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Names one chunk of one version of one copy of an image in the cache."""

    store: str
    image_id: str
    version: str
    chunk_size: int
    index: int


@dataclass(frozen=True, slots=True)
class HandedAttachment:
    """A Cinder attachment one imgfs process leaves the next at a hand-over. No connection info: the
    successor asks Cinder for it, so no keyring ever sits in what is handed over."""

    volume_id: str
    attachment_id: str
    multiattach: bool
