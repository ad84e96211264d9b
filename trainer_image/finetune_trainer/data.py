"""Training data: read records, tokenize, pack into fixed-length sequences, shard, batch.

Formats: jsonl (one JSON object per line, text in `textField`), parquet (column
`textField`) and text (ONE DOCUMENT PER NON-EMPTY LINE: a line is the natural unit of the
corpora we feed as .txt, and it keeps sharding fine-grained). `auto` picks by extension.
`chat` and `prompt-completion` records (records.py renders them with their label masks) are
read from .jsonl/.json or .parquet files.
A URI is one file or a prefix/directory; every file under it with a known extension is read.

What packing guarantees:
- Text (`pack`): documents, each followed by EOS, are concatenated and cut into maxSeqLength
  rows; a row can hold the end of one document and the start of the next, attention crosses
  the EOS between them, and the loss is on every token.
- Chat and prompt-completion (`pack_examples`): each record lies whole in one row (records
  longer than maxSeqLength are cut or dropped first, by dataset.longRecords); rows are filled
  in order and padded. Position ids restart at 0 at every record and at the padding, and the
  model gets no attention mask, so transformers builds a block-diagonal causal mask from the
  position ids: a token attends only to the earlier tokens of its own record. Each record's
  first label and all padding labels are -100, so no loss term predicts one record's token
  from another's. A record's loss terms are the same packed alone or with others.

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
from typing import Any

import pyarrow.fs as pafs

from .errors import BadInputError
from .records import IGNORE, Counts, Example, fit, render_chat, render_prompt_completion
from .storage import Location, list_files

RECORD_FORMATS = ("chat", "prompt-completion")

SAMPLE_BYTES = 1 << 20
FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def file_format(path: str, declared: str) -> str | None:
    """The format to read `path` with, or None when `auto` does not know the extension."""
    if declared not in ("auto", *RECORD_FORMATS):
        return declared
    for ext, fmt in FORMAT_BY_EXTENSION.items():
        if path.endswith(ext):
            if declared in RECORD_FORMATS and fmt == "text":
                raise BadInputError(f"dataset.format {declared} reads .jsonl/.json or .parquet files, "
                                    f"not the text file {path}")
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


@dataclass(frozen=True)
class Records:
    """What a record of the dataset is (dataset.format) and the fields it is read from."""

    kind: str  # text, chat or prompt-completion
    fields: tuple[str, ...]

    @classmethod
    def of(cls, dataset) -> "Records":
        if dataset.format == "chat":
            return cls("chat", (dataset.messages_field,))
        if dataset.format == "prompt-completion":
            return cls("prompt-completion", (dataset.prompt_field, dataset.completion_field))
        return cls("text", (dataset.text_field,))

    def value(self, record: Any, where: str) -> Any:
        """The record's content (text, a message list, a (prompt, completion) pair), or None
        for a text record with no text; BadInputError naming the place and the field."""
        missing = [f for f in self.fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise BadInputError(f"{where} has no field {missing[0]!r}")
        if self.kind == "chat":
            (name,) = self.fields
            messages = record[name]
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise BadInputError(f"{where}: field {name!r} is not a non-empty list of "
                                    "{role, content} messages with string values")
            return [{"role": m["role"], "content": m["content"]} for m in messages]
        values = [record[f] for f in self.fields]
        for name, value in zip(self.fields, values):
            if not isinstance(value, str):
                raise BadInputError(f"{where}: field {name!r} is not a string")
        if self.kind == "prompt-completion":
            return tuple(values)
        return values[0] if values[0].strip() else None


def read_documents(fs: pafs.FileSystem, path: str, fmt: str, text_field: str,
                   sample: bool = False) -> list[str]:
    """The text documents of one file (see read_records)."""
    return read_records(fs, path, fmt, Records("text", (text_field,)), sample)


def read_records(fs: pafs.FileSystem, path: str, fmt: str, records: Records,
                 sample: bool = False) -> list:
    """The records of one file; BadInputError naming the file and the problem.

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
                for name in records.fields:
                    if name not in names:
                        raise BadInputError(f"dataset file {shown} has no column {name!r} "
                                            f"(columns: {', '.join(names)})")
                columns = list(records.fields)
                if sample:
                    table = pf.read_row_group(0, columns=columns) if pf.num_row_groups else None
                else:
                    table = pf.read(columns=columns)
            if table is None:
                return []
            if records.kind == "text":
                return [t for t in table.column(columns[0]).to_pylist() if isinstance(t, str) and t.strip()]
            return [records.value(row, f"dataset file {shown} row {n}")
                    for n, row in enumerate(table.to_pylist())]
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
        value = records.value(record, f"dataset file {shown} line {n}")
        if value is not None:
            docs.append(value)
    return docs


def check_dataset(loc: Location, declared: str, records: Records) -> int:
    """Preflight: files exist, the first ones parse, and there is at least one document.

    Samples files in order until one holds a document, so an empty dataset is caught without
    reading a large one in full (a bad record deep inside a file is found by the workers,
    which fail with the same BadInput message). Returns the number of files.
    """
    files = data_files(loc, declared)
    for path, fmt in files:
        if read_records(loc.filesystem, path, fmt, records, sample=True):
            return len(files)
    what = "documents" if records.kind == "text" else "records"
    raise BadInputError(f"dataset {loc.uri} holds no non-empty {what} "
                        f"(field {' / '.join(map(repr, records.fields))})")


def load_all(loc: Location, declared: str, records: Records) -> list:
    """Every record under the URI, over all files in order."""
    out: list = []
    for path, fmt in data_files(loc, declared):
        out.extend(read_records(loc.filesystem, path, fmt, records))
    return out


def load_shard(loc: Location, declared: str, records: Records, rank: int, world: int) -> list:
    """This rank's records: record i (over all files, in order) goes to rank i % world."""
    return load_all(loc, declared, records)[rank::world]


def split_eval(n: int, fraction: float, seed: int) -> set[int]:
    """The indices of the records held out for evaluation: round(n x fraction), at least one,
    drawn with `seed` alone, so the split is the same for any world size and training seed."""
    k = max(1, round(n * fraction))
    if k >= n:
        raise BadInputError(f"dataset.evalFraction {fraction} of {n} records leaves no record to train on")
    return set(random.Random(seed).sample(range(n), k))


@dataclass(frozen=True)
class Row:
    """One packed sequence of maxSeqLength tokens. position_ids is None for text rows (the
    model numbers the positions 0..maxSeqLength-1 itself)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> list[Row]:
    """Whole examples (each at most seq_len long) into rows of seq_len, in order, each row
    filled until the next example does not fit, then padded (see the module docstring)."""
    rows: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def close() -> None:
        pad = seq_len - len(ids)
        rows.append(Row(ids + [pad_id] * pad, labels + [IGNORE] * pad, positions + list(range(pad))))

    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > seq_len:
            close()
            ids, labels, positions = [], [], []
        ids = ids + ex.input_ids
        labels = labels + ex.labels
        positions = positions + list(range(len(ex.input_ids)))
    if ids:
        close()
    return rows


def examples_of(records: Records, values: list, tokenizer, seq_len: int, long_records: str,
                counts: Counts) -> list[Example]:
    """Chat or prompt-completion records rendered with their masks and fitted to seq_len."""
    render = (render_chat if records.kind == "chat"
              else lambda tok, pair: render_prompt_completion(tok, *pair))
    out = []
    for value in values:
        example = fit(render(tokenizer, value), seq_len, long_records, counts)
        if example is not None:
            out.append(example)
    return out


def build_rows(records: Records, values: list, tokenizer, seq_len: int, long_records: str,
               counts: Counts, keep_tail: bool = False) -> list[Row]:
    """The packed rows of `values` (one kind of record). keep_tail: text's last, short row is
    padded (labels -100) instead of dropped, as the evaluation set keeps every token."""
    if records.kind == "text":
        counts.records += len(values)
        ids = text_ids(values, tokenizer)
        rows = [Row(seq, seq) for seq in pack(ids, tokenizer.eos_token_id, seq_len)]
        if keep_tail:
            used = len(rows) * seq_len
            tail = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)][used:]
            if len(tail) > 1:
                pad = seq_len - len(tail)
                rows.append(Row(tail + [tokenizer.eos_token_id] * pad, tail + [IGNORE] * pad))
        return rows
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise BadInputError("the tokenizer has neither a pad nor an EOS token to pad packed rows with")
    return pack_examples(examples_of(records, values, tokenizer, seq_len, long_records, counts), seq_len, pad_id)


def model_inputs(rows: list[Row], device) -> dict:
    """A micro-batch as the model's keyword arguments. No attention mask and no cache: with
    position ids, transformers then masks attention per packed record (module docstring)."""
    import torch

    batch = {"input_ids": torch.tensor([r.input_ids for r in rows], dtype=torch.long, device=device),
             "labels": torch.tensor([r.labels for r in rows], dtype=torch.long, device=device),
             "use_cache": False}
    if rows[0].position_ids is not None:
        batch["position_ids"] = torch.tensor([r.position_ids for r in rows], dtype=torch.long, device=device)
    return batch


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


def text_ids(docs: list[str], tokenizer) -> list[list[int]]:
    """Each document's token ids, without special tokens: pack() puts EOS between them."""
    if tokenizer.eos_token_id is None:
        raise BadInputError("the tokenizer has no EOS token; packing needs one between documents")
    return tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []


def tokenize_and_pack(docs: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    """Text documents as training packs them (build_rows' text rows)."""
    return pack(text_ids(docs, tokenizer), tokenizer.eos_token_id, seq_len)


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
