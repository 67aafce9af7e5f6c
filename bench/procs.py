"""Process, mount and kernel-cache helpers for the imgfs benchmark.

Everything this benchmark starts is registered here and stopped *by PID*
(never by name); everything it mounts is unmounted.  ``cleanup()`` is called
from a ``finally`` in bench.py and from the SIGTERM/SIGHUP handlers, so a
failure or Ctrl-C leaves no servers or mounts behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class BenchError(RuntimeError):
    """A fatal benchmark error (mount failed, byte mismatch, ...)."""


class Interrupted(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so finally-blocks run."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_env() -> dict:
    """Environment for the S3 clients: loopback only, no AWS_* leakage.

    The sandbox sets AWS_CA_BUNDLE, which makes rclone refuse to start
    ("LoadCustomCABundleError ... unsupported transport"), so all AWS_*
    variables are removed.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# --------------------------------------------------------------------------
# process registry
# --------------------------------------------------------------------------

_procs: list[tuple[str, subprocess.Popen]] = []
_mounts: list[Path] = []


def spawn(name: str, argv: list[str], log_path: Path, env: dict | None = None,
          cwd: str | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")
    fh.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
    fh.flush()
    p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=env, cwd=cwd, start_new_session=True)
    fh.close()
    _procs.append((name, p))
    return p


def stop(p: subprocess.Popen, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
    """Stop one process we started, by PID: signal, wait, then SIGKILL."""
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} ignored SIGTERM for {timeout:.0f}s, sending SIGKILL")
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
    for i, (_n, q) in enumerate(list(_procs)):
        if q is p:
            _procs.pop(i)
            break
    return p.returncode


def register_mount(mnt: Path) -> None:
    mnt = Path(mnt)
    if mnt not in _mounts:
        _mounts.append(mnt)


def is_mounted(mnt: Path) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].encode().decode("unicode_escape")
            if mp == target:
                return True
    return False


def unmount(mnt: Path, timeout: float = 10.0) -> None:
    """Make sure nothing is mounted on mnt (wait for the daemon's own unmount first)."""
    deadline = time.monotonic() + timeout
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)
    for cmd in (["fusermount3", "-u", str(mnt)], ["fusermount", "-u", str(mnt)],
                ["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if not is_mounted(mnt):
            break
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.2)
    if is_mounted(mnt):
        log(f"WARNING: {mnt} is still mounted")
    elif mnt in _mounts:
        _mounts.remove(mnt)


def cleanup() -> None:
    """Stop everything we started (newest first) and unmount all our mounts."""
    # SIGTERM by PID (FUSE daemons unmount themselves on SIGTERM), then
    # force-unmount whatever is left.
    for name, p in reversed(list(_procs)):
        if p.poll() is None:
            log(f"stopping {name} (pid {p.pid})")
        try:
            stop(p, timeout=15)
        except Exception as e:  # keep going: the others must be stopped too
            log(f"error stopping {name} pid {p.pid}: {e}")
    for mnt in list(_mounts):
        if is_mounted(mnt):
            unmount(mnt, timeout=2)
        elif mnt in _mounts:
            _mounts.remove(mnt)


def running() -> list[tuple[str, int]]:
    return [(n, p.pid) for n, p in _procs if p.poll() is None]


def install_signal_handlers() -> None:
    def _h(signum, _frame):
        raise Interrupted(f"signal {signum}")
    signal.signal(signal.SIGTERM, _h)
    signal.signal(signal.SIGHUP, _h)
    # explicit, so that `kill -INT` also works when started in the background
    # (a non-interactive shell starts background jobs with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------
# kernel / proc helpers
# --------------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def bdi_path(mnt: Path) -> Path:
    st = os.stat(mnt)
    return Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")


def get_read_ahead_kb(mnt: Path) -> int | None:
    try:
        return int(bdi_path(mnt).read_text())
    except OSError:
        return None


def set_read_ahead_kb(mnt: Path, kb: int) -> None:
    p = bdi_path(mnt)
    p.write_text(f"{kb}\n")
    got = int(p.read_text())
    if got != kb:
        raise BenchError(f"could not set {p} to {kb} (got {got})")


def proc_io(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime=14, stime=15 -> indices 11, 12
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
            ppid = int(data[data.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid plus all its live descendants (every thread included), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def vm_hwm_kib(pid: int) -> int:
    """Peak RSS of pid plus all its descendants (sum of VmHWM, conservative)."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log_path: Path | None = None, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode}" + tail(log_path))
        time.sleep(interval)
    raise BenchError(f"{what}: timed out after {timeout:.0f}s" + tail(log_path))


def tail(path: Path | None, n: int = 25) -> str:
    if path is None or not Path(path).exists():
        return ""
    lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    return f"\n--- last {len(lines)} lines of {path} ---\n" + "\n".join(lines)
