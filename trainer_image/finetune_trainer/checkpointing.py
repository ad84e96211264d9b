"""Per-rank checkpoint save/restore through Ray Train.

Every rank writes its OWN shard (DeepSpeed per-rank files, or torch.distributed.checkpoint
shards) plus trainer_state_rank<r>.json into its own temporary directory and reports it;
Ray Train merges the ranks' directories into <checkpoint uri>/<job>/<checkpoint dir> and
registers the checkpoint only when every rank reported it, so `ray.train.get_checkpoint()`
never returns a partial one.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import torch

STATE_FILE = "trainer_state_rank{rank}.json"
TAG = "state"  # DeepSpeed tag / DCP sub-directory inside each checkpoint


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch: int = 0  # index of the next micro-batch in that epoch
    tokens_seen: int = 0
    loss: float | None = None
    rng: dict = field(default_factory=dict)


def capture_rng() -> dict:
    def enc(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    state = {"torch": enc(torch.get_rng_state()), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = enc(torch.cuda.get_rng_state())
    return state


def restore_rng(state: dict) -> None:
    import ast

    def dec(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    if "torch" in state:
        torch.set_rng_state(dec(state["torch"]))
    if "python" in state:
        random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["cuda"]))


def write_state(directory: str, rank: int, state: TrainerState) -> None:
    with open(os.path.join(directory, STATE_FILE.format(rank=rank)), "w") as f:
        json.dump(asdict(state), f)


def read_state(directory: str, rank: int) -> TrainerState:
    path = os.path.join(directory, STATE_FILE.format(rank=rank))
    if not os.path.exists(path):  # resumed with more ranks than saved: rank 0's position
        path = os.path.join(directory, STATE_FILE.format(rank=0))
    with open(path) as f:
        return TrainerState(**json.load(f))


def save(strategy, state: TrainerState, rank: int, metrics: dict, dir_name: str, upload_mode) -> None:
    """Collective: every rank saves its shard and reports it (a barrier inside Ray Train)."""
    import ray.train

    local = tempfile.mkdtemp(prefix=f"finetune-ckpt-rank{rank}-")
    try:
        strategy.save(local, TAG)
        write_state(local, rank, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=dir_name, checkpoint_upload_mode=upload_mode)
    finally:
        if upload_mode == ray.train.CheckpointUploadMode.SYNC:
            shutil.rmtree(local, ignore_errors=True)
        # ASYNC: Ray deletes the directory itself once the background upload is done.


def restore(strategy, checkpoint, rank: int) -> TrainerState:
    # Each rank downloads into its own directory. Checkpoint.as_directory() shares one
    # temporary directory between the processes of a node, and the first rank to finish
    # deletes it under the others (seen as "Checkpoint directory ... does not exist").
    local = tempfile.mkdtemp(prefix=f"finetune-restore-rank{rank}-")
    try:
        checkpoint.to_directory(local)
        strategy.load(local, TAG)
        state = read_state(local, rank)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    restore_rng(state.rng)
    return state
