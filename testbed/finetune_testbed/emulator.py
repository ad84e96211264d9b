"""A Kubernetes API server emulator built on kmock, faithful where operators notice.

kmock 0.8 gives the HTTP server, the Kubernetes scaffold (error rendering, a reaction DSL for
ad-hoc endpoints, the resource registry) and request parsing. Its own object store is not used:
it has no uid/resourceVersion/generation, merges `/status` into the whole object, has no PUT or
selectors, and re-scans the request history and every object on each request (quadratic cost).
This emulator serves the resource verbs itself from an indexed store with a bounded request log:

* metadata: uid, a global monotonic resourceVersion, generation (spec changes only),
  creationTimestamp, generateName; 201 on create, 409 AlreadyExists / Conflict, 404 NotFound,
  422 Invalid, all as Kubernetes `Status` bodies;
* the status subresource, PUT, merge/JSON/strategic(=merge) patches, server-side apply as
  create-or-merge, finalizers, deletion with ownerReference garbage collection;
* label and field selectors on list and watch; watch from a resourceVersion, bookmarks,
  `sendInitialEvents` (kubectl's watch-list);
* admission: CRD structural schema, defaults, unknown fields and CEL rules
  (see schema_validation.py), and metadata.name as a DNS-1123 subdomain;
* bearer-token authentication and a recorder of every call per identity (for RBAC checks).

Run in-process with `EmulatorThread`, or as a process: `python -m finetune_testbed.emulator --help`.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime
import ipaddress
import json
import random
import re
import secrets as secrets_module
import signal
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.test_utils
import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import rendering

from .patching import PatchError, json_patch, merge_patch
from .paths import KUBERAY_CRD, PROJECT_CRD
from .resources import ALL_VERBS, ResourceType, builtin_resource_types
from .schema_validation import AdmissionError, Cause, format_value
from .selectors import SelectorError, parse_field_selector, parse_label_selector


DNS1123_SUBDOMAIN = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')
DNS1123_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
# The alphabet of generateName suffixes in the API server (no vowels, no look-alikes).
GENERATE_NAME_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789'

ObjKey = tuple[str | None, str]  # (namespace, name) inside one resource type


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


class ApiError(kmock.KubernetesError):
    """A refusal rendered as a Kubernetes `Status`; built on kmock's error type."""


def api_error(status: int, reason: str, message: str, details: dict[str, Any] | None = None) -> ApiError:
    return ApiError(status=status, reason=reason, message=message, details=details)


@dataclasses.dataclass(frozen=True)
class ApiCall:
    """One API call as RBAC sees it."""
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str | None


@dataclasses.dataclass(frozen=True)
class LoggedRequest:
    at: float
    identity: str | None
    method: str
    path: str
    status: int


class Recorder:
    """Every resource call per client identity, plus a bounded log of recent requests."""

    def __init__(self, log_size: int = 2000) -> None:
        self.calls: dict[str, collections.Counter[ApiCall]] = collections.defaultdict(collections.Counter)
        self.log: collections.deque[LoggedRequest] = collections.deque(maxlen=log_size)
        self._lock = threading.Lock()  # read from test threads while the server thread writes

    def record(self, identity: str, call: ApiCall) -> None:
        with self._lock:
            self.calls[identity][call] += 1

    def calls_of(self, identity: str) -> set[ApiCall]:
        with self._lock:
            return set(self.calls.get(identity, ()))

    def verbs_by_resource(self, identity: str) -> dict[tuple[str, str], set[str]]:
        """{(group, 'plural' or 'plural/subresource'): {verbs}}, the shape of RBAC rules."""
        out: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        for call in self.calls_of(identity):
            name = f'{call.resource}/{call.subresource}' if call.subresource else call.resource
            out[(call.group, name)].add(call.verb)
        return dict(out)

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()
            self.log.clear()


@dataclasses.dataclass(eq=False)  # identity-hashed: kept in a set per resource type
class _Watcher:
    namespace: str | None
    matches: Callable[[Mapping[str, Any]], bool]
    queue: asyncio.Queue[dict[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class _HistoryEntry:
    rv: int
    type_key: tuple[str, str, str]
    event: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class _Target:
    """The resource part of a request path."""
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesScaffold):
    """The API server. Stored objects are never mutated in place: every change stores a new dict,
    so watch events and responses can share them without copies."""

    tokens: dict[str, str] = attrs.field(factory=dict)  # bearer token → identity
    history_size: int = 20000  # watch events kept for watches from an old resourceVersion
    request_log_size: int = 2000
    bookmark_interval: float = 5.0  # real servers send one a minute; tests want them sooner
    namespaces: Iterable[str] = ('default', 'kube-system', 'kube-public')
    # For clients that send no `fieldValidation` (kopf, most libraries) a real API server uses
    # Warn: unknown fields are dropped with a Warning header. The test bed refuses them instead,
    # so an operator writing fields its CRD lacks fails loudly; kubectl asks for Strict anyway.
    default_field_validation: str = 'Strict'
    recorder: Recorder = attrs.field(init=False)
    types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _store: dict[tuple[str, str, str], dict[ObjKey, dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _by_uid: dict[str, tuple[tuple[str, str, str], ObjKey]] = attrs.field(factory=dict, init=False)
    _dependents: dict[str, set[str]] = attrs.field(factory=dict, init=False)  # owner uid → uids
    _watchers: dict[tuple[str, str, str], set[_Watcher]] = attrs.field(factory=dict, init=False)
    _history: collections.deque[_HistoryEntry] = attrs.field(init=False)
    _rv: int = attrs.field(default=1000, init=False)
    _served: int = attrs.field(default=0, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.recorder = Recorder(self.request_log_size)
        self._history = collections.deque(maxlen=self.history_size)
        for rtype in builtin_resource_types():
            self.declare(rtype)
        for namespace in self.namespaces:
            self.seed({'apiVersion': 'v1', 'kind': 'Namespace', 'metadata': {'name': namespace},
                       'status': {'phase': 'Active'}})

    # -- declaration and direct access (call these on the server's loop, or before it starts) --

    def declare(self, rtype: ResourceType) -> ResourceType:
        """Serve a resource type (also registered in kmock's resource registry)."""
        self.types[rtype.key] = rtype
        self._store.setdefault(rtype.key, {})
        self._watchers.setdefault(rtype.key, set())
        self.resources[kmock.resource(rtype.group, rtype.version, rtype.plural)] = kmock.ResourceInfo(
            namespaced=rtype.namespaced, kind=rtype.kind, singular=rtype.singular, verbs=ALL_VERBS,
            shortnames=rtype.short_names, categories=rtype.categories, subresources=rtype.subresources)
        return rtype

    def declare_crd(self, crd: dict[str, Any] | str | Path, version: str | None = None) -> ResourceType:
        if isinstance(crd, (str, Path)):
            return self.declare(ResourceType.from_crd_file(crd, version))
        return self.declare(ResourceType.from_crd(crd, version))

    def find_type(self, api_version: str, kind_or_plural: str) -> ResourceType:
        group, _, version = api_version.rpartition('/')
        for rtype in self.types.values():
            if rtype.group == group and rtype.version == version and kind_or_plural in (rtype.kind, rtype.plural):
                return rtype
        raise KeyError(f'{api_version} {kind_or_plural} is not served')

    def seed(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as if created, without admission (for fixtures' initial state)."""
        rtype = self.find_type(obj['apiVersion'], obj['kind'])
        obj = copy.deepcopy(obj)
        meta = obj.setdefault('metadata', {})
        meta.setdefault('uid', str(uuid.uuid4()))
        meta.setdefault('creationTimestamp', now_rfc3339())
        meta.setdefault('generation', 1)
        if not rtype.namespaced:
            meta.pop('namespace', None)
        self._commit(rtype, obj, None, 'ADDED')
        return obj

    def peek(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._store[rtype.key].get((namespace if rtype.namespaced else None, name))

    def objects(self, rtype: ResourceType) -> list[dict[str, Any]]:
        return list(self._store[rtype.key].values())

    def history(self, rtype: ResourceType) -> list[tuple[str, dict[str, Any]]]:
        """(ADDED | MODIFIED | DELETED, object) of every change to `rtype` still in the watch
        history, oldest first: what a watch from the start would have seen, so a test can
        tell objects that came and went between two of its reads."""
        return [(entry.event, entry.obj) for entry in self._history if entry.type_key == rtype.key]

    @property
    def resource_version(self) -> int:
        return self._rv

    # -- the HTTP entry point --

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        content = await raw.read()
        self._served += 1
        identity: str | None = None
        response: aiohttp.web.StreamResponse
        try:
            if raw.path in ('/healthz', '/readyz', '/livez'):
                response = aiohttp.web.Response(text='ok')  # unauthenticated, as for kubelets' probes
            else:
                identity = self._authenticate(raw)
                response = await self._route(raw, identity, content)
        except kmock.KubernetesError as exc:
            response = self._status_response(exc)
        except Exception as exc:  # a bug here must reach the client as a 500, not a dropped socket
            response = self._status_response(api_error(500, 'InternalError', f'{type(exc).__name__}: {exc}'))
        self.recorder.log.append(LoggedRequest(time.time(), identity, raw.method, raw.path_qs, response.status))
        return response

    def _authenticate(self, raw: aiohttp.web.BaseRequest) -> str:
        header = raw.headers.get('Authorization', '')
        scheme, _, token = header.partition(' ')
        if scheme.lower() != 'bearer' or token.strip() not in self.tokens:
            raise api_error(401, 'Unauthorized', 'Unauthorized')
        return self.tokens[token.strip()]

    def add_token(self, identity: str, token: str | None = None) -> str:
        token = token or secrets_module.token_urlsafe(24)
        self.tokens[token] = identity
        return token

    async def _route(self, raw: aiohttp.web.BaseRequest, identity: str, content: bytes) -> aiohttp.web.StreamResponse:
        parts = [part for part in raw.path.split('/') if part]
        if raw.method == 'GET':
            discovery = self._discovery(parts, raw)
            if discovery is not None:
                return aiohttp.web.json_response(discovery)
        target = self._parse_target(parts)
        if target is None:
            # Anything else goes through kmock's reaction DSL, so tests can add ad-hoc endpoints
            # (`emulator['get /metrics'] << b'...'`); unknown paths get kmock's 404 Status.
            request = await rendering.Request._parse(raw, id=self._served)
            try:
                return await self._handle(request)
            except NotImplementedError:  # kmock's word for "no reaction matches"
                raise api_error(404, 'NotFound', 'the server could not find the requested resource') from None
        return await self._serve_resource(raw, target, identity, content)

    def _parse_target(self, parts: list[str]) -> _Target | None:
        if len(parts) >= 3 and parts[0] == 'api':
            group, version, rest = '', parts[1], parts[2:]
        elif len(parts) >= 4 and parts[0] == 'apis':
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        # /api/v1/namespaces/NAME[/status|/finalize] is the namespace itself, not a namespaced list.
        if rest[0] == 'namespaces' and (len(rest) >= 4 or (len(rest) == 3 and rest[2] not in ('status', 'finalize'))):
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], rest[1] if len(rest) > 1 else None
        subresource = '/'.join(rest[2:]) or None
        rtype = self.types.get((group, version, plural))
        if rtype is None:
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        if subresource is not None and subresource not in rtype.subresources:
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        if not rtype.namespaced and namespace is not None:
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        return _Target(rtype, namespace, name, subresource)

    # -- discovery --

    def _discovery(self, parts: list[str], raw: aiohttp.web.BaseRequest) -> dict[str, Any] | None:
        if parts == ['version']:
            return {'major': '1', 'minor': '35', 'gitVersion': 'v1.35.0-kmock', 'gitCommit': '0' * 40,
                    'gitTreeState': 'clean', 'buildDate': '2026-01-01T00:00:00Z', 'goVersion': 'go1.25',
                    'compiler': 'gc', 'platform': 'linux/amd64'}
        if parts[:2] == ['openapi', 'v3']:
            return self._openapi_v3(parts[2:])
        if parts == ['api']:
            return {'kind': 'APIVersions', 'apiVersion': 'v1', 'versions': ['v1'],
                    'serverAddressByClientCIDRs': [{'clientCIDR': '0.0.0.0/0', 'serverAddress': raw.host}]}
        if parts == ['apis']:
            return {'kind': 'APIGroupList', 'apiVersion': 'v1',
                    'groups': [self._api_group(group) for group in self._groups()]}
        if len(parts) == 2 and parts[0] == 'apis' and parts[1] in self._groups():
            return {'kind': 'APIGroup', 'apiVersion': 'v1', **self._api_group(parts[1])}
        if (len(parts) == 2 and parts[0] == 'api') or (len(parts) == 3 and parts[0] == 'apis'):
            group, version = ('', parts[1]) if parts[0] == 'api' else (parts[1], parts[2])
            rtypes = [t for t in self.types.values() if t.group == group and t.version == version]
            if not rtypes:
                raise api_error(404, 'NotFound', 'the server could not find the requested resource')
            return {'kind': 'APIResourceList', 'apiVersion': 'v1',
                    'groupVersion': f'{group}/{version}' if group else version,
                    'resources': [entry for rtype in rtypes for entry in self._api_resources(rtype)]}
        return None

    def _openapi_v3(self, group_version: list[str]) -> dict[str, Any]:
        """Just enough OpenAPI v3 for kubectl to see that the server validates fields itself
        (the `fieldValidation` parameter on PATCH): then `kubectl apply` needs no
        `--validate=false` and asks for Strict validation server-side. No schemas are published,
        so kubectl uses JSON merge patches for custom resources, as it does with CRDs anyway."""
        if not group_version:
            paths = {}
            for rtype in self.types.values():
                path = f'apis/{rtype.group}/{rtype.version}' if rtype.group else f'api/{rtype.version}'
                paths[path] = {'serverRelativeURL': f'/openapi/v3/{path}?hash={self._rv}'}
            return {'paths': paths}
        if group_version[0] == 'api' and len(group_version) == 2:
            group, version = '', group_version[1]
        elif group_version[0] == 'apis' and len(group_version) == 3:
            group, version = group_version[1], group_version[2]
        else:
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        rtypes = [t for t in self.types.values() if t.group == group and t.version == version]
        if not rtypes:
            raise api_error(404, 'NotFound', 'the server could not find the requested resource')
        query = [{'name': name, 'in': 'query', 'schema': {'type': 'string', 'uniqueItems': True}}
                 for name in ('dryRun', 'fieldManager', 'fieldValidation', 'force')]
        paths: dict[str, Any] = {}
        for rtype in rtypes:
            prefix = f'/apis/{group}/{version}' if group else f'/api/{version}'
            scope = '/namespaces/{namespace}' if rtype.namespaced else ''
            gvk = {'group': group, 'version': version, 'kind': rtype.kind}
            content_types = ['application/json-patch+json', 'application/merge-patch+json', 'application/apply-patch+yaml']
            if rtype.validator is None:  # built-ins take strategic merge patches; CRDs do not
                content_types.append('application/strategic-merge-patch+json')
            for suffix in ['', *(f'/{sub}' for sub in rtype.subresources)]:
                paths[f'{prefix}{scope}/{rtype.plural}/{{name}}{suffix}'] = {'patch': {
                    'x-kubernetes-action': 'patch', 'x-kubernetes-group-version-kind': gvk,
                    'parameters': query,
                    'requestBody': {'content': {ct: {'schema': {'type': 'object'}} for ct in content_types}},
                    'responses': {'200': {'description': 'OK'}}}}
                paths[f'{prefix}{scope}/{rtype.plural}{suffix}' if not suffix else f'{prefix}{scope}/{rtype.plural}'] = {'post': {
                    'x-kubernetes-action': 'post', 'x-kubernetes-group-version-kind': gvk, 'parameters': query,
                    'responses': {'201': {'description': 'Created'}}}}
        return {'openapi': '3.0.0', 'info': {'title': 'Kubernetes', 'version': 'v1.35.0'}, 'paths': paths,
                'components': {'schemas': {}}}

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rtype in self.types.values():
            if rtype.group and rtype.version not in groups.setdefault(rtype.group, []):
                groups[rtype.group].append(rtype.version)
        return groups

    def _api_group(self, group: str) -> dict[str, Any]:
        versions = [{'groupVersion': f'{group}/{v}', 'version': v} for v in self._groups()[group]]
        return {'name': group, 'versions': versions, 'preferredVersion': versions[0]}

    @staticmethod
    def _api_resources(rtype: ResourceType) -> list[dict[str, Any]]:
        main = {'name': rtype.plural, 'singularName': rtype.singular, 'namespaced': rtype.namespaced,
                'kind': rtype.kind, 'verbs': ALL_VERBS, 'shortNames': rtype.short_names,
                'categories': rtype.categories}
        subs = [{'name': f'{rtype.plural}/{sub}', 'singularName': '', 'namespaced': rtype.namespaced,
                 'kind': rtype.kind, 'verbs': ['get', 'patch', 'update']} for sub in rtype.subresources]
        return [main, *subs]

    # -- resource verbs --

    async def _serve_resource(self, raw: aiohttp.web.BaseRequest, target: _Target,
                              identity: str, content: bytes) -> aiohttp.web.StreamResponse:
        params = raw.query
        watching = raw.method == 'GET' and params.get('watch') in ('true', '1')
        verb = {('GET', True): 'get', ('GET', False): 'list', ('POST', False): 'create',
                ('PUT', True): 'update', ('PATCH', True): 'patch', ('DELETE', True): 'delete',
                ('DELETE', False): 'deletecollection'}.get((raw.method, target.name is not None))
        verb = 'watch' if watching else verb
        if verb is None:
            raise api_error(405, 'MethodNotAllowed', f'the server does not allow this method on the requested resource')
        self.recorder.record(identity, ApiCall(verb, target.rtype.group, target.rtype.plural,
                                               target.subresource or '', target.namespace))
        if watching:
            return await self._watch(raw, target)
        if verb == 'get':
            return self._json(self._get_or_404(target.rtype, target.namespace, target.name))
        if verb == 'list':
            return self._json(self._list(target, params, raw.headers.get('Accept', '')))
        body = self._parse_body(raw, content)
        field_validation = params.get('fieldValidation', self.default_field_validation)
        dry_run = params.get('dryRun') == 'All'
        if verb == 'create':
            obj, warnings = self._create(target, body, field_validation, dry_run)
            return self._json(obj, 201, warnings)
        if verb == 'update':
            obj, warnings, created = self._replace(target, body, field_validation, dry_run)
            return self._json(obj, 201 if created else 200, warnings)
        if verb == 'patch':
            obj, warnings, created = self._patch(target, body, raw.content_type, params, field_validation, dry_run)
            return self._json(obj, 201 if created else 200, warnings)
        if verb == 'delete':
            return self._json(self._delete(target, body or {}, params, dry_run))
        return self._json(self._delete_collection(target, body or {}, params, dry_run))

    @staticmethod
    def _parse_body(raw: aiohttp.web.BaseRequest, content: bytes) -> Any:
        if not content:
            return None
        if 'protobuf' in raw.content_type:
            raise api_error(415, 'UnsupportedMediaType', 'protobuf is not supported by this emulator; send JSON or YAML')
        try:
            if raw.content_type.endswith('yaml'):
                return yaml.safe_load(content)
            return json.loads(content)
        except (ValueError, yaml.YAMLError) as exc:
            raise api_error(400, 'BadRequest', f'the request body is not valid JSON or YAML: {exc}') from None

    def _json(self, obj: Any, status: int = 200, warnings: list[str] | None = None) -> aiohttp.web.Response:
        response = aiohttp.web.Response(body=json.dumps(obj).encode(), status=status, content_type='application/json')
        for warning in warnings or []:
            response.headers.add('Warning', f'299 - "{warning}"')
        return response

    def _status_response(self, exc: kmock.KubernetesError) -> aiohttp.web.Response:
        return self._json({'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                           'message': exc.message, 'reason': exc.reason, 'details': exc.details or {},
                           'code': exc.status}, exc.status)

    # -- reads --

    def _not_found(self, rtype: ResourceType, name: str | None) -> ApiError:
        return api_error(404, 'NotFound', f'{rtype.qualified} "{name}" not found',
                         {'name': name, 'group': rtype.group, 'kind': rtype.plural})

    def _get_or_404(self, rtype: ResourceType, namespace: str | None, name: str | None) -> dict[str, Any]:
        obj = self.peek(rtype, namespace, name or '')
        if obj is None:
            raise self._not_found(rtype, name)
        return obj

    def _selector(self, target: _Target, params: Mapping[str, str]) -> Callable[[Mapping[str, Any]], bool]:
        try:
            labels = parse_label_selector(params.get('labelSelector'))
            fields = parse_field_selector(params.get('fieldSelector'))
        except SelectorError as exc:
            raise api_error(400, 'BadRequest', str(exc)) from None
        name = target.name
        return lambda obj: labels(obj) and fields(obj) and (name is None or obj['metadata']['name'] == name)

    def _list(self, target: _Target, params: Mapping[str, str], accept: str) -> dict[str, Any]:
        matches = self._selector(target, params)
        items = [obj for (namespace, _), obj in self._store[target.rtype.key].items()
                 if (target.namespace is None or namespace == target.namespace) and matches(obj)]
        items.sort(key=lambda obj: (obj['metadata'].get('namespace') or '', obj['metadata']['name']))
        metadata: dict[str, Any] = {'resourceVersion': str(self._rv)}
        limit = int(params.get('limit') or 0)
        offset = int(params.get('continue') or 0)  # an opaque token to clients; an offset to us
        if limit or offset:
            remaining = items[offset + limit:] if limit else []
            items = items[offset:offset + limit] if limit else items[offset:]
            if remaining:
                metadata['continue'] = str(offset + limit)
                metadata['remainingItemCount'] = len(remaining)
        if 'as=Table' in accept:
            return self._table(target.rtype, items, metadata)
        return {'apiVersion': target.rtype.api_version, 'kind': target.rtype.list_kind,
                'metadata': metadata, 'items': items}

    def _table(self, rtype: ResourceType, items: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
        """A meta.k8s.io Table as `kubectl get` asks for, with the CRD's printer columns."""
        columns = [{'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
                    'description': 'Name must be unique within a namespace.'}]
        printer: list[dict[str, Any]] = []
        if rtype.validator is not None:
            version = next(v for v in rtype.validator.crd['spec']['versions'] if v['name'] == rtype.version)
            printer = version.get('additionalPrinterColumns', [])
        if not printer:
            printer = [{'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'}]
        columns += [{'name': c['name'], 'type': c['type'], 'format': c.get('format', ''),
                     'priority': c.get('priority', 0), 'description': c.get('description', '')} for c in printer]

        def cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
            value: Any = obj
            for part in column['jsonPath'].strip('.').split('.'):
                value = value.get(part) if isinstance(value, dict) else None
            if column['type'] == 'date' and isinstance(value, str):
                created = datetime.datetime.strptime(value, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=datetime.UTC)
                seconds = int((datetime.datetime.now(datetime.UTC) - created).total_seconds())
                return f'{seconds}s' if seconds < 120 else f'{seconds // 60}m' if seconds < 7200 else f'{seconds // 3600}h'
            return value
        rows = [{'cells': [obj['metadata']['name'], *(cell(obj, c) for c in printer)],
                 'object': {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                            'metadata': obj['metadata']}} for obj in items]
        return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': metadata,
                'columnDefinitions': columns, 'rows': rows}

    async def _watch(self, raw: aiohttp.web.BaseRequest, target: _Target) -> aiohttp.web.StreamResponse:
        params = raw.query
        rtype = target.rtype
        matches = self._selector(target, params)
        since = params.get('resourceVersion') or '0'
        send_initial = params.get('sendInitialEvents') == 'true'
        bookmarks = params.get('allowWatchBookmarks') == 'true'
        timeout = float(params.get('timeoutSeconds') or 0) or None

        def in_scope(obj: Mapping[str, Any]) -> bool:
            return (target.namespace is None or obj['metadata'].get('namespace') == target.namespace) and matches(obj)

        # Snapshot and subscription happen with no await in between: no event can slip through.
        initial: list[dict[str, Any]] = []
        if since == '0' or send_initial:
            initial = [{'type': 'ADDED', 'object': obj} for obj in self._store[rtype.key].values() if in_scope(obj)]
        else:
            if not since.isdigit():
                raise api_error(400, 'BadRequest', f'invalid resource version: {since!r}')
            oldest = self._history[0].rv if len(self._history) == self._history.maxlen else 0
            if int(since) < oldest - 1:
                initial = [{'type': 'ERROR', 'object': {
                    'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure', 'code': 410,
                    'reason': 'Expired', 'message': f'too old resource version: {since} ({oldest})'}}]
            else:
                for entry in self._history:
                    if entry.rv > int(since) and entry.type_key == rtype.key:
                        event = self._event_for(entry.event, entry.obj, entry.old, in_scope)
                        if event is not None:
                            initial.append(event)
        watcher = _Watcher(target.namespace, in_scope, asyncio.Queue())
        self._watchers[rtype.key].add(watcher)
        response = aiohttp.web.StreamResponse(status=200, headers={'Content-Type': 'application/json'})
        try:
            await response.prepare(raw)
            for event in initial:
                await response.write(json.dumps(event).encode() + b'\n')
            if send_initial:
                await response.write(json.dumps(self._bookmark(rtype, initial_end=True)).encode() + b'\n')
            deadline = time.monotonic() + timeout if timeout else None
            next_bookmark = time.monotonic() + self.bookmark_interval
            while not self._closing:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    await response.write(json.dumps(self._bookmark(rtype)).encode() + b'\n')
                    next_bookmark = now + self.bookmark_interval
                wait = min([1.0, *(t - now for t in (deadline, next_bookmark if bookmarks else None) if t is not None)])
                try:
                    first = watcher.queue.get_nowait()  # no timer per event under load
                except asyncio.QueueEmpty:
                    try:
                        first = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.01))
                    except asyncio.TimeoutError:
                        # aiohttp does not cancel handlers of gone clients: notice them here.
                        if raw.transport is None or raw.transport.is_closing():
                            break
                        continue
                # What is queued goes out in one write (one send for a burst of events, not
                # one each: under load the sends were a third of the emulator's time).
                batch = [first]
                while batch[-1] is not None and not watcher.queue.empty():
                    batch.append(watcher.queue.get_nowait())
                lines = [json.dumps(event).encode() + b'\n' for event in batch if event is not None]
                if lines:
                    await response.write(b''.join(lines))
                if batch[-1] is None:
                    break
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:
            # The headers are out: a failure can only be told as an ERROR event in the stream,
            # as the API server does; returning a fresh 500 would corrupt the chunked body.
            if not response.prepared:
                raise
            error = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure', 'code': 500,
                     'reason': 'InternalError', 'message': f'{type(exc).__name__}: {exc}'}
            with contextlib.suppress(ConnectionError):
                await response.write(json.dumps({'type': 'ERROR', 'object': error}).encode() + b'\n')
                await response.write_eof()
        finally:
            self._watchers[rtype.key].discard(watcher)
        return response

    def _bookmark(self, rtype: ResourceType, initial_end: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {'resourceVersion': str(self._rv)}
        if initial_end:
            metadata['annotations'] = {'k8s.io/initial-events-end': 'true'}
        return {'type': 'BOOKMARK', 'object': {'kind': rtype.kind, 'apiVersion': rtype.api_version, 'metadata': metadata}}

    @staticmethod
    def _event_for(event: str, obj: dict[str, Any], old: dict[str, Any] | None,
                   in_scope: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any] | None:
        """What a selective watcher sees: objects entering or leaving its selector are
        ADDED or DELETED for it, as in the API server's cacher."""
        now_in = event != 'DELETED' and in_scope(obj)
        was_in = old is not None and in_scope(old) if event != 'ADDED' else False
        if event == 'DELETED':
            return {'type': 'DELETED', 'object': obj} if in_scope(obj) else None
        if now_in and was_in:
            return {'type': 'MODIFIED', 'object': obj}
        if now_in:
            return {'type': 'ADDED', 'object': obj}
        if was_in:
            return {'type': 'DELETED', 'object': obj}
        return None

    # -- the store: every change goes through _commit or _remove --

    def _commit(self, rtype: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, event: str) -> dict[str, Any]:
        self._rv += 1
        obj['metadata']['resourceVersion'] = str(self._rv)
        meta = obj['metadata']
        key = (meta.get('namespace') if rtype.namespaced else None, meta['name'])
        self._store[rtype.key][key] = obj
        self._by_uid[meta['uid']] = (rtype.key, key)
        old_owners = {ref.get('uid') for ref in (old or {}).get('metadata', {}).get('ownerReferences') or []}
        new_owners = {ref.get('uid') for ref in meta.get('ownerReferences') or []}
        for uid in old_owners - new_owners:
            self._dependents.get(uid, set()).discard(meta['uid'])
        for uid in new_owners - old_owners:
            self._dependents.setdefault(uid, set()).add(meta['uid'])
        self._publish(rtype, event, obj, old)
        return obj

    def _remove(self, rtype: ResourceType, obj: dict[str, Any], propagation: str = 'Background') -> dict[str, Any]:
        meta = obj['metadata']
        key = (meta.get('namespace') if rtype.namespaced else None, meta['name'])
        if self._store[rtype.key].get(key) is not obj:
            return obj  # already gone (e.g. collected while its owner was being deleted)
        del self._store[rtype.key][key]
        self._by_uid.pop(meta['uid'], None)
        for ref in meta.get('ownerReferences') or []:
            self._dependents.get(ref.get('uid'), set()).discard(meta['uid'])
        self._rv += 1
        gone = {**obj, 'metadata': {**meta, 'resourceVersion': str(self._rv)}}
        self._publish(rtype, 'DELETED', gone, obj)
        self._collect_dependents(meta['uid'], propagation)
        if rtype.key == ('', 'v1', 'namespaces'):
            self._purge_namespace(meta['name'])
        return gone

    def _publish(self, rtype: ResourceType, event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self._history.append(_HistoryEntry(self._rv, rtype.key, event, obj, old))
        for watcher in self._watchers[rtype.key]:
            message = self._event_for(event, obj, old, watcher.matches)
            if message is not None:
                watcher.queue.put_nowait(message)

    def _collect_dependents(self, owner_uid: str, propagation: str) -> None:
        """The garbage collector: dependents whose owners are all gone are deleted (or orphaned)."""
        for uid in sorted(self._dependents.pop(owner_uid, set())):
            located = self._by_uid.get(uid)
            if located is None:
                continue
            rtype = self.types[located[0]]
            obj = self._store[rtype.key][located[1]]
            refs = obj['metadata'].get('ownerReferences') or []
            alive = [ref for ref in refs if ref.get('uid') != owner_uid and ref.get('uid') in self._by_uid]
            if propagation == 'Orphan' or alive:
                new = copy.deepcopy(obj)
                new['metadata']['ownerReferences'] = [ref for ref in refs if ref.get('uid') != owner_uid]
                if not new['metadata']['ownerReferences']:
                    del new['metadata']['ownerReferences']
                self._commit(rtype, new, obj, 'MODIFIED')
            else:
                self._delete_object(rtype, obj, 'Background')

    def _purge_namespace(self, namespace: str) -> None:
        for rtype in self.types.values():
            if rtype.namespaced:
                for (ns, _), obj in list(self._store[rtype.key].items()):
                    if ns == namespace:
                        self._remove(rtype, obj)

    def _delete_object(self, rtype: ResourceType, obj: dict[str, Any], propagation: str) -> dict[str, Any]:
        """Mark for deletion while finalizers remain, else remove; returns what DELETE answers."""
        meta = obj['metadata']
        if meta.get('finalizers'):
            if meta.get('deletionTimestamp'):
                return obj
            new = copy.deepcopy(obj)
            new['metadata']['deletionTimestamp'] = now_rfc3339()
            new['metadata']['deletionGracePeriodSeconds'] = 0
            return self._commit(rtype, new, obj, 'MODIFIED')
        if propagation == 'Foreground':
            # Dependents first, then the owner (without the foregroundDeletion finalizer dance).
            for uid in sorted(self._dependents.get(meta['uid'], set())):
                located = self._by_uid.get(uid)
                if located is not None:
                    dependent_type = self.types[located[0]]
                    self._delete_object(dependent_type, self._store[dependent_type.key][located[1]], 'Foreground')
        return self._remove(rtype, obj, propagation)

    # -- writes --

    def _admit(self, rtype: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None,
               field_validation: str) -> tuple[dict[str, Any], list[str]]:
        name = obj['metadata'].get('name') or ''
        causes: list[Cause] = []
        if len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
            causes.append(Cause('metadata.name', f'Invalid value: {format_value(name)}: {DNS1123_MESSAGE}'))
        warnings: list[str] = []
        try:
            if causes:
                raise AdmissionError(causes)
            if rtype.validator is not None:
                obj, warnings = rtype.validator.admit(obj, old=old, field_validation=field_validation)
        except AdmissionError as exc:
            details = {'name': name, 'group': rtype.group, 'kind': rtype.kind,
                       'causes': [cause.as_dict() for cause in exc.causes]}
            if exc.message:  # e.g. strict decoding errors, worded by the validator
                raise api_error(exc.status, exc.reason, exc.message, details) from None
            texts = [f'{cause.field}: {cause.message}' for cause in exc.causes]
            listed = texts[0] if len(texts) == 1 else '[' + ', '.join(texts) + ']'
            what = f'{rtype.kind}.{rtype.group}' if rtype.group else rtype.kind
            raise api_error(422, 'Invalid', f'{what} "{name}" is invalid: {listed}', details) from None
        return obj, warnings

    def _check_body(self, rtype: ResourceType, body: Any, target: _Target) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise api_error(400, 'BadRequest', 'the request body must be a JSON or YAML object')
        body = copy.deepcopy(body)
        body.setdefault('apiVersion', rtype.api_version)
        body.setdefault('kind', rtype.kind)
        if body['apiVersion'] != rtype.api_version or body['kind'] != rtype.kind:
            raise api_error(400, 'BadRequest', f'the API version in the data ({body["apiVersion"]}) does not match '
                                               f'the expected API version ({rtype.api_version}) or kind {rtype.kind}')
        meta = body.setdefault('metadata', {})
        if not isinstance(meta, dict):
            raise api_error(400, 'BadRequest', 'metadata must be an object')
        if rtype.namespaced:
            if target.namespace is None:
                raise api_error(404, 'NotFound', 'the server could not find the requested resource')
            if meta.get('namespace') not in (None, target.namespace):
                raise api_error(400, 'BadRequest', 'the namespace of the provided object does not match the namespace sent on the request')
            meta['namespace'] = target.namespace
        else:
            meta.pop('namespace', None)
        for key in ('managedFields', 'selfLink'):
            meta.pop(key, None)
        return body

    def _create(self, target: _Target, body: Any, field_validation: str, dry_run: bool) -> tuple[dict[str, Any], list[str]]:
        rtype = target.rtype
        obj = self._check_body(rtype, body, target)
        meta = obj['metadata']
        if not meta.get('name') and meta.get('generateName'):
            meta['name'] = meta['generateName'] + ''.join(random.choices(GENERATE_NAME_ALPHABET, k=5))
        if not meta.get('name'):
            raise api_error(422, 'Invalid', f'{rtype.kind} "" is invalid: metadata.name: Required value: name or generateName is required',
                            {'kind': rtype.kind, 'group': rtype.group,
                             'causes': [{'reason': 'FieldValueRequired', 'field': 'metadata.name',
                                         'message': 'Required value: name or generateName is required'}]})
        if rtype.namespaced and self.peek(self.types[('', 'v1', 'namespaces')], None, target.namespace or '') is None:
            raise api_error(404, 'NotFound', f'namespaces "{target.namespace}" not found',
                            {'name': target.namespace, 'kind': 'namespaces'})
        if rtype.has_status:
            obj.pop('status', None)  # the main resource of a status-subresourced type ignores status
        for key in ('resourceVersion', 'deletionTimestamp', 'deletionGracePeriodSeconds'):
            meta.pop(key, None)
        if self.peek(rtype, target.namespace, meta['name']) is not None:
            raise api_error(409, 'AlreadyExists', f'{rtype.qualified} "{meta["name"]}" already exists',
                            {'name': meta['name'], 'group': rtype.group, 'kind': rtype.plural})
        obj, warnings = self._admit(rtype, obj, None, field_validation)
        meta = obj['metadata']
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now_rfc3339()
        meta['generation'] = 1
        served = None
        if rtype.key == ('apiextensions.k8s.io', 'v1', 'customresourcedefinitions'):
            try:
                served = ResourceType.from_crd(obj)
            except Exception as exc:  # a CRD the emulator cannot serve is refused, not half-stored
                raise api_error(422, 'Invalid', f'CustomResourceDefinition.apiextensions.k8s.io "{meta["name"]}" is invalid: {exc}') from None
        if dry_run:
            return obj, warnings
        self._commit(rtype, obj, None, 'ADDED')
        if served is not None:
            self.declare(served)  # served right away: the emulator has no "Established" delay
        self._collect_orphan_if_dangling(rtype, obj)
        return obj, warnings

    def _collect_orphan_if_dangling(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        # The GC deletes objects whose owners are all absent, even when created that way.
        refs = obj['metadata'].get('ownerReferences') or []
        if refs and not any(ref.get('uid') in self._by_uid for ref in refs):
            self._delete_object(rtype, obj, 'Background')

    def _update(self, target: _Target, current: dict[str, Any], desired: dict[str, Any],
                field_validation: str, dry_run: bool) -> tuple[dict[str, Any], list[str]]:
        """Store `desired` as the next state of `current`, with the API server's rules."""
        rtype = target.rtype
        desired = self._check_body(rtype, desired, target)
        meta, cur_meta = desired['metadata'], current['metadata']
        if meta.get('name', cur_meta['name']) != cur_meta['name']:
            raise api_error(400, 'BadRequest', 'the name of the object does not match the name on the URL')
        expected_rv = meta.get('resourceVersion')
        if expected_rv and expected_rv != cur_meta['resourceVersion']:
            raise api_error(409, 'Conflict', f'Operation cannot be fulfilled on {rtype.qualified} "{cur_meta["name"]}": '
                                             'the object has been modified; please apply your changes to the latest version and try again',
                            {'name': cur_meta['name'], 'group': rtype.group, 'kind': rtype.plural})
        if target.subresource == 'status':
            new = {**copy.deepcopy(current), 'status': desired.get('status')}
            if new['status'] is None:
                del new['status']
        else:
            new = desired
            if rtype.has_status:
                if 'status' in current:
                    new['status'] = copy.deepcopy(current['status'])
                else:
                    new.pop('status', None)
            for key in ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'generation', 'name', 'namespace'):
                if key in cur_meta:
                    meta[key] = cur_meta[key]
                else:
                    meta.pop(key, None)
            if cur_meta.get('deletionTimestamp'):
                added = set(meta.get('finalizers') or []) - set(cur_meta.get('finalizers') or [])
                if added:
                    raise api_error(422, 'Forbidden', f'{rtype.kind} "{cur_meta["name"]}" is invalid: metadata.finalizers: '
                                                      f'Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}')
        new['metadata']['resourceVersion'] = cur_meta['resourceVersion']
        new, warnings = self._admit(rtype, new, current, field_validation)
        if new == current:
            return current, warnings  # a no-op write does not bump resourceVersion, as in the API server
        ignored = {'metadata', 'status'} if rtype.has_status else {'metadata'}
        if {k: v for k, v in new.items() if k not in ignored} != {k: v for k, v in current.items() if k not in ignored}:
            new['metadata']['generation'] = cur_meta.get('generation', 1) + 1
        if dry_run:
            return new, warnings
        self._commit(rtype, new, current, 'MODIFIED')
        if new['metadata'].get('deletionTimestamp') and not new['metadata'].get('finalizers'):
            self._remove(rtype, new)
        return new, warnings

    def _replace(self, target: _Target, body: Any, field_validation: str, dry_run: bool) -> tuple[dict[str, Any], list[str], bool]:
        current = self._get_or_404(target.rtype, target.namespace, target.name)
        body_rv = (body.get('metadata') or {}).get('resourceVersion') if isinstance(body, dict) else None
        if not body_rv and target.rtype.validator is not None:
            # Custom resources refuse unconditional updates (built-ins allow them).
            raise api_error(422, 'Invalid', f'{target.rtype.kind}.{target.rtype.group} "{target.name}" is invalid: '
                                            'metadata.resourceVersion: Invalid value: 0: must be specified for an update')
        obj, warnings = self._update(target, current, body, field_validation, dry_run)
        return obj, warnings, False

    def _patch(self, target: _Target, body: Any, content_type: str, params: Mapping[str, str],
               field_validation: str, dry_run: bool) -> tuple[dict[str, Any], list[str], bool]:
        rtype = target.rtype
        current = self.peek(rtype, target.namespace, target.name or '')
        if content_type == 'application/apply-patch+yaml':
            if not params.get('fieldManager'):
                raise api_error(422, 'Invalid', 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch')
            if current is None:
                if target.subresource:
                    raise self._not_found(rtype, target.name)
                body = {**(body or {}), 'metadata': {**((body or {}).get('metadata') or {}), 'name': target.name}}
                obj, warnings = self._create(dataclasses.replace(target, name=None), body, field_validation, dry_run)
                return obj, warnings, True
        if current is None:
            raise self._not_found(rtype, target.name)
        try:
            if content_type == 'application/json-patch+json':
                desired = json_patch(current, body)
            elif content_type in ('application/merge-patch+json', 'application/strategic-merge-patch+json',
                                  'application/apply-patch+yaml'):
                # Strategic merge has no patch strategies for CRDs: it is a merge patch there.
                # Apply is simplified to a merge of the applied configuration (no field managers).
                if not isinstance(body, dict):
                    raise PatchError('a merge patch must be a JSON object', status=400)
                desired = merge_patch(current, body)
            else:
                raise api_error(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format - accepted media types include: '
                                                             'application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml')
        except PatchError as exc:
            reason = 'Invalid' if exc.status == 422 else 'BadRequest'
            raise api_error(exc.status, reason, str(exc)) from None
        if (body if isinstance(body, dict) else {}).get('metadata', {}).get('resourceVersion') is None:
            desired.setdefault('metadata', {}).pop('resourceVersion', None)  # an unconditional patch
        obj, warnings = self._update(target, current, desired, field_validation, dry_run)
        return obj, warnings, False

    def _delete(self, target: _Target, options: dict[str, Any], params: Mapping[str, str], dry_run: bool) -> dict[str, Any]:
        rtype = target.rtype
        current = self._get_or_404(rtype, target.namespace, target.name)
        preconditions = options.get('preconditions') or {}
        for key in ('uid', 'resourceVersion'):
            if preconditions.get(key) and preconditions[key] != current['metadata'].get(key):
                raise api_error(409, 'Conflict', f'Operation cannot be fulfilled on {rtype.qualified} "{target.name}": '
                                                 f'Precondition failed: {key}: {preconditions[key]}, {key} in object meta: {current["metadata"].get(key)}')
        if dry_run:
            return current
        propagation = params.get('propagationPolicy') or options.get('propagationPolicy') or 'Background'
        if options.get('orphanDependents') is True:
            propagation = 'Orphan'
        return self._delete_object(rtype, current, propagation)

    def _delete_collection(self, target: _Target, options: dict[str, Any], params: Mapping[str, str], dry_run: bool) -> dict[str, Any]:
        listing = self._list(target, params, '')
        propagation = params.get('propagationPolicy') or options.get('propagationPolicy') or 'Background'
        if not dry_run:
            for obj in listing['items']:
                current = self.peek(target.rtype, obj['metadata'].get('namespace'), obj['metadata']['name'])
                if current is not None:
                    self._delete_object(target.rtype, current, propagation)
        return listing

    def close_watches(self) -> None:
        """End every open watch stream (for a prompt server shutdown)."""
        self._closing = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)


@attrs.mutable
class EmulatorServer(kmock.Server):
    """kmock's server, optionally over TLS, and without kmock's process-wide aiohttp DNS patch:
    that patch is a class attribute of aiohttp's connector, so several emulators in several
    threads would unpatch it out of order."""

    ssl_context: ssl.SSLContext | None = attrs.field(default=None, kw_only=True)

    async def __aenter__(self) -> EmulatorServer:
        server = self._server_cls(self.handler, host=self._host, port=self._port)
        await server.start_server(ssl=self.ssl_context)  # BaseTestServer.__aenter__ cannot pass ssl
        self._managed_server = server
        await server.__aenter__()
        self._managed_client = self._client_fct(server.make_url('/'))
        await self._managed_client.__aenter__()
        self.handler.servers.append(self)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.handler.servers.remove(self)
        assert self._managed_client is not None and self._managed_server is not None
        await self._managed_client.__aexit__(*exc_info)
        await self._managed_server.__aexit__(*exc_info)
        self._managed_client = self._managed_server = None


def self_signed_tls(directory: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1/localhost.

    kubectl (client-go) sends bearer tokens only over TLS (kubernetes/kubectl#744), so kubectl
    talks to the HTTPS listener; kopf and the tests may use either."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'kube-emulator')])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName('localhost'),
                                                        x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / 'tls.crt', directory / 'tls.key'
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


class EmulatorThread:
    """Runs an emulator on its own event loop in a daemon thread (for pytest fixtures).

    It listens on plain HTTP (`url`) and, given a `tls_dir`, also on HTTPS (`https_url`,
    self-signed) for kubectl; both are kmock servers of the same handler."""

    def __init__(self, emulator: KubeEmulator, host: str = '127.0.0.1', port: int | None = None,
                 tls_dir: Path | None = None, https_port: int | None = None) -> None:
        self.emulator = emulator
        self.host, self.port, self.https_port = host, port, https_port
        self.tls_dir = tls_dir
        self.url = ''
        self.https_url = ''
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name='kube-emulator', daemon=True)

    def start(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError('the emulator failed to start') from self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start() or visible to stop()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.emulator)
            server = await stack.enter_async_context(EmulatorServer(self.emulator, host=self.host, port=self.port))
            self.url, self.port = str(server.url).rstrip('/'), server.port
            if self.tls_dir is not None:
                secure = await stack.enter_async_context(EmulatorServer(
                    self.emulator, host=self.host, port=self.https_port, ssl_context=self_signed_tls(self.tls_dir)))
                self.https_url, self.https_port = str(secure.url).rstrip('/'), secure.port
            self._ready.set()
            await self._stopped.wait()
            self.emulator.close_watches()
            await asyncio.sleep(0.05)  # let the watch handlers write their EOFs

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a function on the emulator's loop (where its state lives) and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        if self.loop is not None and self._stopped is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(30)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def make_emulator(tokens: dict[str, str] | None = None, crds: Iterable[str | Path] = (),
                  **kwargs: Any) -> KubeEmulator:
    """An emulator serving the built-ins, the project's CRD, KubeRay's RayCluster CRD (when the
    reference copy exists) and any extra CRD files."""
    emulator = KubeEmulator(tokens=dict(tokens or {}), **kwargs)
    emulator.declare_crd(PROJECT_CRD)
    if KUBERAY_CRD.exists():
        emulator.declare_crd(KUBERAY_CRD, 'v1')
    for crd in crds:
        emulator.declare_crd(crd)
    return emulator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description='Serve the Kubernetes API emulator on a TCP port.')
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0, help='plain HTTP port; 0 picks a free one (printed)')
    parser.add_argument('--https-port', type=int, default=0, help='HTTPS port (self-signed, for kubectl); 0 picks one')
    parser.add_argument('--token', action='append', default=[], metavar='IDENTITY=TOKEN',
                        help='a bearer token and the identity it stands for (repeatable); '
                             'default: admin=<random, printed>')
    parser.add_argument('--crd', action='append', default=[], help='an extra CRD YAML file (repeatable)')
    parser.add_argument('--kubeconfig', help='write a kubeconfig for the first token here')
    args = parser.parse_args(argv)
    tokens = dict(reversed(item.split('=', 1)) for item in args.token) or {secrets_module.token_urlsafe(24): 'admin'}
    emulator = make_emulator(tokens, args.crd)
    tls_dir = Path(tempfile.mkdtemp(prefix='kube-emulator-tls-'))
    runner = EmulatorThread(emulator, args.host, args.port or None, tls_dir, args.https_port or None).start()
    token = next(iter(tokens))
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, runner.https_url, token)
    print(json.dumps({'url': runner.url, 'https_url': runner.https_url, 'token': token,
                      'identity': tokens[token], 'kubeconfig': args.kubeconfig}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    runner.stop()


def write_kubeconfig(path: str | Path, url: str, token: str, namespace: str = 'default') -> Path:
    config = {
        'apiVersion': 'v1', 'kind': 'Config', 'current-context': 'emulator',
        # The certificate is self-signed and throwaway: no verification, as for a kind cluster's
        # ad-hoc access; client-go would not send the token over plain http at all.
        'clusters': [{'name': 'emulator', 'cluster': {'server': url, 'insecure-skip-tls-verify': url.startswith('https')}}],
        'users': [{'name': 'emulator', 'user': {'token': token}}],
        'contexts': [{'name': 'emulator', 'context': {'cluster': 'emulator', 'user': 'emulator', 'namespace': namespace}}],
    }
    path = Path(path)
    path.write_text(yaml.safe_dump(config))
    return path


if __name__ == '__main__':
    main()
