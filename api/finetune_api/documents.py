"""Checks multi-document YAML files of FineTuneJobs, one line per problem (`finetune validate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from . import API_VERSION, KIND
from .validation import validate


def _label(doc: Any) -> str:
    if not isinstance(doc, dict):
        return type(doc).__name__
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or "<no name>"
    return f"{doc.get('kind') or '<no kind>'}/{name}"


def check_documents(source: str, docs: Iterable[Any], *,
                    allow_other_kinds: bool = False) -> tuple[list[str], int]:
    """Problems as `SOURCE#N KIND/NAME: PATH: REASON` lines, and how many docs were read."""
    problems: list[str] = []
    count = 0
    for index, doc in enumerate(docs, start=1):
        if doc is None:  # an empty document between two `---`
            continue
        count += 1
        where = f"{source}#{index} {_label(doc)}"
        if not isinstance(doc, dict) or doc.get("kind") != KIND \
                or doc.get("apiVersion") != API_VERSION:
            if isinstance(doc, dict) and doc.get("kind") == KIND:
                problems.append(f"{where}: apiVersion: Unsupported value: "
                                f"{doc.get('apiVersion')!r}: must be {API_VERSION}")
            elif not allow_other_kinds:
                problems.append(f"{where}: not a {KIND} ({API_VERSION}); pass "
                                "--skip-other-kinds to allow other documents")
            continue
        for error in validate(doc):
            problems.append(f"{where}: {error}")
    return problems, count


def check_files(paths: Iterable[str], *, allow_other_kinds: bool = False) -> tuple[list[str], int]:
    problems: list[str] = []
    total = 0
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            problems.append(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}")
            continue
        found, count = check_documents(path, docs, allow_other_kinds=allow_other_kinds)
        if count == 0:
            found = [f"{path}: no documents"]
        problems += found
        total += count
    return problems, total
