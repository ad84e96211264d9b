"""The FineTuneJob that the trainer, the CLI and the operator read.

Objects are only ever built from a document that `validation.admit` accepted and defaulted,
so the rules live in one place (the schema). The section classes (`Spec`, `Training`,
`Resources`, ...) are made from the schema itself: each property is an attribute of the same
name in snake_case (`spec.training.micro_batch_size`), each object with properties a nested
section, and a property the schema gives no default reads as None ({} or [] for maps and
lists), as does an absent section with required fields of its own (spec.tracking.mlflow).
Adding a spec field is then a change to `schema.py` and to the code that reads it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, get_type_hints

from . import schema
from .reader import dump, read_one
from .validation import admit


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


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


def _is_section(prop: schema.Schema) -> bool:
    return prop.get("type") == "object" and "properties" in prop


def _factory(value: Any) -> Callable[[], Any]:
    return lambda: copy.deepcopy(value)


def _section(class_name: str, node: schema.Schema,
             methods: dict[str, dict[str, Any]]) -> type:
    """A frozen dataclass with one field per property of `node`; required ones first."""
    required, optional = [], []
    for key, prop in node["properties"].items():
        name = _snake(key)
        if _is_section(prop):
            kind = _section(key[:1].upper() + key[1:], prop, methods)
            if prop.get("required") and key not in node.get("required", ()):
                # An optional section with required fields (spec.adapter): absent reads as None,
                # since no section could be made without them.
                default: Any = None
            else:
                default = dataclasses.field(default_factory=functools.partial(kind.from_dict, {}))
        else:
            kind = Any
            value = prop.get("default", {"object": {}, "array": []}.get(prop.get("type")))
            default = dataclasses.field(default_factory=_factory(value)) \
                if isinstance(value, (dict, list)) else value
        if key in node.get("required", ()):
            required.append((name, kind))
        else:
            optional.append((name, kind, default))
    cls = dataclasses.make_dataclass(class_name, [*required, *optional], bases=(_FromDict,),
                                     frozen=True, namespace=methods.get(class_name, {}))
    cls.__module__ = __name__
    return cls


def _training_processes(self) -> int:
    """One process per GPU, or one per worker on CPU."""
    return self.workers * max(self.gpus_per_worker, 1)


# What a section has beyond its fields (by class name).
_METHODS = {"Resources": {"training_processes": property(_training_processes)}}
Spec = _section("Spec", schema.SPEC, _METHODS)


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
        """The full model: the trained one, or with an adapter the merged one."""
        return f"{self.checkpoint_run_uri}/final"

    @property
    def adapter_uri(self) -> str | None:
        return f"{self.checkpoint_run_uri}/adapter" if self.spec.adapter else None

    @property
    def outputs(self) -> dict[str, str]:
        """What a finished run wrote, as status.output names it: modelUri (no adapter, or
        one merged) and adapterUri (with an adapter)."""
        out = {}
        if not self.spec.adapter or self.spec.adapter.merge:
            out["modelUri"] = self.final_model_uri
        if self.adapter_uri:
            out["adapterUri"] = self.adapter_uri
        return out

    def to_yaml(self) -> str:
        return dump(self.document)  # quoted where kubectl would read a string otherwise
