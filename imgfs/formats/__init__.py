"""Disk-image format layers: decode a stored image object into its virtual raw disk.

Each format module is self-contained (no FUSE, HTTP or store code): it takes an async
``read(offset, length)`` over the stored object's bytes and its size.
"""

from .qcow2 import Extent, Limits, Qcow2Error, Qcow2Image, Qcow2Unsupported

__all__ = ["Extent", "Limits", "Qcow2Error", "Qcow2Image", "Qcow2Unsupported"]
