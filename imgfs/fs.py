"""The FUSE adapter: kernel requests in, calls on the catalog and readers out. No I/O of its own.

Tree::

    /images/<id>             every image, served from its preferred location
    /stores/<store>/<id>     each store's own copy
    /by-name/<name>          -> ../images/<id>   (with the Glance catalog: names are Glance's)
    /raw/<id>                the image's raw disk (with the Glance catalog: disk_format raw as stored,
                             qcow2 decoded; disks.py)

Everything is read-only: the mount is ``ro`` and every modifying request answers EROFS anyway.
This is the only module that turns ``ImgfsError`` into ``FUSEError`` (their errno).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pyfuse3
import trio
import xxhash

from .catalog import Catalog
from .disks import DiskBook, DiskReader, reader_for
from .errors import ImgfsError
from .handover.state import DIR_TAG, State
from .model import Image, Location
from .ratelimit import RateLimit
from .reader import ChunkFetcher, ImageReader

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
IMAGES = ROOT + 1
STORES = ROOT + 2
BY_NAME = ROOT + 3
RAW = ROOT + 4
_DIRS = (ROOT, IMAGES, STORES, BY_NAME, RAW)
_FIRST_STORE = 16
_FIRST_FILE = 1024
_TIMEOUT = 1.0  # seconds the kernel may trust directories and by-name links before asking again
# An image file is immutable while the catalog shows the same version of it: the kernel may keep its
# name and attributes (ls -l and stat of thousands of images stay in the kernel). Every change the
# catalog sees invalidates them (inode, and the name where the image went away).
_FILE_TIMEOUT = 3600.0
NAME_MAX = 255  # bytes in one name, as Linux's own filesystems allow

XATTR_PREFIX = "user.imgfs."
# Whether the installed pyfuse3 passes SEEK_DATA/SEEK_HOLE on to Operations.lseek (patches/pyfuse3);
# stock pyfuse3 leaves them to the kernel, which finds data from start to end.
SEEKS_SERVED = "lseek" in vars(pyfuse3.Operations)

_H = TypeVar("_H", bound=Callable[..., Awaitable[Any]])


def _guarded(handler: _H) -> _H:
    """A bug in a handler fails that request with EIO and one logged traceback. pyfuse3 lets only
    FUSEError out of a handler: anything else ends pyfuse3.main(), and with it the whole daemon (the
    mount, and the Image API endpoint that Cinder and Nova download through)."""

    @functools.wraps(handler)
    async def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error in the FUSE %s handler; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return run  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class _File:
    store: str | None  # None: the images/ view (preferred location)
    image_id: str
    raw: bool = False  # the raw/ view: the image's raw disk


@dataclass(frozen=True, slots=True)
class _Link:
    name: str  # an entry of by-name/


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, catalog: Catalog, fetcher: ChunkFetcher, *, prefetch_max: int, uid: int = 0, gid: int = 0,
                 group_only: bool = False, disks: DiskBook | None = None) -> None:
        super().__init__()
        self.catalog = catalog
        self.fetcher = fetcher
        self.prefetch_max = prefetch_max
        self.disks = disks  # the raw/ view (only with a catalog that knows disk formats: Glance)
        self.uid, self.gid = uid, gid
        # group_only: readable by the owner and the group alone (the kernel enforces the modes)
        self._file_mode, self._dir_mode = (0o440, 0o550) if group_only else (0o444, 0o555)
        self._store_inodes = {name: _FIRST_STORE + i for i, name in enumerate(catalog.store_names)}
        self._inode_stores = {ino: name for name, ino in self._store_inodes.items()}
        # With a hand-over state (handover/): every inode and handle the kernel learns of is written there
        # first, so the next imgfs process answers for them as this one would.
        self.state: State | None = None
        self._file_inodes: dict[_File | _Link, int] = {}
        self._files: dict[int, _File] = {}
        self._links: dict[int, _Link] = {}
        self.by_name = catalog.source is not None
        # Set by whoever mounts us once the mount is tuned: a file keeps the kernel readahead it was
        # opened with, so an open that races the tuning waits for it (milliseconds, once).
        self.opens_wait_for: trio.Event | None = None
        self._next_inode = _FIRST_FILE
        self._handles: dict[int, ImageReader | DiskReader] = {}
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self.bytes_served = 0
        self._failures_logged = RateLimit(60.0)
        self._reading = 0  # read requests in flight
        self._drained: trio.Event | None = None  # set once shutdown began and no read is in flight
        self.invalidate = _invalidate_kernel_cache
        self.forget_name = _invalidate_kernel_entry
        catalog.listeners.append(self._on_change)

    # ---- inodes -------------------------------------------------------------------------------------

    def _file_inode(self, node: _File | _Link) -> int:
        ino = self._file_inodes.get(node)
        if ino is None:
            ino = self._next_inode
            if self.state is not None:  # before the kernel hears of it
                self.state.add_inode(ino, _key(node))
            self._remember(ino, node)
        return ino

    def _remember(self, ino: int, node: _File | _Link) -> None:
        self._file_inodes[node] = ino
        if isinstance(node, _Link):
            self._links[ino] = node
        else:
            self._files[ino] = node
        self._next_inode = max(self._next_inode, ino + 1)

    def record_to(self, state: State) -> None:
        """Write what the kernel will learn of to ``state`` (a first mount): from now on, and the store
        directories' inodes now."""
        for name, ino in self._store_inodes.items():
            state.add_inode(ino, ["s", name])
        self.state = state

    def adopt(self, state: State) -> int:
        """Take over the inodes and handles a predecessor recorded in ``state``; how many inodes."""
        records = state.inodes()
        stores = {name: ino for ino, (kind, *rest) in records if kind == "s" for name in rest[:1]}
        for name in self.catalog.store_names:  # a store added since: a number no predecessor gave out
            if name not in stores:
                stores[name] = max([_FIRST_STORE - 1, *stores.values()]) + 1
                state.add_inode(stores[name], ["s", name])
        self._store_inodes = {name: ino for name, ino in stores.items() if name in self.catalog.store_names}
        self._inode_stores = {ino: name for name, ino in self._store_inodes.items()}
        for ino, key in records:
            node = _node(key)
            if node is not None:
                self._remember(ino, node)
        self.state = state
        return len(records)

    def _link_target(self, node: _Link) -> bytes | None:
        image_id = self.catalog.names().get(node.name)
        return None if image_id is None else f"../images/{image_id}".encode()

    def _link_attr(self, ino: int, target: bytes) -> pyfuse3.EntryAttributes:
        attr = self._attr(ino)
        attr.st_mode = stat.S_IFLNK | 0o777
        attr.st_nlink = 1
        attr.st_size = len(target)
        return attr

    def _location(self, node: _File) -> Location | None:
        return self.catalog.location(node.store, node.image_id)

    def _raw_size(self, node: _File) -> int | None:
        image = self.catalog.image(node.image_id)
        if image is None or self.disks is None or not self.disks.offered(image):
            return None
        return self.disks.size(image)

    def _raw_blocks(self, node: _File) -> int | None:
        image = self.catalog.image(node.image_id)
        allocated = None if image is None or self.disks is None else self.disks.allocated(image)
        return None if allocated is None else (allocated + 511) // 512

    def _dir_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = self._attr(ino)
        attr.st_mode = stat.S_IFDIR | self._dir_mode
        attr.st_nlink = 2
        attr.st_size = 0
        return attr

    def _file_attr(self, ino: int, loc: Location, size: int | None = None) -> pyfuse3.EntryAttributes:
        attr = self._attr(ino)
        attr.entry_timeout = attr.attr_timeout = _FILE_TIMEOUT
        attr.st_mode = stat.S_IFREG | self._file_mode
        attr.st_nlink = 1
        attr.st_size = loc.size if size is None else size
        # Full allocation on purpose: a smaller st_blocks makes cp/tar treat the file as sparse and skip
        # reading parts of it (without SEEK_DATA they could not know where the data is).
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_blksize = self.fetcher.chunk_size
        ns = int(loc.mtime * 1e9)
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = ns
        return attr

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = attr.attr_timeout = _TIMEOUT
        attr.st_uid, attr.st_gid = self.uid, self.gid
        return attr

    # ---- lookups and attributes ---------------------------------------------------------------------

    @_guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:  # the kernel passes names up to ~4 KiB; statfs promises 255
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if parent_inode == ROOT:
            if text == "images":
                return self._dir_attr(IMAGES)
            if text == "stores":
                return self._dir_attr(STORES)
            if text == "by-name" and self.by_name:
                return self._dir_attr(BY_NAME)
            if text == "raw" and self.disks is not None:
                return self._dir_attr(RAW)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_inode == RAW and self.disks is not None:
            image = self.catalog.image(text) or await self.catalog.lookup(text)
            if image is None or not self.disks.offered(image):
                raise pyfuse3.FUSEError(errno.ENOENT)
            try:
                disk = await self.disks.open(image)
            except ImgfsError as e:  # refused (logged once): not offered; a store failing: its errno
                raise pyfuse3.FUSEError(errno.ENOENT if not self.disks.offered(image) else e.errno) from None
            attr = self._file_attr(self._file_inode(_File(None, text, raw=True)), disk.primary, disk.size)
            if disk.allocated is not None:  # holes are served (SEEK_HOLE): cp and tar may trust st_blocks
                attr.st_blocks = (disk.allocated + 511) // 512
            return attr
        if parent_inode == BY_NAME:
            link = _Link(text)
            target = self._link_target(link)
            if target is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._link_attr(self._file_inode(link), target)
        if parent_inode == STORES:
            ino = self._store_inodes.get(text)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attr(ino)
        if parent_inode == IMAGES or parent_inode in self._inode_stores:
            store = self._inode_stores.get(parent_inode)
            node = _File(store, text)
            loc = self._location(node)
            if loc is None:
                image = await self.catalog.lookup(text)
                loc = None if image is None else (image.primary if store is None else image.at(store))
            if loc is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._file_attr(self._file_inode(node), loc)
        if parent_inode in self._files:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_guarded
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return self._attr_of(inode)

    def _attr_of(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode in _DIRS or inode in self._inode_stores:
            return self._dir_attr(inode)
        link = self._links.get(inode)
        if link is not None:
            target = self._link_target(link)
            if target is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._link_attr(inode, target)
        node = self._files.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        loc = self._location(node)
        if loc is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.raw:
            size = self._raw_size(node)
            if size is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr = self._file_attr(inode, loc, size)
            blocks = self._raw_blocks(node)
            if blocks is not None:
                attr.st_blocks = blocks
            return attr
        return self._file_attr(inode, loc)

    # ---- directories --------------------------------------------------------------------------------

    @_guarded
    async def readlink(self, inode: int, ctx=None) -> bytes:
        link = self._links.get(inode)
        target = None if link is None else self._link_target(link)
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOENT if link is not None else errno.EINVAL)
        return target

    def _children(self, inode: int) -> Iterator[tuple[str, int]]:
        if inode == ROOT:
            yield from (("images", IMAGES), ("stores", STORES))
            if self.by_name:
                yield "by-name", BY_NAME
            if self.disks is not None:
                yield "raw", RAW
        elif inode == RAW and self.disks is not None:
            for image_id in self.catalog.image_ids():
                node = _File(None, image_id, raw=True)
                if self._raw_size(node) is not None:
                    yield image_id, self._file_inode(node)
        elif inode == BY_NAME:
            for name in sorted(self.catalog.names()):
                yield name, self._file_inode(_Link(name))
        elif inode == STORES:
            yield from self._store_inodes.items()
        elif inode == IMAGES or inode in self._inode_stores:
            store = self._inode_stores.get(inode)
            for image_id in self.catalog.image_ids(store):
                yield image_id, self._file_inode(_File(store, image_id))
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)

    @_guarded
    async def opendir(self, inode: int, ctx=None) -> int:
        # A snapshot per open directory, so paging through it stays consistent while the catalog changes.
        if inode == RAW and self.disks is not None:  # sizes of qcow2 disks come from their headers
            await self.disks.learn_sizes([i for i in map(self.catalog.image, self.catalog.image_ids()) if i is not None])
        entries = self._listing(inode)
        fh = self._new_fh(inode, DIR_TAG)
        self._dirs[fh] = entries
        return fh

    def _listing(self, inode: int) -> list[tuple[bytes, int]]:
        return [(name.encode(), ino) for name, ino in self._children(inode)]

    @_guarded
    async def readdir(self, fh: int, start_id: int, token) -> None:
        entries = self._dirs.get(fh)
        if entries is None:  # opened before a hand-over: list it afresh
            entries = self._dirs[fh] = self._listing(self._adopted(fh, directory=True)[0])
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            try:
                attr = self._attr_of(ino)
            except pyfuse3.FUSEError:
                continue  # vanished since opendir
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    @_guarded
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        if self.state is not None:
            self.state.close(fh)

    # ---- files --------------------------------------------------------------------------------------

    def _new_fh(self, inode: int, tag: int) -> int:
        if self.state is not None:
            try:
                return self.state.open(inode, tag)
            except ImgfsError as e:
                raise pyfuse3.FUSEError(errno.ENFILE) from e
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _adopted(self, fh: int, directory: bool = False) -> tuple[int, int]:
        """(inode, tag) of a handle a predecessor opened; EBADF if there is none."""
        found = None if self.state is None else self.state.handle(fh)
        if found is None or (found[1] == DIR_TAG) != directory:
            raise pyfuse3.FUSEError(errno.EBADF)
        return found

    async def _reader_of(self, fh: int) -> ImageReader | DiskReader:
        """The reader of ``fh``: made again for a file a predecessor opened, if it is the same version."""
        reader = self._handles.get(fh)
        if reader is not None:
            return reader
        inode, tag = self._adopted(fh)
        node = self._files.get(inode)
        loc = None if node is None else self._location(node)
        if node is None or loc is None or _tag(loc) != tag:
            raise pyfuse3.FUSEError(errno.ESTALE)  # gone or replaced since it was opened: never two versions
        reader = await self._reader(node, loc)
        if fh in self._handles:  # another read of it made one meanwhile
            reader.close()
            return self._handles[fh]
        self._handles[fh] = reader
        return reader

    @_guarded
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.opens_wait_for is not None and not self.opens_wait_for.is_set():
            await self.opens_wait_for.wait()
        node = self._files.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode in _DIRS or inode in self._inode_stores else errno.ENOENT)
        loc = self._location(node)
        if loc is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        reader = await self._reader(node, loc)
        try:
            fh = self._new_fh(inode, _tag(loc))
        except BaseException:
            reader.close()
            raise
        self._handles[fh] = reader
        info = pyfuse3.FileInfo(fh=fh)
        info.keep_cache = True  # an open pins one version; the kernel cache is dropped when it changes
        return info

    async def _reader(self, node: _File, loc: Location) -> ImageReader | DiskReader:
        image = self.catalog.image(node.image_id)
        if node.raw:
            if image is None or self.disks is None or not self.disks.offered(image):
                raise pyfuse3.FUSEError(errno.ENOENT)
            try:
                disk = await self.disks.open(image)
            except ImgfsError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            return reader_for(self.disks, disk, image)
        locations = self.fetcher.order(image.locations) if image is not None and node.store is None else [loc]
        verify = None if image is None else \
            self.fetcher.verifier(locations, image.get("os_hash_algo"), image.get("os_hash_value"), loc.size)
        return ImageReader(self.fetcher, locations, prefetch_max=self.prefetch_max, verify=verify,
                           on_integrity_error=self.fetcher.drop_copies)

    @_guarded
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE (the kernel answers the other whences itself). Called only with the
        patched pyfuse3 (patches/pyfuse3); stock pyfuse3 leaves them to the kernel: all data."""
        reader = await self._reader_of(fh)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            if isinstance(reader, DiskReader):
                found = await reader.disk.seek(off, whence == os.SEEK_DATA)
            else:  # a stored image: data from start to end
                size = reader.loc.size
                found = None if off >= size else (off if whence == os.SEEK_DATA else size)
        except ImgfsError as e:
            self._log_failure(reader.loc.image_id, e)
            raise pyfuse3.FUSEError(e.errno) from None
        if found is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return found

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        if self._drained is not None:
            raise pyfuse3.FUSEError(errno.EIO)
        reader = self._handles.get(fh)
        if reader is None:
            reader = await self._reader_of(fh)
        self._reading += 1
        try:
            data = await reader.read(off, size)
        except ImgfsError as e:
            self._log_failure(reader.loc.image_id, e)
            raise pyfuse3.FUSEError(e.errno) from None
        finally:
            self._reading -= 1
            if self._drained is not None:  # only while stopping: no call per read otherwise
                self._check_drained()
        self.bytes_served += len(data)
        return data

    def _check_drained(self) -> None:
        if self._drained is not None and not self._reading and not self._handles:
            self._drained.set()

    async def drain(self, timeout: float) -> tuple[int, int]:
        """Before unmounting: refuse new reads (EIO), let those in flight finish and readers close their
        files, for up to ``timeout`` seconds. A reader then sees its data or EIO, not a mount torn from
        under it (ENOTCONN). Returns (reads, open files) left when the time ran out."""
        self._drained = trio.Event()
        self._check_drained()
        with trio.move_on_after(timeout):
            await self._drained.wait()
        return self._reading, len(self._handles)

    def _log_failure(self, image_id: str, e: ImgfsError) -> None:
        """One line per image and kind of failure a minute: a dd against a dead store fails hundreds of
        kernel requests, and the operator needs the first one, not a flood."""
        if self._failures_logged.allow((image_id, type(e))):
            log.warning("read of image %s failed (%s): %s", image_id, errno.errorcode.get(e.errno, e.errno), e)

    @_guarded
    async def release(self, fh: int) -> None:
        reader = self._handles.pop(fh, None)
        if reader is not None:
            reader.close()
        if self.state is not None:
            self.state.close(fh)
        self._check_drained()

    @_guarded
    async def flush(self, fh: int) -> None:
        pass

    # ---- extended attributes ------------------------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, str]:
        node = self._files.get(inode)
        if node is None:
            return {}
        loc = self._location(node)
        if loc is None:
            return {}
        image: Image | None = self.catalog.image(node.image_id)
        stores = [l.store for l in image.locations] if image is not None else [loc.store]
        # images/<id> reads the copies in the fetcher's order: name the one a read would start with now
        first = self.fetcher.order(image.locations)[0].store if node.store is None and image is not None else loc.store
        attrs = {
            "image_id": node.image_id,
            "size": str(loc.size),
            "store": first,
            "stores": ",".join(stores),
            "version": loc.version,
            "chunk_size": str(self.fetcher.chunk_size),
            "cached_fraction": f"{self.fetcher.cached_fraction(loc):.4f}",
        }
        if image is not None:  # Glance's metadata, when Glance is the catalog
            if image.name:
                attrs["name"] = image.name
            attrs.update(image.meta)
        if node.raw:  # the raw disk: its own size, and what it is made from
            size = self._raw_size(node)
            if size is None:
                return {}
            attrs.update(size=str(size), stored_size=str(loc.size), decodes=f"images/{node.image_id}",
                         decoded_from=(image.get("disk_format") if image is not None else None) or "raw")
        return attrs

    @_guarded
    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        return [(XATTR_PREFIX + name).encode() for name in self._xattrs(inode)]

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        key = name.decode("utf-8", "replace")
        if not key.startswith("user."):
            # security.*, system.* (ACLs), trusted.*: namespaces imgfs does not have. ENOTSUP says so, and
            # ls -l then stops asking for the rest of the mount (coreutils caches it per device): two round
            # trips per file fewer (ls -l of 10,000 images: 20,000 requests).
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if not key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._xattrs(inode).get(key[len(XATTR_PREFIX):])
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @_guarded
    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        ids = self.catalog.image_ids()
        total = sum(loc.size for loc in (self.catalog.location(None, i) for i in ids) if loc is not None)
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = (total + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(ids)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = NAME_MAX
        return data

    # ---- everything that would modify the tree ------------------------------------------------------

    async def _read_only(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = create = mkdir = mknod = symlink = link = unlink = rmdir = rename = _read_only
    setxattr = removexattr = write = fsync = _read_only

    # ---- catalog changes ----------------------------------------------------------------------------

    async def _on_change(self, image_id: str, old: Image | None, new: Image | None) -> None:
        """Drop what the kernel cached of an image whose bytes changed (keep_cache would keep them)."""
        if old is None:
            return
        views = [_File(None, image_id), _File(None, image_id, raw=True), *(_File(loc.store, image_id) for loc in old.locations)]
        for node in views:
            store = node.store
            ino = self._file_inodes.get(node)
            if ino is None:
                continue
            before = old.primary if store is None else old.at(store)
            after = None if new is None else (new.primary if store is None else new.at(store))
            if before != after:
                await self.invalidate(ino)
                if after is None:  # gone from this view: the kernel must forget the name too
                    parent = (RAW if node.raw else IMAGES) if store is None else self._store_inodes.get(store)
                    if parent is not None:
                        # In the background: the kernel takes the directory's lock to forget a name, and
                        # a lookup in that directory may be what waits on this notification (a lookup
                        # of an unknown id publishes the catalog's changes): awaiting it here could
                        # deadlock.
                        self.fetcher.spawn(self.forget_name, parent, image_id)


def _key(node: _File | _Link) -> list:
    return ["l", node.name] if isinstance(node, _Link) else ["f", node.store, node.image_id, node.raw]


def _node(key: list) -> _File | _Link | None:
    if key[0] == "l":
        return _Link(key[1])
    if key[0] == "f":
        return _File(key[1], key[2], bool(key[3]))
    return None


def _tag(loc: Location) -> int:
    """Which version of a file a handle opened (a hand-over state's slot keeps it): 63 bits of a hash."""
    return xxhash.xxh3_64_intdigest(f"{loc.store}\0{loc.image_id}\0{loc.version}\0{loc.size}".encode()) >> 1


async def _invalidate_kernel_entry(parent: int, name: str) -> None:
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name.encode(), 0)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.debug("invalidating name %s in inode %d: %s", name, parent, e)


async def _invalidate_kernel_cache(inode: int) -> None:
    # In a worker thread: the notification write can block while the kernel waits on a request this
    # trio loop has yet to answer.
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of this inode
            log.debug("invalidating inode %d: %s", inode, e)
