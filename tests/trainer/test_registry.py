"""The strategy registry: spec.strategy.type -> the Strategy class that implements it (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_api import schema
from finetune_api.model import FineTuneJob
from finetune_trainer import strategies
from finetune_trainer.errors import EXIT_INVALID_JOB, InvalidJobError
from finetune_trainer.strategy_deepspeed import DeepSpeedStrategy
from finetune_trainer.strategy_fsdp import FSDPStrategy

BASE = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "r"},
        "spec": {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d"},
                 "checkpoint": {"uri": "file:///c"}, "resources": {"gpusPerWorker": 0}}}


def job_with(strategy: dict) -> FineTuneJob:
    doc = json.loads(json.dumps(BASE))
    doc["spec"]["strategy"] = strategy
    return FineTuneJob.from_document(doc)


def test_every_type_the_schema_allows_has_a_strategy_and_no_other():
    assert strategies.available() == sorted(schema.STRATEGY["properties"]["type"]["enum"])
    assert strategies.lookup("deepspeed") is DeepSpeedStrategy
    assert strategies.lookup("fsdp") is FSDPStrategy


def test_create_builds_the_strategy_the_job_names_from_its_spec_section():
    ds = strategies.create(job_with({"type": "deepspeed", "deepspeed": {"stage": 2, "offloadOptimizer": "cpu"}}),
                           torch.device("cpu"))
    assert isinstance(ds, DeepSpeedStrategy)
    assert ds.stage == 2 and ds.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    fsdp = strategies.create(job_with({"type": "fsdp", "fsdp": {"shardingStrategy": "NO_SHARD"}}),
                             torch.device("cpu"))
    assert isinstance(fsdp, FSDPStrategy) and fsdp.spec.sharding_strategy == "NO_SHARD"


def test_an_unknown_type_is_an_invalid_job_naming_the_field_and_the_choices():
    # The API a job passed can be newer than the trainer image that runs it.
    with pytest.raises(InvalidJobError) as caught:
        strategies.lookup("megatron")
    message = str(caught.value)
    assert message == ("spec.strategy.type: unknown strategy 'megatron'; this trainer implements "
                       "deepspeed, fsdp")
    # What the launcher turns into the `failed` event and the exit code: not retried.
    assert caught.value.reason == "InvalidJob" and caught.value.exit_code == EXIT_INVALID_JOB


def _complete(name: str) -> type:
    """A Strategy subclass with every method, as a strategy module defines one."""

    def method(self, *args):
        raise AssertionError("not called")

    body = {m: method for m in ("prepare", "forward", "forward_backward", "learning_rate", "save_checkpoint",
                                "load_checkpoint", "final_shapes", "full_tensors")}
    body["hf_model"] = property(method)
    return type(f"Strategy_{name}", (strategies.Strategy,), {"name": name, **body})


def test_register_adds_a_strategy_and_refuses_a_second_one_of_the_same_name(monkeypatch):
    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))
    extra = strategies.register(_complete("pipeline"))
    assert strategies.lookup("pipeline") is extra
    assert "pipeline" in strategies.available()
    with pytest.raises(ValueError, match="strategy 'deepspeed' is registered twice"):
        strategies.register(_complete("deepspeed"))
    assert strategies.lookup("deepspeed") is DeepSpeedStrategy
    with pytest.raises(TypeError, match="not a Strategy subclass"):
        strategies.register(dict)
    with pytest.raises(TypeError, match="has no strategy name"):
        strategies.register(_complete(""))
