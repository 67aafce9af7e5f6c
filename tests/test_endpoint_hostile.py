"""The Image API endpoint under hostile clients and load, against the lab's real Glance: generated raw
requests compared with Glance's own answers, request smuggling shapes seen from Glance's side (a
recording relay between imgfs and Glance), slow clients, and many concurrent downloads' memory."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import uuid

import h11
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import wait_for
from .imageapi import MiB, start_endpoint, status, token_of, wait_listed
from .imageapi import glance_api, images  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.mount, pytest.mark.lab]


# ---- raw HTTP ----------------------------------------------------------------------------------------

def exchange(url: str, raw: bytes, timeout: float = 30, half_close: bool = False,
             whole: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send ``raw`` on a new connection (then end the sending side, with ``half_close``); (status,
    headers, body) of the first answer, the body read up to its Content-Length or the close; status 0
    when the server closed without answering. A server that does neither within ``timeout`` fails the
    test (socket.timeout)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(raw)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before taking everything
            pass
        def more() -> bytes:  # b"" at the close (or a reset)
            try:
                return s.recv(65536)
            except ConnectionResetError:
                return b""

        got = b""
        while b"\r\n\r\n" not in got and (data := more()):
            got += data
        if b"\r\n\r\n" not in got:
            return 0, {}, got
        head, body = got.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        want = -1 if whole else int(headers.get(b"content-length", b"-1"))
        while (want < 0 or len(body) < want) and (data := more()):
            body += data
        return status, headers, body


class Listener:
    """A loopback TCP server in Glance's place: each connection goes to ``take`` in the accept thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.take(conn)

    def take(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class Relay(Listener):
    """A TCP relay in front of the real Glance that records every byte imgfs sends it, per connection."""

    def __init__(self, target: str) -> None:
        host, port = target.split("//")[1].rstrip("/").split(":")
        self.target = (host, int(port))
        self.streams: list[bytearray] = []
        self._lock = threading.Lock()
        super().__init__()

    def take(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        record = bytearray()
        with self._lock:
            self.streams.append(record)
        threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def requests(self) -> list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]:
        """Every request Glance received, parsed as Glance's HTTP/1.1 parser would: (method, target,
        headers, body)."""
        out = []
        with self._lock:
            streams = [bytes(s) for s in self.streams]
        for data in streams:
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(data)
            current = None
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Request):
                    current = [event.method, event.target, list(event.headers), b""]
                elif isinstance(event, h11.Data):
                    current[3] += event.data
                elif isinstance(event, h11.EndOfMessage):
                    out.append(tuple(current))
                    conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                    conn.send(h11.EndOfMessage())
                    conn.start_next_cycle()
                else:  # NEED_DATA, PAUSED, ConnectionClosed: nothing more on this connection
                    break
        return out


@pytest.fixture
def relay(lab):
    r = Relay(lab["glance"]["endpoint"])
    yield r
    r.close()


# ---- smuggling -----------------------------------------------------------------------------------------

def test_smuggling_shapes_never_reach_glance_as_another_request(tmp_path, lab, glance_api, images, relay, mounter):
    img, data = images(MiB)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None, image_api_upstream=relay.url)
    wait_listed(m, img["id"])
    token = glance_api.token.encode()
    bogus = str(uuid.uuid4()).encode()
    auth = b"Host: imgfs\r\nX-Auth-Token: " + token + b"\r\n"
    smuggled = b"DELETE /v2/images/" + img["id"].encode() + b" HTTP/1.1\r\n" + auth + b"\r\n"

    # Both framings: refused at once, nothing forwarded, and the request behind it is never read as one.
    status_, headers, _ = exchange(url, b"PATCH /v2/images/" + bogus + b" HTTP/1.1\r\n" + auth +
                                   b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
    assert status_ == 400 and headers[b"connection"] == b"close"
    for coding in (b"chunked, identity", b"identity", b"gzip, chunked"):
        status_, _, _ = exchange(url, b"PATCH /v2/images/" + bogus + b" HTTP/1.1\r\n" + auth +
                                 b"Transfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n" + smuggled)
        assert status_ == 501, coding
    assert relay.requests() == []
    assert glance_api("GET", f"/v2/images/{img['id']}").json()["status"] == "active"

    # A body shaped like a request, pipelined behind by a real second request, and hop-by-hop headers:
    # Glance sees exactly the client's two requests, each with its own body and no hop-by-hop header.
    body = smuggled
    raw = (b"PATCH /v2/images/" + bogus + b" HTTP/1.1\r\n" + auth + b"Content-Type: application/openstack-images-v2.1-json-patch\r\n"
           b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\n"
           b"Proxy-Authorization: Basic eA==\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) +
           b"GET /v2/images?limit=1 HTTP/1.1\r\n" + auth + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"3\r\nabc\r\n0\r\n\r\n")
    status_, _, rest = exchange(url, raw, whole=True)  # both answers, until the close the second asked for
    assert rest.count(b"HTTP/1.1 200 OK") == 1, rest[-500:]
    assert status_ in (400, 404)  # Glance's own answer to that PATCH (the relay shows it got there)
    seen = relay.requests()
    assert [(r[0], r[1]) for r in seen] == [(b"PATCH", b"/v2/images/" + bogus), (b"GET", b"/v2/images?limit=1")], seen
    assert seen[0][3] == body and seen[1][3] == b"abc"
    names = {k for r in seen for k, _ in r[2]}
    assert not names & {b"x-hop", b"keep-alive", b"te", b"upgrade", b"proxy-authorization"}, names
    # the only Connection header Glance sees is imgfs's own client's, for its own pooled connection
    assert {v for r in seen for k, v in r[2] if k == b"connection"} <= {b"keep-alive"}
    assert glance_api("GET", f"/v2/images/{img['id']}").json()["status"] == "active"
    assert "Traceback" not in m.log()


# ---- slow clients --------------------------------------------------------------------------------------

def test_slow_clients_are_closed_at_the_deadline_while_downloads_go_on(tmp_path, lab, glance_api, images, mounter):
    img, data = images(4 * MiB)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None, image_api_header_timeout=2,
                                  image_api_client_timeout=3)
    wait_listed(m, img["id"])
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    drips = []
    for _ in range(100):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET /v2/images HTTP/1.1\r\nHost: imgfs\r\n")
        drips.append(s)
    body_drip = socket.create_connection((host, port), timeout=10)
    body_drip.sendall(b"PUT /v2/images/" + str(uuid.uuid4()).encode() + b"/file HTTP/1.1\r\nHost: imgfs\r\n"
                      b"X-Auth-Token: " + glance_api.token.encode() + b"\r\nContent-Length: 1048576\r\n\r\nab")
    began = time.monotonic()
    closed: dict[int, float] = {}
    ep = glance_api.to(url)
    while len(closed) < len(drips) and time.monotonic() - began < 20:
        for i, s in enumerate(drips):
            if i in closed:
                continue
            try:
                s.sendall(b"X-Drip: 1\r\n")
                s.setblocking(False)
                try:
                    answer = s.recv(100)
                except BlockingIOError:
                    answer = None
                s.setblocking(True)
                if answer is not None:
                    closed[i] = time.monotonic() - began
                    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
            except OSError:
                closed[i] = time.monotonic() - began
        t = time.monotonic()
        r = ep("GET", f"/v2/images/{img['id']}/file")  # a legitimate client is served throughout
        assert r.status_code == 200 and r.content == data and time.monotonic() - t < 5
        time.sleep(0.5)
    assert len(closed) == len(drips) and max(closed.values()) < 8, sorted(closed.values())[-5:]
    wait_for(lambda: status(sock)["image_api"]["http"]["timeouts"].get("body") == 1, 15, "the stalled body closed")
    http = status(sock)["image_api"]["http"]
    assert http["timeouts"]["head"] == 100 and http["connections"] <= 1, http
    for s in drips + [body_drip]:
        s.close()
    assert "Traceback" not in m.log()


# ---- generated requests, compared with Glance ---------------------------------------------------------

METHODS = ["GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "POST", "TRACE", "get", "FOO", "G\x00T"]
SAFE = {"GET", "HEAD", "OPTIONS", "TRACE", "get", "FOO", "G\x00T"}
RANGES = ["bytes=0-0", "bytes=-1", "bytes=5-", "bytes=0-1,3-4", "bytes=x", "bytes=99999999999-", "bytes=-0",
          "bytes= 0-1", "items=0-1", "bytes=1048000-1048599", "bytes=10-5", "bytes=0-99999999999999999999"]


@st.composite
def hostile_request(draw, image_id: str, token: str):
    bogus = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
    who = draw(st.sampled_from(["token", "none", "bad", "two"]))
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from([
        f"/v2/images/{image_id}/file", f"/v2/images/{image_id}", f"/v2/images/{bogus}/file", "/v2/images?limit=1",
        "/v2/images/" + "a" * draw(st.sampled_from([100, 5000, 9000, 70000])) + "/file",
        "/v2/images/%2e%2e/%2e%2e/etc/passwd", "/v2/images/../../../etc/passwd", f"/v2/images/{image_id}%00/file",
        "/v2/images/\u00e9\u4e2d/file", "/v2/images/%ff%fe/file", "*", "http://elsewhere/v2/images", "/",
        f"/v2/images/{image_id}/file?x=" + "%" * 3, f"//v2//images//{image_id}//file", "/v2/images/%00",
    ]))
    if who in ("token", "two") and method not in SAFE:  # nothing destructive reaches Glance with a real token
        path = f"/v2/images/{bogus}/file"
    headers: list[tuple[str, str]] = [("Host", "imgfs")]
    if who == "token":
        headers.append(("X-Auth-Token", token))
    elif who == "bad":
        headers.append(("X-Auth-Token", "gAAAAA" + "x" * 180))
    elif who == "two":
        headers += [("X-Auth-Token", token), ("X-Auth-Token", "not-a-token")]
    for extra in draw(st.lists(st.sampled_from([
        "range", "range2", "huge", "bigline", "folded", "content-range", "expect", "conn-upgrade", "accept",
        "dup-host", "empty-value", "space-name", "unicode-value", "if-range"]), max_size=4, unique=True)):
        if extra in ("range", "range2"):
            headers.append(("Range", draw(st.sampled_from(RANGES))))
        elif extra == "huge":
            headers += [(f"X-Pad-{i}", "p" * 8000) for i in range(draw(st.integers(1, 10)))]
        elif extra == "bigline":
            headers.append(("X-Big", "b" * draw(st.sampled_from([15000, 20000, 100_000]))))
        elif extra == "folded":
            headers.append(("X-Folded", "a\r\n b"))
        elif extra == "content-range":
            headers.append(("Content-Range", "bytes 0-0/1"))
        elif extra == "expect":
            headers.append(("Expect", "100-continue"))
        elif extra == "conn-upgrade":
            headers += [("Connection", "Upgrade"), ("Upgrade", "h2c")]
        elif extra == "accept":
            headers.append(("Accept", "application/json"))
        elif extra == "dup-host":
            headers.append(("Host", "other"))
        elif extra == "empty-value":
            headers.append(("X-Empty", ""))
        elif extra == "space-name":
            headers.append(("X Space", "v"))
        elif extra == "unicode-value":
            headers.append(("X-Uni", "\u00e9"))
        elif extra == "if-range":
            headers.append(("If-Range", '"x"'))
    body = draw(st.binary(max_size=2000)) if method not in ("GET", "HEAD") or draw(st.booleans()) else b""
    framing = draw(st.sampled_from(["length", "none", "chunked", "both", "wrong-length", "te-identity"]))
    head = f"{method} {path} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
    for k, v in headers:
        head += k.encode() + b": " + v.encode("utf-8") + b"\r\n"
    if framing == "length" or framing == "wrong-length":
        head += b"Content-Length: %d\r\n" % (len(body) + (7 if framing == "wrong-length" else 0))
        payload = body
    elif framing == "chunked":
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        head += b"Transfer-Encoding: chunked\r\n"
    elif framing == "both":
        head += b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(body)
        payload = b"0\r\n\r\n"
    elif framing == "te-identity":
        head += b"Transfer-Encoding: identity\r\n"
        payload = body
    else:
        payload = b""
    # A body shorter than its Content-Length: the client then ends its side, as a client that gave up would.
    return head + b"Connection: close\r\n\r\n" + payload, framing == "wrong-length"


def expected_slice(data: bytes, status: int, headers: dict[bytes, bytes]) -> bytes:
    if status == 200:
        return data
    m = re.match(rb"bytes (\d+)-(\d+)/(\d+)", headers[b"content-range"])
    assert m and int(m[3]) == len(data), headers
    return data[int(m[1]):int(m[2]) + 1]


def test_generated_hostile_requests_never_get_a_500_glance_would_not_give(tmp_path, lab, glance_api, images, mounter):
    img, data = images(MiB + 5)
    m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None)
    wait_listed(m, img["id"])
    glance = lab["glance"]["endpoint"]
    token = token_of(lab, "imgfs")
    seen: dict[tuple[int, int], int] = {}

    @settings(max_examples=int(os.environ.get("IMGFS_HOSTILE_EXAMPLES", "300")), derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(request=hostile_request(img["id"], token))
    def check(request: tuple[bytes, bool]) -> None:
        raw, gave_up = request
        ours = exchange(url, raw, half_close=gave_up)
        theirs = exchange(glance, raw, half_close=gave_up)
        seen[(ours[0], theirs[0])] = seen.get((ours[0], theirs[0]), 0) + 1
        assert ours[0] != 0 or gave_up, f"imgfs closed without an answer to {raw[:300]!r}"
        assert ours[0] != 500 or theirs[0] == 500, f"imgfs 500, Glance {theirs[0]} for {raw[:300]!r}: {ours[2][:300]!r}"
        if ours[0] in (200, 206) and raw.startswith(b"GET /v2/images/" + img["id"].encode() + b"/file "):
            want = expected_slice(data, ours[0], ours[1])
            # exact; or, for a client that gave up and half-closed, cut short (a prefix), never other bytes
            assert ours[2] == want or (gave_up and want.startswith(ours[2])), f"wrong bytes for {raw[:300]!r}"

    check()
    print("\n(imgfs status, Glance status): count", dict(sorted(seen.items())))
    log = m.log()
    assert "Traceback" not in log, log[-3000:]
    assert status(sock)["image_api"]["http"]["app_errors"] == 0
    # the daemon is still whole: a normal download after all of that
    r = glance_api.to(url)("GET", f"/v2/images/{img['id']}/file")
    assert r.status_code == 200 and r.content == data


# ---- memory under many downloads ------------------------------------------------------------------------

def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _download_all(url: str, token: str, image_id: str, n: int) -> tuple[list[str], float]:
    digests: list[str] = []

    def one():
        r = requests.get(f"{url}/v2/images/{image_id}/file", headers={"X-Auth-Token": token}, stream=True, timeout=120)
        h = hashlib.sha512()
        for piece in r.iter_content(1024 * 1024):
            h.update(piece)
        digests.append(h.hexdigest())

    began = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return digests, time.monotonic() - began


def test_twenty_concurrent_downloads_peak_within_one_and_a_half_times_one(tmp_path, lab, glance_api, images, mounter):
    """Cold, full downloads of one image with the default chunk size: one alone, then 20 at once on a
    fresh daemon; every body's sha512 is Glance's; the daemon's peak RSS (VmHWM) is compared."""
    img, data = images(96 * MiB)
    peaks, walls = [], []
    for n, name in ((1, "one"), (20, "twenty")):
        m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None, chunk_size_mb=8,
                                      cache_dir=tmp_path / f"cache-{name}")
        wait_listed(m, img["id"])
        digests, wall = _download_all(url, glance_api.token, img["id"], n)
        assert digests == [img["os_hash_value"]] * n
        peaks.append(_peak_rss(m.proc.pid))
        walls.append(wall)
        assert m.stop() == 0
    print(f"\npeak RSS: one download {peaks[0] / MiB:.0f} MiB ({walls[0]:.1f} s), 20 concurrent "
          f"{peaks[1] / MiB:.0f} MiB ({walls[1]:.1f} s, {20 * len(data) / MiB / walls[1]:.0f} MiB/s in all): "
          f"{peaks[1] / peaks[0]:.2f}x")
    assert peaks[1] <= 1.5 * peaks[0], (peaks, walls)


# ---- Glance silent or hanging up -----------------------------------------------------------------------

class FakeUpstream(Listener):
    """In Glance's place: takes each request and then says nothing (``silent``) or closes the connection
    without a word."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        self.held: list[socket.socket] = []
        super().__init__()

    def take(self, conn: socket.socket) -> None:
        conn.recv(65536)
        if self.silent:
            self.held.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        super().close()
        for c in self.held:
            c.close()


@pytest.mark.parametrize("silent, expected", [(True, 504), (False, 502)])
def test_glance_silent_is_504_and_glance_hanging_up_is_502(tmp_path, lab, glance_api, mounter, silent, expected):
    upstream = FakeUpstream(silent)
    try:
        m, url, sock = start_endpoint(mounter, tmp_path, lab, proxy=None, image_api_upstream=upstream.url,
                                      image_api_upstream_timeout=2)
        for path in ("/v2/images", f"/v2/images/{uuid.uuid4()}/file"):
            began = time.monotonic()
            r = glance_api.to(url)("GET", path)
            took = time.monotonic() - began
            assert r.status_code == expected, (path, r.status_code, r.text)
            assert r.text.count("\n") == 1 and r.text.startswith("imgfs: Glance at ")
            assert (1.5 < took < 8) if silent else took < 5, took
        assert status(sock)["image_api"]["upstream_errors"] == {str(expected): 2}
        assert "Traceback" not in m.log()
    finally:
        upstream.close()
