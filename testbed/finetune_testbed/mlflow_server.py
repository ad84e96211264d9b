"""A real MLflow tracking server for tests: `mlflow server` on loopback, its runs in a sqlite
file under a temporary folder, stopped (with its workers) when the block ends."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .ports import free_port
from .ray_head import VENV_BIN

START_TIMEOUT_S = 300  # the server imports much of MLflow before it answers; slow on a busy box


@dataclasses.dataclass
class MlflowServer:
    uri: str
    log: Path

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[MlflowServer]:
    port = free_port()
    log_path = workdir / 'mlflow.log'
    artifacts = workdir / 'artifacts'
    artifacts.mkdir(parents=True, exist_ok=True)
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / 'mlflow'), 'server', '--host', '127.0.0.1', '--port', str(port), '--workers', '1',
             '--backend-store-uri', f'sqlite:///{workdir / "mlflow.db"}', '--default-artifact-root', str(artifacts)],
            stdout=log, stderr=log, start_new_session=True, env={**os.environ, 'MLFLOW_TRACKING_URI': ''})
    uri = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f'mlflow server exited with {proc.returncode}; see {log_path}')
            try:
                urllib.request.urlopen(f'{uri}/health', timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f'mlflow server did not answer in {START_TIMEOUT_S}s; see {log_path}') from None
                time.sleep(0.3)
        yield MlflowServer(uri=uri, log=log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
