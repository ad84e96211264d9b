"""Automatic resume: a run killed after its first checkpoint continues from that step and
reaches the same losses as an uninterrupted run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.training

SPEC = {
    # ZeRO-2, fp32, gradient accumulation 2: the resumed run must restore optimizer, LR
    # schedule and data position exactly for the losses to match.
    "strategy": {"deepspeed": {"stage": 2}},
    # 7 optimizer steps per epoch on the tiny data: the resumed run restores a position in
    # the middle of epoch 0 and then crosses into epoch 1 (reshuffled with seed + 1).
    "training": {"maxSteps": 8, "gradientAccumulationSteps": 2, "microBatchSize": 4, "precision": "fp32",
                 "lrScheduler": "cosine", "warmupSteps": 2, "weightDecay": 0.01, "epochs": 3},
    "checkpoint": {"everySteps": 3, "keep": 2},
}


def test_resume_matches_uninterrupted_run(make_job, run_trainer):
    job = make_job("resume-me", SPEC)
    hook = {"FINETUNE_FAULT_AFTER_STEP": "3"}
    crashed = run_trainer(job, env=hook)
    assert crashed.rc == 1, crashed.explain()
    (failed,) = crashed.of("failed")
    assert failed["reason"] == "TrainingFailed" and "injected failure after step 3" in failed["message"]
    assert [e["step"] for e in crashed.of("checkpoint")] == [3]
    assert not crashed.of("completed")

    resumed = run_trainer(job, env=hook)  # same job, same hook: a resumed attempt ignores it
    assert resumed.rc == 0, resumed.explain()
    (started,) = resumed.of("started")
    assert started["resumedFromStep"] == 3 and started["totalSteps"] == 8
    losses = resumed.losses()
    assert min(losses) == 4, losses  # continues after the checkpoint, not from 0
    assert [e["step"] for e in resumed.of("checkpoint")] == [6, 8]
    (completed,) = resumed.of("completed")
    assert completed["step"] == 8

    # The uninterrupted reference: the same job with --fresh, which deliberately ignores the
    # checkpoints and starts from the base model at step 0.
    reference = run_trainer(job, fresh=True)
    assert reference.rc == 0, reference.explain()
    assert reference.of("started")[0]["resumedFromStep"] == 0
    ref_losses = reference.losses()
    assert {3, 6, 8} <= set(ref_losses), ref_losses
    assert crashed.losses()[3] == pytest.approx(ref_losses[3], rel=1e-6)
    for step in (6, 8):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), (step, losses, ref_losses)
    assert losses[8] < ref_losses[1]  # and it did learn
    epochs = {e["step"]: e["epoch"] for e in resumed.of("progress")}
    assert epochs[4] == 0 and epochs[8] == 1, epochs
