"""Glance's cinder store: each image is a Cinder volume ``image-<id>`` read through an os-brick attachment.

This module is the mechanism, all blocking (called from worker threads): a Keystone session, the
cinderclient calls, os-brick's connector and a read-only view of the attached volume. The policy --
one attachment per volume per host shared by every open file, idle detach, retries on transitional
states, never taking a volume another host holds -- lives in ``imgfs.attach``.

Read-only by construction: measured on a real Cinder + RBD, an ``ro`` attachment still hands out a
writable librbd handle and a write through it lands in the image. So imgfs never keeps that handle where
anything could write to it: ``ReadOnlyVolume`` holds it privately and exposes only ``pread``; a device
path is opened O_RDONLY.

Our attachments are recognisable in Cinder: the connector carries ``mountpoint =
imgfs:<store>:<mount point>`` (``attachment_mark``), which Cinder records as the attachment's device, so
a restarted daemon can find and delete exactly the attachments a crashed one left behind on this host --
never glance-api's (``glance_store``), another host's, or those of another imgfs instance on this host
(another mount point).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..config import CinderStoreConfig, ImgfsOptions
from ..errors import BackendAccessDenied, BackendError, BackendUnavailable, Busy, ShortRead, StaleImage
from ..model import HandedAttachment, Location
from .base import valid_image_name

log = logging.getLogger(__name__)

API_VERSION = "3.54"  # attachments API with attach mode
_IN_USE = re.compile(r"current status is ([\w-]+)")
# Cinder states another host passes through briefly: worth waiting for ('in-use' only when not multiattach).
TRANSITIONAL = {"attaching", "detaching", "reserved", "downloading", "creating", "maintenance"}
# Volume states in which an image-volume is there to read. The attach states belong to every attach
# (imgfs's own, Glance's downloads, other hosts) and pass within a second: dropping the image from the
# catalog for them would make imgfs step aside from its own attachment.
SERVABLE = {"available", "in-use", "reserved", "attaching", "detaching"}
MIGRATING = {"starting", "migrating", "completing"}
_SECRET_KEYS = ("keyring", "auth_password", "secret", "password", "token", "key")


class VolumeBusy(Busy):
    """The volume is held elsewhere (non-multiattach) or passing through a state that forbids attaching.

    ``transitional``: worth waiting for. Besides the passing states, that is a volume that is not
    multiattach and ``in-use``: its holder is Glance's download or another host's imgfs, and each of
    them holds it only while it reads (imgfs: NON_MULTIATTACH_GRACE), so it comes free shortly."""

    def __init__(self, message: str, status: str, single_attach: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transitional = status in TRANSITIONAL or (single_attach and status == "in-use")


def mask(value: Any) -> Any:
    """connection_info with every credential replaced: the only form of it that may reach a log."""
    if isinstance(value, dict):
        return {k: ("***" if any(s in str(k).lower() for s in _SECRET_KEYS) else mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


class ReadOnlyVolume:
    """Positional reads of an attached volume, and nothing else.

    os-brick's RBD handle exposes its librbd image (``rbd_image``), whose ``read(offset, length)`` is
    positional and releases the GIL, so prefetch reads a volume in parallel; any other file-like handle
    is read with seek+read, one reader at a time. ``close`` waits for reads in flight."""

    def __init__(self, path: Any) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        self._fd: int | None = None
        self._image: Any = None
        self._handle: Any = None
        self._seek_lock = threading.Lock()
        if isinstance(path, str):
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        elif getattr(path, "rbd_image", None) is not None:
            self._image = path.rbd_image
        else:
            self._handle = path

    def pread(self, offset: int, length: int) -> bytes:
        with self._cond:
            if self._closed:
                raise BackendError("volume is detached")
            self._active += 1
        try:
            if self._fd is not None:
                data = os.pread(self._fd, length, offset)
                while 0 < len(data) < length:
                    more = os.pread(self._fd, length - len(data), offset + len(data))
                    if not more:
                        break
                    data += more
                return data
            if self._image is not None:
                return self._image.read(offset, length)
            with self._seek_lock:
                self._handle.seek(offset)
                return self._handle.read(length)
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def close(self, wait: float | None = None) -> bool:
        """Refuse new reads, wait up to ``wait`` seconds (None: for ever) for those in flight, release.
        False if reads still hang then (a stopped OSD): the handle is left as it is, since closing it
        under a read could crash librbd; it ends with the process."""
        with self._cond:
            self._closed = True
            if not self._cond.wait_for(lambda: not self._active, timeout=wait):
                return False
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._image = self._handle = None  # os-brick's disconnect_volume closes the image itself
            return True


@dataclass
class Attachment:
    volume_id: str
    attachment_id: str
    protocol: str
    connection_data: dict = None  # type: ignore[assignment]
    device_info: dict = None  # type: ignore[assignment]
    volume: ReadOnlyVolume | None = None
    multiattach: bool = False

    @property
    def private_connection(self) -> bool:
        """An RBD connection without a local device is this process's own librbd handle: disconnecting
        it can never pull a device from under another user on the host."""
        return self.protocol.upper() == "RBD" and not (self.device_info and isinstance(self.device_info.get("path"), str))


def _init_os_brick(private_tmp: str) -> None:
    """os-brick probes the host through an oslo.privsep daemon. imgfs runs as root (FUSE needs it), so
    the daemon is started directly (root helper ``env``) from this interpreter's bin directory.

    os-brick's RBD connector writes a ceph.conf holding the keyring into a temporary file per attachment
    and deletes it at detach: a killed daemon leaves it. So temporary files go to a root-only directory
    of ours, emptied here, at every start."""
    shutil.rmtree(private_tmp, ignore_errors=True)
    os.makedirs(private_tmp, mode=0o700)
    tempfile.tempdir = private_tmp
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    from oslo_privsep import priv_context

    priv_context.init(root_helper=["env"] if os.geteuid() == 0 else ["sudo"])


# Cinder keeps an attachment's mountpoint (reported as its device) in a column of 255 characters.
_MARK_MAX = 255


def attachment_mark(store: str, instance: str) -> str:
    """What this daemon's attachments carry as their mountpoint: the store and this instance's mount
    point, so two imgfs instances on one host never take each other's attachments for their own."""
    mark = f"imgfs:{store}:{instance}" if instance else f"imgfs:{store}"
    if len(mark) > _MARK_MAX:
        import hashlib

        mark = f"imgfs:{store}:#{hashlib.sha256(instance.encode()).hexdigest()[:32]}"[:_MARK_MAX]
    return mark


_BRICK_READY = False
_BRICK_LOCK = threading.Lock()


class CinderBackend:
    kind = "cinder"

    def __init__(self, cfg: CinderStoreConfig, options: ImgfsOptions, instance: str = "") -> None:
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3

        self.cfg = cfg
        self.name = cfg.name
        self.host = options.host or socket.gethostname()
        self.mountpoint = attachment_mark(cfg.name, instance)
        # librbd or a block device waits forever for a stopped OSD or a dead path; readers must not
        self.read_timeout = options.volume_read_timeout
        self.private_tmp = os.path.join(options.cache_dir, "private-tmp")  # the cache dir is this instance's alone
        self.lock_path = options.lock_path
        self._where = f"store '{cfg.name}' (cinder via {cfg.auth_url})"
        if cfg.application_credential_id and cfg.application_credential_secret:
            auth = v3.ApplicationCredential(
                auth_url=cfg.auth_url,
                application_credential_id=cfg.application_credential_id,
                application_credential_secret=cfg.application_credential_secret,
            )
        else:
            auth = v3.Password(
                auth_url=cfg.auth_url, username=cfg.user_name, password=cfg.password, project_name=cfg.project_name,
                user_domain_name=cfg.user_domain_name, project_domain_name=cfg.project_domain_name,
            )
        verify: bool | str = False if cfg.api_insecure else (cfg.ca_certificates_file or True)
        self.session = ks_session.Session(auth=auth, verify=verify, timeout=options.cinder_api_timeout)
        service_type, service_name, interface = cfg.catalog_info.split(":")
        self._client_args = dict(
            session=self.session, region_name=cfg.region_name, service_type=service_type,
            service_name=service_name or None, interface=interface.replace("URL", ""), retries=cfg.http_retries,
        )
        self._endpoint_template = cfg.endpoint_template
        self._client: Any = None
        self._keyring = open(cfg.rbd_keyring_file).read() if cfg.rbd_keyring_file else None
        self._attached: dict[str, Attachment] = {}
        # attachments a failed attach could not delete (Cinder's RPC down...): attachment id -> volume id,
        # deleted by the policy's sweeper once Cinder answers again
        self._orphans: dict[str, str] = {}
        self._connector_props: dict | None = None
        self._connectors: dict[str, Any] = {}
        # attachments the last imgfs handed over, not yet connected: attachment id -> what it left
        self._adopted: dict[str, HandedAttachment] = {}

    # ---- the API client -----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            # imported at first use (in a worker thread), not at start: it costs half a second of the
            # time a restarting imgfs keeps its readers waiting
            from cinderclient import client as cinder_client

            args = dict(self._client_args)
            if self._endpoint_template:
                args["endpoint_override"] = self._endpoint_template % {"project_id": self.session.get_project_id()}
            self._client = cinder_client.Client(API_VERSION, **args)
        return self._client

    def _error(self, e: Exception, what: str) -> BackendError:
        from cinderclient import exceptions as cexc
        from keystoneauth1 import exceptions as kexc

        if isinstance(e, (kexc.Unauthorized, cexc.Unauthorized)):
            return BackendAccessDenied(f"{self._where}: authentication failed while {what}; check cinder_store_user_name / cinder_store_password / cinder_store_project_name")
        if isinstance(e, (cexc.Forbidden, kexc.Forbidden)):
            return BackendAccessDenied(f"{self._where}: forbidden while {what}; the store user needs a role on project '{self.cfg.project_name}'")
        if isinstance(e, kexc.EndpointNotFound):
            return BackendError(f"{self._where}: no Cinder endpoint in the catalog for {self.cfg.catalog_info}; check cinder_catalog_info / cinder_os_region_name")
        # keystoneauth reports a read timeout as ConnectTimeout too: both mean nothing answered in time
        if isinstance(e, (kexc.RequestTimeout, kexc.ConnectTimeout)) or "timed out" in str(e).lower():
            return BackendUnavailable(f"{self._where}: no answer within cinder_api_timeout ({self.session.timeout:g}s) while "
                                      f"{what}; are Keystone, cinder-api and the RabbitMQ/cinder-volume behind it healthy?")
        if isinstance(e, (kexc.ConnectFailure, kexc.DiscoveryFailure, kexc.ServiceUnavailable, cexc.ConnectionError)):
            return BackendUnavailable(f"{self._where}: cannot reach Keystone or Cinder while {what}; is the service up?")
        if isinstance(e, cexc.ClientException):
            return BackendError(f"{self._where}: {what} failed: HTTP {getattr(e, 'code', '?')} {_one_line(getattr(e, 'message', ''))}")
        return BackendError(f"{self._where}: {what} failed: {type(e).__name__}")

    # ---- listing ------------------------------------------------------------------------------------

    def _location(self, volume: Any) -> Location | None:
        name = getattr(volume, "name", None) or ""
        meta = getattr(volume, "metadata", None) or {}
        image_id = meta.get("glance_image_id") or (name[len("image-"):] if name.startswith("image-") else None)
        if not image_id or not name.startswith("image-") or not valid_image_name(image_id):
            return None
        if self.cfg.volume_type and getattr(volume, "volume_type", None) != self.cfg.volume_type:
            return None
        if volume.status not in SERVABLE:
            return None  # being written or deleted by Glance, or in error: not an image (any more)
        migration = getattr(volume, "migration_status", None) or ""
        if migration in MIGRATING or migration.startswith("target:"):
            return None  # Cinder is moving it (or this is the copy being made): let go until it is done
        try:
            size = int(meta["image_size"])
        except (KeyError, ValueError):
            log.debug("%s: volume %s has no image_size metadata; not serving it", self._where, volume.id)
            return None
        return Location(self.name, image_id, size, volume.id, _timestamp(getattr(volume, "created_at", None)))

    def _volumes(self, search_opts: dict | None = None) -> list[Any]:
        return self.client.volumes.list(detailed=True, search_opts=search_opts or {})

    def list_images(self) -> list[Location]:
        try:
            volumes = self._volumes()
        except Exception as e:
            raise self._error(e, "listing image-volumes") from None
        found: dict[str, Location] = {}
        for volume in volumes:
            loc = self._location(volume)
            if loc is not None and (loc.image_id not in found or loc.mtime > found[loc.image_id].mtime):
                found[loc.image_id] = loc
        return list(found.values())

    def stat(self, image_id: str) -> Location | None:
        if not valid_image_name(image_id):
            return None
        try:
            volumes = self._volumes({"name": f"image-{image_id}"})
        except Exception as e:
            raise self._error(e, f"looking up image {image_id}") from None
        locations = [loc for loc in map(self._location, volumes) if loc is not None and loc.image_id == image_id]
        return max(locations, key=lambda l: l.mtime) if locations else None

    # ---- attach / detach (one call each; attach.py decides when) -----------------------------------

    def _brick(self, protocol: str) -> Any:
        global _BRICK_READY
        from os_brick.initiator import connector as brick

        with _BRICK_LOCK:
            if not _BRICK_READY:
                _init_os_brick(self.private_tmp)
                _BRICK_READY = True
            if self._connector_props is None:
                my_ip = _host_ip(self.host)
                props = brick.get_connector_properties(
                    "env", my_ip, self.cfg.use_multipath, self.cfg.enforce_multipath, host=self.host
                )
                props["mountpoint"] = self.mountpoint
                self._connector_props = props
            conn = self._connectors.get(protocol)
            if conn is None:
                conn = self._connectors[protocol] = brick.InitiatorConnector.factory(
                    protocol, "env", use_multipath=self.cfg.use_multipath, do_local_attach=False,
                )
            return conn

    def prepare(self) -> None:
        """Start os-brick's privsep daemon and probe this host's connector now (~1 s the first time),
        so the first read of an image does not pay for it."""
        self._brick("RBD")

    def attach(self, volume_id: str) -> Attachment:
        """Reserve a read-only attachment, give it our connector, connect it, complete it. Raises
        VolumeBusy if Cinder refuses because of the volume's state.

        Reserving first (no connector: a database write, no RPC to cinder-volume) hands us the
        attachment's id before anything can hang: if the connector step times out (RabbitMQ or
        cinder-volume down), we still know what to delete. One that cannot be deleted now is an orphan
        the sweeper deletes later -- never an attachment nobody knows about."""
        from cinderclient import exceptions as cexc

        self._brick("RBD")  # props first: they name this host
        assert self._connector_props is not None
        try:
            volume = self.client.volumes.get(volume_id)
        except cexc.NotFound:
            raise StaleImage(f"{self._where}: volume {volume_id} no longer exists") from None
        except Exception as e:
            raise self._error(e, f"looking up volume {volume_id}") from None
        try:
            created = self.client.attachments.create(volume_id, None, mode="ro")
        except cexc.BadRequest as e:
            found = _IN_USE.search(str(getattr(e, "message", e)))
            if found:
                status = found.group(1)
                single = not getattr(volume, "multiattach", False)
                raise VolumeBusy(f"{self._where}: volume {volume_id} is {status} (held by another host or busy); not taking it",
                                 status, single_attach=single) from None
            raise self._error(e, f"attaching volume {volume_id}") from None
        except Exception as e:
            raise self._error(e, f"attaching volume {volume_id}") from None
        att = Attachment(volume_id, created["id"], "", multiattach=bool(getattr(volume, "multiattach", False)))
        try:
            info = getattr(self.client.attachments.update(att.attachment_id, self._connector_props), "connection_info", None) or {}
            self._connect(att, info)
            self.client.attachments.complete(att.attachment_id)
        except Exception as e:
            self._undo(att)
            if isinstance(e, BackendError):
                raise
            raise self._error(e, f"connecting volume {volume_id}") from None
        self._attached[volume_id] = att
        return att

    def _connect(self, att: Attachment, info: dict) -> None:
        """Connect this host to the volume as Cinder's connection info says, and open it for reading."""
        protocol = str(info.get("driver_volume_type", "")).upper()
        data = dict(info.get("data", info))  # an attachment's show gives the data flat
        data.pop("driver_volume_type", None)
        if protocol == "RBD" and self._keyring and not data.get("keyring"):
            data["keyring"] = self._keyring
        att.protocol, att.connection_data = protocol, data
        log.debug("%s: attachment %s of volume %s: %s", self._where, att.attachment_id, att.volume_id, mask(data))
        att.device_info = self._brick(protocol).connect_volume(data)
        att.volume = ReadOnlyVolume(att.device_info["path"])

    # ---- a hand-over to the next imgfs --------------------------------------------------------------

    def hand_over(self, volume_id: str) -> HandedAttachment | None:
        """Let go of this process's hold on an attached volume but leave the attachment in Cinder, for
        the next imgfs to adopt: reads end, librbd's handle (this process's own) is closed, a device on
        the host stays connected. None if a read still hangs: then it is detached as at a stop."""
        att = self._attached.get(volume_id)
        if att is None:
            return None
        if att.volume is not None and not att.volume.close(wait=self.read_timeout):
            return None
        self._attached.pop(volume_id)
        if att.private_connection and att.device_info is not None:
            try:
                self._brick(att.protocol).disconnect_volume(att.connection_data, att.device_info)
            except Exception:  # noqa: BLE001 - the handle ends with this process anyway
                log.warning("%s: closing the connection to volume %s failed; it ends with this process", self._where, volume_id)
        return HandedAttachment(volume_id, att.attachment_id, att.multiattach)

    def adopt(self, handed: list[HandedAttachment]) -> None:
        """Attachments the last imgfs left: ours, not stale (stale_attachments passes them over)."""
        self._adopted.update({h.attachment_id: h for h in handed})

    def take_adopted(self, attachment_id: str) -> Attachment:
        """Connect an attachment the last imgfs left, with the connection info Cinder keeps for it (no
        new attachment, no RPC to cinder-volume). StaleImage if Cinder no longer has it."""
        from cinderclient import exceptions as cexc

        handed = self._adopted.pop(attachment_id)
        att = Attachment(handed.volume_id, attachment_id, "", multiattach=handed.multiattach)
        try:
            shown = self.client.attachments.show(attachment_id)
        except cexc.NotFound:
            raise StaleImage(f"{self._where}: attachment {attachment_id} of volume {handed.volume_id} is gone") from None
        except Exception as e:
            self._orphans[attachment_id] = handed.volume_id  # not used: the sweeper deletes it
            raise self._error(e, f"looking up attachment {attachment_id} of volume {handed.volume_id}") from None
        info = getattr(shown, "connection_info", None) or {}
        try:
            self._connect(att, info)
        except Exception as e:
            self._undo(att)
            raise self._error(e, f"connecting volume {handed.volume_id}") from None
        self._attached[handed.volume_id] = att
        return att

    def adopted(self) -> list[HandedAttachment]:
        return list(self._adopted.values())

    def _undo(self, att: Attachment) -> None:
        try:
            if att.device_info is not None:
                self._brick(att.protocol).disconnect_volume(att.connection_data, att.device_info)
        except Exception:  # noqa: BLE001 - best effort; the attachment delete below matters more
            log.warning("%s: disconnecting volume %s after a failed attach failed", self._where, att.volume_id)
        try:
            self.client.attachments.delete(att.attachment_id)
        except Exception as e:  # noqa: BLE001
            self._orphans[att.attachment_id] = att.volume_id
            log.error("%s; will retry deleting attachment %s of volume %s", self._error(e, "removing a failed attachment"),
                      att.attachment_id, att.volume_id)

    def detach(self, volume_id: str) -> None:
        """Disconnect and delete our attachment, under glance_store's own lock for this volume, and
        disconnect a shared device only if Cinder counts at most one attachment of this host (the rule
        glance-api follows, so neither pulls the device from under the other)."""
        from oslo_concurrency import lockutils

        att = self._attached.pop(volume_id, None)
        if att is None:
            return
        hung = att.volume is not None and not att.volume.close(wait=self.read_timeout)
        if hung:
            log.warning("%s: a read of volume %s is still hung after %gs (volume_read_timeout); deleting the attachment "
                        "and leaving its connection to end with this process", self._where, volume_id, self.read_timeout)
        with lockutils.external_lock(volume_id, lock_file_prefix="glance_store-", lock_path=self.lock_path):
            disconnect = not hung
            if disconnect and not att.private_connection and att.multiattach:
                try:
                    mine = [a for a in self.client.volumes.get(volume_id).attachments if a.get("host_name") == self.host]
                    disconnect = len(mine) <= 1
                except Exception as e:  # noqa: BLE001
                    log.warning("%s; keeping the device connected to be safe", self._error(e, f"counting attachments of {volume_id}"))
                    disconnect = False
            if disconnect and att.device_info is not None:
                try:
                    self._brick(att.protocol).disconnect_volume(att.connection_data, att.device_info)
                except Exception:  # noqa: BLE001
                    log.warning("%s: disconnect of volume %s failed; deleting the attachment anyway", self._where, volume_id)
            try:
                self.client.attachments.delete(att.attachment_id)
            except Exception as e:
                self._attached.setdefault(volume_id, att)  # keep it known so shutdown/cleanup retries
                raise self._error(e, f"deleting attachment {att.attachment_id} of volume {volume_id}") from None

    def stale_attachments(self) -> list[tuple[str, str]]:
        """(volume id, attachment id) of every attachment in this store that this host's imgfs made but
        no longer knows: what a crashed daemon left behind."""
        try:
            volumes = self._volumes()
        except Exception as e:
            raise self._error(e, "looking for stale attachments") from None
        known = {a.attachment_id for a in self._attached.values()} | set(self._adopted)
        return [
            (v.id, a.get("attachment_id") or a.get("id"))
            for v in volumes
            for a in (getattr(v, "attachments", None) or [])
            if a.get("host_name") == self.host and a.get("device") == self.mountpoint
            and (a.get("attachment_id") or a.get("id")) not in known
        ]

    def delete_attachment(self, attachment_id: str) -> None:
        from cinderclient import exceptions as cexc

        try:
            self.client.attachments.delete(attachment_id)
        except cexc.NotFound:
            pass
        except Exception as e:
            raise self._error(e, f"deleting attachment {attachment_id}") from None
        self._orphans.pop(attachment_id, None)

    def orphans(self) -> list[tuple[str, str]]:
        """(volume id, attachment id) of attachments a failed attach left and could not delete."""
        return [(volume_id, attachment_id) for attachment_id, volume_id in list(self._orphans.items())]

    def attached(self) -> list[Attachment]:
        return list(self._attached.values())

    # ---- reads --------------------------------------------------------------------------------------

    def read(self, location: Location, offset: int, length: int) -> bytes:
        att = self._attached.get(location.version)
        if att is None or att.volume is None:
            raise BackendError(f"{self._where}: volume {location.version} of image {location.image_id} is not attached")
        try:
            data = att.volume.pread(offset, length)
        except BackendError:
            raise
        except Exception as e:  # librbd errors, EIO from a device
            raise BackendError(f"{self._where}: read error on volume {location.version} at {offset}: {type(e).__name__}") from None
        if len(data) != length:
            raise ShortRead(f"{self._where}: volume {location.version}: {len(data)} of {length} bytes at {offset}")
        return data

    def describe(self) -> dict[str, str]:
        return {"type": "cinder", "auth_url": self.cfg.auth_url, "project": self.cfg.project_name, "host": self.host}

    def close(self) -> None:
        self.session.session.close()


def _timestamp(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()  # Cinder speaks UTC


def _host_ip(host: str) -> str:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.getaddrinfo(host, None, family)[0][4][0]
        except socket.gaierror:
            continue
    return "127.0.0.1"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


