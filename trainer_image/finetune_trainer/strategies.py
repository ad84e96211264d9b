"""The interface every training strategy implements, and the registry keyed by spec.strategy.type.

A strategy is one module named `strategy_<something>.py` in this package holding a `Strategy`
subclass decorated with `@register`; nothing else names it. `lookup` imports those modules the
first time it is asked (they import deepspeed or torch FSDP only when a strategy is built), so
the registry is exactly the strategies this trainer ships.

The life of a strategy, as the training loop drives it:
  strategy = create(job, device)                  # reads its own spec section
  strategy.prepare(model_path, total_steps)       # model_prep.prepare_model, wrap, optimizer
  loss = strategy.forward_backward(batch, boundary)  # per micro-batch; steps at the boundary
  strategy.grad_norm()                              # the last step's, for the metrics
  loss_sum, tokens = strategy.eval_sums(batch)     # collective: the evaluation forward
  strategy.save_checkpoint(dir, tag) / load_checkpoint(dir, tag)   # this rank's shard
  strategy.final_shapes() / full_tensors()        # the final model, a tensor at a time on rank 0
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from typing import ClassVar

from .errors import InvalidJobError

MODULE_PREFIX = "strategy_"


class Strategy(ABC):
    """How the model is distributed over the ranks: wrapping, optimizer, backward and step,
    and the checkpoint format. Built on every rank; methods marked collective must be called
    on every rank."""

    name: ClassVar[str]  # the spec.strategy.type it implements

    def __init__(self, job, device):
        self.job = job
        self.training = job.spec.training
        self.device = device

    @abstractmethod
    def prepare(self, model_path: str, total_steps: int) -> None:
        """Collective. Build the model through `model_prep.prepare_model`, shard or wrap it, and
        build the optimizer and the learning-rate schedule for `total_steps` optimizer steps."""

    @property
    @abstractmethod
    def hf_model(self):
        """The Hugging Face model inside the wrappers (its config and save_pretrained write the
        final model)."""

    @abstractmethod
    def forward(self, batch: dict):
        """The wrapped model's forward on one micro-batch (`data.model_inputs`: input_ids,
        labels, and position_ids for packed records); returns the model's output."""

    @abstractmethod
    def forward_backward(self, batch: dict, boundary: bool) -> float:
        """One micro-batch (`data.model_inputs`): forward, backward, and at a
        gradient-accumulation boundary the optimizer and scheduler step. Returns this rank's
        unscaled loss (the mean over the micro-batch's label tokens)."""

    def eval_sums(self, batch: dict) -> tuple[float, int]:
        """Collective. (sum of the token losses, number of label tokens) of one micro-batch,
        without gradients and with dropout off."""
        import torch

        from .evaluation import token_loss_sums

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model = self.hf_model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = self.forward(inputs)
        finally:
            model.train(was_training)
        return token_loss_sums(out.logits, batch["labels"])

    @abstractmethod
    def learning_rate(self) -> float:
        """The learning rate of the next optimizer step."""

    def grad_norm(self) -> float | None:
        """The global L2 norm of the gradients of the last optimizer step, before clipping
        (a metric, `train/grad_norm`); None where the strategy cannot tell."""
        return None

    @abstractmethod
    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Collective. This rank's part of the model, optimizer and schedule, into `directory`."""

    @abstractmethod
    def load_checkpoint(self, directory: str, tag: str) -> None:
        """Collective. The inverse of `save_checkpoint`, from a directory holding every rank's part."""

    @abstractmethod
    def final_shapes(self, trainable_only: bool = False) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor of the final model (of its trainable parameters only with
        `trainable_only`: an adapter), named as in `hf_model`'s state dict, tied weights once, in
        the order `full_tensors` yields them; the same on every rank. Not collective."""

    @abstractmethod
    def full_tensors(self, trainable_only: bool = False):
        """Collective (every rank runs the generator to its end). Yields (name, tensor) in
        `final_shapes`' order, the tensor whole on rank 0 and None on the other ranks, one (or one
        small group) at a time: the final model is written as it comes and is never whole in one
        process's memory."""


_REGISTRY: dict[str, type[Strategy]] = {}
_discovered = False


def final_tensors_of(module, trainable_only: bool) -> list:
    """(name, tensor) of what the final model holds, in state-dict order: parameters (tied
    ones once, under their first name, as save_pretrained writes them) and persistent
    buffers (not with trainable_only). The tensors are the strategy's own: FSDP's DTensor
    shards, ZeRO-3's partitioned stand-ins."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    out = []
    for name in module.state_dict(keep_vars=True):
        t = params.get(name)
        if t is None and not trainable_only:
            t = buffers.get(name)
        if t is None or (trainable_only and not t.requires_grad):
            continue
        out.append((name, t))
    return out


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make `cls` the implementation of spec.strategy.type `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"{cls!r} is not a Strategy subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} has no strategy name (class attribute `name`)")
    other = _REGISTRY.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"strategy {name!r} is registered twice: {other.__module__}.{other.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith(MODULE_PREFIX):
            importlib.import_module(f"{__package__}.{module.name}")
    _discovered = True


def available() -> list[str]:
    """The strategy types this trainer implements."""
    _discover()
    return sorted(_REGISTRY)


def lookup(type_name: str) -> type[Strategy]:
    """The Strategy class for spec.strategy.type `type_name`; a job naming one this trainer does
    not have (an API newer than the trainer image) is an invalid job, not a crash."""
    _discover()
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise InvalidJobError(f"spec.strategy.type: unknown strategy {type_name!r}; this trainer "
                              f"implements {', '.join(available()) or 'none'}")
    return cls


def create(job, device) -> Strategy:
    """The strategy the job asks for, configured from its spec; `prepare` builds the model."""
    return lookup(job.spec.strategy.type)(job, device)
