"""What the operator holds while it runs: its HTTP sessions, API client, metrics, reconciler.

Started by kopf's startup handler and closed by its cleanup handler (main.py); the login
handler binds the API client to kopf's credentials.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import aiohttp
import kopf

from .kube import KubeClient, session_for
from .metrics import Metrics
from .reconcile import Reconciler
from .settings import Settings

logger = logging.getLogger("finetune_operator")


class Runtime:
    def __init__(self, settings: Settings, connection: kopf.ConnectionInfo | None) -> None:
        self.settings = settings
        # Given by tests that run the operator in-process; else kopf's own login finds one.
        self.connection = connection
        # A session without Kubernetes credentials, for the Ray dashboards and S3.
        self.http = aiohttp.ClientSession()
        # POD_ID (the chart's downward API: the pod's name) is also kopf's peering identity.
        self.kube = KubeClient(None, timeout=settings.request_timeout,
                               instance=os.environ.get("POD_ID") or socket.gethostname())
        self.metrics = Metrics()
        self.reconciler = Reconciler(settings, self.kube, self.http, self.metrics)
        self.metrics_server = (self.metrics.serve(settings.metrics_port)
                               if settings.metrics_port else None)
        logger.info("finetune-operator starting: %s", {
            "namespaces": list(settings.namespaces) or "cluster-wide",
            "peering": settings.peering or "standalone",
            "reconcile_interval": settings.reconcile_interval})

    def login(self, kopf_settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.AiohttpSession:
        info = self.connection \
            or kopf.login_with_service_account(settings=kopf_settings, **kwargs) \
            or kopf.login_with_kubeconfig(settings=kopf_settings, **kwargs)
        if info is None:
            raise kopf.LoginError("No Kubernetes credentials: neither a service account "
                                  "nor a kubeconfig was found")
        # One session for kopf's watches and patches and for the operator's own calls.
        session = session_for(info)
        self.kube.rebind(session, info.server)
        return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                                   aiohttp_session=session, priority=info.priority)

    async def close(self) -> None:
        await self.reconciler.events.close(timeout=5.0)
        if self.metrics_server is not None:
            server, _thread = self.metrics_server
            server.shutdown()
            server.server_close()
        await self.http.close()
