"""Disk-image format layers: decode a stored image object into its virtual raw disk.

Each format module is self-contained (no FUSE, HTTP or store code): it takes an async
``read(offset, length)`` over the stored object's bytes and its size (qcow2), or the bytes it needs
(the footer of a fixed VHD).
"""

from .errors import FormatError, FormatUnsupported
from .qcow2 import Extent, Limits, Qcow2Error, Qcow2Image, Qcow2Unsupported
from .vhd import FOOTER as VHD_FOOTER
from .vhd import FixedVhd, VhdError, VhdUnsupported, parse_footer as parse_vhd_footer

__all__ = ["Extent", "FixedVhd", "FormatError", "FormatUnsupported", "Limits", "Qcow2Error", "Qcow2Image",
           "Qcow2Unsupported", "VHD_FOOTER", "VhdError", "VhdUnsupported", "parse_vhd_footer"]
