"""One source of truth: the CRD, the docs and the typed model all come from schema.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import kubernetes_validate
import yaml

from finetune_api import model
from finetune_api.crd import CRD_FILE_NAME, build_crd, render_crd
from finetune_api.reference import render_reference
from finetune_api.schema import openapi_schema
from finetune_api.validation import iter_rules

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_crd_is_the_generated_one():
    checked_in = (ROOT / "crds" / CRD_FILE_NAME).read_text()
    assert checked_in == render_crd(), "run `make crds` after changing schema.py"


def test_spec_reference_is_the_generated_one():
    assert (ROOT / "docs" / "spec-reference.md").read_text() == render_reference(), \
        "run `make crds` after changing schema.py"


def test_crd_is_a_valid_apiextensions_object():
    kubernetes_validate.validate(build_crd(), "1.33.0", strict=True)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _walk(cls, schema, path):
    fields = {_camel(f.name): f for f in dataclasses.fields(cls)}
    props = schema["properties"]
    assert set(fields) == set(props), f"{path}: model {sorted(fields)} != schema {sorted(props)}"
    for key, f in fields.items():
        child = props[key]
        if "default" in child and f.default is not dataclasses.MISSING:
            assert f.default == child["default"], f"{path}.{key}: default differs"
        hint = getattr(model, f.type, None) if isinstance(f.type, str) else f.type
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _walk(hint, child, f"{path}.{key}")


def test_typed_model_matches_the_schema_field_for_field():
    _walk(model.Spec, openapi_schema()["properties"]["spec"], "spec")


def test_every_rule_has_a_message_and_compiles():
    rules = list(iter_rules())
    assert len(rules) >= 6
    import celpy
    env = celpy.Environment()
    for path, spec in rules:
        assert spec["message"] and not spec["message"].endswith(".")
        env.compile(spec["rule"])


def test_crd_has_status_subresource_columns_and_names():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == \
        ["Phase", "Strategy", "Workers", "Progress", "Loss", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert crd["spec"]["names"]["categories"] == ["finetune"]
    yaml.safe_load(render_crd())
