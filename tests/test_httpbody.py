"""Bodies received in place (imgfs.httpbody), against a real HTTP server on loopback and the urllib3 we pin."""

from __future__ import annotations

import gzip
import http.server
import os
import threading
import time

import pytest
import urllib3

from imgfs import httpbody

BODY = os.urandom(3 * (1 << 20) + 12345)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/gzip":
            data = gzip.compress(BODY)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
        else:
            data = BODY
            self.send_response(200)
        self.send_header("Content-Length", str(len(BODY) if self.path == "/short" else len(data)))
        self.end_headers()
        if self.path == "/stall":
            self.wfile.write(data[:1000])
            self.wfile.flush()
            time.sleep(2)
            return
        if self.path == "/short":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def fetch(pool: urllib3.HTTPConnectionPool, path: str) -> tuple[urllib3.BaseHTTPResponse, bytearray, int]:
    r = pool.request("GET", path, preload_content=False)
    buf = bytearray(len(BODY) + 10)
    view, got = memoryview(buf), 0
    while True:
        n = httpbody.readinto(r, view[got:got + (1 << 20)])
        if not n:
            break
        got += n
    return r, buf, got


def test_the_pinned_urllib3_takes_the_direct_path_and_never_its_copying_readinto(server, monkeypatch):
    def copying(self, b):
        raise AssertionError("urllib3's copying readinto was used")

    monkeypatch.setattr(urllib3.response.HTTPResponse, "readinto", copying)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server, maxsize=1, block=True, retries=False)
    for _ in range(2):
        r, buf, got = fetch(pool, "/plain")
        assert httpbody.direct_path(r)
        assert got == len(BODY) and bytes(buf[:got]) == BODY
        assert r.tell() == len(BODY)  # urllib3's own count kept
        r.release_conn()
    assert pool.num_connections == 1, "the connection was not reused after a body read in place"


def test_an_encoded_body_goes_through_urllib3_and_is_decoded(server):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server, retries=False)
    r, buf, got = fetch(pool, "/gzip")
    assert not httpbody.direct_path(r)
    assert got == len(BODY) and bytes(buf[:got]) == BODY


def test_a_stalled_body_raises_urllib3s_read_timeout(server):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server, retries=False, timeout=urllib3.Timeout(read=0.3))
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        fetch(pool, "/stall")
    assert pool.num_connections == 1 and pool.pool.qsize() == 1  # dropped, its slot given back


def test_a_body_cut_short_is_urllib3s_protocol_error_never_a_quiet_end(server):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server, retries=False)
    with pytest.raises(urllib3.exceptions.ProtocolError, match="IncompleteRead"):
        fetch(pool, "/short")


def test_after_the_whole_body_urllib3_reads_nothing_more_and_raises_nothing(server):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server, retries=False)
    r, buf, got = fetch(pool, "/plain")
    assert got == len(BODY) and r.length_remaining == 0
    assert r.read(1) == b""  # the mesh's "a longer body is a lie" probe
