"""Running imgfs as a service: the systemd units verify, the notify protocol works against a real
NOTIFY_SOCKET, and an fstab-style `mount -t imgfs` / `umount` works through mount.imgfs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, is_mounted, sha256, sha256_file, wait_for

pytestmark = pytest.mark.mount


def file_store(tmp_path: Path) -> tuple[Path, bytes]:
    files = tmp_path / "files"
    files.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 7)
    (files / "img").write_bytes(data)
    conf = tmp_path / "imgfs.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = {files}\n"
                    f"[imgfs]\ncache_dir = {tmp_path / 'cache'}\nchunk_size_mb = 1\n")
    return conf, data


@pytest.mark.parametrize("unit", ["imgfs.service", "imgfs@.service"])
def test_units_pass_systemd_analyze_verify(tmp_path, unit):
    # The units name /usr/local/bin/imgfs (where an install puts it); verify checks that the binary
    # exists, so point a copy at this checkout's venv.
    text = (REPO / "systemd" / unit).read_text().replace("/usr/local/bin/imgfs", str(REPO / ".venv/bin/imgfs"))
    (tmp_path / unit).write_text(text)
    name = unit.replace("@.", "@test.")
    result = subprocess.run(["systemd-analyze", "verify", name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


# systemd.exec(5): each of these gives the service a mount namespace of its own, a slave of the host's,
# so the FUSE mount made inside would never reach the host.
_NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "MountFlags",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths",
                "NoExecPaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage",
                "PrivateNetwork", "NetworkNamespacePath", "ProtectHostname", "ProtectClock", "PrivateUsers")


@pytest.mark.parametrize("unit", ["imgfs.service", "imgfs@.service"])
def test_units_set_nothing_that_hides_the_mount_from_the_host(unit):
    settings = [line.split("=", 1)[0].strip() for line in (REPO / "systemd" / unit).read_text().splitlines()
                if "=" in line and not line.lstrip().startswith("#")]
    assert not set(settings) & set(_NAMESPACING), set(settings) & set(_NAMESPACING)


def test_notify_protocol_ready_status_watchdog_stopping(tmp_path):
    conf, _ = file_store(tmp_path)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "imgfs", "mount", str(mnt), "--config-file", str(conf)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    messages: list[str] = []

    def receive_until(predicate, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.extend(sock.recv(4096).decode().splitlines())
            except socket.timeout:
                pass
            if predicate():
                return
        raise AssertionError(f"notify messages so far: {messages}")

    try:
        receive_until(lambda: "READY=1" in messages, 30)
        assert is_mounted(mnt)  # READY only once the mount answers
        assert any(m.startswith("STATUS=opening") for m in messages) and any(m.startswith("STATUS=serving 1 images") for m in messages)
        assert messages.index("READY=1") > next(i for i, m in enumerate(messages) if m.startswith("STATUS=listing"))
        receive_until(lambda: messages.count("WATCHDOG=1") >= 2, 10)  # every WATCHDOG_USEC/2
        proc.send_signal(signal.SIGTERM)
        receive_until(lambda: "STOPPING=1" in messages, 30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        sock.close()


@pytest.fixture
def mount_helper():
    """/sbin/mount.imgfs, as an install would put it, for the duration of the test."""
    link = Path("/sbin/mount.imgfs")
    ours = REPO / ".venv/bin/mount.imgfs"
    if link.exists() and link.resolve() != ours.resolve():
        pytest.fail(f"{link} exists and is not this checkout's helper: not touching it")
    created = not link.exists()
    if created:
        link.symlink_to(ours)
    yield
    if created:
        link.unlink()


def test_fstab_mount_and_umount(tmp_path, mount_helper):
    conf, data = file_store(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = subprocess.run(["mount", "-t", "imgfs", str(conf), str(mnt), "-o", "rw"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "imgfs is read-only" in refused.stderr
    subprocess.run(["mount", "-t", "imgfs", str(conf), str(mnt), "-o", "ro,allow_other,_netdev"], check=True, timeout=120)
    try:
        assert is_mounted(mnt)
        assert sha256_file(mnt / "images" / "img") == sha256(data)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    assert not is_mounted(mnt)
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"imgfs mount {mnt}"], capture_output=True).returncode != 0, 30,
             "the daemon to exit after umount")
