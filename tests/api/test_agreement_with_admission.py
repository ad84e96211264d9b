"""The offline validator and the API server's admission agree on every document of the table.

Admission here is the Kubernetes API emulator's (finetune_testbed): it reads the CRD file from
crds/ and evaluates the CEL rules with a different CEL implementation (the Rust-based
`common-expression-language`, where `finetune validate` uses `cel-python`), the structural
schema with `jsonschema`. Both must accept the good documents, refuse the bad ones, and name
the same field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_api.crd import CRD_FILE_NAME
from finetune_api.validation import admit, validate
from finetune_testbed import schema_validation

from .cases import BAD, GOOD

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
