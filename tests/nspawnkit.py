"""A real systemd 252 to run the shipped units under: a Debian 12 root (tests/nspawn/build, run by
./.ci/setup --for-tests) booted in systemd-nspawn. imgfs is not installed in it: this checkout, and
the Python its venv was made from, are bound read-only at the same paths, and /usr/local/bin/imgfs and
/sbin/mount.imgfs are links into the venv, so the units run exactly as shipped. Used by
tests/test_units_nspawn.py, tests/test_package.py (on a fresh copy: fresh_root) and
bench/restart_gap.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROOT = Path(os.environ.get("IMGFS_NSPAWN_ROOT", "/var/tmp/imgfs-nspawn/bookworm"))
MiB = 1 << 20


class ContainerError(Exception):
    """No container can be booted or used here."""


class Container:
    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        binds = [f"--bind-ro={REPO}", "--bind=/dev/fuse"]
        if not sys.base_prefix.startswith("/usr"):  # a Python of its own (pyenv): the venv links into it
            binds.append(f"--bind-ro={sys.base_prefix}")
        self.proc = subprocess.Popen(["systemd-nspawn", "--keep-unit", "--register=no", "--quiet", "-D", str(root),
                                      "-b", "--console=passive", *binds],
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._leader()

    def _leader(self) -> int:
        """PID of the container's systemd, once it is up."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                children = []
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    state = self.run("systemctl", "is-system-running", "--wait", check=False, pid=int(child), timeout=60)
                    if state.stdout.strip() in ("running", "degraded"):
                        return int(child)
            time.sleep(0.2)
        self.stop()
        raise ContainerError(f"systemd-nspawn could not boot a systemd here: {self.log.read_text(errors='replace')[-1500:]}")

    def run(self, *cmd: str, check: bool = True, pid: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """``cmd`` in the container's namespaces: its shell's view, outside every service."""
        result = subprocess.run(["nsenter", "-t", str(pid or self.pid), "-m", "-u", "-i", "-n", "-p", "--", *cmd],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}{result.stderr}\n"
                                 f"{self.journal()}")
        return result

    def from_another_unit(self, *cmd: str) -> str:
        """``cmd`` as a transient unit of the container's systemd: what another service sees."""
        return self.run("systemd-run", "--wait", "--pipe", "--quiet", "--", *cmd).stdout

    def mounted(self, path: str) -> bool:
        return self.run("findmnt", "--mountpoint", path, check=False).returncode == 0

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-n", "40", "-o", "cat", check=False).stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["nsenter", "-t", str(getattr(self, "pid", self.proc.pid)), "-m", "-p", "--",
                            "systemctl", "poweroff"], capture_output=True, timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def boot(log: Path) -> Container:
    """Install the units and a file store of one small image (``c.data``) in the root, and boot it."""
    if shutil.which("systemd-nspawn") is None or not (ROOT / ".imgfs-root").exists():
        raise ContainerError(f"no container root at {ROOT}: run ./.ci/setup --for-tests (it runs tests/nspawn/build)")
    data = os.urandom(3 * MiB + 7)
    (ROOT / "srv/images").mkdir(parents=True, exist_ok=True)
    (ROOT / "srv/images/img").write_bytes(data)
    for unit in ("imgfs.service", "imgfs@.service"):
        shutil.copy(REPO / "systemd" / unit, ROOT / "etc/systemd/system" / unit)
    for link, target in (("usr/local/bin/imgfs", "imgfs"), ("sbin/mount.imgfs", "mount.imgfs")):
        (ROOT / link).unlink(missing_ok=True)
        (ROOT / link).symlink_to(REPO / ".venv/bin" / target)
    (ROOT / "etc/imgfs").mkdir(exist_ok=True)
    store = "[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = /srv/images\n"
    (ROOT / "etc/imgfs/imgfs.conf").write_text(store + "[imgfs]\nchunk_size_mb = 1\n")
    (ROOT / "etc/imgfs/edge.conf").write_text(store + "[imgfs]\nchunk_size_mb = 1\ncache_dir = /var/cache/imgfs/edge\n")
    (ROOT / "etc/fstab").write_text("/etc/imgfs/imgfs.conf  /var/lib/imgfs/fstab  imgfs  ro,noauto,_netdev  0 0\n")
    shutil.rmtree(ROOT / "var/cache/imgfs", ignore_errors=True)
    c = Container(ROOT, log)
    c.data = data  # type: ignore[attr-defined]
    return c


HANDOVER_READER = r"""
import hashlib, mmap, os, sys, time
path, pace, direct = sys.argv[1], float(sys.argv[2]), sys.argv[3:] == ["direct"]
h, worst, n = hashlib.sha256(), 0.0, 0
# O_DIRECT: every read is a FUSE request of its own that the reader waits for (no readahead between)
fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
print(os.fstat(fd).st_ino, flush=True)
while True:
    t = time.monotonic()
    try:
        got = os.preadv(fd, [buf], n)
    except OSError as e:  # what the test expects, if anything: the errno and how long it took
        print("error", e.errno, n, f"{time.monotonic() - t:.3f}", flush=True)
        os._exit(3)  # (a close would fail the same way)
    worst = max(worst, time.monotonic() - t)
    if not got:
        break
    h.update(buf[:got])
    n += got
    time.sleep(pace)
print(n, h.hexdigest(), f"{worst:.3f}", flush=True)
"""


def big_image(size: int) -> str:
    if "patched" not in (REPO / ".venv" / "pyfuse3-patch.status").read_text():
        raise ContainerError("a hand-over needs the patched pyfuse3 (patches/pyfuse3): stock pyfuse3 remounts on a restart")
    h = hashlib.sha256()
    with open(ROOT / "srv/images/big", "wb") as f:
        for _ in range(max(1, size // (16 * MiB))):
            block = os.urandom(min(size, 16 * MiB))
            h.update(block)
            f.write(block)
    (ROOT / "var/tmp/reader.py").write_text(HANDOVER_READER)
    return h.hexdigest()


def paced_reader(c: Container, path: str, pace: float, *, direct: bool = False) -> subprocess.Popen:
    """A reader in the container that opens ``path`` once and reads it 1 MiB at a time, ``pace``
    seconds apart; it prints the inode, then the bytes read, their sha256 and the longest read, or
    ``error <errno> <offset> <seconds>`` and exits 3."""
    return subprocess.Popen(["nsenter", "-t", str(c.pid), "-m", "-u", "-i", "-n", "-p", "--", "python3",
                             "/var/tmp/reader.py", path, str(pace), *(["direct"] if direct else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fd_store_size(c: Container, unit: str) -> int:
    return int(c.run("systemctl", "show", "-p", "NFileDescriptorStore", "--value", unit).stdout.strip())


def endpoint_instance(c: Container, lab: dict, tmp: Path, glance: Any, image_id: str) -> tuple[Any, str]:
    """imgfs@ep.service with the Image API endpoint in front of the lab's Glance (its glance-api.conf,
    then an imgfs.conf of tests/imageapi.endpoint_config), started and serving ``image_id``; the
    endpoint's Api (``glance``'s token) and the image's data path."""
    from .imageapi import endpoint_config

    args, url, _ = endpoint_config(tmp, lab, proxy=None, cache_dir="/var/cache/imgfs/ep",
                                   control_socket="/run/imgfs/ep.sock")
    (ROOT / "etc/imgfs/ep.conf").write_text(Path(args[1]).read_text())
    dropin = ROOT / "etc/systemd/system/imgfs@ep.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "glance.conf").write_text(f"[Service]\nExecStart=\nExecStart=/usr/local/bin/imgfs mount /var/lib/imgfs/ep "
                                        f"--config-file {lab['glance']['conf']} --config-file /etc/imgfs/ep.conf\n")
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "start", "imgfs@ep.service", timeout=120)
    api, path = glance.to(url), f"/v2/images/{image_id}/file"
    deadline = time.monotonic() + 60
    while True:  # listening, and the image listed
        try:
            if api("HEAD", path).status_code == 200:
                return api, path
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ContainerError(f"the endpoint never served the image:\n{c.journal()}")
        time.sleep(0.5)


# What boot() and the unit tests add to the shared root: a package test's node starts without them.
_TEST_ADDITIONS = ("etc/imgfs", "etc/systemd/system/imgfs.service", "etc/systemd/system/imgfs@.service",
                   "etc/systemd/system/imgfs@ep.service.d", "usr/local/bin/imgfs", "sbin/mount.imgfs", "srv/images",
                   "var/lib/imgfs", "var/cache/imgfs", "var/log/imgfs", "opt/imgfs", "var/tmp")


def fresh_root(dst: Path) -> None:
    """A private copy of the container root at ``dst`` as tests/nspawn/build made it: Debian 12 with
    systemd and python3, and nothing of imgfs."""
    if shutil.which("systemd-nspawn") is None or not (ROOT / ".imgfs-root").exists():
        raise ContainerError(f"no container root at {ROOT}: run ./.ci/setup --for-tests (it runs tests/nspawn/build)")
    subprocess.run(["cp", "-a", "--reflink=auto", str(ROOT), str(dst)], check=True)
    for rel in _TEST_ADDITIONS:
        path = dst / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (dst / "var/tmp").mkdir(mode=0o1777)
    os.chmod(dst / "var/tmp", 0o1777)
    (dst / "etc/fstab").write_text("")
