"""Clean-up of what failed attempts leave: checkpoint directories Ray Train never registered
(on file:// and S3, with S3's incomplete multipart uploads), and local staging directories of
processes that are gone. The real runs that leave them are in test_faults_training.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from finetune_trainer import cleanup, storage


def _put(run_loc, rel: str, body: bytes) -> None:
    path = f"{run_loc.path}/{rel}"
    if run_loc.scheme == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with run_loc.filesystem.open_output_stream(path) as f:
        f.write(body)


def _children(run_loc) -> set[str]:
    import pyarrow.fs as pafs

    return {i.base_name for i in run_loc.filesystem.get_file_info(pafs.FileSelector(run_loc.path))}


def _snapshot(*registered: str) -> bytes:
    # the shape Ray Train V2's CheckpointManager writes (checkpoint_manager.py, _save_state)
    results = [{"checkpoint_dir_name": name, "metrics": {"step": i}} for i, name in enumerate(registered)]
    return json.dumps({"ray_version": "x", "checkpoint_results": results, "checkpoint_report_indices": [],
                       "latest_checkpoint_result": results[-1] if results else None,
                       "pending_training_results": [], "current_report_index": len(results)}).encode()


def test_unregistered_checkpoints_are_removed_registered_kept(run_loc, capsys):
    for name in ("checkpoint_step00000002_a", "checkpoint_step00000004_a", "checkpoint_step00000006_b"):
        _put(run_loc, f"{name}/trainer_state_rank0.json", b"{}")
        _put(run_loc, f"{name}/state/shard.pt", b"x" * 100)
    _put(run_loc, "final/model.safetensors", b"m")
    _put(run_loc, cleanup.SNAPSHOT_FILE, _snapshot("checkpoint_step00000002_a", "checkpoint_step00000004_a"))
    removed = cleanup.remove_unregistered_checkpoints(run_loc)
    assert removed == ["checkpoint_step00000006_b"]
    assert _children(run_loc) == {"checkpoint_step00000002_a", "checkpoint_step00000004_a", "final",
                                  cleanup.SNAPSHOT_FILE}
    assert "removed " + run_loc.uri + "/checkpoint_step00000006_b: never registered" in capsys.readouterr().out


def test_without_a_record_every_checkpoint_is_unregistered(run_loc):
    _put(run_loc, "checkpoint_step00000002_a/trainer_state_rank0.json", b"{}")
    assert cleanup.remove_unregistered_checkpoints(run_loc) == ["checkpoint_step00000002_a"]
    assert cleanup.remove_unregistered_checkpoints(run_loc) == []


def test_an_unreadable_record_removes_nothing(run_loc, capsys):
    _put(run_loc, "checkpoint_step00000002_a/trainer_state_rank0.json", b"{}")
    _put(run_loc, cleanup.SNAPSHOT_FILE, b"{not json")
    assert cleanup.remove_unregistered_checkpoints(run_loc) == []
    assert "checkpoint_step00000002_a" in _children(run_loc)
    assert "not removing unregistered checkpoints" in capsys.readouterr().out


def test_incomplete_multipart_uploads_under_the_run_are_aborted(s3_server):
    prefix = f"cleanup-{uuid.uuid4().hex[:6]}"
    run_loc = storage.resolve(f"s3://{s3_server.bucket}/{prefix}/job-a", storage.S3Settings(s3_server.endpoint))
    mine = s3_server.client.create_multipart_upload(Bucket=s3_server.bucket, Key=f"{prefix}/job-a/checkpoint_x/big.pt")
    other = s3_server.client.create_multipart_upload(Bucket=s3_server.bucket, Key=f"{prefix}/job-b/checkpoint_y/big.pt")
    assert cleanup.abort_incomplete_uploads(run_loc) == 1
    left = s3_server.client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]], (mine["UploadId"], left)
    s3_server.client.abort_multipart_upload(Bucket=s3_server.bucket, Key=other["Key"], UploadId=other["UploadId"])


def test_staging_of_dead_processes_is_swept_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        made = {
            "dead": tempfile.mkdtemp(prefix=f"finetune-ckpt-rank1-{dead_pid}-", dir=tmp_path),
            "dead_restore": tempfile.mkdtemp(prefix=f"finetune-restore-rank0-{dead_pid}-", dir=tmp_path),
            "live": tempfile.mkdtemp(prefix=f"finetune-ckpt-rank0-{live.pid}-", dir=tmp_path),
            "mine": tempfile.mkdtemp(prefix=cleanup.staging_prefix("ckpt", 0), dir=tmp_path),
            "unrelated": tempfile.mkdtemp(prefix="finetune-final-", dir=tmp_path),
        }
        with open(os.path.join(made["dead"], "shard.pt"), "wb") as f:
            f.write(b"x" * 1000)
        assert sorted(cleanup.sweep_staging(str(tmp_path))) == sorted([made["dead"], made["dead_restore"]])
        assert all(os.path.isdir(made[k]) for k in ("live", "mine", "unrelated"))
        assert cleanup.sweep_staging(str(tmp_path), own=True) == [made["mine"]]
        assert os.path.isdir(made["live"]) and os.path.isdir(made["unrelated"])
    finally:
        live.kill()
        live.wait()
