"""Models that never exist whole in one process: built without their weights, then each rank
reads only its own part of every tensor straight from the safetensors files.

The flow, as torchtitan runs it for FSDP2:
  model = empty_model(path, ...)          # on the meta device; non-persistent buffers real (small)
  kept = real_tensors(model)              # what is not in the files: buffers, a fresh adapter
  ...shard the model (fully_shard)...     # meta parameters become meta DTensor shards
  model.to_empty(device=...)              # this rank's shards allocated, uninitialised
  fill_dtensors(model, path, kept)        # each shard read from its bytes in the files

ZeRO-3 (`deepspeed.zero.Init`) partitions a tensor as a flat range of its elements instead;
`fill_ranges` serves both: in a row-major tensor a dim-0 shard and a flat range are one
contiguous run of bytes in the file, read with plain file reads into the rank's own tensor (in
pieces of READ_CHUNK_BYTES when the dtype changes), so a rank's memory for the weights is its
part plus at most one piece, and no file is memory-mapped (mapped pages would count against the
rank's resident memory until unmapped).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import torch

from .errors import BadInputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
READ_CHUNK_BYTES = 64 << 20  # the most a dtype-converting read holds beside the target

# safetensors' dtype names (the format's spec) -> torch
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: file, absolute byte offset of its data, dtype, shape."""

    file: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str) -> tuple[dict, int]:
    """(the header's tensors, the byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files holding the model at `model_dir`, by its index or as one file. A model
    published only as PyTorch pickles cannot be read in parts: a one-line BadInputError says so."""
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    single = os.path.join(model_dir, SAFETENSORS_SINGLE)
    if os.path.exists(single):
        return [single]
    pickled = [n for n in PICKLE_WEIGHTS if os.path.exists(os.path.join(model_dir, n))]
    if pickled:
        raise BadInputError(
            f"model {os.path.join(model_dir, pickled[0])}: PyTorch pickle weights cannot be read in shards "
            "(FSDP and ZeRO-3 load each rank's part from safetensors); save the model once with "
            "save_pretrained(..., safe_serialization=True), or use strategy deepspeed stage 1 or 2")
    raise BadInputError(f"model {model_dir} has no {SAFETENSORS_SINGLE} and no {SAFETENSORS_INDEX}")


def stored_tensors(model_dir: str) -> dict[str, StoredTensor]:
    """Every tensor of the model's safetensors files by name, read from the headers only."""
    out: dict[str, StoredTensor] = {}
    for path in weight_files(model_dir):
        header, data_start = read_header(path)
        for name, t in header.items():
            out[name] = StoredTensor(path, data_start + t["data_offsets"][0], DTYPES[t["dtype"]],
                                     tuple(t["shape"]))
    return out


def empty_model(model_dir: str, revision: str | None, dtype: torch.dtype):
    """The model of `model_dir`'s config built on the meta device (no memory, no random init),
    its non-persistent buffers then made real (init_buffers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, revision=revision or None,
                                        token=os.environ.get("HF_TOKEN") or None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    init_buffers(model)
    return model


def init_buffers(model) -> None:
    """The non-persistent buffers (rotary inv_freq) are computed in constructors and are in no
    file: on the meta device they are shapes only. They become real CPU tensors here, computed by
    the model's own `_init_weights`, as transformers' from_pretrained does after its own meta-device
    build. They are small; parameters stay on the meta device."""
    for module in model.modules():
        names = [n for n, b in module._buffers.items()
                 if b is not None and b.is_meta and n in module._non_persistent_buffers_set]
        if not names:
            continue
        for n in names:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        model._init_weights(module)


def real_tensors(model) -> dict[str, torch.Tensor]:
    """Copies of the parameters and the non-persistent buffers that are not on the meta device
    (rotary inv_freq, an adapter initialised before sharding), by name: `to_empty` wipes them,
    `fill_dtensors` puts them back. Persistent buffers come from the files."""
    saved = set(model.state_dict(keep_vars=True))
    out = {}
    for name, t in model.named_parameters():
        if not t.is_meta:
            out[name] = t.detach().clone()
    for name, t in model.named_buffers():
        if not t.is_meta and name not in saved:
            out[name] = t.detach().clone()
    return out


def _file_key(name: str, stored: dict, prefix: str) -> str | None:
    """The checkpoint's key for the model's tensor `name`: the same, or without the base model's
    prefix (a checkpoint saved from the bare base model, as many are)."""
    if name in stored:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in stored:
        return name[len(prefix) + 1:]
    return None


def _ignored(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns or ())


def match_keys(model, model_dir: str, names: list[str], kept: dict) -> dict[str, StoredTensor]:
    """{model tensor name: where it is stored} for `names`; those in `kept` come from memory. A
    tensor the files lack, or a file tensor the model has no place for, is one BadInputError
    naming the files (Hugging Face's own ignore lists for a model class are honoured)."""
    stored = stored_tensors(model_dir)
    hf = getattr(model, "get_base_model", lambda: model)()
    prefix = getattr(hf, "base_model_prefix", "")
    # A PEFT wrapper names the base model's tensors base_model.model.<name>; the files don't.
    strip = "base_model.model." if hf is not model else ""
    found: dict[str, StoredTensor] = {}
    missing = []
    for name in names:
        if name in kept:
            continue
        plain = name[len(strip):] if strip and name.startswith(strip) else name
        key = _file_key(plain.replace(".base_layer.", "."), stored, prefix)
        if key is None:
            if not _ignored(plain, getattr(hf, "_keys_to_ignore_on_load_missing", None)):
                missing.append(plain)
            continue
        found[name] = stored[key]
    files = ", ".join(sorted({os.path.basename(t.file) for t in stored.values()}))
    if missing:
        raise BadInputError(f"model {model_dir} ({files}) lacks {len(missing)} tensor(s) the model's config "
                            f"needs: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    used = {id(t) for t in found.values()}
    tied = {k for k in _tied_keys(hf)}
    extra = [k for k, t in stored.items() if id(t) not in used and k not in tied
             and not _ignored(k, getattr(hf, "_keys_to_ignore_on_load_unexpected", None))]
    if extra:
        raise BadInputError(f"model {model_dir} ({files}) holds {len(extra)} tensor(s) its config has no place for: "
                            f"{', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}")
    return found


def _tied_keys(hf) -> list[str]:
    """Names a model reads from another tensor when its weights are tied (lm_head.weight onto the
    embeddings): a file may hold them or not."""
    if not getattr(getattr(hf, "config", None), "tie_word_embeddings", False):
        return []
    keys = getattr(hf, "_tied_weights_keys", None) or []
    return list(keys.keys() if isinstance(keys, dict) else keys)


def read_range(stored: StoredTensor, start: int, out: torch.Tensor) -> None:
    """Elements [start, start + out.numel()) of the stored tensor (row-major, flat) into `out`
    (contiguous), converting the dtype on the way."""
    n = out.numel()
    if n == 0:
        return
    if start < 0 or start + n > stored.numel:
        raise ValueError(f"range {start}..{start + n} outside {stored.shape}")
    size = stored.dtype.itemsize
    flat = out.view(-1)
    with open(stored.file, "rb", buffering=0) as f:
        f.seek(stored.offset + start * size)
        if out.dtype == stored.dtype and out.device.type == "cpu":
            _read_into(f, flat.view(torch.uint8), stored.file)
            return
        step = max(1, READ_CHUNK_BYTES // size)
        piece = torch.empty(min(step, n), dtype=stored.dtype)
        for lo in range(0, n, step):
            part = piece[:min(step, n - lo)]
            _read_into(f, part.view(torch.uint8), stored.file)
            flat[lo:lo + part.numel()].copy_(part)


def _read_into(f, target: torch.Tensor, path: str) -> None:
    view = memoryview(target.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise BadInputError(f"model file {path} is truncated: it ends inside a tensor")
        got += n


def _local_range(param) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor, flat start of its elements in the whole tensor) of a DTensor
    sharded on dim 0 (FSDP2's placements: Shard(0), or Replicate() and Shard(0) for HSDP), or of a
    plain tensor (the whole of it)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(o for o in offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise ValueError(f"only dim-0 shards are read from files, not {param.placements}")
    row = 1
    for d in param.shape[1:]:
        row *= d
    return local, offset[0] * row if shape[0] else 0


@torch.no_grad()
def fill_dtensors(model, model_dir: str, kept: dict[str, torch.Tensor]) -> None:
    """After `to_empty`: every parameter's and buffer's local shard, from the files or, for the
    tensors in `kept` (real_tensors before sharding), from that copy."""
    tensors = dict(model.named_parameters())  # one name per tensor: tied weights are filled once
    tensors.update(dict(model.named_buffers()))
    where = match_keys(model, model_dir, list(tensors), kept)
    for name, t in tensors.items():
        local, start = _local_range(t)
        if name in kept:
            full = kept[name].reshape(-1)
            local.view(-1).copy_(full[start:start + local.numel()])
        else:
            read_range(where[name], start, local)


@torch.no_grad()
def fill_ranges(targets: list[tuple[str, torch.Tensor, int]], model, model_dir: str) -> None:
    """(name, this rank's flat tensor, flat start) for each named tensor: read from the files
    (ZeRO-3's partitions: elements [rank × partition, ...) of the flattened tensor)."""
    where = match_keys(model, model_dir, [n for n, _, _ in targets], {})
    for name, out, start in targets:
        stored = where[name]
        n = max(0, min(out.numel(), stored.numel - start))
        read_range(stored, start, out.view(-1)[:n])


def retie(model) -> None:
    """Tied weights (the output head onto the embeddings) again after `to_empty`, which may have
    given them separate storage."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()
