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

Transient faults (connection resets, throttling, 5xx): every S3 request, boto3's and pyarrow's,
is retried in the SDKs' standard retry mode, spec.s3.maxAttempts attempts with exponential
back-off and full jitter capped at 20 s. botocore starts from 50 ms, the AWS C++ SDK under
pyarrow from 1 s: with the default of 15, boto3 waits out 63 s on average (under 30 s once in
160 tries: Monte Carlo of its formula), pyarrow longer. A failure that still ends the run is
raised as
`StorageError`: one picklable line naming the operation, the object and the SDK's error,
because botocore's own exceptions cannot cross from a Ray worker to the driver.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import types
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .errors import BadInputError, StorageError

DEFAULT_MAX_ATTEMPTS = 15  # spec.s3.maxAttempts' default (the schema holds the rule)


@dataclass(frozen=True)
class S3Settings:
    """What the trainer needs of spec.s3 (picklable, no secrets: those stay in the env)."""

    endpoint: str = ""
    region: str = "us-east-1"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    @classmethod
    def from_spec(cls, s3: Any) -> "S3Settings":
        return cls(endpoint=getattr(s3, "endpoint", "") or "", region=getattr(s3, "region", "") or "us-east-1",
                   max_attempts=getattr(s3, "max_attempts", None) or DEFAULT_MAX_ATTEMPTS)


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


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the AWS SDK's standard retry strategy, which also survives
    pickling: pyarrow's own pickle drops `retry_strategy` (back to 3 attempts), and Ray Train
    pickles the run's storage filesystem into its controller and every worker, which restore
    checkpoints and write Ray's run state through it."""

    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS, **options: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self._max_attempts = max_attempts
        self._options = options

    def __reduce__(self):
        return _rebuild_s3_filesystem, (self._max_attempts, self._options)


def _rebuild_s3_filesystem(max_attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **options)


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
    return RetryingS3FileSystem(settings.max_attempts, **kwargs)


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
                    retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                    max_pool_connections=max_connections)
    # A session of its own: boto3's default session is not thread-safe, and an ASYNC checkpoint
    # upload runs in Ray Train's upload thread.
    session = boto3.session.Session()
    with _retry_quota(settings.max_attempts, max_connections):
        return session.client("s3", endpoint_url=f"{scheme}://{endpoint}" if endpoint else None,
                              config=config, **kwargs)


_QUOTA_LOCK = threading.Lock()


@contextlib.contextmanager
def _retry_quota(max_attempts: int, concurrency: int):
    """Size the standard retry mode's retry quota for this client while it is created.

    botocore gives every client a quota of 500 retry tokens, 14 per retry, so ~35 retries in all:
    a TransferManager's 8 concurrent requests spend it within the first 2 s of connection resets
    (measured through tests' fault proxy: 8 small files fail after 1.7 s of a 3 s outage), and
    then no request is retried at all. Sized so that every concurrent request can spend all its
    attempts, the quota still bounds a retry storm, at max_attempts per request."""
    from botocore.retries import quota, standard

    cost = getattr(standard.RetryQuotaChecker, "_RETRY_COST", 14)
    capacity = max(quota.RetryQuota.INITIAL_CAPACITY, cost * max(max_attempts - 1, 1) * concurrency)
    with _QUOTA_LOCK:
        saved = standard.quota
        # standard.register_retry_handler builds the quota as `quota.RetryQuota()`: only that
        # name is swapped, only while our client is built, under a lock.
        standard.quota = types.SimpleNamespace(RetryQuota=functools.partial(quota.RetryQuota, capacity))
        try:
            yield
        finally:
            standard.quota = saved


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
    if not os.path.isdir(local_dir):  # never "upload" a checkpoint whose files are gone
        raise StorageError(f"cannot upload {local_dir} to {dest.uri}: the local directory does not exist")
    files = local_files(local_dir)
    total = sum(size for _, _, size in files)
    began = time.perf_counter()
    if dest.scheme == "s3":
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        bucket, _, prefix = dest.path.partition("/")
        prefix = prefix.strip("/")
        config = TransferConfig(multipart_threshold=UPLOAD_PART_BYTES, multipart_chunksize=UPLOAD_PART_BYTES,
                                max_concurrency=UPLOAD_THREADS)
        settings = dest.settings or S3Settings()
        client = s3_client(settings)
        key = ""
        try:
            with create_transfer_manager(client, config) as manager:
                keys = [(full, f"{prefix}/{rel}" if prefix else rel) for full, rel, _ in files]
                futures = [(key, manager.upload(full, bucket, key)) for full, key in keys]
                for key, future in futures:
                    future.result()  # raises the first failure; leaving the block waits for the rest
        except Exception as exc:  # botocore/s3transfer errors: not picklable, several lines
            raise StorageError(f"S3 upload of s3://{bucket}/{key} failed after up to {settings.max_attempts} "
                               f"attempts per request: {describe(exc)}") from None
        return UploadStats(len(files), total, time.perf_counter() - began, "boto3")
    try:
        if dest.scheme == "file":
            os.makedirs(dest.path, exist_ok=True)
        else:
            dest.filesystem.create_dir(dest.path, recursive=True)
        pafs.copy_files(local_dir, dest.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=dest.filesystem, use_threads=True)
    except OSError as exc:  # disk full, read-only, permission: name where
        raise StorageError(f"cannot write {dest.uri}: {describe(exc)}") from None
    return UploadStats(len(files), total, time.perf_counter() - began, "pyarrow")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__


def describe(exc: BaseException) -> str:
    """"ErrorType: message" on one line, for an SDK error inside a StorageError."""
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_write_failure(exc: BaseException, path: str) -> bool:
    """Whether a local save failed on the disk (not, say, in a collective inside it): an
    OSError, torch's "file write failed", or a disk with (almost) nothing left."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    free = _free_bytes(path)
    return ("write" in text and "fail" in text) or (free is not None and free < 1 << 20)


def write_failure(what: str, path: str, exc: BaseException) -> StorageError:
    """A failed local write as one line naming the path: torch and DeepSpeed report a full disk
    as "file write failed" with no path, OSError names only one file; say which and why."""
    reason = describe(exc)
    free = _free_bytes(path)
    if free is not None and free < 1 << 20:
        reason = f"no space left on device ({reason})"
    return StorageError(f"cannot write {what} to {path}: {reason}")
