"""Optimizer and learning-rate schedule shared by every strategy."""

from __future__ import annotations

# spec.training.lrScheduler -> transformers scheduler name. Every one of them warms up
# linearly from 0 to the peak over warmupSteps first.
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_scheduler(optimizer, training, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(SCHEDULER_NAMES[training.lr_scheduler], optimizer,
                         num_warmup_steps=training.warmup_steps, num_training_steps=total_steps)


def decay_groups(named_params, weight_decay: float, no_decay_names: set[str] | None = None):
    """AdamW parameter groups: no weight decay on biases and norm weights (1-D tensors).

    `no_decay_names` lets FSDP pass the names found before wrapping, when the wrapped
    parameters have been flattened and their shapes no longer tell.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        skip = (name in no_decay_names) if no_decay_names is not None else p.ndim < 2
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_adamw(groups, training, device_is_cpu: bool):
    import torch

    # The fused kernel (CPU and GPU): one pass over each tensor, no temporaries. foreach
    # allocates a copy of the second moments (its sqrt) at every step: a quarter more memory on
    # top of a sharded model's training state.
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=training.weight_decay, fused=True)


def make_optimizer(named_params, training, device_is_cpu: bool, no_decay_names: set[str] | None = None):
    """The AdamW every strategy trains with, over the trainable parameters of `named_params`."""
    return make_adamw(decay_groups(named_params, training.weight_decay, no_decay_names), training, device_is_cpu)
