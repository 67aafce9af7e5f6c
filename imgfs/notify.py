"""systemd's notify protocol (sd_notify(3)): one datagram per state change to $NOTIFY_SOCKET.

A no-op when not started by systemd. Small enough that a dependency would cost more than it saves.

Sent without blocking: notify() is called on the event loop, and a datagram socket whose queue is full
(a receiver that is not reading; Linux queues only net.unix.max_dgram_qlen datagrams) would otherwise
block the sender, and with it every FUSE request. Such a message is dropped with a warning: systemd
drains its socket, and the watchdog's next ping comes within half its timeout.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``READY=1``, ``STATUS=...`` etc.; returns whether a socket was there to send to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except BlockingIOError:
        log.warning("systemd's notify socket %s is full; dropped %s", os.environ.get("NOTIFY_SOCKET"),
                    ", ".join(f.split("=", 1)[0] for f in fields))
        return False
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True
