"""A small fleet on one machine, for the fleet tests and bench/run-fleet: N nodes, each an imgfs daemon
and its own nginx (Debian's, configured by 'imgfs fleet render') in a network namespace of its own,
joined by a bridge in a "switch" namespace, with the origin (moto's S3 server) in another namespace.

- Addresses are 198.18.0.0/24 (RFC 2544's benchmarking range), inside namespaces this module creates,
  with no default route anywhere: nothing here can reach, or be reached from, any other network.
- Processes enter only the network namespace (nsenter --net), so each node's FUSE mount is visible
  to the test, and each node's loopback (its nginx's local port, its gateway) is its own.
- The origin's bytes are counted by its interface's counters (tx_bytes), not by any engine.
- Certificates come from a CA made here (openssl), as a deployment's PKI would issue them; an
  "outsider" certificate comes from another CA.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import wait_for as wait_until  # the suite's one bounded wait

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv/bin/python")
SUBNET = "198.18.0"
ORIGIN_IP = f"{SUBNET}.254"
ORIGIN_PORT = 5000
MESH_PORT = 8443
PEER_NAME = "imgfs-mesh"
ACCESS_KEY, SECRET_KEY = "AKIAFLEETTEST0000001", "fleet-test-secret-9d8f7a6s5d4f"


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=120, **kw)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
        "-out", str(crt), "-days", "30", "-subj", f"/CN={name}")
    return key, crt


def issue(directory: Path, ca: tuple[Path, Path], name: str, ip: str) -> tuple[Path, Path]:
    key, csr, crt = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
        "-out", str(csr), "-subj", f"/CN={name}")
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{PEER_NAME},IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
        "-out", str(crt), "-days", "30", "-extfile", str(ext))
    return key, crt


@dataclass(eq=False)  # one node is one object: hashable by identity
class Node:
    index: int
    ns: str
    ip: str
    dir: Path
    conf: Path
    mnt: Path
    imgfs: subprocess.Popen | None = None
    nginx: subprocess.Popen | None = None

    @property
    def images(self) -> Path:
        return self.mnt / "images"

    def log(self) -> str:
        return (self.dir / "imgfs.log").read_text(errors="replace")

    def nginx_log(self) -> str:
        return (self.dir / "nginx.log").read_text(errors="replace")

    def status(self) -> dict:
        out = run(PYTHON, "-m", "imgfs", "status", "--json", "--socket", str(self.dir / "control.sock")).stdout
        return json.loads(out)


@dataclass
class Fleet:
    root: Path
    prefix: str
    nodes: list[Node] = field(default_factory=list)
    origin: subprocess.Popen | None = None
    bucket: str = "glance"
    namespaces: list[str] = field(default_factory=list)
    helpers: list[subprocess.Popen] = field(default_factory=list)  # proxies and bridges, stopped at close
    origin_front: subprocess.Popen | None = None
    ca: tuple[Path, Path] | None = None  # (key, certificate) of the fleet's CA

    # ---- network ------------------------------------------------------------------------------------

    def netns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def wire(self, ns: str, ip: str, dev: str, rate: str | None = None) -> None:
        """A veth from ``ns`` to the switch's bridge, with ``ip``; ``rate`` shapes what ``ns`` sends."""
        run("ip", "-n", self.switch, "link", "add", f"{dev}-br", "type", "veth", "peer", "name", dev, "netns", ns)
        run("ip", "-n", self.switch, "link", "set", f"{dev}-br", "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        run("ip", "-n", ns, "link", "set", dev, "up")
        if rate:
            run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms")
        routes = run("ip", "-n", ns, "route", "show", "default").stdout.strip()
        assert not routes, f"{ns} has a default route: {routes}"

    def origin_tx(self) -> int:
        """Bytes the origin has sent, from its interface's own counter."""
        return self.tx(f"{self.prefix}-origin", "vo")

    def tx(self, ns: str, dev: str) -> int:
        info = json.loads(run("ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)
        return int(info[0]["stats64"]["tx"]["bytes"])

    def in_ns(self, ns: str, *cmd: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", *cmd]

    # ---- the origin ---------------------------------------------------------------------------------

    def start_origin(self, rate: str | None = None, front: list[str] | None = None) -> None:
        """moto on the origin's address; with ``front`` (tests.s3proxy's options), moto on the namespace's
        loopback and a fault-injecting proxy on the origin's address in front of it."""
        ns = self.netns("origin")
        self.wire(ns, ORIGIN_IP, "vo", rate)
        log = open(self.root / "origin.log", "wb")
        host, port = (ORIGIN_IP, ORIGIN_PORT) if front is None else ("127.0.0.1", ORIGIN_PORT + 1)
        self.origin = subprocess.Popen(self.in_ns(ns, PYTHON, "-m", "moto.server", "-H", host, "-p", str(port)),
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if front is not None:
            self.origin_front = self.proxy(ns, f"{ORIGIN_IP}:{ORIGIN_PORT}", f"http://{host}:{port}", front, "origin-front")
        self.s3("import sys", "for _ in range(200):\n    try:\n        s3.list_buckets(); break\n    except Exception:\n"
                "        import time; time.sleep(0.05)\ns3.create_bucket(Bucket=BUCKET)")

    def proxy(self, ns: str, listen: str, upstream: str, options: list[str], name: str) -> subprocess.Popen:
        """A tests.s3proxy process in ``ns``: SIGUSR1 starts its fault."""
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(self.in_ns(ns, PYTHON, "-m", "tests.s3proxy", "--listen", listen, "--upstream", upstream, *options),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        self.helpers.append(proc)
        port = int(listen.rsplit(":", 1)[1])
        wait_until(lambda: proc.poll() is not None or self._listening_ns(ns, port), 20, name)
        assert proc.poll() is None, (self.root / f"{name}.log").read_text()
        return proc

    def s3(self, *lines: str) -> str:
        """Run boto3 code against the origin from inside its namespace (the test's own has no route there)."""
        code = textwrap.dedent(f"""
            import boto3
            s3 = boto3.client("s3", endpoint_url="http://{ORIGIN_IP}:{ORIGIN_PORT}", aws_access_key_id="{ACCESS_KEY}",
                              aws_secret_access_key="{SECRET_KEY}", region_name="us-east-1")
            BUCKET = "{self.bucket}"
        """) + "\n".join(lines)
        return run(*self.in_ns(f"{self.prefix}-origin", PYTHON, "-c", code)).stdout

    def put(self, key: str, path: Path) -> str:
        return self.s3(f"s3.upload_file({str(path)!r}, BUCKET, {key!r})",
                       f"print(s3.head_object(Bucket=BUCKET, Key={key!r})['ETag'].strip('\"'))").strip()

    # ---- nodes --------------------------------------------------------------------------------------

    def add_node(self, index: int, ca: tuple[Path, Path], *, chunk_mb: int, members: list[str], rate: str | None = None,
                 min_image_mb: int = 1, extra: str = "", fleet: bool = True, imgfs_extra: str = "",
                 mesh_timeout: float = 10) -> Node:
        ns = self.netns(f"n{index}")
        ip = f"{SUBNET}.{index}"
        self.wire(ns, ip, f"v{index}", rate)
        d = self.root / f"node{index}"
        d.mkdir()
        key, crt = issue(d, ca, f"node{index}", ip)
        mnt = d / "mnt"
        mnt.mkdir()
        conf = d / "imgfs.conf"
        conf.write_text(textwrap.dedent(f"""\
            [DEFAULT]
            enabled_backends = s3store:s3
            [glance_store]
            default_backend = s3store
            [s3store]
            s3_store_host = http://{ORIGIN_IP}:{ORIGIN_PORT}
            s3_store_access_key = {ACCESS_KEY}
            s3_store_secret_key = {SECRET_KEY}
            s3_store_bucket = {self.bucket}
            s3_store_bucket_url_format = path
            [imgfs]
            cache_dir = {d / 'cache'}
            chunk_size_mb = {chunk_mb}
            refresh_interval = 60
            control_socket = {d / 'control.sock'}
            @IMGFS_EXTRA@
            [fleet]
            enabled = {'true' if fleet else 'false'}
            mesh_listen = {ip}:{MESH_PORT}
            members = {", ".join(members)}
            certfile = {crt}
            keyfile = {key}
            cafile = {ca[1]}
            secret_file = {d / 'mesh' / 'gateway.secret'}
            nginx_dir = {d / 'mesh'}
            cache_path = {d / 'mesh-cache'}
            run_dir = {d / 'run'}
            access_log = {d / 'mesh-access.log'}
            min_image_mb = {min_image_mb}
            timeout = {mesh_timeout:g}
        """).replace("@IMGFS_EXTRA@\n", imgfs_extra.strip() + "\n" if imgfs_extra.strip() else "") + extra)
        node = Node(index, ns, ip, d, conf, mnt)
        self.nodes.append(node)
        return node

    def set_members(self, node: Node, members: list[str]) -> None:
        """A membership change as a deployment makes it: the list rewritten, rendered, nginx reloaded."""
        text = re.sub(r"(?m)^members = .*$", "members = " + ", ".join(members), node.conf.read_text())
        node.conf.write_text(text)
        self.render(node)
        if node.nginx is not None and node.nginx.poll() is None:
            node.nginx.send_signal(signal.SIGHUP)  # nginx's reload: new workers, the old ones finish theirs

    def render(self, node: Node) -> None:
        # in the node's namespace: nginx -t binds the addresses it checks
        run(*self.in_ns(node.ns, PYTHON, "-m", "imgfs", "fleet", "render", "--config-file", str(node.conf), "--workers", "1",
                       "--worker-user", "root"))  # the test tree is root's alone (0700)

    def start_nginx(self, node: Node, conf: Path | None = None) -> None:
        if conf is None:
            self.render(node)
            conf = node.dir / "mesh" / "nginx.conf"
        log = open(node.dir / "nginx.log", "ab")
        node.nginx = subprocess.Popen(self.in_ns(node.ns, "nginx", "-c", str(conf), "-g", "daemon off;"),
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: node.nginx.poll() is not None or self._listening(node, 8085), 20, f"node{node.index}'s nginx")
        assert node.nginx.poll() is None, node.nginx_log()

    def _listening(self, node: Node, port: int) -> bool:
        return self._listening_ns(node.ns, port)

    def _listening_ns(self, ns: str, port: int) -> bool:
        out = run(*self.in_ns(ns, "ss", "-Htln", f"sport = :{port}"), check=False).stdout
        return bool(out.strip())

    def start_imgfs(self, node: Node, fleet_on: bool = True) -> None:
        log = open(node.dir / "imgfs.log", "ab")
        node.imgfs = subprocess.Popen(self.in_ns(node.ns, PYTHON, "-m", "imgfs", "mount", str(node.mnt), "--config-file", str(node.conf)),
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: node.imgfs.poll() is not None or "mounted " in node.log(), 60, f"node{node.index}'s mount")
        assert node.imgfs.poll() is None, node.log()
        if fleet_on:
            wait_until(lambda: "fleet: reading chunks through the mesh" in node.log() or "fleet: cannot" in node.log(), 20,
                       f"node{node.index}'s gateway")

    def stop(self, proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def close(self) -> None:
        for node in self.nodes:
            self.stop(node.imgfs)
            self.stop(node.nginx, signal.SIGQUIT)
            subprocess.run(["fusermount3", "-uz", str(node.mnt)], capture_output=True)
        for proc in self.helpers:
            self.stop(proc)
        self.stop(self.origin)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"


def new_fleet(root: Path, n: int, *, chunk_mb: int = 4, origin_rate: str | None = None, node_rate: str | None = None,
              min_image_mb: int = 1, mode: str = "mesh", nginx_conf=None, imgfs_extra: str = "",
              before_imgfs=None, origin_front: list[str] | None = None,
              mesh_timeout: float = 10) -> tuple[Fleet, tuple[Path, Path]]:
    """N nodes up, the origin up with an empty bucket; the caller closes it. ``mode``: ``mesh`` (imgfs and
    nginx on every node), ``direct`` (imgfs alone, no fleet), ``single`` (every node's nginx sends every
    chunk to node 1: one shared site cache), ``engine``/``engine-*`` (nginx alone, its config from
    ``nginx_conf(fleet, node, members)``: no imgfs). ``imgfs_extra``: more ``[imgfs]`` options (lines);
    ``before_imgfs(fleet)`` runs once the network and the nginx are up, before any imgfs starts;
    ``origin_front``: a fault-injecting proxy in front of the origin (see Fleet.start_origin);
    ``mesh_timeout``: ``[fleet] timeout`` (10 s here, so that a test's dead owner costs little time)."""
    prefix = f"imgfs{uuid.uuid4().hex[:4]}"
    fleet = Fleet(root, prefix)
    try:
        fleet.netns("sw")
        run("ip", "-n", fleet.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", fleet.switch, "link", "set", "br0", "up")
        fleet.start_origin(origin_rate, origin_front)
        ca = fleet.ca = make_ca(root / "pki", "fleet-ca")
        members = [f"{SUBNET}.{i}:{MESH_PORT}" for i in range(1, n + 1)]
        if mode == "single":
            members = members[:1]
        for i in range(1, n + 1):
            fleet.add_node(i, ca, chunk_mb=chunk_mb, members=members, rate=node_rate, min_image_mb=min_image_mb,
                           fleet=mode != "direct", imgfs_extra=imgfs_extra, mesh_timeout=mesh_timeout)
        if mode.startswith("engine"):
            for node in fleet.nodes:
                conf = node.dir / "engine.conf"
                conf.write_text(nginx_conf(fleet, node, members))
                fleet.start_nginx(node, conf)
            return fleet, ca
        if mode != "direct":
            for node in fleet.nodes:
                fleet.start_nginx(node)
        if before_imgfs is not None:
            before_imgfs(fleet)
        for node in fleet.nodes:
            fleet.start_imgfs(node, fleet_on=mode != "direct")
        return fleet, ca
    except BaseException:
        fleet.close()
        raise
