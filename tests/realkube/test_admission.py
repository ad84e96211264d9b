"""The admission corpus (tests/api/cases.py) against the REAL kube-apiserver.

Each document goes in as `kubectl apply` sends it (a server-side dry run with strict field
validation): the API server's own structural-schema, defaulting and CEL implementation
decides. Every good document is admitted with the same defaults `finetune validate` fills in;
every bad one is refused, naming the field the offline validator names.
"""

from __future__ import annotations

import pytest

from api.cases import BAD, GOOD
from finetune_api.validation import admit, validate

pytestmark = pytest.mark.realkube

PATH = "/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"
# What kubectl apply/create send: nothing persisted, unknown fields refused.
QUERY = "?dryRun=All&fieldValidation=Strict"


def _causes(body: dict) -> set[str]:
    return {c.get("field", "") for c in (body.get("details") or {}).get("causes", [])}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_the_api_server_admits_good_documents_with_the_same_defaults(kubestack, name):
    status, stored = kubestack.request("POST", PATH + QUERY, GOOD[name])
    assert status == 201, (status, stored.get("message"))
    assert stored["spec"] == admit(GOOD[name])["spec"]


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_api_server_refuses_bad_documents_naming_the_same_field(kubestack, name):
    doc, field = BAD[name]
    status, body = kubestack.request("POST", PATH + QUERY, doc)
    assert status in (400, 422), (status, body.get("message"))
    theirs = _causes(body)
    ours = {error.path for error in validate(doc)}
    if field == "metadata.generateName":
        # The API server makes the name (generateName + 5 characters) before it validates, so
        # it names metadata.name where an offline file, which has no name yet, names this.
        field_there = "metadata.name"
    else:
        field_there = field
    # A strict-decoding refusal (an unknown field) names the field in its message only.
    assert field_there in theirs or f'unknown field "{field}"' in body.get("message", ""), \
        (theirs, body.get("message"))
    assert field in ours, ours
