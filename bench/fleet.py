"""bench/run-fleet: N nodes fetch one image at once, by each way of doing it, in one run.

Every node is a network namespace (tests/fleetlab.py): its imgfs and its nginx, joined by a bridge; the
origin (moto's S3 server) in a namespace of its own behind a link shaped with tc (1 Gbit/s by default),
the node links unshaped. Measured from outside every engine: the origin's bytes from its interface
counter, each node's egress from its own, CPU seconds from /proc for every process of every node.

Modes, side by side at each N:
- direct: today's imgfs, every node from the origin;
- mesh: fleet mode (the consistent-hash nginx mesh, owners' caches, origin gateways);
- single: one shared site cache (every node's nginx sends every chunk to node 1);
- engine: the same nginx mesh alone, each node fetching the object with curl through its own nginx
  (owners' caches in front of the origin directly, the same mutual TLS between nodes, no imgfs): the
  engine's own limit, the row the others are compared with;
- engine-plain: the same, with plain HTTP between nodes: what TLS costs the engine.
Workloads, each on a fleet started afresh: all N nodes 'imgfs warm' the image at once; all N read it
through the mount (sha256sum); all N download it through their node-local Image API endpoint (curl with
a user's token | sha256sum).
The endpoint workload needs the lab (tests/lab/up): the real Glance authorizes every download and gives
the digest the endpoint checks. The image is uploaded to that Glance and the same bytes put at the
origin under Glance's image id; each namespace reaches Glance through a socat bridge over a Unix socket
(the lab listens on the root namespace's loopback only), so no new address is ever opened.
Faults (mesh, N=8): an owner's nginx killed at 30%, an owner blackholed at 30%, a ninth node joining at 30%
(members rewritten and every nginx reloaded; the new node reads too), an origin 503 storm at 30% (every
ranged GET answered 503 SlowDown for 3 s, by a proxy in front of the origin), and, with the lab, an
owner that flips a bit in everything it serves (a proxy between its nginx and its gateway) under the
endpoint workload, after the image's first boot on one node stored its chunk sums (that node and the
liar do not read in the round): a download the digest refuses is tried once more, as a consumer would,
and a complete download with wrong bytes is counted apart ("wrong").

Every node's sha256 is checked. Prints a table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procs import drop_caches  # noqa: E402
from tests.imageapi import token_of  # noqa: E402
from tests.fleetlab import MESH_PORT, ORIGIN_IP, ORIGIN_PORT, PEER_NAME, PYTHON, REPO, Fleet, new_fleet, run  # noqa: E402

MiB = 1 << 20
ENDPOINT_PORT = 9393  # each node's Image API endpoint, on its own loopback
GATEWAY_PORT = 8089  # [fleet] gateway_port's default: a flipping proxy goes in front of it
FLIP_PORT = 8090


class LabGlance:
    """The lab's real Glance (tests/lab): a user's token, one image uploaded, a bridge for namespaces."""

    def __init__(self, lab: dict) -> None:
        self.token = token_of(lab, "imgfs")
        self.endpoint = lab["glance"]["endpoint"].rstrip("/")
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.images: list[str] = []

    def upload(self, path: Path) -> str:
        import requests

        h = {"X-Auth-Token": self.token}
        img = requests.post(f"{self.endpoint}/v2/images", headers=h, timeout=60,
                            json={"name": "imgfs-fleet-bench", "disk_format": "raw", "container_format": "bare"}).json()
        self.images.append(img["id"])
        with open(path, "rb") as f:
            r = requests.put(f"{self.endpoint}/v2/images/{img['id']}/file", data=f, timeout=600,
                             headers={**h, "Content-Type": "application/octet-stream"})
        r.raise_for_status()
        return img["id"]

    def close(self) -> None:
        import requests

        for image_id in self.images:
            requests.delete(f"{self.endpoint}/v2/images/{image_id}", headers={"X-Auth-Token": self.token}, timeout=60)

    def bridge(self, fleet: Fleet) -> None:
        """Each node's 127.0.0.1:<Glance's port> leads to the lab's Glance, through a Unix socket."""
        sock = fleet.root / "glance.sock"
        fleet.helpers.append(subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork,mode=600", f"TCP:127.0.0.1:{self.port}"],
                                              start_new_session=True))
        for node in fleet.nodes:
            fleet.helpers.append(subprocess.Popen(fleet.in_ns(node.ns, "socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
                                                              f"UNIX-CONNECT:{sock}"), start_new_session=True))
        for node in fleet.nodes:
            wait_listening(fleet, node.ns, self.port)


def wait_listening(fleet: Fleet, ns: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not fleet._listening_ns(ns, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port} in {ns}")
        time.sleep(0.05)


def engine_conf(fleet: Fleet, node, members: list[str], chunk: int, tls: bool) -> str:
    """Stock nginx alone: the front slices the object and hashes each slice to an owner, whose cache and
    cache lock sit in front of the origin. ``tls``: between nodes, the same mutual TLS as fleet mode's
    mesh (its certificates, protocols and session reuse); else plain HTTP."""
    scheme = "https" if tls else "http"
    servers = "\n".join(f"        server {m.split(':')[0]}:{MESH_PORT + 1} max_fails=1 fail_timeout=10s;" for m in members)
    cache = node.dir / "engine-cache"
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    key, crt, ca = node.dir / f"node{node.index}.key", node.dir / f"node{node.index}.crt", fleet.ca[1]
    client_tls = f"""
            proxy_ssl_certificate {crt};
            proxy_ssl_certificate_key {key};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name {PEER_NAME};
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;""" if tls else ""
    server_tls = f"""
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:engine_tls:8m;""" if tls else ""
    return f"""user root;
worker_processes 1;
pid {node.dir}/engine.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    proxy_temp_path {cache}/tmp;
    client_body_temp_path {cache}/tmp;
    proxy_cache_path {cache}/chunks levels=1:2 keys_zone=engine:32m max_size=10g inactive=1h use_temp_path=off;
    upstream owners {{
        hash $uri$slice_range consistent;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:8085;
        location / {{
            slice {chunk};
            proxy_set_header Range $slice_range;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{client_tls}
            proxy_pass {scheme}://owners;
        }}
    }}
    server {{
        listen {node.ip}:{MESH_PORT + 1}{" ssl" if tls else ""};{server_tls}
        location / {{
            proxy_cache engine;
            proxy_cache_key $uri$http_range;
            proxy_set_header Range $http_range;  # a caching proxy would fetch the whole object otherwise
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://{ORIGIN_IP}:{ORIGIN_PORT};
        }}
    }}
}}
"""


def cpu_seconds(pgids: list[int]) -> float:
    """utime + stime of every live process in these process groups."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def pgids(fleet: Fleet, which: tuple[str, ...] = ("imgfs", "nginx")) -> list[int]:
    return [p.pid for n in fleet.nodes for p in (getattr(n, w) for w in which) if p is not None and p.poll() is None]


def origin_pgids(fleet: Fleet) -> list[int]:
    """The origin's S3 server (and the proxy in front of it, if any): on two shared cores its CPU is
    everyone's time too."""
    return [p.pid for p in (fleet.origin, fleet.origin_front) if p is not None and p.poll() is None]


def node_tx(fleet: Fleet) -> list[int]:
    return [fleet.tx(n.ns, f"v{n.index}") for n in fleet.nodes]


def fetch_cmd(fleet: Fleet, node, mode: str, workload: str, key: str) -> list[str]:
    if mode.startswith("engine"):
        url = f"http://127.0.0.1:8085/{fleet.bucket}/{key}"
        return ["bash", "-c", f"set -o pipefail; nsenter --net=/run/netns/{node.ns} curl -sf {url} | sha256sum"]
    if workload == "endpoint":  # the token in a 0600 file, not on a command line
        url = f"http://127.0.0.1:{ENDPOINT_PORT}/v2/images/{key}/file"
        return ["bash", "-c", f"set -o pipefail; nsenter --net=/run/netns/{node.ns} curl -sf -H @{fleet.root / 'token.header'} "
                              f"{url} | sha256sum"]
    if workload == "warm":
        return [PYTHON, "-m", "imgfs", "warm", "--socket", str(node.dir / "control.sock"), key]
    return ["sha256sum", str(node.images / key)]


def one_round(fleet: Fleet, mode: str, workload: str, key: str, size: int, want: str, readers=None, fault=None,
              tries_twice: bool = False) -> dict:
    readers = list(readers if readers is not None else fleet.nodes)  # a copy: a joining node is counted apart
    if not mode.startswith("engine"):
        for node in readers:
            wait_for_file(node.images / key)
    # Every round starts from the same machine: on this one box the N nodes' page caches are one, and the
    # rounds before (their images read back, owners' nginx caches written) would otherwise leave gigabytes
    # for the kernel to reclaim during this round, on the same two cores. A real node has its own memory.
    drop_caches()
    time.sleep(2)
    tx0, ntx0 = fleet.origin_tx(), node_tx(fleet)
    cpu0 = {w: cpu_seconds(pgids(fleet, (w,))) for w in ("imgfs", "nginx")}
    origin_cpu0 = cpu_seconds(origin_pgids(fleet))
    started = time.monotonic()
    done: dict[int, float] = {}
    wrong, retried = [], []

    def fetch(node) -> tuple[bool, str]:
        tries = 2 if tries_twice else 1
        for attempt in range(tries):
            r = subprocess.run(fetch_cmd(fleet, node, mode, workload, key), capture_output=True, text=True, timeout=900)
            if r.returncode == 0 and workload != "warm" and r.stdout.split()[0] != want:
                wrong.append(node.index)  # complete, and wrong: what must never happen
                break
            if r.returncode == 0 or attempt == tries - 1:
                break
            retried.append(node.index)
        done[node.index] = time.monotonic() - started
        if r.returncode != 0:
            return False, (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}"
        if workload == "warm":
            return True, ""
        return r.stdout.split()[0] == want, r.stdout[:64]

    with ThreadPoolExecutor(len(readers) + 1) as pool:
        futures = [pool.submit(fetch, n) for n in readers]
        faulted = pool.submit(fault, fleet, size, tx0) if fault is not None else None
        results = [f.result() for f in futures]
        if faulted is not None:
            faulted.result()  # a fault that could not be made is an error of the bench, not a pass
    wall = time.monotonic() - started
    cpu_by = {w: cpu_seconds(pgids(fleet, (w,))) - c for w, c in cpu0.items()}
    cpu = sum(cpu_by.values())
    origin_cpu = cpu_seconds(origin_pgids(fleet)) - origin_cpu0
    origin = fleet.origin_tx() - tx0
    egress = [b - a for a, b in zip(ntx0, node_tx(fleet))]
    ok = sum(1 for good, _ in results if good)
    if workload == "warm" and ok == len(readers):  # warm says nothing of bytes: read them back from the cache
        with ThreadPoolExecutor(4) as pool:
            sums = list(pool.map(lambda n: run("sha256sum", str(n.images / key)).stdout.split()[0], readers))
        ok = sum(1 for s in sums if s == want)
    falls = 0
    if mode not in ("engine", "engine-plain", "direct"):
        for node in readers:
            try:
                falls += sum(node.status()["fleet"]["fallbacks"].values())
            except Exception:  # noqa: BLE001 - a node a fault took away
                pass
    errors = [msg for good, msg in results if not good][:3]
    gib = len(readers) * size / 2**30
    return {"mode": mode, "workload": workload, "n": len(fleet.nodes), "readers": len(readers), "ok": ok,
            "origin_x": round(origin / size, 3), "last_s": round(wall, 2),
            "p50_s": round(statistics.median(done.values()), 2), "busiest_egress_x": round(max(egress) / size, 2),
            "fallbacks": falls, "cpu_s": round(cpu, 1), "cpu_s_per_gib": round(cpu / gib, 2),
            "imgfs_cpu_s_per_gib": round(cpu_by["imgfs"] / gib, 2), "nginx_cpu_s_per_gib": round(cpu_by["nginx"] / gib, 2),
            "origin_cpu_s": round(origin_cpu, 1), "wrong": len(wrong), "retried": len(retried), "errors": errors}


def mesh_log(fleet: Fleet, key: str) -> dict:
    """Why the origin sent more than one copy, from every node's nginx logs: the owners' cache misses
    ([fleet] access_log; one per chunk is the floor), requests the local tier passed to a second owner,
    the statuses it answered imgfs with, and what nginx said of the owners it passed over."""
    misses = passed_on = 0
    local_status: Counter = Counter()
    said: Counter = Counter()
    for node in fleet.nodes:
        access = node.dir / "mesh-access.log"
        for line in access.read_text(errors="replace").splitlines() if access.exists() else ():
            if key not in line:
                continue
            fields = line.split()
            kv = dict(f.split("=", 1) for f in fields[7:] if "=" in f)
            if fields[1] == str(MESH_PORT):
                misses += kv.get("cache") in ("MISS", "EXPIRED", "BYPASS")
            else:
                local_status[fields[3]] += 1
                passed_on += "," in kv.get("upstream", "")
        errors = node.dir / "nginx.log"
        for m in re.finditer(r"\[(?:error|warn)\] [^:]*: (?:\*\d+ )?(.*?)(?: \(\d+: [^)]*\))?(?: while ([a-zA-Z ]+))?,",
                             errors.read_text(errors="replace") if errors.exists() else ""):
            said[f"{m.group(1)} while {m.group(2)}" if m.group(2) else m.group(1)] += 1
    return {"owner_misses": misses, "passed_to_next_owner": passed_on, "local_status": dict(local_status),
            "nginx_said": dict(said.most_common(5))}


def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def kill_owner_at_30(victim):
    def fault(fleet: Fleet, size: int, tx0: int) -> None:
        while fleet.origin_tx() - tx0 < 0.3 * size:
            time.sleep(0.02)
        os.killpg(victim.nginx.pid, signal.SIGKILL)
    return fault


def blackhole_at_30(victim):
    def fault(fleet: Fleet, size: int, tx0: int) -> None:
        while fleet.origin_tx() - tx0 < 0.3 * size:
            time.sleep(0.02)
        run("ip", "-n", victim.ns, "link", "set", f"v{victim.index}", "down")
    return fault


def origin_503_storm_at_30(_victim):
    """At 30% of the origin's bytes, every ranged GET at the origin is answered 503 SlowDown for 3 s."""
    def fault(fleet: Fleet, size: int, tx0: int) -> None:
        while fleet.origin_tx() - tx0 < 0.3 * size:
            time.sleep(0.02)
        fleet.origin_front.send_signal(signal.SIGUSR1)
    return fault


def owner_flips_bits(victim):
    """The victim owner's nginx asks a proxy that flips one bit of every chunk its gateway serves."""
    def fault(fleet: Fleet, size: int, tx0: int) -> None:
        pass  # set up before the round (flip_at_victim): every chunk the victim owns is flipped from the start
    return fault


def flip_at_victim(fleet: Fleet, victim) -> subprocess.Popen:
    proxy = fleet.proxy(victim.ns, f"127.0.0.1:{FLIP_PORT}", f"http://127.0.0.1:{GATEWAY_PORT}",
                        ["--fault", "flip", "--fault-seconds", "0"], f"flip-node{victim.index}")
    proxy.send_signal(signal.SIGUSR1)
    conf = victim.dir / "mesh" / "nginx.conf"
    conf.write_text(conf.read_text().replace(f"server 127.0.0.1:{GATEWAY_PORT};", f"server 127.0.0.1:{FLIP_PORT};"))
    victim.nginx.send_signal(signal.SIGHUP)
    time.sleep(1)  # nginx's new workers take over
    return proxy


def first_boot(fleet: Fleet, mode: str, workload: str, key: str, want: str, victim) -> dict:
    """Before the owner turns liar, the image's first boot on the fleet: one node reads it whole through
    honest owners, matches Glance's digest and stores the image's chunk sums at the origin. The liar's
    nginx then forgets what it cached, so every chunk it owns is fetched (and flipped) anew."""
    first = fleet.nodes[0]
    ok, published, reads = True, 0, 0
    # a node not among the image's two publishers (sums.py) leaves its first read to them: its second
    # read makes the sums, as it would when the publishers never boot the image
    while not published and reads < 2:
        r = subprocess.run(fetch_cmd(fleet, first, mode, workload, key), capture_output=True, text=True, timeout=900)
        ok, reads = ok and r.returncode == 0 and r.stdout.split()[0] == want, reads + 1
        deadline = time.monotonic() + (30 if reads == 2 else 3)
        while time.monotonic() < deadline and not first.status()["fleet"]["sums"].get("published"):
            time.sleep(0.2)  # the sums are stored in the background, after the read
        published = first.status()["fleet"]["sums"].get("published", 0)
    shutil.rmtree(victim.dir / "mesh-cache" / "chunks", ignore_errors=True)
    return {"first_boot_ok": ok, "sums_published": published, "first_boot_reads": reads}


def add_node_at_30(_victim):
    """At 30% of the origin's bytes a node joins: it gets a certificate, its nginx and imgfs start, every
    node's members list is rewritten and its nginx reloaded, and the new node reads the image too."""
    def fault(fleet: Fleet, size: int, tx0: int) -> None:
        while fleet.origin_tx() - tx0 < 0.3 * size:
            time.sleep(0.02)
        old = fleet.nodes[0]
        index = len(fleet.nodes) + 1
        members = [f"{n.ip}:{MESH_PORT}" for n in fleet.nodes] + [f"198.18.0.{index}:{MESH_PORT}"]
        chunk_mb = int(re.search(r"(?m)^chunk_size_mb = (\d+)", old.conf.read_text()).group(1))
        timeout = float(re.search(r"(?m)^timeout = (\S+)", old.conf.read_text()).group(1))
        node = fleet.add_node(index, fleet.ca, chunk_mb=chunk_mb, members=members, mesh_timeout=timeout)
        fleet.start_nginx(node)
        fleet.start_imgfs(node)
        for other in fleet.nodes[:-1]:
            fleet.set_members(other, members)
        key = fleet.current_key
        wait_for_file(node.images / key)
        r = subprocess.run(["sha256sum", str(node.images / key)], capture_output=True, text=True, timeout=900)
        fleet.joined_ok = r.returncode == 0 and r.stdout.split()[0] == fleet.current_want
    return fault


@dataclass
class Run:
    """What every cell of one bench run shares: the image (its bytes once, on disk), the lab's Glance."""

    root: Path
    size: int
    chunk_mb: int
    rate: str
    src: Path
    want: str
    glance: LabGlance | None = None
    glance_id: str = ""  # the image in the lab's Glance: the key of the endpoint workload's copy at the origin
    mesh_timeout: float = 30.0  # [fleet] timeout: the product's default


def cell(run_: Run, n: int, mode: str, workloads: list[str], fault=None) -> list[dict]:
    work = Path(tempfile.mkdtemp(dir=run_.root, prefix=f"{mode}{n}-"))
    endpoint = "endpoint" in workloads
    glance = run_.glance

    def before_imgfs(fleet: Fleet) -> None:
        if endpoint:
            header = fleet.root / "token.header"
            header.touch(mode=0o600)
            header.write_text(f"X-Auth-Token: {glance.token}\n")
            glance.bridge(fleet)

    extra = f"image_api_listen = 127.0.0.1:{ENDPOINT_PORT}\nimage_api_upstream = http://127.0.0.1:{glance.port}" \
        if endpoint else ""
    front = ["--fault", "status", "--status", "503", "--fault-seconds", "3"] if fault is origin_503_storm_at_30 else None
    fleet, ca = new_fleet(work, n, chunk_mb=run_.chunk_mb, origin_rate=run_.rate, mode=mode, imgfs_extra=extra,
                          before_imgfs=before_imgfs, origin_front=front, mesh_timeout=run_.mesh_timeout,
                          nginx_conf=lambda f, node, members: engine_conf(f, node, members, run_.chunk_mb * MiB,
                                                                          tls=mode == "engine"))
    rows = []
    try:
        for workload in workloads:
            key = run_.glance_id if workload == "endpoint" else f"img-{workload}"
            fleet.put(key, run_.src)
            fleet.current_key, fleet.current_want = key, run_.want  # type: ignore[attr-defined]
            readers = None
            fault_fn = None
            if fault is not None:
                victim = fleet.nodes[1]
                if fault is not add_node_at_30:
                    readers = [x for x in fleet.nodes if x is not victim]  # the victim serves, it does not read
                if fault is owner_flips_bits:
                    booted = first_boot(fleet, mode, workload, key, run_.want, victim)
                    readers = [x for x in fleet.nodes if x is not victim and x is not fleet.nodes[0]]
                    flip_at_victim(fleet, victim)
                fault_fn = fault(victim)
            row = one_round(fleet, mode, workload, key, run_.size, run_.want, readers, fault_fn,
                            tries_twice=fault is owner_flips_bits)
            if fault is owner_flips_bits:
                row.update(booted)
                if not booted["first_boot_ok"] or not booted["sums_published"]:
                    row["errors"].append(f"the first boot did not store the image's chunk sums: {booted}")
                    row["ok"] = 0
                fleets = [n.status()["fleet"] for n in readers]
                row["sums_checked_x"] = round(sum(f["sums_checked_bytes"] for f in fleets) / run_.size, 2)
                row["chunk_sum_fallbacks"] = sum(f["fallbacks"].get("chunk_sum", 0) for f in fleets)
            if fault is not None:
                row["fault"] = fault.__name__
                if hasattr(fleet, "joined_ok"):
                    row["readers"] += 1
                    row["ok"] += 1 if fleet.joined_ok else 0
                if fleet.origin_front is not None:
                    said = re.search(r"(?m)^fault status: (\d+) requests", (work / "origin-front.log").read_text())
                    row["storm_503s"] = int(said.group(1)) if said else None  # the proxy says so once it is over
                    if not row["storm_503s"]:
                        row["errors"].append("the origin's proxy answered no 503: the storm did not happen")
                        row["ok"] = 0
            if mode in ("mesh", "single"):
                row["mesh_log"] = mesh_log(fleet, key)
            if workload == "endpoint":
                passed = sum(n.status()["image_api"]["passthrough_downloads"] for n in (readers or fleet.nodes))
                if passed:  # Glance answered instead of the node: the origin counter says nothing of those
                    row["ok"] -= passed
                    row["errors"].append(f"{passed} downloads passed to Glance, not served by imgfs")
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        fleet.close()
        # each node holds the image twice (its cache, its nginx's share): 32 nodes are ~17 GB a cell
        shutil.rmtree(work, ignore_errors=True)
    return rows


def lab_glance() -> LabGlance | None:
    lab_json = Path(os.environ.get("IMGFS_LAB_DIR") or REPO / ".lab") / "lab.json"
    if not lab_json.exists():
        print("the lab is not up (tests/lab/up): no endpoint workload, no flipped-bit cell", flush=True)
        return None
    if shutil.which("socat") is None:
        print("socat is not installed (apt-get install socat): no endpoint workload, no flipped-bit cell", flush=True)
        return None
    return LabGlance(json.loads(lab_json.read_text()))


def main() -> int:
    # a SIGTERM (timeout, Ctrl-C from a wrapper) must still run every cell's cleanup: N daemons, N nginx
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="8,16,32")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--origin-rate", default="1gbit")
    ap.add_argument("--modes", default="engine,engine-plain,direct,mesh,single")
    ap.add_argument("--mesh-timeout", type=float, default=30.0, help="[fleet] timeout (default: the product's, 30 s)")
    ap.add_argument("--workloads", default="warm,mount,endpoint", help="of the imgfs modes (the engine rows always curl)")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--faults-only", action="store_true", help="only the fault cells")
    ap.add_argument("--faults", default="kill,blackhole,join,storm,flip", help="which fault cells")
    ap.add_argument("--no-endpoint", action="store_true", help="no endpoint workload or flipped-bit cell, even with the lab up")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--workdir", default=None, help="where the cells' files go (default: the temp dir); a 32-node cell "
                    "needs ~N x 2 x the image size")
    args = ap.parse_args()
    size = args.size_mib * MiB
    root = Path(tempfile.mkdtemp(prefix="imgfs-fleet-bench-", dir=args.workdir))
    src = root / "image.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(size))
    run_ = Run(root, size, args.chunk_mb, args.origin_rate, src, hashlib.sha256(src.read_bytes()).hexdigest(),
               mesh_timeout=args.mesh_timeout)
    run_.glance = None if args.no_endpoint else lab_glance()
    rows = []
    try:
        if run_.glance is not None:
            run_.glance_id = run_.glance.upload(src)
        with_endpoint = ["endpoint"] if run_.glance is not None else []
        for n in [] if args.faults_only else map(int, args.nodes.split(",")):
            for mode in args.modes.split(","):
                workloads = ["curl"] if mode.startswith("engine") else ["warm", "mount", *with_endpoint] \
                    if mode in ("direct", "mesh") else ["mount"]
                # Each workload on a fleet of its own, started afresh: they are alternatives (a node warms,
                # mounts or downloads a new image), and on this one box a round after another would start
                # with N daemons grown by the round before and its gigabytes of cache to reclaim (measured,
                # 32 nodes: the mount round took 49.7 s after a warm round, 41.8-46.4 s on a fresh fleet).
                for workload in [w for w in workloads if w == "curl" or w in args.workloads.split(",")]:
                    rows += cell(run_, n, mode, [workload])
        if not args.no_faults:
            chosen = args.faults.split(",")
            for name, fault in (("kill", kill_owner_at_30), ("blackhole", blackhole_at_30), ("join", add_node_at_30),
                                ("storm", origin_503_storm_at_30)):
                if name in chosen:
                    rows += cell(run_, 8, "mesh", ["mount"], fault)
            if run_.glance is not None and "flip" in chosen:
                rows += cell(run_, 8, "mesh", ["endpoint"], owner_flips_bits)
    finally:
        if run_.glance is not None:
            run_.glance.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.size_mib} MiB image, {args.chunk_mb} MiB chunks, origin link {args.origin_rate}; every node's sha256 checked")
    print(f"{'N':>3} {'mode':<12} {'workload':<8} {'fault':<22} {'ok':>5} {'wrong':>5} {'retry':>5} {'origin x':>8} "
          f"{'last s':>7} {'p50 s':>6} {'busiest x':>9} {'fallbk':>6} {'CPU s/GiB: all':>14} {'imgfs':>6} {'nginx':>6} "
          f"{'origin CPU s':>12}")
    for r in rows:
        print(f"{r['n']:>3} {r['mode']:<12} {r['workload']:<8} {r.get('fault', '-'):<22} {r['ok']:>2}/{r['readers']:<2} "
              f"{r['wrong']:>5} {r['retried']:>5} {r['origin_x']:>8} {r['last_s']:>7} {r['p50_s']:>6} "
              f"{r['busiest_egress_x']:>9} {r['fallbacks']:>6} {r['cpu_s_per_gib']:>14} {r['imgfs_cpu_s_per_gib']:>6} "
              f"{r['nginx_cpu_s_per_gib']:>6} {r['origin_cpu_s']:>12}")
        if "sums_checked_x" in r:
            print(f"      chunk sums: first boot stored {r['sums_published']}; readers checked {r['sums_checked_x']}x "
                  f"the image against them; {r['chunk_sum_fallbacks']} blocks refused and read from the origin")
        if "mesh_log" in r:
            print(f"      nginx logs: {json.dumps(r['mesh_log'])}")
        for e in r["errors"]:
            print(f"      error: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] == r["readers"] and not r["wrong"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
