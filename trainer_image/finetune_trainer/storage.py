"""URIs (s3://, file://) to pyarrow filesystems and paths.

One place maps the spec's URIs to storage, so the driver's preflight, Ray Train's
`storage_filesystem`, the data reader, the model downloader and the final-model writer all
agree. S3 credentials come only from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN: the operator mounts spec.s3.secretRef there); they
are never passed on a command line or printed. Without keys pyarrow (and boto3) fall back to
the pod's own identity (IRSA, instance profile).

Uploads to s3:// (checkpoint shards, the final model) go through boto3's S3 TransferManager
(`upload_dir`): multipart, threaded, all of a directory's files in one manager. pyarrow's
`copy_files`, which Ray Train uses by default, must run single-threaded for S3 uploads
(apache/arrow#32372) and moved less than half of boto3's MB/s in bench/checkpoint_io.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .errors import BadInputError


@dataclass(frozen=True)
class S3Settings:
    """What the trainer needs of spec.s3 (picklable, no secrets: those stay in the env)."""

    endpoint: str = ""
    region: str = "us-east-1"

    @classmethod
    def from_spec(cls, s3: Any) -> "S3Settings":
        return cls(endpoint=getattr(s3, "endpoint", "") or "", region=getattr(s3, "region", "") or "us-east-1")


@dataclass(frozen=True)
class Location:
    """A URI resolved to a filesystem and the path inside it."""

    uri: str
    scheme: str  # "s3" or "file"
    filesystem: pafs.FileSystem
    path: str  # "bucket/key..." for S3 (no scheme), an absolute path for file
    settings: S3Settings | None = None  # endpoint/region for boto3 (S3 only)

    @property
    def bucket(self) -> str | None:
        return self.path.split("/", 1)[0] if self.scheme == "s3" else None

    def child(self, *parts: str) -> "Location":
        tail = "/".join(p.strip("/") for p in parts if p)
        return Location(uri=f"{self.uri.rstrip('/')}/{tail}", scheme=self.scheme,
                        filesystem=self.filesystem, path=f"{self.path.rstrip('/')}/{tail}",
                        settings=self.settings)


def _endpoint(settings: S3Settings) -> tuple[str | None, str]:
    """endpoint_override (host[:port]) and scheme from spec.s3.endpoint or AWS_ENDPOINT_URL."""
    url = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if not url:
        return None, "https"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInputError(f"S3 endpoint {url!r} is not an http(s)://host[:port] URL")
    return parts.netloc, parts.scheme


def _env_credentials() -> dict[str, str | None] | None:
    """Keys from the environment, or None to let the SDK find the pod's own identity."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return {"key": key, "secret": secret, "token": os.environ.get("AWS_SESSION_TOKEN") or None}
    return None


def s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    endpoint, scheme = _endpoint(settings)
    kwargs: dict[str, Any] = {"region": settings.region, "scheme": scheme}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    creds = _env_credentials()
    if creds:
        kwargs.update(access_key=creds["key"], secret_key=creds["secret"], session_token=creds["token"])
    # Bounded retries and timeouts: a wrong endpoint must fail preflight in seconds, not hang.
    kwargs["connect_timeout"] = 10
    kwargs["request_timeout"] = 60
    return pafs.S3FileSystem(**kwargs)


# boto3 TransferManager settings for uploads. Parts of 16 MiB (boto3: 8 MiB): half the requests
# for the same bytes, still 64 parts for a 1 GiB shard. 8 threads per process (boto3: 10): every
# training rank uploads its own shard at the same time, so a node already runs ranks x 8
# connections; on the 2-core bench box fewer threads also fight less for the GIL and the CPU.
# Measured in bench/checkpoint_io against boto3's defaults.
UPLOAD_PART_BYTES = 16 * 1024 * 1024
UPLOAD_THREADS = 8


def s3_client(settings: S3Settings, max_connections: int = UPLOAD_THREADS + 2):
    """A boto3 S3 client on the same endpoint, region and credentials as `s3_filesystem`."""
    import boto3
    from botocore.config import Config

    endpoint, scheme = _endpoint(settings)
    creds = _env_credentials()
    kwargs: dict[str, Any] = {}
    if creds:
        kwargs.update(aws_access_key_id=creds["key"], aws_secret_access_key=creds["secret"],
                      aws_session_token=creds["token"])
    config = Config(region_name=settings.region, connect_timeout=10, read_timeout=60,
                    retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=max_connections)
    # A session of its own: boto3's default session is not thread-safe, and an ASYNC checkpoint
    # upload runs in Ray Train's upload thread.
    return boto3.session.Session().client("s3", endpoint_url=f"{scheme}://{endpoint}" if endpoint else None,
                                          config=config, **kwargs)


def resolve(uri: str, settings: S3Settings | None = None) -> Location:
    """s3://bucket/prefix -> (S3FileSystem, "bucket/prefix"); file://PATH -> (local, abs path).

    A relative path after file:// (file://out/ckpt) is relative to the current directory.
    """
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise BadInputError(f"{uri!r} names no bucket")
        settings = settings or S3Settings()
        return Location(uri=uri.rstrip("/"), scheme="s3", filesystem=s3_filesystem(settings), path=path,
                        settings=settings)
    if uri.startswith("file://"):
        raw = uri[len("file://"):]
        if not raw:
            raise BadInputError(f"{uri!r} names no path")
        path = os.path.abspath(raw)
        return Location(uri=f"file://{path}", scheme="file", filesystem=pafs.LocalFileSystem(), path=path)
    raise BadInputError(f"unsupported URI {uri!r}: expected s3:// or file://")


def check_bucket(loc: Location) -> None:
    """Raise BadInputError with a clear message when an S3 bucket is missing or unreachable."""
    if loc.scheme != "s3":
        return
    try:
        info = loc.filesystem.get_file_info(loc.bucket)
    except OSError as exc:  # auth, DNS, endpoint down: pyarrow says which in one line
        raise BadInputError(f"cannot reach S3 bucket {loc.bucket!r}: {_one_line(exc)}") from None
    if info.type == pafs.FileType.NotFound:
        raise BadInputError(f"S3 bucket {loc.bucket!r} does not exist (from {loc.uri})")


def list_files(loc: Location) -> list[str]:
    """The file itself, or every file under the prefix/directory (sorted); [] when none."""
    try:
        info = loc.filesystem.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            return [loc.path]
        selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
        infos = loc.filesystem.get_file_info(selector)
    except OSError as exc:
        raise BadInputError(f"cannot list {loc.uri}: {_one_line(exc)}") from None
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


@dataclass(frozen=True)
class UploadStats:
    files: int
    bytes: int
    seconds: float
    method: str  # "boto3" (S3 TransferManager) or "pyarrow" (copy_files)

    def describe(self) -> str:
        mb = self.bytes / 1e6
        return (f"{self.files} files, {mb:.1f} MB in {self.seconds:.2f}s "
                f"({mb / max(self.seconds, 1e-9):.0f} MB/s, {self.method})")


def local_files(local_dir: str) -> list[tuple[str, str, int]]:
    """(absolute path, path relative to local_dir with "/", size) of every file, sorted."""
    out = []
    for root, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(root, name)
            out.append((full, os.path.relpath(full, local_dir).replace(os.sep, "/"), os.path.getsize(full)))
    return sorted(out, key=lambda f: f[1])


def upload_dir(local_dir: str, dest: Location) -> UploadStats:
    """Copy every file of a local directory to dest; returns when all of them are there (an
    exception if any failed). S3: boto3 TransferManager, one manager for all the files (big
    files in parallel parts). Elsewhere: pyarrow's copy_files."""
    files = local_files(local_dir)
    total = sum(size for _, _, size in files)
    began = time.perf_counter()
    if dest.scheme == "s3":
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        bucket, _, prefix = dest.path.partition("/")
        prefix = prefix.strip("/")
        config = TransferConfig(multipart_threshold=UPLOAD_PART_BYTES, multipart_chunksize=UPLOAD_PART_BYTES,
                                max_concurrency=UPLOAD_THREADS)
        client = s3_client(dest.settings or S3Settings())
        with create_transfer_manager(client, config) as manager:
            futures = [manager.upload(full, bucket, f"{prefix}/{rel}" if prefix else rel)
                       for full, rel, _ in files]
            for future in futures:
                future.result()  # raises the first failure; leaving the block waits for the rest
        return UploadStats(len(files), total, time.perf_counter() - began, "boto3")
    if dest.scheme == "file":
        os.makedirs(dest.path, exist_ok=True)
    else:
        dest.filesystem.create_dir(dest.path, recursive=True)
    pafs.copy_files(local_dir, dest.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest.filesystem, use_threads=True)
    return UploadStats(len(files), total, time.perf_counter() - began, "pyarrow")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__
