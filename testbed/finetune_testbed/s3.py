"""S3 for tests and benchmarks: a real moto server (server mode, not mocked calls), in this
process on a thread (`moto_server`) or as a process of its own (`moto_process`), so the
trainer's boto3/pyarrow clients talk HTTP to it as they would to S3 or MinIO."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .ports import free_port
from .ray_head import VENV_BIN

# Fake, but in the environment: boto3 in this process, and the Ray workers and trainer
# subprocesses started after it, sign requests with them as pods do with the job's Secret.
FAKE_CREDENTIALS = {
    'AWS_ACCESS_KEY_ID': 'testing-key-id',
    'AWS_SECRET_ACCESS_KEY': 'testing-secret-key',
    'AWS_DEFAULT_REGION': 'us-east-1',
}


@dataclasses.dataclass
class S3Server:
    endpoint: str
    client: Any  # boto3's S3 client for the endpoint
    bucket: str

    def make_bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, prefix: str = '', bucket: str | None = None) -> list[str]:
        pages = self.client.get_paginator('list_objects_v2').paginate(Bucket=bucket or self.bucket, Prefix=prefix)
        return [o['Key'] for page in pages for o in page.get('Contents', [])]


def s3_client(endpoint: str, credentials: Mapping[str, str] = FAKE_CREDENTIALS) -> Any:
    import boto3

    return boto3.client('s3', endpoint_url=endpoint, region_name=credentials.get('AWS_DEFAULT_REGION', 'us-east-1'),
                        aws_access_key_id=credentials['AWS_ACCESS_KEY_ID'],
                        aws_secret_access_key=credentials['AWS_SECRET_ACCESS_KEY'])


@contextlib.contextmanager
def moto_server(bucket: str = 'finetune-test', credentials: Mapping[str, str] = FAKE_CREDENTIALS,
                host: str = '127.0.0.1') -> Iterator[S3Server]:
    """A moto server on a thread of this process, `credentials` in os.environ while it runs
    (restored after), and `bucket` created empty. `host`: the address it listens on (the
    pod network's gateway, for pods of the process kubelet)."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    port = free_port()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    endpoint = f'http://{host}:{port}'
    try:
        client = s3_client(endpoint, credentials)
        client.create_bucket(Bucket=bucket)
        yield S3Server(endpoint=endpoint, client=client, bucket=bucket)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def moto_process(workdir: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`moto_server` as a process of its own (its CPU is not the caller's), logging to
    workdir/moto.log: (the process, its endpoint) once it answers. The caller ends it."""
    port = free_port()
    log = open(workdir / 'moto.log', 'wb')
    proc = subprocess.Popen([str(VENV_BIN / 'moto_server'), '-H', '127.0.0.1', '-p', str(port)],
                            stdout=log, stderr=log, start_new_session=True)
    endpoint = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + '/moto-api/', timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f'moto did not start; see {workdir / "moto.log"}')
