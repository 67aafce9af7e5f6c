#!/usr/bin/env python3
"""The floor row: the least a pyfuse3 file system can do to serve one file.

One read-only file, `image`, backed by a local file. lookup/getattr/open/read, nothing else; read is
os.pread on the trio thread, returning bytes. Same Python, same pyfuse3 and the same kernel as imgfs:
what imgfs spends beyond this is imgfs's own doing (thread hops, bookkeeping, allocations, checks).

    python floor_fs.py SOURCE MOUNTPOINT      (foreground; SIGTERM/SIGINT unmounts)
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

NAME = b"image"
INODE = pyfuse3.ROOT_INODE + 1
TIMEOUT = 3600.0  # immutable: the kernel may keep entries and attributes


class Floor(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.fd = os.open(source, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o555, 2, 0
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, self.size
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_blksize = 1 << 20
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(INODE), 1)

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if inode != INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def release(self, fh):
        pass


def main() -> int:
    source, mountpoint = sys.argv[1], sys.argv[2]
    fs = Floor(source)
    options = set(pyfuse3.default_options)
    options |= {"fsname=imgfs-floor", "ro"}
    pyfuse3.init(fs, mountpoint, options)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
