"""PyTorch FSDP (FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD) behind the Strategy interface
(strategies.py).

torch FSDP is used directly: Ray's prepare_model(parallel_strategy="fsdp") refuses CPU, and
we need control over the mesh (HYBRID_SHARD), mixed precision and checkpoint format.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist

from .model_prep import COMPUTE_DTYPE, prepare_model
from .schedule import make_optimizer, make_scheduler
from .strategies import Strategy, register

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def hybrid_mesh_shape(world_size: int, gpus_per_worker: int) -> tuple[int, int]:
    """(replicas, shards) for HYBRID_SHARD: shard inside a worker pod (over its GPUs, fast
    links), replicate across pods. On CPU a pod runs one process, so shards = 1."""
    shards = max(gpus_per_worker, 1)
    if world_size % shards:
        raise ValueError(f"world size {world_size} is not a multiple of {shards} processes per worker")
    return world_size // shards, shards


@register
class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, job, device: torch.device):
        super().__init__(job, device)
        self.spec = job.spec.strategy.fsdp
        self.grad_accum = self.training.gradient_accumulation_steps
        self.model = self.optimizer = self.scheduler = self.scaler = self._hf_model = None

    def prepare(self, model_path: str, total_steps: int) -> None:
        from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        training, spec, device = self.training, self.spec, self.device
        prep = prepare_model(self.job, model_path)  # fp32 master weights
        model = prep.model
        # Wrap each decoder layer in its own FSDP unit (HF names them in _no_split_modules),
        # so only one layer's full weights exist at a time.
        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        layer_classes = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes) if layer_classes else None
        mixed = None
        low = COMPUTE_DTYPE[training.precision]
        if low is not None:
            # Compute in low precision, reduce gradients in fp32 for accuracy.
            mixed = MixedPrecision(param_dtype=low, reduce_dtype=torch.float32, buffer_dtype=None)
        kwargs = {}
        sharding = ShardingStrategy[spec.sharding_strategy]
        if sharding == ShardingStrategy.HYBRID_SHARD:
            from torch.distributed.device_mesh import init_device_mesh

            shape = hybrid_mesh_shape(dist.get_world_size(), self.job.spec.resources.gpus_per_worker)
            kwargs["device_mesh"] = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
        offload = spec.cpu_offload and device.type == "cuda"
        if spec.cpu_offload and not offload and dist.get_rank() == 0:
            # On a CPU-only run the parameters already live in CPU memory; FSDP's offload
            # would only add pinned-memory copies, which need an accelerator.
            from .progress import say

            say("finetune-train: fsdp.cpuOffload has no effect without GPUs; parameters are in CPU memory already")
        self.model = FSDP(model, sharding_strategy=sharding, auto_wrap_policy=policy, mixed_precision=mixed,
                          cpu_offload=CPUOffload(offload_params=offload),
                          device_id=device, use_orig_params=True, **kwargs)
        self._hf_model = model
        named = [(clean_name(n), p) for n, p in self.model.named_parameters()]
        self.optimizer = make_optimizer(named, training, device.type == "cpu", prep.no_decay)
        self.scheduler = make_scheduler(self.optimizer, training, total_steps)
        if training.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler()

    @property
    def hf_model(self):
        return self._hf_model

    def forward(self, batch: dict):
        return self.model(**batch)

    def forward_backward(self, batch: dict, boundary: bool) -> float:
        # Between boundaries skip the gradient reduce-scatter (no_sync) and accumulate locally.
        ctx = contextlib.nullcontext() if boundary else self.model.no_sync()
        with ctx:
            out = self.forward(batch)
            loss = out.loss / self.grad_accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        if boundary:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            # With clipping off, an infinite bound still measures the norm (for the metrics)
            # and scales nothing.
            self._grad_norm = float(self.model.clip_grad_norm_(self.training.max_grad_norm or math.inf))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach().float())

    def grad_norm(self) -> float | None:
        return getattr(self, "_grad_norm", None)

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @staticmethod
    def _state_options():
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Frozen parameters (an adapter's base model) stay out of the checkpoints. strict=False
        # on load lets set_state_dict skip them; every trainable key is still checked, by
        # dcp.load, which fails on a key the checkpoint lacks.
        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def _states(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._state_options())
        return {"model": model_sd, "optim": optim_sd}

    def save_checkpoint(self, directory: str, tag: str) -> None:
        # Sharded save: each rank writes only its own shards (__<rank>_*.distcp) into its own
        # directory, the coordinator adds .metadata; Ray Train merges the directories.
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(), checkpoint_id=f"{directory}/{tag}")
        torch.save({"scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None},
                   f"{directory}/{tag}_schedule_rank{dist.get_rank()}.pt")

    def load_checkpoint(self, directory: str, tag: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        states = self._states()
        dcp.load(states, checkpoint_id=f"{directory}/{tag}")
        set_state_dict(self.model, self.optimizer, model_state_dict=states["model"],
                       optim_state_dict=states["optim"], options=self._state_options())
        extra = torch.load(f"{directory}/{tag}_schedule_rank{dist.get_rank()}.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def final_state_dict(self) -> dict | None:
        """Collective. The whole model (fp32 master weights) on rank 0, None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload moves the gathered weights off the GPU (and keeps them on rank 0 only).
        # On CPU there is nothing to offload, and torch's FSDP1 path for it segfaults when
        # the parameters already live on the CPU, so it is only used on GPU.
        on_gpu = next(self.model.parameters()).device.type == "cuda"
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))
        return {clean_name(k): v for k, v in sd.items()} if dist.get_rank() == 0 else None
