"""Glance's filesystem store: one file per image, named by image id, in filesystem_store_datadir."""

from __future__ import annotations

import errno
import os
import stat

from ..config import FileStoreConfig
from ..errors import BackendError, BackendUnavailable, ShortRead, StaleImage
from ..model import Location
from .base import valid_image_name


def _version(st: os.stat_result) -> str:
    # Glance never rewrites an image file in place; size, mtime and inode together change if anyone does.
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"


class FileBackend:
    kind = "file"
    read_timeout = None

    def __init__(self, cfg: FileStoreConfig) -> None:
        self.name = cfg.name
        self.datadir = cfg.datadir

    def _location(self, image_id: str, st: os.stat_result) -> Location:
        return Location(self.name, image_id, st.st_size, _version(st), st.st_mtime)

    def list_images(self) -> list[Location]:
        try:
            entries = list(os.scandir(self.datadir))
        except OSError as e:
            raise BackendUnavailable(
                f"store '{self.name}': cannot list {self.datadir}: {os.strerror(e.errno or errno.EIO)}; "
                "check filesystem_store_datadir"
            ) from None
        result = []
        for entry in entries:
            if entry.name.startswith(".") or not valid_image_name(entry.name):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue  # removed while listing
            if stat.S_ISREG(st.st_mode):
                result.append(self._location(entry.name, st))
        return result

    def stat(self, image_id: str) -> Location | None:
        if not valid_image_name(image_id) or image_id.startswith("."):
            return None
        try:
            st = os.stat(os.path.join(self.datadir, image_id))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise BackendError(f"store '{self.name}': cannot stat image {image_id}: {os.strerror(e.errno or errno.EIO)}") from None
        return self._location(image_id, st) if stat.S_ISREG(st.st_mode) else None

    def read(self, location: Location, offset: int, length: int) -> bytes:
        path = os.path.join(self.datadir, location.image_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StaleImage(f"store '{self.name}': image {location.image_id} was removed") from None
        except OSError as e:
            raise BackendError(f"store '{self.name}': cannot open image {location.image_id}: {os.strerror(e.errno or errno.EIO)}") from None
        try:
            if _version(os.fstat(fd)) != location.version:
                raise StaleImage(f"store '{self.name}': image {location.image_id} changed on disk")
            data = os.pread(fd, length, offset)
            while len(data) < length:  # pread may return short on big reads; EOF is the only real short
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    raise ShortRead(
                        f"store '{self.name}': image {location.image_id} ended at {offset + len(data)}, "
                        f"expected {offset + length}"
                    )
                data += more
            return data
        except OSError as e:
            raise BackendError(f"store '{self.name}': read error on image {location.image_id}: {os.strerror(e.errno or errno.EIO)}") from None
        finally:
            os.close(fd)

    def describe(self) -> dict[str, str]:
        return {"type": "file", "datadir": self.datadir}

    def close(self) -> None:
        pass
