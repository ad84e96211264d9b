"""The offline validator (`finetune validate`) on the table of good and bad documents."""

from __future__ import annotations

import pytest

from finetune_api.model import FineTuneJob
from finetune_api.validation import admit, validate

from .cases import BAD, GOOD, make


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_documents_are_admitted(name):
    assert validate(GOOD[name]) == []


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_documents_name_the_field(name):
    doc, field = BAD[name]
    errors = validate(doc)
    assert errors, f"{name} was accepted"
    assert field in [e.path for e in errors], [str(e) for e in errors]
    # a person can act on it: the message says more than "invalid"
    assert all(len(e.message) > 10 for e in errors)


def test_there_are_at_least_twenty_bad_documents():
    assert len(BAD) >= 20


def test_defaults_are_applied_like_the_api_server():
    doc = admit(make())
    spec = doc["spec"]
    assert spec["training"]["precision"] == "bf16"
    assert spec["training"]["gradientAccumulationSteps"] == 1
    assert spec["runPolicy"] == {"suspend": False, "backoffLimit": 3,
                                 "cleanupPolicy": "DeleteCluster"}
    assert spec["strategy"]["deepspeed"]["offloadParam"] == "none"
    assert "fsdp" not in spec["strategy"]  # blocks are not invented, only their fields


def test_null_values_are_pruned_then_defaulted():
    doc = admit(make(**{"spec.training.maxSteps": None, "spec.training.seed": None}))
    assert "maxSteps" not in doc["spec"]["training"]
    assert doc["spec"]["training"]["seed"] == 42


def test_several_errors_are_all_reported():
    errors = validate(make(**{"spec.training.microBatchSize": 0, "spec.resources.workers": 0,
                              "spec.training.bogus": 1}))
    assert {"spec.training.microBatchSize", "spec.resources.workers",
            "spec.training.bogus"} <= {e.path for e in errors}


@pytest.mark.parametrize("meta,message", [
    ({}, "name or generateName is required"),
    ({"name": "Has_Caps"}, "lower-case"),
    ({"name": "x" * 46}, "more than 45"),
])
def test_metadata_name(meta, message):
    errors = validate(make(metadata=meta))
    assert any(e.path == "metadata.name" and message in e.message for e in errors)


def test_wrong_kind_and_version_are_refused():
    assert [e.path for e in validate(make(kind="TrainJob"))] == ["kind"]
    assert [e.path for e in validate(make(apiVersion="finetune.dev/v1"))] == ["apiVersion"]


def test_typed_model_reads_the_defaulted_document():
    job = FineTuneJob.from_document(make(**{"spec.resources.gpusPerWorker": 4}))
    assert job.spec.training.learning_rate == 2.0e-5
    assert job.spec.strategy.deepspeed.stage == 3
    assert job.spec.resources.training_processes == 8
    assert job.final_model_uri == "s3://ckpt/runs/case/final"
    fsdp = FineTuneJob.from_document(make(**{"spec.strategy": {"type": "fsdp"}}))
    assert fsdp.spec.strategy.fsdp.sharding_strategy == "FULL_SHARD"


def test_adapter_section_defaults_and_the_outputs_a_job_promises():
    full = FineTuneJob.from_document(make())
    assert full.spec.adapter is None and full.adapter_uri is None
    assert full.outputs == {"modelUri": "s3://ckpt/runs/case/final"}
    lora = FineTuneJob.from_document(make(**{"spec.adapter": {"type": "lora"}}))
    a = lora.spec.adapter
    assert (a.type, a.rank, a.alpha, a.dropout, a.target_modules, a.merge) == ("lora", 8, 16, 0.0, [], False)
    assert lora.outputs == {"adapterUri": "s3://ckpt/runs/case/adapter"}  # no merge: no full model
    merged = FineTuneJob.from_document(make(**{"spec.adapter": {"type": "lora", "merge": True}}))
    assert merged.outputs == {"modelUri": "s3://ckpt/runs/case/final", "adapterUri": "s3://ckpt/runs/case/adapter"}
