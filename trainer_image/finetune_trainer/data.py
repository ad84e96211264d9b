"""Training data: read documents, tokenize, pack into fixed-length sequences, shard, batch.

Formats: jsonl (one JSON object per line, text in `textField`), parquet (column
`textField`) and text (ONE DOCUMENT PER NON-EMPTY LINE: a line is the natural unit of the
corpora we feed as .txt, and it keeps sharding fine-grained). `auto` picks by extension.
A URI is one file or a prefix/directory; every file under it with a known extension is read.

Sharding is by document (document i goes to rank i % world), each rank packs its own
documents, and the ranks agree on the MIN number of batches so that every rank runs the same
number of steps (a collective would hang otherwise). Each rank reads the whole file list and
keeps its share, which suits datasets that fit in a worker's memory.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

import pyarrow.fs as pafs

from .errors import BadInputError
from .storage import Location, list_files

SAMPLE_BYTES = 1 << 20
FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def file_format(path: str, declared: str) -> str | None:
    """The format to read `path` with, or None when `auto` does not know the extension."""
    if declared != "auto":
        return declared
    for ext, fmt in FORMAT_BY_EXTENSION.items():
        if path.endswith(ext):
            return fmt
    return None


def data_files(loc: Location, declared: str) -> list[tuple[str, str]]:
    """[(path, format)] under the dataset URI; BadInputError when there is none."""
    files = list_files(loc)
    if not files:
        raise BadInputError(f"dataset {loc.uri} does not exist or holds no files")
    picked = [(p, file_format(p, declared)) for p in files]
    known = [(p, f) for p, f in picked if f]
    if not known:
        raise BadInputError(f"dataset {loc.uri}: no file with a known extension "
                            f"({', '.join(sorted(FORMAT_BY_EXTENSION))}); set dataset.format")
    return known


def read_documents(fs: pafs.FileSystem, path: str, fmt: str, text_field: str,
                   sample: bool = False) -> list[str]:
    """The documents of one file; BadInputError naming the file and the problem.

    sample=True reads only the start (the first MiB of text, the first parquet row group):
    enough for the driver's preflight to prove the file is readable, without reading a
    large dataset on the driver.
    """
    shown = path
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if text_field not in names:
                    raise BadInputError(f"dataset file {shown} has no column {text_field!r} "
                                        f"(columns: {', '.join(names)})")
                if sample:
                    table = pf.read_row_group(0, columns=[text_field]) if pf.num_row_groups else None
                else:
                    table = pf.read(columns=[text_field])
            if table is None:
                return []
            return [t for t in table.column(text_field).to_pylist() if isinstance(t, str) and t.strip()]
        with fs.open_input_stream(path) as f:
            raw = f.read(SAMPLE_BYTES) if sample else f.read()
        if sample and len(raw) == SAMPLE_BYTES and b"\n" in raw:
            raw = raw[:raw.rindex(b"\n") + 1]  # drop the line the sample cut in two
    except BadInputError:
        raise
    except Exception as exc:  # pyarrow raises OSError/ArrowInvalid with a useful one-liner
        raise BadInputError(f"cannot read dataset file {shown} as {fmt}: {' '.join(str(exc).split())[:300]}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"dataset file {shown} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if fmt == "text":
        return [line for line in text.splitlines() if line.strip()]
    docs = []
    for n, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise BadInputError(f"dataset file {shown} line {n} is not JSON: {exc}") from None
        if not isinstance(record, dict) or text_field not in record:
            raise BadInputError(f"dataset file {shown} line {n} has no field {text_field!r}")
        value = record[text_field]
        if not isinstance(value, str):
            raise BadInputError(f"dataset file {shown} line {n}: field {text_field!r} is not a string")
        if value.strip():
            docs.append(value)
    return docs


def check_dataset(loc: Location, declared: str, text_field: str) -> int:
    """Preflight: files exist, the first ones parse, and there is at least one document.

    Samples files in order until one holds a document, so an empty dataset is caught without
    reading a large one in full (a bad record deep inside a file is found by the workers,
    which fail with the same BadInput message). Returns the number of files.
    """
    files = data_files(loc, declared)
    for path, fmt in files:
        if read_documents(loc.filesystem, path, fmt, text_field, sample=True):
            return len(files)
    raise BadInputError(f"dataset {loc.uri} holds no non-empty documents (field {text_field!r})")


def load_shard(loc: Location, declared: str, text_field: str, rank: int, world: int) -> list[str]:
    """This rank's documents: document i (over all files, in order) goes to rank i % world."""
    docs: list[str] = []
    index = 0
    for path, fmt in data_files(loc, declared):
        for doc in read_documents(loc.filesystem, path, fmt, text_field):
            if index % world == rank:
                docs.append(doc)
            index += 1
    return docs


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> list[list[int]]:
    """Concatenate documents (each followed by EOS) and cut into seq_len pieces.

    The tail shorter than seq_len is dropped. Sequences can span documents; the EOS between
    them tells the model where one ends.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def tokenize_and_pack(docs: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    if tokenizer.eos_token_id is None:
        raise BadInputError("the tokenizer has no EOS token; packing needs one between documents")
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
    return pack(ids, tokenizer.eos_token_id, seq_len)


@dataclass(frozen=True)
class Plan:
    """How many steps the run takes, agreed by all ranks."""

    batches_per_epoch: int  # micro-batches per rank per epoch (min over ranks)
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int


def plan_steps(batches_per_epoch: int, grad_accum: int, epochs: int, max_steps: int | None) -> Plan:
    """totalSteps = min(maxSteps, epochs x (batches_per_epoch // gradientAccumulationSteps)).

    An optimizer step never spans two epochs: the micro-batches left over at the end of an
    epoch (fewer than gradientAccumulationSteps) are skipped.
    """
    steps_per_epoch = batches_per_epoch // grad_accum
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    return Plan(batches_per_epoch, steps_per_epoch, total)


def epoch_batches(sequences: list[list[int]], micro_batch_size: int, seed: int, epoch: int,
                  n_batches: int) -> list[list[list[int]]]:
    """The first n_batches micro-batches of this epoch, shuffled with seed + epoch."""
    order = list(range(len(sequences)))
    random.Random(seed + epoch).shuffle(order)
    return [[sequences[j] for j in order[b * micro_batch_size:(b + 1) * micro_batch_size]]
            for b in range(n_batches)]
