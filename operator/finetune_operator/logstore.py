"""Keeps a failed attempt's full log next to the job's checkpoints.

The log goes to `<checkpoint uri>/<run name>/logs/<submission id>.log`: a `file://` path is
written directly (a volume shared with the operator), an `s3://` one with one signed PUT.
boto3 is too heavy for the operator's image and one PutObject needs only AWS Signature
Version 4 (hashlib + hmac), so that is done here over aiohttp. Credentials are the job's
own, read from its Secret at the time and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote, urlsplit

import aiohttp

from finetune_api.model import FineTuneJob


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the keys
        return "S3Credentials(***)"


class LogStoreError(Exception):
    pass


def log_uri(job: FineTuneJob, submission_id: str) -> str:
    return f"{job.checkpoint_run_uri}/logs/{submission_id}.log"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def s3_put_request(uri: str, body: bytes, *, region: str, endpoint: str,
                   creds: S3Credentials, now: datetime | None = None
                   ) -> tuple[str, dict[str, str]]:
    """The URL and SigV4-signed headers of a PutObject of `body` at s3://bucket/key."""
    parts = urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if endpoint:
        # S3-compatible stores (MinIO, Ceph, moto) are addressed path-style.
        ep = urlsplit(endpoint)
        base_path = ep.path.rstrip("/")
        path = f"{base_path}/{bucket}/{key}"
        host = ep.netloc
        scheme = ep.scheme
    else:
        host = f"{bucket}.s3.{region}.amazonaws.com"
        path = f"/{key}"
        scheme = "https"
    canonical_path = quote(path, safe="/-_.~")
    now = now or datetime.now(timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    payload_hash = _sha256(body)
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    if creds.session_token:
        headers["x-amz-security-token"] = creds.session_token
    signed = sorted(headers)
    canonical = "\n".join([
        "PUT", canonical_path, "",
        *(f"{name}:{headers[name].strip()}" for name in signed), "",
        ";".join(signed), payload_hash,
    ])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         _sha256(canonical.encode())])
    key_ = _hmac(_hmac(_hmac(_hmac(("AWS4" + creds.secret_access_key).encode(), day),
                             region), "s3"), "aws4_request")
    signature = hmac.new(key_, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}")
    headers["Content-Type"] = "text/plain; charset=utf-8"
    return f"{scheme}://{host}{canonical_path}", headers


async def save_log(session: aiohttp.ClientSession, job: FineTuneJob, submission_id: str,
                   log: str, creds: S3Credentials | None) -> str:
    """Store the log; returns its URI. Raises LogStoreError when it cannot."""
    uri = log_uri(job, submission_id)
    body = log.encode()
    if uri.startswith("file://"):
        path = uri[len("file://"):]

        def write() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
        try:
            await asyncio.to_thread(write)
        except OSError as e:
            raise LogStoreError(f"cannot write {uri}: {e.strerror}") from e
        return uri
    if uri.startswith("s3://"):
        if creds is None:
            raise LogStoreError("no S3 credentials (spec.s3.secretRef) to store the log with")
        url, headers = s3_put_request(uri, body, region=job.spec.s3.region,
                                      endpoint=job.spec.s3.endpoint, creds=creds)
        try:
            async with session.put(url, data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=60)) as resp:
                if resp.status >= 300:
                    text = (await resp.text())[:300]
                    raise LogStoreError(f"PUT {uri}: HTTP {resp.status}: {text}")
        except aiohttp.ClientError as e:
            raise LogStoreError(f"PUT {uri}: {type(e).__name__}") from e
        return uri
    raise LogStoreError(f"unsupported checkpoint URI scheme: {uri}")
