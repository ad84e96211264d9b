"""The baselines of the throughput benchmarks: minimal Ray Train `TorchTrainer` loops.

What a careful engineer writes by hand for the same job: load the model, shard it
(`deepspeed.initialize` with ZeRO-3, or torch FSDP2 `fully_shard` FULL_SHARD on each decoder layer and the root),
a plain batch loop with AdamW, and nothing else: no checkpoints, no progress events, no loss
all-reduce. The model, the data (the same jsonl, tokenizer and packing into maxSeqLength pieces),
the micro-batch, the optimizer settings (AdamW, fused, grad clipping 1.0) and the worker group
are the project trainer's, so the ratio of the two is the trainer's own overhead.

Timing: rank 0 takes `time.time()` after optimizer step 1 and after the last step, the same
points at which the trainer prints its step-1 and last-step progress events; everything
between is steady-state training.
"""
from __future__ import annotations

import json
import random
import time
from typing import Any


def _batches(config: dict[str, Any], tokenizer, rank: int, world: int) -> list[list[list[int]]]:
    with open(config["dataset_path"]) as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    mine = docs[rank::world]
    ids = tokenizer(mine, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for row in ids:
        stream.extend(row)
        stream.append(tokenizer.eos_token_id)
    seq, mbs = config["seq_len"], config["micro_batch_size"]
    sequences = [stream[i:i + seq] for i in range(0, len(stream) - seq + 1, seq)]
    random.Random(config.get("seed", 0)).shuffle(sequences)
    return [sequences[b * mbs:(b + 1) * mbs] for b in range(len(sequences) // mbs)]


def _setup(config: dict[str, Any]):
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoTokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    batches = _batches(config, tokenizer, rank, world)
    dtype = torch.bfloat16 if config["precision"] == "bf16" else torch.float32
    return rank, world, device, batches, dtype


def _load_model(config: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(config["model_dir"], torch_dtype=torch.float32)


def _optimizer(params, config: dict[str, Any]):
    import torch

    return torch.optim.AdamW(params, lr=config["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=config.get("weight_decay", 0.0), fused=True)


def _loop(config: dict[str, Any], rank: int, world: int, batches, device, step_fn) -> None:
    import ray.train
    import torch

    steps = config["steps"]
    t_first = t_last = None
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        input_ids = torch.tensor(batch, dtype=torch.long, device=device)
        step_fn(input_ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        if step == 1:
            t_first = now
        t_last = now
    tokens_per_step = world * config["micro_batch_size"] * config["seq_len"]
    if rank == 0:
        # Ray Train V2 keeps no metrics reported without a checkpoint in `Result.metrics`, and a
        # checkpoint would be work the baseline must not do: the figures go through a file
        # (driver and workers share this machine).
        with open(config["timing_path"], "w") as f:
            json.dump({"t_first": t_first, "t_last": t_last, "steps": steps,
                       "tokens_per_step": tokens_per_step}, f)
    ray.train.report({"steps": steps})


def train_deepspeed(config: dict[str, Any]) -> None:
    import deepspeed

    rank, world, device, batches, dtype = _setup(config)
    model = _load_model(config)
    ds_config = {
        "train_micro_batch_size_per_gpu": config["micro_batch_size"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": config["precision"] == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=_optimizer(model.parameters(), config),
                                           config=ds_config)

    def step(input_ids):
        out = engine(input_ids=input_ids, labels=input_ids)
        engine.backward(out.loss)
        engine.step()

    _loop(config, rank, world, batches, device, step)


def train_fsdp(config: dict[str, Any]) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, world, device, batches, dtype = _setup(config)
    model = _load_model(config)
    # FSDP2 as its documentation shows it: each decoder layer, then the root.
    mesh = init_device_mesh(device.type, (world,))
    mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
             if config["precision"] == "bf16" else MixedPrecisionPolicy())
    for m in model.modules():
        if type(m).__name__ in set(model._no_split_modules or []):
            fully_shard(m, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)
    optimizer = _optimizer(model.parameters(), config)

    def step(input_ids):
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _loop(config, rank, world, batches, device, step)


LOOPS = {"deepspeed": train_deepspeed, "fsdp": train_fsdp}
