"""Cinder path benchmark: a 1 GiB image-volume on the real lab (Keystone + Cinder + Ceph RBD), read
through an imgfs mount (cold, warm) against a direct librbd read of the same volume in the same run;
attach latency; N concurrent readers => how many attachments Cinder saw.

    ./bench/run-cinder [--size-mib 1024] [--readers 8]

Needs the lab (tests/lab); brings it up if it is down and takes it down again at the end.
Prints numbers; asserts nothing but the bytes (sha256 of every full read against the source).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import (  # noqa: E402 - the same lab helpers the tests use
    LAB_DIR,
    host_attachments,
    is_mounted,
    wait_for,
    wait_volume,
    write_cinder_config,
)

MiB = 1 << 20


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dd(path: Path, bs: str = "4M") -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={bs}", "status=none"], check=True)
    return time.perf_counter() - start


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


class Daemon:
    def __init__(self, config: Path | list[str | Path], mnt: Path, log: Path) -> None:
        mnt.mkdir(exist_ok=True)
        self.log = log
        self.mnt = mnt
        configs = [c for f in (config if isinstance(config, list) else [config]) for c in ("--config-file", str(f))]
        self.proc = subprocess.Popen([str(REPO / ".venv/bin/imgfs"), "mount", str(mnt), *configs],
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.proc.poll() is None and is_mounted(mnt), 60, "the imgfs mount")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)

    def rss_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


@contextlib.contextmanager
def running_lab():
    """lab.json of the running lab; brings the lab up first (and down again at the end) if it is not up."""
    started = not (LAB_DIR / "lab.json").exists()
    if started:
        print("bringing the lab up (tests/lab/up) ...", file=sys.stderr)
        subprocess.run([str(REPO / "tests/lab/up")], check=True)
    try:
        yield json.loads((LAB_DIR / "lab.json").read_text())
    finally:
        if started:
            subprocess.run([str(REPO / "tests/lab/down")], check=False)


def lab_clients(lab: dict, *, timeout: float):
    """A Keystone session as the lab's imgfs user, a Cinder client from the catalog, and a librados
    connection to the RBD pool: what both Cinder-path benchmarks need."""
    import rados
    from cinderclient import client as cinder_client
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    u = lab["keystone"]["users"]["imgfs"]
    sess = ks_session.Session(auth=v3.Password(auth_url=lab["keystone"]["auth_url"], username=u["username"],
                                               password=u["password"], project_name=u["project_name"],
                                               user_domain_name="Default", project_domain_name="Default"), timeout=timeout)
    cinder = cinder_client.Client("3.60", session=sess, region_name=lab["keystone"]["region_name"],
                                  service_type="volumev3", interface="public")
    ceph = lab["ceph"]
    cluster = rados.Rados(conffile=ceph["conf"], rados_id=ceph["rbd_user"], conf={"keyring": ceph["client_cinder_keyring"]})
    cluster.connect(timeout=30)
    return sess, cinder, cluster, cluster.open_ioctx(ceph["rbd_pool"])


def attachment_totals(sock: Path, *, settle: float) -> dict:
    """The daemon's attachment counters once the grace after the last fetch has run out."""
    time.sleep(settle)
    out = subprocess.run([str(REPO / ".venv/bin/imgfs"), "status", "--json", "--socket", str(sock)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["attachment_totals"][0]


def held_note(t: dict) -> str:
    return f"held {t['seconds_held']:.1f} s in all, {t['fetches_per_attach']} fetches each"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--readers", type=int, default=8)
    args = ap.parse_args()
    size = args.size_mib * MiB

    started_lab = False
    if not (LAB_DIR / "lab.json").exists():
        print("bringing the lab up (tests/lab/up) ...", file=sys.stderr)
        subprocess.run([str(REPO / "tests/lab/up")], check=True)
        started_lab = True
    lab = json.loads((LAB_DIR / "lab.json").read_text())

    import rbd

    sess, cinder, cluster, ioctx = lab_clients(lab, timeout=60)
    ceph = lab["ceph"]
    work = Path(tempfile.mkdtemp(prefix="imgfs-bench-cinder-"))
    image_id = str(uuid.uuid4())
    host = f"bench-{uuid.uuid4().hex[:6]}"
    rows: list[tuple[str, str, str]] = []
    volume_id = None
    try:
        vol = cinder.volumes.create(size=-(-size // (1024 * MiB)), name=f"image-{image_id}", volume_type=lab["cinder"]["volume_types"]["default"],
                                    metadata={"glance_image_id": image_id, "image_size": str(size)})
        volume_id = vol.id
        wait_volume(cinder, vol.id, "available")
        print(f"writing {args.size_mib} MiB of random data into volume-{vol.id} ...", file=sys.stderr)
        source = hashlib.sha256()
        with rbd.Image(ioctx, f"volume-{vol.id}") as img:
            for off in range(0, size, 64 * MiB):
                block = os.urandom(min(64 * MiB, size - off))
                source.update(block)
                img.write(block, off)
            img.flush()
        digest = source.hexdigest()

        # the physical limit: librbd straight from this process, the way os-brick's handle reads
        def direct(chunk: int) -> float:
            drop_caches()
            with rbd.Image(ioctx, f"volume-{vol.id}", read_only=True) as img:
                start = time.perf_counter()
                for off in range(0, size, chunk):
                    img.read(off, min(chunk, size - off))
                return time.perf_counter() - start

        t_direct = min(direct(4 * MiB), direct(4 * MiB))
        t_direct8 = direct(8 * MiB)
        rows.append(("direct librbd read, 4 MiB reads (best of 2)", f"{size / t_direct / 1e6:.0f} MB/s", ""))
        rows.append(("direct librbd read, 8 MiB reads", f"{size / t_direct8 / 1e6:.0f} MB/s", ""))

        sock = work / "ctl.sock"
        config = write_cinder_config(work / "imgfs.conf", lab, cache_dir=work / "cache", host=host, chunk_size_mb=8,
                                     attach_idle_timeout=5, control_socket=sock)
        log = work / "imgfs.log"
        d = Daemon(config, work / "mnt", log)
        path = work / "mnt" / "images" / image_id
        wait_for(path.exists, 30, "the image in the mount")
        t_cold = dd(path)
        held_cold = attachment_totals(sock, settle=5 + 2)
        m = re.search(r"attached volume \S+ .* in ([0-9.]+)s", log.read_text())
        attach_s = float(m.group(1)) if m else float("nan")
        t_warm = dd(path)
        ok = sha256_of(path) == digest
        rss = d.rss_mib()
        d.stop()
        d2 = Daemon(config, work / "mnt", log)  # warm after a restart (cache on disk, nothing attached)
        t_warm2 = dd(path)
        attached_after_warm = len(host_attachments(cinder, vol.id, host))
        d2.stop()
        rows.append(("imgfs cold, dd bs=4M", f"{size / t_cold / 1e6:.0f} MB/s", f"{t_direct / t_cold:.2f}x direct (target >= 0.90x)"))
        rows.append(("imgfs warm (chunk cache, page cache dropped)", f"{size / t_warm / 1e6:.0f} MB/s", f"{t_direct / t_warm:.2f}x direct"))
        rows.append(("imgfs warm after restart", f"{size / t_warm2 / 1e6:.0f} MB/s", f"attachments made: {attached_after_warm} (fully cached: none needed)"))
        rows.append(("attach latency (create + connect + complete)", f"{attach_s * 1e3:.0f} ms", "from the daemon's log line"))
        rows.append(("cold sequential read: attachments", f"{held_cold['attaches']} made", held_note(held_cold)))
        rows.append(("daemon peak RSS", f"{rss:.0f} MiB", ""))
        rows.append(("sha256 through the mount", "OK" if ok else "MISMATCH", ""))

        # 2000 random 4 KiB reads on a cold cache (QD1, no readahead): what holding per fetch costs
        subprocess.run(["rm", "-rf", str(work / "cache")], check=True)
        d4 = Daemon(config, work / "mnt", log)
        wait_for(path.exists, 30, "the image in the mount")
        rng = random.Random(7)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            began = time.perf_counter()
            for _ in range(2000):
                os.pread(fd, 4096, rng.randrange(size // 4096) * 4096)
            t_random = time.perf_counter() - began
        finally:
            os.close(fd)
        held_random = attachment_totals(sock, settle=5 + 2)
        d4.stop()
        rows.append(("2000 random 4 KiB reads, cold: attachments", f"{held_random['attaches']} made",
                     f"{held_note(held_random)}; {2000 / t_random:.0f} reads/s"))

        # N cold readers: one attachment however many readers
        subprocess.run(["rm", "-rf", str(work / "cache")], check=True)
        d3 = Daemon(config, work / "mnt", log)
        seen: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(len(host_attachments(cinder, vol.id, host)))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        drop_caches()
        digests: list[str] = []
        start = time.perf_counter()
        threads = [threading.Thread(target=lambda: digests.append(sha256_of(path))) for _ in range(args.readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        d3.stop()
        left = len(host_attachments(cinder, vol.id, host))
        rows.append((f"{args.readers} cold readers: wall time", f"{wall:.2f} s", f"{args.readers * size / wall / 1e6:.0f} MB/s aggregate"))
        rows.append((f"{args.readers} cold readers: attachments in Cinder", f"max {max(seen or [0])}", f"after SIGTERM: {left}"))
        rows.append((f"{args.readers} cold readers: sha256", "OK" if digests == [digest] * args.readers else "MISMATCH", ""))
    finally:
        for proc in subprocess.run(["pgrep", "-f", f"imgfs mount {work}/mnt"], capture_output=True, text=True).stdout.split():
            os.kill(int(proc), signal.SIGTERM)
        if volume_id:
            for att in cinder.attachments.list(search_opts={"volume_id": volume_id}):
                cinder.attachments.delete(att.id)
            try:
                wait_volume(cinder, volume_id, "available", timeout=60)
                cinder.volumes.delete(volume_id)
            except Exception as e:  # noqa: BLE001
                print(f"could not delete volume {volume_id}: {e}", file=sys.stderr)
        ioctx.close()
        cluster.shutdown()
        if started_lab:
            subprocess.run([str(REPO / "tests/lab/down")], check=False)

    load = open("/proc/loadavg").read().split()[:3]
    print(f"\nimgfs Cinder path, {args.size_mib} MiB image-volume, RBD via os-brick (librbd), loadavg {' '.join(load)}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    return 0 if all("MISMATCH" not in r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
