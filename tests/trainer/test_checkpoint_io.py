"""Checkpoint I/O: the boto3 uploader for s3://, the checkpoint manifest, and the rule that a
`checkpoint` event names a complete, registered checkpoint.

The first tests need no Ray workers (moto in-process, fakes for the controller); the last one
runs the trainer with a deliberately slow S3 and looks into the bucket the moment each
`checkpoint` event arrives.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pyarrow.fs as pafs
import pytest
import yaml

from finetune_api.events import parse_event_line
from finetune_trainer import checkpointing, storage
from finetune_trainer.errors import TrainerError


def _no_pyarrow_copy(*args, **kwargs):
    raise AssertionError("pyarrow copy_files was used for an s3:// upload")


def _write_tree(root, sizes: dict[str, int]) -> dict[str, bytes]:
    out = {}
    for rel, size in sizes.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        out[rel] = data
    return out


def test_upload_dir_to_s3_uses_boto3_multipart(s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(pafs, "copy_files", _no_pyarrow_copy)
    # one file above the part size (multipart, parallel parts), nested and empty files
    files = _write_tree(tmp_path / "src", {"state/big.pt": storage.UPLOAD_PART_BYTES + 12345,
                                           "state/small.pt": 1000, "empty.json": 0, "a/b/c.txt": 7})
    prefix = f"up-{uuid.uuid4().hex[:6]}/ckpt"
    dest = storage.resolve(f"s3://{s3_server.bucket}/{prefix}", storage.S3Settings(s3_server.endpoint))
    stats = storage.upload_dir(str(tmp_path / "src"), dest)
    assert stats.method == "boto3" and stats.files == 4 and stats.bytes == sum(map(len, files.values()))
    keys = s3_server.keys(prefix + "/")
    assert sorted(keys) == sorted(f"{prefix}/{rel}" for rel in files)  # no directory markers either
    for rel, data in files.items():
        body = s3_server.client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{rel}")["Body"].read()
        assert body == data, rel
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in stats.describe()


def test_upload_dir_file_scheme_keeps_pyarrow(tmp_path):
    _write_tree(tmp_path / "src", {"x/y.bin": 10})
    stats = storage.upload_dir(str(tmp_path / "src"), storage.resolve(f"file://{tmp_path}/dst"))
    assert stats.method == "pyarrow" and (tmp_path / "dst" / "x" / "y.bin").stat().st_size == 10


def test_s3_upload_fn_returns_a_checkpoint_ray_manages(s3_server, tmp_path, monkeypatch):
    """What Ray Train V2 hands the upload fn (the checkpoint and the directory NAME) and what it
    accepts back (same filesystem, under the experiment path): checked with Ray's own code."""
    import ray.train
    from ray.train.v2._internal.execution.context import is_managed_checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    settings = storage.S3Settings(s3_server.endpoint)
    loc = storage.resolve(f"s3://{s3_server.bucket}/runs-{uuid.uuid4().hex[:6]}", settings)
    ctx = StorageContext(storage_path=loc.path, experiment_dir_name="job-a", storage_filesystem=loc.filesystem)

    class FakeTrainContext:
        def get_storage(self):
            return ctx

    monkeypatch.setattr(ray.train, "get_context", lambda: FakeTrainContext())
    monkeypatch.setattr(pafs, "copy_files", _no_pyarrow_copy)
    files = _write_tree(tmp_path / "rank1", {"state/zero_pp_rank_1_model_states.pt": 300, "trainer_state_rank1.json": 20})
    upload = checkpointing.s3_upload_fn(settings, rank=1)
    persisted = upload(ray.train.Checkpoint.from_directory(str(tmp_path / "rank1")), "checkpoint_step00000002_x")
    assert persisted.path == f"{loc.path}/job-a/checkpoint_step00000002_x"
    assert persisted.filesystem is ctx.storage_filesystem and is_managed_checkpoint(ctx, persisted)
    prefix = persisted.path.split("/", 1)[1]
    assert sorted(s3_server.keys(prefix + "/")) == sorted(f"{prefix}/{rel}" for rel in files)


# --- the manifest ----------------------------------------------------------------------------

def _fake_checkpoint(root, world: int = 2) -> None:
    for r in range(world):
        rank_dir = root / f"rank{r}"
        _write_tree(rank_dir, {f"state/zero_pp_rank_{r}_optim_states.pt": 100 + r, f"state/model_{r}.pt": 5})
        checkpointing.write_state(str(rank_dir), r, checkpointing.TrainerState(step=4), world)
        for dirpath, _, names in os.walk(rank_dir):  # what Ray's merge of the ranks' dirs does
            for name in names:
                src = os.path.join(dirpath, name)
                dst = os.path.join(root / "merged", os.path.relpath(src, rank_dir))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)


def test_verify_complete_checks_every_ranks_files(tmp_path):
    _fake_checkpoint(tmp_path)
    merged = tmp_path / "merged"
    checkpointing.verify_complete(str(merged))
    state = json.loads((merged / "trainer_state_rank1.json").read_text())
    assert state["world"] == 2 and state["files"] == {"state/model_1.pt": 5, "state/zero_pp_rank_1_optim_states.pt": 101}
    assert checkpointing.read_state(str(merged), 1).step == 4  # the manifest does not confuse the state

    (merged / "state" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"short")
    with pytest.raises(TrainerError, match="rank 1's state/zero_pp_rank_1_optim_states.pt has 5 of 101 bytes"):
        checkpointing.verify_complete(str(merged))
    (merged / "state" / "zero_pp_rank_1_optim_states.pt").unlink()
    with pytest.raises(TrainerError, match="incomplete: rank 1's state/zero_pp_rank_1_optim_states.pt missing"):
        checkpointing.verify_complete(str(merged))
    (merged / "trainer_state_rank1.json").unlink()
    with pytest.raises(TrainerError, match="trainer_state_rank1.json missing"):
        checkpointing.verify_complete(str(merged))


def test_verify_complete_accepts_checkpoints_without_manifest(tmp_path):
    checkpointing.write_state(str(tmp_path), 0, checkpointing.TrainerState(step=2))  # older trainers
    checkpointing.verify_complete(str(tmp_path))
    with pytest.raises(TrainerError, match="trainer_state_rank0.json is missing"):
        checkpointing.verify_complete(str(tmp_path / "nothing"))


# --- the announcement ------------------------------------------------------------------------

class FakeController:
    def __init__(self):
        self.registered: list[str] = []
        self.calls: list[float] = []

    def __call__(self, wait_s: float) -> list[str]:
        self.calls.append(wait_s)
        return [f"bucket/runs/job/{name}" for name in self.registered]


def test_announcer_prints_a_checkpoint_only_once_registered():
    controller, events = FakeController(), []
    ann = checkpointing.Announcer(controller, lambda kind, **f: events.append((kind, f["step"], f["uri"])))
    ann.poll()
    assert controller.calls == []  # nothing pending: no call to the controller
    ann.add(3, "ckpt3", "s3://b/runs/job/ckpt3")
    ann.poll()
    assert events == [] and ann.pending  # uploads still running: not announced
    controller.registered = ["ckpt3"]
    ann.poll()
    assert events == [("checkpoint", 3, "s3://b/runs/job/ckpt3")] and not ann.pending
    ann.poll()
    assert len(events) == 1  # once

    # keep=1: ckpt6 was registered and already deleted in favour of ckpt9, registered after it
    ann.add(6, "ckpt6", "u6")
    ann.add(9, "ckpt9", "u9")
    ann.add(12, "ckpt12", "u12")
    controller.registered = ["ckpt9"]
    ann.poll()
    assert events[1:] == [("checkpoint", 9, "u9")] and [p.step for p in ann.pending] == [12]

    with pytest.raises(TrainerError, match="checkpoint at step 12 was not registered by Ray Train within 5s"):
        ann.flush(5)
    assert controller.calls[-1] == 5
    assert len(events) == 2


# --- a real run against a slow S3 ------------------------------------------------------------

SLOW_UPLOAD_S = 2.0


@pytest.fixture
def slow_checkpoint_puts(s3_server, monkeypatch):
    """Objects under */checkpoint_step* appear in the (in-process) moto bucket SLOW_UPLOAD_S after
    they were sent: an event printed before the uploads finished would be seen before them."""
    from moto.s3.models import S3Backend

    original = S3Backend.put_object

    def put_object(self, bucket_name, key_name, *args, **kwargs):
        if "/checkpoint_step" in key_name:
            time.sleep(SLOW_UPLOAD_S)
        return original(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", put_object)


@pytest.mark.training
@pytest.mark.parametrize("mode", ["SYNC", "ASYNC"])
def test_checkpoint_event_only_when_complete_in_bucket(mode, make_job, ray_address, s3_server, tmp_path,
                                                       slow_checkpoint_puts, complete_in_bucket):
    job = make_job(f"announce-{mode.lower()}", {"strategy": {"deepspeed": {"stage": 3}},
                                                "training": {"maxSteps": 4}, "checkpoint": {"everySteps": 2}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_address,
           "FINETUNE_CHECKPOINT_UPLOAD_MODE": mode}
    proc = subprocess.Popen([sys.executable, "-m", "finetune_trainer", "--job", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(400, proc.kill)
    timer.start()
    lines, checked = [], []
    try:
        for line in proc.stdout:  # the bucket is looked at the moment the event arrives
            lines.append(line)
            event = parse_event_line(line)
            if event and event["event"] == "checkpoint":
                checked.append((event["step"], complete_in_bucket(event["uri"])))
        rc = proc.wait()
    finally:
        timer.cancel()
        proc.kill()
    log = "".join(lines)
    assert rc == 0, log[-6000:]
    assert checked == [(2, 2), (4, 2)], log[-6000:]
    for step in (2, 4):
        for rank in (0, 1):  # both ranks uploaded with boto3
            assert f"rank {rank} uploaded its part of checkpoint_step{step:08d}_" in log and "boto3)" in log
    stalls = {int(s): float(t) for s, t in
              re.findall(r"checkpoint at step (\d+) stalled training for ([0-9.]+)s", log)}
    assert sorted(stalls) == [2, 4], log[-6000:]
    if mode == "SYNC":  # the step loop waited for the (slow) upload
        assert min(stalls.values()) >= SLOW_UPLOAD_S, stalls
    else:  # it did not; the event came later
        assert stalls[2] < SLOW_UPLOAD_S, stalls
