"""The real Glance behind the node-local Image API endpoint: where it is, passing requests to it, and
asking it whether a caller may read an image.

Authorization is Glance's, never imgfs's: before the endpoint serves a byte of an image it asks Glance
for that image with the caller's own headers (``X-Auth-Token``, the service token, ...), and takes the
answer as it comes. A positive answer may be reused for ``auth_ttl`` seconds, keyed by a digest of the
caller's headers (never the token itself): Cinder asks for the image, then for its data, and twenty
creates from one image ask twenty times in a second. keystonemiddleware in front of every OpenStack API
already trusts a validated token for minutes (``token_cache_time``, 300 s), so a TTL well below that
adds no exposure a deployment does not already accept; 0 turns reuse off.

No header value, token or body is ever logged here: only methods, paths and statuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

import httpx
import trio

from .config import ImageApiConfig
from .errors import ImgfsError
from .glance import image_endpoint

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded (nor the headers a Connection
# header names); plus Expect (httpx does not do 100-continue; imgfs.httpserver already answered it) and
# the framing (Content-Length, Transfer-Encoding): imgfs's client frames what it actually sends. Host is forwarded as the caller sent it: Glance builds
# the links of its version document from it, and Nova's version discovery (keystoneauth, with
# [glance] endpoint_override) follows those links, so they must lead back to this endpoint.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect"})
# Caller headers that do not change who the caller is: left out of the authorization cache key, so one
# caller's requests share an answer (a request id differs on every request).
_NOT_IDENTITY = frozenset({b"user-agent", b"accept", b"accept-encoding", b"x-openstack-request-id",
                           b"x-global-request-id", b"range", b"if-range", b"content-length", b"content-type",
                           b"host", b"x-forwarded-for"})
_AUTH_CACHE_MAX = 4096

Headers = list[tuple[bytes, bytes]]


class UpstreamUnavailable(Exception):
    """The real Glance cannot be reached (or found in the catalog): the caller gets 503 with this text."""


class UpstreamTimeout(UpstreamUnavailable):
    """The real Glance took longer than image_api_upstream_timeout to answer: 504."""


class UpstreamBroke(UpstreamUnavailable):
    """The real Glance took the request and closed the connection without an answer: 502."""


class Unforwardable(Exception):
    """The caller's request cannot be passed to Glance as it was sent (e.g. a header value httpx
    refuses): 400 with this text, which never quotes a header."""


@dataclass(frozen=True)
class ImageFacts:
    """What Glance told one caller about one image: enough to decide whether imgfs may serve it."""

    status: str
    size: int | None
    checksum: str | None
    os_hash_algo: str | None
    os_hash_value: str | None


@dataclass(frozen=True)
class Refusal:
    """Glance's own answer to a caller it will not show the image to (401, 403, 404, ...): given back as is."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class Verdict:
    facts: ImageFacts | None = None  # the caller may read the image: what Glance says it is
    refusal: Refusal | None = None  # the caller may not: Glance's answer
    request_id: bytes | None = None  # Glance's x-openstack-request-id of the answer
    cached: bool = False


def _end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """``headers`` less the hop-by-hop ones: the fixed set and every name a Connection header lists."""
    headers = [(k.lower(), v) for k, v in headers]
    named = {t.strip().lower().encode("latin-1") for k, v in headers if k == b"connection"
             for t in v.decode("latin-1").split(",") if t.strip()}
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


def forwarded_headers(headers: Iterable[tuple[bytes, bytes]], client: str | None) -> Headers:
    """The caller's end-to-end headers, plus X-Forwarded-For so Glance's log can name the caller.
    Content-Length stays (the server checked it is the only framing, and the body it hands on is
    exactly that long or the request fails); a chunked body is framed anew by httpx."""
    out = _end_to_end(headers)
    if client:
        out.append((b"x-forwarded-for", client.encode()))
    return out


def _identity(headers: Headers) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(h for h in headers if h[0] not in _NOT_IDENTITY):
        digest.update(name + b"\0" + value + b"\0")
    return digest.hexdigest()


class Upstream:
    def __init__(self, cfg: ImageApiConfig) -> None:
        self.cfg = cfg
        verify: bool | str = cfg.cafile or True
        if cfg.auth is not None and cfg.auth.insecure:
            verify = False
        timeout = httpx.Timeout(cfg.timeout, connect=min(10.0, cfg.timeout))
        # Streams both ways; the pool keeps connections to Glance for the next request.
        self.client = httpx.AsyncClient(verify=verify, timeout=timeout, follow_redirects=False,
                                        limits=httpx.Limits(max_connections=128, max_keepalive_connections=16))
        self._base: str | None = cfg.upstream
        self._auth_cache: dict[tuple[str, str], tuple[float, ImageFacts]] = {}
        self._lookup_lock = trio.Lock()

    @property
    def where(self) -> str:
        return self._base or "the image service of the Keystone catalog"

    async def base(self) -> str:
        """The real Glance's URL: configured, or looked up once in the Keystone catalog."""
        if self._base is None:
            async with self._lookup_lock:
                if self._base is None:
                    self._base = await trio.to_thread.run_sync(self._from_catalog, abandon_on_cancel=True)
                    log.info("image API endpoint: the real Glance is %s (from the Keystone catalog)", self._base)
        return self._base

    def _from_catalog(self) -> str:
        assert self.cfg.auth is not None
        try:
            url = image_endpoint(self.cfg.auth, timeout=30)
        except ImgfsError as e:
            raise UpstreamUnavailable(f"{e}; or set [imgfs] image_api_upstream") from None
        parts = urllib.parse.urlsplit(url)
        if parts.hostname in (self.cfg.host, "localhost") and (parts.port or 80) == self.cfg.port:
            raise UpstreamUnavailable(f"the Keystone catalog names this very endpoint ({url}) as Glance; "
                                      "set [imgfs] image_api_upstream to the real Glance")
        return url

    async def send(self, method: str, target: str, headers: Headers, body: AsyncIterator[bytes] | None) -> httpx.Response:
        """Send one request to Glance; the answer's body is left to stream (close it)."""
        url = (await self.base()) + target
        try:
            request = self.client.build_request(method, url, headers=headers, content=body)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError, TypeError) as e:
            raise Unforwardable(f"{method} {_path(target)[:200]} cannot be passed to Glance as sent "
                                f"({type(e).__name__})") from None
        given = {k for k, _ in headers}
        for name in ("accept-encoding", "user-agent", "accept"):  # httpx's defaults: pass only what the caller sent
            if name.encode() not in given:
                request.headers.pop(name, None)
        try:
            return await self.client.send(request, stream=True)
        except (httpx.LocalProtocolError, httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
            raise Unforwardable(f"{method} {_path(target)[:200]} cannot be passed to Glance as sent "
                                f"({type(e).__name__})") from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, OSError) as e:
            raise UpstreamUnavailable(f"cannot reach Glance at {self._base} ({type(e).__name__}); is glance-api up?") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"Glance at {self._base} did not answer {method} {_path(target)} within "
                                  f"{self.cfg.timeout:g}s (image_api_upstream_timeout)") from None
        except httpx.TransportError as e:
            raise UpstreamBroke(f"Glance at {self._base} closed the connection without answering {method} "
                                f"{_path(target)} ({type(e).__name__}); see glance-api's log") from None

    async def authorize(self, headers: Headers, image_id: str) -> Verdict:
        """Ask Glance, as the caller, for ``image_id``."""
        key = (_identity(headers), image_id)
        now = trio.current_time()
        hit = self._auth_cache.get(key)
        if hit is not None and hit[0] > now:
            return Verdict(facts=hit[1], cached=True)
        # The caller's own headers, less what belongs to its download; Accept stays, so a refusal comes
        # back in the form the caller asked for (Glance answers the image itself in JSON either way).
        asked = [(k, v) for k, v in headers if k not in (b"range", b"if-range", b"content-length", b"content-type",
                                                          b"accept-encoding")]
        response = await self.send("GET", f"/v2/images/{urllib.parse.quote(image_id, safe='')}", asked, None)
        try:
            body = await response.aread()
        except httpx.HTTPError as e:
            raise UpstreamUnavailable(f"Glance at {self._base} broke off its answer ({type(e).__name__})") from None
        finally:
            await response.aclose()
        request_id = response.headers.get("x-openstack-request-id", "").encode() or None
        if 400 <= response.status_code < 500:
            return Verdict(refusal=Refusal(response.status_code, response_headers(response), body), request_id=request_id)
        if response.status_code != 200:
            return Verdict(request_id=request_id)  # Glance is unwell: let it answer the request itself
        try:
            doc = json.loads(body)
            size = doc.get("size")
            facts = ImageFacts(status=str(doc.get("status")), size=size if isinstance(size, int) else None,
                               checksum=doc.get("checksum"), os_hash_algo=doc.get("os_hash_algo"),
                               os_hash_value=doc.get("os_hash_value"))
        except (ValueError, AttributeError):
            return Verdict(request_id=request_id)
        if self.cfg.auth_ttl > 0 and facts.status == "active":
            if len(self._auth_cache) >= _AUTH_CACHE_MAX:
                self._auth_cache = {k: v for k, v in self._auth_cache.items() if v[0] > now}
                while len(self._auth_cache) >= _AUTH_CACHE_MAX:
                    del self._auth_cache[next(iter(self._auth_cache))]
            self._auth_cache[key] = (now + self.cfg.auth_ttl, facts)
        return Verdict(facts=facts, request_id=request_id)

    async def aclose(self) -> None:
        await self.client.aclose()


async def body_of(response: httpx.Response) -> AsyncIterator[bytes]:
    """Glance's answer as it arrives (raw: a Content-Encoding passes as it is)."""
    try:
        async for piece in response.aiter_raw():
            yield piece
    except httpx.HTTPError as e:
        raise UpstreamBroke(f"Glance broke off its answer ({type(e).__name__})") from None


def response_headers(response: httpx.Response) -> Headers:
    """Glance's end-to-end headers. A Content-Length beside a Transfer-Encoding is not the length of
    the body httpx decoded, so it goes too (the server then frames the answer itself)."""
    out = _end_to_end(response.headers.raw)
    if any(k.lower() == b"transfer-encoding" for k, _ in response.headers.raw):
        out = [(k, v) for k, v in out if k != b"content-length"]
    return out


def _path(target: str) -> str:
    return target.split("?", 1)[0]
