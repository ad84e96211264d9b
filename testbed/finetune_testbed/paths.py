"""Where the harness finds the project's files and the reference data kept beside them."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_CRD = REPO_ROOT / 'crds' / 'finetune.dev_finetunejobs.yaml'
# KubeRay's RayCluster CRD is reference data kept beside the project, not in it
# (../shared/kuberay/README.md); a checkout that is not beside it (a git worktree) names the
# folder that holds `kuberay/` with FINETUNE_REFERENCE_DIR.
REFERENCE_DIR = Path(os.environ.get('FINETUNE_REFERENCE_DIR') or REPO_ROOT.parent / 'shared')
KUBERAY_CRD = REFERENCE_DIR / 'kuberay' / 'ray.io_rayclusters.yaml'
