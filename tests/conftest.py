"""Shared session fixtures: a moto S3 server, one Ray instance, and the tiny model/dataset.

Everything heavy is imported inside the fixtures, so suites that do not use them (api,
operator) pay nothing.

- `s3_server`: a real moto S3 server (server mode) on 127.0.0.1:<free port>, fake credentials
  in the environment (AWS_ACCESS_KEY_ID/...), `.endpoint`, `.client` (boto3), `.bucket`
  (created, empty), `.make_bucket(name)`.
- `ray_address`: ONE embedded Ray instance for the whole session (2 CPUs, like the job
  head), started in this process after the S3 credentials are in the environment so its
  workers inherit them; trainer subprocesses join it through RAY_ADDRESS.
- `tiny_assets`: the tiny Llama model + tokenizer + jsonl dataset, built once, on local disk
  (`.model_dir`, `.dataset_path`) and uploaded to the moto bucket (`.model_uri`,
  `.dataset_uri`: s3://...).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    client: object
    bucket: str

    def make_bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_server():
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="finetune-test")
    try:
        yield S3Server(endpoint=endpoint, client=client, bucket="finetune-test")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_address(s3_server, tmp_path_factory):
    """The GCS address of one Ray instance shared by the session's training runs."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # DeepSpeed JIT-compiles its CPU shm comm op once per machine (~35 s); keep the build.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
    os.environ.setdefault("FINETUNE_CACHE_DIR", str(tmp_path_factory.mktemp("node-cache")))
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                   configure_logging=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@dataclass
class TinyAssets:
    model_dir: str
    dataset_path: str
    model_uri: str
    dataset_uri: str


@pytest.fixture(scope="session")
def tiny_assets(s3_server, tmp_path_factory):
    from finetune_trainer.tiny import build_tiny_assets

    out = build_tiny_assets(str(tmp_path_factory.mktemp("tiny")))
    for local, prefix in ((out["model_dir"], "base/tiny-llama"), (os.path.dirname(out["dataset_path"]), "data")):
        for name in os.listdir(local):
            s3_server.client.upload_file(os.path.join(local, name), s3_server.bucket, f"{prefix}/{name}")
    return TinyAssets(model_dir=out["model_dir"], dataset_path=out["dataset_path"],
                      model_uri=f"s3://{s3_server.bucket}/base/tiny-llama",
                      dataset_uri=f"s3://{s3_server.bucket}/data/train.jsonl")
