"""`finetune render job.yaml`: the objects the operator would create for a job, offline."""

from __future__ import annotations

from typing import Any

from finetune_api.model import FineTuneJob

from .raycluster import build_raycluster
from .settings import Settings


def render_job(job: FineTuneJob, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The RayCluster, in the job's namespace (its auth-token Secret is KubeRay's to make).

    The owner reference to the FineTuneJob is added at creation time (it needs the job's
    uid), so it is absent here unless the document carries a uid.
    """
    cluster = build_raycluster(job, settings or Settings())
    if job.namespace:
        cluster["metadata"]["namespace"] = job.namespace
    if job.uid:
        cluster["metadata"]["ownerReferences"] = [{
            "apiVersion": job.document.get("apiVersion"), "kind": job.document.get("kind"),
            "name": job.name, "uid": job.uid, "controller": True, "blockOwnerDeletion": True}]
    return [cluster]
