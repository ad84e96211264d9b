"""The spec reader: job files read as kubectl reads them (sigs.k8s.io/yaml over go-yaml v2,
then JSON), every refusal one line that names the document and the field."""

from __future__ import annotations

import json
import math

import pytest

from finetune_api.documents import Source, check_sources
from finetune_api.reader import (MAX_DEPTH, ReadError, dump_all, read_one, read_stream,
                                 resolve_plain)
from finetune_api.validation import admit

from .cases import ABSENT, BAD, GOOD, TEXT_BAD, TEXT_GOOD, job_text, make

# Plain scalars as go-yaml v2 resolves them (resolve.go), after the JSON trip to the API server.
SCALARS = [
    ("3e-3", 0.003), ("1e5", 100000.0), ("2E-05", 2e-05), (".5", 0.5), ("-.5", -0.5),
    ("1.", 1.0), ("0x1F", 31), ("-0x1F", -31), ("0o17", 15), ("017", 15), ("08", 8.0),
    ("0b101", 5), ("1_000", 1000), ("+1", 1), ("-0", 0),
    ("yes", True), ("Yes", True), ("YES", True), ("y", True), ("Y", True), ("on", True),
    ("ON", True), ("true", True), ("True", True), ("no", False), ("n", False), ("off", False),
    ("Off", False), ("FALSE", False),
    ("~", None), ("null", None), ("Null", None), ("NULL", None), ("", None),
    ("2024-01-01", "2024-01-01"), ("2024-01-01T10:00:00Z", "2024-01-01T10:00:00Z"),
    ("1:30", "1:30"), ("0x1p-2", "0x1p-2"), ("1e400", "1e400"), ("yEs", "yEs"),
    ("nan", "nan"), ("Infinity", "Infinity"), ("1_0.5", 10.5), ("0o8", "0o8"),
    ("18446744073709551615", 18446744073709551615), ("99999999999999999999", 1e20),
]


@pytest.mark.parametrize("text,value", SCALARS, ids=[t or "empty" for t, _ in SCALARS])
def test_plain_scalars_resolve_as_go_yaml_v2(text, value):
    got = resolve_plain(text)
    assert type(got) is type(value) and got == value


@pytest.mark.parametrize("text", [".inf", ".Inf", "+.INF", "-.inf", ".nan", ".NaN", ".NAN"])
def test_infinities_and_nan_resolve_to_floats_json_cannot_carry(text):
    assert not math.isfinite(resolve_plain(text))


def _at(doc, path):
    for key in path.split("."):
        if not isinstance(doc, dict) or key not in doc:
            return ABSENT
        doc = doc[key]
    return doc


@pytest.mark.parametrize("name", sorted(TEXT_GOOD))
def test_good_files_are_read_as_kubectl_sends_them(name):
    text, expected = TEXT_GOOD[name]
    problems, count = check_sources([Source(name, *read_stream(text, name))])
    assert problems == [] and count == 1, [str(p) for p in problems]
    stored = admit(read_one(text, name))
    for path, value in expected.items():
        got = _at(stored, path)
        assert got == value and type(got) is type(value), (path, got)


@pytest.mark.parametrize("name", sorted(TEXT_BAD))
def test_bad_files_get_one_line_naming_document_and_field(name):
    text, field, words, _ = TEXT_BAD[name]
    problems, _ = check_sources([Source(name, *read_stream(text, name))])
    assert problems, f"{name} was accepted"
    assert all("\n" not in str(p) and str(p).startswith(name) for p in problems)
    if field is None:  # the file (or the document) as a whole
        matching = [p for p in problems if p.field is None]
    else:
        matching = [p for p in problems if p.field == field or (
            p.field or "").startswith(field + ".")]
        assert all(p.document == 1 for p in matching)
    assert any(words in p.message for p in matching), [str(p) for p in problems]


def test_every_good_and_bad_document_reads_the_same_as_json():
    """`json.dumps` of a job is a job file too (kubectl reads JSON streams)."""
    docs = list(GOOD.values()) + [doc for doc, _ in BAD.values()]
    text = "\n".join(json.dumps(doc) for doc in docs)
    read, problems = read_stream(text, "jobs.json")
    assert problems == [] and [d.value for d in read] == docs


def test_every_good_and_bad_document_reads_back_from_the_yaml_we_write():
    docs = list(GOOD.values()) + [doc for doc, _ in BAD.values()]
    read, problems = read_stream(dump_all(docs), "jobs.yaml")
    assert problems == [] and [d.value for d in read] == docs


def test_problems_carry_the_line_of_their_field():
    text = job_text("maxSteps: 10\n    microBatchSize: 0")
    (problem,) = check_sources([Source("job.yaml", *read_stream(text, "job.yaml"))])[0]
    assert problem.field == "spec.training.microBatchSize"
    assert text.splitlines()[problem.line - 1].strip() == "microBatchSize: 0"
    # A defaulted field has no line of its own: its nearest written ancestor's.
    text = job_text("maxSteps: 10\n    warmupSteps: 0").replace("maxSteps: 10", "maxSteps: 0")
    problems, _ = check_sources([Source("job.yaml", *read_stream(text, "job.yaml"))])
    assert {p.field: text.splitlines()[p.line - 1].strip() for p in problems} == \
        {"spec.training.maxSteps": "maxSteps: 0"}


def test_documents_are_numbered_and_empty_ones_skipped():
    text = "---\n" + job_text(name="one") + "---\n---\n" + job_text("maxSteps: 0", name="two")
    problems, count = check_sources([Source("two.yaml", *read_stream(text, "two.yaml"))])
    assert count == 2
    assert [str(p).split(":")[0] for p in problems] == ["two.yaml#3 FineTuneJob/two"]


def test_nesting_far_past_the_limit_is_a_problem_not_a_recursion_error():
    deep = {"leaf": 1}
    for _ in range(5 * MAX_DEPTH):
        deep = {"k": deep}
    for text in (json.dumps(deep), dump_all([deep])):
        docs, problems = read_stream(text, "deep")
        found = problems + [p for d in docs for p in d.problems]
        assert len(found) == 1 and "nest" in found[0].message


def test_read_one_is_for_exactly_one_document():
    with pytest.raises(ReadError, match="must hold one document; it holds 2"):
        read_one(job_text() + "---\n" + job_text(), "two")
    with pytest.raises(ReadError) as refused:
        read_one(job_text("learningRate: .nan"), "FINETUNE_JOB")
    assert str(refused.value).startswith("FINETUNE_JOB#1: spec.training.learningRate: ")


def test_a_large_file_without_aliases_is_not_excessive_aliasing():
    config = {"layers": [{"index": i, "sizes": [1, 2, 3]} for i in range(15_000)]}
    doc = make(**{"spec.strategy.deepspeed.config": config})
    read, problems = read_stream(dump_all([doc]), "large.yaml")
    assert problems == [] and read[0].problems == [] and read[0].value == doc
