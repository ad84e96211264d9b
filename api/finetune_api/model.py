"""The typed FineTuneJob that the trainer, the CLI and the operator read.

Objects are only ever built from a document that `validation.admit` accepted and defaulted,
so the rules live in one place (the schema); these classes only give them names and types.
A test checks that every field here is a property of the schema and the other way round.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .reader import dump, read_one
from .validation import admit


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolved once per class: with string annotations every call compiles and evaluates
    # each one (2 ms per job parsed, most of the operator's CPU per new job).
    return get_type_hints(cls)


class _FromDict:
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        data = data or {}
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = _camel(f.name)
            if key not in data:
                continue
            value = data[key]
            kind = hints[f.name]
            if isinstance(kind, type) and issubclass(kind, _FromDict):
                value = kind.from_dict(value)
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class Model(_FromDict):
    uri: str
    revision: str | None = None


@dataclass(frozen=True)
class Dataset(_FromDict):
    uri: str
    format: str = "auto"
    text_field: str = "text"
    max_seq_length: int = 2048


@dataclass(frozen=True)
class DeepSpeed(_FromDict):
    stage: int = 3
    offload_optimizer: str = "none"
    offload_param: str = "none"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FSDP(_FromDict):
    sharding_strategy: str = "FULL_SHARD"
    cpu_offload: bool = False


@dataclass(frozen=True)
class Strategy(_FromDict):
    type: str = "deepspeed"
    deepspeed: DeepSpeed = field(default_factory=DeepSpeed)
    fsdp: FSDP = field(default_factory=FSDP)


@dataclass(frozen=True)
class Training(_FromDict):
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2.0e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    precision: str = "bf16"
    activation_checkpointing: bool = False
    max_grad_norm: float = 1.0
    seed: int = 42


@dataclass(frozen=True)
class Toleration(_FromDict):
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


@dataclass(frozen=True)
class Resources(_FromDict):
    workers: int = 1
    gpus_per_worker: int = 1
    cpus_per_worker: int = 8
    memory_per_worker: str = "32Gi"
    image: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    priority_class_name: str = ""

    @property
    def training_processes(self) -> int:
        """One process per GPU, or one per worker on CPU."""
        return self.workers * max(self.gpus_per_worker, 1)


@dataclass(frozen=True)
class Checkpoint(_FromDict):
    uri: str
    every_steps: int = 500
    keep: int = 3


@dataclass(frozen=True)
class S3(_FromDict):
    secret_ref: str = ""
    endpoint: str = ""
    region: str = "us-east-1"
    max_attempts: int = 15


@dataclass(frozen=True)
class RunPolicy(_FromDict):
    suspend: bool = False
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    cleanup_policy: str = "DeleteCluster"


@dataclass(frozen=True)
class Spec(_FromDict):
    model: Model
    dataset: Dataset
    checkpoint: Checkpoint
    strategy: Strategy = field(default_factory=Strategy)
    training: Training = field(default_factory=Training)
    resources: Resources = field(default_factory=Resources)
    s3: S3 = field(default_factory=S3)
    run_policy: RunPolicy = field(default_factory=RunPolicy)


@dataclass(frozen=True)
class FineTuneJob:
    name: str
    namespace: str | None
    uid: str | None
    spec: Spec
    document: dict[str, Any]  # the admitted, defaulted document

    @classmethod
    def from_document(cls, doc: Any, *, rules: bool = True) -> "FineTuneJob":
        """`rules=False`: see `validation.admit` (for documents an API server admitted)."""
        admitted = admit(doc, rules=rules)
        meta = admitted.get("metadata") or {}
        return cls(name=meta.get("name") or meta.get("generateName", "job").rstrip("-"),
                   namespace=meta.get("namespace"), uid=meta.get("uid"),
                   spec=Spec.from_dict(admitted["spec"]), document=admitted)

    @classmethod
    def from_yaml(cls, text: str | bytes, source: str = "<job>") -> "FineTuneJob":
        """One job from YAML or JSON text, read as kubectl reads it (reader.ReadError)."""
        return cls.from_document(read_one(text, source))

    @classmethod
    def from_file(cls, path: str | Path) -> "FineTuneJob":
        return cls.from_yaml(Path(path).read_bytes(), str(path))

    @property
    def run_name(self) -> str:
        """The Ray Train run name: the job's identity, so a rerun resumes by itself."""
        return self.name

    @property
    def checkpoint_run_uri(self) -> str:
        return f"{self.spec.checkpoint.uri.rstrip('/')}/{self.run_name}"

    @property
    def final_model_uri(self) -> str:
        return f"{self.checkpoint_run_uri}/final"

    def to_yaml(self) -> str:
        return dump(self.document)  # quoted where kubectl would read a string otherwise
