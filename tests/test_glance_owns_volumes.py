"""imgfs never stands in Glance's way (lab: real Glance, Cinder, Ceph): an image-volume is attached
while chunks are fetched from it, plus a short grace, and let go for good once the image leaves the
catalog, so Glance can delete it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from .conftest import wait_for
from .test_glance import glance, glance_image, imgfs_config, start  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.mount, pytest.mark.lab]
MiB = 1 << 20


def status(m) -> dict:
    out = subprocess.run([sys.executable, "-m", "imgfs", "status", "--json", "--mount", str(m.path)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def attached(m) -> list[str]:
    return [a["volume_id"] for a in status(m)["attachments"] if a["attached"]]


def test_glance_deletes_an_image_imgfs_has_read_from_its_volume(tmp_path, lab, glance, glance_image, mounter):
    img, data = glance_image(3 * MiB + 5, copy_to=("cinderstore",))
    m = start(mounter, tmp_path, imgfs_config(tmp_path, lab, attach_idle_timeout=2, memory_cache_mb=0))
    path = m.path / "stores" / "cinderstore" / img["id"]
    wait_for(path.exists, 30, "the image-volume in the mount")
    volume_id = os.getxattr(path, "user.imgfs.version").decode()
    assert path.read_bytes() == data
    t = status(m)["attachment_totals"][0]
    assert t["attaches"] == 1 and t["fetches"] >= 1
    # the attachment outlives the last fetch by the grace only, though nobody closed anything yet
    wait_for(lambda: volume_id not in attached(m), 2 + 10, "imgfs to let go of the image-volume")
    glance("DELETE", f"/v2/images/{img['id']}")  # the fixture asserts < 400: no HTTP 500 from a held volume
    wait_for(lambda: img["id"] not in os.listdir(m.path / "stores" / "cinderstore"), 20, "the mount to drop the image")
    assert volume_id not in attached(m)
    assert "detached volume " + volume_id in m.log() and "(idle) after" in m.log()


def test_an_open_file_of_a_deleted_image_gets_a_clean_error_never_other_bytes(tmp_path, lab, glance, glance_image,
                                                                            mounter):
    """The file is open and fully cached when Glance deletes the image. Before the catalog notices, a
    read gets the right bytes (page cache or chunk cache). Once it shows the image gone, imgfs drops the
    kernel's cache of the file and the image's chunks and never attaches the volume again: the kernel,
    revalidating the file's attributes, is told the image no longer exists (ENOENT); a read that got
    as far as the reader would fail with EIO. Never other bytes."""
    img, data = glance_image(2 * MiB, copy_to=("cinderstore",))
    m = start(mounter, tmp_path, imgfs_config(tmp_path, lab, attach_idle_timeout=1, memory_cache_mb=0))
    path = m.path / "stores" / "cinderstore" / img["id"]
    wait_for(path.exists, 30, "the image-volume in the mount")
    volume_id = os.getxattr(path, "user.imgfs.version").decode()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 0) == data
        wait_for(lambda: volume_id not in attached(m), 1 + 10, "imgfs to let go of the image-volume")
        glance("DELETE", f"/v2/images/{img['id']}")
        assert os.pread(fd, MiB, 0) == data[:MiB]  # maybe the page cache, maybe imgfs's chunk cache: right bytes
        wait_for(lambda: img["id"] not in os.listdir(m.path / "stores" / "cinderstore"), 20, "the catalog to drop it")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as info:
            os.pread(fd, MiB, MiB)
        assert info.value.errno in (errno.ENOENT, errno.EIO), info.value
    finally:
        os.close(fd)
    assert volume_id not in attached(m)
    assert "not attaching it again" in m.log() or "detaching it" in m.log()
    assert status(m)["attachment_totals"][0]["attaches"] == 1  # the gone volume was not attached again
