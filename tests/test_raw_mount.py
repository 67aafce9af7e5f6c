"""raw/ through a real kernel mount, with the lab's real Glance as the catalog: a compressed qcow2 image
uploaded to Glance is, under raw/<id>, the raw disk qemu-img itself sees in it (qemu-img compare is the
oracle), and an operator can loop-mount the filesystem inside it; images/<id> stays the stored qcow2."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid

import pytest

from .conftest import REPO, wait_for
from .test_glance import glance, glance_image, imgfs_config, sha512_file, start  # noqa: F401 - fixtures

pytestmark = [pytest.mark.mount, pytest.mark.lab]
MiB = 1 << 20


def upload(glance, path, disk_format: str, container_format: str = "bare") -> dict:  # noqa: F811 - the fixture
    img = glance("POST", "/v2/images", json={"name": f"imgfs-raw-{uuid.uuid4().hex[:6]}", "disk_format": disk_format,
                                             "container_format": container_format, "visibility": "private"}).json()
    glance("PUT", f"/v2/images/{img['id']}/file", data=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    return glance("GET", f"/v2/images/{img['id']}").json()


def ext4_disk(tmp_path, size: str, payload_mib: int) -> tuple:
    """A raw disk holding an ext4 filesystem with one file of random bytes, the rest never written."""
    content, disk = tmp_path / "content", tmp_path / "disk.raw"
    content.mkdir()
    payload = os.urandom(payload_mib * MiB)
    (content / "payload").write_bytes(payload)
    subprocess.run(["truncate", "-s", size, str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "imgfs", "-d", str(content), str(disk)], check=True, capture_output=True)
    return disk, payload


def payload_inside(raw, tmp_path) -> bytes:
    """The file in the filesystem inside ``raw``, read through a read-only loop device over the FUSE file."""
    where = tmp_path / "inside"
    where.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(raw), str(where)], check=True, capture_output=True)
    try:
        return (where / "payload").read_bytes()
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("mkfs.ext4")), reason="needs qemu-utils and e2fsprogs")
def test_a_qcow2_image_in_glance_is_a_raw_disk_qemu_img_agrees_with_and_loop_mounts(tmp_path, lab, glance, mounter):  # noqa: F811
    disk, payload = ext4_disk(tmp_path, "48M", 5)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(disk), str(image)], check=True)
    img = upload(glance, image, "qcow2")
    try:
        m = start(mounter, tmp_path, imgfs_config(tmp_path, lab))
        raw = m.path / "raw" / img["id"]
        wait_for(raw.exists, 30, "the image's raw disk in the mount")
        assert raw.stat().st_size == disk.stat().st_size
        assert os.getxattr(raw, "user.imgfs.decoded_from") == b"qcow2"
        # qemu-img reads both through its own drivers: the raw file through the mount, the qcow2 from disk
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(image)],
                             capture_output=True, text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        assert hashlib.sha256(raw.read_bytes()).digest() == hashlib.sha256(disk.read_bytes()).digest()
        info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "raw", str(raw)], capture_output=True,
                              text=True, check=True).stdout
        assert f'"virtual-size": {disk.stat().st_size}' in info
        # holes: the patched pyfuse3 (what the set-up installs, patches/pyfuse3) passes SEEK_DATA/SEEK_HOLE
        # on and st_blocks says what is allocated; with stock pyfuse3 the kernel answers (all data)
        path = (REPO / ".venv" / "pyfuse3-patch.status").read_text().strip()
        st = raw.stat()
        fd = os.open(raw, os.O_RDONLY)
        try:
            first_hole = os.lseek(fd, 0, os.SEEK_HOLE)
        finally:
            os.close(fd)
        if path.startswith("patched"):
            assert first_hole < st.st_size and st.st_blocks * 512 < st.st_size / 2, (first_hole, st.st_blocks)
            copy = tmp_path / "copy.raw"  # cp finds the holes and skips them; the bytes are the same
            subprocess.run(["cp", "--sparse=auto", str(raw), str(copy)], check=True)
            assert copy.stat().st_blocks * 512 < st.st_size / 2 and copy.read_bytes() == disk.read_bytes()
        else:
            assert path.startswith("stock: "), path  # the set-up says why it fell back
            assert first_hole == st.st_size and st.st_blocks * 512 >= st.st_size
        # images/<id> is still what Glance stores and serves, digest and all
        assert sha512_file(m.images / img["id"]) == img["os_hash_value"]
        assert payload_inside(raw, tmp_path) == payload  # the filesystem inside, through a loop device
    finally:
        glance("DELETE", f"/v2/images/{img['id']}")


@pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("mkfs.ext4")), reason="needs qemu-utils and e2fsprogs")
def test_a_fixed_vhd_in_glance_is_its_disk_without_the_footer_and_loop_mounts(tmp_path, lab, glance, mounter):  # noqa: F811
    disk, payload = ext4_disk(tmp_path, "24M", 3)
    image, back = tmp_path / "disk.vhd", tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
                    str(disk), str(image)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(image), str(back)], check=True)
    # Glance inspects what is uploaded into a "bare" container, and its (oslo.utils) VHD inspector knows
    # a VHD only by the copy of the footer a dynamic one starts with: a fixed one is "raw" to it, and
    # refused as vhd. It inspects no other container.
    img = upload(glance, image, "vhd", container_format="ovf")
    try:
        m = start(mounter, tmp_path, imgfs_config(tmp_path, lab))
        raw = m.path / "raw" / img["id"]
        wait_for(raw.exists, 30, "the image's raw disk in the mount")
        assert raw.stat().st_size == back.stat().st_size == disk.stat().st_size
        assert os.getxattr(raw, "user.imgfs.decoded_from") == b"vhd"
        assert hashlib.sha256(raw.read_bytes()).digest() == hashlib.sha256(back.read_bytes()).digest()
        assert sha512_file(m.images / img["id"]) == img["os_hash_value"]  # images/<id>: footer and all
        assert payload_inside(raw, tmp_path) == payload
    finally:
        glance("DELETE", f"/v2/images/{img['id']}")
