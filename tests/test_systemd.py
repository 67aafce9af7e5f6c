"""Running imgfs as a service: the systemd units verify, the notify protocol works against a real
NOTIFY_SOCKET, and an fstab-style `mount -t imgfs` / `umount` works through mount.imgfs."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import (ACCESS_KEY, REPO, SECRET_KEY, is_mounted, random_bytes, sha256, sha256_file, wait_for,
                       write_config)
from .s3proxy import CountingProxy

pytestmark = pytest.mark.mount
MiB = 1 << 20


def file_store(tmp_path: Path) -> tuple[Path, bytes]:
    files = tmp_path / "files"
    files.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 7)
    (files / "img").write_bytes(data)
    conf = tmp_path / "imgfs.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = {files}\n"
                    f"[imgfs]\ncache_dir = {tmp_path / 'cache'}\nchunk_size_mb = 1\n")
    return conf, data


@pytest.mark.parametrize("unit", ["imgfs.service", "imgfs@.service", "imgfs-mesh.service"])
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


class Notifications:
    """A NOTIFY_SOCKET of our own: every datagram the daemon sends, with when it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []

    def pump(self, until, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; notify messages so far: {self.received}")
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            now = time.monotonic()
            self.received += [(now, line) for line in data.decode().splitlines()]

    def times(self, message: str) -> list[float]:
        return [t for t, m in self.received if m == message]

    def close(self) -> None:
        self.sock.close()


def test_notify_never_blocks_on_a_full_socket(tmp_path, monkeypatch, caplog):
    """notify() runs on the event loop: a receiver that is not reading (Linux queues only
    net.unix.max_dgram_qlen datagrams) must cost a dropped message and a warning, never a blocked loop."""
    from imgfs.notify import notify

    notes = Notifications(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notes.path))
    sent: list[bool] = []
    sender = threading.Thread(target=lambda: sent.extend(notify("WATCHDOG=1") for _ in range(2000)), daemon=True)
    sender.start()
    sender.join(10)
    try:
        assert not sender.is_alive(), "notify() blocked on a full socket"
        assert sent[0] and not sent[-1]
        assert "notify socket" in caplog.text and "is full; dropped WATCHDOG" in caplog.text
    finally:
        notes.close()


@pytest.fixture
def fusectl():
    """The fuse control filesystem, as systemd mounts it at boot on every node: through it the daemon
    raises the kernel's cap on parallel FUSE reads (max_background) from 12 to 64, as many as it runs
    workers. Unmounted again if the test mounted it."""
    connections = Path("/sys/fs/fuse/connections")
    mounted = any(line.split()[1] == str(connections) for line in Path("/proc/self/mounts").read_text().splitlines())
    if not mounted:
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], check=True)
    yield connections
    if not mounted:
        subprocess.run(["umount", str(connections)], check=False)


def test_the_watchdog_stops_pinging_while_the_fuse_loop_is_wedged(tmp_path, moto_url, fusectl):
    """WATCHDOG=1 only after a request went through the kernel and back: with every FUSE worker held
    (70 direct reads of an image whose first GETs take 4 s), the pings stop although the process and
    its event loop are alive; once the store answers, they resume, and every read got its bytes. A
    timer that pinged blindly would go on every 0.5 s."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          region_name="us-east-1")
    bucket = "watchdog-" + os.urandom(4).hex()
    client.create_bucket(Bucket=bucket)
    source = random_bytes(70 * MiB, 7)
    client.put_object(Bucket=bucket, Key="img", Body=source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with CountingProxy(moto_url) as proxy:
        conf = write_config(tmp_path / "imgfs.conf", s3_url=proxy.url, bucket=bucket, cache_dir=tmp_path / "cache",
                            prefetch_max_mb=0)
        notes = Notifications(tmp_path / "notify.sock")
        env = {**os.environ, "NOTIFY_SOCKET": str(notes.path), "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
        log = open(tmp_path / "imgfs.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "imgfs", "mount", str(mnt), "--config-file", str(conf)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            notes.pump(lambda: len(notes.times("WATCHDOG=1")) >= 3, 30, "three pings from a healthy daemon")
            connection = fusectl / str(os.minor(os.stat(mnt).st_dev))
            assert (connection / "max_background").read_text().strip() == "64"
            # more GETs held than the reader runs at once: the other reads queue behind them
            proxy.inject("delay", "img", seconds=4.0, count=32)
            outcomes: dict[int, bool | str] = {}

            def read(i: int) -> None:
                buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
                fd = os.open(mnt / "images" / "img", os.O_RDONLY | os.O_DIRECT)
                try:
                    n = os.preadv(fd, [buf], i * MiB)
                    outcomes[i] = n == MiB and buf[:] == source[i * MiB : (i + 1) * MiB]
                except OSError as e:
                    outcomes[i] = errno_name(e)
                finally:
                    os.close(fd)
                    buf.close()

            readers = [threading.Thread(target=read, args=(i,)) for i in range(70)]
            wedged = time.monotonic()
            for t in readers:
                t.start()
            # keep reading the socket throughout: a full one must not be what stops the pings
            notes.pump(lambda: not any(t.is_alive() for t in readers), 60, "the reads to end")
            assert outcomes == {i: True for i in range(70)}
            freed = time.monotonic()
            notes.pump(lambda: any(t > freed for t in notes.times("WATCHDOG=1")), 10, "pings after the wedge")
            during = [round(t - wedged, 2) for t in notes.times("WATCHDOG=1") if wedged + 0.6 < t < wedged + 3.5]
            assert during == [], f"WATCHDOG=1 at {during}s while every FUSE worker was held"
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)
                notes.close()
                log.close()


def errno_name(e: OSError) -> str:
    import errno

    return errno.errorcode.get(e.errno or 0, str(e.errno))


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
