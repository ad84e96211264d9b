"""Fast unit tests (no Ray cluster) of what a stop and a dead worker report: the step a rerun
resumes from (Ray Train's record), the last step seen, and which rank's failure is the cause."""

from __future__ import annotations

import json

from finetune_api.events import format_event
from finetune_trainer import launcher, stopping, storage
from finetune_trainer.errors import WorkerDiedError


def test_the_resume_step_is_the_latest_registered_checkpoints(tmp_path):
    run = storage.resolve(f"file://{tmp_path}/run")
    assert stopping.resume_step(run) == 0  # no record yet: a rerun starts from the base model
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_step00000004_a"},
                               {"checkpoint_dir_name": "checkpoint_step00000008_a"}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_step00000008_a"},
        # a pending one is not registered: a rerun does not resume from it
        "pending_training_results": [{"checkpoint_dir_name": "checkpoint_step00000012_a"}]}))
    assert stopping.resume_step(run) == 8


def test_the_step_watch_keeps_the_last_step_reported():
    watch = stopping.StepWatch()
    watch.feed("(RayTrainWorker pid=3) " + format_event("started", totalSteps=9, resumedFromStep=4))
    assert watch.step == 4
    watch.feed("(RayTrainWorker pid=3) " + format_event("progress", step=6, totalSteps=9))
    watch.feed("(RayTrainWorker pid=3) some other line")
    assert watch.step == 6


def test_a_dead_worker_is_the_cause_not_the_other_ranks_symptom():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    died = ActorDiedError()
    died.error_msg = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
                      "\tpid: 4242\nThe actor is dead because its worker process has died. Worker exit type: "
                      "UNEXPECTED_SYSTEM_EXIT Worker exit detail: Worker unexpectedly exits with a connection "
                      "error code 2. End of file. (1) The process is killed by SIGKILL by OOM killer.")
    symptom = RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer; Connection reset by peer")
    error = WorkerGroupError("2 workers failed", {0: symptom, 1: WorkerHealthCheckFailedError("rank 1 died", died)})
    cause = launcher._root_cause(error)
    assert isinstance(cause, WorkerDiedError) and (cause.rank, cause.pid) == (1, 4242)
    assert str(cause).startswith("worker rank 1 (pid 4242) died: UNEXPECTED_SYSTEM_EXIT: Worker unexpectedly exits")
    assert "SIGKILL by OOM killer" in str(cause) and "Connection reset" not in str(cause)

    only_errors = WorkerGroupError("1 worker failed", {1: symptom})
    assert launcher._root_cause(only_errors) is symptom and symptom.rank == 1
