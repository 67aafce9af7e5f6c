"""What random reads cost the store through a real FUSE mount (the kernel decides the READ sizes imgfs
sees), counted at the S3 proxy: a random 4 KiB read fetches one 64 KiB block."""

from __future__ import annotations

import os
import random

import pytest

from .conftest import write_config

pytestmark = pytest.mark.mount

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
IMAGE = "4a4a4a4a-0000-4000-8000-00000000000a"


@pytest.mark.parametrize("advice", ["random", "normal"])
def test_random_4k_reads_through_the_mount_fetch_one_block_each(tmp_path, proxy, s3, mounter, advice):
    size = 64 * MiB
    data = random.Random(3).randbytes(size)
    s3.put_object(Bucket=s3.bucket, Key=IMAGE, Body=data)
    conf = write_config(tmp_path / "imgfs.conf", s3_url=proxy.url, bucket=s3.bucket, cache_dir=tmp_path / "cache",
                        access=s3.server.access_key, secret=s3.server.secret_key, prefetch_max_mb=0)
    m = mounter(conf)
    rng = random.Random(11)
    # 100 reads, each in a 64 KiB block of its own and never next to another (no neighbour growth)
    blocks = sorted(rng.sample(range(0, size // BLOCK, 4), 100))
    rng.shuffle(blocks)
    proxy.reset()
    fd = os.open(m.images / IMAGE, os.O_RDONLY)
    try:
        if advice == "random":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for b in blocks:
            offset = b * BLOCK + rng.randrange(0, BLOCK - 4 * KiB, 4 * KiB)
            assert os.pread(fd, 4 * KiB, offset) == data[offset:offset + 4 * KiB]
    finally:
        os.close(fd)
    fetched = sum(r.body_bytes for r in proxy.gets(IMAGE))
    print(f"\n100 random 4 KiB reads ({advice} advice): {fetched / KiB:.0f} KiB from the store, "
          f"{len(proxy.gets(IMAGE))} GETs")
    if advice == "random":  # the kernel sends 4 KiB READs: exactly one block per read
        assert fetched == 100 * BLOCK and len(proxy.gets(IMAGE)) == 100
    else:  # the kernel may widen a READ by its readahead (measured here: it did not, 6400 KiB): never a chunk
        assert fetched <= 100 * 2 * BLOCK, fetched
    assert m.stop() == 0
