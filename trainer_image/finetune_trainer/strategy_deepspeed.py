"""DeepSpeed ZeRO (stage 1/2/3, CPU offload) behind the trainer's Strategy interface (strategies.py)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .model_prep import prepare_model
from .schedule import make_optimizer, make_scheduler
from .strategies import Strategy, register


def deep_merge(base: dict, override: dict) -> dict:
    """override merged into a copy of base: nested dicts merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(training, deepspeed_spec) -> dict[str, Any]:
    """The DeepSpeed config derived from the spec, with strategy.deepspeed.config merged LAST."""
    zero: dict[str, Any] = {"stage": deepspeed_spec.stage}
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
        # DeepSpeed insists on DeepSpeedCPUAdam unless told otherwise; torch's foreach AdamW
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

        training = self.training
        # Each rank loads the full model into CPU memory, then deepspeed.initialize partitions
        # it (ZeRO-3 keeps 1/world of it). Loading straight into partitions needs
        # transformers' HfDeepSpeedConfig, which requires the `accelerate` package; we do not
        # ship it, so a model must fit in a node's CPU memory once per local rank.
        prep = prepare_model(self.job, model_path)
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

    def final_state_dict(self) -> dict | None:
        """Collective. The whole model on rank 0 (in the training precision: bf16 under bf16,
        fp32 under fp32), None elsewhere."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        if torch.distributed.get_rank() != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}
