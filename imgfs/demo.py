"""``imgfs demo``: the whole job on an embedded default, on loopback only.

Builds a real ext4 disk image, serves it from a local S3 server (moto's server mode) exactly as Glance's
S3 store keeps images (bucket ``glance``, object key = image id) -- or, where moto (the demo extra)
is not installed, as a node's package is, from a file store directory as Glance's file store keeps
them -- mounts it with imgfs as a separate
process (as systemd would run it), reads it back through the mount and checks its sha256, then waits
for Ctrl-C. Everything it starts it stops; everything it writes is under ``--workdir``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "imgfs-demo-access", "imgfs-demo-secret"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _build_disk(work: Path, size_mib: int) -> Path:
    content = work / "content"
    shutil.rmtree(content, ignore_errors=True)
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("imgfs-demo\n")
    (content / "README.txt").write_text("This ext4 filesystem was served by imgfs from an S3 object.\n")
    (content / "random.bin").write_bytes(os.urandom(min(16, size_mib // 4) << 20))
    disk = work / "disk.raw"
    disk.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "imgfs-demo", "-d", str(content), str(disk), f"{size_mib}M"],
                   check=True, stdout=subprocess.DEVNULL)
    return disk



def _serve_from_s3(work: Path, disk: Path, image_id: str, procs: list[subprocess.Popen]) -> Path:
    """The disk uploaded to a local S3 server (moto) as Glance's S3 store lays it out; its glance-api.conf."""
    import boto3

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    _say(f"2. starting a local S3 server (moto) on {url} ...")
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(work / "s3.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(moto)

    def s3_up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    _wait(s3_up, 30, "the S3 server")
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
    s3.create_bucket(Bucket="glance")
    s3.upload_file(str(disk), "glance", image_id)
    _say(f"   uploaded as s3://glance/{image_id} (Glance's S3 store layout)")
    glance_conf = work / "glance-api.conf"
    glance_conf.write_text(
        "[DEFAULT]\nenabled_backends = s3store:s3\n\n[glance_store]\ndefault_backend = s3store\n\n"
        f"[s3store]\ns3_store_host = {url}\ns3_store_access_key = {ACCESS_KEY}\n"
        f"s3_store_secret_key = {SECRET_KEY}\ns3_store_bucket = glance\ns3_store_bucket_url_format = path\n"
    )
    return glance_conf


def _serve_from_files(work: Path, disk: Path, image_id: str) -> Path:
    """The disk in a file store directory as Glance's file store lays it out; its glance-api.conf."""
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    shutil.copyfile(disk, images / image_id)
    _say("2. moto (pip install 'imgfs[demo]') is not installed here: serving the disk from a file store")
    _say(f"   {images / image_id} (Glance's file store layout)")
    glance_conf = work / "glance-api.conf"
    glance_conf.write_text("[DEFAULT]\nenabled_backends = filestore:file\n\n[glance_store]\ndefault_backend = filestore\n\n"
                           f"[filestore]\nfilesystem_store_datadir = {images}\n")
    return glance_conf

def run_demo(workdir: str, size_mib: int, *, wait: bool) -> int:
    for tool in ("mkfs.ext4", "debugfs", "fusermount3"):
        if shutil.which(tool) is None:
            _say(f"imgfs demo: '{tool}' is missing; install e2fsprogs and fuse3 (apt-get install e2fsprogs fuse3)")
            return 2
    work = Path(workdir).resolve()
    mnt = work / "mnt"
    if mnt.is_dir() and os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    mnt.mkdir(exist_ok=True)

    _say(f"1. building a {size_mib} MiB ext4 disk image with mkfs.ext4 ...")
    disk = _build_disk(work, size_mib)
    digest = _sha256(disk)
    image_id = str(uuid.uuid4())
    _say(f"   {disk}  sha256 {digest}")

    procs: list[subprocess.Popen] = []
    # moto is the demo extra: an installed package (a node) has no mock S3 server, and serves the same
    # disk from a file store instead, so the demo still proves FUSE and the daemon work on that node.
    s3_demo = importlib.util.find_spec("moto") is not None
    backend = "s3store" if s3_demo else "filestore"
    try:
        if s3_demo:
            glance_conf = _serve_from_s3(work, disk, image_id, procs)
        else:
            glance_conf = _serve_from_files(work, disk, image_id)
        imgfs_conf = work / "imgfs.conf"
        imgfs_conf.write_text(f"[imgfs]\ncache_dir = {work / 'cache'}\ncache_max_size_gb = 1\nchunk_size_mb = 4\n")

        _say(f"3. mounting imgfs at {mnt} ...")
        cmd = [sys.executable, "-m", "imgfs", "mount", str(mnt), "--config-file", str(glance_conf), "--config-file", str(imgfs_conf)]
        daemon = subprocess.Popen(cmd, stdout=open(work / "imgfs.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(daemon)
        image = mnt / "images" / image_id

        def mounted() -> bool:
            if daemon.poll() is not None:
                raise RuntimeError(f"imgfs exited with {daemon.returncode}; see {work / 'imgfs.log'}")
            return image.exists()

        _wait(mounted, 60, "the mount")
        _say(f"   $ ls -l {mnt / 'images'}")
        _say("   " + subprocess.run(["ls", "-l", str(mnt / "images")], capture_output=True, text=True).stdout.strip().replace("\n", "\n   "))

        _say("4. reading the image through the mount ...")
        start = time.monotonic()
        got = _sha256(image)
        cold = time.monotonic() - start
        ok = got == digest
        _say(f"   sha256 {got}  {'MATCHES the source' if ok else 'DOES NOT MATCH the source'} (cold read {cold:.2f}s)")
        fs = subprocess.run(["debugfs", "-R", "ls -l /", str(image)], capture_output=True, text=True)
        _say("   the file is a real ext4 filesystem; debugfs reading it through the mount sees:")
        _say("   " + "\n   ".join(line for line in fs.stdout.splitlines() if line.strip()))
        for name in sorted(os.listxattr(image)):
            _say(f"   xattr {name} = {os.getxattr(image, name).decode()}")
        if not ok:
            return 1

        _say()
        _say("Look around (in another shell):")
        _say(f"   ls -l {mnt}/images {mnt}/stores/{backend}")
        _say(f"   getfattr -d {image}")
        _say(f"   qemu-img info {image}        # if qemu-utils is installed")
        _say(f"   debugfs -R 'cat /README.txt' {image}")
        _say(f"   logs: {work / 'imgfs.log'}   config: {glance_conf} {imgfs_conf}")
        if wait:
            _say(f"Stop: press Ctrl-C here (imgfs unmounts{', the S3 server stops' if s3_demo else ''}).")
            # Blocked first so that either signal ends the wait here and the cleanup below still runs.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        _say(f"stopped: imgfs unmounted{', S3 server stopped' if s3_demo else ''} (files left in {work})")
