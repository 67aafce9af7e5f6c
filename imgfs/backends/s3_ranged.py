"""One ranged S3 GET: the data path of the S3 store.

What a GET costs the client is what a random reader pays for every 64 KiB block it misses, and a cold
sequential reader for every chunk. Measured on this 2-core machine, one client thread against s3rver
(``bench/s3_get_cost.py``; bench/README.md, "What one S3 GET costs the client"): boto3's ``get_object``
1.4-1.7 ms of CPU per request (parameter validation, serialisation, event hooks, response parsing); the
request signed with botocore's SigV4 signer and sent through botocore's urllib3 session 0.8-0.9 ms, of
which the signature is ~0.3 and urllib3's layers over http.client ~0.25; the same GET on a kept
http.client connection with a signature made earlier 0.3 ms.

So the data path has two ways, chosen once per store:

- **direct** (no proxy configured for the endpoint: the usual case, S3 or RGW on a storage network):
  the object's GET is presigned with botocore's query-string SigV4 signer (``S3SigV4QueryAuth``) once
  and reused until half its validity is gone: a presigned URL is valid for any number of requests
  until it expires, and ``Range`` and ``If-Match`` are headers S3 does not need signed. Requests go on
  kept http.client connections, TLS verified exactly as botocore's session verifies (its context
  factory and its CA bundle, or ``s3_store_cacert``). Bodies are received in place into reused buffers.
- **session** (an HTTP(S) proxy applies to the endpoint): each request signed with the SigV4 header
  signer and sent through botocore's urllib3 session, which speaks to proxies.

``RangedGetter.path`` says which one runs. Either way, errors come out as botocore's own exceptions
(``ClientError`` for an S3 error answer, the ``EndpointConnectionError``/``ReadTimeoutError``/... family
for the connection, ``BodyCutShort`` while the body streams), so the store maps them the way it maps
boto3's. No error names the URL: a presigned one carries the access key id and a signature. Retrying
is the caller's: it owns the policy and the log line; the one exception is a kept connection the server
closed while it was idle, which is redialled at once (a GET is idempotent, and nothing was answered).
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import deque
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError
from botocore.exceptions import ReadTimeoutError, SSLError
from botocore.httpsession import URLLib3Session, create_urllib3_context, get_cert_path
from botocore.utils import get_environ_proxies

from .. import httpbody
from ..buffers import POOL

log = logging.getLogger(__name__)

# An error answer's body is a small XML document; more than this is not S3 talking.
_ERROR_BODY_MAX = 64 * 1024
_PIECE = 1 << 20  # bytes per read of a body
# A presigned URL is made valid for this long and renewed once half of it has gone, so a request
# never carries one that expires while it is under way (S3 allows up to 7 days).
PRESIGN_SECONDS = 900
_PRESIGNED_KEPT = 4096  # URLs kept (one per object read recently)
# A 403 to a signature older than this is asked once more with a fresh one; a younger one was refused
# for what it says (the credentials, the bucket policy), which signing again does not change.
_RESIGN_AFTER = 60.0
# What a server that takes no query-string signatures answers a presigned GET with.
_QUERY_REFUSED = {400, 403, 405, 501}


@dataclass(frozen=True)
class RangedAnswer:
    etag: str
    content_range: str
    data: bytes | bytearray | memoryview  # the body, in a reused buffer (buffers.py)
    sent: int = -1  # the body's length as the server announced it, when it was not read (-1: it was)


class BodyCutShort(ConnectionError):
    """The connection ended before the body's last byte (what urllib3 raises as IncompleteRead when it
    reads a whole body at once; a read in pieces only sees the end of the stream)."""


def _receive(readinto: Callable[[memoryview], int], length: int) -> bytearray:
    """Exactly ``length`` bytes of a body, received in place into a reused buffer, in pieces. Raises
    ``BodyCutShort`` if it ends early."""
    buf = POOL.get(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = readinto(view[got:got + _PIECE])
        if not n:
            raise BodyCutShort(f"the body ended after {got} of {length} bytes")
        got += n
    return buf


def _body(raw, length: int) -> bytearray | bytes:
    """Session path: the body, exactly ``length`` bytes, or, if the server sent more, all of them (the
    caller's length check refuses those)."""
    buf = _receive(httpbody.receiver(raw), length)
    extra = raw.read(1)
    return bytes(buf) + extra + raw.read() if extra else buf


class _Presigned:
    """Presigned GET URLs (path and query), one per object URL, renewed at half their validity.
    Thread-safe; signing happens outside the lock (two threads may both sign: harmless)."""

    def __init__(self, credentials: Credentials, region: str) -> None:
        self._signer = S3SigV4QueryAuth(credentials, "s3", region, expires=PRESIGN_SECONDS)
        self._kept: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def target(self, url: str, *, fresh: bool = False) -> tuple[str, float]:
        """The request target (path and query) of a presigned GET of ``url`` (its host is the URL's), and
        the wall-clock time it was signed at."""
        now = time.time()  # S3 judges a signature's age by the wall clock
        if not fresh:
            kept = self._kept.get(url)
            if kept is not None and now - kept[1] < PRESIGN_SECONDS / 2:
                return kept
        request = AWSRequest("GET", url)
        self._signer.add_auth(request)
        parts = urlsplit(request.prepare().url)
        target = f"{parts.path or '/'}?{parts.query}"
        with self._lock:
            if len(self._kept) >= _PRESIGNED_KEPT:
                self._kept.clear()
            self._kept[url] = (target, now)
        return target, now


class _Connections:
    """Kept http.client connections to one endpoint (scheme, host, port), at most ``kept`` idle ones.
    Thread-safe: each connection is used by one thread at a time, between ``take`` and ``give``."""

    def __init__(self, endpoint_url: str, *, cacert: str | None, connect_timeout: float, read_timeout: float,
                 kept: int) -> None:
        parts = urlsplit(endpoint_url)
        self.host, self.port = parts.hostname or "", parts.port
        self.endpoint_url = endpoint_url
        self._connect_timeout, self._read_timeout, self._kept = connect_timeout, read_timeout, kept
        self._idle: deque[http.client.HTTPConnection] = deque()
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            # botocore's own TLS settings: its context factory, certificate and host name checked, its CA
            # bundle (certifi's) unless s3_store_cacert names one
            context = create_urllib3_context()
            context.verify_mode = ssl.CERT_REQUIRED
            context.check_hostname = True
            context.load_verify_locations(cafile=get_cert_path(cacert if cacert else True))
            self._tls = context

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection, and whether it was kept from an earlier request (else it is new, connected)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._dial(), False

    def give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._kept:
                self._idle.append(conn)
                return
        conn.close()

    def _dial(self) -> http.client.HTTPConnection:
        if self._tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self._connect_timeout, context=self._tls)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self._connect_timeout)
        try:
            conn.connect()
        except ssl.SSLError as e:  # ssl.CertificateError is one
            conn.close()
            raise SSLError(endpoint_url=self.endpoint_url, error=type(e).__name__) from None
        except TimeoutError:
            conn.close()
            raise ConnectTimeoutError(endpoint_url=self.endpoint_url) from None
        except OSError as e:  # refused, unreachable, no such host
            conn.close()
            raise EndpointConnectionError(endpoint_url=self.endpoint_url, error=type(e).__name__) from None
        assert conn.sock is not None
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(self._read_timeout)
        return conn

    def close(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle), deque()
        for conn in idle:
            conn.close()


# A kept connection the server closed while it sat idle fails like this before any answer.
_IDLE_CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class RangedGetter:
    """Sends ``GET <url>`` with ``Range`` and ``If-Match``, signed; thread-safe (one pool, shared)."""

    def __init__(self, *, endpoint_url: str, region: str, access_key: str, secret_key: str,
                 cacert: str | None, connect_timeout: float, read_timeout: float, max_connections: int,
                 path: str | None = None) -> None:
        """``path``: None chooses from the environment's proxies for the endpoint; "session" takes
        botocore's session whatever they are (bench/s3_get_cost.py compares the two)."""
        credentials = Credentials(access_key, secret_key)
        self._endpoint_url = endpoint_url
        proxies = get_environ_proxies(endpoint_url)
        self.path = path or ("session" if proxies else "direct")
        self._signer = S3SigV4Auth(credentials, "s3", region)
        if self.path == "direct":
            self.presigned = True  # False once the server took a signed header where it refused a presigned URL
            self._presigned_worked = False
            self._probed = False  # whether a refused presigned GET was asked again with a signed header
            self._presigned = _Presigned(credentials, region)
            # per origin (scheme, host, port): virtual-host addressing puts the bucket in the host name
            self._pools: dict[str, _Connections] = {}
            self._pool_of: dict[str, _Connections] = {}  # object URL -> its origin's pool
            self._pools_lock = threading.Lock()
            self._pool_args = dict(cacert=cacert, connect_timeout=connect_timeout, read_timeout=read_timeout,
                                   kept=max_connections)
            return
        keepalive = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        # urllib3 does not retry here (botocore's session sets retries=False): every attempt is ours to count
        self._session = URLLib3Session(verify=cacert if cacert else True, proxies=proxies,
                                       timeout=(connect_timeout, read_timeout), max_pool_connections=max_connections,
                                       socket_options=keepalive)

    def warm_up(self, url: str) -> None:
        """Sign a request without sending it: the signer's first call pays for imports and set-up (a few
        ms, more with a cold page cache) that would otherwise land on the first reader's first byte."""
        if self.path == "direct":
            self._presigned.target(url, fresh=True)
        self._signer.add_auth(AWSRequest("GET", url, headers={"Range": "bytes=0-0"}))

    def get(self, url: str, offset: int, length: int, etag: str) -> RangedAnswer:
        """The answer to one attempt. Raises ``ClientError`` for an error answer (code and status as boto3
        would report them), botocore's connection errors, or (while the body streams) ``BodyCutShort``
        and urllib3's or the socket's errors.
        A 2xx other than 206 comes back with no data and no Content-Range. A body cut short raises; one
        of another length than asked is not read, and comes back empty with its length in ``sent``."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "If-Match": f'"{etag}"'}
        if self.path == "session":
            return self._get_session(url, headers, length)
        pool = self._pool(url)
        if not self.presigned:
            answer = self._get_direct(pool, *self._signed(url, headers), length)
        else:
            target, signed_at = self._presigned.target(url)
            answer = self._get_direct(pool, target, headers, length)
            status = answer.response["ResponseMetadata"]["HTTPStatusCode"] if isinstance(answer, ClientError) else 0
            if not status:
                self._presigned_worked = True
            elif status == 403 and time.time() - signed_at > _RESIGN_AFTER:
                # a kept signature the server no longer takes (its clock ahead of ours): one fresh one, once
                answer = self._get_direct(pool, self._presigned.target(url, fresh=True)[0], headers, length)
            elif not self._presigned_worked and (not self._probed or status == 500) and _query_refused(answer):
                # Until one presigned GET has worked, a refusal may be the server's, not the credentials':
                # some S3 servers take no query-string signatures. Ask the same once with a signed header
                # (a refusal once: refused credentials must not cost every read two requests).
                self._probed = True
                answer = self._get_direct(pool, *self._signed(url, headers), length)
                if not isinstance(answer, ClientError):
                    self.presigned = False
                    log.info("S3 endpoint %s refused a presigned GET (HTTP %d) and took a signed one: signing "
                             "every request from now on (~0.3 ms more CPU per GET)", self._endpoint_url, status)
        if isinstance(answer, ClientError):
            raise answer
        return answer

    def _signed(self, url: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The request target and headers of ``GET url`` signed in its headers (SigV4)."""
        request = AWSRequest("GET", url, headers=headers)
        self._signer.add_auth(request)
        prepared = request.prepare()
        parts = urlsplit(prepared.url)
        return f"{parts.path or '/'}{'?' + parts.query if parts.query else ''}", dict(prepared.headers.items())

    def _pool(self, url: str) -> _Connections:
        pool = self._pool_of.get(url)  # asked per GET: a dict lookup, not a URL parse
        if pool is not None:
            return pool
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        pool = self._pools.get(origin)
        if pool is None:
            with self._pools_lock:
                pool = self._pools.get(origin)
                if pool is None:
                    if len(self._pools) >= _PRESIGNED_KEPT:  # one bucket per store: never, but bounded
                        self._close_pools()
                    pool = self._pools[origin] = _Connections(origin, **self._pool_args)
        if len(self._pool_of) >= _PRESIGNED_KEPT:
            self._pool_of.clear()
        self._pool_of[url] = pool
        return pool

    def _get_direct(self, pool: _Connections, target: str, headers: dict[str, str],
                    length: int) -> RangedAnswer | ClientError:
        conn, kept = pool.take()
        try:
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except _IDLE_CLOSED:
                if not kept:
                    raise
                conn.close()
                conn, kept = pool.take()  # another kept one may be stale too: so be it, once
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
        except (ssl.SSLError, ssl.CertificateError) as e:
            conn.close()
            raise SSLError(endpoint_url=self._endpoint_url, error=type(e).__name__) from None
        except TimeoutError:
            conn.close()
            raise ReadTimeoutError(endpoint_url=self._endpoint_url) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ConnectionClosedError(endpoint_url=self._endpoint_url) from e
        reusable = False
        try:
            status = response.status
            if status == 206:
                etag = (response.getheader("ETag") or "").strip('"')
                content_range = response.getheader("Content-Range") or ""
                announced = response.length  # None: chunked
                if announced is not None and announced != length:
                    return RangedAnswer(etag, content_range, b"", announced)
                data = self._receive_direct(response, length)
                reusable = not response.will_close
                return RangedAnswer(etag, content_range, data)
            if 200 <= status < 300:  # the whole object, Range ignored: never read it
                return RangedAnswer((response.getheader("ETag") or "").strip('"'), "", b"")
            body = response.read(_ERROR_BODY_MAX)
            reusable = response.isclosed() and not response.will_close
            return _client_error(status, body)
        finally:
            if reusable:
                pool.give(conn)
            else:
                conn.close()  # a body left unread must not come before the next request's answer

    @staticmethod
    def _receive_direct(response: http.client.HTTPResponse, length: int) -> bytearray:
        """Direct path: exactly ``length`` bytes of the body (see ``_receive``)."""
        try:
            buf = _receive(response.readinto, length)
            if response.length is None and response.read(1):  # chunked, and longer than asked
                raise BodyCutShort(f"the body went on past the {length} bytes asked")
        except http.client.IncompleteRead as e:  # fewer bytes than Content-Length
            raise BodyCutShort(f"the body ended short of the {length} bytes asked") from None
        return buf

    def _close_pools(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._pool_of.clear()

    def _get_session(self, url: str, headers: dict[str, str], length: int) -> RangedAnswer:
        request = AWSRequest("GET", url, headers=headers, stream_output=True)
        self._signer.add_auth(request)
        response = self._session.send(request.prepare())
        raw = response.raw
        done = False
        try:
            if response.status_code == 206:
                headers = response.headers
                answer = RangedAnswer(headers.get("ETag", "").strip('"'), headers.get("Content-Range", ""),
                                      _body(raw, length))
                done = True
                return answer
            if 200 <= response.status_code < 300:  # the whole object, Range ignored: never read it
                return RangedAnswer(response.headers.get("ETag", "").strip('"'), "", b"")
            raise _client_error(response.status_code, raw.read(_ERROR_BODY_MAX))
        finally:
            if not done:
                raw.close()  # a body left unread must not go back to the pool under the next request
            raw.release_conn()

    def close(self) -> None:
        if self.path == "direct":
            with self._pools_lock:
                self._close_pools()
        else:
            self._session.close()


def _query_refused(answer: ClientError) -> bool:
    """Whether an error answer to a presigned GET may mean the server takes no presigned URLs: a refusal,
    or a 500 that is no S3 error document (a server failing on the request itself). S3's own 500
    (``InternalError``) is a passing fault, retried as such."""
    status = answer.response["ResponseMetadata"]["HTTPStatusCode"]
    return status in _QUERY_REFUSED or (status == 500 and answer.response["Error"]["Code"] == "500")


def _client_error(status: int, body: bytes) -> ClientError:
    """What boto3 would raise for this answer: S3's ``<Error><Code>`` if the body has one, else the status
    (a HEAD-like answer without a body, or a proxy's HTML page)."""
    code = str(status)
    try:
        found = ElementTree.fromstring(body).findtext("Code") if body else None
        if found:
            code = found.strip()
    except ElementTree.ParseError:
        pass
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
