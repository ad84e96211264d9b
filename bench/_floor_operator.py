"""The FLOOR of the operator benchmark: the least a kopf operator can do per FineTuneJob.

One create handler that creates one RayCluster (the same shape as the project's: a head group and
one worker group) and sets `status.phase` to Running in kopf's own patch. Everything else is kopf's
defaults, minus the traps that would make the floor slower than kopf can be:
- one aiohttp session for the handler's calls, not a client per call;
- no Events for kopf's log lines (`posting.enabled = False`);
- no namespace/CRD observation (`scanning.disabled`: one exact namespace needs none);
- `queueing.worker_limit` left unlimited (a limit without a short `idle_timeout` caps throughput
  at limit / 5 s).

    KUBECONFIG=... BENCH_KUBE_URL=... BENCH_KUBE_TOKEN=... [BENCH_KUBE_CA=ca.crt] \
        kopf run --standalone --namespace NS bench/_floor_operator.py

BENCH_KUBE_CA: the CA of a real API server's serving certificate (the emulator is plain HTTP).
"""
from __future__ import annotations

import os
import ssl
from typing import Any

import aiohttp
import kopf

SESSION: dict[str, aiohttp.ClientSession] = {}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False
    # One exact namespace: nothing to observe. Otherwise kopf lists namespaces, which the
    # chart's grants (bench operator_scale --stack real) refuse, and retries that 403 for ~55 s.
    settings.scanning.disabled = True
    # Own annotations for kopf's bookkeeping, as the project's operator does: the FineTuneJob
    # schema has no room for kopf's status fields under strict field validation.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="floor.bench")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="floor.bench", key="last-handled-configuration")
    settings.persistence.finalizer = "floor.bench/finalizer"
    SESSION["s"] = aiohttp.ClientSession(
        os.environ["BENCH_KUBE_URL"],
        headers={"Authorization": f"Bearer {os.environ['BENCH_KUBE_TOKEN']}"},
        connector=aiohttp.TCPConnector(limit=0, ssl=ssl.create_default_context(
            cafile=os.environ["BENCH_KUBE_CA"]) if os.environ.get("BENCH_KUBE_CA") else True))


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if "s" in SESSION:
        await SESSION.pop("s").close()


def raycluster(name: str) -> dict[str, Any]:
    container = {"name": "ray-head", "image": "ghcr.io/finetune-operator/trainer:0.1.0",
                 "resources": {"requests": {"cpu": "1", "memory": "4Gi"},
                               "limits": {"cpu": "1", "memory": "4Gi"}}}
    worker = {**container, "name": "ray-worker"}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": name, "labels": {"finetune.dev/job": name}},
        "spec": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},
                              "template": {"spec": {"containers": [container]}}},
            "workerGroupSpecs": [{"groupName": "workers", "replicas": 1, "minReplicas": 1,
                                  "maxReplicas": 1, "rayStartParams": {},
                                  "template": {"spec": {"containers": [worker]}}}],
        },
    }


@kopf.on.create("finetune.dev", "v1alpha1", "finetunejobs")
async def create(body: kopf.Body, name: str, namespace: str, patch: kopf.Patch, **_: Any) -> None:
    cluster = raycluster(name)
    kopf.adopt(cluster, owner=body)
    async with SESSION["s"].post(f"/apis/ray.io/v1/namespaces/{namespace}/rayclusters",
                                 json=cluster) as resp:
        if resp.status not in (201, 409):
            raise kopf.TemporaryError(f"RayCluster create: HTTP {resp.status}: {await resp.text()}",
                                      delay=1)
    patch.status["phase"] = "Running"
