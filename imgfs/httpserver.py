"""An HTTP/1.1 server for one ASGI application, on h11 and trio, with the limits a node-local endpoint
needs against hostile or broken clients. It knows nothing of images or Glance.

Why not a general ASGI server: the endpoint must bound what each client may hold, and hypercorn (what
served it before) has no deadline for a request head apart from its keep-alive timer, no bound on a
client that drips a request body or stops reading a response, no cap on connections, answers every
framing error 400, and joins each body piece into a fresh bytes object (8 MiB per piece per download:
most of the endpoint's memory with many downloads). Parsing stays with h11; this module owns the
connection's life and its limits:

- The request head (line and headers) must arrive within ``head_timeout`` of its first byte (or of the
  accept, for a connection's first request), within ``max_head_bytes`` in all, ``max_header_bytes`` a
  line, ``max_headers`` lines and a target of ``max_target_bytes``: otherwise 408, 431 or 414, before the
  application sees anything.
- Framing is decided here, never passed on as received: ``Content-Length`` with ``Transfer-Encoding``
  is 400 and the connection closes (RFC 9112 §6.1: the shape of request smuggling); a transfer coding
  other than ``chunked`` is 501 (h11's own rule); the application reads the body h11 decoded.
- A request body must keep moving (``client_timeout`` between pieces), and so must a response: a
  client that reads nothing for ``client_timeout`` is dropped.
- An idle keep-alive connection is closed after ``idle_timeout``.
- At ``max_connections`` open connections a new one gets ``503`` with ``Retry-After`` and is closed.
- Body pieces go to the socket as they are (h11's data pass-through, views of the application's
  buffers, no copy), and ``send`` returns only once the socket took them: a slow client holds one piece
  of memory, never a backlog.
- Whatever escapes the application is one rate-limited log line and, if no answer has started, a 500;
  an answer cut short leaves the connection closed, never a body that looks complete.

Answers the server itself gives (4xx/5xx above) carry a fixed text: h11's messages may quote a
header's value, and a header may be a token.
"""

from __future__ import annotations

import errno
import http
import logging
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import h11
import trio

from .ratelimit import RateLimit

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_RECV = 64 * 1024  # per receive: with h11's bound on an incomplete head, no head can exceed max_head_bytes + one read
_WRITE = 1024 * 1024  # the unit a slow client must take within client_timeout
_LINGER = 1.0  # seconds to drain what a refused client still sends, so the answer is not lost to a reset
_REFUSING_MAX = 64  # refusals (503 at the cap) answered at once; beyond, a new connection is just closed
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

_TEXTS = {400: "malformed request", 408: "the request head did not arrive in time",
          414: "request target too long", 431: "request headers too large",
          500: "internal error; see imgfs's log", 501: "transfer coding not supported (only chunked)",
          503: "too many connections; retry shortly", 505: "only HTTP/1.0 and HTTP/1.1 are spoken here"}


@dataclass(frozen=True)
class Limits:
    """Defaults measured on the lab (see docs/openstack.md, "Hostile and broken clients")."""

    max_connections: int = 256
    head_timeout: float = 10.0
    idle_timeout: float = 75.0
    client_timeout: float = 60.0
    max_head_bytes: int = 64 * 1024  # Glance (eventlet, uWSGI) takes heads of this size: Keystone tokens are long
    max_header_bytes: int = 16 * 1024  # Glance's max_header_line
    max_headers: int = 100
    max_target_bytes: int = 8 * 1024


@dataclass
class ServerStats:
    connections: int = 0  # open now
    accepted: int = 0
    requests: int = 0
    refused_busy: int = 0  # connections answered 503 at max_connections
    timeouts: dict[str, int] = field(default_factory=dict)  # head / idle / body / send -> connections closed
    refused: dict[int, int] = field(default_factory=dict)  # status -> requests the server answered itself
    app_errors: int = 0  # requests the application failed (a bug): 500 or a cut answer
    aborted: int = 0  # answers cut short (the application stopped mid-body, or the client stopped reading)

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


class ClientGone(OSError):
    """``send`` on a connection whose client is gone or stopped reading (ASGI: an OSError subclass)."""


def canned(status: int, text: str | None = None, extra: bytes = b"") -> bytes:
    """A whole answer that closes the connection, built without h11: for a client h11 gave up on."""
    body = ((text or _TEXTS[status]) + "\n").encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=UTF-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n" % (status, _reason(status), len(body), extra)) + body


class _Closed(Exception):
    """The connection is over (EOF, reset, a timeout or a refusal already answered)."""


class _Connection:
    def __init__(self, server: "HttpServer", stream: trio.SocketStream) -> None:
        self.server, self.stream = server, stream
        self.limits = server.limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        sock = stream.socket
        self.client = _addr(sock.getpeername)
        self.local = _addr(sock.getsockname)
        self.gone = trio.Event()  # the client went away or stopped reading
        self.body_done = False
        self.started = False
        self.complete = False
        self.broken = False  # the request body was cut or malformed: no next request on this connection
        self.head = False  # a HEAD request: its answer has no body, whatever the application sends

    # ---- the connection ---------------------------------------------------------------------------

    async def run(self) -> None:
        first = True
        try:
            while True:
                request = await self._head(first)
                first = False
                if not await self._exchange(request):
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
                self.body_done = self.started = self.complete = self.broken = False
        except _Closed:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _recv(self, deadline: float, timeout_kind: str) -> bytes:
        with trio.move_on_at(deadline):
            try:
                return await self.stream.receive_some(_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        self.server.count_timeout(timeout_kind)
        raise _Closed

    async def _head(self, first: bool) -> h11.Request:
        """The next request's head, within the deadlines; _Closed when there is none."""
        now = trio.current_time()
        started = first or bool(self.conn.trailing_data[0])
        deadline = now + (self.limits.head_timeout if started else self.limits.idle_timeout)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                await self._refuse(e.error_status_hint if e.error_status_hint in _TEXTS else 400)
                raise _Closed from None
            if event is h11.NEED_DATA:
                if not started and self.conn.trailing_data[0]:
                    started, deadline = True, trio.current_time() + self.limits.head_timeout
                with trio.CancelScope() as idle:
                    if not started:  # between requests: a stop_accepting() ends the wait
                        if self.server.closing:
                            raise _Closed
                        self.server._idle.add(idle)
                    try:
                        data = await self._recv(deadline, "head" if started else "idle")
                    except _Closed:
                        if started:
                            await self._refuse(408)
                        raise
                    finally:
                        self.server._idle.discard(idle)
                if idle.cancelled_caught:
                    raise _Closed
                if data and not started:
                    started, deadline = True, trio.current_time() + self.limits.head_timeout
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            raise _Closed  # ConnectionClosed (or PAUSED after a client that closed mid-cycle)

    async def _refuse(self, status: int, text: str | None = None) -> None:
        """Answer the server's own refusal, then close gracefully: stop sending, drain what the client
        still sends for a moment (closing with unread data would reset the connection, and the client
        might never read the answer)."""
        self.server.stats.refused[status] = self.server.stats.refused.get(status, 0) + 1
        if self.server.warned.allow(("refused", status)):
            log.info("image API endpoint: answered %d to %s: %s", status, _peer(self.client), text or _TEXTS[status])
        await _refuse_and_linger(self.stream, canned(status, text))

    # ---- one request and its answer --------------------------------------------------------------

    def _check(self, request: h11.Request) -> tuple[int, str | None] | None:
        limits = self.limits
        if len(request.target) > limits.max_target_bytes:
            return 414, f"request target over {limits.max_target_bytes} bytes"
        headers = request.headers
        if len(headers) > limits.max_headers:
            return 431, f"over {limits.max_headers} header lines"
        total, lengths, codings = 0, 0, 0
        for name, value in headers:
            size = len(name) + len(value) + 4
            if size > limits.max_header_bytes:
                return 431, f"a header line over {limits.max_header_bytes} bytes"
            total += size
            lengths += name == b"content-length"
            codings += name == b"transfer-encoding"
        if total > limits.max_head_bytes:
            return 431, f"request headers over {limits.max_head_bytes} bytes"
        if lengths and codings:
            return 400, "both Content-Length and Transfer-Encoding: refused (RFC 9112 section 6.1)"
        return None

    async def _exchange(self, request: h11.Request) -> bool:
        """Run the application on one request; whether the connection may carry another."""
        self.server.stats.requests += 1
        refusal = (505, None) if request.http_version not in (b"1.0", b"1.1") else self._check(request)
        if refusal is not None:
            await self._refuse(*refusal)
            return False
        self.head = request.method == b"HEAD"
        raw_path, _, query = request.target.partition(b"?")
        scope: Scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii"), "method": request.method.decode("ascii"),
            "scheme": "http", "path": urllib.parse.unquote(raw_path.decode("latin-1"), errors="surrogateescape"),
            "raw_path": raw_path, "query_string": query, "root_path": "",
            "headers": list(request.headers), "client": self.client, "server": self.local,
        }
        try:
            await self.server.app(scope, self.receive, self.send)
        except ClientGone:
            pass
        except Exception:  # a bug in the application: this request fails, never the server
            self.server.stats.app_errors += 1
            if self.server.warned.allow(("app", scope["method"])):
                log.exception("image API endpoint: internal error answering %s %s (answering %s)", scope["method"],
                              short_path(scope["path"]), "500" if not self.started else "by closing the connection")
            if not self.started and not self.gone.is_set():
                await self._refuse(500)
                return False
        if self.gone.is_set():
            return False
        if not self.complete:
            if self.started:  # an answer cut short: closing is the only honest end
                self.server.stats.aborted += 1
                return False
            if self.broken:  # the application gave up on a malformed request body
                await self._refuse(400, "malformed request body")
                return False
            self.server.stats.app_errors += 1
            if self.server.warned.allow(("no answer", scope["method"])):
                log.error("image API endpoint: no answer was made to %s %s; answering 500", scope["method"],
                          short_path(scope["path"]))
            await self._refuse(500)
            return False
        return not self.broken and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def receive(self) -> Message:
        if self.body_done or self.broken:
            return await self._until_gone()
        if self.conn.they_are_waiting_for_100_continue:
            await self._write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:  # a malformed chunked body, or the client closed mid-body
                self.broken = True
                if self.conn.their_state is h11.ERROR and self.conn.trailing_data[1]:
                    self.gone.set()
                return {"type": "http.disconnect"}
            if event is h11.NEED_DATA:
                try:
                    data = await self._recv(trio.current_time() + self.limits.client_timeout, "body")
                except _Closed:
                    self.broken = True
                    self.gone.set()
                    return {"type": "http.disconnect"}
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            self.broken = True  # ConnectionClosed mid-body
            self.gone.set()
            return {"type": "http.disconnect"}

    async def _until_gone(self) -> Message:
        """After the body: wait until the client goes. What it sends meanwhile (a pipelined request) is
        kept for h11, up to one head's worth; beyond that nothing more is read."""
        while not self.gone.is_set() and not self.complete:
            if len(self.conn.trailing_data[0]) > self.limits.max_head_bytes:
                await self.gone.wait()
                break
            try:
                data = await self.stream.receive_some(_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.gone.set()
                break
            self.conn.receive_data(data)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.gone.is_set():
            raise ClientGone(errno.EPIPE, "the client is gone")
        kind = message["type"]
        if kind == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", ())]
            if self.server.closing:  # this connection ends after this answer: say so (RFC 9112 9.6)
                headers.append((b"connection", b"close"))
            data = self.conn.send(h11.Response(status_code=message["status"], headers=headers,
                                               reason=_reason(message["status"])))
            self.started = True
            await self._write(data)
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body and not self.head:
                for piece in self.conn.send_with_data_passthrough(h11.Data(data=body)) or ():
                    await self._write(piece)
            if not message.get("more_body", False):
                await self._write(self.conn.send(h11.EndOfMessage()))
                self.complete = True

    async def _write(self, data: bytes | memoryview | None) -> None:
        """Hand ``data`` to the socket, a piece at a time, each within client_timeout."""
        if not data:
            return
        view = memoryview(data)
        for at in range(0, view.nbytes, _WRITE):
            with trio.move_on_after(self.limits.client_timeout) as cs:
                try:
                    await self.stream.send_all(view[at:at + _WRITE])
                    continue
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if cs.cancelled_caught:
                self.server.count_timeout("send")
            self.gone.set()
            raise ClientGone(errno.EPIPE, "the client is gone or stopped reading")


class HttpServer:
    def __init__(self, app: App, limits: Limits, stats: ServerStats | None = None) -> None:
        self.app = app
        self.limits = limits
        self.stats = stats or ServerStats()
        self.warned = RateLimit(60.0)
        self._refusing = 0
        self._accepting = trio.CancelScope()
        self.closing = False  # set by stop_accepting: every connection ends after its current answer
        self._idle: set[trio.CancelScope] = set()  # connections waiting for their next request
        self._drained = trio.Event()  # set once closing and no connection is left

    def count_timeout(self, kind: str) -> None:
        self.stats.timeouts[kind] = self.stats.timeouts.get(kind, 0) + 1
        if self.warned.allow(("timeout", kind)):
            log.info("image API endpoint: closed a connection: %s", {
                "head": f"its request head took over {self.limits.head_timeout:g}s",
                "idle": f"idle for {self.limits.idle_timeout:g}s",
                "body": f"its request body stalled for {self.limits.client_timeout:g}s",
                "send": f"it read nothing for {self.limits.client_timeout:g}s"}[kind])

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on the bound ``sock`` until cancelled (then every connection ends where it is)."""
        sock.listen(256)  # (harmless for one that listens already)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            with self._accepting:
                await self._accept(listener, nursery)

    def stop_accepting(self) -> None:
        """Leave new connections to whoever else holds the listening socket (the next imgfs, on a
        hand-over). A connection waiting for its next request closes now (a client sees the close
        before it reuses the connection, and opens a new one: to the next holder); one in the middle of
        an answer finishes it, says ``Connection: close`` if it had not started, and closes."""
        self._accepting.cancel()
        self.closing = True
        for idle in self._idle:
            idle.cancel()
        if not self.stats.connections:
            self._drained.set()

    async def drained(self) -> None:
        """Return once stop_accepting() was called and every connection has ended."""
        await self._drained.wait()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _ACCEPT_RETRY:
                    raise
                if self.warned.allow("accept"):
                    log.warning("image API endpoint: cannot accept connections (%s); retrying", e.strerror)
                await trio.sleep(0.1)
                continue
            self.stats.accepted += 1
            if self.stats.connections >= self.limits.max_connections:
                self.stats.refused_busy += 1
                if self.warned.allow("busy"):
                    log.warning("image API endpoint: %d connections open (image_api_max_connections); answering "
                                "503 to new ones", self.stats.connections)
                if self._refusing < _REFUSING_MAX:
                    nursery.start_soon(self._busy, stream)
                else:
                    stream.socket.close()
                continue
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        try:
            await _Connection(self, stream).run()
        finally:
            self.stats.connections -= 1
            if self.closing and not self.stats.connections:
                self._drained.set()

    async def _busy(self, stream: trio.SocketStream) -> None:
        self._refusing += 1
        try:
            await _refuse_and_linger(stream, canned(503, extra=b"retry-after: 1\r\n"))
        finally:
            self._refusing -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def _refuse_and_linger(stream: trio.SocketStream, answer: bytes) -> None:
    with trio.move_on_after(_LINGER):
        try:
            await stream.send_all(answer)
            await stream.send_eof()
            drained = 0
            while drained < 1024 * 1024:
                data = await stream.receive_some(_RECV)
                if not data:
                    break
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _addr(get: Callable[[], Any]) -> tuple[str, int] | None:
    try:
        a = get()
    except OSError:
        return None
    return (a[0], a[1]) if isinstance(a, tuple) else None


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def short_path(path: str) -> str:
    """A request path fit for one log line."""
    return path if len(path) <= 200 else path[:200] + "..."
