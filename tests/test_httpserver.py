"""imgfs.httpserver on a real loopback socket, with a small ASGI app: every limit a hostile client can
hit, the framing rules, and what the application sees. The same server in front of the real Glance is
tested in test_endpoint_hostile.py."""

from __future__ import annotations

import logging
import socket

import pytest
import trio

from imgfs.httpserver import HttpServer, Limits, ServerStats

MiB = 1 << 20


class App:
    """Answers ``GET /big`` with ``big`` bytes, ``/boom`` by raising, ``/cut`` with half of what it
    declares, anything else with what it received (method, path, body length)."""

    def __init__(self, big: int = MiB) -> None:
        self.big = big
        self.requests: list[tuple[str, str, bytes]] = []
        self.sent_big = 0
        self.disconnects = 0
        self.send_failed: BaseException | None = None

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                self.disconnects += 1
                return
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.requests.append((scope["method"], scope["path"], body))
        if scope["path"] == "/boom":
            raise RuntimeError("a bug")
        if scope["path"] == "/big":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(self.big).encode())]})
            piece = memoryview(bytes(MiB))
            try:
                while self.sent_big < self.big:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    self.sent_big += MiB
            except OSError as e:
                self.send_failed = e
                raise
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/cut":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
            await send({"type": "http.response.body", "body": b"12345", "more_body": True})
            return
        text = f"{scope['method']} {scope['path']} {len(body)}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(text)).encode())]})
        await send({"type": "http.response.body", "body": text})


@pytest.fixture
async def server(nursery):
    """(start(limits, app) -> (port, stats))."""
    async def start(limits: Limits = Limits(), app: App | None = None):
        app = app or App()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        stats = ServerStats()
        await nursery.start(HttpServer(app, limits, stats).serve, sock)
        return port, stats, app
    return start


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_all(stream: trio.SocketStream, timeout: float = 10) -> bytes:
    """Everything until the server closes (fails the test if it does not within ``timeout``)."""
    out = b""
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            out += data
    return out


async def exchange(port: int, raw: bytes, timeout: float = 10) -> bytes:
    stream = await connect(port)
    await stream.send_all(raw)
    return await read_all(stream, timeout)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def test_content_length_with_transfer_encoding_is_400_and_closed_before_the_app(server):
    port, stats, app = await server()
    raw = (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = await exchange(port, raw)
    assert status_of(answer) == 400 and answer.count(b"HTTP/1.1") == 1, answer
    assert b"connection: close" in answer.lower()
    assert app.requests == []  # neither the request nor what was smuggled behind it reached the app
    assert stats.refused == {400: 1}


@pytest.mark.parametrize("coding", [b"chunked, identity", b"gzip", b"identity", b"chunked\r\nTransfer-Encoding: chunked"])
async def test_a_transfer_coding_other_than_chunked_is_501(server, coding):
    port, stats, app = await server()
    answer = await exchange(port, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n")
    assert status_of(answer) == 501, answer
    assert app.requests == []


@pytest.mark.parametrize("head, status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 9000) for i in range(8)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: " + b"h" * 100_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad\x00Name: v\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),  # a TLS hello
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),  # HTTP/2 prior knowledge: not spoken here
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, close\r\n\r\n", 200),  # no upgrade: plain 1.1
])
async def test_heads_over_the_limits_are_refused_before_the_app(server, head, status):
    port, stats, app = await server()
    answer = await exchange(port, head)
    assert status_of(answer) == status, answer
    assert app.requests == [] or status == 200
    assert b"bbbb" not in answer and b"hhhh" not in answer  # the answer never quotes a header


async def test_slow_heads_are_closed_at_the_deadline_while_others_are_answered(server):
    port, stats, app = await server(Limits(head_timeout=1.0))
    drips = [await connect(port) for _ in range(40)]
    for s in drips:
        await s.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
    closed_at: list[float] = []
    began = trio.current_time()

    async def drip(s):
        try:
            while True:
                await trio.sleep(0.3)
                await s.send_all(b"X-Drip: 1\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def watch(s):
        answer = await read_all(s, timeout=5)
        assert status_of(answer) == 408, answer
        closed_at.append(trio.current_time() - began)

    async with trio.open_nursery() as n:
        for s in drips:
            n.start_soon(drip, s)
            n.start_soon(watch, s)
        for _ in range(5):  # a legitimate client is answered at once throughout
            t = trio.current_time()
            answer = await exchange(port, b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert status_of(answer) == 200 and trio.current_time() - t < 1.5
            await trio.sleep(0.2)
        with trio.fail_after(5):
            while len(closed_at) < len(drips):
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert max(closed_at) < 4, closed_at  # the deadline is 1 s; none lives on
    assert stats.timeouts.get("head") == 40
    with trio.fail_after(5):  # each closes once the client does, or a second after its 408
        while stats.connections:
            await trio.sleep(0.05)


async def test_idle_keep_alive_connections_are_closed(server):
    port, stats, app = await server(Limits(idle_timeout=0.5))
    s = await connect(port)
    await s.send_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    t = trio.current_time()
    answer = await read_all(s, timeout=5)  # the answer, then the close after 0.5 s idle
    assert status_of(answer) == 200 and answer.endswith(b"GET /a 0")
    assert 0.4 < trio.current_time() - t < 3
    assert stats.timeouts == {"idle": 1}


async def test_a_stalled_request_body_is_closed_and_the_app_sees_a_disconnect(server):
    port, stats, app = await server(Limits(client_timeout=0.5))
    s = await connect(port)
    await s.send_all(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
    answer = await read_all(s, timeout=5)
    assert answer == b"" and app.disconnects == 1 and stats.timeouts == {"body": 1}


async def test_a_client_that_stops_reading_holds_one_piece_and_is_dropped(server):
    app = App(big=1024 * MiB)
    port, stats, app = await server(Limits(client_timeout=1.0), app)
    s = await connect(port)
    s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    await s.send_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    with trio.fail_after(10):
        while app.send_failed is None:
            await trio.sleep(0.05)
    # What the app handed over is what the socket buffers took, plus the piece in flight: never a backlog.
    assert app.sent_big <= 16 * MiB, app.sent_big
    assert stats.timeouts == {"send": 1} and stats.aborted == 0
    await s.aclose()


async def test_at_the_connection_cap_a_new_client_gets_503_with_retry_after(server):
    port, stats, app = await server(Limits(max_connections=5))
    held = [await connect(port) for _ in range(5)]
    with trio.fail_after(5):
        while stats.connections < 5:
            await trio.sleep(0.01)
    answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(answer) == 503 and b"retry-after: 1" in answer.lower(), answer
    assert stats.refused_busy == 1
    await held[0].aclose()
    with trio.fail_after(5):
        while stats.connections > 4:
            await trio.sleep(0.01)
    assert status_of(await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")) == 200
    for h in held[1:]:
        await h.aclose()


async def test_a_bug_in_the_app_is_500_and_one_line_and_the_server_goes_on(server, caplog):
    port, stats, app = await server()
    with caplog.at_level(logging.ERROR, logger="imgfs.httpserver"):
        for _ in range(3):
            assert status_of(await exchange(port, b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n")) == 500
    assert len([r for r in caplog.records if "internal error" in r.getMessage()]) == 1  # rate-limited
    assert stats.app_errors == 3
    assert status_of(await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")) == 200


async def test_an_answer_cut_short_closes_the_connection(server):
    port, stats, app = await server()
    answer = await exchange(port, b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.endswith(b"\r\n\r\n12345") and answer.count(b"HTTP/1.1 ") == 1, answer
    assert stats.aborted == 1


async def test_pipelined_requests_are_answered_in_order_each_with_its_own_body(server):
    port, stats, app = await server()
    inside = b"GET /inside HTTP/1.1\r\nHost: a\r\n\r\n"  # a body shaped like a request stays a body
    raw = (b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(inside), inside) +
           b"POST /two HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
           b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    answer = await exchange(port, raw)
    assert [r[:2] for r in app.requests] == [("POST", "/one"), ("POST", "/two"), ("GET", "/three")]
    assert app.requests[0][2] == inside and app.requests[1][2] == b"abc"
    assert answer.count(b"HTTP/1.1 200") == 3 and b"POST /one %d" % len(inside) in answer and b"POST /two 3" in answer


async def test_stop_accepting_leaves_new_clients_to_the_next_holder_and_ends_each_connection_after_its_answer(nursery):
    """What a hand-over to the next imgfs does with the endpoint: an idle keep-alive connection is
    closed at once (its client opens a new one), a download in flight finishes whole and then closes,
    and a client that connects meanwhile waits in the queue and is answered by the next server on the
    same listening socket."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    successor_sock = socket.socket(fileno=socket.dup(sock.fileno()))  # what systemd's fd store keeps
    app = App(big=32 * MiB)
    old = HttpServer(app, Limits(idle_timeout=60), ServerStats())
    await nursery.start(old.serve, sock)

    idle = await connect(port)
    await idle.send_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    first = b""
    with trio.fail_after(5):
        while not first.endswith(b"GET /a 0"):
            first += await idle.receive_some(65536)
    assert status_of(first) == 200
    busy = await connect(port)
    await busy.send_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    with trio.fail_after(5):
        head = await busy.receive_some(65536)
    assert status_of(head) == 200
    old.stop_accepting()
    assert await read_all(idle, timeout=5) == b""  # closed now, not after idle_timeout
    newcomer = await connect(port)  # queued: nobody accepts it yet
    await newcomer.send_all(b"GET /n HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    rest = head + await read_all(busy, timeout=20)  # the whole body, then the close
    assert rest.split(b"\r\n\r\n", 1)[1] == bytes(32 * MiB)
    with trio.fail_after(5):
        await old.drained()
    assert old.stats.connections == 0
    await nursery.start(HttpServer(App(), Limits(), ServerStats()).serve, successor_sock)
    answer = await read_all(newcomer, timeout=5)
    assert status_of(answer) == 200 and answer.endswith(b"GET /n 0")
    assert app.requests == [("GET", "/a", b""), ("GET", "/big", b"")]  # the newcomer never reached the old one
