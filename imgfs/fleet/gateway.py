"""The origin gateway: what this node's nginx fetches a chunk through when this node owns it and its
cache misses. It listens on loopback only and answers only requests that carry this node's secret (set
by its own nginx), so no peer and no local user reaches the stores through it.

``GET /fleet/v1/<store>/<image>/<version>`` with one ``Range: bytes=a-b`` is served from the origin
(never from imgfs's chunk cache: the mesh's bytes come from the source, checked there as ever), and only
for a version the catalog holds now: a changed image is 412, an unknown or deleted one 404, so nginx
never caches bytes of a version the catalog has left. An image this node has not listed yet (a fresh
upload, the boot storm's very case), or listed at another version, is first asked of the store: an
owner must not send every node to the origin until its next refresh. Answers are 206 with the exact
``Content-Range`` and the version in ``X-Imgfs-Version``, which nginx keeps with the cached chunk.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import socket
import urllib.parse
from typing import Any, Awaitable, Callable, Protocol

import trio

from ..errors import BackendError, ImgfsError, StaleImage
from ..httpserver import HttpServer, Limits
from ..model import Location
from ..ratelimit import RateLimit
from .mesh import PATH_PREFIX, VERSION_HEADER, FleetStats

log = logging.getLogger(__name__)

SECRET_HEADER = b"x-imgfs-gateway-secret"
MAX_RANGE = 64 << 20  # nginx asks one slice (a chunk) at a time; a bigger ask is no nginx of ours
_PATH = re.compile(r"^" + re.escape(PATH_PREFIX) + r"/([^/]+)/([^/]+)/([^/]+)$")
_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{1,19})$")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Origin(Protocol):
    """What the gateway needs of the daemon: the catalog's current copy, and the store's bytes."""

    async def locate(self, store: str, image_id: str, version: str) -> Location | None:
        """The copy the catalog holds now, asking the store first when the catalog does not know the
        image or holds another version than ``version`` (a peer may have listed it sooner)."""

    async def read(self, loc: Location, offset: int, length: int) -> bytes: ...


def load_secret(path: str) -> bytes:
    """The per-node secret this node's nginx sends (``imgfs fleet render`` writes it, mode 0600)."""
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"{path} holds no secret (run 'imgfs fleet render')")
    return secret


def new_secret() -> str:
    return secrets.token_hex(32)


class Gateway:
    def __init__(self, origin: Origin, secret: bytes, stats: FleetStats) -> None:
        self.origin = origin
        self._secret = secret
        self.stats = stats
        self._logged = RateLimit(60.0)

    async def __call__(self, scope: Scope, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, headers, body = await self._answer(scope)
        if status != 206:
            self.stats.count("refusals", status)
        else:
            self.stats.add(served_bytes=len(body), served_requests=1)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        given = next((v for k, v in scope["headers"] if k == SECRET_HEADER), b"")
        if not hmac.compare_digest(given, self._secret):
            return 403, [], b"imgfs gateway: not this node's nginx\n"
        if scope["method"] != "GET":
            return 405, [(b"allow", b"GET")], b""
        m = _PATH.match(scope["raw_path"].decode("latin-1"))
        if m is None:
            return 404, [], b"imgfs gateway: no such path\n"
        store, image_id, version = (urllib.parse.unquote(p) for p in m.groups())
        loc = await self.origin.locate(store, image_id, version)
        if loc is None:
            return 404, [], b"imgfs gateway: no such image in the catalog\n"
        if loc.version != version:
            return 412, [], b"imgfs gateway: the catalog holds another version\n"
        ranges = [v for k, v in scope["headers"] if k == b"range"]
        r = _RANGE.match(ranges[0].decode("latin-1")) if len(ranges) == 1 else None
        if r is None:
            return 400, [], b"imgfs gateway: one Range: bytes=a-b is required\n"
        first, last = int(r.group(1)), int(r.group(2))
        if first >= loc.size or last < first:
            return 416, [(b"content-range", f"bytes */{loc.size}".encode())], b""
        last = min(last, loc.size - 1)  # a slice past the end gets what there is, as any server does
        if last - first + 1 > MAX_RANGE:
            return 400, [], b"imgfs gateway: range too large\n"
        try:
            data = await self.origin.read(loc, first, last - first + 1)
        except StaleImage:
            return 412, [], b"imgfs gateway: the stored image changed\n"
        except (BackendError, ImgfsError) as e:
            if self._logged.allow(type(e).__name__):
                log.warning("fleet gateway: %s (answering 502)", e)
            return 502, [], b"imgfs gateway: the origin failed\n"
        return 206, [(b"content-range", f"bytes {first}-{last}/{loc.size}".encode()),
                     (b"content-type", b"application/octet-stream"),
                     (VERSION_HEADER.lower().encode(), loc.version.encode())], data


async def serve(gateway: Gateway, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on 127.0.0.1:``port`` until cancelled. Raises OSError when the port cannot be bound."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    await HttpServer(gateway, Limits(max_connections=256, idle_timeout=75.0)).serve(sock, task_status=task_status)
