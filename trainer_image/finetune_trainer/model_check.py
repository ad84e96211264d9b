"""Preflight of a model's files (s3:// or file://): a model no retry can fix fails on the driver,
with BadInput (exit 3) and the file's name, before any worker starts.

Cheap checks, reading only headers and small files: every safetensors file's header parses and
its size is what the header describes (a truncated or cut download is caught without reading
the weights); the shards a safetensors index names exist; config and tokenizer JSON files
parse; PyTorch .bin files (zip archives) have their central directory.
"""

from __future__ import annotations

import json
import struct
import zipfile

import pyarrow.fs as pafs

from .errors import BadInputError
from .storage import Location, describe

JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors.index.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def _check_safetensors(f, size: int, shown: str) -> None:
    if size < 8:
        raise BadInputError(f"model file {shown} is truncated: {size} bytes, not even a safetensors header")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise BadInputError(f"model file {shown} is truncated or not safetensors: its header claims "
                            f"{header_len} bytes of {size}")
    try:
        header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise BadInputError(f"model file {shown} has an unreadable safetensors header: {describe(exc)}") from None
    expected = 8 + header_len + end
    if size != expected:
        raise BadInputError(f"model file {shown} is truncated or corrupt: {size} bytes, its header describes "
                            f"{expected}")


def check_model_files(loc: Location, files: list[tuple[str, int]]) -> None:
    """`files`: (path inside loc.filesystem, size) of every file of the model at `loc`."""
    names = {path.rsplit("/", 1)[-1]: (path, size) for path, size in files}
    prefix = loc.path.rstrip("/") + "/"

    def shown(path: str) -> str:
        return f"{loc.uri.rstrip('/')}/{path[len(prefix):]}" if path.startswith(prefix) else path

    for path, size in files:
        name = path.rsplit("/", 1)[-1]
        try:
            if name.endswith(".safetensors"):
                with loc.filesystem.open_input_file(path) as f:
                    _check_safetensors(f, size, shown(path))
            elif name in JSON_FILES:
                with loc.filesystem.open_input_stream(path) as f:
                    doc = json.loads(f.read())
                if name == "model.safetensors.index.json":
                    missing = sorted(set((doc.get("weight_map") or {}).values()) - set(names))
                    if missing:
                        raise BadInputError(f"model {loc.uri}: {shown(path)} names shards that are not there: "
                                            f"{', '.join(missing[:3])}")
            elif name.endswith(".bin") and size > 0:
                with loc.filesystem.open_input_file(path) as f:
                    if not zipfile.is_zipfile(f):
                        raise BadInputError(f"model file {shown(path)} is truncated or not a PyTorch checkpoint "
                                            "(no zip directory at its end)")
        except BadInputError:
            raise
        except ValueError as exc:  # JSON
            raise BadInputError(f"model file {shown(path)} is not valid JSON: {describe(exc)}") from None
        except OSError as exc:
            raise BadInputError(f"cannot read model file {shown(path)}: {describe(exc)}") from None


def model_files(loc: Location) -> list[tuple[str, int]]:
    selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    try:
        infos = loc.filesystem.get_file_info(selector)
    except OSError as exc:
        raise BadInputError(f"cannot list model {loc.uri}: {describe(exc)}") from None
    return [(i.path, i.size) for i in infos if i.type == pafs.FileType.File]
