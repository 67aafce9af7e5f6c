"""What a successor needs to answer the kernel where the last process left off, in one memfd that
systemd's fd store keeps beside the FUSE fd.

Written as it changes, not at exit, so a process killed without warning leaves it complete: every
record is on the memfd before the kernel hears of what it names (a lookup's inode, an open's handle).

Layout (little-endian)::

    [0, 4096)            header: magic, layout version, fingerprint, the kernel's INIT request
    [4096, +SLOTS*16)    open handles: slot i is handle i+1: (inode, tag) of what it opened, 0 if free
    [JOURNAL, ...)       inode records, appended: (length, crc32, JSON key), never rewritten

A handle's tag says which version of the file it opened (fs.py decides what that means); a successor
that finds another version answers that handle's reads ESTALE rather than mixing two versions. A
torn last record (a kill in the middle of a write) fails its crc and is ignored: its inode was never
answered to the kernel.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from dataclasses import dataclass, field

from ..errors import ImgfsError

MAGIC = b"IMGFS-STATE\0"
LAYOUT = 1
HEADER = 4096
SLOTS = 65536  # open files and directories at once (LimitNOFILE's order)
_SLOT = struct.Struct("<QQ")
JOURNAL = HEADER + SLOTS * _SLOT.size
_HEAD = struct.Struct("<12sII32sI")  # magic, layout, reserved, fingerprint (sha256), INIT length
_REC = struct.Struct("<II")
DIR_TAG = 1 << 63  # a slot of an open directory (its tag): no version to pin


class StateError(ImgfsError):
    """The state handed over cannot be used (another layout, another build, damaged)."""


@dataclass
class State:
    fd: int
    fingerprint: bytes
    init: bytes
    _free: list[int] = field(default_factory=list)  # slot indexes free below _top
    _top: int = 0  # slots [0, _top) were used at some time
    _end: int = JOURNAL  # where the next inode record goes

    @classmethod
    def create(cls, init: bytes, fingerprint: bytes) -> "State":
        if len(init) > HEADER - _HEAD.size:
            raise StateError(f"the FUSE INIT request is {len(init)} bytes; the state has room for {HEADER - _HEAD.size}")
        fd = os.memfd_create("imgfs-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, JOURNAL)
        os.pwrite(fd, _HEAD.pack(MAGIC, LAYOUT, 0, fingerprint, len(init)) + init, 0)
        # it only grows: nobody (a bug of ours included) can cut records from under a successor
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        return cls(fd, fingerprint, init)

    @classmethod
    def adopt(cls, fd: int) -> "State":
        head = os.pread(fd, HEADER, 0)
        if len(head) < _HEAD.size:
            raise StateError("the state handed over is empty")
        magic, layout, _, fingerprint, length = _HEAD.unpack_from(head)
        if magic != MAGIC or layout != LAYOUT or length > HEADER - _HEAD.size:
            raise StateError(f"the state handed over is not imgfs's layout {LAYOUT}")
        state = cls(fd, fingerprint, head[_HEAD.size : _HEAD.size + length])
        table = os.pread(fd, SLOTS * _SLOT.size, HEADER)
        used = [i for i in range(SLOTS) if table[i * 16 : i * 16 + 16] != bytes(16)]
        state._top = used[-1] + 1 if used else 0
        state._free = sorted(set(range(state._top)) - set(used), reverse=True)
        return state

    # ---- open handles -------------------------------------------------------------------------------

    def open(self, inode: int, tag: int) -> int:
        """A new handle for ``inode`` opened at ``tag``: written before the kernel learns of it."""
        if self._free:
            slot = self._free.pop()
        elif self._top < SLOTS:
            slot, self._top = self._top, self._top + 1
        else:
            raise StateError(f"{SLOTS} files are open at once: no handle left")
        os.pwrite(self.fd, _SLOT.pack(inode, tag), HEADER + slot * _SLOT.size)
        return slot + 1

    def close(self, fh: int) -> None:
        slot = fh - 1
        if 0 <= slot < self._top:
            os.pwrite(self.fd, bytes(_SLOT.size), HEADER + slot * _SLOT.size)
            self._free.append(slot)

    def handle(self, fh: int) -> tuple[int, int] | None:
        """(inode, tag) of a handle a predecessor opened, None if it is not open."""
        slot = fh - 1
        if not 0 <= slot < SLOTS:
            return None
        inode, tag = _SLOT.unpack(os.pread(self.fd, _SLOT.size, HEADER + slot * _SLOT.size))
        return None if inode == 0 else (inode, tag)

    # ---- inodes -------------------------------------------------------------------------------------

    def add_inode(self, inode: int, key: list) -> None:
        body = json.dumps([inode, key], separators=(",", ":")).encode()
        os.pwrite(self.fd, _REC.pack(len(body), zlib.crc32(body)) + body, self._end)
        self._end += _REC.size + len(body)

    def inodes(self) -> list[tuple[int, list]]:
        """Every inode record, in the order they were made; sets where the next one goes."""
        found = []
        end = os.fstat(self.fd).st_size
        pos = JOURNAL
        while pos + _REC.size <= end:
            length, crc = _REC.unpack(os.pread(self.fd, _REC.size, pos))
            body = os.pread(self.fd, length, pos + _REC.size) if length else b""
            if length == 0 or len(body) != length or zlib.crc32(body) != crc:
                break  # the end, or a record torn by a kill: its inode never reached the kernel
            inode, key = json.loads(body)
            found.append((inode, key))
            pos += _REC.size + length
        self._end = pos
        return found
