"""The project's Helm chart as Helm renders it (the Helm SDK, helm-python-sdk)."""
from __future__ import annotations

import functools
from typing import Any

import helm_python
import yaml

from .paths import REPO_ROOT

CHART_DIR = REPO_ROOT / 'charts' / 'finetune-operator'
RELEASE = 'ft'
NAMESPACE = 'finetune-system'


@functools.lru_cache(maxsize=1)
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART_DIR))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the release would create (CRDs aside), in template order."""
    rendered = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(('.yaml', '.yml')):  # NOTES.txt is for people
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects
