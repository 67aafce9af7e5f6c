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
  (owners' caches in front of the origin directly, no imgfs): the engine's own limit.
Workloads: all N nodes 'imgfs warm' the image at once; all N read it through the mount (sha256sum).
Faults (mesh, N=8): an owner's nginx killed at 30%, an owner blackholed at 30%, a ninth node joining at 30%
(members rewritten and every nginx reloaded; the new node reads too).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fleetlab import MESH_PORT, ORIGIN_IP, ORIGIN_PORT, PYTHON, Fleet, new_fleet, run  # noqa: E402

MiB = 1 << 20


def engine_conf(fleet: Fleet, node, members: list[str], chunk: int) -> str:
    """Stock nginx alone: the front slices the object and hashes each slice to an owner (plain HTTP
    between nodes: the engine's own cost), whose cache and cache lock sit in front of the origin."""
    servers = "\n".join(f"        server {m.split(':')[0]}:{MESH_PORT + 1} max_fails=1 fail_timeout=10s;" for m in members)
    cache = node.dir / "engine-cache"
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
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
            proxy_set_header Connection "";
            proxy_pass http://owners;
        }}
    }}
    server {{
        listen {node.ip}:{MESH_PORT + 1};
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


def pgids(fleet: Fleet) -> list[int]:
    return [p.pid for n in fleet.nodes for p in (n.imgfs, n.nginx) if p is not None and p.poll() is None]


def node_tx(fleet: Fleet) -> list[int]:
    return [fleet.tx(n.ns, f"v{n.index}") for n in fleet.nodes]


def fetch_cmd(fleet: Fleet, node, mode: str, workload: str, key: str) -> list[str]:
    if mode == "engine":
        url = f"http://127.0.0.1:8085/{fleet.bucket}/{key}"
        return ["bash", "-c", f"nsenter --net=/run/netns/{node.ns} curl -sf {url} | sha256sum"]
    if workload == "warm":
        return [PYTHON, "-m", "imgfs", "warm", "--socket", str(node.dir / "control.sock"), key]
    return ["sha256sum", str(node.images / key)]


def one_round(fleet: Fleet, mode: str, workload: str, key: str, size: int, want: str, readers=None, fault=None) -> dict:
    readers = list(readers if readers is not None else fleet.nodes)  # a copy: a joining node is counted apart
    if mode != "engine":
        for node in readers:
            wait_for_file(node.images / key)
    tx0, ntx0, cpu0 = fleet.origin_tx(), node_tx(fleet), cpu_seconds(pgids(fleet))
    started = time.monotonic()
    done: dict[int, float] = {}

    def fetch(node) -> tuple[bool, str]:
        r = subprocess.run(fetch_cmd(fleet, node, mode, workload, key), capture_output=True, text=True, timeout=900)
        done[node.index] = time.monotonic() - started
        if r.returncode != 0:
            return False, (r.stderr or r.stdout).strip()[-300:]
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
    cpu = cpu_seconds(pgids(fleet)) - cpu0
    origin = fleet.origin_tx() - tx0
    egress = [b - a for a, b in zip(ntx0, node_tx(fleet))]
    ok = sum(1 for good, _ in results if good)
    if workload == "warm" and ok == len(readers):  # warm says nothing of bytes: read them back from the cache
        with ThreadPoolExecutor(4) as pool:
            sums = list(pool.map(lambda n: run("sha256sum", str(n.images / key)).stdout.split()[0], readers))
        ok = sum(1 for s in sums if s == want)
    falls = 0
    if mode not in ("engine", "direct"):
        for node in readers:
            try:
                falls += sum(node.status()["fleet"]["fallbacks"].values())
            except Exception:  # noqa: BLE001 - a node a fault took away
                pass
    errors = [msg for good, msg in results if not good][:3]
    return {"mode": mode, "workload": workload, "n": len(fleet.nodes), "readers": len(readers), "ok": ok,
            "origin_x": round(origin / size, 3), "last_s": round(wall, 2),
            "p50_s": round(statistics.median(done.values()), 2), "busiest_egress_x": round(max(egress) / size, 2),
            "fallbacks": falls, "cpu_s": round(cpu, 1), "cpu_s_per_gib": round(cpu / (len(readers) * size / 2**30), 2),
            "errors": errors}


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
        node = fleet.add_node(index, fleet.ca, chunk_mb=chunk_mb, members=members)
        fleet.start_nginx(node)
        fleet.start_imgfs(node)
        for other in fleet.nodes[:-1]:
            fleet.set_members(other, members)
        key = fleet.current_key
        wait_for_file(node.images / key)
        r = subprocess.run(["sha256sum", str(node.images / key)], capture_output=True, text=True, timeout=900)
        fleet.joined_ok = r.returncode == 0 and r.stdout.split()[0] == fleet.current_want
    return fault


def cell(root: Path, n: int, mode: str, size: int, chunk_mb: int, rate: str, workloads: list[str], fault=None) -> list[dict]:
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"{mode}{n}-"))
    fleet, ca = new_fleet(work, n, chunk_mb=chunk_mb, origin_rate=rate, mode=mode,
                         nginx_conf=lambda f, node, members: engine_conf(f, node, members, chunk_mb * MiB))
    fleet.ca = ca  # type: ignore[attr-defined]
    rows = []
    try:
        data = os.urandom(size)
        want = hashlib.sha256(data).hexdigest()
        src = work / "image.raw"
        src.write_bytes(data)
        del data
        for workload in workloads:
            key = f"img-{workload}"
            fleet.put(key, src)
            fleet.current_key, fleet.current_want = key, want  # type: ignore[attr-defined]
            readers = None
            fault_fn = None
            if fault is not None:
                victim = fleet.nodes[1]
                if fault is not add_node_at_30:
                    readers = [x for x in fleet.nodes if x is not victim]  # the victim serves, it does not read
                fault_fn = fault(victim)
            row = one_round(fleet, mode, workload, key, size, want, readers, fault_fn)
            if fault is not None:
                row["fault"] = fault.__name__
                if hasattr(fleet, "joined_ok"):
                    row["readers"] += 1
                    row["ok"] += 1 if fleet.joined_ok else 0
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        fleet.close()
        # each node holds the image twice (its cache, its nginx's share): 32 nodes are ~17 GB a cell
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> int:
    # a SIGTERM (timeout, Ctrl-C from a wrapper) must still run every cell's cleanup: N daemons, N nginx
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="8,16,32")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--origin-rate", default="1gbit")
    ap.add_argument("--modes", default="engine,direct,mesh,single")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--faults-only", action="store_true", help="only the fault cells")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--workdir", default=None, help="where the cells' files go (default: the temp dir); a 32-node cell "
                    "needs ~N x 2 x the image size")
    args = ap.parse_args()
    size = args.size_mib * MiB
    root = Path(tempfile.mkdtemp(prefix="imgfs-fleet-bench-", dir=args.workdir))
    rows = []
    for n in [] if args.faults_only else map(int, args.nodes.split(",")):
        for mode in args.modes.split(","):
            workloads = ["curl"] if mode == "engine" else ["warm", "mount"] if mode in ("direct", "mesh") else ["mount"]
            rows += cell(root, n, mode, size, args.chunk_mb, args.origin_rate, workloads)
    if not args.no_faults:
        for fault in (kill_owner_at_30, blackhole_at_30, add_node_at_30):
            rows += cell(root, 8, "mesh", size, args.chunk_mb, args.origin_rate, ["mount"], fault)
    print(f"\n{args.size_mib} MiB image, {args.chunk_mb} MiB chunks, origin link {args.origin_rate}; every node's sha256 checked")
    print(f"{'N':>3} {'mode':<7} {'workload':<6} {'fault':<16} {'ok':>5} {'origin x':>8} {'last s':>7} {'p50 s':>6} "
          f"{'busiest x':>9} {'fallbk':>6} {'CPU s/GiB':>9}")
    for r in rows:
        print(f"{r['n']:>3} {r['mode']:<7} {r['workload']:<6} {r.get('fault', '-'):<16} {r['ok']:>2}/{r['readers']:<2} "
              f"{r['origin_x']:>8} {r['last_s']:>7} {r['p50_s']:>6} {r['busiest_egress_x']:>9} {r['fallbacks']:>6} "
              f"{r['cpu_s_per_gib']:>9}")
        for e in r["errors"]:
            print(f"      error: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["ok"] == r["readers"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
