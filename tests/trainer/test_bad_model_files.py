"""Inputs no retry can fix exit 3 (BadInput) with one line naming the file: a truncated
safetensors file or a corrupt tokenizer (caught by the driver's preflight, no worker starts),
and a dataset too short for one optimizer step (found by the workers after tokenizing)."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from finetune_api.model import FineTuneJob
from finetune_trainer import launcher


def _one_clear_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("finetune-train: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _broken_copy(tiny_assets, tmp_path, name: str, damage) -> str:
    model = tmp_path / f"model-{name}"
    shutil.copytree(tiny_assets.model_dir, model)
    damage(model)
    return str(model)


def _truncate(model):
    path = model / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _bad_tokenizer(model):
    path = model / "tokenizer.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


@pytest.mark.parametrize("where", ["file", "s3"])
def test_truncated_safetensors_exits_3_naming_the_file(where, make_job, tiny_assets, s3_server, tmp_path, capsys):
    model = _broken_copy(tiny_assets, tmp_path, where, _truncate)
    if where == "file":
        uri = f"file://{model}"
    else:
        prefix = f"broken-{uuid.uuid4().hex[:6]}"
        for name in os.listdir(model):
            s3_server.client.upload_file(os.path.join(model, name), s3_server.bucket, f"{prefix}/{name}")
        uri = f"s3://{s3_server.bucket}/{prefix}"
    code = launcher.run_job(FineTuneJob.from_document(make_job("truncated", {"model": {"uri": uri}})))
    out, err = capsys.readouterr()
    assert code == 3
    _one_clear_line(err, f"{uri}/model.safetensors", "truncated")
    assert '"reason": "BadInput"' in out and '"event": "started"' not in out


def test_corrupt_tokenizer_exits_3_naming_the_file(make_job, tiny_assets, tmp_path, capsys):
    model = _broken_copy(tiny_assets, tmp_path, "tok", _bad_tokenizer)
    code = launcher.run_job(FineTuneJob.from_document(make_job("bad-tok", {"model": {"uri": f"file://{model}"}})))
    out, err = capsys.readouterr()
    assert code == 3
    _one_clear_line(err, f"file://{model}/tokenizer.json", "not valid JSON")


@pytest.mark.training
def test_dataset_too_small_for_one_step_exits_3(make_job, run_trainer, s3_server):
    key = f"short-data/{uuid.uuid4().hex[:6]}.jsonl"
    s3_server.client.put_object(Bucket=s3_server.bucket, Key=key, Body=b'{"text": "the cat sat on the mat ."}\n')
    uri = f"s3://{s3_server.bucket}/{key}"
    run = run_trainer(make_job("short-data", {"dataset": {"uri": uri}}))
    assert run.rc == 3, run.explain()
    # the trainer's verdict: one line (Ray's controller logs the workers' tracebacks above it)
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("finetune-train: error: ")]
    assert uri in line and "too small for one optimizer step" in line, line
    (failed,) = run.of("failed")
    assert failed["reason"] == "BadInput" and uri in failed["message"], (failed, line)
