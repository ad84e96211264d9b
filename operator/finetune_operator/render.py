"""`finetune render job.yaml`: the objects the operator would create for a job, offline."""

from __future__ import annotations

from typing import Any

from finetune_api.model import FineTuneJob

from .raycluster import auth_secret_name, build_auth_secret, build_raycluster
from .settings import Settings


def render_job(job: FineTuneJob, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The RayCluster and its auth-token Secret (the token elided), in the job's namespace.

    The owner reference to the FineTuneJob is added at creation time (it needs the job's
    uid), so it is absent here unless the document carries a uid.
    """
    settings = settings or Settings()
    secret = build_auth_secret(job, None)
    cluster = build_raycluster(job, settings, auth_secret=auth_secret_name(job))
    objects = [cluster, secret]
    for obj in objects:
        if job.namespace:
            obj["metadata"]["namespace"] = job.namespace
        if job.uid:
            obj["metadata"]["ownerReferences"] = [{
                "apiVersion": job.document.get("apiVersion"), "kind": job.document.get("kind"),
                "name": job.name, "uid": job.uid, "controller": True,
                "blockOwnerDeletion": True}]
    secret["data"] = {}
    secret["metadata"].setdefault("annotations", {})[
        "finetune.dev/note"] = "auth_token is generated once by the operator (32 random bytes)"
    return objects
