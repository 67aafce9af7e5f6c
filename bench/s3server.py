"""s3rver (npm) as the loopback S3 backend, plus backend byte/CPU counters.

Backend bytes are measured as the delta of s3rver's ``wchar`` in
``/proc/<pid>/io`` (bytes the node process wrote with write()/writev()/send(),
i.e. the HTTP responses put on the sockets) minus the growth of its log file
(its only other writes while serving GETs; ~100 bytes per request anyway).
Reading the counter costs the server nothing.  bench.py validates the method
with one plain curl GET of the object (expect 1.000x + headers) and shows the
ratio for one cold sequential dd per system.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from procs import BenchError, clean_env, log, proc_cpu_s, proc_io, spawn, stop, tail, wait_for

S3RVER_VERSION = "3.7.1"
ACCESS_KEY = SECRET_KEY = "S3RVER"
BUCKET = "glance"


def ensure_s3rver(prefix: Path) -> Path:
    """npm-install s3rver into prefix/node_modules if missing; return its bin script."""
    script = prefix / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if not script.exists():
        if not shutil.which("npm"):
            raise BenchError("npm not found (apt-get install nodejs npm)")
        log(f"installing s3rver@{S3RVER_VERSION} into {prefix}/node_modules")
        prefix.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                            f"s3rver@{S3RVER_VERSION}"], capture_output=True, text=True)
        if r.returncode != 0 or not script.exists():
            raise BenchError(f"npm install s3rver failed:\n{r.stdout}\n{r.stderr}")
    return script


class S3rver:
    def __init__(self, script: Path, data_dir: Path, log_path: Path):
        self.script, self.data_dir, self.log_path = script, data_dir, log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():
            self.log_path.unlink()
        # port 0: the kernel picks a free port, s3rver prints it
        self.proc = spawn("s3rver", ["node", str(self.script), "-d", str(self.data_dir),
                                     "-a", "127.0.0.1", "-p", "0",
                                     "--configure-bucket", BUCKET],
                          self.log_path, env=clean_env())
        rx = re.compile(r"S3rver listening on 127\.0\.0\.1:(\d+)")

        def ready():
            m = rx.search(self.log_path.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
            return m is not None
        wait_for(ready, 30, "s3rver start", self.proc, self.log_path)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def upload(self, path: Path, key: str) -> float:
        from boto3.s3.transfer import TransferConfig
        import os
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            os.environ.pop(k)   # AWS_CA_BUNDLE etc. must not leak into boto3 either
        s3 = self.client()
        size = path.stat().st_size
        t0 = time.monotonic()
        # one plain PUT (no multipart) so the object looks like Glance's small-image path
        s3.upload_file(str(path), BUCKET, key, Config=TransferConfig(multipart_threshold=size + 1))
        dt = time.monotonic() - t0
        head = s3.head_object(Bucket=BUCKET, Key=key)
        if head["ContentLength"] != size:
            raise BenchError(f"uploaded object has size {head['ContentLength']}, expected {size}")
        return dt

    # ---- counters -------------------------------------------------------
    def counters(self) -> tuple[int, float]:
        """(socket bytes, cpu seconds) of the s3rver process: wchar minus what
        it wrote to its own log file (stdout/stderr -> log file)."""
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("s3rver is not running" + tail(self.log_path))
        io = proc_io(self.pid)["wchar"]
        return io - self.log_path.stat().st_size, proc_cpu_s(self.pid)


class BackendMeter:
    """Context manager: backend bytes and s3rver CPU seconds during a block."""

    def __init__(self, srv: S3rver):
        self.srv = srv
        self.bytes = 0
        self.cpu_s = 0.0

    def __enter__(self):
        self._w0, self._c0 = self.srv.counters()
        return self

    def __exit__(self, *exc):
        w1, c1 = self.srv.counters() if exc[0] is None else (self._w0, self._c0)
        self.bytes = w1 - self._w0
        self.cpu_s = c1 - self._c0
        return False


def backend_ceiling(srv: S3rver, key: str, size: int, streams: int) -> tuple[float, float]:
    """(MB/s, backend bytes/size) of plain curl GETs (1 stream, or `streams`
    ranged GETs in parallel) to /dev/null: what s3rver itself can serve on this
    machine right now; the ratio validates the backend-bytes method."""
    url = f"{srv.endpoint}/{BUCKET}/{key}"
    part = size // streams
    procs = []
    meter = BackendMeter(srv).__enter__()
    t0 = time.monotonic()
    for i in range(streams):
        lo = i * part
        hi = size - 1 if i == streams - 1 else (i + 1) * part - 1
        procs.append(subprocess.Popen(["curl", "-sf", "-o", "/dev/null", "-r", f"{lo}-{hi}", url],
                                      env=clean_env()))
    try:
        for p in procs:
            if p.wait(300) != 0:
                raise BenchError(f"curl GET {url} failed ({p.returncode})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    dt = time.monotonic() - t0
    meter.__exit__(None, None, None)
    return size / dt / 1e6, meter.bytes / size
