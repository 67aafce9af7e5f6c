"""What every cell of the fault matrix checks, whatever the fault: the bytes a reader got are the
source's bytes, the error is the documented errno, the daemon still serves, nothing leaked (tasks,
busy threads, fetches in flight, fds), and the log told the story in one line without a traceback."""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass

from imgfs.cli import _ask
from imgfs.daemon import control_socket_path

from .conftest import Mount, drop_page_cache, wait_for

MiB = 1 << 20


def status(mount: Mount) -> dict:
    path = control_socket_path("", str(mount.path))
    wait_for(lambda: os.path.exists(path), 10, "the control socket")  # it opens just after the mount
    (answer,) = list(_ask(path, {"cmd": "status"}))
    return answer


def settled(mount: Mount) -> dict:
    """Status once no fetch is in flight: a fetch hands its bytes to the reader before its cache fill
    is done, so counters read right after a read may miss the fill."""
    return wait_for(lambda: (s := status(mount))["inflight_fetches"] == 0 and s, 30, "fetches and fills to finish")


@dataclass
class ReadResult:
    good: int  # bytes read, every one checked against the source
    errno: int | None  # what stopped the read early, None if it reached EOF
    seconds: float

    @property
    def error(self) -> str:
        return "complete" if self.errno is None else errno.errorcode[self.errno]


def read_checked(path, source: bytes, *, start: int = 0, stop: int | None = None, bs: int = MiB, fd: int | None = None,
                 pause: float = 0.0) -> ReadResult:
    """Read [start, stop) in order like dd; every byte returned must equal the source at its offset.
    Stops at the first error, which is returned (a reader may get an error, never a wrong byte).
    ``pause`` between reads keeps a reader busy long enough for a fault to land mid-read."""
    stop = len(source) if stop is None else stop
    own, began, offset = fd is None, time.monotonic(), start
    try:
        fd = os.open(path, os.O_RDONLY) if own else fd
    except OSError as e:
        return ReadResult(0, e.errno, time.monotonic() - began)
    try:
        while offset < stop:
            try:
                data = os.pread(fd, min(bs, stop - offset), offset)
            except OSError as e:
                return ReadResult(offset - start, e.errno, time.monotonic() - began)
            assert data, f"{path}: early EOF at {offset} of {len(source)}"
            assert data == source[offset : offset + len(data)], f"{path}: wrong bytes at {offset}+{len(data)}"
            offset += len(data)
            time.sleep(pause)
        if stop == len(source):
            try:
                assert os.pread(fd, bs, stop) == b"", f"{path}: bytes past the end"
            except OSError as e:
                return ReadResult(offset - start, e.errno, time.monotonic() - began)
        return ReadResult(offset - start, None, time.monotonic() - began)
    finally:
        if own:
            try:
                os.close(fd)
            except OSError:  # ENOTCONN from the flush of a mount whose daemon was killed
                pass


def assert_reads_exactly(path, source: bytes) -> None:
    drop_page_cache(path)
    result = read_checked(path, source)
    assert result.errno is None, f"{path}: {result.error} after {result.good} bytes"


@dataclass
class Baseline:
    tasks: int
    fds: int
    cache_files: int = 0  # chunk files the cache keeps open for hits (bounded, not a leak)


def baseline(mount: Mount) -> Baseline:
    s = status(mount)
    return Baseline(s["process"]["tasks"], s["process"]["fds"], s["cache"]["open_files"])


def assert_no_leaks(mount: Mount, base: Baseline, *, fd_slack: int = 24, timeout: float = 30) -> dict:
    """Once the fault is over and readers are gone, the daemon is back where it started: the same tasks
    (plus one idle-detach timer per attached volume), no worker thread stuck in a call, nothing in
    flight; fds may differ only by pooled connections."""

    def settled():
        s = status(mount)
        p = s["process"]
        idle_timers = sum(1 for a in s["attachments"] if a["attached"] and a["idle_for"] is not None)
        return s if p["tasks"] <= base.tasks + idle_timers and p["busy_threads"] == 0 and s["inflight_fetches"] == 0 else None

    try:
        s = wait_for(settled, timeout, "tasks, threads and fetches to settle", interval=0.2)
    except TimeoutError:
        s = status(mount)
        raise AssertionError(f"leak: {s['process']} (baseline {base}), {s['inflight_fetches']} fetches in flight") from None
    kept = s["cache"]["open_files"] - base.cache_files
    assert kept <= s["cache"]["limit_open_files"]
    assert s["process"]["fds"] <= base.fds + kept + fd_slack, \
        f"fd leak: {s['process']['fds']} open ({kept} more chunk files kept open), baseline {base.fds}"
    return s


def assert_one_line(mount: Mount, pattern: str, *, exactly: bool = True) -> str:
    """The log names what happened in one line (a regex), and holds no traceback."""
    log = mount.log()
    assert "Traceback" not in log, f"traceback in the log:\n{log[-3000:]}"
    lines = [line for line in log.splitlines() if re.search(pattern, line)]
    assert lines, f"no log line matches {pattern!r}:\n{log[-3000:]}"
    if exactly:
        assert len(lines) == 1, f"{len(lines)} log lines match {pattern!r} (want one):\n" + "\n".join(lines)
    return lines[0]

