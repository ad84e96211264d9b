"""Model preparation: the named steps that turn the base model into the module a strategy wraps.

Every strategy calls `prepare_model` before it shards or wraps the model, so ZeRO and FSDP train
the same prepared model. The steps run in the order of STEPS; each takes the `ModelPrep` and
changes it in place. Adding a step (adapters, loading on the meta device) is one function and
one line in STEPS (`adapter` is one: adapters.apply_adapter).

How the `load` step builds the model is the strategy's: by default from_pretrained, every weight
in this process (`model_io.load_model`); FSDP passes `shard_load.empty_model` (parameters on the
meta device, each rank fills its own shards after sharding) and ZeRO-3 a build under
`deepspeed.zero.Init` that reads each rank's partitions, so the steps after `load` run on a model
no process holds whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import adapters, model_io

# spec.training.precision -> the dtype the weights are loaded and kept in, unless the strategy
# says otherwise. Mixed precision keeps fp32 master weights: FSDP casts for the math
# (MixedPrecisionPolicy with COMPUTE_DTYPE) and the optimizer updates the fp32 shards. DeepSpeed
# keeps the module in the math's dtype and its own fp32 master copy of each rank's partition, so
# it loads in COMPUTE_DTYPE (strategy_deepspeed.weights_dtype).
WEIGHTS_DTYPE = {"fp32": torch.float32, "bf16": torch.float32, "fp16": torch.float32}
# spec.training.precision -> the dtype of the forward and backward math; None: the weights'.
COMPUTE_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelPrep:
    """What the steps read (the job, where the model is) and what they produce."""

    job: Any  # finetune_api.model.FineTuneJob
    path: str  # a local directory or Hub repo id that from_pretrained reads
    dtype: torch.dtype | None = None  # the strategy's, or set by the `precision` step
    # (path, revision, dtype) -> the model; None: model_io.load_model (every weight, here)
    build: Callable[[str, str | None, torch.dtype], Any] | None = None
    model: Any = None  # the Hugging Face model, set by the `load` step
    # Parameters that get no weight decay (biases, norm weights: 1-D), named before any wrapper
    # flattens them and their shapes no longer tell.
    no_decay: set[str] = field(default_factory=set)

    @property
    def training(self):
        return self.job.spec.training


def set_precision(prep: ModelPrep) -> None:
    if prep.dtype is None:
        prep.dtype = WEIGHTS_DTYPE[prep.training.precision]


def load(prep: ModelPrep) -> None:
    extra = {}
    adapter = prep.job.spec.adapter
    if adapter is not None and adapter.type == "qlora":
        # QLoRA's frozen base is quantized while it loads, onto this rank's GPU (admission
        # allows qlora only with GPUs).
        extra = {"quantization_config": adapters.quantization_config(COMPUTE_DTYPE[prep.training.precision]),
                 "device_map": {"": torch.cuda.current_device()}}
    if prep.build is not None and not extra:
        prep.model = prep.build(prep.path, prep.job.spec.model.revision, prep.dtype)
        return
    # Through the module attribute, so a wrapper put on model_io.load_model (bench/_hooks) sees it.
    prep.model = model_io.load_model(prep.path, prep.job.spec.model.revision, prep.dtype, **extra)


def train_mode(prep: ModelPrep) -> None:
    # from_pretrained returns the model in eval mode; activation checkpointing (and dropout, in
    # models that have it) only act in training mode.
    prep.model.train()


def activation_checkpointing(prep: ModelPrep) -> None:
    if not prep.training.activation_checkpointing:
        return
    # Non-reentrant checkpointing: works with frozen inputs, ZeRO-3's parameter hooks and FSDP.
    prep.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prep.model.config.use_cache = False  # the KV cache is useless in training and clashes with recompute


def name_no_decay(prep: ModelPrep) -> None:
    prep.no_decay = {n for n, p in prep.model.named_parameters() if p.ndim < 2}


STEPS: tuple[tuple[str, Callable[[ModelPrep], None]], ...] = (
    ("precision", set_precision),
    ("load", load),
    ("train_mode", train_mode),
    ("activation_checkpointing", activation_checkpointing),
    # spec.adapter: PEFT's LoRA layers on the frozen base (adapters.py).
    ("adapter", adapters.apply_adapter),
    # Last: the names of the parameters the optimizer will see.
    ("name_no_decay", name_no_decay),
)


def prepare_model(job, path: str, *, dtype: torch.dtype | None = None, build=None) -> ModelPrep:
    """Run every step of STEPS on the job's base model at `path`; the result's `model` is ready
    for the strategy to shard or wrap. `dtype` and `build`: the strategy's (ModelPrep)."""
    prep = ModelPrep(job=job, path=path, dtype=dtype, build=build)
    for _name, step in STEPS:
        step(prep)
    return prep
