"""The libfuse session of one imgfs process: a new mount, or the one a predecessor handed over.

``open_session`` takes the fds systemd passed back (fdstore.inherited) if they are a live imgfs
connection and a state this build can use; else it mounts afresh (and, where a hand-over is
possible, stores both fds for the next process). ``close_session`` either lets go of the connection
for a successor (a restart) or unmounts it and tells systemd to drop its copies (a stop).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import pyfuse3

from ..errors import ImgfsError
from . import REPLAY, connection, fdstore
from .connection import Init
from .state import State

log = logging.getLogger(__name__)

FUSE_FD, STATE_FD = "fuse", "state"  # their names in systemd's fd store


@dataclass
class Session:
    mountpoint: str
    fd: int | None = None  # the connection's fd when imgfs mounted it itself (libfuse serves it as /dev/fd/N)
    master: int | None = None  # the fd the service manager keeps, if libfuse serves a clone of it
    state: State | None = None
    adopted: bool = False  # handed over by a predecessor
    stored: bool = False  # the service manager holds copies of the connection and the state


def fingerprint(options: set[str], ops: Any) -> bytes:
    """What the INIT negotiation depends on: a successor that would negotiate otherwise (another
    pyfuse3, other options) must not serve the kernel's connection as if it had agreed to it."""
    flags = [getattr(ops, a, None) for a in ("supports_dot_lookup", "enable_writeback_cache", "enable_acl")]
    return hashlib.sha256(repr((pyfuse3.__version__, sorted(options), flags)).encode()).digest()


RESEND_ENV = "IMGFS_FUSE_RESEND"  # "off": after a crash, fail the requests it had read (ECONNABORTED)


def _resend_wanted() -> bool:
    """After a crash, have the kernel resend what the dead process had read (Linux >= 6.9), rather than
    fail it. Without resend, libfuse serves a clone of the stored fd: the kernel ends the requests
    read from a clone when the process dies with it (ECONNABORTED), where on the stored fd they
    would wait for an answer forever."""
    return os.environ.get(RESEND_ENV, "auto") != "off" and connection.resend_supported()


def _mounted_here(mountpoint: str) -> bool:
    """Whether an imgfs FUSE mount sits on ``mountpoint`` (from mountinfo: a stat would wait for a
    server that is not answering yet)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[4] == mountpoint and fields[sep + 1] == "fuse.imgfs":
                    return True
    except (OSError, ValueError):
        pass
    return False


def open_session(ops: Any, mountpoint: str, options: set[str], *, allow_other: bool,
                 check_mountpoint: Callable[[str], str], handed: dict[str, int]) -> Session:
    """``handed``: the fds systemd passed (fdstore.inherited); the connection's and the state's are
    taken from it."""
    fuse_fd, state_fd = handed.pop(FUSE_FD, None), handed.pop(STATE_FD, None)
    mountpoint = os.path.abspath(mountpoint)
    fp = fingerprint(options, ops)
    if fuse_fd is not None and state_fd is not None:
        try:
            return _take_over(ops, mountpoint, options, fuse_fd, state_fd, fp)
        except ImgfsError as e:
            # the old mount cannot be served: its readers get ENOTCONN once it is gone, as before
            log.error("cannot take over the mount at %s from the last imgfs (%s); mounting afresh", mountpoint, e)
            for fd in (fuse_fd, state_fd):
                os.close(fd)
            fdstore.remove(FUSE_FD)
            fdstore.remove(STATE_FD)
            if _mounted_here(mountpoint):
                connection.detach(mountpoint)
    else:
        for fd in (fuse_fd, state_fd):
            if fd is not None:
                os.close(fd)
    mountpoint = check_mountpoint(mountpoint)
    if REPLAY and fdstore.available():
        fd = connection.mount(mountpoint, fsname="imgfs", subtype="imgfs", allow_other=allow_other,
                              default_permissions="default_permissions" in options, read_only="ro" in options)
        served = None
        try:
            served = fd if _resend_wanted() else connection.clone(fd)
            init = connection.read_init(served)  # and libfuse answers it on the same fd
            state = State.create(init.request, fp)
            ops.record_to(state)
            pyfuse3.init(ops, f"/dev/fd/{served}", options)
            pyfuse3.replay_init(init.request)  # the kernel's INIT, answered now by this session
        except BaseException:
            connection.detach(mountpoint)
            for f in {fd, served} - {None}:
                os.close(f)
            raise
        stored = fdstore.store(FUSE_FD, fd) and fdstore.store(STATE_FD, state.fd)
        log.info("mounted %s with a connection the next imgfs can take over%s%s", mountpoint,
                 "" if served == fd else " (served on a clone: after a crash, requests in flight fail with ECONNABORTED)",
                 "" if stored else " (but the service manager did not take the fds: a restart will remount)")
        return Session(mountpoint, served, fd if served != fd else None, state, stored=stored)
    if not REPLAY:
        log.info("stock pyfuse3 (no INIT replay, patches/pyfuse3): a restart of imgfs remounts %s", mountpoint)
    pyfuse3.init(ops, mountpoint, options)
    return Session(mountpoint)


def _take_over(ops: Any, mountpoint: str, options: set[str], fuse_fd: int, state_fd: int, fp: bytes) -> Session:
    if not REPLAY:
        raise connection.FuseConnectionError("this pyfuse3 cannot replay INIT (stock pyfuse3)")
    if not connection.alive(fuse_fd):
        raise connection.FuseConnectionError("the connection handed over is no longer mounted")
    if not _mounted_here(mountpoint):
        raise connection.FuseConnectionError(f"no imgfs mount is at {mountpoint}")
    state = State.adopt(state_fd)
    if state.fingerprint != fp:
        raise connection.FuseConnectionError("this imgfs would negotiate FUSE otherwise than the one that mounted it "
                                             "(another pyfuse3 or other mount options): a remount is needed")
    init = Init.parse(state.init)
    inodes = ops.adopt(state)
    resend = init.resend and _resend_wanted()
    served = fuse_fd if resend else connection.clone(fuse_fd)
    os.set_inheritable(served, True)
    pyfuse3.init(ops, f"/dev/fd/{served}", options)
    pyfuse3.replay_init(state.init)  # libfuse agrees to what the kernel has; the kernel ignores the reply
    if resend:
        # requests a killed predecessor had read but never answered: asked again, not left hanging
        try:
            connection.resend(served)
        except OSError as e:
            log.warning("the kernel refused to resend the requests the last imgfs left unanswered: %s", e)
    log.info("took over the mount at %s from the last imgfs: %d inodes, FUSE 7.%d%s", mountpoint, inodes, init.minor,
             ", requests it left unanswered resent" if resend else ", served on a clone")
    # systemd still holds the copies it passed: nothing to store again
    return Session(mountpoint, served, fuse_fd if served != fuse_fd else None, state, adopted=True, stored=True)


def close_session(session: Session, *, hand_over: bool) -> None:
    """End this process's part: leave the connection to the next process, or unmount it."""
    if session.fd is None:
        pyfuse3.close(unmount=True)
        return
    if hand_over:
        pyfuse3.close(unmount=False)  # systemd holds the fds: the mount stays, requests wait in the kernel
        return
    fdstore.remove(FUSE_FD)
    fdstore.remove(STATE_FD)
    try:
        if not connection.unmount(session.mountpoint):
            connection.detach(session.mountpoint)  # busy (a file still open): gone from the tree at least
    except ImgfsError as e:
        log.warning("%s", e)
    pyfuse3.close(unmount=False)
    for fd in (session.master, session.state.fd if session.state is not None else None):
        if fd is not None:
            os.close(fd)


def give_up(mountpoint: str) -> None:
    """This process cannot serve (a bad config) and exits with the code that tells systemd not to try
    again: a mount the last imgfs handed over would only be held by the fd store until the unit
    fails, then answer ENOTCONN forever. Unmount it now (lazily: nothing waits on the server), and
    let systemd drop the fds, so waiting readers get an error at once and nothing is left behind."""
    handed = fdstore.inherited()
    if FUSE_FD not in handed:
        return
    mountpoint = os.path.abspath(mountpoint)
    log.error("the mount at %s the last imgfs handed over cannot be served by this one: unmounting it "
              "(its readers get ENOTCONN); fix the config and start imgfs again", mountpoint)
    if _mounted_here(mountpoint):
        try:
            connection.detach(mountpoint)
        except ImgfsError as e:
            log.warning("%s", e)
    for name, fd in list(handed.items()):
        os.close(fd)
        fdstore.remove(name)
        del handed[name]


def hand_over_possible(session: Session | None) -> bool:
    return session is not None and session.fd is not None and session.stored and fdstore.available()
