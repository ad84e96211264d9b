"""A small async client for the Ray Jobs HTTP API of a RayCluster's dashboard.

Endpoints (Ray's `dashboard/modules/job/job_head.py`): POST /api/jobs/ submits,
GET /api/jobs/{id} describes, GET /api/jobs/{id}/logs returns the whole log,
POST /api/jobs/{id}/stop stops. A second submit with an existing submission id is refused
by Ray ("already exists"): the submission id is the operator's guard against submitting a
job twice (the reconciler submits only after a lookup in the same pass found no such job).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

ENTRYPOINT = "finetune-train"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class RayJobsError(Exception):
    """The dashboard answered with an error."""


class DashboardUnreachable(RayJobsError):
    """The dashboard did not answer (connection refused, timeout, 5xx while starting)."""


@dataclass(frozen=True)
class RayJobInfo:
    submission_id: str
    status: str                     # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str = ""
    driver_exit_code: int | None = None
    start_time: int | None = None   # ms since the epoch
    end_time: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RayJobInfo":
        return cls(submission_id=data.get("submission_id") or data.get("job_id") or "",
                   status=data.get("status") or "PENDING",
                   message=data.get("message") or "",
                   driver_exit_code=data.get("driver_exit_code"),
                   start_time=data.get("start_time"), end_time=data.get("end_time"))

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class RayJobsClient:
    """One dashboard: `base_url` such as http://10.0.0.5:8265, `token` for Ray token auth."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str,
                 token: str | None = None, timeout: float = 10.0):
        self._session = session
        self._base = base_url.rstrip("/")
        # Kept out of __repr__ and every message: it is a credential.
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:
        return f"RayJobsClient({self._base!r})"

    async def _request(self, method: str, path: str, *, body: Any = None,
                       allow_404: bool = False) -> Any:
        url = f"{self._base}{path}"
        try:
            async with self._session.request(method, url, json=body, headers=self._headers,
                                             timeout=self._timeout) as resp:
                text = await resp.text()
                if resp.status == 404 and allow_404:
                    return None
                if resp.status >= 500:
                    # Ray answers 500 while its job agent is not up yet ("No available agent
                    # to submit job, please try again later"): transient, like a 503.
                    raise DashboardUnreachable(f"{method} {path}: HTTP {resp.status}: "
                                               f"{text.strip()[-200:]}")
                if resp.status in (401, 403):
                    raise RayJobsError(f"{method} {path}: HTTP {resp.status} (auth token "
                                       "refused)")
                if resp.status >= 400:
                    raise RayJobsError(f"{method} {path}: HTTP {resp.status}: "
                                       f"{text.strip()[-500:]}")
                return json.loads(text) if text else None
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise DashboardUnreachable(f"{method} {path}: {type(e).__name__}: {e}") from e

    async def version(self) -> dict[str, Any]:
        return await self._request("GET", "/api/version")

    async def get(self, submission_id: str) -> RayJobInfo | None:
        data = await self._request("GET", f"/api/jobs/{submission_id}", allow_404=True)
        return None if data is None else RayJobInfo.from_json(data)

    async def submit(self, submission_id: str, env_vars: dict[str, str],
                     metadata: dict[str, str] | None = None,
                     entrypoint: str = ENTRYPOINT) -> str:
        body = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            # The job spec travels as an env var of the driver; it holds no secrets (S3
            # credentials come from the pods' env, by reference to the user's Secret).
            "runtime_env": {"env_vars": env_vars},
            "metadata": metadata or {},
        }
        data = await self._request("POST", "/api/jobs/", body=body)
        return (data or {}).get("submission_id") or submission_id

    async def logs(self, submission_id: str) -> str:
        data = await self._request("GET", f"/api/jobs/{submission_id}/logs", allow_404=True)
        return (data or {}).get("logs") or ""

    async def stop(self, submission_id: str) -> bool:
        """Stop the job; False if there was no such job (nothing to stop)."""
        data = await self._request("POST", f"/api/jobs/{submission_id}/stop", allow_404=True)
        return data is not None
