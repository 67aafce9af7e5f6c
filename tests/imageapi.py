"""Helpers for the tests of the Image API endpoint and of Cinder/Nova reading through imgfs: raw Image
API calls with a user's token, an imgfs config with the endpoint on, and the daemon's status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from .conftest import free_port, wait_for
from .s3proxy import CountingProxy

MiB = 1 << 20


class Api:
    """Raw HTTP to an Image API (the real Glance or the endpoint) with a user's Keystone token."""

    def __init__(self, base: str, token: str | None) -> None:
        self.base, self.token = base.rstrip("/"), token

    def __call__(self, method: str, path: str, headers: dict | None = None, **kw) -> requests.Response:
        h = {"X-Auth-Token": self.token} if self.token else {}
        return requests.request(method, self.base + path, headers={**h, **(headers or {})}, timeout=120, **kw)

    def to(self, base: str) -> "Api":
        return Api(base, self.token)


def token_of(lab: dict, user: str) -> str:
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    u = lab["keystone"]["users"][user]
    auth = v3.Password(auth_url=lab["keystone"]["auth_url"], username=u["username"], password=u["password"],
                       project_name=u["project_name"], user_domain_name="Default", project_domain_name="Default")
    return ks_session.Session(auth=auth, timeout=60).get_token()


@pytest.fixture(scope="module")
def glance_api(lab) -> Api:
    """The real Glance, as the imgfs user (admin + service on project service)."""
    return Api(lab["glance"]["endpoint"], token_of(lab, "imgfs"))


@pytest.fixture(scope="module")
def rgw_proxy(lab):
    with CountingProxy(lab["s3"]["endpoint_url"]) as proxy:
        yield proxy


@pytest.fixture
def images(glance_api):
    """Upload images to the real Glance; every one is deleted at teardown."""
    made: list[str] = []

    def make(size: int, *, data: bytes | None = None, visibility: str = "private") -> tuple[dict, bytes]:
        data = os.urandom(size) if data is None else data
        img = glance_api("POST", "/v2/images", json={"name": f"imgfs-ep-{uuid.uuid4().hex[:6]}", "disk_format": "raw",
                                                    "container_format": "bare", "visibility": visibility}).json()
        made.append(img["id"])
        r = glance_api("PUT", f"/v2/images/{img['id']}/file", data=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 204, r.text
        return glance_api("GET", f"/v2/images/{img['id']}").json(), data

    yield make
    for image_id in made:
        glance_api("DELETE", f"/v2/images/{image_id}")


def endpoint_config(tmp_path: Path, lab: dict, *, proxy: CountingProxy | None, catalog: str = "glance",
                    port: int | None = None, **options) -> tuple[list[str], str, Path]:
    """(mount args, endpoint URL, control socket): the lab's glance-api.conf, then an imgfs.conf."""
    u = lab["keystone"]["users"]["imgfs"]
    port = port or free_port()
    sock = tmp_path / "ctl.sock"
    opts = {"catalog": catalog, "cache_dir": tmp_path / "cache", "chunk_size_mb": 1, "refresh_interval": 1,
            "image_api_listen": f"127.0.0.1:{port}", "control_socket": sock, "s3_max_attempts": 2,
            "host": f"imgfs-ep-{uuid.uuid4().hex[:6]}", **options}
    lines = ["[imgfs]"] + [f"{k} = {v}" for k, v in opts.items()]
    lines += ["", "[glance_catalog]", f"auth_url = {lab['keystone']['auth_url']}", f"username = {u['username']}",
              f"password = {u['password']}", f"project_name = {u['project_name']}",
              f"region_name = {lab['keystone']['region_name']}", "", "[s3store]", "weight = 100"]
    if proxy is not None:
        lines.append(f"s3_store_host = http://127.0.0.1:{proxy.server.server_address[1]}")
    lines += ["", "[cinderstore]", f"rbd_keyring_file = {lab['ceph']['client_cinder_keyring']}", ""]
    path = tmp_path / "imgfs.conf"
    path.write_text("\n".join(lines))
    return ["--config-file", str(path)], f"http://127.0.0.1:{port}", sock


def start_endpoint(mounter, tmp_path, lab, *, proxy, extra: tuple[str, ...] = (), **options):
    """imgfs with the endpoint on, handed the lab's glance-api.conf and then its own imgfs.conf."""
    args, url, sock = endpoint_config(tmp_path, lab, proxy=proxy, **options)
    m = mounter(Path(lab["glance"]["conf"]), *args, *extra)
    wait_for(lambda: _listening(url), 30, "the Image API endpoint")
    return m, url, sock


def _listening(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return True
    except OSError:
        return False


def status(sock: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "imgfs", "status", "--json", "--socket", str(sock)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def wait_listed(m, image_id: str) -> None:
    wait_for((m.images / image_id).exists, 30, f"image {image_id} in the mount")


def s3_bytes(proxy: CountingProxy, image_id: str) -> int:
    return sum(r.body_bytes for r in proxy.gets(image_id))


def read_body(response: requests.Response) -> tuple[bytes, Exception | None]:
    """Everything the server sent, and the error that ended the body early, if any. A server that
    neither sends nor closes within the request's read timeout fails the test: a hang is not a short
    body (the connection must close)."""
    import urllib3

    got = bytearray()
    try:
        for piece in response.raw.stream(MiB, decode_content=False):
            got += piece
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as e:
        raise AssertionError(f"the body neither went on nor ended within the read timeout, after {len(got)} bytes") from e
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead) as e:  # short of Content-Length
        return bytes(got), e
    return bytes(got), None


