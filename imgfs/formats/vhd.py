"""Fixed VHD (Glance's ``vhd`` disk format): the raw disk is the file's bytes before its 512-byte footer.

Only the footer is decoded, from the last 512 bytes of the stored object (the Virtual Hard Disk Image
Format Specification, "Hard Disk Footer Format"). A dynamic or differencing VHD (a block allocation
table, a parent disk named inside the image) is refused, never guessed at.

The disk's size is the one qemu gives the same file (block/vpc.c), so that ``qemu-img convert -f vpc``
and a read of raw/ agree: Virtual PC and qemu before the ``force_size`` option sized a disk by its CHS
geometry, everything else (Hyper-V, Azure, disk2vhd, XenServer, qemu's ``qem2``) by the footer's
current size; a disk at the largest geometry is always its current size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FormatError, FormatUnsupported

FOOTER = 512
COOKIE = b"conectix"
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
_SIZED_BY_GEOMETRY = (b"vpc ", b"qemu")  # creator applications whose disks are their CHS geometry
_MAX_GEOMETRY = (65535, 16, 255)


class VhdError(FormatError):
    """A VHD footer we cannot trust: not one, a bad checksum, a size the file does not hold."""


class VhdUnsupported(VhdError, FormatUnsupported):
    """A valid VHD that is not a fixed one."""


@dataclass(frozen=True)
class FixedVhd:
    virtual_size: int  # bytes [0, virtual_size) of the stored object are the disk
    creator: str  # the footer's creator application, for the log line
    sized_by: str  # "geometry" or "current size": which of the footer's two sizes qemu uses


def parse_footer(footer: bytes, file_size: int) -> FixedVhd:
    """The fixed disk that ``footer`` (the stored object's last 512 bytes) describes."""
    if len(footer) != FOOTER or file_size < FOOTER:
        raise VhdError(f"vhd: the image is {file_size} bytes, too small for a 512-byte footer")
    if footer[:8] != COOKIE:
        raise VhdError("vhd: no footer (the last 512 bytes do not start with 'conectix')")
    checksum = struct.unpack_from(">I", footer, 64)[0]
    summed = (~(sum(footer[:64]) + sum(footer[68:]))) & 0xFFFFFFFF
    if summed != checksum:
        raise VhdError(f"vhd: footer checksum {checksum:#010x}, computed {summed:#010x}")
    creator = footer[28:32]
    current_size = struct.unpack_from(">Q", footer, 48)[0]
    cylinders, heads, sectors = struct.unpack_from(">HBB", footer, 56)
    disk_type = struct.unpack_from(">I", footer, 60)[0]
    if disk_type in (DYNAMIC, DIFFERENCING):
        kind = "dynamic" if disk_type == DYNAMIC else "differencing (it has a parent disk)"
        raise VhdUnsupported(f"vhd: a {kind} VHD, not a fixed one; convert it with qemu-img convert -O vpc "
                             f"-o subformat=fixed, or to raw")
    if disk_type != FIXED:
        raise VhdError(f"vhd: unknown disk type {disk_type}")
    if creator in _SIZED_BY_GEOMETRY and (cylinders, heads, sectors) != _MAX_GEOMETRY:
        size, sized_by = cylinders * heads * sectors * 512, "geometry"
    else:
        size, sized_by = current_size, "current size"
    if size > file_size - FOOTER:
        raise VhdError(f"vhd: the footer gives a {size}-byte disk ({sized_by}), the file holds {file_size - FOOTER} "
                       f"bytes before it")
    return FixedVhd(size, creator.decode("ascii", "replace"), sized_by)
