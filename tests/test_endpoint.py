"""The node-local Image API endpoint (imgfs/endpoint.py) against the lab's REAL Glance 33 and Keystone.

imgfs is handed the lab's own glance-api.conf plus an imgfs.conf that turns the endpoint on; its S3
reads go through a counting proxy in front of RGW, so every test can say what reached the store.
Each answer of the endpoint is compared with the real Glance's answer to the same request."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from .conftest import free_port, wait_for
from .imageapi import (MiB, Api, _listening, endpoint_config, read_body, s3_bytes, start_endpoint, status, token_of,
                       wait_listed)
from .imageapi import glance_api, images, rgw_proxy  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.mount, pytest.mark.lab]


# ---- downloads served by imgfs -----------------------------------------------------------------------

def test_download_is_served_locally_with_glance_headers_and_no_second_fetch(tmp_path, lab, glance_api, images, rgw_proxy,
                                                                             mounter):
    img, data = images(5 * MiB + 3)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy)
    wait_listed(m, img["id"])
    rgw_proxy.reset()
    direct = glance_api("GET", f"/v2/images/{img['id']}/file")
    before = s3_bytes(rgw_proxy, img["id"])
    ours = glance_api.to(url)("GET", f"/v2/images/{img['id']}/file")
    assert ours.status_code == direct.status_code == 200
    assert ours.content == data == direct.content
    assert hashlib.sha512(ours.content).hexdigest() == img["os_hash_value"]
    for header in ("Content-Type", "Content-Length", "Content-MD5"):
        assert ours.headers[header] == direct.headers[header], header
    assert ours.headers["Content-MD5"] == img["checksum"]
    assert ours.headers["x-openstack-request-id"].startswith("req-")  # Glance's id of the authorization
    # imgfs fetched the image once, itself (Glance's own download went to RGW directly, not through the proxy)
    assert s3_bytes(rgw_proxy, img["id"]) - before == len(data)
    s = status(sock)["image_api"]
    assert (s["local_downloads"], s["local_bytes"], s["aborted"]) == (1, len(data), 0)

    # Again, and as HEAD: nothing more from the store.
    fetched = s3_bytes(rgw_proxy, img["id"])
    again = glance_api.to(url)("GET", f"/v2/images/{img['id']}/file")
    assert again.content == data
    head = glance_api.to(url)("HEAD", f"/v2/images/{img['id']}/file")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(data)) and head.headers["Content-MD5"] == img["checksum"]
    assert s3_bytes(rgw_proxy, img["id"]) == fetched
    assert status(sock)["image_api"]["auth_cached"] >= 1  # Glance's "yes" to this caller, reused within the TTL
    # The download went through imgfs's cache, shared with the mount: the file reads without a fetch.
    assert (m.images / img["id"]).read_bytes() == data
    assert s3_bytes(rgw_proxy, img["id"]) == fetched


def test_ranges_answer_206_416_and_400_like_glance(tmp_path, lab, glance_api, images, rgw_proxy, mounter):
    size = 3 * MiB + 17
    img, data = images(size)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy)
    wait_listed(m, img["id"])
    ep = glance_api.to(url)
    path = f"/v2/images/{img['id']}/file"
    satisfiable = {"bytes=0-99": (0, 100), "bytes=-10": (size - 10, size), "bytes=5-": (5, size),
                   f"bytes=1048570-{size + 100}": (1048570, size), f"bytes=-{size + 5}": (0, size),
                   "bytes=2097151-2097152": (2097151, 2097153)}
    for header, (start, end) in satisfiable.items():
        r = ep("GET", path, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == data[start:end], header
        assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}", header
        assert r.headers["Content-Length"] == str(end - start)
    # Glance's own answers to bad ranges (its s3 store cannot serve a good range at all: HTTP 400)
    for header in ("bytes=10-5", f"bytes={size}-", "bytes=x-y", "items=0-5", "bytes=-0"):
        r = ep("GET", path, headers={"Range": header})
        assert r.status_code == 416, header
        assert r.headers["Content-Range"] == f"bytes */{size}"
        assert glance_api("GET", path, headers={"Range": header}).status_code in (400, 416)
    for header in ("bytes=0-1,5-6",):
        assert ep("GET", path, headers={"Range": header}).status_code == glance_api("GET", path, headers={"Range": header}).status_code == 400


# ---- authorization is Glance's ----------------------------------------------------------------------

def test_glance_refusals_pass_through_unchanged_and_no_byte_is_served(tmp_path, lab, glance_api, images, rgw_proxy,
                                                                       mounter):
    img, data = images(2 * MiB)  # private to project service
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy, image_api_auth_ttl=30)
    wait_listed(m, img["id"])
    rgw_proxy.reset()
    demo = Api(lab["glance"]["endpoint"], token_of(lab, "demo"))
    cases = {
        "another project's private image": (demo, f"/v2/images/{img['id']}/file"),
        "no token": (Api(lab["glance"]["endpoint"], None), f"/v2/images/{img['id']}/file"),
        "a bad token": (Api(lab["glance"]["endpoint"], "gAAAAAnot-a-token"), f"/v2/images/{img['id']}/file"),
        "an unknown id": (glance_api, f"/v2/images/{uuid.uuid4()}/file"),
        "a malformed id": (glance_api, "/v2/images/not..an..id/file"),
        "a path outside the API": (glance_api, "/v9/whatever"),
    }
    for what, (api, path) in cases.items():
        theirs = api("GET", path, headers={"Accept": "application/json"})
        ours = api.to(url)("GET", path, headers={"Accept": "application/json"})
        assert ours.status_code == theirs.status_code, what
        assert ours.status_code >= 300, what
        assert ours.headers.get("Content-Type") == theirs.headers.get("Content-Type"), what
        if theirs.headers.get("Content-Type", "").startswith("application/json"):
            # the same answer, but for links: Glance builds them from the Host the caller sent
            assert ours.text.replace(url, lab["glance"]["endpoint"]) == theirs.text, what
    assert s3_bytes(rgw_proxy, img["id"]) == 0, "a refused caller made imgfs fetch"
    s = status(sock)["image_api"]
    assert s["local_downloads"] == 0
    assert s["refusals"] == {"404": 3, "401": 2}  # the private image, the unknown and the malformed id; no and a bad token
    # The demo user may read a public image: the same token is authorized, per image.
    pub, pub_data = images(MiB + 1, visibility="public")
    wait_listed(m, pub["id"])
    assert demo.to(url)("GET", f"/v2/images/{pub['id']}/file").content == pub_data
    assert demo.to(url)("GET", f"/v2/images/{img['id']}/file").status_code == 404  # still not the private one
    # Tokens never reach the log.
    log = m.log()
    assert demo.token not in log and glance_api.token not in log


def test_image_not_active_in_glance_is_left_to_glance(tmp_path, lab, glance_api, images, rgw_proxy, mounter):
    img, data = images(MiB, visibility="public")
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy, image_api_auth_ttl=0)
    wait_listed(m, img["id"])
    demo = Api(lab["glance"]["endpoint"], token_of(lab, "demo"))
    ep = demo.to(url)
    assert glance_api("POST", f"/v2/images/{img['id']}/actions/deactivate").status_code == 204
    try:
        theirs = demo("GET", f"/v2/images/{img['id']}/file")
        ours = ep("GET", f"/v2/images/{img['id']}/file")
        assert ours.status_code == theirs.status_code == 403  # Glance: deactivated images are not downloadable
        s = status(sock)["image_api"]
        assert s["local_downloads"] == 0
    finally:
        glance_api("POST", f"/v2/images/{img['id']}/actions/reactivate")
    assert ep("GET", f"/v2/images/{img['id']}/file").content == data
    assert status(sock)["image_api"]["local_downloads"] == 1
    assert status(sock)["image_api"]["auth_cached"] == 0  # image_api_auth_ttl = 0: Glance asked every time


# ---- everything else passes through ----------------------------------------------------------------

def test_create_upload_update_list_and_delete_pass_through(tmp_path, lab, glance_api, rgw_proxy, mounter):
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy)
    ep = glance_api.to(url)
    img = ep("POST", "/v2/images", json={"name": f"imgfs-ep-{uuid.uuid4().hex[:6]}", "disk_format": "raw",
                                        "container_format": "bare"})
    assert img.status_code == 201, img.text
    image_id = img.json()["id"]
    try:
        data = os.urandom(3 * MiB + 5)

        def chunked():  # no Content-Length: Transfer-Encoding: chunked, as glanceclient uploads
            for i in range(0, len(data), 256 * 1024):
                yield data[i:i + 256 * 1024]

        up = ep("PUT", f"/v2/images/{image_id}/file", data=chunked(), headers={"Content-Type": "application/octet-stream"})
        assert up.status_code == 204, up.text
        shown = ep("GET", f"/v2/images/{image_id}").json()
        assert shown == glance_api("GET", f"/v2/images/{image_id}").json()
        assert shown["status"] == "active" and shown["size"] == len(data)
        assert shown["os_hash_value"] == hashlib.sha512(data).hexdigest()
        patch = ep("PATCH", f"/v2/images/{image_id}", data=json.dumps([{"op": "add", "path": "/imgfs_test", "value": "1"}]),
                   headers={"Content-Type": "application/openstack-images-v2.1-json-patch"})
        assert patch.status_code == 200 and patch.json()["imgfs_test"] == "1"
        listed = ep("GET", "/v2/images", params={"limit": 1000})
        assert image_id in {i["id"] for i in listed.json()["images"]}
        # Glance builds its version document's links from the Host header, which passes unchanged: they lead
        # back to the endpoint (Nova's version discovery follows them)
        versions = ep("GET", "/versions").json()["versions"]
        assert versions and all(link["href"].startswith(url) for v in versions for link in v["links"])
    finally:
        assert ep("DELETE", f"/v2/images/{image_id}").status_code == 204
    assert ep("GET", f"/v2/images/{image_id}").status_code == 404
    s = status(sock)["image_api"]
    assert s["passthrough_requests"] >= 7 and s["passthrough_bytes_up"] >= len(data)


def test_upload_of_1gib_streams_in_constant_memory(tmp_path, lab, glance_api, rgw_proxy, mounter):
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None)
    ep = glance_api.to(url)

    def memory(field: str) -> int:
        with open(f"/proc/{m.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    image_id = ep("POST", "/v2/images", json={"name": f"imgfs-ep-big-{uuid.uuid4().hex[:6]}", "disk_format": "raw",
                                             "container_format": "bare"}).json()["id"]
    rss_before = memory("VmRSS")
    with open(f"/proc/{m.proc.pid}/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from now: the kernel's exact peak, not a sampled one
    digest = hashlib.sha512()
    block = os.urandom(MiB)

    def body():
        for i in range(1024):  # 1 GiB: each MiB differs (its index up front)
            piece = i.to_bytes(8, "little") + block[8:]
            digest.update(piece)
            yield piece

    began = time.monotonic()
    try:
        # into the file store: the lab's RGW takes ~20 MiB/s from Glance, its local disk far more
        up = ep("PUT", f"/v2/images/{image_id}/file", data=body(),
                headers={"Content-Type": "application/octet-stream", "X-Image-Meta-Store": "filestore"})
        assert up.status_code == 204, up.text
        shown = glance_api("GET", f"/v2/images/{image_id}").json()
        assert shown["size"] == 1 << 30 and shown["os_hash_value"] == digest.hexdigest()
        assert shown["stores"] == "filestore"
    finally:
        peak = memory("VmHWM")
        glance_api("DELETE", f"/v2/images/{image_id}")
    growth = peak - rss_before
    print(f"1 GiB upload through the endpoint in {time.monotonic() - began:.1f} s; imgfs RSS {rss_before / MiB:.1f} MiB "
          f"before, {peak / MiB:.1f} MiB peak (+{growth / MiB:.1f} MiB)")
    assert status(sock)["image_api"]["passthrough_bytes_up"] >= 1 << 30
    assert growth < 4 * MiB, f"RSS grew by {growth / MiB:.1f} MiB during a 1 GiB upload"


# ---- failures ------------------------------------------------------------------------------------------

def test_store_failing_mid_download_ends_the_body_short(tmp_path, lab, glance_api, images, rgw_proxy, mounter):
    img, data = images(6 * MiB)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy, prefetch_max_mb=0)
    wait_listed(m, img["id"])
    ep = glance_api.to(url)
    assert ep("GET", f"/v2/images/{img['id']}/file", headers={"Range": "bytes=0-2097151"}).status_code == 206  # 2 chunks cached
    rgw_proxy.inject("reset", img["id"])  # every later ranged GET of the object: half the body, then a TCP RST
    try:
        r = ep("GET", f"/v2/images/{img['id']}/file", stream=True)
        assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data))
        got, error = read_body(r)
    finally:
        rgw_proxy.clear()
    assert error is not None, "the body looked complete"
    assert len(got) < len(data)
    assert got == data[:len(got)], "a wrong byte reached the client"
    assert len(got) >= 2 * MiB
    wait_for(lambda: status(sock)["image_api"]["aborted"] == 1, 10, "the download counted as aborted")
    assert "download of image" in m.log() and "Traceback" not in m.log()
    # The store is back: the next download is whole.
    assert ep("GET", f"/v2/images/{img['id']}/file").content == data


def test_bytes_that_do_not_match_glances_digest_never_complete_a_download(tmp_path, lab, glance_api, images, mounter):
    """imgfs reads a copy (here: a file store of its own) whose bytes differ from what Glance holds:
    the full download is hashed as it goes and its last piece withheld."""
    img, data = images(3 * MiB + 100)
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    store = tmp_path / "files"
    store.mkdir()
    (store / img["id"]).write_bytes(bad)
    conf = tmp_path / "files.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = mine:file\n[mine]\nfilesystem_store_datadir = {store}\n")
    args, url, sock = endpoint_config(tmp_path, lab, proxy=None, catalog="stores",
                                      image_api_upstream=lab["glance"]["endpoint"])
    m = mounter(conf, *args)
    wait_for(lambda: _listening(url), 30, "the Image API endpoint")
    ep = glance_api.to(url)
    r = ep("GET", f"/v2/images/{img['id']}/file", stream=True)
    assert r.status_code == 200
    got, error = read_body(r)
    assert error is not None and len(got) < len(data)
    assert "integrity error" in m.log()
    assert status(sock)["image_api"]["aborted"] == 1


def test_glance_unreachable_gives_503_and_bad_requests_get_4xx(tmp_path, lab, glance_api, mounter):
    dead = free_port()
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None, image_api_upstream=f"http://127.0.0.1:{dead}")
    ep = glance_api.to(url)
    for path in ("/v2/images", f"/v2/images/{uuid.uuid4()}/file", "/"):
        r = ep("GET", path)
        assert r.status_code == 503
        assert r.text.count("\n") == 1 and r.text.startswith("imgfs: cannot reach Glance at")
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    for raw, statuses in ((b"NOT HTTP AT ALL\r\n\r\n", (b"400",)),
                          (b"GET /v2/images HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", (b"400",)),
                          (b"GET /v2/images HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 200_000, (b"431", b"400"))):
        with socket.create_connection((host, port), timeout=10) as s:
            try:
                s.sendall(raw)
            except OSError:
                pass
            answer = s.recv(100)
        assert answer.split(b" ")[1] in statuses, answer
    assert "Traceback" not in m.log()


def test_twenty_concurrent_downloads_fetch_each_chunk_once(tmp_path, lab, glance_api, images, rgw_proxy, mounter):
    img, data = images(24 * MiB)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy)
    wait_listed(m, img["id"])
    rgw_proxy.reset()
    rss_before = status(sock)["process"]["rss_bytes"]
    ep = glance_api.to(url)
    digests: list[str] = []

    def download():
        r = ep("GET", f"/v2/images/{img['id']}/file", stream=True)
        h = hashlib.sha512()
        for piece in r.iter_content(256 * 1024):
            h.update(piece)
            time.sleep(0.001)  # a slow reader: back-pressure, not buffering
        digests.append(h.hexdigest())

    threads = [threading.Thread(target=download) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert digests == [img["os_hash_value"]] * 20
    assert s3_bytes(rgw_proxy, img["id"]) == len(data), "a chunk was fetched more than once"
    s = status(sock)
    assert s["image_api"]["local_downloads"] == 20 and s["image_api"]["active"] == 0
    assert s["process"]["rss_bytes"] - rss_before < 160 * MiB


def test_stop_ends_downloads_in_flight(tmp_path, lab, glance_api, images, mounter):
    img, data = images(32 * MiB)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None)
    wait_listed(m, img["id"])
    r = glance_api.to(url)("GET", f"/v2/images/{img['id']}/file", stream=True)
    first = next(r.raw.stream(MiB, decode_content=False))
    began = time.monotonic()
    assert m.stop() == 0
    assert time.monotonic() - began < 15
    got, error = read_body(r)
    assert error is not None and len(first) + len(got) < len(data)
    assert not _listening(url)


def test_tokens_and_passwords_never_reach_log_status_or_metrics(tmp_path, lab, glance_api, images, rgw_proxy, mounter):
    img, data = images(MiB + 7)
    metrics_port = free_port()
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy, extra=("--debug",), metrics_port=metrics_port)
    wait_listed(m, img["id"])
    demo = Api(lab["glance"]["endpoint"], token_of(lab, "demo"))
    ep, demo_ep = glance_api.to(url), demo.to(url)
    assert ep("GET", f"/v2/images/{img['id']}/file").content == data  # served locally
    assert demo_ep("GET", f"/v2/images/{img['id']}/file").status_code == 404  # refused by Glance
    assert Api(url, "gAAAAAB-a-forged-token")("GET", f"/v2/images/{img['id']}/file").status_code == 401
    assert ep("GET", "/v2/images").status_code == 200  # passed through
    created = ep("POST", "/v2/images", json={"name": "imgfs-ep-secret", "disk_format": "raw", "container_format": "bare"})
    ep("PUT", f"/v2/images/{created.json()['id']}/file", data=b"x" * 1000, headers={"Content-Type": "application/octet-stream"})
    ep("DELETE", f"/v2/images/{created.json()['id']}")
    seen = "\n".join([
        m.log(),
        json.dumps(status(sock)),
        subprocess.run([sys.executable, "-m", "imgfs", "metrics", "--socket", str(sock)], capture_output=True, text=True,
                       timeout=30).stdout,
        requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text,
    ])
    assert "image API endpoint" in seen and "imgfs_image_api_downloads" in seen  # the grep reads real output
    secrets = [glance_api.token, demo.token, "gAAAAAB-a-forged-token", lab["keystone"]["users"]["imgfs"]["password"]]
    for secret in secrets:
        assert secret not in seen
