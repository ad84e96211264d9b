"""A real local Ray head with token authentication, started with `ray start --head`.

Ray 2.60 enables token auth through the environment: RAY_AUTH_MODE=token plus the token in
RAY_AUTH_TOKEN (or a file in RAY_AUTH_TOKEN_PATH). Clients send `Authorization: Bearer <token>`.
The project's venv goes first on PATH: Ray jobs' entrypoints run with the head's environment.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .ports import free_port

VENV_BIN = Path(sys.executable).parent


@dataclasses.dataclass
class RayHead:
    gcs_port: int
    dashboard_port: int
    client_port: int
    token: str
    temp_dir: Path
    env: dict[str, str]

    @property
    def dashboard_url(self) -> str:
        return f'http://127.0.0.1:{self.dashboard_port}'

    @property
    def address(self) -> str:
        return f'127.0.0.1:{self.gcs_port}'

    @property
    def headers(self) -> dict[str, str]:
        return {'Authorization': f'Bearer {self.token}'}


def start_ray_head(num_cpus: int = 2, timeout: float = 180) -> RayHead:
    token = secrets.token_hex(32)
    temp_dir = Path(tempfile.mkdtemp(prefix='ray-', dir='/tmp'))  # short: Ray's socket paths are limited
    env = {**os.environ, 'PATH': f'{VENV_BIN}{os.pathsep}{os.environ.get("PATH", "")}',
           'RAY_AUTH_MODE': 'token', 'RAY_AUTH_TOKEN': token, 'RAY_USAGE_STATS_ENABLED': '0'}
    head = RayHead(free_port(), free_port(), free_port(), token, temp_dir, env)
    try:
        _ray_start(head, num_cpus, timeout)
        _wait_until_jobs_can_run(head, time.monotonic() + timeout)
    except BaseException:
        stop_ray_head(head)  # whatever `ray start` managed to spawn before failing or timing out
        raise
    return head


def _ray_start(head: RayHead, num_cpus: int, timeout: float) -> None:
    result = subprocess.run([str(VENV_BIN / 'ray'), 'start', '--head', f'--port={head.gcs_port}',
                    '--node-ip-address=127.0.0.1', '--dashboard-host=127.0.0.1',
                    f'--dashboard-port={head.dashboard_port}', f'--ray-client-server-port={head.client_port}',
                    # Ray's defaults put each node's dashboard agent on 52365 (metrics on 8080):
                    # another Ray on this host (the trainer tests' ray.init, a benchmark) then
                    # keeps this head's job agent from starting, and every submit answers "No
                    # available agent to submit job". Every port is picked free.
                    f'--dashboard-agent-listen-port={free_port()}', f'--dashboard-agent-grpc-port={free_port()}',
                    f'--runtime-env-agent-port={free_port()}', f'--metrics-export-port={free_port()}',
                    f'--num-cpus={num_cpus}', '--include-dashboard=true', f'--temp-dir={head.temp_dir}',
                    '--disable-usage-stats'],
                   env=head.env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f'ray start failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')


def _wait_until_jobs_can_run(head: RayHead, deadline: float) -> None:
    """The dashboard answers before the head's job agent registers ("No available agent to
    submit job"): a probe job that submits and succeeds proves the job path works end to end."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = None
    while client is None:
        try:
            client = JobSubmissionClient(head.dashboard_url, headers=head.headers)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    submission_id = None
    while submission_id is None:
        try:
            submission_id = client.submit_job(entrypoint='true', submission_id=f'readiness-{secrets.token_hex(4)}')
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            raise TimeoutError('the readiness probe job of the Ray head did not finish')
        time.sleep(0.5)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f'the readiness probe job of the Ray head ended {status}: {client.get_job_logs(submission_id)}')


def _own_pids(temp_dir: Path) -> list[int]:
    """The head's processes: those whose command line names its private temp dir (directly or
    through the session dir under it), that hold a file open under it, or that descend from one
    of those. Ray's agents rename themselves (`ray::DashboardAgent`), so the command line alone
    misses them, and an agent left behind spins a core. `ray stop` would also kill other users'
    Ray on this host."""
    marker = str(temp_dir)
    own: set[int] = set()
    parents: dict[int, int] = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
            parents[pid] = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            if marker in cmdline or any(marker in os.readlink(fd) for fd in (entry / 'fd').iterdir()):
                own.add(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in own} - own
        own |= children
        grew = bool(children)
    return sorted(own)


def stop_ray_head(head: RayHead, grace: float = 10) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _own_pids(head.temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f'/proc/{pid}').exists()]
            time.sleep(0.2)
        if not pids:
            break
    shutil.rmtree(head.temp_dir, ignore_errors=True)
