"""One real run on chat data: FSDP FULL_SHARD, 2 CPU workers, masked loss, records truncated, an
evaluation set split off by evalFraction, the eval loss every 2 steps and at the end; and the
2-worker eval loss against the same evaluation computed here, in one process, on the final
model."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.training


def test_chat_run_with_eval_on_two_workers(make_job, run_trainer, tiny_assets, s3_server, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer import data, evaluation, records

    chat_uri = tiny_assets.dataset_uri.rsplit("/", 1)[0] + "/chat.jsonl"
    dataset = {"uri": chat_uri, "format": "chat", "maxSeqLength": 24, "evalFraction": 0.1, "evalSeed": 3}
    run = run_trainer(make_job("chat-eval", {
        "dataset": dataset,
        "strategy": {"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}},
        "training": {"maxSteps": 4, "evalEverySteps": 2, "learningRate": 0.01},
        "checkpoint": {"everySteps": 4},
    }))
    assert run.rc == 0, run.explain()

    # The records and what became of them: the split, and the two-turn records (31 to 33 tokens)
    # cut to maxSeqLength 24 (their first turn still has tokens to learn).
    chat_path = tiny_assets.dataset_path.rsplit("/", 1)[0] + "/chat.jsonl"
    with open(chat_path) as f:
        chats = [json.loads(line)["messages"] for line in f]
    held_out = data.split_eval(len(chats), 0.1, 3)
    train = [c for i, c in enumerate(chats) if i not in held_out]
    (event,) = run.of("data")
    assert event["format"] == "chat" and event["longRecords"] == "truncate"
    assert (event["records"], event["evalRecords"]) == (len(train), len(held_out))
    assert event["truncated"] == sum(len(c) == 4 for c in train) > 0
    assert event["droppedTooLong"] == event["droppedNothingToLearn"] == 0

    evals = run.of("eval")
    assert [e["step"] for e in evals] == [2, 4], evals
    assert all(math.isfinite(e["evalLoss"]) for e in evals)
    assert evals[1]["evalLoss"] < evals[0]["evalLoss"], evals
    (completed,) = run.of("completed")
    assert completed["evalLoss"] == pytest.approx(evals[1]["evalLoss"], abs=1e-6)

    # The same evaluation set, evaluated by one process on the final model: the 2-worker
    # reduction gives the same loss.
    prefix = completed["modelUri"][len(f"s3://{s3_server.bucket}/"):] + "/"
    local = tmp_path / "final"
    local.mkdir()
    for key in s3_server.keys(prefix):
        if not key.endswith("/"):
            s3_server.client.download_file(s3_server.bucket, key, str(local / key[len(prefix):]))
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local).eval()
    rows = data.build_rows(data.Records("chat", ("messages",)), [chats[i] for i in sorted(held_out)], tok, 24,
                           "truncate", records.Counts(), keep_tail=True)
    parts = []
    for batch_rows in evaluation.rank_batches(rows, 0, 1, 4):
        batch = data.model_inputs(batch_rows, "cpu")
        with torch.no_grad():
            parts.append(evaluation.token_loss_sums(model(**batch).logits, batch["labels"]))
    assert sum(p[1] for p in parts) == evals[1]["evalTokens"]
    assert evaluation.reduce_sums(parts) == pytest.approx(evals[1]["evalLoss"], rel=1e-4)
