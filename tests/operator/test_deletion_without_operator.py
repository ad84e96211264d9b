"""A job deleted while no operator runs stays Terminating until an operator returns
(docs/operations.md): kopf's finalizer holds it, and the returning operator's clean-up pass
deletes its RayCluster and lets it go. Against the API emulator, without Ray."""

from __future__ import annotations

import pytest

from conftest import NAMESPACE, wait_until
from finetune_operator.settings import FINALIZER
from operator_jobs import document

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FTJ = ("finetune.dev/v1alpha1", "finetunejobs")
RC = ("ray.io/v1", "rayclusters")


def test_a_job_deleted_while_no_operator_runs_waits_for_one(kube, start_operator):
    name = "orphan"
    kube.create(document(**{"metadata.name": name, "metadata.namespace": NAMESPACE,
                            "metadata.uid": None, "metadata.generation": None,
                            "spec.s3.secretRef": None}), "finetunejobs")
    op = start_operator()
    wait_until(lambda: kube.get_or_none(*RC, name, NAMESPACE), 30, what="the RayCluster")
    assert FINALIZER in kube.get(*FTJ, name, NAMESPACE)["metadata"]["finalizers"]
    op.stop()

    kube.delete(*FTJ, name, NAMESPACE)
    job = kube.get_or_none(*FTJ, name, NAMESPACE)
    assert job is not None and job["metadata"].get("deletionTimestamp"), "Terminating"
    assert kube.get_or_none(*RC, name, NAMESPACE) is not None, "its cluster is still there"

    start_operator()
    wait_until(lambda: kube.get_or_none(*FTJ, name, NAMESPACE) is None, 60,
               what="the job to go once an operator runs")
    assert kube.get_or_none(*RC, name, NAMESPACE) is None
