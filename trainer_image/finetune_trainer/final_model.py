"""The final model: safetensors shards that rank 0 writes while the strategy gathers the model a
tensor at a time (Strategy.full_tensors), in the base model's published dtype, with its config,
generation config and tokenizer, the layout `from_pretrained` reads.

Every shard's header is known before any weight is gathered (names, shapes, the output dtype),
so each file is written front to back: header first, then each tensor's bytes as it arrives,
and a tensor is dropped once written. No process holds more than one gathered tensor (ZeRO-3:
one small group of them) beside its own shards.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile

import torch

from .shard_load import DTYPE_NAMES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

# Hugging Face's shard size before transformers 5; writing as gathered, a shard costs no memory.
MAX_SHARD_BYTES = 5 << 30


def published_dtype(model_dir: str, revision: str | None) -> torch.dtype:
    """The dtype the base model's config.json says it was saved in (fp32 when it says none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, revision=revision or None,
                                        token=os.environ.get("HF_TOKEN") or None)
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):  # config.json spells it ("bfloat16")
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else torch.float32


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                max_bytes: int = MAX_SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors split into files of at most `max_bytes` each (a bigger tensor alone), in order."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _nbytes(shape, dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """One safetensors file written front to back: the header from the planned (name, shape)
    list, then `write` for each tensor in that order."""

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype):
        self.path, self.dtype = path, dtype
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in entries:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.expected = list(entries)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, shape = self.expected.pop(0)
        if name != want or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"final model: got {name} {tuple(tensor.shape)}, expected {want} {tuple(shape)}")
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous().view(-1)
        self.file.write(memoryview(data.view(torch.uint8).numpy()))

    def close(self) -> None:
        self.file.close()
        if self.expected:
            raise RuntimeError(f"final model: {len(self.expected)} tensors never came for {self.path}")


def write_shards(out_dir: str, shapes, tensors, dtype: torch.dtype, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Rank 0: `tensors` ((name, tensor) in `shapes`' order) into safetensors shards in `out_dir`,
    with the index when there is more than one. Returns the file names."""
    shards = plan_shards(shapes, dtype, max_bytes)
    names = shard_names(len(shards))
    it = iter(tensors)
    for file_name, entries in zip(names, shards):
        writer = ShardWriter(os.path.join(out_dir, file_name), entries, dtype)
        try:
            for _ in entries:
                name, tensor = next(it)
                writer.write(name, tensor)
                del tensor
        except BaseException:
            writer.file.close()  # the error at hand says what went wrong, not the missing rest
            raise
        writer.close()
    if len(names) > 1:
        weight_map = {name: f for f, entries in zip(names, shards) for name, _ in entries}
        index = {"metadata": {"total_size": sum(_nbytes(s, dtype) for _, s in shapes)}, "weight_map": weight_map}
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return names


def write_config(model, out_dir: str, dtype: torch.dtype) -> None:
    """config.json (saying the dtype the weights were written in) and generation_config.json."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)


def write_final_model(strategy, tokenizer, model_dir: str, revision: str | None, dest, rank: int) -> None:
    """Collective: the trained model into `dest` (a storage.Location) by rank 0, in the base
    model's published dtype. The other ranks take part in every gather."""
    from .storage import is_write_failure, upload_dir, write_failure

    shapes = strategy.final_shapes()
    tensors = strategy.full_tensors()
    if rank != 0:
        for _ in tensors:
            pass
        return
    dtype = published_dtype(model_dir, revision)
    with tempfile.TemporaryDirectory(prefix="finetune-final-") as tmp:
        try:
            write_shards(tmp, shapes, tensors, dtype)
            write_config(strategy.hf_model, tmp, dtype)
            tokenizer.save_pretrained(tmp)
        except Exception as exc:
            for _ in tensors:  # the other ranks are still gathering: finish with them
                pass
            if not is_write_failure(exc, tmp):
                raise
            raise write_failure("the final model", tmp, exc) from None
        upload_dir(tmp, dest)
