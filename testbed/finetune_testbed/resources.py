"""What the emulated cluster serves: built-in resource types and CRD-declared ones."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import yaml

from .schema_validation import CrdSchemaValidator

ALL_VERBS = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch']


@dataclasses.dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ''
    short_names: list[str] = dataclasses.field(default_factory=list)
    categories: list[str] = dataclasses.field(default_factory=list)
    subresources: list[str] = dataclasses.field(default_factory=list)
    validator: CrdSchemaValidator | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.validator.list_kind if self.validator else f'{self.kind}List'

    @property
    def has_status(self) -> bool:
        return 'status' in self.subresources

    @property
    def qualified(self) -> str:
        """`finetunejobs.finetune.dev`, `secrets`: how the API server names a resource in messages."""
        return f'{self.plural}.{self.group}' if self.group else self.plural

    @classmethod
    def from_crd(cls, crd: dict[str, Any], version: str | None = None) -> ResourceType:
        validator = CrdSchemaValidator(crd, version)
        return cls(group=validator.group, version=validator.version, plural=validator.plural,
                   kind=validator.kind, namespaced=validator.namespaced, singular=validator.singular,
                   short_names=validator.short_names, categories=validator.categories,
                   subresources=validator.subresources, validator=validator)

    @classmethod
    def from_crd_file(cls, path: str | Path, version: str | None = None) -> ResourceType:
        return _load_crd_file(str(Path(path).resolve()), version)


@functools.lru_cache(maxsize=None)
def _load_crd_file(path: str, version: str | None) -> ResourceType:
    # KubeRay's CRD is 17k lines: parse it once per process, not once per emulator. The
    # ResourceType and its validator are read-only afterwards, so emulators can share them.
    loader = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)
    return ResourceType.from_crd(yaml.load(Path(path).read_text(), Loader=loader), version)


def builtin_resource_types() -> list[ResourceType]:
    """The built-ins an operator and kopf touch; schemaless (stored as sent)."""
    def rt(group: str, version: str, plural: str, kind: str, namespaced: bool = True,
           short: tuple[str, ...] = (), sub: tuple[str, ...] = ()) -> ResourceType:
        return ResourceType(group, version, plural, kind, namespaced, kind.lower(), list(short),
                            [], list(sub))
    return [
        rt('', 'v1', 'namespaces', 'Namespace', namespaced=False, short=('ns',), sub=('status',)),
        rt('', 'v1', 'secrets', 'Secret'),
        rt('', 'v1', 'configmaps', 'ConfigMap', short=('cm',)),
        rt('', 'v1', 'events', 'Event', short=('ev',)),
        rt('', 'v1', 'pods', 'Pod', short=('po',), sub=('status',)),
        rt('', 'v1', 'services', 'Service', short=('svc',), sub=('status',)),
        rt('', 'v1', 'serviceaccounts', 'ServiceAccount', short=('sa',)),
        rt('events.k8s.io', 'v1', 'events', 'Event', short=('ev',)),
        rt('coordination.k8s.io', 'v1', 'leases', 'Lease'),
        rt('apiextensions.k8s.io', 'v1', 'customresourcedefinitions', 'CustomResourceDefinition',
           namespaced=False, short=('crd', 'crds'), sub=('status',)),
        rt('kopf.dev', 'v1', 'clusterkopfpeerings', 'ClusterKopfPeering', namespaced=False),
        rt('kopf.dev', 'v1', 'kopfpeerings', 'KopfPeering'),
    ]
