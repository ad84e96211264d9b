"""The operator's settings: what it watches, what it creates, how often it looks.

Every setting has a flag and an environment variable (`FINETUNE_OPERATOR_<NAME>`), so the
same values work from the command line (`finetune operator --namespace ns ...`) and from a
Deployment's env. Flags win over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ENV_PREFIX = "FINETUNE_OPERATOR_"

# The names the operator puts on objects: kopf's persistence and our own labels use them.
FINALIZER = "finetune.dev/finalizer"
ANNOTATION_PREFIX = "finetune.dev"
JOB_LABEL = "finetune.dev/job"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class Settings:
    # Namespaces to watch; empty watches the whole cluster.
    namespaces: tuple[str, ...] = ()
    # Trainer image for jobs that leave spec.resources.image empty.
    default_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    # rayVersion on the RayCluster: must match the Ray inside the trainer image.
    ray_version: str = "2.60.0"
    # The GPU node pool of jobs that name none (spec.resources.nodeSelector / tolerations
    # empty), as JSON: a platform team sets it once in the chart instead of in every job.
    default_node_selector: str = "{}"
    default_tolerations: str = "[]"
    # Peering name for hot standby; None runs standalone (one replica, no leader election).
    peering: str | None = None
    priority: int = 0
    # Liveness probe (GET /healthz) and Prometheus metrics (GET /metrics); 0 turns one off.
    liveness_port: int = 8080
    metrics_port: int = 9090
    # How often a job's world is re-read while it is active, and the longest back-off for
    # conditions that wait on people (a missing Secret) or on the network (the dashboard).
    reconcile_interval: float = 10.0
    max_backoff: float = 60.0
    # How often a Running job's Ray job and log are read. Two dashboard requests per job
    # per pass were most of the operator's CPU with 1,000 jobs running (bench/
    # operator_scale); status.progress is for people, and a failure is seen this much later.
    tracking_interval: float = 30.0
    # The Ray dashboard is reached at http://<status.head.serviceIP>:<endpoints.dashboard>
    # as KubeRay publishes them; an operator outside the cluster (tests, port-forwards)
    # overrides the host.
    dashboard_host: str | None = None
    dashboard_timeout: float = 10.0
    # Head pod resources: the head runs the dashboard and the job driver, never training.
    head_cpu: str = "1"
    head_memory: str = "4Gi"
    # Lines of a failed attempt's log kept in status.logTail.
    log_tail_lines: int = 30
    # Kubernetes API timeouts (seconds) for kopf's watches and requests.
    watch_server_timeout: int = 300
    watch_client_timeout: int = 330
    request_timeout: float = 60.0
    # Extra environment for the trainer's driver and workers, as KEY=VALUE (debug and test
    # hooks such as FINETUNE_FAULT_AFTER_STEP); never for credentials, which come from
    # the job's Secret.
    trainer_env: tuple[str, ...] = ()
    # JSON logs for log collectors; plain text for people at a terminal.
    log_format: str = "json"
    verbose: bool = False

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        return cls.from_args([], environ)

    @classmethod
    def from_args(cls, argv: Sequence[str],
                  environ: Mapping[str, str] | None = None) -> "Settings":
        """Settings from flags, falling back to FINETUNE_OPERATOR_* variables, then defaults."""
        args = build_parser(environ).parse_args(list(argv))
        values = vars(args)
        values["namespaces"] = tuple(n for part in values["namespaces"] or ()
                                     for n in part.split(",") if n)
        values["trainer_env"] = tuple(values["trainer_env"] or ())
        for item in values["trainer_env"]:
            if "=" not in item:
                raise SystemExit(f"--trainer-env wants KEY=VALUE, got {item!r}")
        settings = cls(**values)
        settings.node_selector_default, settings.tolerations_default  # refuse bad JSON at start
        return settings

    @property
    def node_selector_default(self) -> dict[str, str]:
        value = _json_setting("default_node_selector", self.default_node_selector, dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise SystemExit("--default-node-selector wants a JSON object of strings, "
                             f"got {self.default_node_selector!r}")
        return value

    @property
    def tolerations_default(self) -> list[dict]:
        value = _json_setting("default_tolerations", self.default_tolerations, list)
        if not all(isinstance(t, dict) for t in value):
            raise SystemExit("--default-tolerations wants a JSON list of objects, "
                             f"got {self.default_tolerations!r}")
        return value

    @property
    def trainer_env_vars(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.trainer_env)


def _json_setting(name: str, raw: str, kind: type):
    try:
        value = json.loads(raw or ("{}" if kind is dict else "[]"))
    except ValueError as exc:
        raise SystemExit(f"--{name.replace('_', '-')} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise SystemExit(f"--{name.replace('_', '-')} wants a JSON "
                         f"{'object' if kind is dict else 'list'}, got {raw!r}")
    return value


def _env_default(field: dataclasses.Field, environ: Mapping[str, str]):
    raw = environ.get(ENV_PREFIX + field.name.upper())
    if raw is None:
        return field.default
    if field.name in ("namespaces", "trainer_env"):
        return [part for part in raw.split(";") if part] if field.name == "trainer_env" \
            else [raw]
    if field.type in ("bool", bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if field.type in ("int", int):
        return int(raw)
    if field.type in ("float", float):
        return float(raw)
    return raw or None if field.name in ("peering", "dashboard_host") else raw


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    d = {name: _env_default(f, environ) for name, f in fields.items()}
    p = argparse.ArgumentParser(prog="finetune operator",
                                description="Run the FineTuneJob operator.")
    p.add_argument("-n", "--namespace", dest="namespaces", action="append",
                   default=d["namespaces"] or None,
                   help="namespace to watch (repeatable or comma-separated); "
                        "none watches the whole cluster")
    p.add_argument("--default-image", default=d["default_image"])
    p.add_argument("--ray-version", default=d["ray_version"])
    p.add_argument("--default-node-selector", default=d["default_node_selector"],
                   metavar="JSON", help='node labels for jobs that set none, e.g. '
                                         '\'{"pool": "a100"}\'')
    p.add_argument("--default-tolerations", default=d["default_tolerations"], metavar="JSON",
                   help="tolerations (a JSON list) for jobs that set none")
    p.add_argument("--peering", default=d["peering"],
                   help="kopf peering name for hot standby; unset runs standalone")
    p.add_argument("--priority", type=int, default=d["priority"])
    p.add_argument("--liveness-port", type=int, default=d["liveness_port"])
    p.add_argument("--metrics-port", type=int, default=d["metrics_port"])
    p.add_argument("--reconcile-interval", type=float, default=d["reconcile_interval"])
    p.add_argument("--max-backoff", type=float, default=d["max_backoff"])
    p.add_argument("--tracking-interval", type=float, default=d["tracking_interval"],
                   help="seconds between looks at a Running job's Ray job and log")
    p.add_argument("--dashboard-host", default=d["dashboard_host"])
    p.add_argument("--dashboard-timeout", type=float, default=d["dashboard_timeout"])
    p.add_argument("--head-cpu", default=d["head_cpu"])
    p.add_argument("--head-memory", default=d["head_memory"])
    p.add_argument("--log-tail-lines", type=int, default=d["log_tail_lines"])
    p.add_argument("--watch-server-timeout", type=int, default=d["watch_server_timeout"])
    p.add_argument("--watch-client-timeout", type=int, default=d["watch_client_timeout"])
    p.add_argument("--request-timeout", type=float, default=d["request_timeout"])
    p.add_argument("--trainer-env", action="append", default=d["trainer_env"] or None,
                   metavar="KEY=VALUE", help="extra env for the trainer (repeatable)")
    p.add_argument("--log-format", choices=["json", "plain"], default=d["log_format"])
    p.add_argument("-v", "--verbose", action="store_true", default=d["verbose"])
    return p
