"""`finetune render` on every example: what the operator would create is valid for KubeRay.

The RayCluster goes through the emulator's admission with KubeRay's own CRD (reference data
at ../shared/kuberay, defaults applied first as the API server does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY_CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayclusters.yaml"
JOB_FILES = sorted(p for p in (ROOT / "examples").glob("*.yaml")
                   if any(d and d.get("kind") == "FineTuneJob"
                          for d in yaml.safe_load_all(p.read_text())))


@pytest.fixture(scope="module")
def kuberay_admission():
    if not KUBERAY_CRD.exists():
        pytest.skip(f"KubeRay's CRD (reference data) is missing at {KUBERAY_CRD}")
    from kube.schema_validation import CrdSchemaValidator
    return CrdSchemaValidator.from_file(KUBERAY_CRD, "v1")


def test_there_are_job_examples():
    assert len(JOB_FILES) >= 5


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_rendered_raycluster_is_admitted_by_kuberay_crd(path, kuberay_admission):
    result = subprocess.run([sys.executable, "-m", "finetune_cli", "render", str(path),
                             "--image", "registry.example/finetune-trainer:0.1.0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    manifests = list(yaml.safe_load_all(result.stdout))
    assert [m["kind"] for m in manifests] == ["RayCluster"]
    (cluster,) = manifests
    kuberay_admission.admit(cluster)  # raises AdmissionError with the offending fields
    assert cluster["spec"]["authOptions"] == {"mode": "token"}  # KubeRay makes the token
