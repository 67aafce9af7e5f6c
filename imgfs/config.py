"""Configuration: glance-api.conf store stanzas plus imgfs's own ``[imgfs]`` section.

Files are OpenStack-style INI, read in order; a later file wins option by option, exactly like
``--config-file`` in every OpenStack service. Stores are declared the way Glance declares them
(``[DEFAULT] enabled_backends = name:type, ...`` and one stanza per store using Glance's option names),
so an operator can hand imgfs the glance-api.conf they already have. The legacy single-store layout
(``[glance_store] default_store = s3`` with the options in ``[glance_store]``) is read too.

Why not oslo.config: it attributes a bad value to the wrong file when several files are given (measured:
a bad value in the first file was reported as coming from the second), and its messages are multi-line
reprs. Every error here is one line naming the file, the section and the option, and never echoes a
secret's value.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import logging
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

# configparser treats its default section specially (its keys leak into every section); OpenStack's
# [DEFAULT] is an ordinary section, so give configparser a name nobody uses.
_NO_DEFAULT_SECTION = "\x00imgfs-no-default\x00"


@dataclass(frozen=True)
class S3StoreConfig:
    name: str
    endpoint_url: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    addressing_style: str = "auto"  # boto3's names: auto | virtual | path
    region_name: str | None = None
    cacert: str | None = None
    weight: int = 0
    kind: str = "s3"


@dataclass(frozen=True)
class FileStoreConfig:
    name: str
    datadir: str
    weight: int = 0
    kind: str = "file"


@dataclass(frozen=True)
class CinderStoreConfig:
    """Glance's cinder store: one image-volume per image, read through an os-brick attachment.

    imgfs always authenticates with the store's own service credentials (``cinder_store_*``): a daemon
    has no user request context to borrow a token from, unlike glance-api.
    """

    name: str
    auth_url: str
    user_name: str
    password: str = field(repr=False)
    project_name: str
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    application_credential_id: str | None = None
    application_credential_secret: str | None = field(default=None, repr=False)
    catalog_info: str = "volumev3::publicURL"  # service_type:service_name:interface
    endpoint_template: str | None = None
    region_name: str | None = None
    volume_type: str | None = None
    use_multipath: bool = False
    enforce_multipath: bool = False
    http_retries: int = 3
    api_insecure: bool = False
    ca_certificates_file: str | None = None
    # Glance's cinder_state_transition_timeout and rootwrap_config are not read: imgfs waits on volume
    # states with [imgfs] attach_timeout, and runs os-brick without rootwrap (it is root already).
    # imgfs's own extension: a keyring for os-brick's RBD connector when Cinder's connection info has
    # none and /etc/ceph holds none (os-brick otherwise reads /etc/ceph/<cluster>.client.<user>.keyring).
    rbd_keyring_file: str | None = None
    weight: int = 0
    kind: str = "cinder"


StoreConfig = S3StoreConfig | FileStoreConfig | CinderStoreConfig


@dataclass(frozen=True)
class GlanceCatalogConfig:
    """Where ``[imgfs] catalog = glance`` lists images from (the Image API v2), as keystoneauth options."""

    auth_url: str
    username: str
    password: str = field(repr=False)
    project_name: str
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    region_name: str | None = None
    interface: str = "public"
    cafile: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class ImgfsOptions:
    cache_dir: str = "/var/cache/imgfs"
    cache_max_size_gb: float = 20.0
    cache_max_count: int = 100_000
    chunk_size_mb: int = 8
    refresh_interval: float = 60.0
    memory_cache_mb: int = 32  # one 32 MiB prefetch run (RUN_BYTES); 64 measured +45 MiB RSS for no clear CPU gain
    prefetch_max_mb: int = 128
    cache_direct_writes: bool = True  # fills with O_DIRECT where the file system takes it (cache.py)
    backend_max_connections: int = 8
    read_ahead_kb: int = 8192
    allow_other: bool = False
    # a group whose members may read the mount (besides root), e.g. libvirt-qemu, cinder or nova; its
    # numeric id after parsing; -1: none (only root, or everyone with allow_other)
    mount_group: int = -1
    negative_lookup_ttl: float = 5.0
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 30.0
    s3_max_attempts: int = 5
    # Cinder image-volumes
    host: str = ""  # the name this node attaches volumes as; empty: the machine's hostname
    lock_path: str = "/var/lib/imgfs/locks"  # default: [oslo_concurrency] lock_path, shared with glance-api
    # seconds an attachment outlives the last fetch from its volume (one attach costs ~0.5-1 s here: a
    # pause in a sequential read must not pay it again, while Glance's delete must not wait long)
    attach_idle_timeout: float = 5.0
    attach_timeout: float = 60.0
    detach_deadline: float = 60.0
    cinder_api_timeout: float = 30.0
    volume_read_timeout: float = 30.0  # an attached volume's read may hang (a stopped OSD): EIO after this
    catalog: str = "stores"  # stores: what the stores hold; glance: what Glance says (names, metadata)
    control_socket: str = ""  # empty: /run/imgfs/<mountpoint with / as ->.sock
    metrics_port: int = 0  # 0: metrics only through the control socket; else also on 127.0.0.1:<port>
    # The node-local Image API endpoint (imgfs.endpoint): off unless image_api_listen is set
    image_api_listen: str = ""  # [host:]port; a bare port listens on 127.0.0.1
    image_api_upstream: str = ""  # the real Glance; empty: from the Keystone catalog of [glance_catalog]
    image_api_auth_ttl: float = 30.0  # seconds a caller's "yes, you may read image X" from Glance is reused
    image_api_upstream_timeout: float = 300.0  # seconds to wait for the real Glance's answer
    image_api_cafile: str = ""  # CA bundle for an https upstream (default: the system's)
    # The endpoint's bounds on clients (imgfs.httpserver.Limits; docs/openstack.md says how they were chosen)
    image_api_max_connections: int = 256
    image_api_header_timeout: float = 10.0  # seconds from a request head's first byte to its end
    image_api_idle_timeout: float = 75.0  # seconds a keep-alive connection may wait for its next request
    image_api_client_timeout: float = 60.0  # seconds a request body or a response may go without progress

    @property
    def chunk_size(self) -> int:
        return self.chunk_size_mb * 1024 * 1024


@dataclass(frozen=True)
class ImageApiConfig:
    """The node-local Image API endpoint: where it listens and the real Glance behind it."""

    host: str
    port: int
    upstream: str | None  # None: the image endpoint of ``auth``'s Keystone catalog
    auth: GlanceCatalogConfig | None  # the credentials that find ``upstream`` in the catalog
    auth_ttl: float
    timeout: float
    cafile: str | None
    max_connections: int = 256
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    client_timeout: float = 60.0


@dataclass(frozen=True)
class FleetConfig:
    """Fleet mode ([fleet]): chunk reads of large images go through this node's nginx, which hashes each
    chunk to an owner node; the owner's nginx caches it, fetched once through the owner's imgfs (the
    origin gateway, the only holder of store credentials)."""

    members: tuple[str, ...]  # every node's mesh address (host:port), this node's included
    mesh_listen: str  # where this node's nginx accepts peers (mutual TLS)
    certfile: str
    keyfile: str
    cafile: str
    local_port: int = 8085  # this node's nginx for its own imgfs, on 127.0.0.1
    gateway_port: int = 8089  # imgfs's origin gateway, on 127.0.0.1, for its own nginx
    secret_file: str = "/etc/imgfs/mesh/gateway.secret"
    peer_name: str = "imgfs-mesh"  # the name every member's certificate carries, checked by its peers
    min_image_mb: int = 64  # smaller images are read from the origin directly
    timeout: float = 30.0  # seconds one chunk from the mesh may take before the origin is asked instead
    # seconds to reach an owner, TLS handshake included, before nginx asks the ring's next node: a node
    # starting hundreds of handshakes at once needs more than a round trip, and every owner passed over
    # for being slow is one more origin fetch of that chunk
    connect_timeout: float = 5.0
    members_file: str | None = None
    nginx_dir: str = "/etc/imgfs/mesh"
    cache_path: str = "/var/cache/imgfs-mesh"
    cache_max_size_gb: float = 50.0
    run_dir: str = "/run/imgfs-mesh"
    access_log: str | None = None  # nginx's line per request (cache status, owner tried): off unless set
    # Per-block digests kept beside each image at the origin, so a chunk from a peer is checked before a
    # reader gets it: "publish" (use them, and store one after a verified full read when there is none:
    # the store's credentials need write access to the sums prefix), "use" (read-only credentials), "off"
    chunk_sums: str = "publish"


@dataclass(frozen=True)
class Config:
    stores: tuple[StoreConfig, ...]  # preference order: highest weight, then the default backend, then declared
    options: ImgfsOptions
    files: tuple[str, ...]
    glance: GlanceCatalogConfig | None = None
    image_api: ImageApiConfig | None = None
    fleet: FleetConfig | None = None
    warnings: tuple[str, ...] = ()  # what is accepted but probably not meant (e.g. an inline comment)


@dataclass(frozen=True)
class _Value:
    text: str
    path: str


class _Merged:
    """Every (section, option) of all files, later files winning, remembering where each came from."""

    def __init__(self, paths: list[str]) -> None:
        self.values: dict[tuple[str, str], _Value] = {}
        self.section_files: dict[str, list[str]] = {}
        for path in paths:
            self._read(path)

    def _read(self, path: str) -> None:
        parser = configparser.RawConfigParser(
            strict=False, default_section=_NO_DEFAULT_SECTION, interpolation=None
        )
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh, source=path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file; check the --config-file path") from None
        except PermissionError:
            raise ConfigError(f"{path}: permission denied reading config file; run as root or fix its mode") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is this the right file?") from None
        except OSError as e:  # a symlink loop, a path through a file, a name too long, an I/O error
            raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
        except configparser.Error as e:
            raise ConfigError(f"{path}: cannot parse INI: {_one_line(e)}") from None
        for section in parser.sections():
            self.section_files.setdefault(section, []).append(path)
            for option, text in parser.items(section):
                self.values[(section, option)] = _Value(text.strip(), path)

    def has_section(self, section: str) -> bool:
        return section in self.section_files

    def options_of(self, section: str) -> dict[str, _Value]:
        return {opt: v for (sec, opt), v in self.values.items() if sec == section}


_INLINE_COMMENT = re.compile(r"\s[#;]")


def _inline_comments(merged: _Merged) -> tuple[str, ...]:
    """One warning per value holding what looks like a trailing comment: neither imgfs nor oslo.config
    (glance-api's parser) strips ``value  # comment``, so the comment becomes part of the value. The
    value itself is never shown: it may be a secret."""
    return tuple(
        f"{v.path}: [{section}] {option}: the value contains an inline comment ('{m.group().strip()}' after a space), "
        "which is kept as part of the value; put comments on lines of their own"
        for (section, option), v in sorted(merged.values.items()) if (m := _INLINE_COMMENT.search(v.text)))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class _Section:
    """Typed access to one section; every failure names file, section and option."""

    def __init__(self, merged: _Merged, section: str, secrets: frozenset[str] = frozenset()) -> None:
        self.merged = merged
        self.section = section
        self.secrets = secrets

    def _where(self, option: str) -> str:
        value = self.merged.values.get((self.section, option))
        if value is not None:
            return value.path
        files = self.merged.section_files.get(self.section)
        return files[-1] if files else "config"

    def _bad(self, option: str, text: str, why: str) -> ConfigError:
        shown = "'***'" if option in self.secrets else repr(text)
        return ConfigError(f"{self._where(option)}: [{self.section}] {option} = {shown}: {why}")

    def raw(self, option: str) -> str | None:
        value = self.merged.values.get((self.section, option))
        return None if value is None else value.text

    def required(self, option: str, why: str) -> str:
        text = self.raw(option)
        if not text:
            raise ConfigError(
                f"{self._where(option)}: [{self.section}] {option} is missing or empty: {why}; add it to that section"
            )
        return text

    def get(self, option: str, default: T, parse: Callable[[str], T], expect: str) -> T:
        text = self.raw(option)
        if text is None or text == "":
            return default
        try:
            return parse(text)
        except ValueError:
            raise self._bad(option, text, f"expected {expect}") from None

    def number(self, option: str, default: float, *, minimum: float, maximum: float | None = None) -> float:
        def parse(text: str) -> float:
            v = float(text)
            if not (math.isfinite(v) and v >= minimum and (maximum is None or v <= maximum)):
                raise ValueError
            return v

        return self.get(option, default, parse, _range("a number", minimum, maximum))

    def integer(self, option: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        def parse(text: str) -> int:
            v = int(text)
            if v < minimum or (maximum is not None and v > maximum):
                raise ValueError
            return v

        return self.get(option, default, parse, _range("a whole number", minimum, maximum))

    def boolean(self, option: str, default: bool) -> bool:
        return self.get(option, default, _parse_bool, "true or false")

    def choice(self, option: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(text: str) -> str:
            if text not in choices:
                raise ValueError
            return text

        return self.get(option, default, parse, "one of " + ", ".join(choices))


def _range(what: str, minimum: float, maximum: float | None) -> str:
    return f"{what} >= {minimum:g}" + ("" if maximum is None else f" and <= {maximum:g}")


def _parse_group(text: str) -> int:
    import grp

    try:
        return grp.getgrgid(int(text)).gr_gid if text.isdigit() else grp.getgrnam(text).gr_gid
    except (KeyError, OverflowError):
        raise ValueError(text) from None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(text)


_IMGFS_OPTIONS = frozenset(f.name for f in ImgfsOptions.__dataclass_fields__.values())


def _imgfs_options(merged: _Merged) -> ImgfsOptions:
    sec = _Section(merged, "imgfs")
    for option in merged.options_of("imgfs"):
        if option not in _IMGFS_OPTIONS:
            # A typo must not silently fall back to a default (e.g. a cache limit that never applies).
            raise ConfigError(
                f"{merged.values[('imgfs', option)].path}: [imgfs] {option}: unknown option; "
                f"known options: {', '.join(sorted(_IMGFS_OPTIONS))}"
            )
    d = ImgfsOptions()
    opts = ImgfsOptions(
        cache_dir=sec.get("cache_dir", d.cache_dir, _parse_abs_path, "an absolute path"),
        # bounded so the limit in bytes stays a finite integer (1e300 GB overflowed in the daemon)
        cache_max_size_gb=sec.number("cache_max_size_gb", d.cache_max_size_gb, minimum=0.001, maximum=1e9),
        cache_max_count=sec.integer("cache_max_count", d.cache_max_count, minimum=1),
        chunk_size_mb=sec.integer("chunk_size_mb", d.chunk_size_mb, minimum=1, maximum=64),
        refresh_interval=sec.number("refresh_interval", d.refresh_interval, minimum=1),
        memory_cache_mb=sec.integer("memory_cache_mb", d.memory_cache_mb, minimum=0, maximum=65536),
        prefetch_max_mb=sec.integer("prefetch_max_mb", d.prefetch_max_mb, minimum=0, maximum=65536),
        cache_direct_writes=sec.boolean("cache_direct_writes", d.cache_direct_writes),
        backend_max_connections=sec.integer("backend_max_connections", d.backend_max_connections, minimum=1, maximum=256),
        read_ahead_kb=sec.integer("read_ahead_kb", d.read_ahead_kb, minimum=0, maximum=1048576),
        allow_other=sec.boolean("allow_other", d.allow_other),
        mount_group=sec.get("mount_group", d.mount_group, _parse_group, "a group name or numeric id that exists here"),
        negative_lookup_ttl=sec.number("negative_lookup_ttl", d.negative_lookup_ttl, minimum=0),
        # socket timeouts: beyond what a socket takes (~9e9 s) every request would fail; a day is plenty
        s3_connect_timeout=sec.number("s3_connect_timeout", d.s3_connect_timeout, minimum=0.1, maximum=86400),
        s3_read_timeout=sec.number("s3_read_timeout", d.s3_read_timeout, minimum=0.1, maximum=86400),
        s3_max_attempts=sec.integer("s3_max_attempts", d.s3_max_attempts, minimum=1, maximum=20),
        host=sec.get("host", d.host, _parse_host, "a host name"),
        # glance-api serialises its detaches with file locks in its own lock_path: share it by default
        lock_path=sec.get("lock_path", _Section(merged, "oslo_concurrency").raw("lock_path") or d.lock_path,
                          _parse_abs_path, "an absolute path"),
        attach_idle_timeout=sec.number("attach_idle_timeout", d.attach_idle_timeout, minimum=0),
        attach_timeout=sec.number("attach_timeout", d.attach_timeout, minimum=0),
        detach_deadline=sec.number("detach_deadline", d.detach_deadline, minimum=1),
        cinder_api_timeout=sec.number("cinder_api_timeout", d.cinder_api_timeout, minimum=1, maximum=86400),
        volume_read_timeout=sec.number("volume_read_timeout", d.volume_read_timeout, minimum=0.1),
        catalog=sec.choice("catalog", d.catalog, ("stores", "glance")),
        control_socket=sec.get("control_socket", d.control_socket, _parse_abs_path, "an absolute path"),
        metrics_port=sec.integer("metrics_port", d.metrics_port, minimum=0, maximum=65535),
        image_api_listen=sec.get("image_api_listen", d.image_api_listen, _parse_listen, "[host:]port, e.g. 127.0.0.1:9393"),
        image_api_upstream=sec.get("image_api_upstream", d.image_api_upstream, _parse_url, "an http(s):// URL of Glance"),
        image_api_auth_ttl=sec.number("image_api_auth_ttl", d.image_api_auth_ttl, minimum=0, maximum=3600),
        image_api_upstream_timeout=sec.number("image_api_upstream_timeout", d.image_api_upstream_timeout,
                                              minimum=1, maximum=86400),
        image_api_cafile=sec.get("image_api_cafile", d.image_api_cafile, _parse_abs_path, "an absolute path"),
        image_api_max_connections=sec.integer("image_api_max_connections", d.image_api_max_connections, minimum=1,
                                              maximum=65536),
        image_api_header_timeout=sec.number("image_api_header_timeout", d.image_api_header_timeout, minimum=0.1,
                                            maximum=3600),
        image_api_idle_timeout=sec.number("image_api_idle_timeout", d.image_api_idle_timeout, minimum=0.1, maximum=86400),
        image_api_client_timeout=sec.number("image_api_client_timeout", d.image_api_client_timeout, minimum=0.1,
                                            maximum=86400),
    )
    if opts.image_api_cafile and not os.path.isfile(opts.image_api_cafile):
        raise sec._bad("image_api_cafile", opts.image_api_cafile, "no such CA bundle file")
    if opts.cache_max_size_gb * 1024 < opts.chunk_size_mb:
        raise sec._bad("cache_max_size_gb", str(opts.cache_max_size_gb), "smaller than one chunk (chunk_size_mb)")
    return opts


def _parse_host(text: str) -> str:
    if not all(c.isalnum() or c in "-._" for c in text):
        raise ValueError(text)
    return text


def _parse_listen(text: str) -> str:
    """[host:]port with an IP literal (or localhost) as host: the address the Image API endpoint binds."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    ipaddress.ip_address(host)  # ValueError: not an address
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _parse_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError(text)
    return _parse_endpoint(text)


def _parse_abs_path(text: str) -> str:
    if not os.path.isabs(text) or "\0" in text:  # no system call takes a NUL: the daemon would crash on it
        raise ValueError(text)
    return os.path.normpath(text)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_REGION = re.compile(r"(?![0-9]+$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _parse_endpoint(text: str) -> str:
    """host[:port] or an http(s):// URL, held to what botocore accepts (it raises a bare ValueError)."""
    # glance_store treats a host without a scheme as plain http (its location scheme 's3'); keep that.
    endpoint = text if "://" in text else "http://" + text
    if not endpoint.startswith(("http://", "https://")) or any(c.isspace() for c in endpoint):
        raise ValueError(text)
    parts = urllib.parse.urlsplit(endpoint)  # ValueError: a broken [IPv6] literal
    parts.port  # ValueError: a port that is no number in 0..65535
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        if len(host) > 255 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ValueError(text) from None
    return endpoint.rstrip("/")


def _parse_region(text: str) -> str:
    if not _REGION.fullmatch(text):  # botocore's own rule: it refuses to build a client otherwise
        raise ValueError(text)
    return text


def _readable_text(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
        return True
    except (OSError, UnicodeDecodeError):
        return False


def _parse_backends(sec: _Section) -> list[tuple[str, str]]:
    text = sec.raw("enabled_backends")
    if not text:
        return []
    result: list[tuple[str, str]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, kind = item.partition(":")
        name, kind = name.strip(), kind.strip()
        if not sep or not name or not kind:
            raise sec._bad("enabled_backends", text, f"entry {item!r} is not name:type (e.g. s3store:s3, filestore:file)")
        if any(n == name for n, _ in result):
            raise sec._bad("enabled_backends", text, f"store name {name!r} appears twice")
        result.append((name, kind))
    return result


def _s3_store(merged: _Merged, name: str, section: str) -> S3StoreConfig:
    sec = _Section(merged, section, secrets=frozenset({"s3_store_secret_key", "s3_store_access_key"}))
    why = f"store '{name}' (type s3) needs it"
    host = sec.required("s3_store_host", why)
    try:
        endpoint = _parse_endpoint(host)
    except ValueError:
        raise sec._bad("s3_store_host", host, "expected host[:port] or an http(s):// URL") from None
    url_format = sec.choice("s3_store_bucket_url_format", "auto", ("auto", "virtual", "subdomain", "path"))
    cacert = sec.raw("s3_store_cacert") or None
    if cacert is not None and not os.path.isfile(cacert):
        raise sec._bad("s3_store_cacert", cacert, "no such CA bundle file")
    return S3StoreConfig(
        name=name,
        endpoint_url=endpoint,
        bucket=sec.required("s3_store_bucket", why),
        access_key=sec.required("s3_store_access_key", why),
        secret_key=sec.required("s3_store_secret_key", why),
        addressing_style="virtual" if url_format == "subdomain" else url_format,
        region_name=sec.get("s3_store_region_name", None, _parse_region, "a region name such as us-east-1"),
        cacert=cacert,
        weight=_weight(sec),
    )


def _file_store(merged: _Merged, name: str, section: str) -> FileStoreConfig:
    sec = _Section(merged, section)
    if sec.raw("filesystem_store_datadirs") and not sec.raw("filesystem_store_datadir"):
        raise ConfigError(
            f"{sec._where('filesystem_store_datadirs')}: [{section}] filesystem_store_datadirs is not supported by "
            "imgfs; set filesystem_store_datadir to the directory holding the images"
        )
    sec.required("filesystem_store_datadir", f"store '{name}' (type file) needs it")
    datadir = sec.get("filesystem_store_datadir", "", _parse_abs_path, "an absolute path")
    return FileStoreConfig(name=name, datadir=datadir, weight=_weight(sec))


def _weight(sec: _Section) -> int:
    """Glance's per-store ``weight``: among the copies of an image, the higher weight is read first."""
    return sec.integer("weight", 0, minimum=-(2**31), maximum=2**31 - 1)


_CINDER_CREDENTIALS = ("cinder_store_auth_address", "cinder_store_user_name", "cinder_store_password",
                       "cinder_store_project_name", "cinder_store_application_credential_id")


def _cinder_store(merged: _Merged, name: str, section: str) -> CinderStoreConfig | None:
    if not any(_Section(merged, section).raw(o) for o in _CINDER_CREDENTIALS):
        log.warning(
            "store %r (type cinder) has no cinder_store_* credentials: glance-api can borrow each user's token, "
            "a daemon cannot; skipping it (set cinder_store_auth_address, cinder_store_user_name, "
            "cinder_store_password and cinder_store_project_name to serve it)", name,
        )
        return None
    secret_options = frozenset({"cinder_store_password", "cinder_store_application_credential_secret"})
    sec = _Section(merged, section, secrets=secret_options)
    why = f"store '{name}' (type cinder): imgfs authenticates with the store's own credentials"
    app_id = sec.raw("cinder_store_application_credential_id") or None
    app_secret = sec.raw("cinder_store_application_credential_secret") or None
    auth_url = sec.required("cinder_store_auth_address", why)
    if not auth_url.startswith(("http://", "https://")):
        raise sec._bad("cinder_store_auth_address", auth_url, "expected an http(s):// Keystone URL")
    if app_id and app_secret:
        user = sec.raw("cinder_store_user_name") or ""
        password = sec.raw("cinder_store_password") or ""
        project = sec.raw("cinder_store_project_name") or ""
    else:
        user = sec.required("cinder_store_user_name", why)
        password = sec.required("cinder_store_password", why)
        project = sec.required("cinder_store_project_name", why)
    catalog_info = sec.raw("cinder_catalog_info") or "volumev3::publicURL"
    if catalog_info.count(":") != 2 or not catalog_info.split(":")[0] or not catalog_info.split(":")[2]:
        raise sec._bad("cinder_catalog_info", catalog_info, "expected service_type:service_name:interface (e.g. volumev3::publicURL)")
    cafile = sec.raw("cinder_ca_certificates_file") or None
    if cafile is not None and not os.path.isfile(cafile):
        raise sec._bad("cinder_ca_certificates_file", cafile, "no such CA bundle file")
    keyring = sec.raw("rbd_keyring_file") or None
    if keyring is not None and not os.path.isfile(keyring):
        raise sec._bad("rbd_keyring_file", keyring, "no such keyring file")
    if keyring is not None and not _readable_text(keyring):  # secrets are read from it before anything else
        raise sec._bad("rbd_keyring_file", keyring, "not a readable UTF-8 text file")
    return CinderStoreConfig(
        name=name,
        auth_url=auth_url,
        user_name=user,
        password=password,
        project_name=project,
        user_domain_name=sec.raw("cinder_store_user_domain_name") or "Default",
        project_domain_name=sec.raw("cinder_store_project_domain_name") or "Default",
        application_credential_id=app_id,
        application_credential_secret=app_secret,
        catalog_info=catalog_info,
        endpoint_template=sec.raw("cinder_endpoint_template") or None,
        region_name=sec.raw("cinder_os_region_name") or None,
        volume_type=sec.raw("cinder_volume_type") or None,
        use_multipath=sec.boolean("cinder_use_multipath", False),
        enforce_multipath=sec.boolean("cinder_enforce_multipath", False),
        http_retries=sec.integer("cinder_http_retries", 3, minimum=0, maximum=100),
        api_insecure=sec.boolean("cinder_api_insecure", False),
        ca_certificates_file=cafile,
        rbd_keyring_file=keyring,
        weight=_weight(sec),
    )


_STORE_BUILDERS: dict[str, Callable[[_Merged, str, str], StoreConfig | None]] = {
    "s3": _s3_store,
    "file": _file_store,
    "cinder": _cinder_store,
}


def load(paths: list[str]) -> Config:
    """Read and validate ``paths`` (later wins); raises ``ConfigError`` with one line on any problem."""
    if not paths:
        raise ConfigError("no configuration given; pass --config-file /etc/imgfs/imgfs.conf (and glance-api.conf)")
    merged = _Merged(paths)
    options = _imgfs_options(merged)
    default_sec = _Section(merged, "DEFAULT")
    backends = _parse_backends(default_sec)
    glance_store = _Section(merged, "glance_store")

    stores: list[StoreConfig] = []
    if backends:
        for name, kind in backends:
            builder = _STORE_BUILDERS.get(kind)
            if builder is None:
                log.warning("store %r has type %r, which this imgfs does not serve; skipping it", name, kind)
                continue
            if not merged.has_section(name):
                raise ConfigError(
                    f"{merged.values[('DEFAULT', 'enabled_backends')].path}: [DEFAULT] enabled_backends names store "
                    f"'{name}' but no [{name}] section exists in any config file; add the store's section"
                )
            store = builder(merged, name, name)
            if store is not None:
                stores.append(store)
        default = glance_store.raw("default_backend")
        if default:
            names = [n for n, _ in backends]
            if default not in names:
                raise glance_store._bad("default_backend", default, "not one of enabled_backends: " + ", ".join(names))
            stores.sort(key=lambda s: s.name != default)  # stable: the default store first, then declared order
        # Glance reads the copy in the store of highest weight first; ties keep the order above.
        stores.sort(key=lambda s: -s.weight)
    else:
        # Legacy single-store glance-api.conf: the store's options live in [glance_store].
        kind = glance_store.raw("default_store")
        if kind:
            builder = _STORE_BUILDERS.get(kind)
            if builder is None:
                log.warning("[glance_store] default_store = %r is not a type imgfs serves; no store from it", kind)
            else:
                store = builder(merged, kind, "glance_store")
                if store is not None:
                    stores.append(store)

    if not stores:
        raise ConfigError(
            f"{paths[-1]}: no S3, file or cinder store configured; set [DEFAULT] enabled_backends = name:s3 (or name:file, name:cinder) "
            "and add the store's section (glance-api.conf's own stanzas work as they are)"
        )
    glance = _glance_catalog(merged, "[imgfs] catalog = glance lists images from Glance with these credentials") \
        if options.catalog == "glance" else None
    image_api = None
    if options.image_api_listen:
        auth = None
        if not options.image_api_upstream:
            auth = glance or _glance_catalog(merged, "[imgfs] image_api_listen is set without image_api_upstream, so "
                                                     "the real Glance is looked up in the Keystone catalog with these "
                                                     "credentials (or set [imgfs] image_api_upstream)")
        host, port = split_listen(options.image_api_listen)
        image_api = ImageApiConfig(host=host, port=port, upstream=options.image_api_upstream or None, auth=auth,
                                   auth_ttl=options.image_api_auth_ttl, timeout=options.image_api_upstream_timeout,
                                   cafile=options.image_api_cafile or (auth.cafile if auth else None),
                                   max_connections=options.image_api_max_connections,
                                   header_timeout=options.image_api_header_timeout,
                                   idle_timeout=options.image_api_idle_timeout,
                                   client_timeout=options.image_api_client_timeout)
    config = Config(stores=tuple(stores), options=options, files=tuple(paths), glance=glance, image_api=image_api,
                    fleet=_fleet(merged), warnings=_inline_comments(merged))
    _require_extras(config)
    return config


def _parse_members(text: str) -> tuple[str, ...]:
    members = tuple(_parse_listen(m.strip()) for m in re.split(r"[,\s]+", text) if m.strip())
    if not members:
        raise ValueError(text)
    return members


def read_members_file(path: str) -> tuple[str, ...]:
    """One mesh address (host:port) per line; '#' starts a comment. Raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"[fleet] members_file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return _parse_members(" ".join(line for line in lines if line))
    except ValueError:
        raise ConfigError(f"[fleet] members_file {path}: expected one address:port per line (e.g. 198.18.0.1:8443)") from None


_FLEET_OPTIONS = frozenset(FleetConfig.__dataclass_fields__) | {"enabled"}


def _fleet(merged: _Merged) -> FleetConfig | None:
    if not merged.has_section("fleet"):
        return None
    sec = _Section(merged, "fleet")
    for option in merged.options_of("fleet"):
        if option not in _FLEET_OPTIONS:
            # checked even while fleet mode is off: a misspelt "enabled" must not leave it off unseen
            raise ConfigError(f"{merged.values[('fleet', option)].path}: [fleet] {option}: unknown option; "
                              f"known options: {', '.join(sorted(_FLEET_OPTIONS))}")
    if not sec.boolean("enabled", False):
        return None
    listen = sec.get("mesh_listen", "", _parse_listen, "address:port this node's nginx accepts peers on")
    if not listen:
        raise ConfigError(f"{sec._where('mesh_listen')}: [fleet] enabled needs mesh_listen (this node's address:port for its peers)")
    members_file = sec.get("members_file", "", _parse_abs_path, "an absolute path") or None
    if members_file:
        members = read_members_file(members_file)
    else:
        members = sec.get("members", (), _parse_members, "a comma-separated list of address:port")
    if not members:
        raise ConfigError(f"{sec._where('members')}: [fleet] enabled needs members (or members_file): every node's mesh_listen")
    paths = {}
    for option in ("certfile", "keyfile", "cafile"):
        path = sec.get(option, "", _parse_abs_path, "an absolute path")
        if not path:
            raise ConfigError(f"{sec._where(option)}: [fleet] enabled needs {option} (the mesh speaks mutual TLS)")
        if not _readable_text(path):
            raise sec._bad(option, path, "not a readable file")
        paths[option] = path
    local_port = sec.integer("local_port", 8085, minimum=1, maximum=65535)
    gateway_port = sec.integer("gateway_port", 8089, minimum=1, maximum=65535)
    if local_port == gateway_port:
        raise sec._bad("gateway_port", str(gateway_port), "the same as local_port")
    return FleetConfig(
        members=members, mesh_listen=listen, local_port=local_port, gateway_port=gateway_port,
        secret_file=sec.get("secret_file", "/etc/imgfs/mesh/gateway.secret", _parse_abs_path, "an absolute path"),
        peer_name=sec.get("peer_name", "imgfs-mesh", _parse_host, "a host name (letters, digits, '-', '.')"),
        min_image_mb=sec.integer("min_image_mb", 64, minimum=0),
        timeout=sec.number("timeout", 30.0, minimum=0.5, maximum=3600),
        connect_timeout=sec.number("connect_timeout", 5.0, minimum=0.1, maximum=3600),
        members_file=members_file,
        nginx_dir=sec.get("nginx_dir", "/etc/imgfs/mesh", _parse_abs_path, "an absolute path"),
        cache_path=sec.get("cache_path", "/var/cache/imgfs-mesh", _parse_abs_path, "an absolute path"),
        cache_max_size_gb=sec.number("cache_max_size_gb", 50.0, minimum=0.1),
        run_dir=sec.get("run_dir", "/run/imgfs-mesh", _parse_abs_path, "an absolute path"),
        access_log=sec.get("access_log", "", _parse_abs_path, "an absolute path") or None,
        chunk_sums=sec.choice("chunk_sums", "publish", ("publish", "use", "off")),
        **paths,
    )


# What each feature imports, and the extra of imgfs's package that brings it.
_CINDER_MODULES = ("os_brick", "cinderclient", "keystoneauth1", "oslo_concurrency", "oslo_privsep")


def _require_extras(config: Config) -> None:
    """A configured feature whose libraries are not installed is a one-line error now, naming the
    extra to install, rather than a traceback at the first listing."""
    import importlib.util

    needs: list[tuple[str, tuple[str, ...]]] = []
    for store in config.stores:
        if isinstance(store, CinderStoreConfig):
            needs.append((f"store '{store.name}' (type cinder)", _CINDER_MODULES))
    if config.glance is not None and config.options.catalog == "glance":
        needs.append(("[imgfs] catalog = glance", ("keystoneauth1",)))
    if config.image_api is not None and config.image_api.upstream is None:
        needs.append(("the Image API endpoint without image_api_upstream (Glance found in the Keystone catalog)",
                      ("keystoneauth1",)))
    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # a broken install counts as none
            return True

    for what, modules in needs:
        missing = [m for m in modules if absent(m)]
        if missing:
            raise ConfigError(f"{what} needs imgfs's 'cinder' extra, which is not installed (no module "
                              f"{', '.join(missing)}): pip install 'imgfs[cinder]' into imgfs's venv")


def refuse_own_mount(config: Config, mountpoint: str) -> Config:
    """Drop every file store whose directory lies inside ``mountpoint``.

    The mount-path route for Cinder (docs/openstack.md, "Route 2") gives images a
    Glance file store whose directory is this very mount; glance-api.conf handed to imgfs then names
    it. Reading it would make imgfs its own source: a read would wait on itself. It is never read."""
    # the mount point itself is not resolved: on a hand-over it is the mount, with nobody answering yet
    mount = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(mountpoint))), os.path.basename(mountpoint.rstrip("/")))
    kept: list[StoreConfig] = []
    for store in config.stores:
        if isinstance(store, FileStoreConfig) and (store.datadir == mount or store.datadir.startswith(mount + os.sep)):
            log.warning("store %r (type file) keeps its images in %s, inside this imgfs mount (%s): that is the "
                        "mount-path route for Cinder, not a source; not reading it", store.name, store.datadir, mount)
            continue
        kept.append(store)
    if not kept:
        raise ConfigError(f"every configured store lies inside the mount {mount}; imgfs needs a store outside it to read from")
    return dataclasses.replace(config, stores=tuple(kept))


def _glance_catalog(merged: _Merged, why: str) -> GlanceCatalogConfig:
    sec = _Section(merged, "glance_catalog", secrets=frozenset({"password"}))
    auth_url = sec.required("auth_url", why)
    if not auth_url.startswith(("http://", "https://")):
        raise sec._bad("auth_url", auth_url, "expected an http(s):// Keystone URL")
    cafile = sec.raw("cafile") or None
    if cafile is not None and not os.path.isfile(cafile):
        raise sec._bad("cafile", cafile, "no such CA bundle file")
    return GlanceCatalogConfig(
        auth_url=auth_url,
        username=sec.required("username", why),
        password=sec.required("password", why),
        project_name=sec.required("project_name", why),
        user_domain_name=sec.raw("user_domain_name") or "Default",
        project_domain_name=sec.raw("project_domain_name") or "Default",
        region_name=sec.raw("region_name") or None,
        interface=sec.choice("interface", "public", ("public", "internal", "admin")),
        cafile=cafile,
        insecure=sec.boolean("insecure", False),
    )
