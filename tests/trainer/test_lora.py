"""LoRA runs of the real trainer (2 CPU workers, the tiny model and text data): one family of runs
per strategy, each checking what a user of adapters depends on at once: the loss falls, the
checkpoints hold the adapter and its optimizer state and not the frozen base, a run resumes from
them, and the outputs load with PEFT and transformers as they are."""

from __future__ import annotations

import glob
import os

import pytest
import torch

pytestmark = pytest.mark.training

SPEC = {
    "adapter": {"type": "lora", "rank": 4, "alpha": 8},
    # 7 steps per epoch on the tiny data; weight decay and a cosine schedule, so the resumed run
    # must restore the adapter's optimizer state and the schedule exactly for the losses to match.
    "training": {"maxSteps": 4, "microBatchSize": 4, "precision": "fp32", "learningRate": 0.02,
                 "lrScheduler": "cosine", "warmupSteps": 1, "weightDecay": 0.01},
    "checkpoint": {"everySteps": 2, "keep": 2},
}
CRASH_AFTER = {"FINETUNE_FAULT_AFTER_STEP": "2"}
ADAPTER_KEYS = (".lora_A.", ".lora_B.")


def _local(uri: str) -> str:
    assert uri.startswith("file://"), uri
    return uri[len("file://"):]


def _file_job(make_job, tmp_path, name: str, **spec):
    job = make_job(name, {**SPEC, **spec})
    job["spec"]["checkpoint"]["uri"] = f"file://{tmp_path}/ckpt"  # read back from disk below
    return job


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _stored_bytes(obj) -> int:
    """The bytes of the distinct tensor storages in a loaded checkpoint file: what torch.save
    wrote (a view saves its whole storage)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(obj)}
    return sum(storages.values())


def _base_numel(model_dir: str) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(os.path.join(model_dir, "model.safetensors")).values())


def _check_outputs(completed: dict, base_dir: str, merged: bool) -> int:
    """Returns the adapter's number of parameters. The adapter loads with PeftModel.from_pretrained; the merged model (if any) with
    AutoModelForCausalLM.from_pretrained, gives base+adapter's logits, and its weights are the
    untouched base's, plus alpha/r·B·A where an adapter sits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter_dir = _local(completed["adapterUri"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(adapter_dir))
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert adapter and all(any(k in name for k in ADAPTER_KEYS) for name in adapter), sorted(adapter)
    assert any(name.endswith("lora_B.weight") and v.abs().max() > 0 for name, v in adapter.items())  # it trained
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    ids = torch.tensor([[2, 5, 9, 11, 7, 3, 14, 6, 8, 10, 4, 12]])
    with torch.no_grad():
        adapted_logits = with_adapter(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)  # the adapter changes the model
    adapter_numel = sum(v.numel() for v in adapter.values())
    if not merged:
        assert "modelUri" not in completed
        return adapter_numel
    merged_model = AutoModelForCausalLM.from_pretrained(_local(completed["modelUri"])).eval()
    with torch.no_grad():
        merged_logits = merged_model(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    scale = with_adapter.peft_config["default"].lora_alpha / with_adapter.peft_config["default"].r
    merged_sd = merged_model.state_dict()
    assert set(merged_sd) == set(base)
    for name, w in base.items():
        a_name = name.replace(".weight", ".lora_A.weight")
        if f"base_model.model.{a_name}" in adapter:
            a = adapter[f"base_model.model.{a_name}"]
            b = adapter[f"base_model.model.{name.replace('.weight', '.lora_B.weight')}"]
            torch.testing.assert_close(merged_sd[name], w + scale * (b @ a), rtol=0, atol=1e-6)
        else:  # embeddings, norms, the output head: bit-identical to the base
            assert torch.equal(merged_sd[name], w), name
    return adapter_numel


def test_lora_zero3_trains_only_the_adapter_resumes_exactly_and_writes_adapter_and_merged_model(
        make_job, run_trainer, tiny_assets, tmp_path):
    job = _file_job(make_job, tmp_path, "lora-zero3", strategy={"type": "deepspeed", "deepspeed": {"stage": 3}},
                    adapter={**SPEC["adapter"], "merge": True})
    crashed = run_trainer(job, env=CRASH_AFTER)
    assert crashed.rc == 1, crashed.explain()
    (checkpoint,) = crashed.of("checkpoint")
    assert checkpoint["step"] == 2

    # The checkpoint: the adapter's weights (module states) and its optimizer state (ZeRO-3's
    # fp32 partitions and Adam's two moments), nothing of the frozen base.
    ckpt = _local(checkpoint["uri"])
    module_files = glob.glob(f"{ckpt}/state/*model_states.pt")
    optim_files = glob.glob(f"{ckpt}/state/*optim_states.pt")
    assert len(module_files) == len(optim_files) == 2, sorted(os.listdir(f"{ckpt}/state"))
    saved_bytes = 0
    for path in module_files + optim_files:
        content = torch.load(path, map_location="cpu", weights_only=False)
        if path in module_files:
            assert content["module"] and all(any(k in n for k in ADAPTER_KEYS) for n in content["module"])
            assert not content.get("frozen_param_fragments"), path
        saved_bytes += _stored_bytes(content)

    resumed = run_trainer(job, env=CRASH_AFTER)  # a resumed attempt ignores the hook
    assert resumed.rc == 0, resumed.explain()
    assert resumed.of("started")[0]["resumedFromStep"] == 2
    reference = run_trainer(job, fresh=True)
    assert reference.rc == 0, reference.explain()
    ref = reference.losses()
    assert ref[4] < ref[1], ref  # it learns
    assert crashed.losses()[2] == pytest.approx(ref[2], rel=1e-6)
    # Step 4 is printed by both (the last step); step 3 by the resumed run (its first) and by the
    # reference when its rate limit allows.
    for step in sorted({4} | ({3} & set(ref))):
        assert resumed.losses()[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, resumed.losses(), ref)

    (completed,) = resumed.of("completed")
    assert completed["adapterUri"].endswith("/lora-zero3/adapter") and completed["modelUri"].endswith("/lora-zero3/final")
    adapter_numel = _check_outputs(completed, tiny_assets.model_dir, merged=True)
    # At most the adapter in fp32 plus its fp32 master and two moments (and ZeRO-3's padding of
    # each rank's partition); the frozen base (5x the adapter here) would not fit.
    assert saved_bytes <= 1.05 * 16 * adapter_numel + 4096, (saved_bytes, adapter_numel)
    assert saved_bytes < 4 * _base_numel(tiny_assets.model_dir)


def test_lora_fsdp_full_shard_checkpoints_only_the_adapter_resumes_and_writes_the_adapter(
        make_job, run_trainer, tiny_assets, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    job = _file_job(make_job, tmp_path, "lora-fsdp", strategy={"type": "fsdp", "fsdp": {"shardingStrategy": "FULL_SHARD"}})
    crashed = run_trainer(job, env=CRASH_AFTER)
    assert crashed.rc == 1, crashed.explain()
    (checkpoint,) = crashed.of("checkpoint")
    keys = FileSystemReader(f"{_local(checkpoint['uri'])}/state").read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    optim_keys = [k for k in keys if k.startswith("optim.state.")]
    assert model_keys and all(any(a in k for a in ADAPTER_KEYS) for k in model_keys), sorted(model_keys)
    assert optim_keys and all(any(a in k for a in ADAPTER_KEYS) for k in optim_keys), sorted(optim_keys)
    model_numel = sum(keys[k].size.numel() for k in model_keys)
    moments_numel = sum(keys[k].size.numel() for k in optim_keys if k.endswith((".exp_avg", ".exp_avg_sq")))

    resumed = run_trainer(job, env=CRASH_AFTER)
    assert resumed.rc == 0, resumed.explain()
    assert resumed.of("started")[0]["resumedFromStep"] == 2
    losses = {**crashed.losses(), **resumed.losses()}
    assert sorted(resumed.losses()) == [3, 4] and losses[4] < losses[1], losses
    (completed,) = resumed.of("completed")
    assert not os.path.exists(f"{tmp_path}/ckpt/lora-fsdp/final")  # no merge asked: no full model
    adapter_numel = _check_outputs(completed, tiny_assets.model_dir, merged=False)
    assert (model_numel, moments_numel) == (adapter_numel, 2 * adapter_numel)
