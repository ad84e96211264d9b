"""URIs (s3://, file://) to pyarrow filesystems and paths.

One place maps the spec's URIs to storage, so the driver's preflight, Ray Train's
`storage_filesystem`, the data reader, the model downloader and the final-model writer all
agree. S3 credentials come only from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN: the operator mounts spec.s3.secretRef there); they
are never passed on a command line or printed. Without keys pyarrow falls back to the pod's
own identity (IRSA, instance profile).
"""

from __future__ import annotations

import os
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

    @property
    def bucket(self) -> str | None:
        return self.path.split("/", 1)[0] if self.scheme == "s3" else None

    def child(self, *parts: str) -> "Location":
        tail = "/".join(p.strip("/") for p in parts if p)
        return Location(uri=f"{self.uri.rstrip('/')}/{tail}", scheme=self.scheme,
                        filesystem=self.filesystem, path=f"{self.path.rstrip('/')}/{tail}")


def _endpoint(settings: S3Settings) -> tuple[str | None, str]:
    """endpoint_override (host[:port]) and scheme from spec.s3.endpoint or AWS_ENDPOINT_URL."""
    url = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if not url:
        return None, "https"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInputError(f"S3 endpoint {url!r} is not an http(s)://host[:port] URL")
    return parts.netloc, parts.scheme


def s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    endpoint, scheme = _endpoint(settings)
    kwargs: dict[str, Any] = {"region": settings.region, "scheme": scheme}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret,
                      session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    # Bounded retries and timeouts: a wrong endpoint must fail preflight in seconds, not hang.
    kwargs["connect_timeout"] = 10
    kwargs["request_timeout"] = 60
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, settings: S3Settings | None = None) -> Location:
    """s3://bucket/prefix -> (S3FileSystem, "bucket/prefix"); file://PATH -> (local, abs path).

    A relative path after file:// (file://out/ckpt) is relative to the current directory.
    """
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise BadInputError(f"{uri!r} names no bucket")
        return Location(uri=uri.rstrip("/"), scheme="s3",
                        filesystem=s3_filesystem(settings or S3Settings()), path=path)
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


def upload_dir(local_dir: str, dest: Location) -> None:
    """Copy a local directory to dest (parallel uploads)."""
    if dest.scheme == "file":
        os.makedirs(dest.path, exist_ok=True)
    else:
        dest.filesystem.create_dir(dest.path, recursive=True)
    pafs.copy_files(local_dir, dest.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest.filesystem, use_threads=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__
