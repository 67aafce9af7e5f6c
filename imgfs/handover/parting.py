"""Bytes a process leaves for its successor at a planned hand-over (the catalog's last listing), in
a sealed memfd in systemd's fd store.

Unlike the state (state.py), written once, on the way out: a successor takes it (and has systemd
drop it), so a later crash never starts from a listing older than the last hand-over.
"""

from __future__ import annotations

import fcntl
import logging
import os

from . import fdstore

log = logging.getLogger(__name__)

MAX_BYTES = 256 << 20  # more than any catalog's listing: beyond, not ours to read whole


def leave(name: str, data: bytes) -> bool:
    """Keep ``data`` as ``name`` in the fd store (replacing what was there); whether systemd took it."""
    fdstore.remove(name)
    fd = os.memfd_create(f"imgfs-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        return fdstore.store(name, fd)
    finally:
        os.close(fd)  # systemd holds its own copy


def take(handed: dict[str, int], name: str) -> bytes | None:
    """What the last process left as ``name`` (None if nothing, or not what ``leave`` writes), and
    tell systemd to drop it."""
    fd = handed.pop(name, None)
    if fd is None:
        return None
    try:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0  # not a memfd at all
        size = os.fstat(fd).st_size
        if not seals & fcntl.F_SEAL_WRITE or size > MAX_BYTES:
            log.warning("ignoring the %s the last imgfs left: not a sealed memfd of at most %d MiB", name, MAX_BYTES >> 20)
            return None
        parts, at = [], 0
        while at < size:
            part = os.pread(fd, min(size - at, 1 << 20), at)
            if not part:
                break
            parts.append(part)
            at += len(part)
        return b"".join(parts)
    except OSError as e:
        log.warning("cannot read the %s the last imgfs left: %s", name, e)
        return None
    finally:
        os.close(fd)
        fdstore.remove(name)
