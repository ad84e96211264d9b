"""FineTuneJob files checked and loaded as kubectl would send them (`finetune validate`,
`finetune run`, `finetune render`): files, directories (`-R` recurses) and standard input."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from . import API_VERSION, KIND
from .reader import Document, Problem, iter_values, read_stream
from .validation import validate

if TYPE_CHECKING:
    from .model import FineTuneJob

# What `kubectl apply -f DIR` reads of a directory.
EXTENSIONS = (".yaml", ".yml", ".json")
STDIN = "-"


@dataclasses.dataclass
class Source:
    name: str
    documents: list[Document]
    problems: list[Problem]  # of the whole file: unreadable, not UTF-8, a syntax error


def _files_of(directory: Path, recursive: bool) -> list[Path]:
    if recursive:
        found = [Path(root) / name for root, dirs, names in os.walk(directory)
                 for name in names]
    else:
        found = [p for p in directory.iterdir() if p.is_file()]
    return sorted(p for p in found if p.suffix in EXTENSIONS)


def read_sources(paths: Iterable[str], *, recursive: bool = False) -> Iterator[Source]:
    """Each named file, each job file of each named directory, and `-` (standard input)."""
    for path in paths:
        if path == STDIN:
            data = sys.stdin.buffer.read()
            yield Source("<stdin>", *read_stream(data, "<stdin>"))
            continue
        target = Path(path)
        if target.is_dir():
            files = _files_of(target, recursive)
            if not files:
                yield Source(path, [], [Problem(path, "no " + ", ".join(EXTENSIONS) + " files"
                                                + ("" if recursive else " (-R reads its "
                                                   "subdirectories)"))])
            for file in files:
                yield _read_file(str(file))
        else:
            yield _read_file(path)


def _read_file(path: str) -> Source:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Source(path, [], [Problem(path, f"cannot read: {exc.strerror or exc}")])
    return Source(path, *read_stream(data, path))


def _with_label(problem: Problem, doc: Document) -> Problem:
    return dataclasses.replace(problem, label=doc.label if doc.value is not None else None)


def check_document(doc: Document, *, allow_other_kinds: bool = False) -> list[Problem]:
    """What kubectl and the API server would refuse in one document, each with its line."""
    if doc.problems:  # kubectl cannot even send it
        return [_with_label(p, doc) for p in doc.problems]
    value = doc.value
    if not isinstance(value, dict) or value.get("kind") != KIND \
            or value.get("apiVersion") != API_VERSION:
        if isinstance(value, dict) and value.get("kind") == KIND:
            return [doc.problem(f"Unsupported value: {value.get('apiVersion')!r}: must be "
                                f"{API_VERSION}", "apiVersion")]
        if allow_other_kinds:
            return []
        return [doc.problem(f"not a {KIND} ({API_VERSION}); pass --skip-other-kinds to allow "
                            "other documents")]
    return [doc.problem(error.message, error.path) for error in validate(value)]


def check_sources(sources: Iterable[Source], *,
                  allow_other_kinds: bool = False) -> tuple[list[Problem], int]:
    """Every problem of every document, and how many documents were read."""
    problems: list[Problem] = []
    count = 0
    for source in sources:
        docs = list(iter_values(source.documents))
        for doc in docs:
            problems += check_document(doc, allow_other_kinds=allow_other_kinds)
        problems += source.problems
        if not docs and not source.problems:
            problems.append(Problem(source.name, "no documents"))
        count += len(docs)
    return problems, count


class JobFileError(Exception):
    def __init__(self, problems: list[Problem], *, invalid: bool):
        self.problems = problems
        self.invalid = invalid  # the file was read, and a job in it is refused
        super().__init__("; ".join(str(p) for p in problems))


def load_jobs(paths: Iterable[str], *,
              recursive: bool = False) -> list[tuple[Source, "FineTuneJob"]]:
    """Every FineTuneJob of the given files, admitted and defaulted (FineTuneJob objects),
    with the source each came from; other kinds are passed over. Raises JobFileError."""
    from .model import FineTuneJob

    paths = list(paths)
    jobs: list[tuple[Source, FineTuneJob]] = []
    file_problems: list[Problem] = []
    job_problems: list[Problem] = []
    for source in read_sources(paths, recursive=recursive):
        file_problems += source.problems
        for doc in iter_values(source.documents):
            value = doc.value
            if not doc.problems and not (isinstance(value, dict) and value.get("kind") == KIND):
                continue
            found = check_document(doc)
            if found:
                job_problems += found
            else:
                jobs.append((source, FineTuneJob.from_document(value)))
    if file_problems or job_problems:
        raise JobFileError(file_problems + job_problems, invalid=not file_problems)
    if not jobs:
        raise JobFileError([Problem(", ".join(paths), f"no {KIND} ({API_VERSION}) found")],
                           invalid=False)
    return jobs
