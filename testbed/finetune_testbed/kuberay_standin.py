"""Plays KubeRay's part against the emulator: RayClusters become ready, pointing at a real local
Ray head; token-auth Secrets are created as KubeRay does.

It reports what the real KubeRay v1.5.1 reports (pinned in tests/realkube/test_kuberay_reports.py,
listed in docs/install.md): `state: ready` with the conditions `HeadPodReady` and
`RayClusterProvisioned`; a lost head turns `HeadPodReady` False with `state` still `ready`, and
comes back as a new head pod; `state: failed` is never written. The token Secret is named after
the cluster and owned by it; a Secret of that name left by an earlier cluster (not yet
garbage-collected) is waited out and then made anew, as KubeRay (which owns Secrets) does.

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
        self._head_down: set[str] = set()  # uids whose head a test took down (lose_head)
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
        if meta.get('deletionTimestamp') or uid in self._head_down:
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
        auth = spec.get('authOptions')
        if auth is not None and auth.get('mode', 'token') == 'token':
            await self._ensure_auth_secret(cluster)
        await asyncio.sleep(self.ready_delay)
        if meta['uid'] in self._head_down:
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

    async def _ensure_auth_secret(self, cluster: dict[str, Any]) -> None:
        """KubeRay's token auth: a Secret named after the cluster, owned by it, key `auth_token`.
        The real head has one fixed token, so that is the token stored."""
        meta = cluster['metadata']
        namespace, name = meta['namespace'], meta['name']
        path = f'/api/v1/namespaces/{namespace}/secrets/{name}'
        while True:
            async with self._session.get(path) as response:
                if response.status == 404:
                    break
                secret = await response.json()
            if any(o.get('uid') == meta['uid'] for o in secret['metadata'].get('ownerReferences') or []):
                return
            await asyncio.sleep(0.1)  # an earlier cluster's, until the garbage collector takes it
        token = self.head.token or secrets.token_urlsafe(32)
        body = {'apiVersion': 'v1', 'kind': 'Secret', 'type': 'Opaque',
                'metadata': {'name': name, 'namespace': namespace,
                             'labels': {'ray.io/cluster': name},
                             'ownerReferences': [{'apiVersion': 'ray.io/v1', 'kind': 'RayCluster', 'name': name,
                                                  'uid': meta['uid'], 'controller': True, 'blockOwnerDeletion': True}]},
                'data': {'auth_token': base64.b64encode(token.encode()).decode()}}
        async with self._session.post(f'/api/v1/namespaces/{namespace}/secrets', json=body) as response:
            if response.status not in (201, 409):
                raise RuntimeError(f'creating the auth secret of {namespace}/{name}: HTTP {response.status}')

    async def _patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        async with self._session.patch(f'{RAYCLUSTERS.replace("/rayclusters", "")}/namespaces/{namespace}/rayclusters/{name}/status',
                                       data=json.dumps({'status': status}),
                                       headers={'Content-Type': 'application/merge-patch+json'}) as response:
            if response.status not in (200, 404):  # 404: deleted meanwhile
                raise RuntimeError(f'status patch of {namespace}/{name}: HTTP {response.status}: {await response.text()}')

    # -- test hooks --

    def lose_head(self, namespace: str, name: str) -> None:
        """The head pod dies (an OOM kill, an eviction): `HeadPodReady` turns False, `state`
        stays `ready` (KubeRay >= 1.2). The cluster stays so until `replace_head`."""
        self._call(self._lose_head(namespace, name))

    def replace_head(self, namespace: str, name: str) -> None:
        """KubeRay's new head pod is ready: a new pod name, `HeadPodReady` True again."""
        self._call(self._replace_head(namespace, name))

    def _call(self, coroutine: Any) -> None:
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    async def _get_cluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        async with self._session.get(f'/apis/ray.io/v1/namespaces/{namespace}/rayclusters/{name}') as response:
            return None if response.status == 404 else await response.json()

    def _conditions(self, head_ready: bool, message: str = '') -> list[dict[str, Any]]:
        return [{'type': 'HeadPodReady', 'status': 'True' if head_ready else 'False',
                 'reason': 'HeadPodRunningAndReady' if head_ready else 'ContainersNotReady',
                 'message': message, 'lastTransitionTime': _now()},
                {'type': 'RayClusterProvisioned', 'status': 'True', 'reason': 'AllPodRunningAndReadyFirstTime',
                 'message': '', 'lastTransitionTime': _now()}]

    async def _lose_head(self, namespace: str, name: str) -> None:
        cluster = await self._get_cluster(namespace, name)
        if cluster is None:
            return
        self._head_down.add(cluster['metadata']['uid'])
        await self._patch_status(namespace, name, {
            'lastUpdateTime': _now(),
            'conditions': self._conditions(False, 'containers with unready status: [ray-head]')})

    async def _replace_head(self, namespace: str, name: str) -> None:
        cluster = await self._get_cluster(namespace, name)
        if cluster is None:
            return
        self._head_down.discard(cluster['metadata']['uid'])
        head = dict(cluster['status']['head'], podName=f'{name}-head-{secrets.token_hex(3)[:5]}')
        await self._patch_status(namespace, name, {'lastUpdateTime': _now(), 'head': head,
                                                   'conditions': self._conditions(True)})
