"""A pass decides from the operator's own last status write, not from kopf's lagging copy.

Under load kopf's watch copy of a job trails the operator's writes; passes that decided from
it re-sent the whole status and re-posted Events for transitions already made (1,969
"- -> Provisioning/Running" transitions for 1,000 jobs in bench/operator_scale). Here two
passes get the same stale body, as a daemon woken before the watch caught up would, against
the API emulator over HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging

import aiohttp

from finetune_operator.kube import KubeClient
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings

from operator_jobs import document

NAMESPACE = "default"
FTJ = ("finetune.dev/v1alpha1", "finetunejobs")


def writes(kube) -> collections.Counter:
    """The operator identity's write calls so far, by (verb, resource[/subresource])."""
    out: collections.Counter = collections.Counter()
    for call, n in kube.recorder.calls.get("operator", {}).items():
        if call.verb in ("create", "patch", "update", "delete"):
            name = f"{call.resource}/{call.subresource}" if call.subresource else call.resource
            out[(call.verb, name)] += n
    return out


def new_job(kube, name: str) -> dict:
    doc = document(**{"metadata.name": name, "metadata.namespace": NAMESPACE,
                      "metadata.uid": None, "metadata.generation": None,
                      "spec.s3.secretRef": None})
    return kube.create(doc, "finetunejobs")


async def two_passes(kube, stale: dict, *, forget_between: bool) -> Reconciler:
    token = kube.add_identity("operator")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        reconciler = Reconciler(Settings(namespaces=(NAMESPACE,)), KubeClient(http, kube.url),
                                http)
        await reconciler.reconcile(copy.deepcopy(stale))
        if forget_between:
            reconciler.forget(f"{NAMESPACE}/{stale['metadata']['name']}")
        await reconciler.reconcile(copy.deepcopy(stale))
        await reconciler.events.close(timeout=10)
        return reconciler


def transitions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]


def test_second_pass_on_a_stale_copy_repeats_no_transition(kube, caplog):
    caplog.set_level(logging.INFO, logger="finetune_operator")
    stale = new_job(kube, "own-writes")  # as created: no status, no accepted spec
    asyncio.run(two_passes(kube, stale, forget_between=False))

    done = writes(kube)
    # The first pass: the RayCluster (no Secret: KubeRay makes the token), a status write with the accepted spec, the
    # ClusterCreating Event. The second saw its own write: the cluster exists now (the
    # message moves on, one more status write) but no phase transition and no Event again.
    assert transitions(caplog) == ["FineTuneJob default/own-writes: - -> Provisioning "
                                   "(Creating the RayCluster)"]
    assert done[("create", "events")] == 1, done
    assert done[("create", "rayclusters")] == 1 and done[("create", "secrets")] == 0, done
    assert done[("patch", "finetunejobs")] == 0, done  # no annotation: it is in the status
    status = kube.get(*FTJ, "own-writes",
                      NAMESPACE)["status"]
    assert status["phase"] == "Provisioning" and status["acceptedSpec"]
    assert status["message"] == "Waiting for the RayCluster to become ready"


def test_without_its_own_write_the_stale_copy_repeats_the_transition(kube, caplog):
    """The control: the same two passes with the memory dropped in between repeat the
    transition and its Event, so the test above can fail."""
    caplog.set_level(logging.INFO, logger="finetune_operator")
    stale = new_job(kube, "no-memory")
    asyncio.run(two_passes(kube, stale, forget_between=True))
    assert len(transitions(caplog)) == 2
    assert writes(kube)[("create", "events")] == 2
