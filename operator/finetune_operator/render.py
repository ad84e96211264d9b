"""`finetune render job.yaml`: the objects the operator would create for a job, offline."""

from __future__ import annotations

from typing import Any

from finetune_api.model import FineTuneJob

from .raycluster import build_raycluster
from .settings import Settings


def render_job(job: FineTuneJob, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The RayCluster, exactly as the operator creates it for this document (its auth-token
    Secret is KubeRay's to make). The owner reference needs the job's uid, so a document
    without one (a file not yet applied) renders without it."""
    return [build_raycluster(job, settings or Settings())]
