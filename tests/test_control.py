"""The control channel on a real mount: imgfs status / warm / evict / metrics over the root-only
socket, and a Prometheus scrape of the 127.0.0.1 metrics port."""

from __future__ import annotations

import json
import socket
import os
import stat
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import REPO, free_port, sha256, sha256_file, wait_for

pytestmark = pytest.mark.mount
MiB = 1 << 20


@pytest.fixture
def served(tmp_path, mounter):
    files = tmp_path / "files"
    files.mkdir()
    data = os.urandom(5 * MiB + 3)
    (files / "img").write_bytes(data)
    sock, port = tmp_path / "run" / "ctl.sock", free_port()
    conf = tmp_path / "imgfs.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = {files}\n[imgfs]\n"
                    f"cache_dir = {tmp_path / 'cache'}\nchunk_size_mb = 1\ncontrol_socket = {sock}\nmetrics_port = {port}\n")
    m = mounter(conf)
    wait_for(sock.exists, 10, "the control socket")
    return m, sock, port, data


def imgfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgfs", *args], capture_output=True, text=True, timeout=120)


def test_socket_is_root_only(served):
    _, sock, _, _ = served
    mode = os.stat(sock).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_status_warm_evict(served):
    m, sock, _, data = served
    status = json.loads(imgfs("status", "--json", "--socket", str(sock)).stdout)
    assert status["mount"] == str(m.path) and status["images"] == 1
    assert status["stores"][0]["reachable"] is True and status["cache"]["chunks"] == 0

    warm = imgfs("warm", "img", "--socket", str(sock))
    assert warm.returncode == 0 and "warmed 5 MiB from f" in warm.stdout, warm
    status = json.loads(imgfs("status", "--json", "--socket", str(sock)).stdout)
    assert status["cache"]["chunks"] == 6 and status["cached_images"][0]["cached_fraction"] == 1.0
    before = status["fetched_bytes"]
    assert sha256_file(m.images / "img") == sha256(data)
    assert json.loads(imgfs("status", "--json", "--socket", str(sock)).stdout)["fetched_bytes"] == before  # all cached

    table = imgfs("status", "--socket", str(sock)).stdout
    assert "cache   " in table and "100% cached" in table

    evicted = imgfs("evict", "img", "--socket", str(sock))
    assert evicted.returncode == 0 and "evicted 6 chunks" in evicted.stdout
    assert json.loads(imgfs("status", "--json", "--socket", str(sock)).stdout)["cache"]["chunks"] == 0


def test_metrics_scrape_and_socket(served):
    m, sock, port, data = served
    sha256_file(m.images / "img")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for metric in ("imgfs_bytes_served_total", 'imgfs_fetched_bytes_total{store="f"}', "imgfs_cache_hits_total",
                   "imgfs_cache_misses_total", "imgfs_cache_evictions_total", "imgfs_fetch_seconds_bucket",
                   "imgfs_attachments", 'imgfs_store_reachable{store="f"} 1.0'):
        assert metric in text, metric
    served_line = next(line for line in text.splitlines() if line.startswith("imgfs_bytes_served_total"))
    assert float(served_line.split()[1]) >= len(data)
    assert "imgfs_cache_bytes" in imgfs("metrics", "--socket", str(sock)).stdout
    # every metric the README and docs/ name outside the endpoint's is exported under that very name
    import re

    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    named = set(re.findall(r"`(imgfs_\w+?)(?:\{[^`]*)?`", docs))
    named = {n for n in named if not n.startswith(("imgfs_image_api", "imgfs_fleet"))}  # theirs: test_endpoint, test_fleet
    exported = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    exported |= {n + "_total" for n in exported}
    assert len(named) >= 15 and named <= exported, named - exported


def test_errors_are_counted_by_kind_and_errno(served):
    m, sock, port, data = served
    files = m.config.read_text().split("filesystem_store_datadir = ")[1].split("\n")[0]
    with open(m.images / "img", "rb") as f:
        os.unlink(os.path.join(files, "img"))  # the store loses the image under an open file
        with pytest.raises(OSError):
            f.read()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'imgfs_errors_total{errno="ESTALE",kind="StaleImage"}' in text


def test_no_socket_is_one_clear_line(tmp_path):
    result = imgfs("status", "--socket", str(tmp_path / "nothing.sock"))
    assert result.returncode == 1 and "no control socket" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_warm_pin_unpin_and_rate_limit(served):
    m, sock, _, data = served
    out = imgfs("warm", "img", "--pin", "--rate-mb", "20", "--json", "--socket", str(sock))
    assert out.returncode == 0, out
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[-1]["pinned"] is True and lines[-1]["bytes"] == len(data)
    assert all(line["rate"] <= 20e6 * 1.01 for line in lines[:-1] if line.get("rate"))  # paced, never above
    status = json.loads(imgfs("status", "--json", "--socket", str(sock)).stdout)
    assert status["pinned"] == ["img"]
    assert "pinned" in imgfs("status", "--socket", str(sock)).stdout
    assert "unpinned 1 image(s)" in imgfs("unpin", "img", "--socket", str(sock)).stdout
    assert json.loads(imgfs("status", "--json", "--socket", str(sock)).stdout)["pinned"] == []


def test_verify_without_a_known_digest_says_so(served):
    m, _, _, _ = served
    result = imgfs("verify", str(m.images / "img"))  # a file store: no os_hash_value, checksum or MD5 ETag
    assert result.returncode == 1 and "knows no digest" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (or an abrupt close on a Unix socket): the peer's next receive fails."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_resets_or_talks_garbage_never_takes_the_daemon_down(served):
    """The metrics port listens on 127.0.0.1: any local user can reach it. Half a request then a reset,
    garbage, a request that never ends: each costs that connection only; the mount, the port and the
    control socket keep serving."""
    m, sock_path, port, data = served
    for payload in (b"GET /met", b"\x00\xff" * 100, b"GET / HTTP/1.0\r\n" + b"x" * 70000):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(payload)
        _reset(c)
    for payload in (b'{"cmd": "sta', b"\xff\xfe\n", b'{"cmd": "warm", "image": "img"}\n'):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(sock_path))
        c.sendall(payload)
        _reset(c)  # for warm: gone while the daemon streams progress to it
    time.sleep(0.5)
    assert m.proc.poll() is None, m.log()
    assert sha256_file(m.images / "img") == sha256(data)
    assert "imgfs_bytes_served_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert json.loads(imgfs("status", "--json", "--socket", str(sock_path)).stdout)["images"] == 1
