"""Helpers for the trainer tests: build a job document, run the real entrypoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import pytest
import yaml

from finetune_api.events import parse_events
from finetune_testbed.tiny_jobs import deep_update, tiny_job


@dataclass
class TrainerRun:
    rc: int
    stdout: str
    stderr: str
    events: list = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.of("progress")}

    def explain(self) -> str:
        return f"rc={self.rc}\n--- stdout tail\n{self.stdout[-6000:]}\n--- stderr tail\n{self.stderr[-6000:]}"


@pytest.fixture
def make_job(s3_server, tiny_assets):
    """A FineTuneJob document on the tiny assets in moto S3; `spec` deep-merges into its spec."""

    def make(name: str, spec: dict | None = None) -> dict:
        # Two workers and a checkpoint interval no run reaches unless it asks for one.
        own = {"training": {"maxSteps": 4}, "resources": {"workers": 2},
               "checkpoint": {"everySteps": 100}}
        return tiny_job(name, model_uri=tiny_assets.model_uri, dataset_uri=tiny_assets.dataset_uri,
                        bucket=s3_server.bucket, endpoint=s3_server.endpoint,
                        spec=deep_update(own, spec or {}))

    return make


@pytest.fixture
def run_trainer(ray_address, tmp_path):
    """Run `python -m finetune_trainer --job FILE` against the session's Ray instance."""

    def run(doc: dict, *, env: dict | None = None, fresh: bool = False, timeout: int = 300,
            join_ray: bool = True) -> TrainerRun:
        path = tmp_path / f"{doc['metadata']['name']}-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(doc))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if join_ray:
            full_env["RAY_ADDRESS"] = ray_address
        cmd = [sys.executable, "-m", "finetune_trainer", "--job", str(path)] + (["--fresh"] if fresh else [])
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
        return TrainerRun(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stdout.splitlines()))

    return run


@pytest.fixture
def complete_in_bucket(s3_server):
    """check(uri) -> world size: every rank's state file and every file it lists (the manifest
    `checkpointing.write_state` records), at its size, is in the bucket; no directory markers
    (pyarrow's create_dir leaves them, boto3's uploads do not)."""

    def check(uri: str) -> int:
        prefix = uri[len(f"s3://{s3_server.bucket}/"):] + "/"
        pages = s3_server.client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
        sizes = {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}
        assert "trainer_state_rank0.json" in sizes, (uri, sorted(sizes))
        assert not [k for k in sizes if k.endswith("/") or k == ""], f"directory markers: not boto3's upload {sorted(sizes)}"

        def state(r):
            body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}trainer_state_rank{r}.json")["Body"]
            return json.loads(body.read())

        world = state(0)["world"]
        for r in range(world):
            assert f"trainer_state_rank{r}.json" in sizes, (uri, r, sorted(sizes))
            listed = state(r)["files"]
            assert listed, (uri, r)
            for rel, size in listed.items():
                assert sizes.get(rel) == size, (uri, r, rel, size, sizes.get(rel))
        return world

    return check


@pytest.fixture
def s3_proxy(s3_server):
    """A FaultProxy (fault_proxy.py) in front of the moto server: `.endpoint`, `.outage(s)`,
    `.arm(pattern, s)`, `.resets`."""
    from urllib.parse import urlsplit

    from fault_proxy import FaultProxy

    target = urlsplit(s3_server.endpoint)
    proxy = FaultProxy(target.hostname, target.port)
    yield proxy
    proxy.close()


@pytest.fixture(params=["s3", "file"])
def run_loc(request, tmp_path):
    """A job's checkpoint location (its run folder), on moto S3 and on file://: the lease and
    clean-up tests run on both."""
    from finetune_trainer import storage

    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        return storage.resolve(f"s3://{s3.bucket}/run-{uuid.uuid4().hex[:6]}/job-a",
                               storage.S3Settings(s3.endpoint))
    return storage.resolve(f"file://{tmp_path}/ckpt/job-a")
