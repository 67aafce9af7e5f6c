"""A FUSE connection imgfs mounts itself, so it can keep the kernel's INIT request.

libfuse mounts and reads INIT itself, then keeps the request to itself: a successor process, whose
session the kernel will never send INIT again, could not answer a single request (libfuse answers
EIO to everything before INIT). So imgfs opens ``/dev/fuse``, mounts it with mount(2) as libfuse
would (as root: same source, type and options), reads INIT off the fd, and hands both the fd
(``/dev/fd/N``) and the request to its libfuse session (pyfuse3.replay_init). A successor does the
same with the fd and the request it was handed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct
from dataclasses import dataclass

from ..errors import ImgfsError

FUSE_INIT = 26
FUSE_KERNEL_VERSION = 7
_HEADER = struct.Struct("<IIQQIIIHH")  # struct fuse_in_header
_INIT_IN = struct.Struct("<IIIII")  # major, minor, max_readahead, flags, flags2 (struct fuse_init_in)
# FUSE_INIT_EXT (flags bit 30) makes flags2 meaningful; FUSE_HAS_RESEND is bit 39 of the 64 (flags2 bit 7)
_INIT_EXT = 1 << 30
_HAS_RESEND = 1 << 7
_READ_SIZE = 1 << 17  # the kernel refuses reads of /dev/fuse smaller than 8 KiB

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2


class FuseConnectionError(ImgfsError):
    """The FUSE connection cannot be made or adopted."""


@dataclass(frozen=True)
class Init:
    """The kernel's FUSE_INIT request, as read off the fd."""

    request: bytes
    minor: int
    resend: bool  # the kernel can resend requests a dead process had read (FUSE_NOTIFY_RESEND, Linux 6.9)

    @classmethod
    def parse(cls, request: bytes) -> "Init":
        if len(request) < _HEADER.size + _INIT_IN.size:
            raise FuseConnectionError(f"the saved FUSE INIT request is {len(request)} bytes: too short")
        length, opcode, _unique, _node, *_ = _HEADER.unpack_from(request)
        if opcode != FUSE_INIT or length != len(request):
            raise FuseConnectionError(f"the saved FUSE request is not an INIT (opcode {opcode}, {length} of {len(request)} bytes)")
        major, minor, _readahead, flags, flags2 = _INIT_IN.unpack_from(request, _HEADER.size)
        if major != FUSE_KERNEL_VERSION:
            raise FuseConnectionError(f"the kernel speaks FUSE {major}.{minor}, not 7.x")
        return cls(request, minor, bool(flags & _INIT_EXT and flags2 & _HAS_RESEND))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def mount(mountpoint: str, *, fsname: str, subtype: str, allow_other: bool, default_permissions: bool = True,
          read_only: bool = True) -> int:
    """Mount a new FUSE connection on ``mountpoint``; its fd (inheritable: libfuse takes it as
    /dev/fd/N). The kernel's INIT request waits on the connection: read_init."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        raise FuseConnectionError(f"cannot open /dev/fuse ({e.strerror}); is the fuse module loaded?") from None
    try:
        st = os.stat(mountpoint)
        options = [f"fd={fd}", f"rootmode={st.st_mode & 0o170000:o}", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
        if default_permissions:
            options.append("default_permissions")
        if allow_other:
            options.append("allow_other")
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
        if _libc().mount(fsname.encode(), mountpoint.encode(), f"fuse.{subtype}".encode(), flags,
                         ",".join(options).encode()) != 0:
            e = ctypes.get_errno()
            raise FuseConnectionError(f"cannot mount {mountpoint}: {os.strerror(e)}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_init(fd: int) -> Init:
    """The INIT request the kernel queued at mount. Its answer must be written to the same fd (a
    request belongs to the /dev/fuse file that read it)."""
    return Init.parse(os.read(fd, _READ_SIZE))


FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)


def clone(fd: int) -> int:
    """A second /dev/fuse file of the connection behind ``fd`` (inheritable). Requests read from it
    die with it: when the process serving it is killed, the kernel ends them with ECONNABORTED,
    while the connection lives on in ``fd``."""
    try:
        new = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        raise FuseConnectionError(f"cannot open /dev/fuse ({e.strerror})") from None
    try:
        fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, struct.pack("<I", fd))
    except OSError as e:
        os.close(new)
        raise FuseConnectionError(f"cannot clone the FUSE connection: {e.strerror}") from None
    return new


def resend_supported() -> bool:
    """Whether the running kernel can resend a dead server's requests (FUSE_NOTIFY_RESEND, Linux 6.9),
    known before INIT is read (the choice of fd to read it from depends on it); the saved INIT
    confirms it later."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 9)


def unmount(mountpoint: str) -> bool:
    """Unmount ``mountpoint`` now; False if it is busy (a file open, a process inside it)."""
    if _libc().umount2(mountpoint.encode(), 0) == 0:
        return True
    e = ctypes.get_errno()
    if e == errno.EBUSY:
        return False
    if e in (errno.EINVAL, errno.ENOENT):
        return True  # not mounted (any more)
    raise FuseConnectionError(f"cannot unmount {mountpoint}: {os.strerror(e)}")


def detach(mountpoint: str) -> bool:
    """Lazily unmount ``mountpoint`` (what fusermount3 -u -z does); whether it was mounted."""
    if _libc().umount2(mountpoint.encode(), MNT_DETACH) == 0:
        return True
    e = ctypes.get_errno()
    if e not in (errno.EINVAL, errno.ENOENT):
        raise FuseConnectionError(f"cannot unmount {mountpoint}: {os.strerror(e)}")
    return False


def alive(fd: int) -> bool:
    """Whether the connection behind ``fd`` is still mounted: the kernel reports POLLERR on the fd of
    an unmounted or aborted one."""
    p = select.poll()
    p.register(fd, 0)
    return not any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in p.poll(0))


def resend(fd: int) -> None:
    """Ask the kernel to send again the requests a dead process had read and never answered
    (FUSE_NOTIFY_RESEND: a notification with no body, unique 0)."""
    os.write(fd, struct.pack("<IiQ", 16, 7, 0))
