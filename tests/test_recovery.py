"""A store unreachable when imgfs starts (a file store's NFS directory not mounted yet, say) does not
stop the mount; imgfs keeps retrying each refresh_interval and serves the store's images once it
answers, saying so in one line."""

from __future__ import annotations

import os

import pytest

from .conftest import sha256, sha256_file, wait_for

pytestmark = pytest.mark.mount

IMAGE = "5a5a5a5a-0000-4000-8000-000000000001"


def test_a_store_unreachable_at_start_comes_back(tmp_path, mounter):
    files = tmp_path / "nfs" / "images"  # does not exist yet
    conf = tmp_path / "imgfs.conf"
    conf.write_text(f"[DEFAULT]\nenabled_backends = f:file\n[f]\nfilesystem_store_datadir = {files}\n"
                    f"[imgfs]\ncache_dir = {tmp_path / 'cache'}\nchunk_size_mb = 1\nrefresh_interval = 1\n")
    m = mounter(conf)
    assert os.listdir(m.images) == []
    wait_for(lambda: "store 'f': cannot list" in m.log(), 10, "the unreachable store's line")
    data = os.urandom(2 * 1024 * 1024 + 5)
    files.mkdir(parents=True)
    (files / IMAGE).write_bytes(data)
    wait_for(lambda: "store 'f' is reachable again" in m.log(), 15, "the store's listing to work again")
    assert os.listdir(m.images) == [IMAGE]  # listed, not only found by a lookup
    assert sha256_file(m.images / IMAGE) == sha256(data)
    log = m.log()
    assert log.count("store 'f': cannot list") == 1  # one line while it stays down, not one per retry
    assert log.count("store 'f' is reachable again") == 1
    assert m.stop() == 0
