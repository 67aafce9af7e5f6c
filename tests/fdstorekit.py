"""A service manager for one imgfs on a host whose PID 1 is not systemd: the part of systemd's notify
protocol and file-descriptor store that imgfs's hand-over relies on, and nothing more.

- ``NOTIFY_SOCKET``: ``READY=1`` counted; ``FDSTORE=1`` + ``FDNAME=`` keeps the fds sent with it,
  ``FDSTOREREMOVE=1`` + ``FDNAME=`` closes every fd kept under that name.
- A restart (``hand_over``: SIGUSR2, the units' RestartKillSignal, then ``start``) passes the kept fds to
  the next process from fd 3 on, with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID``; like
  systemd, it first drops every kept fd that reports POLLHUP or POLLERR (an unmounted FUSE connection).
- A stop (``stop``) closes what is kept, as systemd does once a service is fully stopped.

The real systemd is tested in test_units_nspawn.py; this one lets a hand-over meet what the container
cannot reach (the lab's Cinder on Ceph, read through librbd on this host).
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from .conftest import is_mounted, wait_for

# Puts the fds it was given at 3, 4, ... (as sd_listen_fds(3) expects), names itself in LISTEN_PID
# (exec keeps the pid) and becomes imgfs.
_PLACE_FDS = """
import fcntl, os, sys
given = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100 + len(given)) for fd in given]
for fd in given:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
if given:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class FdStoreManager:
    def __init__(self, directory: Path, argv: list[str], log_path: Path) -> None:
        self.argv, self.log_path = argv, log_path
        self.address = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.address))
        self.kept: list[tuple[str, int]] = []
        self.readies = 0
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._receiver.start()

    # ---- the notify socket ----------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                message, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except OSError:
                return  # closed
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in message.decode().splitlines() if "=" in line)
            with self.lock:
                if fields.get("FDSTORE") == "1":
                    name = fields.get("FDNAME", "stored")
                    self.kept += [(name, fd) for fd in fds]
                    fds = array.array("i")
                elif fields.get("FDSTOREREMOVE") == "1":
                    name = fields.get("FDNAME")
                    for kept_name, fd in [k for k in self.kept if k[0] == name]:
                        os.close(fd)
                        self.kept.remove((kept_name, fd))
                if fields.get("READY") == "1":
                    self.readies += 1
            for fd in fds:  # sent without FDSTORE=1: not kept
                os.close(fd)

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.kept]

    # ---- the service ------------------------------------------------------------------------------

    def start(self, mountpoint: Path, timeout: float = 60) -> subprocess.Popen:
        """Start the service with what is kept; back once it said READY=1 and the mount answers."""
        with self.lock:
            self.kept = [k for k in self.kept if not _hung_up(k[1])] if self.kept else []
            kept = list(self.kept)
            readies = self.readies
        env = {**os.environ, "NOTIFY_SOCKET": str(self.address)}
        for name in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            env.pop(name, None)
        if kept:
            env |= {"LISTEN_FDS": str(len(kept)), "LISTEN_FDNAMES": ":".join(name for name, _ in kept)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PLACE_FDS, ",".join(str(fd) for _, fd in kept), *self.argv],
                stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=[fd for _, fd in kept],
                start_new_session=True,
            )
        self.starts += 1
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"imgfs exited with {proc.returncode}:\n{self.log()}")
            with self.lock:
                return self.readies > readies and is_mounted(mountpoint)

        wait_for(ready, timeout, "imgfs to say READY=1")
        return proc

    def hand_over(self, timeout: float = 60) -> int:
        """The first half of a restart: SIGUSR2, and the process's exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR2)
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """A stop: the signal, the exit, and what is kept closed."""
        code = 0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            code = self.proc.wait(timeout)
        elif self.proc is not None:
            code = self.proc.returncode
        with self.lock:
            for _, fd in self.kept:
                os.close(fd)
            self.kept = []
        return code

    def close(self) -> None:
        self.stop()
        self.sock.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP and POLLERR are always reported
    hung = any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))
    if hung:
        os.close(fd)
    return hung
