"""The endpoint's authorization cache expires: once ``image_api_auth_ttl`` has passed, imgfs asks Glance
again, so a caller Glance stopped allowing (an image made private) is refused, and a revoked token gets
what Glance answers for it, on the lab's real Glance and Keystone. Within the TTL the cached "yes" is
used (the documented cost of the cache)."""

from __future__ import annotations

import time

import pytest
import requests

from .imageapi import MiB, Api, start_endpoint, status, token_of, wait_listed
from .imageapi import glance_api, images  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.mount, pytest.mark.lab]
TTL = 5.0


def set_visibility(glance_api: Api, image_id: str, visibility: str) -> None:
    r = glance_api("PATCH", f"/v2/images/{image_id}", headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
                   json=[{"op": "replace", "path": "/visibility", "value": visibility}])
    assert r.status_code == 200, r.text


def revoke(lab: dict, token: str) -> None:
    admin = token_of(lab, "admin")
    r = requests.delete(f"{lab['keystone']['auth_url']}/auth/tokens", timeout=60,
                        headers={"X-Auth-Token": admin, "X-Subject-Token": token})
    assert r.status_code == 204, r.text


def test_a_refused_caller_is_refused_once_the_ttl_has_passed(tmp_path, lab, glance_api, images, mounter):
    img, data = images(MiB + 9, visibility="public")
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None, image_api_auth_ttl=TTL)
    wait_listed(m, img["id"])
    path = f"/v2/images/{img['id']}/file"

    for change in ("made private", "token revoked"):
        token = token_of(lab, "demo")  # another project's member: sees the image only while it is public
        demo = Api(url, token)
        allowed_at = time.monotonic()
        first = demo("GET", path)
        assert first.status_code == 200 and first.content == data, change
        if change == "made private":
            set_visibility(glance_api, img["id"], "private")
            assert Api(lab["glance"]["endpoint"], token)("GET", path).status_code == 404  # Glance says no at once
        else:
            # Glance's keystonemiddleware may itself trust the token until its token_cache_time: what
            # matters here is that imgfs asks Glance again once its TTL is over, and answers as Glance.
            revoke(lab, token)
        cached_before = status(sock)["image_api"]["auth_cached"]
        again = demo("GET", path)
        if time.monotonic() - allowed_at < TTL - 0.5:  # within the TTL: the cached "yes" (documented)
            assert again.status_code == 200 and again.content == data, change
            assert status(sock)["image_api"]["auth_cached"] == cached_before + 1
        time.sleep(max(0.0, allowed_at + TTL + 0.5 - time.monotonic()))
        before = status(sock)["image_api"]
        late = demo("GET", path)
        after = status(sock)["image_api"]
        assert after["auth_cached"] == before["auth_cached"], "the cached answer was used after the TTL"
        if change == "made private":
            assert late.status_code == 404, late.status_code
            assert data[:64] not in late.content
            assert after["local_bytes"] == before["local_bytes"], "bytes were served after the TTL"
        else:
            direct = Api(lab["glance"]["endpoint"], token)("GET", path)
            assert late.status_code == direct.status_code, (late.status_code, direct.status_code)
        set_visibility(glance_api, img["id"], "public")
