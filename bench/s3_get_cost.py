#!/usr/bin/env python3
"""What one ranged S3 GET costs the client: boto3's get_object against imgfs's two data paths
(imgfs/backends/s3_ranged.py): "imgfs" (presigned once per object, kept http.client connections: the
path without a proxy) and "session" (signed per request, botocore's urllib3 session: the path through
a proxy); on the bench's s3rver, one client thread, interleaved rounds.

    .venv/bin/python bench/s3_get_cost.py [--gets 400] [--rounds 3]

Prints, per client and round: CPU ms per 64 KiB GET (this process's user+system time), p50/p99
latency, and CPU ms per MiB for 8 MiB GETs (a cold sequential reader's chunk). Both clients read the
same random offsets and every answer's length is checked.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import boto3  # noqa: E402
import botocore.config  # noqa: E402

import procs  # noqa: E402
from s3server import ACCESS_KEY, BUCKET, SECRET_KEY, S3rver, ensure_s3rver  # noqa: E402

from imgfs.backends.s3_ranged import RangedGetter  # noqa: E402

STATE = HERE.parent / ".bench"
SMALL, BIG = 64 * 1024, 8 << 20
SIZE = 256 << 20


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gets", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path("/dev/shm/imgfs-s3-get-cost")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    srv = S3rver(ensure_s3rver(STATE), work, STATE / "s3-get-cost.s3rver.log")
    srv.start()
    try:
        image = work.parent / "imgfs-s3-get-cost.img"
        with open(image, "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        srv.upload(image, "img")
        image.unlink()
        client = boto3.client("s3", endpoint_url=srv.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                              config=botocore.config.Config(s3={"addressing_style": "path"},
                                                            retries={"max_attempts": 5, "mode": "standard"},
                                                            response_checksum_validation="when_required",
                                                            request_checksum_calculation="when_required"))
        etag = client.head_object(Bucket=BUCKET, Key="img")["ETag"].strip('"')
        getters = {path: RangedGetter(endpoint_url=srv.endpoint, region="us-east-1", access_key=ACCESS_KEY,
                                      secret_key=SECRET_KEY, cacert=None, connect_timeout=5, read_timeout=30,
                                      max_connections=4, path=path) for path in ("direct", "session")}
        url = f"{srv.endpoint}/{BUCKET}/img"

        def with_boto3(offset: int, length: int) -> bytes:
            r = client.get_object(Bucket=BUCKET, Key="img", Range=f"bytes={offset}-{offset + length - 1}",
                                  IfMatch=f'"{etag}"')
            return r["Body"].read()

        def with_imgfs(offset: int, length: int) -> bytes:
            return getters["direct"].get(url, offset, length, etag).data

        def with_session(offset: int, length: int) -> bytes:
            return getters["session"].get(url, offset, length, etag).data

        rng = random.Random(2)
        small = [rng.randrange(0, SIZE - SMALL, 4096) for _ in range(args.gets)]
        big = [i * BIG for i in range(SIZE // BIG)]
        print(f"{'client':8s} {'round':>5s} {'CPU ms/GET':>11s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU ms/MiB (8 MiB GETs)':>24s}")
        for rnd in range(1, args.rounds + 1):
            for name, get in (("boto3", with_boto3), ("session", with_session), ("imgfs", with_imgfs)):
                lat = []
                c0 = cpu()
                for off in small:
                    t = time.perf_counter()
                    if len(get(off, SMALL)) != SMALL:
                        raise SystemExit(f"{name}: short answer at {off}")
                    lat.append(time.perf_counter() - t)
                per_get = (cpu() - c0) / len(small) * 1e3
                c0 = cpu()
                for off in big:
                    if len(get(off, BIG)) != BIG:
                        raise SystemExit(f"{name}: short answer at {off}")
                per_mib = (cpu() - c0) / (len(big) * BIG / (1 << 20)) * 1e3
                lat.sort()
                print(f"{name:8s} {rnd:5d} {per_get:11.2f} {lat[len(lat) // 2] * 1e3:7.2f} "
                      f"{lat[int(len(lat) * 0.99)] * 1e3:7.2f} {per_mib:24.2f}", flush=True)
        for getter in getters.values():
            getter.close()
    finally:
        srv.stop()
        procs.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
