"""The shared blob tier: verified bodies in an S3-compatible bucket, through aiobotocore.

A body is uploaded only after its fill was verified and published locally, and it becomes
visible in the bucket only complete: a multipart upload exists for nobody until
``CompleteMultipartUpload`` (a failed upload is aborted), a single ``PutObject`` is atomic.
Keys are content addresses (``<prefix>blobs/sha256/<hex>``), so two replicas uploading the same
body write the same bytes, and a reader verifies the digest again while it fills its local tier.

Credentials come from the AWS SDK's standard chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, a shared credentials file, IRSA / web identity, instance metadata):
that is how every S3 client in a cluster gets them, and IRSA cannot be expressed in a YAML key.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator, Optional

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import UNSIGNED
from botocore.exceptions import BotoCoreError, ClientError

from ..observability.logging import get_logger
from ..observability.metrics import Metrics
from ..settings import S3Settings
from .availability import Availability

log = get_logger("gateway.shared")

READ_CHUNK = 256 * 1024
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class S3Object:
    """An open ``GetObject``: its length and its body as chunks (close it when done)."""

    def __init__(self, size: int, body, tier: "S3Tier") -> None:
        self.size = size
        self._body = body
        self._tier = tier

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                data = await self._body.read(READ_CHUNK)
                if not data:
                    return
                self._tier.moved("download", len(data))
                yield data
        except (BotoCoreError, ClientError, OSError, asyncio.TimeoutError) as exc:
            self._tier.avail.down("get", exc)
            raise

    def close(self) -> None:
        self._body.close()


class S3Tier:
    def __init__(self, cfg: S3Settings, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.avail = Availability(
            "s3", f"{cfg.endpoint}/{cfg.bucket}", metrics, errors=(BotoCoreError, ClientError),
            effect="bodies are served from the local tier and the upstream, and not shared, "
                   "until the bucket answers again")
        self._cm = None
        self._client = None
        #: the bucket was found or created (at start, or at the first upload after S3 came back)
        self._bucket_ready = False
        #: bytes moved to / from the bucket by this replica (status page; same as the metric)
        self.bytes = {"upload": 0, "download": 0}

    def moved(self, direction: str, n: int) -> None:
        self.bytes[direction] += n
        self.metrics.shared_store_bytes.labels(direction=direction).inc(n)

    def key(self, digest: str) -> str:
        algo, _, hexpart = digest.partition(":")
        return f"{self.cfg.prefix}blobs/{algo}/{hexpart}"

    async def start(self) -> None:
        config = AioConfig(connect_timeout=2, read_timeout=15, retries={"max_attempts": 2},
                           s3={"addressing_style": "path"},
                           signature_version=UNSIGNED if self.cfg.anonymous else None)
        self._cm = get_session().create_client("s3", endpoint_url=self.cfg.endpoint,
                                               region_name=self.cfg.region, config=config)
        self._client = await self._cm.__aenter__()
        await self.avail.guard("bucket", self._ensure_bucket, None)

    async def _ensure_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.cfg.bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise
            await self._client.create_bucket(Bucket=self.cfg.bucket)
            log.info("s3_bucket_created", bucket=self.cfg.bucket, endpoint=self.cfg.endpoint)
        self._bucket_ready = True

    async def close(self) -> None:
        if self._cm is not None:
            await self._cm.__aexit__(None, None, None)
            self._cm = self._client = None

    # -- reading -----------------------------------------------------------------------------
    async def open(self, digest: str) -> Optional[S3Object]:
        """The stored body, or None (not there, or the bucket does not answer)."""
        async def get() -> Optional[S3Object]:
            try:
                obj = await self._client.get_object(Bucket=self.cfg.bucket, Key=self.key(digest))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise
            return S3Object(int(obj["ContentLength"]), obj["Body"], self)
        return await self.avail.guard("get", get, None)

    async def has(self, digest: str) -> bool:
        async def head() -> bool:
            try:
                await self._client.head_object(Bucket=self.cfg.bucket, Key=self.key(digest))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
            return True
        return await self.avail.guard("head", head, False)

    # -- writing -----------------------------------------------------------------------------
    async def upload(self, digest: str, path: Path, size: int) -> bool:
        """Upload a verified local body unless the bucket has it; True when it is there now."""
        if not self._bucket_ready:  # S3 was away at start: look for (or create) the bucket now
            await self.avail.guard("bucket", self._ensure_bucket, None)
        if await self.has(digest):
            return True
        if not self.avail.up:
            return False
        return await self.avail.guard("upload", lambda: self._upload(digest, path, size), False)

    async def _upload(self, digest: str, path: Path, size: int) -> bool:
        c, bucket, key = self._client, self.cfg.bucket, self.key(digest)
        part = int(self.cfg.part_size)
        with open(path, "rb") as f:
            if size <= part:
                await c.put_object(Bucket=bucket, Key=key, Body=f.read())
                self.moved("upload", size)
                return True
            upload_id = (await c.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
            try:
                parts = []
                for number in range(1, 10_001):  # S3 allows at most 10 000 parts
                    data = f.read(part)
                    if not data:
                        break
                    r = await c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                            PartNumber=number, Body=data)
                    parts.append({"ETag": r["ETag"], "PartNumber": number})
                    self.moved("upload", len(data))
                await c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
            except BaseException:
                try:
                    await c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
                except (BotoCoreError, ClientError, OSError):
                    pass
                raise
        log.info("s3_uploaded", digest=digest, size=size, parts=len(parts))
        return True


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
