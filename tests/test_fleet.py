"""Fleet mode on a real mesh: three nodes, each an imgfs daemon and its own Debian nginx (configured by
'imgfs fleet render') in a network namespace of its own, the origin (moto's S3 server) in another, all
joined by a bridge (tests/fleetlab.py). The origin's sent bytes are read from its interface's counter.

- every node reads every image exactly, and the origin sends each chunk about once for the fleet;
- an owner whose nginx is killed mid-read costs no reader an error;
- a node outside the certificate set is refused, and the gateway answers only its own nginx;
- a changed object is ESTALE on every path, never the old bytes mixed with the new.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import threading

import pytest

from .conftest import drop_page_cache
from .fleetlab import MESH_PORT, Fleet, issue, make_ca, new_fleet, run, wait_until

pytestmark = pytest.mark.mount
MiB = 1 << 20
CHUNK_MB = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    f, ca = new_fleet(root, 3, chunk_mb=CHUNK_MB)
    try:
        yield f
    finally:
        logs = [node.log() for node in f.nodes]
        f.close()  # first: a failed check below must not leave the nodes running
    for log in logs:
        assert "Traceback" not in log, log


def image(fleet: Fleet, key: str, size: int, seed: int, known_by=None) -> tuple[bytes, str]:
    """An object at the origin, and a lookup on each node of ``known_by`` (default: all) so their
    catalogs know it now; the others would list it only at their next refresh (60 s)."""
    import random

    data = random.Random(seed).randbytes(size)
    path = fleet.root / f"{key}.src"
    path.write_bytes(data)
    etag = fleet.put(key, path)
    for node in fleet.nodes if known_by is None else known_by:
        wait_until(lambda: (node.images / key).exists(), 30, f"{key} on node{node.index}")
    return data, etag


def read_all(path, bs: int = MiB) -> bytes:
    with open(path, "rb", buffering=0) as f:
        out = bytearray()
        while chunk := f.read(bs):
            out += chunk
    return bytes(out)


def concurrently(fn, args) -> dict:
    results: dict = {}

    def one(a):
        try:
            results[a] = fn(a)
        except Exception as e:  # noqa: BLE001 - reported with the others
            results[a] = e

    threads = [threading.Thread(target=one, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return results


def totals(fleet: Fleet) -> dict[str, int]:
    out = {"mesh_bytes": 0, "origin_bytes": 0, "served_bytes": 0, "fallbacks": 0}
    for node in fleet.nodes:
        s = node.status()["fleet"]
        for k in ("mesh_bytes", "origin_bytes", "served_bytes"):
            out[k] += s[k]
        out["fallbacks"] += sum(s["fallbacks"].values())
    return out


def test_every_node_reads_exact_bytes_and_the_origin_sends_each_chunk_once(fleet):
    size = 10 * CHUNK_MB * MiB + 1234  # 11 chunks, the last one short
    data, _ = image(fleet, "img-once", size, 1)
    before, t0 = fleet.origin_tx(), totals(fleet)
    got = concurrently(lambda node: read_all(node.images / "img-once"), fleet.nodes)
    for node, body in got.items():
        assert not isinstance(body, Exception), (node.index, body)
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest(), f"node{node.index} read other bytes"
    sent = fleet.origin_tx() - before
    t1 = totals(fleet)
    assert sent / size <= 1.10, f"the origin sent {sent / size:.2f}x the image for 3 nodes"
    assert t1["fallbacks"] == t0["fallbacks"], "a chunk came from the origin directly"
    assert t1["mesh_bytes"] - t0["mesh_bytes"] == 3 * size  # every node, every byte, through the mesh
    # and each chunk went through one gateway once: the owners' caches and cache locks did the rest
    assert t1["served_bytes"] - t0["served_bytes"] == size
    # again after every imgfs dropped its own copy: the owners' caches answer, the origin sends nothing
    for node in fleet.nodes:
        run(node_python(), "-m", "imgfs", "evict", "--socket", str(node.dir / "control.sock"), "img-once")
        drop_page_cache(node.images / "img-once")
    before, t1 = fleet.origin_tx(), totals(fleet)
    again = concurrently(lambda node: read_all(node.images / "img-once"), fleet.nodes)
    assert all(body == data for body in again.values())
    assert totals(fleet)["mesh_bytes"] - t1["mesh_bytes"] == 3 * size  # through the mesh again, all of it
    assert fleet.origin_tx() - before < size / 100, "the owners' caches did not answer"
    # [fleet] access_log says the same, chunk by chunk: 11 misses in the owners' caches, then hits only;
    # and no line carries the gateway's secret
    lines = [line for node in fleet.nodes for line in (node.dir / "mesh-access.log").read_text().splitlines()
             if "img-once" in line]
    owner_lines = [line for line in lines if f" {MESH_PORT} " in line]
    assert sum("cache=MISS" in line for line in owner_lines) == 11, owner_lines
    assert sum("cache=HIT" in line for line in owner_lines) == 6 * 11 - 11
    assert len(lines) == 2 * 6 * 11  # each request twice: at the asking node's nginx, at the owner's
    for node in fleet.nodes:
        secret = (node.dir / "mesh" / "gateway.secret").read_text().strip()
        assert secret and secret not in (node.dir / "mesh-access.log").read_text()


def node_python() -> str:
    from .fleetlab import PYTHON

    return PYTHON


def test_a_fresh_upload_is_served_by_owners_that_have_not_listed_it_yet(fleet):
    """The boot storm's very case: an image uploaded a moment ago, read by one node before the other
    nodes' catalogs have listed it. Their gateways ask the store instead of answering 404, so the chunks
    they own still come through the mesh, once, not from the origin to every reader."""
    size = 8 * CHUNK_MB * MiB
    reader = fleet.nodes[0]
    data, _ = image(fleet, "img-fresh", size, 6, known_by=[reader])
    before, t0 = fleet.origin_tx(), reader.status()["fleet"]
    assert read_all(reader.images / "img-fresh") == data
    t1 = reader.status()["fleet"]
    assert t1["fallbacks"] == t0["fallbacks"], t1["fallbacks"]
    assert t1["mesh_bytes"] - t0["mesh_bytes"] == size
    assert (fleet.origin_tx() - before) / size <= 1.10


def test_every_fleet_metric_the_readme_names_is_exported(fleet):
    import re

    from .conftest import REPO

    text = run(node_python(), "-m", "imgfs", "metrics", "--socket", str(fleet.nodes[0].dir / "control.sock")).stdout
    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    named = set(re.findall(r"`(imgfs_fleet_\w+?)(?:\{[^`]*)?`", docs))
    exported = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    exported |= {n + "_total" for n in exported}
    assert len(named) >= 5 and named <= exported, named - exported
    assert 'imgfs_fleet_bytes_total{source="mesh"}' in text


def test_an_owner_killed_mid_read_costs_no_reader_an_error(fleet):
    size = 12 * CHUNK_MB * MiB
    data, _ = image(fleet, "img-kill", size, 2)
    victim, readers = fleet.nodes[1], [fleet.nodes[0], fleet.nodes[2]]
    before = fleet.origin_tx()
    progress = {n.index: 0 for n in readers}

    def read(node) -> bytes:
        with open(node.images / "img-kill", "rb", buffering=0) as f:
            out = bytearray()
            while chunk := f.read(MiB):
                out += chunk
                progress[node.index] = len(out)
        return bytes(out)

    killer_done = threading.Event()

    def kill_at_30_percent() -> None:
        wait_until(lambda: max(progress.values()) >= 0.3 * size, 60, "30% read")
        os.killpg(victim.nginx.pid, signal.SIGKILL)
        victim.nginx.wait(10)
        killer_done.set()

    killer = threading.Thread(target=kill_at_30_percent)
    killer.start()
    try:
        got = concurrently(read, readers)
        killer.join(60)
        assert killer_done.is_set()
        for node, body in got.items():
            assert not isinstance(body, Exception), (node.index, body)
            assert body == data, f"node{node.index} read other bytes"
        # the dead owner's chunks are fetched again by the next owner on the ring, at most once more each
        sent = fleet.origin_tx() - before
        assert sent / size <= 1.0 + 1.0 / 3 + 0.15, f"the origin sent {sent / size:.2f}x"
    finally:
        fleet.start_nginx(victim)  # back for the tests that follow


def curl(fleet: Fleet, node, *args: str) -> tuple[int, bytes]:
    out = subprocess.run(fleet.in_ns(node.ns, "curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10", *args),
                         capture_output=True, timeout=30)
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code or 0), body


def test_a_node_outside_the_certificate_set_is_refused(fleet, tmp_path):
    data, etag = image(fleet, "img-pki", 2 * CHUNK_MB * MiB, 3)
    asker, owner = fleet.nodes[0], fleet.nodes[1]
    ca = fleet.ca
    tls = ["--cacert", str(ca[1]), "--resolve", f"imgfs-mesh:{MESH_PORT}:{owner.ip}", "-H", "Range: bytes=0-99"]
    url_by_name = f"https://imgfs-mesh:{MESH_PORT}/fleet/v1/s3store/img-pki/{etag}"
    # a member's certificate: the owner answers with the bytes (so the refusals below mean something)
    member = ["--cert", str(asker.dir / "node1.crt"), "--key", str(asker.dir / "node1.key")]
    assert curl(fleet, asker, *tls, *member, url_by_name) == (206, data[:100])
    # no certificate, or one from another CA: refused before any byte
    outsider_ca = make_ca(tmp_path / "other-pki", "other-ca")
    key, crt = issue(tmp_path / "other-pki", outsider_ca, "outsider", asker.ip)
    for extra in ([], ["--cert", str(crt), "--key", str(key)]):
        status, body = curl(fleet, asker, *tls, *extra, url_by_name)
        assert status == 400 and data[:100] not in body, (extra, status, body[:200])
    # the gateway: loopback only, so a peer cannot reach it at all ...
    status, _ = curl(fleet, asker, "-H", "Range: bytes=0-99", f"http://{owner.ip}:8089/fleet/v1/s3store/img-pki/{etag}")
    assert status == 0  # connection refused
    # ... and on loopback it answers only its own nginx (the secret header)
    status, body = curl(fleet, owner, "-H", "Range: bytes=0-99", f"http://127.0.0.1:8089/fleet/v1/s3store/img-pki/{etag}")
    assert status == 403 and data[:100] not in body


def test_a_changed_object_is_estale_never_the_old_bytes(fleet):
    size = 6 * CHUNK_MB * MiB
    old, _ = image(fleet, "img-change", size, 4)
    node = fleet.nodes[0]
    fd = os.open(node.images / "img-change", os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 0) == old[:MiB]
        import random

        new = random.Random(5).randbytes(size)
        (fleet.root / "img-change.new").write_bytes(new)
        fleet.put("img-change", fleet.root / "img-change.new")
        with pytest.raises(OSError) as info:
            for off in range(CHUNK_MB * MiB, size, CHUNK_MB * MiB):  # chunks nobody has fetched yet
                got = os.pread(fd, MiB, off)
                assert got == old[off : off + MiB], "new bytes under an open file of the old version"
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    falls = node.status()["fleet"]["fallbacks"]
    assert falls.get("http_412", 0) >= 1, falls  # the owner's gateway refused the version it no longer has
