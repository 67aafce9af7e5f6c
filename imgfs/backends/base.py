"""The interface every store implements."""

from __future__ import annotations

from typing import Protocol

from ..model import Location


class Backend(Protocol):
    name: str
    kind: str
    # Seconds one read may take before the fetcher gives up on it with EIO; None: the backend's own
    # timeouts bound every read (S3's are botocore's), or reads cannot hang (local files).
    read_timeout: float | None
    # Optional: the most bytes one read should ask for. A sequential prefetch joins adjacent chunks into
    # one request of up to RUN_BYTES (one request costs a store the same whatever its size); a backend
    # that serves each chunk apart anyway (the fleet's mesh: each chunk has its own owner) says its
    # chunk size here, so each chunk is a flight of its own and they travel in parallel.
    # largest_read: int
    #
    # Optional, stores that keep small objects of imgfs's own beside images (S3: keys under ".imgfs/",
    # which no listing shows as an image; the fleet's chunk sums):
    # def get_sidecar(self, kind: str, image_id: str, limit: int) -> bytes | None:
    #     """The object, None if there is none; BackendError if it holds more than ``limit`` bytes."""
    # def put_sidecar(self, kind: str, image_id: str, data: bytes) -> None: ...

    def list_images(self) -> list[Location]:
        """Every image in the store. Raises BackendError if the store cannot be listed."""

    def stat(self, image_id: str) -> Location | None:
        """The image's current location, or None if the store does not hold it."""

    def read(self, location: Location, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of ``location`` at ``offset``, of exactly ``location.version``.

        Raises StaleImage if the stored bytes are no longer that version, ShortRead/BackendError otherwise;
        never returns fewer bytes than asked.
        """

    def describe(self) -> dict[str, str]:
        """What an operator may see about the store (endpoint, bucket...): never a credential."""

    def close(self) -> None: ...


def valid_image_name(name: str) -> bool:
    """Whether a store entry can be shown as a file name: Glance keys images by id, never by paths."""
    return bool(name) and "/" not in name and "\x00" not in name and name not in (".", "..") and len(name.encode()) <= 255


def sidecar_key(kind: str, image_id: str) -> str:
    """Where a store keeps imgfs's ``kind`` of object for an image: a name with a '/', so never listed
    as an image, and one Glance never writes (its keys are image ids)."""
    return f".imgfs/{kind}/{image_id}"
