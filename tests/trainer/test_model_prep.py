"""Model preparation (model_prep.prepare_model) on the real tiny model, without Ray."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_api.model import FineTuneJob
from finetune_trainer import model_prep
from finetune_trainer.schedule import make_optimizer

BASE = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "p"},
        "spec": {"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d"},
                 "checkpoint": {"uri": "file:///c"}, "resources": {"gpusPerWorker": 0}}}


def job_with(adapter: dict | None = None, **training) -> FineTuneJob:
    doc = json.loads(json.dumps(BASE))
    doc["spec"]["training"] = training
    if adapter is not None:
        doc["spec"]["adapter"] = adapter
    return FineTuneJob.from_document(doc)


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory):
    """The tiny model as saved (fp32) and the same weights saved in bf16."""
    from transformers import AutoModelForCausalLM

    from finetune_trainer.tiny import build_tiny_assets

    fp32 = build_tiny_assets(str(tmp_path_factory.mktemp("tiny")))["model_dir"]
    bf16 = str(tmp_path_factory.mktemp("tiny-bf16"))
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(bf16)
    return {"fp32": fp32, "bf16": bf16}


def _mlp_calls_in_one_training_step(model) -> list[int]:
    """How often each decoder layer's MLP runs in one forward + backward."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.arange(2 * 16).reshape(2, 16) % model.config.vocab_size
    model(input_ids=ids, labels=ids).loss.backward()
    return calls


@pytest.mark.parametrize("on", [True, False])
def test_activation_checkpointing_recomputes_each_layer_in_backward_when_asked(tiny_model_dirs, on):
    prep = model_prep.prepare_model(job_with(activationCheckpointing=on, precision="fp32"), tiny_model_dirs["fp32"])
    model = prep.model
    assert model.training  # from_pretrained hands back eval mode, where checkpointing is inert
    # With checkpointing every layer runs again in backward instead of keeping its activations.
    assert _mlp_calls_in_one_training_step(model) == [2 if on else 1] * model.config.num_hidden_layers
    if on:
        assert model.config.use_cache is False


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("saved", ["fp32", "bf16"])
def test_weights_are_fp32_masters_whatever_the_precision_and_the_saved_dtype(tiny_model_dirs, precision, saved):
    # Mixed precision keeps fp32 master weights; the strategies cast for the math.
    prep = model_prep.prepare_model(job_with(precision=precision), tiny_model_dirs[saved])
    assert prep.dtype == torch.float32
    assert {p.dtype for p in prep.model.parameters()} == {torch.float32}
    assert model_prep.COMPUTE_DTYPE[precision] == {"fp32": None, "bf16": torch.bfloat16}[precision]


def test_no_decay_names_the_norm_weights_and_the_optimizer_uses_them(tiny_model_dirs):
    prep = model_prep.prepare_model(job_with(weightDecay=0.1, precision="fp32"), tiny_model_dirs["fp32"])
    names = dict(prep.model.named_parameters())
    assert prep.no_decay == {n for n in names if n.endswith("norm.weight")} and prep.no_decay
    opt = make_optimizer(prep.model.named_parameters(), prep.training, True, prep.no_decay)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(names[n]) for n in prep.no_decay}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_a_step_added_to_steps_runs_on_the_loaded_model_and_the_optimizer_follows(tiny_model_dirs, monkeypatch):
    # What an adapter step does in one line of STEPS: change which parameters train.
    def freeze_embeddings(prep):
        prep.model.get_input_embeddings().weight.requires_grad_(False)

    steps = list(model_prep.STEPS)
    steps.insert([name for name, _ in steps].index("name_no_decay"), ("freeze_embeddings", freeze_embeddings))
    monkeypatch.setattr(model_prep, "STEPS", tuple(steps))
    prep = model_prep.prepare_model(job_with(precision="fp32"), tiny_model_dirs["fp32"])
    frozen = prep.model.get_input_embeddings().weight
    assert not frozen.requires_grad
    opt = make_optimizer(prep.model.named_parameters(), prep.training, True, prep.no_decay)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(frozen) not in trained
    assert len(trained) == sum(1 for p in prep.model.parameters() if p.requires_grad)


PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _adapted_modules(model) -> set[str]:
    """The names of the modules PEFT put a LoRA layer on, relative to the base model."""
    return {n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
            for n, _ in model.named_parameters() if ".lora_A." in n}


def test_lora_step_freezes_the_base_and_the_optimizer_and_its_state_cover_only_the_adapter(tiny_model_dirs):
    from peft import PeftModel

    prep = model_prep.prepare_model(job_with({"type": "lora", "rank": 4, "alpha": 8}, precision="fp32"),
                                    tiny_model_dirs["fp32"])
    model = prep.model
    assert isinstance(model, PeftModel) and model.training
    layers = model.config.num_hidden_layers
    # The default targets: every attention and MLP projection of every layer, not the output head.
    assert _adapted_modules(model) == {f"model.layers.{i}.{kind}.{p}" for i in range(layers)
                                       for kind, names in (("self_attn", PROJECTIONS - {"gate_proj", "up_proj", "down_proj"}),
                                                           ("mlp", {"gate_proj", "up_proj", "down_proj"}))
                                       for p in names}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    lora_a = next(p for n, p in trainable.items() if ".lora_A." in n)
    assert lora_a.shape[0] == 4  # the rank
    assert model.peft_config["default"].lora_alpha == 8
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_optimizer(model.named_parameters(), prep.training, True, prep.no_decay)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable.values()}
    ids = torch.arange(2 * 16).reshape(2, 16) % model.config.vocab_size
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    # Optimizer state (AdamW's two moments) exists for the adapter alone...
    assert {id(p) for p in opt.state} == {id(p) for p in trainable.values()}
    state_numel = sum(t.numel() for st in opt.state.values() for t in st.values() if t.ndim)
    assert state_numel == 2 * sum(p.numel() for p in trainable.values())
    # ...and the base did not move.
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_lora_target_modules_pick_the_layers_and_unknown_ones_are_bad_input(tiny_model_dirs):
    from finetune_trainer.errors import BadInputError

    prep = model_prep.prepare_model(job_with({"type": "lora", "targetModules": ["q_proj", "v_proj"]}, precision="fp32"),
                                    tiny_model_dirs["fp32"])
    assert {m.rsplit(".", 1)[1] for m in _adapted_modules(prep.model)} == {"q_proj", "v_proj"}
    with pytest.raises(BadInputError, match=r"^spec\.adapter\.targetModules: .*nope"):
        model_prep.prepare_model(job_with({"type": "lora", "targetModules": ["nope"]}, precision="fp32"),
                                 tiny_model_dirs["fp32"])


def test_without_an_adapter_every_weight_trains(tiny_model_dirs):
    prep = model_prep.prepare_model(job_with(precision="fp32"), tiny_model_dirs["fp32"])
    assert prep.job.spec.adapter is None
    assert all(p.requires_grad for p in prep.model.parameters())
