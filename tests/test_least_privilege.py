"""Least privilege on the lab: a node's imgfs needs no more than a store-only config, a read-only S3
key and a Keystone user with the reader role. No glance-api.conf, no Glance read-write S3 keys."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid

import boto3
import botocore.exceptions
import pytest

from .conftest import sha256_file, wait_for
from .imageapi import MiB
from .imageapi import glance_api, images  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.mount, pytest.mark.lab]


@pytest.fixture
def read_only_s3_key(lab):
    """An RGW subuser of the lab's S3 user with read access only, and its S3 key."""
    conf = lab["ceph"]["conf"]
    sub = f"{lab['s3']['rgw_user']}:ro{uuid.uuid4().hex[:6]}"
    out = subprocess.run(["radosgw-admin", "-c", conf, "subuser", "create", f"--subuser={sub}", "--access=read",
                          "--key-type=s3", "--gen-access-key", "--gen-secret"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    key = next(k for k in json.loads(out)["keys"] if k["user"] == sub)
    yield key["access_key"], key["secret_key"]
    subprocess.run(["radosgw-admin", "-c", conf, "subuser", "rm", f"--subuser={sub}", "--purge-keys"],
                   capture_output=True, timeout=60)


@pytest.fixture
def reader_user(lab):
    """A Keystone user with only the reader role, on the project that owns the images."""
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    a = lab["keystone"]["users"]["admin"]
    admin = ks_session.Session(auth=v3.Password(auth_url=lab["keystone"]["auth_url"], username=a["username"],
                                                password=a["password"], project_name=a["project_name"],
                                                user_domain_name="Default", project_domain_name="Default"))
    ks = {"endpoint_filter": {"service_type": "identity", "interface": "public"}}
    project = lab["keystone"]["users"]["imgfs"]["project_name"]
    project_id = admin.get(f"/projects?name={project}", **ks).json()["projects"][0]["id"]
    role_id = admin.get("/roles?name=reader", **ks).json()["roles"][0]["id"]
    name, password = f"imgfs-reader-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    user = admin.post("/users", json={"user": {"name": name, "password": password, "domain_id": "default"}},
                      **ks).json()["user"]
    admin.put(f"/projects/{project_id}/users/{user['id']}/roles/{role_id}", **ks)
    roles = admin.get(f"/role_assignments?user.id={user['id']}&include_names", **ks).json()["role_assignments"]
    assert [r["role"]["name"] for r in roles] == ["reader"]
    yield name, password, project
    admin.delete(f"/users/{user['id']}", **ks)


def test_a_read_only_s3_key_and_a_reader_suffice(tmp_path, lab, glance_api, images, read_only_s3_key, reader_user,
                                                 mounter):
    img, data = images(3 * MiB + 11)
    access, secret = read_only_s3_key
    s3 = boto3.client("s3", endpoint_url=lab["s3"]["endpoint_url"], aws_access_key_id=access,
                      aws_secret_access_key=secret, region_name="us-east-1")
    with pytest.raises(botocore.exceptions.ClientError) as refused:  # the key really is read-only
        s3.put_object(Bucket=lab["glance"]["s3_bucket"], Key=f"imgfs-ro-probe-{uuid.uuid4().hex}", Body=b"x")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    name, password, project = reader_user
    conf = tmp_path / "imgfs.conf"  # the store stanza and the catalog: nothing else of glance-api.conf
    conf.write_text("\n".join([
        "[DEFAULT]", "enabled_backends = s3store:s3", "[glance_store]", "default_backend = s3store",
        "[s3store]", f"s3_store_host = {lab['s3']['endpoint_url']}", f"s3_store_access_key = {access}",
        f"s3_store_secret_key = {secret}", f"s3_store_bucket = {lab['glance']['s3_bucket']}",
        "s3_store_bucket_url_format = path",
        "[glance_catalog]", f"auth_url = {lab['keystone']['auth_url']}", f"username = {name}",
        f"password = {password}", f"project_name = {project}", f"region_name = {lab['keystone']['region_name']}",
        "[imgfs]", "catalog = glance", f"cache_dir = {tmp_path / 'cache'}", "chunk_size_mb = 1",
        "refresh_interval = 1", ""]))
    conf.chmod(0o600)
    m = mounter(conf)
    path = m.images / img["id"]
    wait_for(path.exists, 30, f"image {img['id']} in the mount")
    assert hashlib.sha512(path.read_bytes()).hexdigest() == img["os_hash_value"]
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert m.stop() == 0
    assert "AccessDenied" not in m.log() and "refused" not in m.log()
