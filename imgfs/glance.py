"""The Image API v2 as a catalog: which images exist, their names and metadata, and which stores hold
them. Blocking (called from worker threads by the catalog); knows nothing of FUSE or the stores' bytes.

Glance decides what exists; the bytes still come from imgfs's own store stanzas, found by store name
(``stores`` / ``locations[].metadata.store``). Location URLs are never used: older deployments embed
credentials in them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from .config import GlanceCatalogConfig
from .errors import BackendAccessDenied, BackendError, BackendUnavailable

log = logging.getLogger(__name__)

_IMAGE_ID = re.compile(r"^[0-9a-fA-F-]{1,64}$")

# What becomes user.imgfs.<key> on each file, when Glance has it.
META_KEYS = ("disk_format", "container_format", "checksum", "os_hash_algo", "os_hash_value", "owner",
             "visibility", "created_at", "updated_at")


@dataclass(frozen=True)
class GlanceImage:
    id: str
    name: str
    size: int
    stores: tuple[str, ...]  # empty: Glance did not say (single-store deployments)
    meta: tuple[tuple[str, str], ...]

    @property
    def created_at(self) -> str:
        return dict(self.meta).get("created_at", "")


def parse(body: dict[str, Any]) -> GlanceImage | None:
    """An active image, or None for anything not readable yet (queued, saving, importing...)."""
    if body.get("status") != "active" or body.get("size") is None:
        return None
    stores = tuple(s.strip() for s in str(body.get("stores") or "").split(",") if s.strip())
    if not stores:
        stores = tuple(loc["metadata"]["store"] for loc in body.get("locations") or () if (loc.get("metadata") or {}).get("store"))
    meta = tuple((k, str(body[k])) for k in META_KEYS if body.get(k) is not None)
    return GlanceImage(str(body["id"]), str(body.get("name") or ""), int(body["size"]), stores, meta)


def keystone_session(cfg: GlanceCatalogConfig, *, timeout: float):
    """A keystoneauth session with [glance_catalog]'s credentials."""
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    auth = v3.Password(auth_url=cfg.auth_url, username=cfg.username, password=cfg.password,
                       project_name=cfg.project_name, user_domain_name=cfg.user_domain_name,
                       project_domain_name=cfg.project_domain_name)
    return ks_session.Session(auth=auth, verify=False if cfg.insecure else (cfg.cafile or True), timeout=timeout)


def image_endpoint(cfg: GlanceCatalogConfig, *, timeout: float) -> str:
    """The image service's URL in the Keystone catalog, as [glance_catalog]'s user sees it (blocking)."""
    from keystoneauth1 import exceptions as kexc

    sess = keystone_session(cfg, timeout=timeout)
    where = f"the Keystone catalog at {cfg.auth_url}"
    try:
        url = sess.get_endpoint(service_type="image", interface=cfg.interface, region_name=cfg.region_name)
    except (kexc.Unauthorized, kexc.Forbidden):
        raise BackendAccessDenied(f"{where} refused [glance_catalog]'s credentials; check username / password / "
                                  "project_name") from None
    except kexc.ClientException as e:
        raise BackendUnavailable(f"cannot look the image service up in {where} ({type(e).__name__})") from None
    finally:
        sess.session.close()
    if not url:
        raise BackendError(f"{where} has no image service (interface {cfg.interface}); check [glance_catalog] "
                           "region_name / interface")
    return url.rstrip("/")


class GlanceSource:
    def __init__(self, cfg: GlanceCatalogConfig, *, timeout: float) -> None:
        self.session = keystone_session(cfg, timeout=timeout)
        self.endpoint_filter = {"service_type": "image", "interface": cfg.interface, "region_name": cfg.region_name}
        self._where = f"Glance catalog (via {cfg.auth_url})"

    def _get(self, path: str, what: str) -> dict[str, Any]:
        from keystoneauth1 import exceptions as kexc

        try:
            return self.session.get(path, endpoint_filter=self.endpoint_filter, raise_exc=True).json()
        except kexc.NotFound:
            raise
        except (kexc.Unauthorized, kexc.Forbidden):
            raise BackendAccessDenied(f"{self._where}: refused while {what}; check [glance_catalog] username / password / project_name") from None
        except kexc.EndpointNotFound:
            raise BackendError(f"{self._where}: no image service in the catalog; check [glance_catalog] region_name / interface") from None
        except (kexc.ConnectFailure, kexc.ConnectTimeout, kexc.DiscoveryFailure, kexc.ServiceUnavailable, kexc.RequestTimeout):
            raise BackendUnavailable(f"{self._where}: cannot reach Keystone or Glance while {what}") from None
        except kexc.HttpError as e:
            raise BackendError(f"{self._where}: {what} failed: HTTP {e.http_status}") from None
        except ValueError:
            raise BackendError(f"{self._where}: {what}: the answer is not JSON") from None

    def list_images(self) -> list[GlanceImage]:
        """Every active image, following Glance's pages."""
        images: list[GlanceImage] = []
        path: str | None = "/v2/images?limit=500&status=active"
        while path:
            body = self._get(path, "listing images")
            images += [img for img in map(parse, body.get("images", ())) if img is not None]
            path = body.get("next")
        return images

    def get(self, image_id: str) -> GlanceImage | None:
        from keystoneauth1 import exceptions as kexc

        if not _IMAGE_ID.match(image_id):  # Glance ids are UUIDs: anything else is not worth a request
            return None
        try:
            return parse(self._get(f"/v2/images/{image_id}", f"looking up image {image_id}"))
        except kexc.NotFound:
            return None

    def close(self) -> None:
        self.session.session.close()
