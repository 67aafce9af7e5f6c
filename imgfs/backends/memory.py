"""An in-memory store with the same interface as the real ones: counters, latency and fault hooks.

Shipped with the code (not hidden in tests) so unit tests, the Operations tests and bench/ can measure
and break the layers above the stores without a network.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..errors import BackendAccessDenied, BackendError, ShortRead, StaleImage
from ..model import Location
from .base import sidecar_key


@dataclass
class MemoryBackend:
    name: str = "memory"
    kind: str = "memory"
    latency: float = 0.0  # seconds added to every read
    read_timeout: float | None = None  # the fetcher's limit on one read (see Backend)
    images: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # id -> (data, version)
    reads: Counter = field(default_factory=Counter)  # (image id, offset) -> number of reads
    read_bytes: int = 0
    fail_reads: int = 0  # the next N reads raise BackendError
    short_reads: int = 0  # the next N reads return one byte too few (a broken store)
    sidecars: dict[str, bytes] = field(default_factory=dict)  # sidecar key -> object (see Backend)
    sidecars_read_only: bool = False  # credentials that may not write: put_sidecar is refused
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _versions: int = 0

    def put(self, image_id: str, data: bytes) -> Location:
        with self._lock:
            self._versions += 1
            self.images[image_id] = (bytes(data), f"v{self._versions}")
        loc = self.stat(image_id)
        assert loc is not None
        return loc

    def delete(self, image_id: str) -> None:
        with self._lock:
            self.images.pop(image_id, None)

    def list_images(self) -> list[Location]:
        with self._lock:
            return [Location(self.name, i, len(d), v, 0.0) for i, (d, v) in self.images.items()]

    def stat(self, image_id: str) -> Location | None:
        with self._lock:
            found = self.images.get(image_id)
        return None if found is None else Location(self.name, image_id, len(found[0]), found[1], 0.0)

    def read(self, location: Location, offset: int, length: int) -> bytes:
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.reads[(location.image_id, offset)] += 1
            found = self.images.get(location.image_id)
            if found is None or found[1] != location.version:
                raise StaleImage(f"store '{self.name}': image {location.image_id} changed")
            if self.fail_reads:
                self.fail_reads -= 1
                raise BackendError(f"store '{self.name}': injected failure")
            data = found[0][offset : offset + length]
            self.read_bytes += len(data)
            if self.short_reads:  # a broken store that does not notice: the layers above must
                self.short_reads -= 1
                return data[:-1]
        if len(data) != length:
            raise ShortRead(f"store '{self.name}': image {location.image_id}: {len(data)} of {length} bytes")
        return data

    def get_sidecar(self, kind: str, image_id: str, limit: int) -> bytes | None:
        with self._lock:
            data = self.sidecars.get(sidecar_key(kind, image_id))
        if data is not None and len(data) > limit:
            raise BackendError(f"store '{self.name}': the {kind} of image {image_id} holds more than {limit} bytes")
        return data

    def put_sidecar(self, kind: str, image_id: str, data: bytes) -> None:
        if self.sidecars_read_only:
            raise BackendAccessDenied(f"store '{self.name}': storing the {kind} of image {image_id}: access denied")
        with self._lock:
            self.sidecars[sidecar_key(kind, image_id)] = bytes(data)

    def describe(self) -> dict[str, str]:
        return {"type": "memory"}

    def close(self) -> None:
        pass
