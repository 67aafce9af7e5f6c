"""systemd's file-descriptor store (sd_notify(3) FDSTORE=1, sd_listen_fds(3)): fds a service keeps
across its own restarts.

``store`` hands systemd a copy of an fd under a name; a later start of the same service gets every
stored fd back as ``LISTEN_FDS`` (from fd 3 on) with ``LISTEN_FDNAMES``. systemd keeps them for a
restart (``systemctl restart``, ``Restart=``) and closes them once the service is fully stopped, or
when one reports POLLERR/POLLHUP (a FUSE connection that was unmounted). Only the main process may
store fds (``NotifyAccess=main``), and only with ``FileDescriptorStoreMax=`` above zero: systemd
drops them otherwise, without a word, so the unit's setting is what ``store``'s caller relies on.
"""

from __future__ import annotations

import array
import logging
import os
import socket

log = logging.getLogger(__name__)

FIRST_FD = 3  # SD_LISTEN_FDS_START


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def available() -> bool:
    """Whether a service manager listens (NOTIFY_SOCKET): fds can be stored."""
    return _address() is not None


def _send(message: str, fds: list[int]) -> bool:
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # (socket.send_fds would drop the address: sendmsg itself)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sock.sendmsg([message.encode()], rights, 0, address)
    except OSError as e:
        log.warning("cannot reach systemd's notify socket %s (%s): %s", os.environ.get("NOTIFY_SOCKET"),
                    message.split("\n", 1)[0], e)
        return False
    return True


def store(name: str, fd: int) -> bool:
    """Ask the service manager to keep a copy of ``fd`` as ``name``."""
    return _send(f"FDSTORE=1\nFDNAME={name}", [fd])


def remove(name: str) -> bool:
    """Ask the service manager to close what it keeps as ``name``."""
    return _send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])


_passed: dict[str, int] | None = None


def inherited() -> dict[str, int]:
    """The fds the service manager passed to this process, by name (the last one of a name wins; the
    others are closed). Unsets the variables, so no child of ours takes them for its own, and makes
    the fds close-on-exec. Later calls return the same dict: what its callers took out is theirs."""
    global _passed
    if _passed is None:
        _passed = _parse()
    return _passed


def _parse() -> dict[str, int]:
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid is None or count is None:
        return {}
    try:
        n = int(count)
        if int(pid) != os.getpid():
            return {}  # meant for another process (a wrapper that exec'd nothing)
    except ValueError:
        log.warning("ignoring the fds systemd passed: LISTEN_PID=%r LISTEN_FDS=%r", pid, count)
        return {}
    labels = names.split(":") if names else []
    found: dict[str, int] = {}
    for i in range(n):
        fd = FIRST_FD + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        name = labels[i] if i < len(labels) else "unknown"
        if name in found:
            os.close(found[name])
        found[name] = fd
    return found
