"""Shared session fixtures: the test bed's, one Ray instance, and the tiny model/dataset.

Everything heavy is imported inside the fixtures, so suites that do not use them (api,
operator) pay nothing.

- `kube`, `kuberay`, `ray_head`, `s3_server`: the test bed's (finetune_testbed.pytest_plugin):
  the API emulator, the KubeRay stand-in, a real Ray head, a moto S3 server with fake
  credentials in the environment (`.endpoint`, `.client` (boto3), `.bucket`, `.make_bucket`).
- `ray_address`: ONE embedded Ray instance for the whole session (2 CPUs, like the job
  head), started in this process after the S3 credentials are in the environment so its
  workers inherit them; trainer subprocesses join it through RAY_ADDRESS.
- `tiny_assets`: the tiny Llama model + tokenizer + jsonl dataset, built once, on local disk
  (`.model_dir`, `.dataset_path`) and uploaded to the moto bucket (`.model_uri`,
  `.dataset_uri`: s3://...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ("finetune_testbed.pytest_plugin",)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


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
