"""`kubectl get ftj` as the real API server prints it: the CRD's printer columns (schema.
PRINTER_COLUMNS) over a status the operator writes. The emulator serves no Table
conversion, so only the real API server can show what a user sees."""

from __future__ import annotations

import uuid

import pytest

from api.cases import make

pytestmark = pytest.mark.realkube


def test_kubectl_get_shows_progress_loss_eval_and_eta(kubestack):
    name = f"cols-{uuid.uuid4().hex[:6]}"
    doc = make(**{"metadata": {"name": name, "namespace": "default"}})
    status, _ = kubestack.request("POST", "/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs", doc)
    assert status == 201
    status, body = kubestack.request(
        "PATCH", f"/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/{name}/status",
        {"status": {"phase": "Running", "progress": {"percent": 40, "loss": 1.25, "evalLoss": 1.5,
                                                    "eta": "3m05s"}}},
        content_type="application/merge-patch+json")
    assert status == 200, body.get("message")
    header, row = kubestack.kubectl("get", "ftj", name, "-n", "default").stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "STRATEGY", "WORKERS", "PROGRESS", "LOSS", "EVAL",
                              "ETA", "AGE"], header
    assert row.split()[:8] == [name, "Running", doc["spec"]["strategy"]["type"],
                               str(doc["spec"]["resources"]["workers"]), "40", "1.25", "1.5",
                               "3m05s"], row
