"""Plays KubeRay's part against the emulator: RayClusters become ready, pointing at a real local
Ray head; token-auth Secrets are created or read as KubeRay does.

It is a real API client (its own bearer token, identity `kuberay-operator`), watching
`ray.io/v1 rayclusters` cluster-wide over HTTP on its own thread and event loop, so everything it
does goes through the emulator's admission, watch and garbage-collection paths.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
import secrets
import threading
from typing import Any

import aiohttp

RAYCLUSTERS = '/apis/ray.io/v1/rayclusters'


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


@dataclasses.dataclass(frozen=True)
class HeadAddress:
    """Where the (shared, local) Ray head listens; published in every ready RayCluster's status."""
    host: str = '127.0.0.1'
    gcs_port: int = 6379
    dashboard_port: int = 8265
    client_port: int = 10001
    token: str | None = None  # the head's auth token, when it runs with RAY_AUTH_MODE=token


class KubeRayStandIn:
    def __init__(self, url: str, token: str, head: HeadAddress, *, ready_delay: float = 0.2) -> None:
        self.url, self.token, self.head, self.ready_delay = url.rstrip('/'), token, head, ready_delay
        self.loop: asyncio.AbstractEventLoop | None = None
        self._broken: set[str] = set()  # uids a test broke: never made ready again
        self._provisioning: dict[str, asyncio.Task[None]] = {}
        self._thread = threading.Thread(target=self._run, name='kuberay-standin', daemon=True)
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self.errors: list[BaseException] = []

    # -- lifecycle --

    def start(self) -> KubeRayStandIn:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError('the KubeRay stand-in did not start')
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> KubeRayStandIn:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        headers = {'Authorization': f'Bearer {self.token}'}
        async with aiohttp.ClientSession(self.url, headers=headers) as session:
            self._session = session
            watcher = asyncio.create_task(self._watch_forever(session))
            self._started.set()
            await self._stop.wait()
            watcher.cancel()
            for task in [watcher, *self._provisioning.values()]:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    # -- the controller --

    async def _watch_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                async with session.get(RAYCLUSTERS) as response:
                    listing = await response.json()
                for obj in listing['items']:
                    self._reconcile(obj)
                params = {'watch': 'true', 'allowWatchBookmarks': 'true',
                          'resourceVersion': listing['metadata']['resourceVersion']}
                async with session.get(RAYCLUSTERS, params=params, timeout=aiohttp.ClientTimeout(total=None)) as response:
                    async for line in response.content:
                        event = json.loads(line)
                        if event['type'] in ('ADDED', 'MODIFIED'):
                            self._reconcile(event['object'])
                        elif event['type'] == 'ERROR':
                            break  # 410 Gone: relist
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the emulator restarting or a bug: keep it visible, retry
                self.errors.append(exc)
                await asyncio.sleep(0.2)

    def _reconcile(self, cluster: dict[str, Any]) -> None:
        meta, status = cluster['metadata'], cluster.get('status') or {}
        uid = meta['uid']
        if meta.get('deletionTimestamp') or uid in self._broken:
            return
        wanted = 'suspended' if (cluster.get('spec') or {}).get('suspend') else 'ready'
        if status.get('state') == wanted and status.get('observedGeneration') == meta.get('generation'):
            return
        task = self._provisioning.get(uid)
        if task is None or task.done():
            self._provisioning[uid] = asyncio.create_task(self._provision(cluster, wanted))

    async def _provision(self, cluster: dict[str, Any], wanted: str) -> None:
        meta, spec = cluster['metadata'], cluster.get('spec') or {}
        namespace, name = meta['namespace'], meta['name']
        reason = None
        auth = spec.get('authOptions')
        if auth is not None and auth.get('mode', 'token') == 'token':
            reason = await self._ensure_auth_secret(cluster, auth)
        await asyncio.sleep(self.ready_delay)
        if meta['uid'] in self._broken:
            return
        if reason is not None:
            await self._patch_status(namespace, name, {'state': 'failed', 'reason': reason})
            return
        workers = spec.get('workerGroupSpecs') or []
        replicas = sum(int(group.get('replicas', group.get('minReplicas', 0)) or 0) for group in workers)
        ready = wanted == 'ready'
        await self._patch_status(namespace, name, {
            'state': wanted,
            'reason': None,
            'observedGeneration': meta.get('generation'),
            'lastUpdateTime': _now(),
            'stateTransitionTimes': {wanted: _now()},
            'desiredWorkerReplicas': replicas,
            'minWorkerReplicas': sum(int(g.get('minReplicas', 0) or 0) for g in workers),
            'maxWorkerReplicas': sum(int(g.get('maxReplicas', 0) or 0) for g in workers),
            'readyWorkerReplicas': replicas if ready else 0,
            'availableWorkerReplicas': replicas if ready else 0,
            'head': {'podIP': self.head.host, 'serviceIP': self.head.host,
                     'podName': f'{name}-head-{secrets.token_hex(3)[:5]}', 'serviceName': f'{name}-head-svc'},
            'endpoints': {'client': str(self.head.client_port), 'dashboard': str(self.head.dashboard_port),
                          'gcs-server': str(self.head.gcs_port), 'metrics': '8080'},
            'conditions': [
                {'type': 'HeadPodReady', 'status': 'True' if ready else 'False', 'reason': 'HeadPodRunningAndReady',
                 'message': '', 'lastTransitionTime': _now()},
                {'type': 'RayClusterProvisioned', 'status': 'True', 'reason': 'AllPodRunningAndReadyFirstTime',
                 'message': '', 'lastTransitionTime': _now()},
            ],
        })

    async def _ensure_auth_secret(self, cluster: dict[str, Any], auth: dict[str, Any]) -> str | None:
        """KubeRay's token auth: use `secretName`'s `auth_token`, or create a Secret named after the
        cluster, owned by it. The real head has one fixed token, so that is the token stored; a
        user Secret with another token cannot work against it and fails the cluster visibly."""
        meta = cluster['metadata']
        namespace = meta['namespace']
        secret_name = auth.get('secretName')
        if secret_name:
            async with self._session.get(f'/api/v1/namespaces/{namespace}/secrets/{secret_name}') as response:
                if response.status == 404:
                    return f'auth secret {secret_name} not found'
                secret = await response.json()
            token = base64.b64decode((secret.get('data') or {}).get('auth_token', '')).decode()
            if self.head.token is not None and token != self.head.token:
                return f'auth secret {secret_name} holds a token the Ray head does not accept'
            return None
        token = self.head.token or secrets.token_urlsafe(32)
        body = {'apiVersion': 'v1', 'kind': 'Secret', 'type': 'Opaque',
                'metadata': {'name': meta['name'], 'namespace': namespace,
                             'labels': {'ray.io/cluster': meta['name']},
                             'ownerReferences': [{'apiVersion': 'ray.io/v1', 'kind': 'RayCluster', 'name': meta['name'],
                                                  'uid': meta['uid'], 'controller': True, 'blockOwnerDeletion': True}]},
                'data': {'auth_token': base64.b64encode(token.encode()).decode()}}
        async with self._session.post(f'/api/v1/namespaces/{namespace}/secrets', json=body) as response:
            if response.status not in (201, 409):
                return f'creating the auth secret failed: HTTP {response.status}'
        return None

    async def _patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        async with self._session.patch(f'{RAYCLUSTERS.replace("/rayclusters", "")}/namespaces/{namespace}/rayclusters/{name}/status',
                                       data=json.dumps({'status': status}),
                                       headers={'Content-Type': 'application/merge-patch+json'}) as response:
            if response.status not in (200, 404):  # 404: deleted meanwhile
                raise RuntimeError(f'status patch of {namespace}/{name}: HTTP {response.status}: {await response.text()}')

    # -- test hooks --

    def break_cluster(self, namespace: str, name: str, *, delete: bool = False) -> None:
        """The head is lost: the cluster goes `failed` (and stays so), or disappears with delete=True."""
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self._break(namespace, name, delete), self.loop).result(30)

    async def _break(self, namespace: str, name: str, delete: bool) -> None:
        path = f'/apis/ray.io/v1/namespaces/{namespace}/rayclusters/{name}'
        async with self._session.get(path) as response:
            if response.status == 404:
                return
            cluster = await response.json()
        self._broken.add(cluster['metadata']['uid'])
        if delete:
            async with self._session.delete(path):
                return
        await self._patch_status(namespace, name, {
            'state': 'failed', 'reason': 'HeadPodLost', 'readyWorkerReplicas': 0, 'availableWorkerReplicas': 0,
            'lastUpdateTime': _now(),
            'conditions': [{'type': 'HeadPodReady', 'status': 'False', 'reason': 'HeadPodNotFound',
                            'message': 'the head pod is gone', 'lastTransitionTime': _now()},
                           {'type': 'RayClusterProvisioned', 'status': 'True', 'reason': 'AllPodRunningAndReadyFirstTime',
                            'message': '', 'lastTransitionTime': _now()}],
        })
