"""Builds the FineTuneJob CustomResourceDefinition from `schema.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import GROUP, KIND, PLURAL, VERSION
from .schema import PRINTER_COLUMNS, openapi_schema

CRD_FILE_NAME = f"{GROUP}_{PLURAL}.yaml"
HEADER = "# Generated from api/finetune_api/schema.py by `make crds`; do not edit by hand.\n"


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ftj"],
                "categories": ["finetune"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def write_crd(*directories: Path) -> list[Path]:
    text = render_crd()
    written = []
    for directory in directories:
        path = Path(directory) / CRD_FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
