"""Shared fixtures: a real S3 server (moto in server mode) on loopback, a counting proxy in front of it,
and real kernel FUSE mounts of imgfs run as a child process, exactly as systemd would run it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

from .s3proxy import CountingProxy

# Test credentials: every secret-leak test greps captured output for these.
ACCESS_KEY = "AKIAIMGFSTESTKEY0001"
SECRET_KEY = "imgfs-test-secret-Zq8vX2pL9wRt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sha256_file(path: str | Path, bs: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bs):
            h.update(chunk)
    return h.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop_page_cache(path: str | Path) -> None:
    """Make the kernel forget its cached pages of one file, so the next read reaches imgfs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def start_moto(log_path: Path, **env: str):
    """A real S3 server (moto's server mode) on a free loopback port; returns (url, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env},
    )

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"moto exited: {log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, 30, "moto server")
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory):
    url, proc = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass(frozen=True)
class S3Server:
    kind: str
    url: str
    access_key: str
    secret_key: str


@pytest.fixture(params=["moto", "rgw"])
def s3_server(request) -> S3Server:
    """Every S3 test runs against two real S3 servers: moto's server mode and Ceph RGW from the lab."""
    if request.param == "moto":
        return S3Server("moto", request.getfixturevalue("moto_url"), ACCESS_KEY, SECRET_KEY)
    s3 = request.getfixturevalue("lab")["s3"]
    return S3Server("rgw", s3["endpoint_url"], s3["access_key"], s3["secret_key"])


@pytest.fixture
def proxy(s3_server):
    with CountingProxy(s3_server.url) as p:
        yield p


@pytest.fixture
def s3(s3_server):
    """A boto3 client talking straight to the S3 server (not through the proxy) and a fresh bucket."""
    client = boto3.client(
        "s3", endpoint_url=s3_server.url, aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1",
    )
    bucket = "glance-" + uuid.uuid4().hex[:12]
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket  # type: ignore[attr-defined]
    client.server = s3_server  # type: ignore[attr-defined]
    yield client
    try:  # RGW keeps what tests leave: empty and remove the bucket
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - best effort
        pass


def write_config(path: Path, *, s3_url: str | None, bucket: str | None, cache_dir: Path, file_dir: Path | None = None,
                 access: str = ACCESS_KEY, secret: str = SECRET_KEY, **imgfs_options) -> Path:
    backends = []
    lines = []
    if s3_url:
        backends.append("s3store:s3")
        lines += ["[s3store]", f"s3_store_host = {s3_url}", f"s3_store_access_key = {access}",
                  f"s3_store_secret_key = {secret}", f"s3_store_bucket = {bucket}", "s3_store_bucket_url_format = path", ""]
    if file_dir:
        backends.append("filestore:file")
        lines += ["[filestore]", f"filesystem_store_datadir = {file_dir}", ""]
    options = {"cache_dir": cache_dir, "chunk_size_mb": 1, "refresh_interval": 60, **imgfs_options}
    text = "\n".join(
        ["[DEFAULT]", "enabled_backends = " + ", ".join(backends), "", "[glance_store]",
         f"default_backend = {backends[0].split(':')[0]}", ""]
        + lines + ["[imgfs]"] + [f"{k} = {v}" for k, v in options.items()]
    ) + "\n"
    path.write_text(text)
    return path


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen
    log_path: Path
    config: Path
    cache_dir: Path
    stopped: bool = field(default=False)

    @property
    def images(self) -> Path:
        return self.path / "images"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if not self.stopped:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
            self.stopped = True
        return self.proc.returncode


def is_mounted(path: Path) -> bool:
    # mountinfo escapes space, tab, newline and backslash in octal (a space is \040)
    unescape = lambda text: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)  # noqa: E731
    with open("/proc/self/mountinfo") as f:
        return any(unescape(line.split()[4]) == str(path) for line in f)


def start_mount(mnt: Path, config: Path, log_path: Path, cache_dir: Path, *extra: str) -> Mount:
    mnt.mkdir(exist_ok=True)
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgfs", "mount", str(mnt), "--config-file", str(config), *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    m = Mount(mnt, proc, log_path, config, cache_dir)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"imgfs exited with {proc.returncode}:\n{m.log()}")
        return is_mounted(mnt) and (mnt / "images").is_dir()

    wait_for(ready, 60, "the imgfs mount")
    return m


@pytest.fixture
def mounter(tmp_path):
    """Start imgfs mounts; every one is stopped at teardown, and must have exited cleanly and unmounted."""
    mounts: list[Mount] = []

    def start(config: Path, *extra: str, name: str = "mnt") -> Mount:
        m = start_mount(tmp_path / name, config, tmp_path / f"{name}.log", tmp_path / "cache", *extra)
        mounts.append(m)
        return m

    yield start
    for m in mounts:
        if not m.stopped:
            code = m.stop()
            assert code == 0, f"imgfs exited {code}:\n{m.log()}"
        if is_mounted(m.path):
            subprocess.run(["fusermount3", "-uz", str(m.path)], check=False)
            pytest.fail(f"{m.path} still mounted after imgfs stopped")


# ---- the real OpenStack lab (tests/lab): Keystone + Cinder on Ceph RBD (+ RGW, a second S3 server) -----

REPO = Path(__file__).resolve().parent.parent
LAB_DIR = Path(os.environ.get("IMGFS_LAB_DIR") or REPO / ".lab")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """lab.json of a running lab; brought up (and down at the end) if it is not already running."""
    lab_json = LAB_DIR / "lab.json"
    started = False
    if not lab_json.exists():
        if not (LAB_DIR / "venv" / "bin" / "python").exists():
            pytest.fail(f"the OpenStack lab is not installed in {LAB_DIR}: run ./.ci/setup --for-tests (it runs tests/lab/install)")
        log = tmp_path_factory.mktemp("lab") / "up.log"
        with open(log, "wb") as out:
            result = subprocess.run([str(REPO / "tests/lab/up")], stdout=out, stderr=subprocess.STDOUT, timeout=900)
        if result.returncode != 0:
            subprocess.run([str(REPO / "tests/lab/down")], capture_output=True, timeout=300)
            pytest.fail(f"tests/lab/up failed:\n{log.read_text()[-3000:]}")
        started = True
    lab_info = json.loads(lab_json.read_text())
    sweep_orphan_image_volumes(lab_info)
    try:
        yield lab_info
    finally:
        if started:
            subprocess.run([str(REPO / "tests/lab/down")], capture_output=True, timeout=300)


def sweep_orphan_image_volumes(lab: dict) -> None:
    """Delete Glance image-volumes whose image is gone. Tests that SIGKILL imgfs or stop an OSD under a
    read delete their image while Ceph still holds the dead client's watch on the RBD image (up to
    30 s): Cinder then refuses the delete (ImageBusy) and the volume stays, counting against the
    service project's volume quota. A lab kept between runs would fill up; a fresh lab has none."""
    from cinderclient import client as cinder_client
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    u = lab["keystone"]["users"]["admin"]
    auth = v3.Password(auth_url=lab["keystone"]["auth_url"], username=u["username"], password=u["password"],
                       project_name=u["project_name"], user_domain_name=u["user_domain_name"],
                       project_domain_name=u["project_domain_name"])
    sess = ks_session.Session(auth=auth, timeout=60)
    try:
        cinder = cinder_client.Client("3", session=sess, region_name=lab["keystone"]["region_name"])
        glance = {"service_type": "image", "interface": "public"}
        for vol in cinder.volumes.list(search_opts={"all_tenants": 1, "status": "available"}):
            image_id = (vol.name or "").removeprefix("image-")
            if image_id != vol.name and not vol.attachments and \
                    sess.get(f"/v2/images/{image_id}", endpoint_filter=glance, raise_exc=False).status_code == 404:
                cinder.volumes.delete(vol)
    except Exception as e:  # noqa: BLE001 - hygiene only; the tests say what is wrong if quota runs out
        print(f"conftest: could not sweep orphan image-volumes: {e}", file=sys.stderr)


@pytest.fixture(scope="session")
def cinder(lab):
    from cinderclient import client as cinder_client
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    u = lab["keystone"]["users"]["imgfs"]
    auth = v3.Password(auth_url=lab["keystone"]["auth_url"], username=u["username"], password=u["password"],
                       project_name=u["project_name"], user_domain_name=u["user_domain_name"],
                       project_domain_name=u["project_domain_name"])
    sess = ks_session.Session(auth=auth, timeout=60)
    return cinder_client.Client("3.60", session=sess, region_name=lab["keystone"]["region_name"],
                                service_type="volumev3", interface="public")


@pytest.fixture(scope="session")
def rbd_pool(lab):
    import rados

    ceph = lab["ceph"]
    cluster = rados.Rados(conffile=ceph["conf"], rados_id=ceph["rbd_user"], conf={"keyring": ceph["client_cinder_keyring"]})
    cluster.connect(timeout=30)
    ioctx = cluster.open_ioctx(ceph["rbd_pool"])
    try:
        yield ioctx
    finally:
        ioctx.close()
        cluster.shutdown()


def wait_volume(cinder, volume_id: str, status: str, timeout: float = 120):
    def reached():
        vol = cinder.volumes.get(volume_id)
        if vol.status.startswith("error"):
            raise RuntimeError(f"volume {volume_id} went to {vol.status}")
        return vol if vol.status == status else None

    return wait_for(reached, timeout, f"volume {volume_id} to be {status}", interval=0.2)


@dataclass
class ImageVolume:
    image_id: str
    volume_id: str
    data: bytes


@pytest.fixture
def image_volume(cinder, rbd_pool, lab):
    """Create Glance-shaped image-volumes (name image-<id>, glance_image_id, image_size) holding known
    bytes written through librbd; deleted at the end, with any attachment a failing test left."""
    import rbd

    made: list[str] = []

    def make(size: int, *, multiattach: bool = False, seed: int = 0) -> ImageVolume:
        image_id = str(uuid.uuid4())
        data = random_bytes(size, seed or hash(image_id) & 0xFFFF)
        vtype = lab["cinder"]["volume_types"]["multiattach" if multiattach else "default"]
        vol = cinder.volumes.create(size=1, name=f"image-{image_id}", volume_type=vtype,
                                    metadata={"glance_image_id": image_id, "image_size": str(size), "image_owner": "test"})
        made.append(vol.id)
        wait_volume(cinder, vol.id, "available")
        with rbd.Image(rbd_pool, f"volume-{vol.id}") as img:
            img.write(data, 0)
            img.flush()
        return ImageVolume(image_id, vol.id, data)

    yield make
    for volume_id in made:
        try:
            for att in cinder.attachments.list(search_opts={"volume_id": volume_id}):
                cinder.attachments.delete(att.id)
            wait_volume(cinder, volume_id, "available", timeout=60)
            cinder.volumes.delete(volume_id)
        except Exception as e:  # noqa: BLE001 - cleanup must go on for the others
            print(f"cleanup of volume {volume_id} failed: {e}")


def random_bytes(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def volume_bytes(rbd_pool, volume_id: str, size: int) -> bytes:
    import rbd

    with rbd.Image(rbd_pool, f"volume-{volume_id}", read_only=True) as img:
        return img.read(0, size)


def host_attachments(cinder, volume_id: str, host: str) -> list[dict]:
    return [a for a in cinder.volumes.get(volume_id).attachments if a.get("host_name") == host]


def write_cinder_config(path: Path, lab: dict, *, cache_dir: Path, host: str, file_dir: Path | None = None,
                        cinder_weight: int = 0, **imgfs_options) -> Path:
    u = lab["keystone"]["users"]["imgfs"]
    backends = ["cinderstore:cinder"] + (["filestore:file"] if file_dir else [])
    lines = [
        "[DEFAULT]", "enabled_backends = " + ", ".join(backends), "",
        "[glance_store]", "default_backend = cinderstore", "",
        "[cinderstore]",
        f"cinder_store_auth_address = {lab['keystone']['auth_url']}",
        f"cinder_store_user_name = {u['username']}",
        f"cinder_store_password = {u['password']}",
        f"cinder_store_project_name = {u['project_name']}",
        f"cinder_os_region_name = {lab['keystone']['region_name']}",
        f"rbd_keyring_file = {lab['ceph']['client_cinder_keyring']}",
        f"weight = {cinder_weight}",
        "",
    ]
    if file_dir:
        lines += ["[filestore]", f"filesystem_store_datadir = {file_dir}", ""]
    options = {"cache_dir": cache_dir, "chunk_size_mb": 1, "host": host, "lock_path": cache_dir.parent / "locks",
               "attach_idle_timeout": 60, **imgfs_options}
    lines += ["[imgfs]"] + [f"{k} = {v}" for k, v in options.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pytest_addoption(parser):
    parser.addoption("--soak-seconds", type=float, default=30.0, help="how long tests/test_soak.py runs (per S3 server)")


# ---- the fault matrix: tests marked @pytest.mark.cell(group, fault) are tabulated at the end -----------

_CELLS: dict[tuple[str, str], list[tuple[str, str, str]]] = {}


@pytest.fixture
def observed(request):
    """Lets a fault-matrix test say what it saw (errno, time to fail...) for the table."""
    notes: list[str] = []
    request.node.user_properties.append(("observed", notes))
    return notes.append


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("cell")
    if marker is None or (report.when != "call" and report.passed):
        return
    if report.when == "call" or report.failed or report.skipped:
        notes = next((n for k, n in item.user_properties if k == "observed"), [])
        variant = item.callspec.id if hasattr(item, "callspec") else ""
        outcome = "PASS" if report.passed else ("SKIP" if report.skipped else "FAIL")
        _CELLS.setdefault(tuple(marker.args), []).append((variant, outcome, "; ".join(notes)))


def pytest_terminal_summary(terminalreporter):
    if not _CELLS:
        return
    tr = terminalreporter
    tr.section("fault matrix")
    tr.write_line(f"{'group':<9} {'fault':<44} {'result':<7} {'runs':<24} observed")
    for (group, fault), runs in _CELLS.items():
        outcome = "FAIL" if any(o == "FAIL" for _, o, _ in runs) else ("SKIP" if all(o == "SKIP" for _, o, _ in runs) else "PASS")
        names = ",".join(v or "-" for v, _, _ in runs)
        seen = " | ".join(n for _, _, n in runs if n)
        tr.write_line(f"{group:<9} {fault:<44} {outcome:<7} {names:<24} {seen}")


@pytest.fixture(scope="session")
def deb() -> Path:
    """./.ci/package run as an operator runs it: its last line names the file and its size."""
    built = subprocess.run([str(REPO / ".ci/package")], capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    last = built.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"imgfs package: built (\S+\.deb) \((\S+), (\d+) KiB installed\); lintian: 0 tags .*", last)
    assert m, last
    path = Path(m[1])
    assert path.is_file() and path.name.startswith("imgfs_")
    print(last)
    return path
