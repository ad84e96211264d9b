"""Fast unit tests (no Ray): data packing/sharding, DeepSpeed config, URIs, LR schedule."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest

from finetune_api.model import FineTuneJob
from finetune_trainer import data, storage
from finetune_trainer.errors import BadInputError
from finetune_trainer.strategy_deepspeed import build_ds_config, deep_merge

BASE = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "u"},
        "spec": {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d"},
                 "checkpoint": {"uri": "file:///c"},
                 "resources": {"gpusPerWorker": 0}}}


def job_with(**spec) -> FineTuneJob:
    doc = json.loads(json.dumps(BASE))
    doc["spec"].update(spec)
    return FineTuneJob.from_document(doc)


# --- data ------------------------------------------------------------------------------

def test_pack_appends_eos_and_cuts_fixed_lengths():
    seqs = data.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, seq_len=4)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three full pieces, nothing dropped
    assert seqs == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert data.pack([[1, 2, 3]], eos_id=0, seq_len=3) == [[1, 2, 3]]  # tail [0] dropped


def test_shards_are_disjoint_and_cover_every_document(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(11)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[6:]) + "\n\n")
    (tmp_path / "notes.md").write_text("ignored: unknown extension")
    loc = storage.resolve(f"file://{tmp_path}")
    shards = [data.load_shard(loc, "auto", data.Records("text", ("text",)), r, 3) for r in range(3)]
    assert shards[0] == ["doc 0", "doc 3", "doc 6", "doc 9"]
    assert sorted(sum(shards, []), key=lambda s: int(s.split()[1])) == [f"doc {i}" for i in range(11)]


def test_text_and_parquet_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.txt").write_text("first line\n\n  \nsecond line\n")
    pq.write_table(pa.table({"body": ["p1", None, "", "p2"]}), tmp_path / "p.parquet")
    fs = pafs.LocalFileSystem()
    assert data.read_documents(fs, str(tmp_path / "t.txt"), "text", "text") == ["first line", "second line"]
    assert data.read_documents(fs, str(tmp_path / "p.parquet"), "parquet", "body") == ["p1", "p2"]
    with pytest.raises(BadInputError, match="no column 'text'"):
        data.read_documents(fs, str(tmp_path / "p.parquet"), "parquet", "text")
    assert data.read_documents(fs, str(tmp_path / "p.parquet"), "parquet", "body", sample=True) == ["p1", "p2"]
    assert data.file_format("x/y.parquet", "auto") == "parquet"
    assert data.file_format("x/y.bin", "auto") is None
    assert data.file_format("x/y.bin", "text") == "text"


def test_preflight_sample_reads_whole_lines_only(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SAMPLE_BYTES", 40)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(10)))
    fs = pafs.LocalFileSystem()
    sampled = data.read_documents(fs, str(tmp_path / "d.jsonl"), "jsonl", "text", sample=True)
    assert sampled == ["document 0"]  # the second line, cut by the sample, is not parsed
    assert len(data.read_documents(fs, str(tmp_path / "d.jsonl"), "jsonl", "text")) == 10
    assert data.check_dataset(storage.resolve(f"file://{tmp_path}"), "auto", data.Records("text", ("text",))) == 1


def test_plan_steps_and_epoch_shuffle():
    plan = data.plan_steps(batches_per_epoch=10, grad_accum=3, epochs=2, max_steps=None)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 6)
    assert data.plan_steps(10, 3, 2, max_steps=4).total_steps == 4
    assert data.plan_steps(10, 1, 5, max_steps=100).total_steps == 50
    seqs = [[i] for i in range(8)]
    e0 = data.epoch_batches(seqs, 2, seed=1, epoch=0, n_batches=4)
    assert e0 == data.epoch_batches(seqs, 2, seed=1, epoch=0, n_batches=4)  # deterministic
    assert e0 != data.epoch_batches(seqs, 2, seed=1, epoch=1, n_batches=4)  # reshuffled per epoch
    assert sorted(x[0] for b in e0 for x in b) == list(range(8))
    assert len(data.epoch_batches(seqs, 3, seed=1, epoch=0, n_batches=2)) == 2


def test_tokenize_and_pack_with_tiny_tokenizer():
    from finetune_trainer.tiny import build_tokenizer, make_sentences

    texts = make_sentences(20, seed=3)
    tok = build_tokenizer(texts)
    seqs = data.tokenize_and_pack(texts, tok, 16)
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert len(seqs) == total // 16 and all(len(s) == 16 for s in seqs)
    assert tok.eos_token_id in seqs[0]
    assert tok.unk_token_id not in sum(seqs, [])


# --- DeepSpeed config ------------------------------------------------------------------

def test_deep_merge_is_recursive_and_raw_config_wins():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 9}, "e": 5}) == {"a": {"b": 9, "c": 2}, "d": 1, "e": 5}
    job = job_with(
        strategy={"type": "deepspeed", "deepspeed": {
            "stage": 3, "offloadOptimizer": "cpu", "offloadParam": "cpu",
            "config": {"zero_optimization": {"stage3_max_live_parameters": 12345,
                                             "offload_param": {"device": "nvme"}},
                       "gradient_clipping": 0.5, "bf16": {"enabled": False}}}},
        training={"microBatchSize": 3, "gradientAccumulationSteps": 4, "precision": "bf16", "maxGradNorm": 2.0})
    cfg = build_ds_config(job.spec.training, job.spec.strategy.deepspeed)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 4
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # merged LAST: the raw config overrides what the trainer derived, keeps the rest
    assert zero["stage3_max_live_parameters"] == 12345
    assert zero["offload_param"]["device"] == "nvme" and "pin_memory" in zero["offload_param"]
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": False}


def test_ds_config_precision_and_stage():
    job = job_with(strategy={"type": "deepspeed", "deepspeed": {"stage": 1}}, training={"precision": "fp32"})
    cfg = build_ds_config(job.spec.training, job.spec.strategy.deepspeed)
    assert cfg["zero_optimization"] == {"stage": 1}
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_ds_buckets_follow_the_model_and_the_raw_config_still_wins():
    import torch

    from finetune_trainer.strategy_deepspeed import MIN_BUCKET, weights_dtype

    job = job_with(strategy={"type": "deepspeed", "deepspeed": {"stage": 3, "config": {
        "zero_optimization": {"stage3_max_reuse_distance": 7}}}}, training={"precision": "bf16"})
    zero = build_ds_config(job.spec.training, job.spec.strategy.deepspeed, hidden_size=4096)["zero_optimization"]
    # transformers' "auto" sizes for a 4096-wide model, not DeepSpeed's fixed 5e8 elements
    assert zero["reduce_bucket_size"] == 4096 ** 2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
    assert zero["stage3_param_persistence_threshold"] == 40960 and zero["stage3_max_reuse_distance"] == 7
    small = build_ds_config(job.spec.training, job.spec.strategy.deepspeed, hidden_size=64)["zero_optimization"]
    assert small["reduce_bucket_size"] == MIN_BUCKET
    stage2 = job_with(strategy={"type": "deepspeed", "deepspeed": {"stage": 2}}, training={"precision": "fp32"})
    zero2 = build_ds_config(stage2.spec.training, stage2.spec.strategy.deepspeed, hidden_size=4096)["zero_optimization"]
    assert zero2["allgather_bucket_size"] == 4096 ** 2 and "stage3_prefetch_bucket_size" not in zero2
    # DeepSpeed's module is in the math's dtype; its optimizer keeps the fp32 master partitions.
    assert (weights_dtype("bf16"), weights_dtype("fp32")) == (torch.bfloat16, torch.float32)


# --- URIs -> filesystems ---------------------------------------------------------------

def test_file_uris(tmp_path, monkeypatch):
    loc = storage.resolve(f"file://{tmp_path}/x/")
    assert isinstance(loc.filesystem, pafs.LocalFileSystem) and loc.path == f"{tmp_path}/x"
    monkeypatch.chdir(tmp_path)
    rel = storage.resolve("file://out/ckpt")
    assert rel.path == os.path.join(str(tmp_path), "out/ckpt") and rel.uri == f"file://{tmp_path}/out/ckpt"
    assert loc.child("job", "final").path == f"{tmp_path}/x/job/final"


def test_s3_uris_endpoint_and_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    loc = storage.resolve("s3://bucket/some/prefix/", storage.S3Settings("http://minio.local:9000", "eu-west-1"))
    assert loc.path == "bucket/some/prefix" and loc.bucket == "bucket"
    fs = loc.filesystem
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-west-1"
    assert "minio.local:9000" in repr(fs.__reduce__()) and "'http'" in repr(fs.__reduce__())
    assert "s3cr3t-value" not in repr(fs) and "s3cr3t-value" not in str(loc)
    # no endpoint in the spec: AWS_ENDPOINT_URL, then AWS itself (https)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.com")
    assert storage._endpoint(storage.S3Settings()) == ("s3.example.com", "https")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage._endpoint(storage.S3Settings()) == (None, "https")


@pytest.mark.parametrize("uri", ["gs://b/k", "s3://", "file://", "/plain/path"])
def test_bad_uris(uri):
    with pytest.raises(BadInputError):
        storage.resolve(uri)


# --- learning-rate schedule ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule_warmup_then_shape(kind):
    import torch

    from finetune_trainer.schedule import make_scheduler

    job = job_with(training={"learningRate": 0.1, "warmupSteps": 4, "lrScheduler": kind, "maxSteps": 20})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, job.spec.training, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])  # linear warm-up
    if kind == "constant":
        assert lrs[4:] == pytest.approx([0.1] * 16)
    elif kind == "linear":
        assert lrs[12] == pytest.approx(0.1 * (20 - 12) / 16)
    else:
        assert lrs[12] == pytest.approx(0.05)  # half-way through the decay: cos = 0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_weight_decay_groups_skip_norms_and_biases():
    import torch

    from finetune_trainer.schedule import decay_groups

    layer = torch.nn.Linear(4, 4)
    norm = torch.nn.LayerNorm(4)
    named = list(layer.named_parameters()) + [("norm." + n, p) for n, p in norm.named_parameters()]
    groups = decay_groups(named, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and [p.shape for p in groups[0]["params"]] == [torch.Size([4, 4])]
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 3
