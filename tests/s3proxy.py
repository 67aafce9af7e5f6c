"""A counting, fault-injecting HTTP proxy to put in front of a real S3 server.

Every request imgfs makes is recorded (method, path, Range, status, body bytes), so tests can prove
what reached the store; ``inject()`` makes the next ranged GETs of an object fail the way real S3
endpoints and networks do: an error status, a stall past the client's read timeout, a reset or a
clean close in the middle of the body.

Run as a program (``python -m tests.s3proxy``), it is a process of its own on a given address, as the
fleet bench needs one inside a network namespace: SIGUSR1 starts its ``--fault`` on every ranged GET
for ``--fault-seconds``."""

from __future__ import annotations

import http.client
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int
    at: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class Fault:
    """What to do to matching ranged GETs (or, with ``method``, to any request of that method whose path
    contains ``key``): ``status`` (answer with an S3 error of that HTTP status), ``delay`` (wait
    ``seconds``, then forward),
    ``stall`` (send half the body, then go silent for ``seconds``), ``reset`` (half the body, then a
    TCP RST), ``short`` (half the body, then a clean close: fewer bytes than Content-Length), ``whole``
    (answer 200 without Content-Range, as a server that ignores Range does), ``close`` (answer in full, then
    close the connection without saying so, as a server does to a connection idle too long), ``presigned``
    (answer ``status`` to a request signed in its query, as a server that takes no presigned URLs)."""

    kind: str
    key: str
    count: int | None = None  # how many requests to fail; None: until cleared
    status: int = 503
    seconds: float = 0.0
    method: str | None = None
    hits: int = 0

    def take(self) -> bool:
        if self.count is not None and self.hits >= self.count:
            return False
        self.hits += 1
        return True


_S3_CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


class CountingProxy:
    def __init__(self, upstream: str, tls: ssl.SSLContext | None = None, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        """``tls``: serve HTTPS with this server context (the upstream is still spoken to in HTTP)."""
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.connections = 0  # client connections accepted
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:  # once per connection
                with proxy._lock:
                    proxy.connections += 1
                super().setup()

            def log_message(self, *args):  # quiet
                pass

            def _forward(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault(self.command, self.path, self.headers.get("Range"))
                if fault is not None and fault.kind == "presigned":  # a server that takes no query signatures
                    if "X-Amz-Signature=" not in self.path:
                        fault = None
                    else:
                        self._error(fault.status, arrived)
                        return
                if fault is not None and fault.kind == "status":
                    self._error(fault.status, arrived)
                    return
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                    fault = None
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault is not None and fault.kind == "flip" and data:
                    flipped = bytearray(data)
                    flipped[len(flipped) // 2] ^= 0x01
                    data, fault = bytes(flipped), None
                whole = fault is not None and fault.kind == "whole" and resp.status == 206
                self.send_response(200 if whole else resp.status, "OK" if whole else resp.reason)
                for k, v in resp.getheaders():
                    if whole and k.lower() == "content-range":
                        continue
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                broken = fault is not None and not whole and fault.kind != "close"
                sent = 0 if self.command == "HEAD" else len(data) // 2 if broken else len(data)
                # Recorded before the body goes out: a client that has its bytes must find its request here.
                with proxy._lock:
                    proxy.requests.append(Request(self.command, self.path, self.headers.get("Range"), resp.status, sent, arrived))
                self.end_headers()
                if broken:
                    self._break(fault, data)
                elif self.command != "HEAD":
                    self.wfile.write(data)
                if fault is not None and fault.kind == "close":  # answered in full, then closed unannounced
                    self.close_connection = True

            def _error(self, status: int, arrived: float) -> None:
                code = _S3_CODES.get(status, "InternalError")
                body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                with proxy._lock:
                    proxy.requests.append(Request(self.command, self.path, self.headers.get("Range"), status, 0, arrived))
                self.end_headers()
                self.wfile.write(body)

            def _break(self, fault: Fault, data: bytes) -> None:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if fault.kind == "stall":
                    time.sleep(fault.seconds)
                elif fault.kind == "reset":  # SO_LINGER 0: close() sends RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                if fault.kind != "reset":  # a FIN after a short body: the client sees a clean close
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(listen, Handler)
        self.server.daemon_threads = True
        if tls is not None:
            # the handshake happens in the handler's thread: a client that refuses the certificate
            # must not block the accepting loop
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.url = f"{'https' if tls else 'http'}://{listen[0]}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "CountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def inject(self, kind: str, key: str, **kw) -> Fault:
        fault = Fault(kind, key, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _fault(self, method: str, path: str, range_: str | None) -> Fault | None:
        key = path.split("?")[0].rsplit("/", 1)[-1]
        ranged = method == "GET" and bool(range_)
        with self._lock:
            for fault in self.faults:
                if fault.method is None:
                    matches = ranged and fault.key in ("*", key)
                else:
                    matches = fault.method == method and fault.key in path
                if matches and fault.take():
                    return fault
        return None

    def calls(self, method: str, contains: str = "") -> list[Request]:
        """Every request of ``method`` whose path contains ``contains``, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.method == method and contains in r.path]

    def gets(self, key: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.range and (key is None or r.path.split("?")[0].endswith("/" + key))]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()


def main() -> None:
    import argparse
    import signal

    ap = argparse.ArgumentParser(description="a fault-injecting HTTP proxy, as a process of its own")
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--upstream", required=True, help="http://host:port")
    ap.add_argument("--fault", default="status", help="a Fault kind, for every ranged GET once SIGUSR1 comes")
    ap.add_argument("--status", type=int, default=503)
    ap.add_argument("--fault-seconds", type=float, default=3.0, help="how long the fault lasts; 0: until the end")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    proxy = CountingProxy(args.upstream, listen=(host, int(port)))
    started = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: started.set())
    signal.signal(signal.SIGTERM, lambda *_: proxy.server.shutdown())
    with proxy:
        threading.Thread(target=_fault_when_asked, args=(proxy, started, args), daemon=True).start()
        proxy._thread.join()


def _fault_when_asked(proxy: CountingProxy, started: threading.Event, args) -> None:
    started.wait()
    fault = proxy.inject(args.fault, "*", status=args.status)
    if args.fault_seconds:
        time.sleep(args.fault_seconds)
        proxy.clear()
    print(f"fault {args.fault}: {fault.hits} requests", flush=True)


if __name__ == "__main__":
    main()
