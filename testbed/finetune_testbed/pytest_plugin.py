"""The harness's pytest fixtures; tests/conftest.py loads them (`pytest_plugins`).

- `kube`: a fresh API emulator per test (`finetune_testbed.kube.Kube`).
- `ray_head`: a real Ray head with token auth for the session (`.dashboard_url`, `.token`,
  `.headers`). Suites whose Ray jobs need S3 credentials override it to start after `s3_server`.
- `kuberay`: the KubeRay stand-in: RayClusters in `kube` become ready and point at `ray_head`.
- `s3_server`: a moto S3 server for the session, fake credentials in the environment, bucket
  `finetune-test` (`finetune_testbed.s3.S3Server`).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .kube import Kube, running_kube
from .kuberay_standin import HeadAddress, KubeRayStandIn
from .ray_head import RayHead, start_ray_head, stop_ray_head
from .s3 import S3Server, moto_server


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    with running_kube(tmp_path) as running:
        yield running


@pytest.fixture(scope='session')
def ray_head() -> Iterator[RayHead]:
    head = start_ray_head()
    try:
        yield head
    finally:
        stop_ray_head(head)


@pytest.fixture
def kuberay(kube: Kube, ray_head: RayHead) -> Iterator[KubeRayStandIn]:
    address = HeadAddress('127.0.0.1', ray_head.gcs_port, ray_head.dashboard_port, ray_head.client_port, ray_head.token)
    with KubeRayStandIn(kube.url, kube.add_identity('kuberay-operator'), address) as standin:
        yield standin


@pytest.fixture(scope='session')
def s3_server() -> Iterator[S3Server]:
    with moto_server() as server:
        yield server
