"""One source of truth: the CRD, the docs and the model all come from schema.py."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from finetune_api import model
from finetune_api.crd import CRD_FILE_NAME, build_crd, render_crd
from finetune_api.reference import render_reference
from finetune_api.schema import SPEC, openapi_schema
from finetune_api.validation import iter_rules

from . import cases

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_crd_is_the_generated_one():
    checked_in = (ROOT / "crds" / CRD_FILE_NAME).read_text()
    assert checked_in == render_crd(), "run `make crds` after changing schema.py"


def test_spec_reference_is_the_generated_one():
    assert (ROOT / "docs" / "spec-reference.md").read_text() == render_reference(), \
        "run `make crds` after changing schema.py"


def test_crd_is_a_valid_apiextensions_object():
    kubernetes_validate.validate(build_crd(), "1.33.0", strict=True)


def _fields_as_document(section) -> dict:
    """A parsed section back as the camelCase document it was read from."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[model._camel(f.name)] = _fields_as_document(value) if dataclasses.is_dataclass(value) else value
    return out


def _unset(value) -> bool:
    return value is None or value == {} or value == []


@pytest.mark.parametrize("name", sorted(cases.GOOD))
def test_the_model_reads_every_admitted_field(name):
    job = model.FineTuneJob.from_document(cases.GOOD[name])

    def same(doc: dict, mine: dict, node: dict, path: str) -> None:
        assert set(mine) == set(node["properties"]), f"{path}: the model's fields are not the schema's"
        for key, value in mine.items():
            prop = node["properties"][key]
            if prop.get("type") == "object" and "properties" in prop:
                if value is None:  # an optional section with required fields, absent
                    assert key not in doc and prop.get("required"), f"{path}.{key}: read as None"
                    continue
                same(doc.get(key, {}), value, prop, f"{path}.{key}")
            elif key in doc:
                assert value == doc[key], f"{path}.{key}: {value!r} != {doc[key]!r}"
            else:  # not in the document (its section is absent, or the schema has no default)
                assert value == prop["default"] if "default" in prop else _unset(value), \
                    f"{path}.{key}: {value!r}"

    same(job.document["spec"], _fields_as_document(job.spec), openapi_schema()["properties"]["spec"], "spec")


def test_a_field_added_to_the_schema_is_read_without_a_model_change():
    spec = copy.deepcopy(SPEC)
    spec["properties"]["training"]["properties"]["labelSmoothing"] = {
        "type": "number", "description": "test", "default": 0.1}
    section = model._section("Spec", spec, {})
    required = {"model": {"uri": "s3://m/x"}, "dataset": {"uri": "s3://d/x"}, "checkpoint": {"uri": "s3://c/x"}}
    assert section.from_dict(required).training.label_smoothing == 0.1
    assert section.from_dict({**required, "training": {"labelSmoothing": 0.3}}).training.label_smoothing == 0.3


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
        ["Phase", "Strategy", "Workers", "Progress", "Loss", "Eval", "ETA", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert crd["spec"]["names"]["categories"] == ["finetune"]
    yaml.safe_load(render_crd())
