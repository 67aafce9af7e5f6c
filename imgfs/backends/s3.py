"""Glance's S3 store: one object per image, keyed by image id, in s3_store_bucket.

Every ranged GET is pinned to the ETag the catalog saw (``IfMatch``) and the answer's ETag is checked
too, because some S3 servers ignore If-Match: a replaced object can never hand us bytes of another
version. Error messages name the store, endpoint and bucket -- never a key.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import botocore.config
import botocore.exceptions
import urllib3.exceptions

from ..config import ImgfsOptions, S3StoreConfig
from ..errors import BackendAccessDenied, BackendError, BackendUnavailable, ImgfsError, ShortRead, StaleImage
from ..model import Location
from .base import sidecar_key, valid_image_name
from .s3_ranged import RangedGetter

log = logging.getLogger(__name__)

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CHANGED = {"PreconditionFailed", "412"}
# What botocore's "standard" retry mode retries, which the data path keeps (it retries by itself, below).
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
                "TooManyRequestsException", "ServiceUnavailable", "InternalError", "RequestTimeout",
                "RequestTimeoutException", "PriorRequestNotComplete", "BandwidthLimitExceeded"}

# Errors while the body streams: urllib3's own (botocore wraps only those raised before the answer).
_STREAM_ERRORS = (
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    ConnectionError,
    TimeoutError,
)


class S3Backend:
    kind = "s3"
    read_timeout = None  # s3_connect_timeout, s3_read_timeout and s3_max_attempts bound every read

    def __init__(self, cfg: S3StoreConfig, options: ImgfsOptions) -> None:
        self.name = cfg.name
        self.endpoint = cfg.endpoint_url
        self.bucket = cfg.bucket
        self.max_attempts = options.s3_max_attempts
        self._where = f"store '{cfg.name}' ({cfg.endpoint_url}, bucket '{cfg.bucket}')"
        self._cfg, self._options = cfg, options
        self._client: Any = None
        self._client_lock = threading.Lock()
        # The data path: ranged GETs presigned and sent without boto3's operation pipeline (s3_ranged.py).
        self._getter = RangedGetter(endpoint_url=cfg.endpoint_url, region=cfg.region_name or "us-east-1",
                                    access_key=cfg.access_key, secret_key=cfg.secret_key, cacert=cfg.cacert,
                                    connect_timeout=options.s3_connect_timeout, read_timeout=options.s3_read_timeout,
                                    max_connections=options.backend_max_connections * 2)
        self._urls: dict[str, str] = {}

    def warm_up(self) -> None:
        """Pay for boto3's lazy imports and set-up now, not in the first reader's time (the daemon calls
        this before a fresh mount; after taking a mount over, while serving)."""
        self._getter.warm_up(self._url_of("imgfs-warm-up"))

    @property
    def client(self) -> Any:
        """boto3's client (listing, HEAD, sidecars), made at first use: importing boto3 and loading its
        S3 model take half a second, which a restarting imgfs must not keep its readers waiting for."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3

        cfg, options = self._cfg, self._options
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            aws_access_key_id=cfg.access_key,
            aws_secret_access_key=cfg.secret_key,
            region_name=cfg.region_name or "us-east-1",
            verify=cfg.cacert if cfg.cacert else True,
            config=botocore.config.Config(
                s3={"addressing_style": cfg.addressing_style},
                signature_version="s3v4",
                # demand + prefetch fetches run concurrently; a pool smaller than that would churn sockets
                max_pool_connections=options.backend_max_connections * 2,
                connect_timeout=options.s3_connect_timeout,
                read_timeout=options.s3_read_timeout,
                retries={"max_attempts": options.s3_max_attempts, "mode": "standard"},
                tcp_keepalive=True,
                # responses are checked by length and ETag; botocore's whole-object CRC checks do not
                # apply to ranged reads and only cost CPU
                response_checksum_validation="when_required",
                request_checksum_calculation="when_required",
            ),
        )

    def _error(self, e: Exception, what: str) -> BackendError:
        """One line naming the store and what failed; never a credential or a signed URL."""
        if isinstance(e, botocore.exceptions.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # a HEAD's error has no body: botocore then repeats the status as the code
            answer = f"HTTP {status}" if code == str(status) else f"HTTP {status} {code}"
            if code in _DENIED or status == 403:
                return BackendAccessDenied(
                    f"{self._where}: access denied while {what} ({answer}); "
                    "check s3_store_access_key / s3_store_secret_key and the bucket policy"
                )
            if code == "NoSuchBucket":
                return BackendError(f"{self._where}: bucket does not exist; check s3_store_bucket")
            return BackendError(f"{self._where}: {what} failed: {answer}")
        if isinstance(e, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
            return BackendUnavailable(f"{self._where}: cannot connect while {what}; check s3_store_host and the network")
        if isinstance(e, botocore.exceptions.SSLError):
            return BackendUnavailable(f"{self._where}: TLS failure while {what}; check s3_store_cacert")
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return BackendAccessDenied(f"{self._where}: no credentials; set s3_store_access_key and s3_store_secret_key")
        return BackendError(f"{self._where}: {what} failed: {type(e).__name__}")

    def _location(self, key: str, size: int, etag: str, mtime: float) -> Location:
        return Location(self.name, key, int(size), etag.strip('"'), mtime)

    def list_images(self) -> list[Location]:
        result = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if valid_image_name(key):
                        result.append(self._location(key, obj["Size"], obj["ETag"], obj["LastModified"].timestamp()))
        except Exception as e:
            raise self._error(e, "listing the bucket") from None
        return result

    def stat(self, image_id: str) -> Location | None:
        if not valid_image_name(image_id):
            return None
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=image_id)
        except botocore.exceptions.ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in _MISSING:
                return None
            raise self._error(e, f"looking up image {image_id}") from None
        except Exception as e:
            raise self._error(e, f"looking up image {image_id}") from None
        return self._location(image_id, head["ContentLength"], head["ETag"], head["LastModified"].timestamp())

    def read(self, location: Location, offset: int, length: int) -> bytes:
        what = f"reading image {location.image_id} at {offset}+{length}"
        error: BackendError | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                data = self._read_once(location, offset, length)
                if error is not None:
                    # Worked in the end, but an operator seeing slow reads wants to know the store is flaky.
                    log.info("%s; attempt %d worked", error, attempt)
                return data
            except ShortRead as e:
                error = e
            except ImgfsError:
                raise
            except _STREAM_ERRORS as e:  # urllib3's or the socket's, while the body streams
                # one name for a stalled body whichever path received it (a socket timeout on the direct one)
                name = "ReadTimeoutError" if isinstance(e, TimeoutError) else type(e).__name__
                error = BackendError(f"{self._where}: {what} failed mid-body: {name}")
            except botocore.exceptions.SSLError as e:
                raise self._error(e, what) from None  # a certificate does not fix itself on retry
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as e:
                # cannot connect, or the connection failed or timed out before the answer
                error = self._error(e, what) if isinstance(e, botocore.exceptions.ConnectionError) else \
                    BackendError(f"{self._where}: {what} failed before the answer: {type(e).__name__}")
            except botocore.exceptions.ClientError as e:
                code = str(e.response["Error"]["Code"])
                status = e.response["ResponseMetadata"]["HTTPStatusCode"]
                if code in _CHANGED:
                    raise StaleImage(f"{self._where}: image {location.image_id} changed (ETag no longer {location.version})") from None
                if code in _MISSING:
                    raise StaleImage(f"{self._where}: image {location.image_id} was deleted") from None
                error = self._error(e, what)
                if status not in _RETRY_STATUS and code not in _RETRY_CODES:
                    raise error from None
            except Exception as e:
                raise self._error(e, what) from None
            if attempt < self.max_attempts:
                log.debug("%s (attempt %d of %d); retrying", error, attempt, self.max_attempts)
                # jittered so that hundreds of nodes throttled together do not come back together
                time.sleep(random.uniform(0.5, 1.0) * min(0.1 * 2**attempt, 2.0))
        assert error is not None
        raise error

    def _url(self, key: str) -> str:
        """The object's URL as boto3 addresses it (path or virtual host, per s3_store_bucket_url_format):
        asked of the boto3 client once per image, without its query (the data path signs its own)."""
        url = self._urls.get(key)
        if url is None:
            url = self._url_of(key)
            if len(self._urls) >= 4096:
                self._urls.clear()
            self._urls[key] = url
        return url

    def _url_of(self, key: str) -> str:
        presigned = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=60)
        return presigned.split("?", 1)[0]

    def _read_once(self, location: Location, offset: int, length: int) -> bytes:
        answer = self._getter.get(self._url(location.image_id), offset, length, location.version)
        if answer.etag != location.version:
            raise StaleImage(f"{self._where}: image {location.image_id} changed (server ignored If-Match)")
        if not answer.content_range:
            raise BackendError(f"{self._where}: the server ignored the Range header (it answered with the whole "
                               "object); imgfs needs an S3 server that serves byte ranges")
        expected_range = f"bytes {offset}-{offset + length - 1}/"
        if not answer.content_range.startswith(expected_range):
            raise BackendError(f"{self._where}: server answered range {answer.content_range!r}, asked {expected_range}")
        got = answer.sent if answer.sent >= 0 else len(answer.data)
        if got != length:
            raise ShortRead(f"{self._where}: image {location.image_id}: got {got} bytes at {offset}, expected {length}")
        return answer.data

    def get_sidecar(self, kind: str, image_id: str, limit: int) -> bytes | None:
        """The small object imgfs keeps beside an image (see Backend), or None if there is none."""
        key, what = sidecar_key(kind, image_id), f"reading the {kind} of image {image_id}"
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            with answer["Body"] as body:
                data = body.read(limit + 1)
        except botocore.exceptions.ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in _MISSING:
                return None
            raise self._error(e, what) from None
        except Exception as e:
            raise self._error(e, what) from None
        if len(data) > limit:
            raise BackendError(f"{self._where}: {what}: more than {limit} bytes")
        return data

    def put_sidecar(self, kind: str, image_id: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=sidecar_key(kind, image_id), Body=data)
        except Exception as e:
            raise self._error(e, f"storing the {kind} of image {image_id}") from None

    def describe(self) -> dict[str, str]:
        return {"type": "s3", "endpoint": self.endpoint, "bucket": self.bucket}

    def close(self) -> None:
        self._getter.close()
        if self._client is not None:
            self._client.close()
