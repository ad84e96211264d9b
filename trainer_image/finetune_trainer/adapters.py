"""LoRA and QLoRA adapters through PEFT: the model-preparation step and the outputs.

`apply_adapter` (a step of model_prep.STEPS) wraps the loaded base model with PEFT's
`get_peft_model`: the base weights are frozen (requires_grad False), so the strategies, which
build the optimizer over trainable parameters only, give optimizer state to the adapter alone,
and their checkpoints leave the frozen weights out. `write_adapter_outputs` writes, on rank 0,
the adapter in PEFT's layout and, with `merge`, the base model with the adapter merged in.
"""

from __future__ import annotations

import os
import tempfile

from finetune_api.schema import DEFAULT_TARGET_MODULES

from .errors import BadInputError

ADAPTER_NAME = "default"  # PEFT's; the adapter's keys carry it (lora_A.default.weight)


def lora_config(adapter):
    from peft import LoraConfig

    return LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=list(adapter.target_modules) or DEFAULT_TARGET_MODULES,
                      bias="none", task_type="CAUSAL_LM")


def quantization_config(compute_dtype):
    """QLoRA's base: 4-bit NF4 with double quantization, as the QLoRA paper trains it."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32)


def base_model_name(job) -> str:
    """What the adapter's config records as its base: the Hub id for hf://, else the URI."""
    uri = job.spec.model.uri
    return uri[len("hf://"):].strip("/") if uri.startswith("hf://") else uri


def apply_adapter(prep) -> None:
    adapter = prep.job.spec.adapter
    if adapter is None:
        return
    from peft import get_peft_model, prepare_model_for_kbit_training

    if adapter.type == "qlora":
        # Casts the norms to fp32 and makes the frozen 4-bit base feed gradients to the adapter's
        # inputs; the activation_checkpointing step has already chosen non-reentrant recompute.
        prep.model = prepare_model_for_kbit_training(prep.model, use_gradient_checkpointing=False)
    try:
        prep.model = get_peft_model(prep.model, lora_config(adapter), adapter_name=ADAPTER_NAME)
    except ValueError as exc:  # PEFT's words for target modules the model does not have
        raise BadInputError(f"spec.adapter.targetModules: {' '.join(str(exc).split())[:400]}") from None
    # get_peft_model records the local path it was loaded from (a node's cache directory);
    # the saved adapter should name the model the job names.
    prep.model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_model_name(prep.job)
    initialise_meta_adapter(prep.model)


def initialise_meta_adapter(peft_model) -> None:
    """On a base built on the meta device (FSDP loads each rank's shards after sharding) PEFT puts
    its new layers on the meta device too, and they are in no file: they get their real initial
    values here, on the CPU, with PEFT's own initialisation, before the model is sharded. Every
    rank draws the same values (the same seed), as each keeps only its shard of them."""
    from peft.tuners.lora import LoraLayer

    init = peft_model.peft_config[ADAPTER_NAME].init_lora_weights
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        layers = (module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME])
        if not any(p.is_meta for layer in layers for p in layer.parameters()):
            continue
        for layer in layers:
            layer.to_empty(device="cpu")
        module.reset_lora_parameters(ADAPTER_NAME, init)


def adapter_state_dict(peft_model, full_state_dict: dict) -> dict:
    """The adapter's tensors out of a state dict (the whole model's, or the adapter's own), under
    PEFT's saved names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=full_state_dict, adapter_name=ADAPTER_NAME)


def write_adapter_outputs(job, peft_model, adapter_tensors: dict, tokenizer, model_path: str, settings) -> None:
    """Rank 0: the adapter (adapter_config.json, adapter_model.safetensors and the tokenizer) to
    job.adapter_uri; with merge, the merged full model to job.final_model_uri."""
    from .storage import is_write_failure, resolve, upload_dir, write_failure

    with tempfile.TemporaryDirectory(prefix="finetune-adapter-") as tmp:
        adapter_dir = os.path.join(tmp, "adapter")
        try:
            # With the gathered tensors: under ZeRO-3 and FSDP the module's own parameters are
            # this rank's shards.
            save_adapter(peft_model, adapter_tensors, adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
        except Exception as exc:
            if not is_write_failure(exc, tmp):
                raise
            raise write_failure("the adapter", tmp, exc) from None
        upload_dir(adapter_dir, resolve(job.adapter_uri, settings))
        if job.spec.adapter.merge:
            merged_dir = os.path.join(tmp, "merged")
            try:
                write_merged_model(job, model_path, adapter_dir, tokenizer, merged_dir)
            except Exception as exc:
                if not is_write_failure(exc, tmp):
                    raise
                raise write_failure("the merged model", tmp, exc) from None
            upload_dir(merged_dir, resolve(job.final_model_uri, settings))


def save_adapter(peft_model, adapter_tensors: dict, adapter_dir: str) -> None:
    """The adapter in PEFT's layout, from its gathered tensors (named as in the PEFT model's state
    dict: FSDP2 and ZeRO leave the names alone)."""
    if not adapter_state_dict(peft_model, adapter_tensors):
        raise RuntimeError("the gathered tensors hold no adapter weights")
    peft_model.save_pretrained(adapter_dir, state_dict=adapter_tensors, selected_adapters=[ADAPTER_NAME])


def write_merged_model(job, model_path: str, adapter_dir: str, tokenizer, out_dir: str) -> None:
    """The base model, unquantized, in fp32 for the sum, with the saved adapter merged into its
    weights (W + alpha/r · B·A) and saved in the dtype the base model was published in.

    A fresh copy of the base model on rank 0, not the trained module: under ZeRO-3 and FSDP that
    holds only shards, and under QLoRA its base is 4-bit. It costs one more copy of the base model
    in rank 0's CPU memory for the time of the merge.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig

    from . import model_io

    revision = job.spec.model.revision
    base = model_io.load_model(model_path, revision, torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir, adapter_name=ADAPTER_NAME).merge_and_unload()
    saved = getattr(AutoConfig.from_pretrained(model_path, revision=revision or None,
                                               token=os.environ.get("HF_TOKEN") or None), "dtype", None)
    if isinstance(saved, str):  # config.json spells it ("bfloat16")
        saved = getattr(torch, saved, None)
    if isinstance(saved, torch.dtype) and saved != torch.float32:
        merged = merged.to(saved)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
