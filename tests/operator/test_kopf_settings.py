"""What configure_kopf sets for the namespaces the operator is given."""
from __future__ import annotations

import kopf
import pytest

from finetune_operator.main import configure_kopf
from finetune_operator.settings import Settings


@pytest.mark.parametrize("namespaces, disabled", [
    ((), False),                       # cluster-wide: kopf observes CRDs (the chart grants it)
    (("team-a",), True),               # exact names: nothing to observe
    (("team-a", "team-b"), True),
    (("team-*",), False),              # a pattern: kopf must list namespaces to match it
    (("team-a", "!team-b"), False),
])
def test_exact_namespaces_need_no_scanning(namespaces, disabled):
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, Settings(namespaces=namespaces))
    assert kopf_settings.scanning.disabled is disabled
