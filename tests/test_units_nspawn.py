"""The shipped units and mount.imgfs under a real systemd 252 (Debian 12, booted in systemd-nspawn,
tests/nspawnkit.py): each mount is read from outside the service (another unit, and the container's
shell), with the image's sha256, and each stop leaves no mount; restarts, a crash and a bad config
hand the mount over or clear it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest

from .conftest import REPO
from .imageapi import glance_api, images  # noqa: F401  (fixtures the endpoint test uses)
from .nspawnkit import (HANDOVER_READER, MiB, ROOT, Container, ContainerError, big_image, boot, fd_store_size,
                        endpoint_instance, paced_reader)

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    try:
        c = boot(tmp_path_factory.mktemp("nspawn") / "console.log")
    except ContainerError as e:
        pytest.fail(str(e))
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
    """docs/deploying.md, "OpenStack-Ansible-style": wheels built once (here, from this checkout), then on the node a
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


def test_restarts_hand_the_mount_over_and_a_reader_notices_nothing(container):
    """Ten restarts of imgfs.service in a row while one open file is read through them: every byte
    is the image's, no read fails, inode numbers stay, and the longest read is the gap."""
    c = container
    size = 1024 * MiB
    want = big_image(size)
    big = ROOT / "srv/images/big"
    c.run("systemctl", "start", "imgfs.service")
    path = "/var/lib/imgfs/mnt/images/big"
    ino = c.run("stat", "-c", "%i", path).stdout.strip()
    listing = c.run("ls", "-li", "/var/lib/imgfs/mnt/images").stdout
    reader = paced_reader(c, path, 0.04)  # about 40 s for the GiB: through all ten restarts
    try:
        pids = []
        for _ in range(10):
            time.sleep(2.2)  # systemd's default start limit: 5 starts in 10 s
            c.run("systemctl", "restart", "imgfs.service", timeout=120)
            pids.append(c.run("systemctl", "show", "-p", "MainPID", "--value", "imgfs.service").stdout.strip())
        reader_was_running_at_the_last_restart = reader.poll() is None
        out, err = reader.communicate(timeout=300)
    finally:
        if reader.poll() is None:
            reader.kill()
    lines = out.split()
    assert reader.returncode == 0, (out, err, c.journal())
    assert reader_was_running_at_the_last_restart
    assert lines[0] == ino
    assert lines[1:3] == [str(size), want], (out, err)
    assert len(set(pids)) == 10  # ten processes, each took the mount over
    print(f"longest read across 10 restarts: {lines[3]} s")
    assert float(lines[3]) < 10
    log = c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout
    assert log.count("took over the mount at /var/lib/imgfs/mnt") >= 10, log[-3000:]
    assert c.run("stat", "-c", "%i", path).stdout.strip() == ino
    assert c.run("ls", "-li", "/var/lib/imgfs/mnt/images").stdout == listing
    assert fd_store_size(c, "imgfs.service") == 2  # the connection and the state
    c.run("systemctl", "stop", "imgfs.service")
    assert not c.mounted("/var/lib/imgfs/mnt")
    assert fd_store_size(c, "imgfs.service") == 0
    big.unlink()


def test_a_killed_imgfs_is_succeeded_and_its_reader_gets_the_right_bytes(container, moto_url):
    """SIGKILL while imgfs holds reads it took from the kernel (waiting on a stalled S3 origin):
    systemd keeps the connection, restarts imgfs (Restart=on-failure), the next process takes the mount
    over and has the kernel resend what the dead one had read (Linux >= 6.9): the readers see a pause,
    never an error or a wrong byte. Without the resend they would wait forever."""
    c = container
    size = 8 * MiB
    with stalled_origin(c, moto_url, size, resend=True) as (proxy, data):
        assert "served on a clone" not in c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout
        proxy.inject("delay", "slow", seconds=20)
        readers = [paced_reader(c, "/var/lib/imgfs/mnt/images/slow", 0, direct=direct) for direct in (True, False)]
        outs, _ = killed_while_reading(c, readers, proxy.clear)  # the origin answers again: the next imgfs fetches afresh
        for r, (out, err) in zip(readers, outs):
            assert r.returncode == 0, (out, err, c.journal())
            assert out.split()[1:3] == [str(size), hashlib.sha256(data).hexdigest()], out
            print(f"longest read across a SIGKILL: {out.split()[3]} s")
            assert float(out.split()[3]) < 10
        log = c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout
        assert "requests it left unanswered resent" in log, log[-3000:]
        c.run("systemctl", "stop", "imgfs.service")
        assert not c.mounted("/var/lib/imgfs/mnt")
        assert fd_store_size(c, "imgfs.service") == 0


def test_an_endpoint_download_in_flight_finishes_and_no_client_is_refused_across_restarts(container, tmp_path, lab,
                                                                                         glance_api, images):
    """The Image API endpoint's listening socket is in systemd's fd store too: a download in flight when
    imgfs restarts is finished by the old process, and connections made while the next one starts wait
    in the socket's queue instead of being refused."""
    import threading

    c = container
    big_image(MiB)  # only for its check of the patched pyfuse3
    img, data = images(48 * MiB)
    api, path = endpoint_instance(c, lab, tmp_path, glance_api, img["id"])
    answers: list[tuple[int, bool]] = []
    stop = threading.Event()

    def newcomers() -> None:  # a new connection every 50 ms, through every restart
        while not stop.is_set():
            try:
                r = api("GET", path, headers={"Range": "bytes=0-65535", "Connection": "close"})
                answers.append((r.status_code, r.content == data[:65536]))
            except Exception as e:  # noqa: BLE001 - a refused or reset connection is what this counts
                answers.append((f"{type(e).__name__}: {e}"[:300], False))  # type: ignore[arg-type]
            time.sleep(0.05)

    def slowly(stream):
        for piece in stream:
            time.sleep(0.02)
            yield piece

    t = threading.Thread(target=newcomers)
    t.start()
    try:
        for _ in range(3):
            r = api("GET", path, stream=True)
            pieces = [next(r.raw.stream(MiB, decode_content=False))]
            # the client goes on reading, a little slower than it could, while imgfs restarts
            rest = threading.Thread(target=lambda: pieces.extend(slowly(r.raw.stream(MiB, decode_content=False))))
            rest.start()
            c.run("systemctl", "restart", "imgfs@ep.service", timeout=120)  # returns once the next one is ready
            rest.join(60)
            assert hashlib.sha256(b"".join(pieces)).hexdigest() == hashlib.sha256(data).hexdigest()
            time.sleep(2.2)  # systemd's start limit
    finally:
        stop.set()
        t.join(60)
    assert answers and all(a == (206, True) for a in answers), \
        ([a for a in answers if a != (206, True)][:3], c.run("journalctl", "-b", "-u", "imgfs@ep.service", "-o", "cat").stdout[-4000:])
    log = c.run("journalctl", "-b", "-u", "imgfs@ep.service", "-o", "cat").stdout
    assert log.count("took over the mount at /var/lib/imgfs/ep") == 3, log[-3000:]
    print(f"{len(answers)} requests on new connections during 3 restarts: every one answered 206 with the right bytes")
    assert fd_store_size(c, "imgfs@ep.service") == 3  # the connection, the state and the listening socket
    c.run("systemctl", "stop", "imgfs@ep.service")
    assert not c.mounted("/var/lib/imgfs/ep")
    assert fd_store_size(c, "imgfs@ep.service") == 0


@contextlib.contextmanager
def stalled_origin(c: Container, moto_url: str, size: int, *, resend: bool):
    """imgfs.service on an S3 store behind a proxy (on the host's loopback, which the container
    shares) whose ranged GETs can be made to stall: a read imgfs has taken from the kernel then waits
    on the origin, unanswered, for as long as the test wants. Yields (proxy, the image's bytes)."""
    import boto3

    from .conftest import ACCESS_KEY, SECRET_KEY
    from .s3proxy import CountingProxy

    data = os.urandom(size)
    s3 = boto3.client("s3", endpoint_url=moto_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                      region_name="us-east-1")
    bucket = f"handover-{os.getpid()}-{int(resend)}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="slow", Body=data)
    conf = ROOT / "etc/imgfs/imgfs.conf"
    good = conf.read_text()
    dropin = ROOT / "etc/systemd/system/imgfs.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    if not resend:
        (dropin / "resend.conf").write_text("[Service]\nEnvironment=IMGFS_FUSE_RESEND=off\n")
    (ROOT / "var/tmp/reader.py").write_text(HANDOVER_READER)
    shutil.rmtree(ROOT / "var/cache/imgfs", ignore_errors=True)
    with CountingProxy(moto_url) as proxy:
        conf.write_text(f"[DEFAULT]\nenabled_backends = s3store:s3\n[s3store]\ns3_store_host = {proxy.url}\n"
                        f"s3_store_access_key = {ACCESS_KEY}\ns3_store_secret_key = {SECRET_KEY}\n"
                        f"s3_store_bucket = {bucket}\ns3_store_bucket_url_format = path\n[imgfs]\nchunk_size_mb = 1\n")
        try:
            c.run("systemctl", "daemon-reload")
            c.run("systemctl", "start", "imgfs.service")
            yield proxy, data
        finally:
            conf.write_text(good)
            shutil.rmtree(dropin)
            c.run("systemctl", "daemon-reload")
            c.run("systemctl", "stop", "imgfs.service", check=False)
            shutil.rmtree(ROOT / "var/cache/imgfs", ignore_errors=True)


def killed_while_reading(c: Container, readers: list[subprocess.Popen], after_kill: Callable[[], None] = lambda: None
                         ) -> tuple[list[tuple[str, str]], float]:
    """SIGKILL imgfs.service once ``readers`` have waited on it for 2 s; what each printed, and when
    (time.monotonic()) the kill was sent."""
    try:
        time.sleep(2.0)
        assert all(r.poll() is None for r in readers)  # waiting on imgfs, which waits on S3
        c.run("systemctl", "kill", "-s", "KILL", "imgfs.service")
        killed = time.monotonic()
        after_kill()
        return [r.communicate(timeout=60) for r in readers], killed
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()


def wait_for_a_takeover(c: Container, count: int = 1) -> None:
    wait = time.monotonic() + 30  # Restart=on-failure after RestartSec=1
    while c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout.count("took over the mount") < count:
        assert time.monotonic() < wait, c.journal()
        time.sleep(0.5)


def test_a_killed_imgfs_serving_on_a_clone_fails_what_it_had_read_with_econnaborted(container, moto_url):
    """With resend off (IMGFS_FUSE_RESEND=off, the path kernels before 6.9 take), libfuse serves a clone
    of the stored fd. Readers whose requests imgfs had read (it waits on an S3 origin that stalls) when
    it is killed get ECONNABORTED at once (on the stored fd itself they would wait forever: nobody
    would ever answer them), and the next process serves the mount again, with the right bytes."""
    c = container
    with stalled_origin(c, moto_url, 8 * MiB, resend=False) as (proxy, data):
        assert "served on a clone" in c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout
        proxy.inject("delay", "slow", seconds=20)  # every ranged GET: imgfs's reads wait on the origin
        readers = [paced_reader(c, "/var/lib/imgfs/mnt/images/slow", 0, direct=True) for _ in range(2)]
        outs, killed = killed_while_reading(c, readers)
        for r, (out, err) in zip(readers, outs):
            words = out.split()
            assert r.returncode == 3 and words[1:3] == ["error", str(errno.ECONNABORTED)], (out, err, c.journal())
        assert time.monotonic() - killed < 10
        proxy.clear()
        wait_for_a_takeover(c)
        assert c.run("sha256sum", "/var/lib/imgfs/mnt/images/slow").stdout.split()[0] == hashlib.sha256(data).hexdigest()
        c.run("systemctl", "stop", "imgfs.service")
        assert not c.mounted("/var/lib/imgfs/mnt")
        assert fd_store_size(c, "imgfs.service") == 0


def test_a_successor_with_a_bad_config_says_why_unmounts_and_its_readers_get_an_error(container):
    """A restart into a config that does not parse: the next imgfs exits 2 with one line naming the
    option (systemd does not retry a config error), clears the mount it was handed, and the file a
    reader held open answers an error at once rather than hang; fixed, imgfs starts again."""
    c = container
    conf = ROOT / "etc/imgfs/imgfs.conf"
    good = conf.read_text()
    want = big_image(32 * MiB)
    c.run("systemctl", "start", "imgfs.service")
    reader = paced_reader(c, "/var/lib/imgfs/mnt/images/big", 0.2)
    try:
        time.sleep(1.0)
        conf.write_text(good + "no_such_option = 1\n")
        restart = c.run("systemctl", "restart", "imgfs.service", check=False, timeout=120)
        assert restart.returncode != 0
        out, err = reader.communicate(timeout=30)
    finally:
        conf.write_text(good)
        if reader.poll() is None:
            reader.kill()
    words = out.split()
    assert reader.returncode == 3 and words[1] == "error", (out, err)  # a clean error, not bytes, not a hang
    assert int(words[2]) in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), out
    log = c.run("journalctl", "-b", "-u", "imgfs.service", "-o", "cat").stdout
    assert "config error:" in log and "no_such_option" in log, log[-3000:]
    assert "cannot be served by this one: unmounting it" in log
    assert c.run("systemctl", "show", "-p", "ExecMainStatus", "--value", "imgfs.service").stdout.strip() == "2"
    assert not c.mounted("/var/lib/imgfs/mnt")
    c.run("systemctl", "stop", "imgfs.service")
    assert not c.mounted("/var/lib/imgfs/mnt")
    assert fd_store_size(c, "imgfs.service") == 0
    c.run("systemctl", "reset-failed", "imgfs.service")
    c.run("systemctl", "start", "imgfs.service")
    assert c.run("sha256sum", "/var/lib/imgfs/mnt/images/big").stdout.split()[0] == want
    c.run("systemctl", "stop", "imgfs.service")
    assert not c.mounted("/var/lib/imgfs/mnt")
    (ROOT / "srv/images/big").unlink()
