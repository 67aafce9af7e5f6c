"""Unmodified Cinder and Nova get their image bytes from imgfs (lab: real Keystone, Glance, Cinder on
Ceph RBD, RGW).

- Cinder's create-volume-from-image with ``glance_api_servers`` at imgfs's Image API endpoint
  (tests/lab/cinder-image-route imgfs-endpoint), and with ``allowed_direct_url_schemes = file`` and a
  file:// location into the imgfs mount (route imgfs-mount);
- Nova's own download code (nova.virt.images.fetch, from the pip-installed nova in the lab venv) with
  ``[glance] endpoint_override`` at the endpoint.

The images live only in s3store (RGW, behind a counting proxy for imgfs), so every byte imgfs serves
is a byte it fetched or cached itself."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid

import pytest

from .conftest import LAB_DIR, REPO, volume_bytes, wait_volume
from .imageapi import MiB, Api, s3_bytes, start_endpoint, status, token_of, wait_listed
from .imageapi import glance_api, rgw_proxy  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.mount, pytest.mark.lab]


def route(name: str) -> None:
    subprocess.run([str(REPO / "tests/lab/cinder-image-route"), name], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def cinder_route():
    """Switch the lab's Cinder to a route for the test; back to Glance (stock) at the end of the module."""
    yield route
    route("glance")


@pytest.fixture(scope="module")
def demo(lab):
    """A tenant (project demo, roles member + reader) creating volumes from a public image."""
    from cinderclient import client as cinder_client
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    u = lab["keystone"]["users"]["demo"]
    sess = ks_session.Session(auth=v3.Password(auth_url=lab["keystone"]["auth_url"], username=u["username"],
                                               password=u["password"], project_name=u["project_name"],
                                               user_domain_name="Default", project_domain_name="Default"), timeout=60)
    cinder = cinder_client.Client("3.60", session=sess, region_name=lab["keystone"]["region_name"],
                                  service_type="volumev3", interface="public")
    made: list[str] = []
    cinder.made = made
    yield cinder
    for volume_id in made:
        try:
            cinder.volumes.delete(volume_id)
        except Exception as e:  # noqa: BLE001
            print(f"cleanup of volume {volume_id} failed: {e}")


@pytest.fixture
def public_images(glance_api):
    made: list[str] = []

    def make(data: bytes, disk_format: str = "raw") -> dict:
        img = glance_api("POST", "/v2/images", json={"name": f"imgfs-os-{uuid.uuid4().hex[:6]}", "disk_format": disk_format,
                                                    "container_format": "bare", "visibility": "public"}).json()
        made.append(img["id"])
        assert glance_api("PUT", f"/v2/images/{img['id']}/file", data=data,
                          headers={"Content-Type": "application/octet-stream"}).status_code == 204
        shown = glance_api("GET", f"/v2/images/{img['id']}").json()
        assert shown["stores"] == "s3store"
        return shown

    yield make
    for image_id in made:
        glance_api("DELETE", f"/v2/images/{image_id}")


def create_volume(cinder, image_id: str) -> str:
    vol = cinder.volumes.create(size=1, imageRef=image_id, name=f"imgfs-from-{image_id[:8]}")
    cinder.made.append(vol.id)
    wait_volume(cinder, vol.id, "available", timeout=300)
    return vol.id


def qcow2_of(raw: bytes, tmp_path) -> bytes:
    src, dst = tmp_path / "src.raw", tmp_path / "src.qcow2"
    src.write_bytes(raw)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(dst)], check=True, timeout=60)
    return dst.read_bytes()


def test_cinder_volume_from_image_through_the_endpoint(tmp_path, lab, glance_api, rgw_proxy, demo, public_images,
                                                       cinder_route, rbd_pool, mounter):
    raw = os.urandom(5 * MiB + 4096)
    img = public_images(raw)
    qcow = public_images(qcow2_of(os.urandom(3 * MiB), tmp_path), disk_format="qcow2")
    qcow_raw = (tmp_path / "src.raw").read_bytes()
    cinder_route("imgfs-endpoint")
    port = int(lab["cinder"]["imgfs_api_url"].rsplit(":", 1)[1])
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy, port=port)
    wait_listed(m, img["id"])
    wait_listed(m, qcow["id"])
    rgw_proxy.reset()

    first = create_volume(demo, img["id"])
    assert hashlib.sha512(volume_bytes(rbd_pool, first, len(raw))).hexdigest() == img["os_hash_value"]
    s = status(sock)["image_api"]
    assert s["local_downloads"] == 1 and s["local_bytes"] == len(raw), s
    assert s3_bytes(rgw_proxy, img["id"]) == len(raw)

    second = create_volume(demo, img["id"])
    assert volume_bytes(rbd_pool, second, len(raw)) == raw
    assert status(sock)["image_api"]["local_downloads"] == 2
    assert s3_bytes(rgw_proxy, img["id"]) == len(raw), "the second volume made GETs on RGW"

    # qcow2: Cinder downloads the qcow2 bytes from imgfs and converts them; the volume holds the raw disk
    third = create_volume(demo, qcow["id"])
    assert volume_bytes(rbd_pool, third, len(qcow_raw)) == qcow_raw
    assert status(sock)["image_api"]["local_downloads"] == 3


def test_cinder_volume_from_image_through_the_mount(tmp_path, lab, glance_api, rgw_proxy, demo, public_images,
                                                    cinder_route, rbd_pool, mounter):
    """Route 2: a file:// location at <mount>/images/<id>, store imgfsmount (a Glance file store that holds
    nothing), added as a database row (Glance refuses file:// locations through every API)."""
    raw = os.urandom(4 * MiB + 512)
    img = public_images(raw)
    cinder_route("imgfs-mount")
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy)
    wait_listed(m, img["id"])
    add_file_location(lab, img["id"], f"file://{m.images}/{img['id']}")
    locs = [loc["url"] for loc in glance_api("GET", f"/v2/images/{img['id']}/locations",
                                            headers={"OpenStack-API-Version": "image 2.17"}).json()]
    assert f"file://{m.images}/{img['id']}" in locs
    rgw_proxy.reset()
    served = status(sock)["bytes_served"]
    vol = create_volume(demo, img["id"])
    assert volume_bytes(rbd_pool, vol, len(raw)) == raw
    assert status(sock)["bytes_served"] - served >= len(raw), "cinder-volume did not read the mount"
    assert s3_bytes(rgw_proxy, img["id"]) == len(raw)
    assert status(sock)["image_api"]["local_downloads"] == 0  # not the endpoint: the mount
    # Glance deletes the image, its file:// location included: glance-api (in its own mount namespace,
    # like a controller without the mount) finds no file there and lets the location go.
    assert glance_api("DELETE", f"/v2/images/{img['id']}").status_code == 204
    assert glance_api("GET", f"/v2/images/{img['id']}").status_code == 404


def add_file_location(lab: dict, image_id: str, url: str) -> None:
    """What docs/openstack.md (Route 2) tells an operator to run against Glance's database (there is no API for it),
    with the mysql client."""
    meta = json.dumps({"store": lab["glance"]["mount_store"]})
    sql = ("INSERT INTO image_locations (image_id, value, meta_data, status, deleted, created_at, updated_at) "
           f"VALUES ('{image_id}', '{url}', '{meta}', 'active', 0, UTC_TIMESTAMP(), UTC_TIMESTAMP());")
    subprocess.run(["mariadb", f"--socket={lab['mariadb']['socket']}", "glance", "-e", sql], check=True, timeout=60)


def test_nova_downloads_through_the_endpoint(tmp_path, lab, glance_api, rgw_proxy, public_images, mounter):
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    raw = os.urandom(6 * MiB + 1)
    img = public_images(raw)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=rgw_proxy)
    wait_listed(m, img["id"])
    u = lab["keystone"]["users"]["demo"]
    sess = ks_session.Session(auth=v3.Password(auth_url=lab["keystone"]["auth_url"], username=u["username"],
                                               password=u["password"], project_name=u["project_name"],
                                               user_domain_name="Default", project_domain_name="Default"))
    env = dict(os.environ, NOVA_TOKEN=sess.get_token(), NOVA_USER_ID=sess.get_user_id(),
               NOVA_PROJECT_ID=sess.get_project_id())

    def nova(endpoint: str, image_id: str) -> dict:
        out = subprocess.run([str(LAB_DIR / "venv/bin/python"), str(REPO / "tests/lab/nova_download.py"), endpoint,
                              image_id, str(tmp_path / "nova.img")], env=env, capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])

    got = nova(url, img["id"])
    assert got.get("sha512") == img["os_hash_value"] and got["bytes"] == len(raw), got
    assert status(sock)["image_api"]["local_downloads"] == 1
    # An image the tenant may not see: Glance's 404 through the endpoint, and Nova's ImageNotFound.
    private = Api(lab["glance"]["endpoint"], glance_api.token)("POST", "/v2/images", json={
        "name": "imgfs-os-private", "disk_format": "raw", "container_format": "bare", "visibility": "private"}).json()
    try:
        refused = nova(url, private["id"])
        assert "error" in refused and ("NotFound" in refused["error"] or "ImageNotFound" in refused["error"]), refused
    finally:
        glance_api("DELETE", f"/v2/images/{private['id']}")


def test_with_the_real_glance_as_next_server_cinder_creates_volumes_while_imgfs_is_stopped(lab, demo, public_images,
                                                                                          cinder_route, rbd_pool):
    """glance_api_servers = the endpoint, then the real Glance; no imgfs is running. Cinder shuffles the
    list for each client and moves to the next server on a connection error: every create succeeds
    with the image's bytes, and cinder-volume's log shows the endpoint was tried and passed over."""
    raw = os.urandom(2 * MiB + 5)
    img = public_images(raw)
    cinder_route("imgfs-endpoint-fallback")
    endpoint = lab["cinder"]["imgfs_api_url"].split("//", 1)[1]
    log = LAB_DIR / "data" / "log" / "cinder-volume.log"
    start = log.stat().st_size
    for _ in range(3):
        vol = create_volume(demo, img["id"])
        assert volume_bytes(rbd_pool, vol, len(raw)) == raw
    with open(log, "rb") as f:
        f.seek(start)
        written = f.read().decode(errors="replace")
    assert f"Error contacting glance server '{endpoint}'" in written, written[-2000:]
