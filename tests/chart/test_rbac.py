"""The RBAC checker (finetune_testbed.rbac) on the scenarios of `recorded_calls.yaml`, written
from the operator's and kopf's code, and on calls that must be reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_testbed import emulator
from finetune_testbed.rbac import ALLOWED_UNUSED, Call, as_call, assert_calls_granted, assert_rbac_matches, \
    check_rbac, service_account_name

from .render import render

FIXTURE = Path(__file__).with_name("recorded_calls.yaml")


def _scenarios() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(FIXTURE.read_text())


@pytest.mark.parametrize("scenario", sorted(_scenarios()))
def test_chart_rbac_matches_the_operators_calls(scenario):
    data = _scenarios()[scenario]
    assert_rbac_matches(data["calls"], data["values"])


def test_a_call_the_chart_does_not_grant_is_reported_missing():
    data = _scenarios()["cluster"]
    calls = data["calls"] + [["watch", "", "pods", "", "team-a"]]
    objects = render(data["values"])
    report = check_rbac(calls, objects, service_account_name(objects))
    assert report.missing == [Call("watch", "", "pods", "", "team-a")]


def test_a_grant_nobody_uses_is_reported_unused():
    data = _scenarios()["cluster"]
    calls = [c for c in data["calls"] if c[:3] != ["delete", "ray.io", "rayclusters"]]
    objects = render(data["values"])
    report = check_rbac(calls, objects, service_account_name(objects))
    assert report.unused == [("delete", "ray.io", "rayclusters")]
    assert not report.missing


def test_namespaced_roles_do_not_reach_other_namespaces():
    data = _scenarios()["namespaced-peering"]
    calls = data["calls"] + [["get", "", "secrets", "", "kube-system"]]
    objects = render(data["values"])
    report = check_rbac(calls, objects, service_account_name(objects))
    assert report.missing == [Call("get", "", "secrets", "", "kube-system")]


def test_a_stale_allowance_is_reported():
    data = _scenarios()["cluster"]
    objects = render(data["values"])
    allowed = {**ALLOWED_UNUSED, ("get", "", "pods"): "no longer granted"}
    report = check_rbac(data["calls"], objects, service_account_name(objects),
                        allowed_unused=allowed)
    assert report.stale_allowances == [("get", "", "pods")]


def test_assert_calls_granted_checks_one_direction_only():
    data = _scenarios()["namespaced-peering"]
    # A partial run (no TTL deletion) passes; a call outside the Roles does not.
    partial = [c for c in data["calls"] if c[0] != "delete"]
    assert_calls_granted(partial, data["values"])
    with pytest.raises(AssertionError, match="pods"):
        assert_calls_granted(partial + [["watch", "", "pods", "", "team-a"]], data["values"])


def test_emulator_api_calls_are_accepted():
    # The e2e emulator's Recorder holds ApiCall dataclasses; `as_call` reads them as is.
    api_call = emulator.ApiCall("patch", "finetune.dev", "finetunejobs", "status", "team-a")
    assert as_call(api_call) == Call("patch", "finetune.dev", "finetunejobs", "status", "team-a")
