"""The one error tree of imgfs.

Every error that can reach a reader carries the errno the FUSE layer answers with; fs.py is the only
place that turns them into ``FUSEError``. Third-party exceptions (botocore, OSError from a file store)
are mapped to these classes where they arise, with ``raise ... from``. Messages never contain a secret:
they are built from store names, image ids and endpoints, never from credentials or signed URLs.
"""

from __future__ import annotations

import errno


class ImgfsError(Exception):
    """Base class; ``errno`` is what a reader of the mount sees."""

    errno: int = errno.EIO


class ConfigError(ImgfsError):
    """A configuration file is unreadable or holds a bad value (exit code 2)."""

    errno = errno.EINVAL


class StaleImage(ImgfsError):
    """The object changed under an open file: its bytes would mix two versions."""

    errno = errno.ESTALE


class BackendError(ImgfsError):
    """A store failed to deliver bytes (network, server error, short read)."""

    errno = errno.EIO


class BackendUnavailable(BackendError):
    """The store cannot be reached at all (refused connection, DNS, timeout)."""


class BackendAccessDenied(BackendError):
    """The store refused our credentials (HTTP 403) -- a configuration problem, not a transient one."""

    errno = errno.EACCES


class ShortRead(BackendError):
    """A store returned fewer bytes than asked for; we never pad with zeros."""


class IntegrityError(ImgfsError):
    """An image read end to end does not hash to what the catalog says: EIO, never the bytes as good."""

    errno = errno.EIO


class Busy(ImgfsError):
    errno = errno.EBUSY
