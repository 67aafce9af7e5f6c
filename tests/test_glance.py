"""imgfs with Glance as its catalog, against the lab's REAL Glance 33 (multi-store: s3store on RGW,
cinderstore on Cinder/RBD, filestore), Keystone auth. imgfs is handed the lab's own glance-api.conf
plus an imgfs.conf, exactly as an operator would do on a controller."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from .conftest import REPO, LAB_DIR, wait_for

pytestmark = [pytest.mark.mount, pytest.mark.lab]
MiB = 1 << 20


@pytest.fixture(scope="session")
def glance(lab):
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    if not lab.get("glance", {}).get("deployed"):
        pytest.fail("the lab has no Glance: run tests/lab/up")
    u = lab["keystone"]["users"]["imgfs"]
    sess = ks_session.Session(auth=v3.Password(auth_url=lab["keystone"]["auth_url"], username=u["username"],
                                               password=u["password"], project_name=u["project_name"],
                                               user_domain_name="Default", project_domain_name="Default"), timeout=120)
    endpoint = sess.get_endpoint(service_type="image", interface="public", region_name=lab["keystone"]["region_name"])

    def api(method, path, **kw):
        r = sess.request(endpoint.rstrip("/") + path, method, raise_exc=False, **kw)
        assert r.status_code < 400, f"{method} {path}: HTTP {r.status_code} {r.text[:300]}"
        return r

    return api


@pytest.fixture
def glance_image(glance):
    made = []

    def make(size: int, name: str | None = None, copy_to: tuple[str, ...] = ()):
        data = os.urandom(size)
        img = glance("POST", "/v2/images", json={"name": name or f"imgfs-test-{uuid.uuid4().hex[:6]}", "disk_format": "raw",
                                                "container_format": "bare", "visibility": "private"}).json()
        made.append(img["id"])
        glance("PUT", f"/v2/images/{img['id']}/file", data=data, headers={"Content-Type": "application/octet-stream"})
        if copy_to:
            glance("POST", f"/v2/images/{img['id']}/import", json={"method": {"name": "copy-image"}, "stores": list(copy_to)})

            def copied():
                stores = set(glance("GET", f"/v2/images/{img['id']}").json().get("stores", "").split(","))
                return set(copy_to) <= stores

            wait_for(copied, 300, "copy-image", interval=0.5)
        return glance("GET", f"/v2/images/{img['id']}").json(), data

    yield make
    for image_id in made:
        if _exists(glance, image_id):
            glance("DELETE", f"/v2/images/{image_id}")


def _exists(glance, image_id: str) -> bool:
    try:
        glance("GET", f"/v2/images/{image_id}")
        return True
    except AssertionError:
        return False


def imgfs_config(tmp_path: Path, lab: dict, **options) -> list[str]:
    u = lab["keystone"]["users"]["imgfs"]
    opts = {"catalog": "glance", "cache_dir": tmp_path / "cache", "chunk_size_mb": 1, "refresh_interval": 1,
            "host": f"imgfs-glance-{uuid.uuid4().hex[:6]}", **options}
    text = "\n".join(
        ["[imgfs]"] + [f"{k} = {v}" for k, v in opts.items()]
        + ["", "[glance_catalog]", f"auth_url = {lab['keystone']['auth_url']}", f"username = {u['username']}",
           f"password = {u['password']}", f"project_name = {u['project_name']}",
           f"region_name = {lab['keystone']['region_name']}",
           # prefer S3, then Cinder (weights, Glance's semantics): without them the cheapest copy, the
           # local file store, would be read first
           "", "[s3store]", "weight = 100",
           "", "[cinderstore]", f"rbd_keyring_file = {lab['ceph']['client_cinder_keyring']}", "weight = 50",
           # the single-attach cinder store (tests/test_glance_owns_volumes.py): last of the stores
           "", f"[{lab['glance']['single_attach_store']}]", f"rbd_keyring_file = {lab['ceph']['client_cinder_keyring']}",
           "weight = 10", ""]
    )
    path = tmp_path / "imgfs.conf"
    path.write_text(text)
    return ["--config-file", lab["glance"]["conf"], "--config-file", str(path)]


def sha512_file(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def start(mounter, tmp_path, args, name="mnt"):
    """glance-api.conf as the first --config-file, imgfs.conf as the second (later wins)."""
    return mounter(Path(args[1]), *args[2:], name=name)


def test_uploaded_image_appears_with_name_size_and_hash(tmp_path, lab, glance, glance_image, mounter):
    name = f"ubuntu-{uuid.uuid4().hex[:6]}"
    img, data = glance_image(3 * MiB + 17, name=name)
    m = start(mounter, tmp_path, imgfs_config(tmp_path, lab))
    path = m.images / img["id"]
    wait_for(path.exists, 20, "the image in the mount")
    assert path.stat().st_size == img["size"] == len(data)
    link = m.path / "by-name" / name
    assert os.readlink(link) == f"../images/{img['id']}"
    assert sha512_file(link) == img["os_hash_value"]
    assert os.getxattr(path, "user.imgfs.os_hash_value").decode() == img["os_hash_value"]
    assert os.getxattr(path, "user.imgfs.name").decode() == name
    assert os.getxattr(path, "user.imgfs.disk_format") == b"raw"
    dump = subprocess.run(["getfattr", "-d", "-m", "-", str(path)], capture_output=True, text=True, check=True).stdout
    assert "s3://" not in dump and "cinder://" not in dump and "file://" not in dump  # never a location URL


def test_copy_image_three_stores_and_rgw_down_mid_read(tmp_path, lab, glance, glance_image, mounter):
    img, data = glance_image(4 * MiB, copy_to=("cinderstore", "filestore"))
    args = imgfs_config(tmp_path, lab, memory_cache_mb=0, prefetch_max_mb=0, s3_max_attempts=1, s3_connect_timeout=1)
    m = start(mounter, tmp_path, args)
    path = m.images / img["id"]
    wait_for(lambda: path.exists() and os.getxattr(path, "user.imgfs.stores") == b"s3store,cinderstore,filestore",
             30, "all three copies")
    for store in ("s3store", "cinderstore", "filestore"):
        assert (m.path / "stores" / store / img["id"]).stat().st_size == len(data)
    rgw_pid = int((LAB_DIR / "data/pids/radosgw.pid").read_text().split()[0])
    fd = os.open(path, os.O_RDONLY)
    try:
        got = bytearray(os.pread(fd, MiB, 0))  # from s3store, the default backend
        os.killpg(rgw_pid, signal.SIGTERM)  # RGW goes away mid-read
        wait_for(lambda: subprocess.run(["kill", "-0", str(rgw_pid)], capture_output=True).returncode != 0, 30, "RGW to stop")
        for off in range(MiB, len(data), MiB):
            got += os.pread(fd, MiB, off)
    finally:
        os.close(fd)
        back = subprocess.run([str(REPO / "tests/lab/up")], capture_output=True, text=True, timeout=300)  # RGW back
        assert back.returncode == 0, f"tests/lab/up could not bring RGW back; later tests need it:\n{back.stdout[-2000:]}"
    assert hashlib.sha512(got).hexdigest() == img["os_hash_value"]
    assert "reading from store 'cinderstore' instead" in m.log()


def test_deleted_image_disappears_and_metadata_follows(tmp_path, lab, glance, glance_image, mounter):
    img, _ = glance_image(MiB, name=f"before-{uuid.uuid4().hex[:6]}")
    m = start(mounter, tmp_path, imgfs_config(tmp_path, lab))
    path = m.images / img["id"]
    wait_for(path.exists, 20, "the image in the mount")
    new_name = f"after-{uuid.uuid4().hex[:6]}"
    glance("PATCH", f"/v2/images/{img['id']}", json=[{"op": "replace", "path": "/name", "value": new_name}],
           headers={"Content-Type": "application/openstack-images-v2.1-json-patch"})
    wait_for(lambda: os.getxattr(path, "user.imgfs.name").decode() == new_name, 20, "the new name")
    assert (m.path / "by-name" / new_name).exists()
    glance("DELETE", f"/v2/images/{img['id']}")
    wait_for(lambda: img["id"] not in os.listdir(m.images), 20, "the deleted image to disappear")
    assert not (m.path / "by-name" / new_name).exists()


def test_corrupted_copy_fails_verification_and_imgfs_verify(tmp_path, lab, glance, glance_image, mounter):
    """The S3 copy is overwritten behind Glance's back with other bytes of the same size: a read end to
    end fails (EIO) instead of passing off wrong bytes, and `imgfs verify` says MISMATCH, exit 1."""
    import sys

    import boto3

    img, data = glance_image(2 * MiB + 5)
    m = start(mounter, tmp_path, imgfs_config(tmp_path, lab, memory_cache_mb=0))
    path = m.images / img["id"]
    wait_for(path.exists, 20, "the image in the mount")
    ok = subprocess.run([sys.executable, "-m", "imgfs", "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "sha512 OK" in ok.stderr, ok.stderr
    s3 = lab["s3"]
    client = boto3.client("s3", endpoint_url=s3["endpoint_url"], aws_access_key_id=s3["access_key"],
                          aws_secret_access_key=s3["secret_key"], region_name=s3["region_name"])
    client.put_object(Bucket=lab["glance"]["s3_bucket"], Key=img["id"], Body=os.urandom(len(data)))
    wait_for(lambda: os.getxattr(path, "user.imgfs.cached_fraction") == b"0.0000", 20, "the new version to be seen")
    result = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Input/output error" in result.stderr
    assert "integrity error: image " + img["id"] in m.log()
    bad = subprocess.run([sys.executable, "-m", "imgfs", "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAILED" in bad.stderr
