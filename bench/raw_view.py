"""raw/ against the ways a node gets a raw disk out of a qcow2 image today, with the lab up.

The image: bench/image.py's compressed qcow2 (qemu-img convert -c, zlib, 64 KiB clusters) of an ext4
disk (--disk-mib, 1 GiB by default) whose files are half random, half compressible, so the qcow2 holds
compressed and stored clusters and zero ranges as cloud images do. It is uploaded to the lab's real
Glance as disk_format qcow2 (s3store, on RGW); imgfs mounts with the Glance catalog. The same bytes go
to a public-read object on the same RGW for qemu-storage-daemon, which has no S3 signer.

Each row starts its daemon fresh (empty caches) and drops the page cache; a copy goes to tmpfs and its
sha256 is checked against the disk's after the clock stops:

- local floor: qemu-img convert -O raw of the qcow2 from a local file to tmpfs (no FUSE, no network);
- local to /dev/null: the same into qemu's null driver (decoded, then dropped: the warm target's measure);
- images/ + qemu: qemu-img convert -f qcow2 of images/<id> (qemu decodes the stored object imgfs serves);
- raw/ + qemu: qemu-img convert -f raw of raw/<id> (imgfs decodes; qemu skips holes with SEEK_HOLE);
- raw/ + cp: cp --sparse=auto of raw/<id> (SEEK_DATA/SEEK_HOLE, st_blocks);
- raw/ + dd: dd bs=1M of raw/<id>, cold (every byte, zeros included: a reader without holes);
- raw/ + dd warm: the same daemon again after a first dd, page cache dropped (its chunk cache holds the
  stored image; every cluster is inflated again);
- raw/ + dd warm to null: the same, dd writing to /dev/null as the local row's qemu-img writes to its
  null driver (the warm target's like for like); the bytes are checked by a sha256sum of raw/<id>
  through the same daemon after the clock stops;
- qsd + dd, qsd + dd warm: qemu-storage-daemon's FUSE export of the object over HTTP (its http driver under
  the qcow2 driver, with a copy-on-read qcow2 overlay in tmpfs: what a storage engineer would reach for);
  warm is the same daemon again, its overlay holding every cluster read.

Each repetition runs the chosen rows in turn. Reports the median of --repeat runs: seconds, MB/s of the virtual disk, the daemon's CPU seconds per GiB
of the virtual disk, the copying tool's CPU seconds (qemu-img's decoding is there), bytes imgfs fetched
from the store (÷ the qcow2's size; qsd's are not counted), and how sparse the copy is.
Run as root: bench/run-raw-view [--repeat N] [--disk-mib M].
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
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


class Public:
    """A public-read copy of the qcow2 on the lab's RGW: qemu's http driver sends no S3 signature."""

    BUCKET = "imgfs-raw-bench-public"

    def __init__(self, lab: Lab, qcow2: Path, key: str) -> None:
        import boto3

        s3 = lab.lab["s3"]
        self.client = boto3.client("s3", endpoint_url=s3["endpoint_url"], region_name=s3["region_name"],
                                   aws_access_key_id=s3["access_key"], aws_secret_access_key=s3["secret_key"])
        self.key = key
        try:
            self.client.create_bucket(Bucket=self.BUCKET)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        self.client.upload_file(str(qcow2), self.BUCKET, key, ExtraArgs={"ACL": "public-read"})
        self.url = f"{s3['endpoint_url'].rstrip('/')}/{self.BUCKET}/{key}"

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.BUCKET, Key=self.key)


@contextlib.contextmanager
def imgfs_daemon(lab: Lab, image_id: str, view: str) -> Iterator[tuple[Path, subprocess.Popen, Callable[[], int]]]:
    """A fresh imgfs (empty cache): the file of ``view`` for the image, the process, its fetched bytes."""
    work = Path(tempfile.mkdtemp(prefix="imgfs-raw-bench-"))
    mnt = work / "mnt"
    mnt.mkdir()
    proc = spawn("imgfs", [PYTHON, "-m", "imgfs", "mount", str(mnt), *lab.config(work)], work / "imgfs.log")
    try:
        target = mnt / view / image_id
        wait_for(target.exists, 60, f"{target} in the mount", proc=proc, log_path=work / "imgfs.log")
        yield target, proc, lambda: fetched_bytes(work / "control.sock")
    finally:
        stop(proc)
        unmount(mnt)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def qsd_export(url: str, virtual_size: int) -> Iterator[tuple[Path, subprocess.Popen, None]]:
    """qemu-storage-daemon exporting the image's raw disk over FUSE: http -> qcow2 -> a copy-on-read
    overlay (a qcow2 in tmpfs whose backing is the remote image, given at run time)."""
    work = Path(tempfile.mkdtemp(prefix="imgfs-raw-bench-qsd-", dir="/dev/shm"))
    overlay, export = work / "overlay.qcow2", work / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), str(virtual_size)], check=True)
    export.touch()
    proc = spawn("qemu-storage-daemon", [
        "qemu-storage-daemon",
        "--blockdev", json.dumps({"driver": "http", "node-name": "web", "url": url, "read-only": True}),
        "--blockdev", json.dumps({"driver": "qcow2", "node-name": "image", "file": "web", "read-only": True}),
        "--blockdev", json.dumps({"driver": "qcow2", "node-name": "overlay", "backing": "image",
                                  "file": {"driver": "file", "filename": str(overlay)}}),
        "--blockdev", json.dumps({"driver": "copy-on-read", "node-name": "cor", "file": "overlay"}),
        "--export", f"type=fuse,id=disk,node-name=cor,mountpoint={export},writable=off",
    ], work / "qsd.log")
    try:
        wait_for(lambda: export.stat().st_size == virtual_size, 30, "qemu-storage-daemon's FUSE export", proc=proc,
                 log_path=work / "qsd.log")
        yield export, proc, None
    finally:
        stop(proc)
        unmount(export)
        shutil.rmtree(work, ignore_errors=True)


def copy_cmd(row: str, src: Path, out: Path, virtual: int) -> list[str]:
    if row == "local to /dev/null":  # qemu's null driver: decoded and dropped (qemu-img cannot grow /dev/null)
        return ["qemu-img", "convert", "-n", "-f", "qcow2", str(src), "--target-image-opts",
                f"driver=null-co,size={virtual}"]
    if row.startswith(("local", "images/")):
        return ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(out)]
    if row == "raw/ + qemu":
        return ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(out)]
    if row == "raw/ + cp":
        return ["cp", "--sparse=auto", str(src), str(out)]
    if row.endswith("to null"):
        return ["dd", f"if={src}", "of=/dev/null", "bs=1M", "status=none"]
    return ["dd", f"if={src}", f"of={out}", "bs=1M", "status=none"]


RUN_TIMEOUT = 300.0  # seconds one copy may take; a peer that hangs fails that run, not the bench


def timed(row: str, src: Path, out: Path, want: str, proc: subprocess.Popen | None, virtual: int) -> dict:
    drop_caches()
    cpu0 = cpu_seconds(proc.pid) if proc else 0.0
    tool0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        subprocess.run(copy_cmd(row, src, out, virtual), check=True, capture_output=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{row}: no end after {RUN_TIMEOUT:.0f} s (hung)") from None
    except subprocess.CalledProcessError as e:
        raise BenchError(f"{row}: {e.cmd[0]} failed: {e.stderr.decode(errors='replace').strip()[-200:]}") from None
    seconds = time.monotonic() - started
    tool1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_seconds(proc.pid) - cpu0 if proc else 0.0
    if row.endswith("dd warm to null"):  # what dd dropped, read again through the same path, untimed
        got = sha256_file(src)
        if got != want:
            raise BenchError(f"{row}: the disk's bytes through raw/ have sha256 {got}, the disk's {want}")
        allocated = 0.0
    elif "null" not in row:
        got = sha256_file(out)
        if got != want:
            raise BenchError(f"{row}: the copy's sha256 is {got}, the disk's {want}")
        st = out.stat()
        allocated = st.st_blocks * 512 / st.st_size
        out.unlink()
    else:
        allocated = 0.0
    return {"seconds": seconds, "mb_s": virtual / seconds / 1e6, "daemon_cpu_s_per_gib": cpu / (virtual / 2**30),
            "tool_cpu_s": (tool1.ru_utime + tool1.ru_stime) - (tool0.ru_utime + tool0.ru_stime),
            "copy_allocated_x": allocated}


def one(lab: Lab, image_id: str, public: Public, row: str, qcow2: Path, out: Path, want: str, virtual: int) -> dict:
    stored = qcow2.stat().st_size
    if row.startswith("local"):
        r = timed(row, qcow2, out, want, None, virtual)
        return {**r, "fetched_x": 1.0}
    if row.startswith("qsd"):
        with qsd_export(public.url, virtual) as (src, proc, _):
            if row.endswith("warm"):
                timed("qsd + dd", src, out, want, proc, virtual)  # fills the copy-on-read overlay
            return {**timed("qsd + dd", src, out, want, proc, virtual), "fetched_x": None}
    view = "images" if row.startswith("images") else "raw"
    with imgfs_daemon(lab, image_id, view) as (src, proc, fetched):
        before = 0
        if "warm" in row:
            timed("raw/ + dd", src, out, want, proc, virtual)  # the cold pass fills imgfs's chunk cache
            before = fetched()
        r = timed(row.removesuffix(" warm"), src, out, want, proc, virtual)
        return {**r, "fetched_x": (fetched() - before) / stored}


# The warm target's pair: raw/ read again from imgfs's chunk cache, and qemu-img decoding a local copy.
WARM_TARGET = ("raw/ + dd warm to null", "local to /dev/null")
ROWS = ("local floor", "local to /dev/null", "images/ + qemu", "raw/ + qemu", "raw/ + cp", "raw/ + dd",
        "raw/ + dd warm", "raw/ + dd warm to null", "qsd + dd", "qsd + dd warm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=1024, help="the ext4 disk's size (the qcow2's virtual size)")
    ap.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated")
    ap.add_argument("--json")
    args = ap.parse_args()
    chosen = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in chosen if r not in ROWS]
    if unknown:
        raise BenchError(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    qcow2, raw, want = ensure_qcow2(STATE / "images", args.disk_mib, "ext4-mixed")
    virtual = raw.stat().st_size
    info = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(qcow2)], capture_output=True, text=True,
                                     check=True).stdout)
    data = sum(e["length"] for e in info if e["data"])
    lab = Lab()
    image_id = lab.upload(qcow2)
    public = Public(lab, qcow2, image_id)
    log(f"uploaded {qcow2.name} ({qcow2.stat().st_size / 2**20:.0f} MiB qcow2 of a {virtual >> 20} MiB disk, "
        f"{data >> 20} MiB of it data) to Glance as {image_id}, and to {public.url} for qemu-storage-daemon")
    out = Path("/dev/shm") / f"imgfs-raw-bench-{os.getpid()}.raw"
    rows = []
    order = [r for r in ROWS if r in chosen]
    samples: dict[str, list[dict | None]] = {row: [] for row in order}
    failures: dict[str, list[str]] = {row: [] for row in order}
    try:
        # Rows in turn within each repetition, not one row's runs back to back: this VM's speed drifts
        # by 15-30% over minutes, and a ratio of two rows is only worth something if they ran together.
        for _ in range(args.repeat):
            for row in order:
                try:
                    samples[row].append(one(lab, image_id, public, row, qcow2, out, want, virtual))
                except BenchError as e:  # a peer hanging or failing is a result too: said, not fatal
                    samples[row].append(None)
                    failures[row].append(str(e))
                    log(f"{row}: a run failed: {e}")
        for row in order:
            runs = [r for r in samples[row] if r is not None]
            med = {k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None) for k in runs[0]} \
                if runs else {}
            rows.append({"row": row, **med, "runs": len(runs), "failed": failures[row],
                         "samples_s": [r and r["seconds"] for r in samples[row]]})
            log(f"{row}: {json.dumps(rows[-1])}")
    finally:
        out.unlink(missing_ok=True)
        public.delete()
        lab.delete(image_id)
    print(f"\n{virtual >> 20} MiB ext4 disk ({data >> 20} MiB data) as a {qcow2.stat().st_size / 2**20:.0f} MiB compressed "
          f"qcow2 in Glance (s3store on RGW); fresh daemon and cache per row, page cache dropped; median of {args.repeat}")
    print(f"{'':<20} {'seconds':>8} {'MB/s':>7} {'daemon CPU s/GiB':>16} {'tool CPU s':>10} {'fetched/qcow2':>13} "
          f"{'copy allocated':>14}")
    for r in rows:
        failed = f"  ({len(r['failed'])} of {args.repeat} runs failed: {r['failed'][0]})" if r["failed"] else ""
        if not r["runs"]:
            print(f"{r['row']:<20} every run failed: {r['failed'][0]}")
            continue
        fetched = "-" if r["fetched_x"] is None else f"{r['fetched_x']:.3f}"
        print(f"{r['row']:<20} {r['seconds']:>8.2f} {r['mb_s']:>7.0f} {r['daemon_cpu_s_per_gib']:>16.2f} "
              f"{r['tool_cpu_s']:>10.2f} {fetched:>13} {r['copy_allocated_x']:>14.2f}{failed}")
    pairs = [(a["seconds"], b["seconds"]) for a, b in zip(samples.get(WARM_TARGET[0], []), samples.get(WARM_TARGET[1], []))
             if a and b]
    if pairs:
        ratios = sorted(local / ours for ours, local in pairs)
        print(f"\nwarm target, {WARM_TARGET[0]!r} against {WARM_TARGET[1]!r} in the same repetition "
              f"(local seconds / imgfs seconds; target >= 0.8): median {statistics.median(ratios):.2f}, "
              f"each {', '.join(f'{r:.2f}' for r in ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
