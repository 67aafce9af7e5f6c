"""raw/ against the ways a node gets a raw disk out of a qcow2 image today, cold, with the lab up.

The image: bench/image.py's compressed qcow2 of a 256 MiB ext4 disk (how cloud images ship), uploaded
to the lab's real Glance as disk_format qcow2 (s3store, on RGW). imgfs mounts with the Glance catalog.
Each row starts a fresh imgfs with an empty cache and drops the page cache, then copies the raw disk
to tmpfs and checks its sha256 against the disk's:

- local floor: qemu-img convert of the qcow2 from a local file (no FUSE, no network);
- images/ + qemu: qemu-img convert -f qcow2 of images/<id> (qemu decodes the stored object imgfs serves);
- raw/ + qemu: qemu-img convert -f raw of raw/<id> (imgfs decodes; qemu skips holes with SEEK_HOLE);
- raw/ + cp: cp --sparse=auto of raw/<id> (SEEK_DATA/SEEK_HOLE, st_blocks);
- raw/ + dd: dd bs=1M of raw/<id> (every byte, zeros included: what a reader without holes pays).

Reports the median of --repeat runs: seconds, imgfs CPU seconds, the copying tool's CPU seconds
(qemu-img's decoding is there), bytes imgfs fetched from the store (÷ the qcow2's size), and how
sparse the copy is. Run as root: bench/run-raw-view [--repeat N].
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from image import ensure_qcow2, sha256_file  # noqa: E402
from procs import BenchError, cpu_seconds, drop_caches, log, spawn, stop, unmount, wait_for  # noqa: E402

PYTHON = str(REPO / ".venv" / "bin" / "python")
STATE = Path(os.environ.get("IMGFS_BENCH_STATE", "/var/tmp/imgfs-bench"))


class Lab:
    def __init__(self) -> None:
        lab_json = Path(os.environ.get("IMGFS_LAB_DIR") or REPO / ".lab") / "lab.json"
        if not lab_json.exists():
            raise BenchError("the lab is not up: run tests/lab/up (raw/ needs Glance as the catalog)")
        self.lab = json.loads(lab_json.read_text())
        sys.path.insert(0, str(REPO))
        from tests.imageapi import token_of

        self.token = token_of(self.lab, "imgfs")
        self.endpoint = self.lab["glance"]["endpoint"].rstrip("/")

    def upload(self, path: Path) -> str:
        import requests

        h = {"X-Auth-Token": self.token}
        img = requests.post(f"{self.endpoint}/v2/images", headers=h, timeout=60,
                            json={"name": "imgfs-raw-bench", "disk_format": "qcow2", "container_format": "bare"}).json()
        with open(path, "rb") as f:
            requests.put(f"{self.endpoint}/v2/images/{img['id']}/file", data=f, timeout=600,
                         headers={**h, "Content-Type": "application/octet-stream"}).raise_for_status()
        return img["id"]

    def delete(self, image_id: str) -> None:
        import requests

        requests.delete(f"{self.endpoint}/v2/images/{image_id}", headers={"X-Auth-Token": self.token}, timeout=60)

    def config(self, d: Path) -> list[str]:
        u = self.lab["keystone"]["users"]["imgfs"]
        text = "\n".join([
            "[imgfs]", "catalog = glance", f"cache_dir = {d / 'cache'}", f"control_socket = {d / 'control.sock'}",
            f"host = imgfs-raw-bench-{uuid.uuid4().hex[:6]}", "",
            "[glance_catalog]", f"auth_url = {self.lab['keystone']['auth_url']}", f"username = {u['username']}",
            f"password = {u['password']}", f"project_name = {u['project_name']}",
            f"region_name = {self.lab['keystone']['region_name']}", "", "[s3store]", "weight = 100", "",
            "[cinderstore]", f"rbd_keyring_file = {self.lab['ceph']['client_cinder_keyring']}", "",
            f"[{self.lab['glance']['single_attach_store']}]", f"rbd_keyring_file = {self.lab['ceph']['client_cinder_keyring']}", ""])
        (d / "imgfs.conf").write_text(text)
        return ["--config-file", self.lab["glance"]["conf"], "--config-file", str(d / "imgfs.conf")]


def fetched_bytes(sock: Path) -> int:
    out = subprocess.run([PYTHON, "-m", "imgfs", "status", "--json", "--socket", str(sock)], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return int(json.loads(out)["fetched_bytes"])


def one(lab: Lab, image_id: str, row: str, qcow2: Path, out: Path, want: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="imgfs-raw-bench-"))
    mnt = work / "mnt"
    mnt.mkdir()
    proc = None
    try:
        if row != "local floor":
            proc = spawn("imgfs", [PYTHON, "-m", "imgfs", "mount", str(mnt), *lab.config(work)], work / "imgfs.log")
            target = mnt / ("images" if row.startswith("images") else "raw") / image_id
            wait_for(target.exists, 60, f"{target} in the mount", proc=proc)
        drop_caches()
        src = {"local floor": qcow2}.get(row) or target
        cmd = {"local floor": ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(out)],
               "images/ + qemu": ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(out)],
               "raw/ + qemu": ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(out)],
               "raw/ + cp": ["cp", "--sparse=auto", str(src), str(out)],
               "raw/ + dd": ["dd", f"if={src}", f"of={out}", "bs=1M", "status=none"]}[row]
        cpu0 = cpu_seconds(proc.pid) if proc else 0.0
        tool0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        subprocess.run(cmd, check=True, capture_output=True, timeout=900)
        seconds = time.monotonic() - started
        tool1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = cpu_seconds(proc.pid) - cpu0 if proc else 0.0
        tool = (tool1.ru_utime + tool1.ru_stime) - (tool0.ru_utime + tool0.ru_stime)
        got = sha256_file(out)
        if got != want:
            raise BenchError(f"{row}: the copy's sha256 is {got}, the disk's {want}")
        fetched = fetched_bytes(work / "control.sock") if proc else qcow2.stat().st_size
        st = out.stat()
        return {"row": row, "seconds": seconds, "imgfs_cpu_s": cpu, "tool_cpu_s": tool, "fetched_x": fetched / qcow2.stat().st_size,
                "copy_allocated_x": st.st_blocks * 512 / st.st_size}
    finally:
        out.unlink(missing_ok=True)
        if proc is not None:
            stop(proc)
            unmount(mnt)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    qcow2, raw, want = ensure_qcow2(STATE / "images")
    lab = Lab()
    image_id = lab.upload(qcow2)
    log(f"uploaded {qcow2.name} ({qcow2.stat().st_size / 2**20:.0f} MiB qcow2 of a {raw.stat().st_size >> 20} MiB disk) "
        f"to Glance as {image_id}")
    out = Path("/dev/shm") / f"imgfs-raw-bench-{os.getpid()}.raw"
    rows = []
    try:
        for row in ("local floor", "images/ + qemu", "raw/ + qemu", "raw/ + cp", "raw/ + dd"):
            runs = [one(lab, image_id, row, qcow2, out, want) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "row"}
            rows.append({"row": row, **med, "runs": len(runs)})
            log(f"{row}: {json.dumps(rows[-1])}")
    finally:
        lab.delete(image_id)
    print(f"\n{raw.stat().st_size >> 20} MiB ext4 disk as a {qcow2.stat().st_size / 2**20:.0f} MiB compressed qcow2 in "
          f"Glance (s3store on RGW); cold: fresh imgfs and cache, page cache dropped; median of {args.repeat}")
    print(f"{'':<16} {'seconds':>8} {'imgfs CPU s':>11} {'tool CPU s':>10} {'fetched/qcow2':>13} {'copy allocated':>14}")
    for r in rows:
        print(f"{r['row']:<16} {r['seconds']:>8.2f} {r['imgfs_cpu_s']:>11.2f} {r['tool_cpu_s']:>10.2f} "
              f"{r['fetched_x']:>13.3f} {r['copy_allocated_x']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
