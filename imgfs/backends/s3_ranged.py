"""One signed, ranged S3 GET: the data path of the S3 store.

boto3's ``get_object`` spends 1.4-1.7 ms of CPU per request on this 2-core machine (parameter
validation, serialisation, event hooks, response parsing) before and after the bytes; a random reader
pays that for every 64 KiB block, and a cold sequential read for every chunk. The same request signed
with botocore's own SigV4 signer and sent through botocore's own urllib3 session costs 0.6-1.0 ms, and
receiving a body 0.36 against 0.47-0.52 ms per MiB (``bench/s3_get_cost.py``; bench/README.md, "What
one S3 GET costs the client"). So the data path keeps botocore's signer, TLS, proxy and connection
handling, and drops only the generic operation pipeline; listing and HEAD stay on the boto3 client,
which also resolves the object URL once per image so the addressing (path or virtual host) is
exactly boto3's.

Errors come out as botocore's own exceptions (``ClientError`` for an S3 error answer, the
``EndpointConnectionError``/``ReadTimeoutError``/... family for the connection) so the store maps them
the way it maps boto3's. Retrying is the caller's: it owns the policy and the log line.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.httpsession import URLLib3Session
from botocore.utils import get_environ_proxies

from .. import httpbody
from ..buffers import POOL

# An error answer's body is a small XML document; more than this is not S3 talking.
_ERROR_BODY_MAX = 64 * 1024
_PIECE = 1 << 20  # bytes per read of a body


@dataclass(frozen=True)
class RangedAnswer:
    etag: str
    content_range: str
    data: bytes | bytearray | memoryview  # the body, in a reused buffer (buffers.py)


class BodyCutShort(ConnectionError):
    """The connection ended before the body's last byte (what urllib3 raises as IncompleteRead when it
    reads a whole body at once; a read in pieces only sees the end of the stream)."""


def _body(raw, length: int) -> bytearray | bytes:
    """The body, received into a reused buffer: exactly ``length`` bytes, or, if the server sent more,
    all of them (the caller's length check refuses those). Raises ``BodyCutShort`` if it ends early."""
    buf = POOL.get(length)
    view = memoryview(buf)
    got = 0
    receive = httpbody.receiver(raw)
    while got < length:
        n = receive(view[got:got + _PIECE])
        if not n:
            raise BodyCutShort(f"the body ended after {got} of {length} bytes")
        got += n
    extra = raw.read(1)
    return bytes(buf) + extra + raw.read() if extra else buf


class RangedGetter:
    """Signs and sends ``GET <url>`` with ``Range`` and ``If-Match``; thread-safe (one pool, shared)."""

    def __init__(self, *, endpoint_url: str, region: str, access_key: str, secret_key: str,
                 cacert: str | None, connect_timeout: float, read_timeout: float, max_connections: int) -> None:
        self._signer = S3SigV4Auth(Credentials(access_key, secret_key), "s3", region)
        keepalive = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        # urllib3 does not retry here (botocore's session sets retries=False): every attempt is ours to count
        self._session = URLLib3Session(verify=cacert if cacert else True, proxies=get_environ_proxies(endpoint_url),
                                       timeout=(connect_timeout, read_timeout), max_pool_connections=max_connections,
                                       socket_options=keepalive)

    def warm_up(self, url: str) -> None:
        """Sign a request without sending it: the signer's first call pays for imports and set-up (a few
        ms, more with a cold page cache) that would otherwise land on the first reader's first byte."""
        self._signer.add_auth(AWSRequest("GET", url, headers={"Range": "bytes=0-0"}))

    def get(self, url: str, offset: int, length: int, etag: str) -> RangedAnswer:
        """The answer to one attempt. Raises ``ClientError`` for an error answer (code and status as boto3
        would report them), botocore's connection errors, or urllib3's errors (and ``BodyCutShort``)
        while the body streams.
        A 2xx other than 206 comes back with no data and no Content-Range. A body cut short raises; one
        longer than asked comes back whole: the caller checks its length."""
        request = AWSRequest("GET", url, headers={"Range": f"bytes={offset}-{offset + length - 1}",
                                                  "If-Match": f'"{etag}"'}, stream_output=True)
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
        self._session.close()


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
