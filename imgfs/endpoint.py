"""The HTTP adapter: a node-local Image API v2 endpoint in front of the real Glance.

``GET``/``HEAD /v2/images/{id}/file`` of an image imgfs holds is answered from the same chunk fetcher
and cache as the mount (one single flight, prefetch, failover and verification for both adapters);
every other request is passed to the real Glance unchanged, streaming both ways. Cinder
(``glance_api_servers``) and Nova (``[glance] endpoint_override``) point at it without a line of
their code changed.

Like fs.py this module translates and owns nothing: requests become calls on the catalog, the fetcher
and the upstream; errors become HTTP statuses once, here. It knows nothing of S3 or Cinder.

- Authorization is Glance's (imgfs.upstream.Upstream.authorize): a caller Glance refuses gets Glance's
  own answer and no byte. Only an ``active`` image whose size (and, with the Glance catalog, digest)
  matches what imgfs holds is served locally; anything else is passed through.
- A full download is hashed as it goes and checked against the ``os_hash_value`` Glance gave the
  caller; the last piece is withheld until it matches. A store failure mid-body ends the response
  short of its Content-Length, and the connection closes: the client sees a short body, never a
  wrong byte or a truncation that looks complete.
- Served by imgfs.httpserver (HTTP/1.1 over h11, with its limits on heads, bodies, slow clients and
  connections) inside the daemon's nursery. A download is sent a piece (PIECE) at a time, each taken by
  the socket before the next is read: a slow client holds one piece, however many download at once.
- Nothing escapes a request: Glance unreachable, slow or broken is 503/504/502, a request that cannot
  be passed on as sent is 400, a bug is 500 with one log line; never a traceback per request.
"""

from __future__ import annotations

import email.utils
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from .catalog import Catalog
from .config import ImageApiConfig
from .errors import ImgfsError
from .httpserver import ClientGone, HttpServer, Limits, ServerStats, short_path
from .model import Image, Location
from .ratelimit import RateLimit
from .reader import ChunkFetcher, ImageReader
from .upstream import (Headers, ImageFacts, Unforwardable, Upstream, UpstreamBroke, UpstreamTimeout, UpstreamUnavailable,
                       body_of, forwarded_headers, response_headers)

log = logging.getLogger(__name__)

_FILE_PATH = re.compile(r"^/v2/images/([^/]+)/file$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# A download goes out in pieces of at most this size, each taken by the socket before the next is read:
# the memory a download holds. 1 MiB is also the FUSE path's largest read, so both share the cache's
# reused read buffers. Measured, 20 concurrent cold downloads of a 96 MiB image: peak RSS 198 MiB against
# 166 for one (1.19x), 439 MiB/s in all; with 8 MiB pieces, each joined into a new copy by the server
# that served the endpoint before, 495 against 190 MiB (2.61x), 347 MiB/s.
PIECE = 1024 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class EndpointStats:
    local_downloads: int = 0  # /file requests answered from imgfs
    local_bytes: int = 0
    passthrough_downloads: int = 0  # /file requests left to Glance (not held here, not active, no match...)
    passthrough_requests: int = 0  # every other request
    passthrough_bytes_down: int = 0  # bytes Glance sent back through the endpoint
    passthrough_bytes_up: int = 0  # request bodies passed to Glance (uploads)
    aborted: int = 0  # local downloads ended early (store failure, digest mismatch, client gone, stop)
    refusals: dict[int, int] = field(default_factory=dict)  # Glance's status -> count, for /file requests
    upstream_errors: dict[int, int] = field(default_factory=dict)  # 503/504 imgfs answered itself
    auth_cached: int = 0  # authorizations answered from the short-lived cache
    active: int = 0  # downloads and pass-throughs in flight

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


class _Unsatisfiable(Exception):
    pass


class _ClientGone(Exception):
    """The caller hung up in the middle of sending its request body."""


class _MultipleRanges(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a ``Range`` header asks for, None for the whole image, with Glance's rules
    (glance.common.wsgi.Request.get_range_from_request over webob): one range only (several: 400),
    ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n``; anything unparseable, a start past the end, or
    ``b < a``: 416. A suffix longer than the image is the whole image (206)."""
    if header is None:
        return None
    if "," in header:
        raise _MultipleRanges
    m = _RANGE.match(header.strip())
    if not m or m.groups() == ("", ""):
        raise _Unsatisfiable
    first, last = m.groups()
    if first == "":
        n = int(last)
        if n == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - n), size
    start = int(first)
    if (last != "" and int(last) < start) or start >= size:
        raise _Unsatisfiable
    return start, size if last == "" else min(size, int(last) + 1)


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once the client is gone: a download must not go on reading a whole image for
    nobody until its next send fails."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _date() -> tuple[bytes, bytes]:
    return b"date", email.utils.formatdate(usegmt=True).encode()


async def _answer(send: Send, status: int, text: str, headers: Headers = ()) -> None:  # type: ignore[assignment]
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=UTF-8"), (b"content-length", str(len(body)).encode()),
                            _date(), *headers]})
    await send({"type": "http.response.body", "body": body})


class ImageApi:
    """The ASGI application."""

    def __init__(self, catalog: Catalog, fetcher: ChunkFetcher, upstream: Upstream, *, prefetch_max: int) -> None:
        self.catalog = catalog
        self.fetcher = fetcher
        self.upstream = upstream
        self.prefetch_max = prefetch_max
        self.stats = EndpointStats()
        self.http = ServerStats()  # the connections' side: limits hit, timeouts, refusals
        self.server: HttpServer | None = None  # once serving
        self._failures_logged = RateLimit(60.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # the server speaks HTTP/1.1 only
        self.stats.active += 1
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            m = _FILE_PATH.match(scope["path"])
            # A legacy Content-Range request header (Glance still honours it) is left to Glance.
            download = m is not None and scope["method"] in ("GET", "HEAD")
            legacy = _header(scope, b"content-range") is not None
            if download and not legacy and await self._download(scope, receive, tracked, m.group(1)):  # type: ignore[union-attr]
                return
            await self._pass(scope, receive, tracked, download=download)
        except (_ClientGone, ClientGone):
            log.info("image API endpoint: the client of %s %s hung up mid-request", scope["method"], short_path(scope["path"]))
        except (UpstreamUnavailable, Unforwardable) as e:
            status = 400 if isinstance(e, Unforwardable) else 504 if isinstance(e, UpstreamTimeout) else \
                502 if isinstance(e, UpstreamBroke) else 503
            counts = self.http.refused if status == 400 else self.stats.upstream_errors  # the caller's fault, or Glance's
            counts[status] = counts.get(status, 0) + 1
            if self._failures_logged.allow(("upstream", status)):
                log.warning("image API endpoint: %s (answering %d)", e, status)
            if not started:  # else the answer is cut short and the connection closes
                await _answer(send, status, f"imgfs: {e}")
        finally:
            self.stats.active -= 1

    # ---- local downloads --------------------------------------------------------------------------

    def _servable(self, image: Image, facts: ImageFacts) -> list[Location]:
        """The copies imgfs may serve this caller, best first; empty: let Glance answer."""
        if facts.status != "active" or facts.size is None:
            return []
        for key in ("checksum", "os_hash_value"):  # the Glance catalog's view must be Glance's view
            mine, theirs = image.get(key), getattr(facts, key)
            if mine and theirs and mine.lower() != theirs.lower():
                return []
        return [loc for loc in self.fetcher.order(image.locations) if loc.size == facts.size]

    async def _download(self, scope: Scope, receive: Receive, send: Send, image_id: str) -> bool:
        """Answer a download from imgfs; False when Glance should answer it instead."""
        client = scope.get("client")
        headers = forwarded_headers(scope["headers"], client[0] if client else None)
        verdict = await self.upstream.authorize(headers, image_id)
        self.stats.auth_cached += verdict.cached
        request_id = [(b"x-openstack-request-id", verdict.request_id)] if verdict.request_id else []
        if verdict.refusal is not None:
            r = verdict.refusal
            self.stats.refusals[r.status] = self.stats.refusals.get(r.status, 0) + 1
            if self._failures_logged.allow(("refusal", r.status)):  # a flood of bad tokens is one line a minute
                log.info("image API endpoint: Glance answered %d to a download of image %s; passing its answer on",
                         r.status, image_id)
            await send({"type": "http.response.start", "status": r.status, "headers": r.headers})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else r.body})
            return True
        if verdict.facts is None:
            return False
        # Only for a caller Glance accepted: a lookup of an id no listing has shown asks the stores
        # directly, and anonymous requests must not make imgfs probe its stores.
        image = self.catalog.image(image_id) or await self.catalog.lookup(image_id)
        if image is None:
            return False
        locations = self._servable(image, verdict.facts)
        if not locations:
            if self._failures_logged.allow(("not held", image_id)):
                log.info("image API endpoint: image %s is %s with %s bytes in Glance, which imgfs does not hold; "
                         "passing the download to Glance", image_id, verdict.facts.status, verdict.facts.size)
            return False
        facts, size = verdict.facts, locations[0].size
        try:
            wanted = parse_range(_header(scope, b"range"), size)
        except _MultipleRanges:
            await _answer(send, 400, "400 Bad Request: requests with multiple ranges are not supported; make several "
                                     "single-range requests instead", request_id)
            return True
        except _Unsatisfiable:
            await _answer(send, 416, f"416 Requested Range Not Satisfiable: image {image_id} has {size} bytes",
                          [(b"content-range", f"bytes */{size}".encode()), *request_id])
            return True
        start, end = wanted or (0, size)
        out: Headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(end - start).encode()),
                        _date(), *request_id]
        if wanted is not None:
            out.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
        if facts.checksum:  # the whole image's md5, on partial answers too: Glance does the same
            out.append((b"content-md5", facts.checksum.encode()))
        status = 200 if wanted is None else 206
        if scope["method"] == "HEAD":
            await send({"type": "http.response.start", "status": status, "headers": out})
            await send({"type": "http.response.body", "body": b""})
            return True
        # A full download is checked against the digest Glance gave this caller (random ranges are not).
        verify = None if wanted is not None else \
            self.fetcher.verifier(locations, facts.os_hash_algo, facts.os_hash_value, size)
        reader = ImageReader(self.fetcher, locations, prefetch_max=self.prefetch_max, verify=verify,
                             on_integrity_error=self.fetcher.drop_copies)
        self.stats.local_downloads += 1
        began, sent, done = time.monotonic(), 0, False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                try:
                    await send({"type": "http.response.start", "status": status, "headers": out})
                    cs = self.fetcher.chunk_size
                    offset = start
                    while offset < end:
                        # A piece never spans chunks: a view of one chunk's bytes, no join.
                        data = await reader.read(offset, min(end, (offset // cs + 1) * cs, offset + PIECE) - offset)
                        if not len(data):  # the reader promises bytes or an error; never end a body early by accident
                            raise ImgfsError(f"image {image_id}: no bytes at {offset}")
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                        offset += len(data)
                        sent += len(data)
                        self.stats.local_bytes += len(data)
                    done = True  # every byte is out
                    await send({"type": "http.response.body", "body": b""})
                except ClientGone:  # it hung up or stopped reading: nobody to tell
                    pass
                except ImgfsError as e:
                    # Headers are out: ending short of Content-Length (the server then closes the connection)
                    # is the only honest way left to say the body is not the image.
                    if self._failures_logged.allow((image_id, type(e))):
                        log.warning("image API endpoint: download of image %s ended after %d of %d bytes: %s",
                                    image_id, sent, end - start, e)
                nursery.cancel_scope.cancel()
        finally:
            reader.close()
            if done:  # one line per whole image; ranges (a random reader makes many) at DEBUG
                log.log(logging.INFO if wanted is None else logging.DEBUG, "image API endpoint: served image %s from "
                        "imgfs (%d bytes%s, %.1f s)", image_id, sent, "" if wanted is None else f" at {start}",
                        time.monotonic() - began)
            else:
                self.stats.aborted += 1  # a store failure, a digest mismatch, the client gone, or a stop
        return True

    # ---- everything else ------------------------------------------------------------------------

    async def _body(self, receive: Receive) -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                self.stats.passthrough_bytes_up += len(chunk)
                yield chunk
            if not message.get("more_body", False):
                return

    async def _pass(self, scope: Scope, receive: Receive, send: Send, *, download: bool) -> None:
        """Hand the request to the real Glance and its answer back, both streaming."""
        if download:
            self.stats.passthrough_downloads += 1
        else:
            self.stats.passthrough_requests += 1
        client = scope.get("client")
        headers = forwarded_headers(scope["headers"], client[0] if client else None)
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        target = scope["raw_path"].decode("latin-1") + (("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else "")
        response = await self.upstream.send(scope["method"], target, headers, self._body(receive) if has_body else None)
        log.debug("image API endpoint: %s %s -> Glance %d", scope["method"], scope["path"], response.status_code)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                try:
                    await send({"type": "http.response.start", "status": response.status_code,
                                "headers": response_headers(response)})
                    async for piece in body_of(response):
                        self.stats.passthrough_bytes_down += len(piece)
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
                except ClientGone:
                    pass
                except UpstreamBroke as e:
                    # Glance broke off mid-answer: end ours short too (the connection closes), as Glance's did.
                    if self._failures_logged.allow(("passthrough", str(e))):
                        log.warning("image API endpoint: %s %s: %s", scope["method"], scope["path"], e)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()


def limits_of(cfg: ImageApiConfig) -> Limits:
    return Limits(max_connections=cfg.max_connections, head_timeout=cfg.header_timeout, idle_timeout=cfg.idle_timeout,
                  client_timeout=cfg.client_timeout)


LISTEN_BACKLOG = 256  # connections the kernel queues while nobody accepts (during a hand-over too)


def listen_socket(cfg: ImageApiConfig) -> socket.socket:
    """The endpoint's socket, bound to cfg.host:cfg.port and listening (before it can go to systemd's
    fd store: systemd drops a stored socket that polls POLLHUP, as one bound but not listening does);
    OSError when the address cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(api: ImageApi, cfg: ImageApiConfig, sock: socket.socket | None = None, *,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``api`` on ``sock`` (bound to cfg.host:cfg.port if None: listen_socket) until the surrounding
    nursery is cancelled (the daemon's stop: downloads in flight end there, short of their
    Content-Length, and the socket closes). ``api.server.stop_accepting()`` leaves new connections to
    another holder of the socket (a hand-over to the next imgfs)."""
    api.server = HttpServer(api, limits_of(cfg), api.http)
    await api.server.serve(sock if sock is not None else listen_socket(cfg), task_status=task_status)
