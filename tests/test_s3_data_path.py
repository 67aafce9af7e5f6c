"""The S3 store's data path: ranged GETs signed with botocore's SigV4 signer and sent through botocore's
urllib3 session, not through boto3's get_object (s3_ranged.py says why). Against real S3 servers
(moto, Ceph RGW), through the counting proxy."""

from __future__ import annotations

import contextlib

import pytest

from imgfs.backends.s3 import S3Backend
from imgfs.backends.s3_ranged import _client_error
from imgfs.config import ImgfsOptions, S3StoreConfig
from imgfs.errors import BackendError, StaleImage

from .conftest import random_bytes

MiB = 1 << 20


def backend_for(proxy, s3, **options) -> S3Backend:
    cfg = S3StoreConfig(name="s3", endpoint_url=proxy.url, bucket=s3.bucket, access_key=s3.server.access_key,
                        secret_key=s3.server.secret_key, addressing_style="path")
    return S3Backend(cfg, ImgfsOptions(**options))


@contextlib.contextmanager
def stored(s3, proxy, data: bytes, **options):
    """The object "img" holding ``data``, and a backend (through the proxy) with its location."""
    s3.put_object(Bucket=s3.bucket, Key="img", Body=data)
    backend = backend_for(proxy, s3, **options)
    try:
        loc = backend.stat("img")
        assert loc is not None and loc.size == len(data)
        yield backend, loc
    finally:
        backend.close()


def test_ranged_reads_are_exact_and_bypass_boto3s_operation_pipeline(s3, proxy):
    data = random_bytes(3 * MiB + 7, 5)
    s3.put_object(Bucket=s3.bucket, Key="img", Body=data)
    backend = backend_for(proxy, s3)
    operations: list[str] = []
    backend.client.meta.events.register("before-call.s3", lambda model, **_: operations.append(model.name))
    try:
        loc = backend.stat("img")
        assert loc is not None and loc.size == len(data)
        ranges = [(0, 65536), (MiB - 5, 10), (3 * MiB, 7), (0, len(data))]
        for offset, length in ranges:
            assert backend.read(loc, offset, length) == data[offset:offset + length]
    finally:
        backend.close()
    assert operations == ["HeadObject"]  # the reads never went through boto3's get_object
    gets = proxy.gets("img")
    assert [g.range for g in gets] == [f"bytes={o}-{o + n - 1}" for o, n in ranges]
    assert all(g.status == 206 for g in gets)


def test_a_replaced_or_deleted_object_is_stale_not_other_bytes(s3, proxy):
    with stored(s3, proxy, random_bytes(MiB, 6), s3_max_attempts=1) as (backend, loc):
        s3.put_object(Bucket=s3.bucket, Key="img", Body=random_bytes(MiB, 7))
        with pytest.raises(StaleImage, match="changed"):
            backend.read(loc, 0, 4096)
        s3.delete_object(Bucket=s3.bucket, Key="img")
        with pytest.raises(StaleImage, match="deleted"):
            backend.read(loc, 0, 4096)


def test_an_error_answer_names_the_store_never_a_key(s3, proxy):
    with stored(s3, proxy, random_bytes(MiB, 8), s3_max_attempts=2) as (backend, loc):
        proxy.inject("status", "img", status=503)
        with pytest.raises(BackendError) as failed:
            backend.read(loc, 0, 4096)
    text = str(failed.value)
    assert "HTTP 503 SlowDown" in text and proxy.url in text and s3.bucket in text
    assert s3.server.access_key not in text and s3.server.secret_key not in text
    assert len(proxy.gets("img")) == 2  # s3_max_attempts, each one request


@pytest.mark.parametrize("status, body, code", [
    (412, b'<?xml version="1.0"?><Error><Code>PreconditionFailed</Code><Message>m</Message></Error>', "PreconditionFailed"),
    (503, b"<Error><Code> SlowDown </Code></Error>", "SlowDown"),
    (404, b"", "404"),                                   # no body: the status, as boto3 reports a HEAD's
    (502, b"<html><body>Bad Gateway</body></html>", "502"),  # a proxy's page, not S3's
    (500, b"not xml at all", "500"),
])
def test_error_answers_read_like_boto3s(status, body, code):
    e = _client_error(status, body)
    assert e.response["Error"]["Code"] == code and e.response["ResponseMetadata"]["HTTPStatusCode"] == status
