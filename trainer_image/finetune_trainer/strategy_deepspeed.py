"""DeepSpeed ZeRO (stage 1/2/3, CPU offload) behind the trainer's Strategy interface (strategies.py).

ZeRO-3 builds the model under `deepspeed.zero.Init`, which partitions every parameter as its
module is constructed, and each rank then reads only its own partitions from the safetensors
files (shard_load.fill_ranges): no process holds the whole model. ZeRO-1 and -2 keep whole
weights on every rank by design and load them with from_pretrained, in the dtype of the math.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from . import shard_load
from .model_prep import COMPUTE_DTYPE, WEIGHTS_DTYPE, prepare_model
from .schedule import make_optimizer, make_scheduler
from .strategies import Strategy, final_tensors_of, register

# ZeRO-3's final-model gather: parameters gathered together up to this many bytes (a bigger one
# alone), so the collectives are few and the gathered part stays small.
GATHER_BYTES = 64 << 20
MIN_BUCKET = 1 << 23  # elements: 32 MiB in fp32


def deep_merge(base: dict, override: dict) -> dict:
    """override merged into a copy of base: nested dicts merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def bucket_sizes(stage: int, hidden_size: int) -> dict[str, int]:
    """Communication buckets sized to the model, as transformers' DeepSpeed integration sizes
    them for "auto" (hidden²: a layer's worth), instead of DeepSpeed's fixed 5e8 elements: a
    reduce bucket is allocated whole, 2 GB in fp32 at the default, more than a 200M-parameter
    model's gradients. ZeRO-3 also releases a gathered parameter once its layer has run
    (reuse distance and live parameters a few layers' worth, not 1e9: at the default every
    parameter of a model below 1B stays gathered from forward to backward)."""
    # At least MIN_BUCKET: every bucket is one collective, and below a few million elements
    # their fixed cost (gloo on CPU: milliseconds each) slows the step more than it saves.
    layer = max(hidden_size * hidden_size, MIN_BUCKET)
    out = {"reduce_bucket_size": layer}
    if stage in (1, 2):
        out["allgather_bucket_size"] = layer
    if stage == 3:
        out.update(stage3_prefetch_bucket_size=int(0.9 * layer), stage3_param_persistence_threshold=10 * hidden_size,
                   stage3_max_live_parameters=4 * layer, stage3_max_reuse_distance=4 * layer)
    return out


def build_ds_config(training, deepspeed_spec, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config derived from the spec (bucket sizes from the model's hidden size when
    given), with strategy.deepspeed.config merged LAST."""
    zero: dict[str, Any] = {"stage": deepspeed_spec.stage}
    if hidden_size:
        zero.update(bucket_sizes(deepspeed_spec.stage, hidden_size))
    if deepspeed_spec.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if deepspeed_spec.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if deepspeed_spec.stage == 3:
        # Lets the trainer gather whole weights for the final Hugging Face model.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "gradient_clipping": float(training.max_grad_norm),  # 0 turns clipping off
        "zero_optimization": zero,
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # We hand DeepSpeed a torch AdamW: it avoids JIT-compiling FusedAdam (needs nvcc) or
        # DeepSpeedCPUAdam (a C++ build of ~60 s in every fresh pod). With optimizer offload
        # DeepSpeed insists on DeepSpeedCPUAdam unless told otherwise; torch's fused AdamW
        # runs the same math on the offloaded fp32 states, a little slower per step but with
        # no compiler in the image and no first-step stall. A power user who prefers
        # DeepSpeed's own optimizer sets "optimizer" in strategy.deepspeed.config.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # Every rank writes its own files into its own (node-local) directory; Ray Train
        # merges the ranks' directories into one checkpoint in storage.
        "checkpoint": {"use_node_local_storage": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, deepspeed_spec.config or {})


def weights_dtype(precision: str):
    """DeepSpeed keeps the module in the math's dtype (its bf16/fp16 engine casts it) and an fp32
    master copy of each rank's partition in the optimizer: the weights load in that dtype, not as
    an fp32 copy that is cast afterwards."""
    return COMPUTE_DTYPE[precision] or WEIGHTS_DTYPE[precision]


@register
class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, job, device: torch.device):
        super().__init__(job, device)
        self.config = build_ds_config(self.training, job.spec.strategy.deepspeed)
        self.stage = int(self.config["zero_optimization"].get("stage", 0))
        self.engine = None
        self.has_frozen = False

    def prepare(self, model_path: str, total_steps: int) -> None:
        import deepspeed
        from transformers import AutoConfig

        training = self.training
        hidden = getattr(AutoConfig.from_pretrained(model_path, revision=self.job.spec.model.revision or None),
                         "hidden_size", None)
        self.config = build_ds_config(training, self.job.spec.strategy.deepspeed, hidden)
        build = self._build_partitioned if self.stage == 3 else None
        prep = prepare_model(self.job, model_path, dtype=weights_dtype(training.precision), build=build)
        model = prep.model
        optimizer = scheduler = None
        # Frozen parameters (an adapter's base model) get no optimizer state and stay out of
        # the checkpoints (ZeRO-3 still partitions them).
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.has_frozen = len(trainable) < sum(1 for _ in model.parameters())
        if "optimizer" not in self.config:
            optimizer = make_optimizer(model.named_parameters(), training, self.device.type == "cpu", prep.no_decay)
        if "scheduler" not in self.config:
            # A callable: DeepSpeed builds it on the optimizer it wraps and steps it at each
            # gradient-accumulation boundary; its state is in DeepSpeed's checkpoints.
            def scheduler(opt):
                return make_scheduler(opt, training, total_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=self.config,
                                                    model_parameters=None if optimizer else trainable)

    def _build_partitioned(self, model_dir: str, revision: str | None, dtype):
        """ZeRO-3: the model built under zero.Init (each parameter partitioned as soon as its module
        exists, without random init), then each rank's partitions read from the files."""
        import deepspeed
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        config = AutoConfig.from_pretrained(model_dir, revision=revision or None)
        # dtype=None: zero.Init takes it from the config's bf16/fp16 flags (fp32 without). An
        # explicit dtype is dropped by DeepSpeed 0.19.8 on an accelerator without fp16 (the CPU):
        # `dtype or fp16 if fp16_supported else bf16...` binds as `(dtype or fp16) if ... else`,
        # so fp32 training would get bf16 partitions.
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=self.config, dtype=None):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        rank = torch.distributed.get_rank()
        targets = []
        for name, p in model.named_parameters():
            part = p.ds_tensor
            targets.append((name, part, part.ds_numel * rank))
        shard_load.fill_ranges(targets, model, model_dir)
        return model

    @property
    def hf_model(self):
        return self.engine.module

    def forward(self, batch: dict):
        return self.engine(**batch)

    def forward_backward(self, batch: dict, boundary: bool) -> float:
        # DeepSpeed scales the loss by 1/gradient_accumulation_steps and defers the optimizer
        # step to the boundary by itself; engine.step() on every micro-batch is the contract.
        out = self.forward(batch)
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.loss.detach().float())

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        # DeepSpeed keeps the norm it computed (for clipping and overflow checks) at the step.
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.save_checkpoint(directory, tag=tag, save_latest=True, exclude_frozen_parameters=self.has_frozen)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        # Without the frozen parameters the saved module is partial by design; the trainable
        # ones are all there (saved from the same model).
        path, _ = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=not self.has_frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag!r} in {directory}")

    def _final_tensors(self, trainable_only: bool):
        """(name, tensor) of the final model in state-dict order: parameters (tied ones once) and
        persistent buffers; a ZeRO-3 parameter is its partitioned stand-in."""
        return final_tensors_of(self.engine.module, trainable_only)

    def final_shapes(self, trainable_only: bool = False) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(getattr(t, "ds_shape", t.shape))) for n, t in self._final_tensors(trainable_only)]

    def full_tensors(self, trainable_only: bool = False):
        """Collective. In the training precision (bf16 under bf16, fp32 under fp32): the module's
        weights. ZeRO-3 gathers parameters in groups of up to GATHER_BYTES."""
        rank0 = torch.distributed.get_rank() == 0
        tensors = self._final_tensors(trainable_only)
        if self.stage != 3:
            for name, t in tensors:
                yield name, (t.detach().cpu() if rank0 else None)
            return
        import deepspeed

        group, size = [], 0
        for i, (name, t) in enumerate(tensors):
            group.append((name, t))
            size += t.ds_numel * t.element_size() if hasattr(t, "ds_numel") else 0
            if size < GATHER_BYTES and i + 1 < len(tensors):
                continue
            params = [p for _, p in group if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for n, p in group:
                    yield n, (p.detach().to("cpu", copy=True) if rank0 else None)
            group, size = [], 0
