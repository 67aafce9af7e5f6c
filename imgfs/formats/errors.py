"""The errors of every format layer: a malformed image (EIO) and a valid one we do not serve (EOPNOTSUPP)."""

from __future__ import annotations

import errno

from ..errors import ImgfsError


class FormatError(ImgfsError):
    """The image is not one of its format we can decode correctly (malformed, or marked corrupt)."""

    errno = errno.EIO


class FormatUnsupported(FormatError):
    """A valid image, of a kind imgfs deliberately does not serve (a backing file, encryption, a
    dynamic VHD, ...).

    EOPNOTSUPP rather than EIO: the image is not damaged, and a reader (or an operator reading the
    log) should learn that retrying will not help but converting the image would.
    """

    errno = errno.EOPNOTSUPP
