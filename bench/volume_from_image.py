"""Cinder's own create-volume-from-image, on the real lab, by each route its image bytes can take:

  stock            Cinder -> glance-api -> RGW (glance_catalog_info: a stock cloud)
  endpoint 1st/2nd Cinder -> imgfs's Image API endpoint (glance_api_servers), cold then warm chunk cache
  mount 1st/2nd    Cinder opens file://<mount>/images/<id> (allowed_direct_url_schemes = file), after
                   `imgfs evict` (cold), then again (warm)

for one image (1 GiB of random bytes by default) stored only in s3store (RGW). Per volume it prints the
whole create (API call -> available), Cinder's own fetch step (cinder-volume's "Image fetch details"
log line), bytes RGW sent and bytes through glance-api (each daemon's wchar in /proc/PID/io, summed over
its process group; RGW: its usage log), imgfs's CPU seconds, and checks the volume's bytes (librbd, sha256).
Page caches are dropped before each create. The lab's Cinder is switched between routes with
tests/lab/cinder-image-route and left on the stock route at the end.

    ./bench/run-volume-from-image [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import wait_for, wait_volume  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_cinder", Path(__file__).parent / "cinder.py")
bench_cinder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_cinder)  # type: ignore[union-attr]
Daemon, drop_caches = bench_cinder.Daemon, bench_cinder.drop_caches
MiB = 1 << 20
_FETCH = re.compile(r"Image download ([\d.]+) MB at ([\d.]+) MB/s")  # cinder-volume's INFO line of its fetch step


def group_wchar(pidfile: Path) -> int:
    """Bytes written (sockets and files) by every process in a lab daemon's process group."""
    pgid = int(pidfile.read_text().split()[0])
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            for line in open(f"/proc/{entry}/io"):
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total


def rgw_sent(lab: dict) -> int:
    """Bytes RGW sent to the lab's S3 user (Glance's s3store and imgfs both read as that user), from
    RGW's usage log (flushed every second: the lab sets rgw usage log tick interval = 1)."""
    time.sleep(2.5)
    out = subprocess.run(["radosgw-admin", "-c", lab["ceph"]["conf"], "usage", "show", f"--uid={lab['s3']['rgw_user']}",
                          "--show-log-entries=false"], check=True, capture_output=True, text=True, timeout=60).stdout
    summary = json.loads(out).get("summary") or [{}]
    return int(summary[0].get("total", {}).get("bytes_sent", 0))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nova_download(lab: dict, sess, endpoint: str, image_id: str, dest: Path, want: str) -> tuple[float, str]:
    """nova.virt.images.fetch (tests/lab/nova_download.py, lab venv) from ``endpoint``: (seconds, OK|MISMATCH)."""
    drop_caches()
    env = dict(os.environ, NOVA_TOKEN=sess.get_token(), NOVA_USER_ID=sess.get_user_id(), NOVA_PROJECT_ID=sess.get_project_id())
    out = subprocess.run([str(Path(lab["lab_dir"]) / "venv/bin/python"), str(REPO / "tests/lab/nova_download.py"), endpoint,
                          image_id, str(dest)], env=env, capture_output=True, text=True, timeout=600)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ok = "OK" if "error" not in got and hashlib.sha256(dest.read_bytes()).hexdigest() == want else f"FAILED {got.get('error', '')}"
    dest.unlink(missing_ok=True)
    return got.get("seconds", float("nan")), ok


def route(name: str) -> None:
    subprocess.run([str(REPO / "tests/lab/cinder-image-route"), name], check=True, capture_output=True, timeout=300)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    with bench_cinder.running_lab() as lab:
        return run(lab, args.size_mib)


def run(lab: dict, size_mib: int) -> int:
    size = size_mib * MiB
    pids = Path(lab["pids_dir"])

    import rbd

    sess, cinder, cluster, ioctx = bench_cinder.lab_clients(lab, timeout=900)
    u = lab["keystone"]["users"]["imgfs"]
    glance = lab["glance"]["endpoint"]
    ceph = lab["ceph"]
    work = Path(tempfile.mkdtemp(prefix="imgfs-bench-vfi-"))
    block = os.urandom(MiB)
    digest = hashlib.sha256()

    def body():
        for i in range(size_mib):
            piece = i.to_bytes(8, "little") + block[8:]
            digest.update(piece)
            yield piece

    image_id, daemon = None, None
    volumes: list[str] = []
    rows: list[dict] = []
    nova_rows: list[tuple[str, tuple[float, str]]] = []
    try:
        img = sess.post(f"{glance}/v2/images", json={"name": f"bench-vfi-{uuid.uuid4().hex[:6]}", "disk_format": "raw",
                                                     "container_format": "bare", "visibility": "public"}).json()
        image_id = img["id"]
        t = time.perf_counter()
        sess.put(f"{glance}/v2/images/{image_id}/file", data=body(), headers={"Content-Type": "application/octet-stream"})
        print(f"uploaded {size_mib} MiB to Glance (s3store) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        want = digest.hexdigest()

        conf = work / "imgfs.conf"
        conf.write_text(
            f"[imgfs]\ncatalog = glance\ncache_dir = {work / 'cache'}\nhost = bench-{uuid.uuid4().hex[:6]}\n"
            f"control_socket = {work / 'ctl.sock'}\nimage_api_listen = {lab['cinder']['imgfs_api_url'].split('//')[1]}\n\n"
            f"[glance_catalog]\nauth_url = {lab['keystone']['auth_url']}\nusername = {u['username']}\npassword = {u['password']}\n"
            f"project_name = {u['project_name']}\nregion_name = {lab['keystone']['region_name']}\n\n"
            f"[cinderstore]\nrbd_keyring_file = {ceph['client_cinder_keyring']}\n")

        def check(volume_id: str) -> str:
            h = hashlib.sha256()
            with rbd.Image(ioctx, f"volume-{volume_id}", read_only=True) as vimg:
                for off in range(0, size, 64 * MiB):
                    h.update(vimg.read(off, min(64 * MiB, size - off)))
            return "OK" if h.hexdigest() == want else "MISMATCH"

        def create(name: str) -> None:
            drop_caches()
            log = Path(lab["logs"]["cinder-volume"])
            log_at = log.stat().st_size
            rgw0, glance0 = rgw_sent(lab), group_wchar(pids / "glance-api.pid")
            cpu0 = cpu_seconds(daemon.proc.pid) if daemon else 0.0
            t = time.perf_counter()
            vol = cinder.volumes.create(size=-(-size // (1024 * MiB)), imageRef=image_id, name=f"bench-vfi-{name}")
            volumes.append(vol.id)
            wait_volume(cinder, vol.id, "available", timeout=900)
            wall = time.perf_counter() - t
            with open(log, errors="replace") as f:
                f.seek(log_at)
                fetch = _FETCH.search(f.read())
            # Cinder rounds a fetch under 1 s up to 1 s; MB here is MiB
            fetch_s = float(fetch.group(1)) / float(fetch.group(2)) if fetch else None
            rows.append({"route": name, "create_s": wall, "fetch_s": fetch_s,
                         "rgw_mib": (rgw_sent(lab) - rgw0) / MiB,
                         "glance_mib": (group_wchar(pids / "glance-api.pid") - glance0) / MiB,
                         "imgfs_cpu_s": (cpu_seconds(daemon.proc.pid) - cpu0) if daemon else None,
                         "bytes": check(vol.id)})
            print(f"{name}: {rows[-1]}", file=sys.stderr)

        route("glance")
        create("stock (Glance)")
        daemon = Daemon([lab["glance"]["conf"], conf], work / "mnt", work / "imgfs.log")
        wait_for((work / "mnt" / "images" / image_id).exists, 60, "the image in the mount")
        route("imgfs-endpoint")
        create("endpoint, 1st (cold)")
        create("endpoint, 2nd (warm)")
        # Nova's own download code (glanceclient, into a file; no eventlet thread pool in the way), warm:
        # how fast a client of the Image API can take the image, from Glance and from imgfs.
        for name, url in (("nova download, stock", glance), ("nova download, endpoint", lab["cinder"]["imgfs_api_url"])):
            nova_rows.append((name, nova_download(lab, sess, url, image_id, work / "nova.img", want)))
        subprocess.run([str(REPO / ".venv/bin/imgfs"), "evict", image_id, "--socket", str(work / "ctl.sock")], check=True,
                       capture_output=True)
        route("imgfs-mount")
        subprocess.run(["mariadb", f"--socket={lab['mariadb']['socket']}", "glance", "-e",
                        "INSERT INTO image_locations (image_id, value, meta_data, status, deleted, created_at, updated_at) "
                        f"VALUES ('{image_id}', 'file://{work / 'mnt' / 'images' / image_id}', "
                        f"'{json.dumps({'store': lab['glance']['mount_store']})}', 'active', 0, UTC_TIMESTAMP(), UTC_TIMESTAMP())"],
                       check=True)
        create("mount, 1st (cold)")
        create("mount, 2nd (warm)")
    finally:
        try:
            route("glance")
        except subprocess.CalledProcessError as e:
            print(f"could not put Cinder back on the stock route: {e}", file=sys.stderr)
        for volume_id in volumes:
            try:
                cinder.volumes.delete(volume_id)
            except Exception as e:  # noqa: BLE001
                print(f"could not delete volume {volume_id}: {e}", file=sys.stderr)
        if daemon:
            daemon.stop()
        if image_id:
            sess.delete(f"{glance}/v2/images/{image_id}", raise_exc=False)
        ioctx.close()
        cluster.shutdown()
        subprocess.run(["rm", "-rf", str(work)], check=False)

    print(f"\nCinder volume from a {size_mib} MiB image in s3store (RGW) -> RBD volume; loadavg "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"{'route':<22} {'create':>8} {'fetch step':>11} {'fetch MB/s':>10} {'vs stock':>9} {'RGW sent':>9} "
          f"{'via glance':>10} {'imgfs CPU':>9}  bytes")
    stock = rows[0]["fetch_s"]
    for r in rows:
        fetch = r["fetch_s"]
        print(f"{r['route']:<22} {r['create_s']:7.1f}s {fetch if fetch is not None else float('nan'):10.2f}s "
              f"{(size / fetch / 1e6) if fetch else float('nan'):10.0f} "
              f"{(stock / fetch) if fetch and stock else float('nan'):8.2f}x {r['rgw_mib']:7.0f}Mi {r['glance_mib']:8.0f}Mi "
              f"{r['imgfs_cpu_s'] if r['imgfs_cpu_s'] is not None else float('nan'):8.2f}s  {r['bytes']}")
    for name, (seconds, ok) in nova_rows:
        print(f"{name:<24} {'':>8} {seconds:10.2f}s {size / seconds / 1e6:10.0f} {stock / seconds if stock else float('nan'):8.2f}x"
              f" {'':>9} {'':>10} {'':>9}  {ok}")
    print("fetch step = Cinder's own download of the image into image_conversion_dir (its log line); create = the "
          "whole API call until the volume is available (fetch + qemu-img + rbd import). RGW sent: RGW's usage log; "
          "via glance: glance-api's wchar (sockets and logs). vs stock = stock fetch time / this fetch time.")
    return 0 if all(r["bytes"] == "OK" for r in rows) and all(ok == "OK" for _, (_, ok) in nova_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
