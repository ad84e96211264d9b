"""The offline validator and the API server's admission agree on every document of the table.

Admission here is the Kubernetes API emulator's (finetune_testbed): it reads the CRD file from
crds/ and evaluates the CEL rules with a different CEL implementation (the Rust-based
`common-expression-language`, where `finetune validate` uses `cel-python`), the structural
schema with `jsonschema`. Both must accept the good documents, refuse the bad ones, and name
the same field. Job files given as text go through the reader first, as kubectl's YAML
reading comes before anything reaches the API server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_api.crd import CRD_FILE_NAME
from finetune_api.reader import read_one
from finetune_api.validation import admit, validate
from finetune_testbed import schema_validation

from .cases import BAD, GOOD, TEXT_BAD, TEXT_GOOD

CRD = Path(__file__).resolve().parents[2] / "crds" / CRD_FILE_NAME


@pytest.fixture(scope="module")
def admission():
    return schema_validation.CrdSchemaValidator.from_file(CRD)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_both_admit_good_documents_with_the_same_defaults(admission, name):
    stored, _ = admission.admit(GOOD[name])
    ours = admit(GOOD[name])
    assert stored["spec"] == ours["spec"]


@pytest.mark.parametrize("name", sorted(BAD))
def test_both_refuse_bad_documents_naming_the_same_field(admission, name):
    doc, field = BAD[name]
    with pytest.raises(schema_validation.AdmissionError) as refused:
        admission.admit(doc)
    theirs = {cause.field for cause in refused.value.causes}
    ours = {error.path for error in validate(doc)}
    assert field in theirs, (theirs, refused.value)
    assert field in ours, ours


@pytest.mark.parametrize("name", sorted(TEXT_GOOD))
def test_both_admit_what_the_reader_makes_of_good_files(admission, name):
    doc = read_one(TEXT_GOOD[name][0], name)
    stored, _ = admission.admit(doc)
    assert stored["spec"] == admit(doc)["spec"]


@pytest.mark.parametrize("name", sorted(n for n, case in TEXT_BAD.items()
                                        if case[3] == "admission"))
def test_both_refuse_what_the_reader_makes_of_bad_files(admission, name):
    text, field, _, _ = TEXT_BAD[name]
    doc = read_one(text, name)
    with pytest.raises(schema_validation.AdmissionError) as refused:
        admission.admit(doc)
    assert field in {cause.field for cause in refused.value.causes}, refused.value
    assert field in {error.path for error in validate(doc)}
