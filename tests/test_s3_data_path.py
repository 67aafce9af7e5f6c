"""The S3 store's data path: ranged GETs presigned with botocore's SigV4 query signer and sent on kept
http.client connections, or, when an HTTP proxy applies, signed per request and sent through botocore's
urllib3 session; never through boto3's get_object (s3_ranged.py says why). Against real S3 servers
(moto, Ceph RGW), through the counting proxy."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest

from imgfs.backends.s3 import S3Backend
from imgfs.backends.s3_ranged import _client_error
from imgfs.config import ImgfsOptions, S3StoreConfig
from imgfs.errors import BackendError, BackendUnavailable, StaleImage

from .conftest import random_bytes
from .s3proxy import CountingProxy

MiB = 1 << 20


def backend_for(proxy, s3, cacert: str | None = None, **options) -> S3Backend:
    cfg = S3StoreConfig(name="s3", endpoint_url=proxy.url, bucket=s3.bucket, access_key=s3.server.access_key,
                        secret_key=s3.server.secret_key, addressing_style="path", cacert=cacert)
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


def test_without_a_proxy_one_signature_serves_many_gets_on_kept_connections(s3, proxy, monkeypatch):
    import botocore.auth
    import urllib3

    signed: list[str] = []
    real = botocore.auth.S3SigV4QueryAuth.add_auth
    monkeypatch.setattr(botocore.auth.S3SigV4QueryAuth, "add_auth", lambda self, r: (signed.append(r.url), real(self, r))[1])
    data = random_bytes(2 * MiB + 9, 4)
    with stored(s3, proxy, data) as (backend, loc):
        assert backend._getter.path == "direct"
        # boto3's PUT and HEAD went through urllib3; no GET of the data path may
        monkeypatch.setattr(urllib3.connectionpool.HTTPConnectionPool, "urlopen",
                            lambda *a, **k: pytest.fail("the data path went through urllib3 without a proxy"))
        signed.clear()  # the warm-up's
        for offset in range(0, len(data), 64 * 1024):
            assert backend.read(loc, offset, min(65536, len(data) - offset)) == data[offset:offset + 65536]
    gets = proxy.gets("img")
    assert len(gets) == 33 and all(g.status == 206 for g in gets)
    assert len(signed) == 2  # the object's address (asked of boto3, once) and the one presigned GET for all 33
    assert len({g.path for g in gets}) == 1 and "X-Amz-Signature=" in gets[0].path
    assert proxy.connections <= 2  # kept, not one per GET


def test_a_kept_connection_the_server_closed_is_redialled_without_a_retry(s3, proxy, caplog):
    data = random_bytes(MiB, 11)
    with stored(s3, proxy, data) as (backend, loc):
        proxy.inject("close", "img")  # every answer, then the connection closed unannounced
        caplog.set_level("DEBUG", logger="imgfs")
        for offset in range(0, MiB, 128 * 1024):
            assert backend.read(loc, offset, 4096) == data[offset:offset + 4096]
    assert len(proxy.gets("img")) == 8 and proxy.connections >= 8
    assert "retrying" not in caplog.text  # redialled at once, not a failed attempt waited out


@pytest.mark.parametrize("status", [400, 501])
def test_a_server_that_takes_no_presigned_urls_gets_signed_headers(s3, proxy, status, caplog):
    data = random_bytes(MiB + 1, 12)
    with stored(s3, proxy, data, s3_max_attempts=1) as (backend, loc):
        proxy.inject("presigned", "img", status=status)
        caplog.set_level("INFO", logger="imgfs")
        assert backend.read(loc, 0, len(data)) == data
        assert backend._getter.presigned is False
        assert backend.read(loc, 5, 100) == data[5:105]
    assert "refused a presigned GET (HTTP %d) and took a signed one" % status in caplog.text
    assert s3.server.access_key not in caplog.text
    statuses = [(g.status, "X-Amz-Signature=" in g.path) for g in proxy.gets("img")]
    assert statuses == [(status, True), (206, False), (206, False)]


def test_a_refusal_after_presigned_gets_worked_is_not_asked_again(s3, proxy):
    with stored(s3, proxy, random_bytes(MiB, 13), s3_max_attempts=1) as (backend, loc):
        backend.read(loc, 0, 4096)
        proxy.inject("status", "img", status=403)
        with pytest.raises(BackendError, match="access denied"):
            backend.read(loc, 0, 4096)
        assert backend._getter.presigned is True
    assert [g.status for g in proxy.gets("img")] == [206, 403]


def test_with_a_proxy_the_session_path_runs_and_receives_in_place(s3, proxy, monkeypatch):
    """HTTP_PROXY applies to the endpoint: requests go through botocore's session to the proxy (here the
    counting proxy, forwarding to moto), bodies received in place, not through urllib3's copying readinto."""
    import urllib3

    def copying(self, b):
        raise AssertionError("urllib3's copying readinto was used (imgfs.httpbody's direct path not taken)")

    monkeypatch.setattr(urllib3.response.HTTPResponse, "readinto", copying)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    data = random_bytes(5 * MiB + 3, 6)
    s3.put_object(Bucket=s3.bucket, Key="img", Body=data)
    cfg = S3StoreConfig(name="s3", endpoint_url=s3.server.url, bucket=s3.bucket, access_key=s3.server.access_key,
                        secret_key=s3.server.secret_key, addressing_style="path")
    backend = S3Backend(cfg, ImgfsOptions())
    try:
        assert backend._getter.path == "session"
        loc = backend.stat("img")
        assert loc is not None
        assert backend.read(loc, 0, len(data)) == data
        assert backend.read(loc, MiB + 1, 2 * MiB) == data[MiB + 1:3 * MiB + 1]
    finally:
        backend.close()
    gets = proxy.gets("img")
    assert [g.range for g in gets] == [f"bytes=0-{len(data) - 1}", f"bytes={MiB + 1}-{3 * MiB}"]
    assert all(g.path.startswith("http://") and "X-Amz-Signature" not in g.path for g in gets)  # proxy form, header auth


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


def self_signed(directory: Path, name: str) -> Path:
    """A certificate for 127.0.0.1 and its key, in one PEM file (it is also its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def test_an_https_store_is_verified_against_s3_store_cacert_on_both_paths(s3, tmp_path):
    """Listing/HEAD (boto3) and the data path (botocore's session) both trust s3_store_cacert, and only it."""
    served, other = self_signed(tmp_path, "served"), self_signed(tmp_path, "other")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(served)
    data = random_bytes(MiB + 3, 9)
    with CountingProxy(s3.server.url, tls=tls) as proxy:
        assert proxy.url.startswith("https://")
        with stored(s3, proxy, data, cacert=str(served)) as (backend, loc):
            assert backend.read(loc, 5, len(data) - 5) == data[5:]
        wrong = backend_for(proxy, s3, cacert=str(other), s3_max_attempts=3)
        try:
            with pytest.raises(BackendUnavailable, match="TLS failure while listing"):
                wrong.list_images()
            with pytest.raises(BackendUnavailable, match="TLS failure while reading image img.*check s3_store_cacert"):
                wrong.read(loc, 0, 4096)
        finally:
            wrong.close()
    assert len([r for r in proxy.gets("img")]) == 1  # the refused reads never got an answer, nor a retry


def test_sidecars_sit_beside_images_never_listed_as_one_and_bounded(s3, proxy):
    """The fleet's chunk sums are kept in the image's bucket under '.imgfs/': written and read back
    exactly, absent until written, not an image of the listing, and never read past their bound."""
    data = random_bytes(MiB, 9)
    with stored(s3, proxy, data) as (backend, loc):
        assert backend.get_sidecar("chunk-sums", "img", 1000) is None
        backend.put_sidecar("chunk-sums", "img", b"sums\n" + bytes(100))
        assert backend.get_sidecar("chunk-sums", "img", 1000) == b"sums\n" + bytes(100)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket)["Contents"]]
        assert ".imgfs/chunk-sums/img" in keys
        assert [x.image_id for x in backend.list_images()] == ["img"]
        with pytest.raises(BackendError, match="more than 50 bytes"):
            backend.get_sidecar("chunk-sums", "img", 50)
