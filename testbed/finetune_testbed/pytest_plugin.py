"""The harness's pytest fixtures; tests/conftest.py loads them (`pytest_plugins`).

- `kube`: a fresh API emulator per test (`finetune_testbed.kube.Kube`).
- `ray_head`: a real Ray head with token auth for the session (`.dashboard_url`, `.token`,
  `.headers`). Suites whose Ray jobs need S3 credentials override it to start after `s3_server`.
- `kuberay`: the KubeRay stand-in: RayClusters in `kube` become ready and point at `ray_head`.
- `s3_server`: a moto S3 server for the session, fake credentials in the environment, bucket
  `finetune-test` (`finetune_testbed.s3.S3Server`).
- `mlflow_server`: a real MLflow tracking server on loopback for the session, sqlite in a
  temporary folder (`finetune_testbed.mlflow_server.MlflowServer`: `.uri`, `.client()`).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# The parts are imported inside the fixtures: suites that use none of them (the API's, the
# chart's) do not pay for kmock, aiohttp or moto.
if TYPE_CHECKING:
    from .kube import Kube
    from .kuberay_standin import KubeRayStandIn
    from .mlflow_server import MlflowServer
    from .ray_head import RayHead
    from .s3 import S3Server


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    from .kube import running_kube

    with running_kube(tmp_path) as running:
        yield running


@pytest.fixture(scope='session')
def ray_head() -> Iterator[RayHead]:
    from .ray_head import start_ray_head, stop_ray_head

    head = start_ray_head()
    try:
        yield head
    finally:
        stop_ray_head(head)


@pytest.fixture
def kuberay(kube: Kube, ray_head: RayHead) -> Iterator[KubeRayStandIn]:
    from .kuberay_standin import HeadAddress, KubeRayStandIn

    address = HeadAddress('127.0.0.1', ray_head.gcs_port, ray_head.dashboard_port, ray_head.client_port, ray_head.token)
    with KubeRayStandIn(kube.url, kube.add_identity('kuberay-operator'), address) as standin:
        yield standin


@pytest.fixture(scope='session')
def s3_server() -> Iterator[S3Server]:
    from .s3 import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture(scope='session')
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    from .mlflow_server import mlflow_server as start

    with start(tmp_path_factory.mktemp('mlflow')) as server:
        yield server
