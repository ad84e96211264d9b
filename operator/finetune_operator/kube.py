"""A small typed async client for the few Kubernetes objects the operator touches directly.

kopf watches FineTuneJobs; this client reads and writes what kopf's handlers do not give
for free: RayClusters (ray.io/v1), Secrets, Events, and the FineTuneJob's own status and
metadata. It uses the same aiohttp session as kopf (see `main.login`), so the operator keeps
one connection pool and one set of credentials.
"""

from __future__ import annotations

import base64
import json
import ssl
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from finetune_api import GROUP, PLURAL, VERSION

from .raycluster import RAY_GROUP, RAY_PLURAL

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: the object already exists, or a resourceVersion precondition failed."""


API_CONNECTIONS = 64


def session_for(info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
    """An aiohttp session with a ConnectionInfo's TLS and credentials, as kopf builds one."""
    context: ssl.SSLContext | bool
    context = info.as_ssl_context() if info.server.startswith("https") else False
    # A bounded pool: with no limit, a burst of new jobs (one pass each, all at once) opened
    # a connection per pass and kept them all alive (1,000 jobs: ~1,000 idle connections,
    # most of the operator's memory above kopf's own). The watches hold a few of these.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=API_CONNECTIONS, ssl=context),
        headers=info.as_http_headers(),
        trust_env=info.trust_env,
    )


class KubeClient:
    def __init__(self, session: aiohttp.ClientSession | None, server: str = "",
                 timeout: float = 60.0, instance: str = "finetune-operator"):
        self._session = session
        # This replica (its pod's name): Events say which of the hot standbys acted.
        self.instance = instance
        self._server = server.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    @property
    def server(self) -> str:
        return self._server

    def rebind(self, session: aiohttp.ClientSession, server: str) -> None:
        """Switch to a new session after a re-login (kopf closes the invalidated one)."""
        self._session = session
        self._server = server.rstrip("/")

    async def _request(self, method: str, path: str, *, body: Any = None,
                       params: dict[str, str] | None = None,
                       content_type: str = "application/json") -> Any:
        if self._session is None:
            raise KubeError(0, "not logged in to the Kubernetes API yet")
        url = self._server + path + (("?" + urlencode(params)) if params else "")
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(method, url, data=data, headers=headers,
                                         timeout=self._timeout) as resp:
            text = await resp.text()
            if resp.status == 404:
                raise NotFound(404, f"{method} {path}")
            if resp.status == 409:
                raise Conflict(409, _message(text))
            if resp.status >= 400:
                raise KubeError(resp.status, f"{method} {path}: {_message(text)}")
            return json.loads(text) if text else None

    # Paths.
    @staticmethod
    def _ns_path(api: str, namespace: str, plural: str, name: str | None = None) -> str:
        path = f"{api}/namespaces/{quote(namespace)}/{plural}"
        return path + (f"/{quote(name)}" if name else "")

    @classmethod
    def _core(cls, namespace: str, plural: str, name: str | None = None) -> str:
        return cls._ns_path("/api/v1", namespace, plural, name)

    @classmethod
    def _ray(cls, namespace: str, name: str | None = None) -> str:
        return cls._ns_path(f"/apis/{RAY_GROUP}/v1", namespace, RAY_PLURAL, name)

    @classmethod
    def _ftj(cls, namespace: str, name: str | None = None) -> str:
        return cls._ns_path(f"/apis/{GROUP}/{VERSION}", namespace, PLURAL, name)

    async def _get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", path)
        except NotFound:
            return None

    async def _delete(self, path: str) -> bool:
        try:
            await self._request("DELETE", path, body={
                "kind": "DeleteOptions", "apiVersion": "v1",
                "propagationPolicy": "Background"})
            return True
        except NotFound:
            return False

    # RayClusters.
    async def get_raycluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(self._ray(namespace, name))

    async def create_raycluster(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", self._ray(namespace), body=body)

    async def delete_raycluster(self, namespace: str, name: str) -> bool:
        return await self._delete(self._ray(namespace, name))

    # What KubeRay and the scheduler say about a RayCluster that does not come up.
    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        data = await self._request("GET", self._core(namespace, "pods"),
                                   params={"labelSelector": label_selector})
        return (data or {}).get("items") or []

    async def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        data = await self._request("GET", self._core(namespace, "events"),
                                   params={"fieldSelector": field_selector})
        return (data or {}).get("items") or []

    # Secrets.
    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get_or_none(self._core(namespace, "secrets", name))

    # FineTuneJobs.
    async def patch_job_status(self, namespace: str, name: str,
                               status: dict[str, Any]) -> dict[str, Any]:
        return await self._request("PATCH", self._ftj(namespace, name) + "/status",
                                   body={"status": status}, content_type=MERGE_PATCH)

    async def delete_job(self, namespace: str, name: str) -> bool:
        return await self._delete(self._ftj(namespace, name))

    # Events.
    async def post_event(self, involved: dict[str, Any], *, type: str, reason: str,
                         message: str, component: str = "finetune-operator") -> None:
        """A core/v1 Event about `involved` (a body): what `kubectl describe` shows."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'finetunejob')}.",
                         "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                "name": meta.get("name"), "namespace": namespace, "uid": meta.get("uid"),
            },
            "reason": reason,
            # Events are capped at 1 KiB of message by convention.
            "message": message[:1024],
            "type": type,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": self.instance,
            "firstTimestamp": now, "lastTimestamp": now, "eventTime": now,
            "action": reason,
        }
        await self._request("POST", self._core(namespace, "events"), body=body)


def _message(text: str) -> str:
    try:
        return json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        return text[:500]


def secret_value(secret: dict[str, Any], key: str) -> str | None:
    """A Secret's value (data is base64; stringData is accepted for emulators)."""
    data = secret.get("data") or {}
    if key in data and data[key] is not None:
        return base64.b64decode(data[key]).decode()
    return (secret.get("stringData") or {}).get(key)
