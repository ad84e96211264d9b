"""PyTorch FSDP2 (`fully_shard` over a DeviceMesh) behind the Strategy interface (strategies.py),
with the spec's four sharding strategies (FSDP1's names):

  FULL_SHARD     1-D mesh over every rank; parameters resharded after forward
  SHARD_GRAD_OP  1-D mesh; parameters stay gathered from forward to backward
  NO_SHARD       2-D mesh (world, 1): replicate everywhere, "shard" over one rank (plain DDP)
  HYBRID_SHARD   2-D mesh (workers, processes per worker): shard inside a worker pod,
                 replicate across pods

The model is built on the meta device (shard_load.empty_model), sharded one decoder layer at a
time and then the root, and only then materialised: each rank allocates its own shards and reads
them from the safetensors files, so no rank ever holds the whole model. The final model leaves a
tensor at a time (full_tensors). torch FSDP is used directly: Ray's
prepare_model(parallel_strategy="fsdp") refuses CPU, and we need control over the mesh, mixed
precision, the load and the checkpoint format.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import shard_load
from .model_prep import COMPUTE_DTYPE, prepare_model
from .schedule import make_optimizer, make_scheduler
from .strategies import Strategy, final_tensors_of, register

# spec shardingStrategy -> reshard after forward (FULL_SHARD's memory saving, SHARD_GRAD_OP's
# skipped all-gather in backward). With a shard group of one rank there is nothing to reshard.
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "NO_SHARD": False, "HYBRID_SHARD": True}


def hybrid_mesh_shape(world_size: int, gpus_per_worker: int) -> tuple[int, int]:
    """(replicas, shards) for HYBRID_SHARD: shard inside a worker pod (over its GPUs, fast
    links), replicate across pods. On CPU a pod runs one process, so shards = 1."""
    shards = max(gpus_per_worker, 1)
    if world_size % shards:
        raise ValueError(f"world size {world_size} is not a multiple of {shards} processes per worker")
    return world_size // shards, shards


def mesh_shape(sharding: str, world_size: int, gpus_per_worker: int) -> tuple[int, ...]:
    """The DeviceMesh of a sharding strategy: 1-D (shard) or 2-D (replicate, shard)."""
    if sharding in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return (world_size,)
    if sharding == "NO_SHARD":
        return (world_size, 1)
    if sharding == "HYBRID_SHARD":
        return hybrid_mesh_shape(world_size, gpus_per_worker)
    raise ValueError(f"spec.strategy.fsdp.shardingStrategy: unknown {sharding!r}")


def decoder_layers(model) -> list:
    """The modules each sharded on their own: the decoder layers, which Hugging Face names in
    `_no_split_modules`, so only one layer's full weights exist at a time."""
    base = getattr(model, "get_base_model", lambda: model)()
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@register
class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, job, device: torch.device):
        super().__init__(job, device)
        self.spec = job.spec.strategy.fsdp
        self.grad_accum = self.training.gradient_accumulation_steps
        self.model = self.optimizer = self.scheduler = self.scaler = None
        self.mesh = None

    def prepare(self, model_path: str, total_steps: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        training, spec, device = self.training, self.spec, self.device
        # fp32 master weights (sharded), parameters on the meta device until sharded.
        prep = prepare_model(self.job, model_path, build=shard_load.empty_model)
        model = prep.model
        kept = shard_load.real_tensors(model)  # buffers, a fresh adapter: not in the files
        shape = mesh_shape(spec.sharding_strategy, dist.get_world_size(), self.job.spec.resources.gpus_per_worker)
        names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
        self.mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
        low = COMPUTE_DTYPE[training.precision]
        # Compute in low precision, reduce gradients in fp32 for accuracy.
        mixed = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low is not None \
            else MixedPrecisionPolicy()
        offload = spec.cpu_offload and device.type == "cuda"
        if spec.cpu_offload and not offload and dist.get_rank() == 0:
            # On a CPU-only run the parameters already live in CPU memory; FSDP's offload
            # would only add pinned-memory copies, which need an accelerator.
            from .progress import say

            say("finetune-train: fsdp.cpuOffload has no effect without GPUs; parameters are in CPU memory already")
        options = dict(mesh=self.mesh, mp_policy=mixed,
                       offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=RESHARD_AFTER_FORWARD[spec.sharding_strategy], **options)
        # The rest (embeddings, final norm, output head), resharded like the layers: torch's
        # default keeps the root gathered from forward to backward, and with a 32k vocabulary
        # the embeddings and the head are a large part of a model; whole on every rank they
        # would cost more host memory than the step's all-gather saves.
        fully_shard(model, reshard_after_forward=RESHARD_AFTER_FORWARD[spec.sharding_strategy], **options)
        # Only now does memory exist for the parameters: this rank's shards, then their values.
        # Offloaded shards live on the CPU; the compute device gets only the gathered layers.
        model.to_empty(device="cpu" if offload else device)
        shard_load.fill_dtensors(model, model_path, kept)
        del kept
        shard_load.retie(getattr(model, "get_base_model", lambda: model)())
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model.named_parameters(), training, device.type == "cpu", prep.no_decay)
        self.scheduler = make_scheduler(self.optimizer, training, total_steps)
        if training.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler()

    @property
    def hf_model(self):
        return self.model

    def forward(self, batch: dict):
        return self.model(**batch)

    def forward_backward(self, batch: dict, boundary: bool) -> float:
        if self.mesh.ndim == 2:
            # Between boundaries a replicated mesh skips the all-reduce across replicas and
            # accumulates its (shard group's) reduce-scattered gradients. A 1-D mesh
            # reduce-scatters every micro-batch: skipping it would keep whole, unsharded
            # gradients on every rank until the boundary.
            self.model.set_requires_all_reduce(boundary)
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
            # and scales nothing. The gradients are DTensors: the norm is over every shard.
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.training.max_grad_norm or math.inf)
            self._grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
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

    def final_shapes(self, trainable_only: bool = False) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(t.shape)) for name, t in self._final_tensors(trainable_only)]

    def full_tensors(self, trainable_only: bool = False):
        """Collective. Each tensor whole (an all-gather of its shards) on rank 0, one at a time."""
        rank0 = dist.get_rank() == 0
        for name, t in self._final_tensors(trainable_only):
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            yield name, (full.detach().cpu() if rank0 else None)
            del full

    def _final_tensors(self, trainable_only: bool):
        """(name, tensor) of what the final model holds, in state-dict order: parameters (tied
        ones once, under their first name, as save_pretrained writes them) and persistent buffers."""
        return final_tensors_of(self.model, trainable_only)
