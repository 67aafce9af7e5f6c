"""Cinder's volume-from-image, two ways, on the real lab (Keystone + Glance multi-store + Cinder/RBD):

  download  what Cinder does today: GET the image from Glance into a local file, then
            qemu-img convert that file into the new volume (rbd:volumes/volume-<id>)
  imgfs     qemu-img convert straight from images/<id> in an imgfs mount (Glance catalog)

each for a 1 GiB image, the first and the second time (imgfs's second time reads its chunk cache).
Every copy is read back with librbd and checked by sha256 against the source.

    ./bench/run-glance-copy [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import LAB_DIR, wait_for, wait_volume  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_cinder", Path(__file__).parent / "cinder.py")
bench_cinder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_cinder)  # type: ignore[union-attr]
Daemon, drop_caches = bench_cinder.Daemon, bench_cinder.drop_caches
MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    size = args.size_mib * MiB
    started_lab = False
    if not (LAB_DIR / "lab.json").exists():
        subprocess.run([str(REPO / "tests/lab/up")], check=True)
        started_lab = True
    lab = json.loads((LAB_DIR / "lab.json").read_text())

    import rbd

    sess, cinder, cluster, ioctx = bench_cinder.lab_clients(lab, timeout=600)
    u = lab["keystone"]["users"]["imgfs"]
    glance = sess.get_endpoint(service_type="image", interface="public", region_name=lab["keystone"]["region_name"]).rstrip("/")
    ceph = lab["ceph"]
    work = Path(tempfile.mkdtemp(prefix="imgfs-bench-glance-"))
    source = work / "source.raw"
    with open(source, "wb") as f:
        for _ in range(0, size, 64 * MiB):
            f.write(os.urandom(64 * MiB))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    image_id = None
    volumes: list[str] = []
    rows = []
    try:
        img = sess.post(f"{glance}/v2/images", json={"name": f"bench-{uuid.uuid4().hex[:6]}", "disk_format": "raw",
                                                     "container_format": "bare"}).json()
        image_id = img["id"]
        t = time.perf_counter()
        with open(source, "rb") as f:
            sess.put(f"{glance}/v2/images/{image_id}/file", data=f, headers={"Content-Type": "application/octet-stream"})
        print(f"uploaded {args.size_mib} MiB to Glance (s3store) in {time.perf_counter() - t:.1f}s", file=sys.stderr)

        def new_volume() -> str:
            vol = cinder.volumes.create(size=-(-size // (1024 * MiB)), name=f"bench-target-{uuid.uuid4().hex[:6]}",
                                        volume_type=lab["cinder"]["volume_types"]["default"])
            volumes.append(vol.id)
            wait_volume(cinder, vol.id, "available")
            return vol.id

        def target(volume_id: str) -> str:
            return f"rbd:{ceph['rbd_pool']}/volume-{volume_id}:id={ceph['rbd_user']}:conf={ceph['conf']}:keyring={ceph['client_cinder_keyring']}"

        def check(volume_id: str) -> str:
            h = hashlib.sha256()
            with rbd.Image(ioctx, f"volume-{volume_id}", read_only=True) as vimg:
                for off in range(0, size, 64 * MiB):
                    h.update(vimg.read(off, min(64 * MiB, size - off)))
            return "OK" if h.hexdigest() == digest else "MISMATCH"

        def convert(src: str, volume_id: str) -> float:
            t = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t", "none", "-n", src, target(volume_id)], check=True)
            return time.perf_counter() - t

        for attempt in ("first", "second"):
            vol = new_volume()
            drop_caches()
            tmp = work / "download.raw"
            t = time.perf_counter()
            with sess.get(f"{glance}/v2/images/{image_id}/file", stream=True) as resp, open(tmp, "wb") as out:
                for block in resp.iter_content(4 * MiB):
                    out.write(block)
            t_down = time.perf_counter() - t
            t_conv = convert(str(tmp), vol)
            tmp.unlink()
            rows.append((f"download from Glance, then convert ({attempt})", t_down + t_conv,
                         f"download {t_down:.1f}s + convert {t_conv:.1f}s", check(vol)))

        conf = work / "imgfs.conf"
        conf.write_text(
            f"[imgfs]\ncatalog = glance\ncache_dir = {work / 'cache'}\nhost = bench-{uuid.uuid4().hex[:6]}\n\n"
            f"[glance_catalog]\nauth_url = {lab['keystone']['auth_url']}\nusername = {u['username']}\npassword = {u['password']}\n"
            f"project_name = {u['project_name']}\nregion_name = {lab['keystone']['region_name']}\n\n"
            f"[cinderstore]\nrbd_keyring_file = {ceph['client_cinder_keyring']}\n")
        d = Daemon([lab["glance"]["conf"], conf], work / "mnt", work / "imgfs.log")
        path = work / "mnt" / "images" / image_id
        wait_for(path.exists, 30, "the image in the mount")
        for attempt in ("first", "second"):
            vol = new_volume()
            drop_caches()
            t_conv = convert(str(path), vol)
            rows.append((f"qemu-img convert from the imgfs mount ({attempt})", t_conv,
                         "cold: fetched from S3 through the cache" if attempt == "first" else "warm: from imgfs's chunk cache",
                         check(vol)))
        d.stop()
    finally:
        for volume_id in volumes:
            try:
                cinder.volumes.delete(volume_id)
            except Exception as e:  # noqa: BLE001
                print(f"could not delete volume {volume_id}: {e}", file=sys.stderr)
        if image_id:
            sess.delete(f"{glance}/v2/images/{image_id}", raise_exc=False)
        ioctx.close()
        cluster.shutdown()
        subprocess.run(["rm", "-rf", str(work)], check=False)
        if started_lab:
            subprocess.run([str(REPO / "tests/lab/down")], check=False)

    print(f"\nvolume from a {args.size_mib} MiB image (Glance s3store -> Cinder RBD volume), loadavg "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    base = rows[0][1]
    for name, seconds, how, ok in rows:
        print(f"{name:<48} {seconds:6.1f} s  {size / seconds / 1e6:6.0f} MB/s  {base / seconds:5.2f}x  sha256 {ok}  ({how})")
    return 0 if all(r[3] == "OK" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
