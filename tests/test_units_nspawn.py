"""The shipped units and mount.imgfs under a real systemd 252 (Debian 12, booted in systemd-nspawn):
each mount is read from outside the service (another unit, and the container's shell), with the
image's sha256, and each stop leaves no mount.

The container's root is built by tests/nspawn/build (run by ./.ci/setup --for-tests). imgfs is not
installed in it: this checkout, and the Python its venv was made from, are bound read-only at the same
paths, and /usr/local/bin/imgfs and /sbin/mount.imgfs are links into the venv, so the units run
exactly as shipped."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.mount

ROOT = Path(os.environ.get("IMGFS_NSPAWN_ROOT", "/var/tmp/imgfs-nspawn/bookworm"))
MiB = 1 << 20


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
        pytest.skip(f"systemd-nspawn could not boot a systemd here: {self.log.read_text(errors='replace')[-1500:]}")

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


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    if shutil.which("systemd-nspawn") is None or not (ROOT / ".imgfs-root").exists():
        pytest.fail(f"no container root at {ROOT}: run ./.ci/setup --for-tests (it runs tests/nspawn/build)")
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
    c = Container(ROOT, tmp_path_factory.mktemp("nspawn") / "console.log")
    c.data = data  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_imgfs_service_mount_is_read_from_another_unit_and_a_stop_leaves_none(container):
    c = container
    c.run("systemctl", "start", "imgfs.service")
    assert c.run("systemctl", "is-active", "imgfs.service").stdout.strip() == "active"
    path = "/var/lib/imgfs/mnt/images/img"
    assert c.from_another_unit("sha256sum", path).split()[0] == sha(c.data)
    assert c.run("sha256sum", path).stdout.split()[0] == sha(c.data)
    assert c.run("stat", "-c", "%s %a", path).stdout.split() == [str(len(c.data)), "444"]
    c.run("systemctl", "stop", "imgfs.service")
    assert not c.mounted("/var/lib/imgfs/mnt")
    assert c.run("systemctl", "is-active", "imgfs.service", check=False).stdout.strip() == "inactive"
    assert "unmounted /var/lib/imgfs/mnt" in c.run("journalctl", "-u", "imgfs.service", "-o", "cat").stdout


def test_two_instances_run_side_by_side_and_each_mount_reaches_the_host(container):
    c = container
    c.run("systemctl", "start", "imgfs.service", "imgfs@edge.service")
    for mnt in ("/var/lib/imgfs/mnt", "/var/lib/imgfs/edge"):
        assert c.from_another_unit("sha256sum", f"{mnt}/images/img").split()[0] == sha(c.data), mnt
    c.run("systemctl", "stop", "imgfs.service", "imgfs@edge.service")
    assert not c.mounted("/var/lib/imgfs/mnt") and not c.mounted("/var/lib/imgfs/edge")


def test_an_fstab_mount_through_mount_imgfs_starts_reads_and_stops(container):
    c = container
    c.run("systemctl", "daemon-reload")
    c.run("mkdir", "-p", "/var/lib/imgfs/fstab")
    c.run("systemctl", "start", "var-lib-imgfs-fstab.mount")
    assert c.mounted("/var/lib/imgfs/fstab")
    assert c.from_another_unit("sha256sum", "/var/lib/imgfs/fstab/images/img").split()[0] == sha(c.data)
    daemons = ("for p in /proc/[0-9]*; do [ \"${p#/proc/}\" = $$ ] && continue; tr '\\0' ' ' < $p/cmdline 2>/dev/null "
               "| grep -q '^[^ ]*python[^ ]* .*imgfs mount /var/lib/imgfs/fstab' && echo $p; done; true")
    assert c.run("sh", "-c", daemons).stdout.strip()  # the daemon mount.imgfs started is found...
    c.run("systemctl", "stop", "var-lib-imgfs-fstab.mount")
    assert not c.mounted("/var/lib/imgfs/fstab")
    # ...and goes with the mount, saying so in its log
    deadline = time.monotonic() + 15
    while c.run("sh", "-c", daemons).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not c.run("sh", "-c", daemons).stdout.strip()
    assert "unmounted /var/lib/imgfs/fstab" in c.run("cat", "/var/log/imgfs/var-lib-imgfs-fstab.log").stdout


def test_the_production_install_from_a_wheelhouse_runs_under_the_unit(container, tmp_path):
    """README "Installing on nodes": wheels built once (here, from this checkout), then on the node a
    venv from Debian's python3, installed offline from the wheelhouse with the cinder extra, linked where
    the unit looks. The unit, as shipped, runs that venv's imgfs and its mount reaches another unit."""
    c = container
    wheels = tmp_path / "wheels"
    built = subprocess.run([str(REPO / ".venv/bin/pip"), "wheel", "-q", "--wheel-dir", str(wheels), f"{REPO}[cinder]"],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    shutil.rmtree(ROOT / "var/tmp/wheelhouse", ignore_errors=True)
    shutil.copytree(wheels, ROOT / "var/tmp/wheelhouse")
    shutil.rmtree(ROOT / "opt/imgfs", ignore_errors=True)
    c.run("python3", "-m", "venv", "/opt/imgfs", timeout=120)
    c.run("/opt/imgfs/bin/pip", "install", "-q", "--no-index", "--find-links", "/var/tmp/wheelhouse", "imgfs[cinder]",
          timeout=600)
    c.run("ln", "-sfn", "/opt/imgfs/bin/imgfs", "/usr/local/bin/imgfs")
    try:
        c.run("systemctl", "start", "imgfs.service")
        pid = c.run("systemctl", "show", "-p", "MainPID", "--value", "imgfs.service").stdout.strip()
        assert c.run("cat", f"/proc/{pid}/cmdline").stdout.split("\0")[0].startswith("/opt/imgfs/bin/python")
        assert c.from_another_unit("sha256sum", "/var/lib/imgfs/mnt/images/img").split()[0] == sha(c.data)
        assert "cinder" in c.run("/opt/imgfs/bin/python", "-c", "import os_brick, cinderclient; print('cinder')").stdout
        c.run("systemctl", "stop", "imgfs.service")
        assert not c.mounted("/var/lib/imgfs/mnt")
    finally:
        c.run("ln", "-sfn", str(REPO / ".venv/bin/imgfs"), "/usr/local/bin/imgfs")
