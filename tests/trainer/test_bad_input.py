"""Bad input ends in the driver's preflight: one clear line, a `failed` event, exit code 3.

No worker starts, so these need no Ray instance."""

from __future__ import annotations

import uuid

import pytest

from finetune_api.model import FineTuneJob
from finetune_trainer import launcher


def _assert_one_clear_line(text: str, *needles: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("finetune-train: error: ")
    assert "Traceback" not in text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_bucket_exits_3_via_entrypoint(make_job, run_trainer):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:6]}"
    job = make_job("missing-bucket", {"checkpoint": {"uri": f"s3://{bucket}/runs"}})
    run = run_trainer(job, join_ray=False, timeout=120)
    assert run.rc == 3, run.explain()
    _assert_one_clear_line(run.stderr, bucket, "does not exist")
    (failed,) = run.of("failed")
    assert failed["reason"] == "BadInput" and bucket in failed["message"]
    assert not run.of("started")


def _run_in_process(doc, capsys):
    code = launcher.run_job(FineTuneJob.from_document(doc))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_model_path_exits_3(make_job, s3_server, capsys):
    doc = make_job("missing-model", {"model": {"uri": f"s3://{s3_server.bucket}/base/not-there"}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, "base/not-there", "config.json")
    assert '"reason": "BadInput"' in out


def test_missing_local_model_exits_3(make_job, tmp_path, capsys):
    doc = make_job("missing-local-model", {"model": {"uri": f"file://{tmp_path}/nothing"}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, f"{tmp_path}/nothing")


@pytest.mark.parametrize("content, needle", [
    (b"this is not json\n", "line 1 is not JSON"),
    (b'{"body": "no text field"}\n', "no field 'text'"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"\n\n", "no non-empty documents"),
])
def test_unreadable_dataset_exits_3(content, needle, make_job, s3_server, capsys):
    key = f"bad-data/{uuid.uuid4().hex[:6]}.jsonl"
    s3_server.client.put_object(Bucket=s3_server.bucket, Key=key, Body=content)
    doc = make_job("bad-dataset", {"dataset": {"uri": f"s3://{s3_server.bucket}/{key}"}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, needle)


def test_missing_dataset_exits_3(make_job, s3_server, capsys):
    doc = make_job("no-dataset", {"dataset": {"uri": f"s3://{s3_server.bucket}/nothing/here"}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, "does not exist or holds no files")


@pytest.mark.parametrize("offline", ["1", ""])
def test_unreachable_hub_model_exits_3(offline, make_job, capsys, monkeypatch, tmp_path):
    # Offline mode (the model is in no local cache) and a Hub that cannot be reached (a
    # closed local port as the endpoint) both end in preflight.
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    doc = make_job("hub-model", {"model": {"uri": "hf://some-org/some-model", "revision": "main"}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, "hf://some-org/some-model@main", "Hugging Face Hub")


def test_gpus_asked_without_gpus_exits_3(make_job, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    doc = make_job("wants-gpu", {"resources": {"gpusPerWorker": 1}, "training": {"precision": "fp16"}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, "GPU", "fp16")


def test_invalid_job_exits_2(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
                    "spec:\n  model: {uri: 'ftp://nope'}\n  dataset: {uri: 'file:///d'}\n"
                    "  checkpoint: {uri: 'file:///c'}\n")
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer", "--job", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _assert_one_clear_line(proc.stderr, "spec.model.uri")


def test_unreachable_mlflow_server_exits_3_naming_the_field(make_job, capsys):
    from finetune_testbed.ports import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    doc = make_job("no-mlflow", {"tracking": {"mlflow": {"uri": uri, "experiment": "sft"}}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, "spec.tracking.mlflow.uri", uri, "did not answer")
    assert '"reason": "BadInput"' in out
@pytest.mark.parametrize("content, needle", [
    (b'{"text": "not a chat"}\n', "no field 'messages'"),
    (b'{"messages": [{"role": "user", "content": 3}]}\n', "field 'messages' is not a non-empty list"),
])
def test_bad_chat_records_exit_3(content, needle, make_job, s3_server, capsys):
    key = f"bad-chat/{uuid.uuid4().hex[:6]}.jsonl"
    s3_server.client.put_object(Bucket=s3_server.bucket, Key=key, Body=content)
    doc = make_job("bad-chat", {"dataset": {"uri": f"s3://{s3_server.bucket}/{key}", "format": "chat"}})
    code, out, err = _run_in_process(doc, capsys)
    assert code == 3
    _assert_one_clear_line(err, needle)
