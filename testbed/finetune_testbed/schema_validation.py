"""Admission of custom objects against their CRD, in the API server's order and wording.

Order, as kube-apiserver does it for a structural CRD: prune nulls of non-nullable fields, apply
`default`s, drop or reject unknown fields, validate the OpenAPI v3 schema, then evaluate the
`x-kubernetes-validations` CEL rules. CEL runs on the `common-expression-language` package (import
`cel`), deliberately not cel-python, which the project's own validator uses: the two can be
compared.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cel
import jsonschema
import yaml


@dataclasses.dataclass(frozen=True)
class Cause:
    """One entry of a Status' `details.causes`."""
    field: str
    message: str
    reason: str = 'FieldValueInvalid'

    def as_dict(self) -> dict[str, str]:
        return {'reason': self.reason, 'message': self.message, 'field': self.field}


class AdmissionError(Exception):
    """A write the API server refuses; rendered as a Kubernetes Status."""

    def __init__(self, causes: list[Cause], *, status: int = 422, reason: str = 'Invalid',
                 message: str | None = None) -> None:
        super().__init__(message or '; '.join(f'{c.field}: {c.message}' for c in causes))
        self.causes = causes
        self.status = status
        self.reason = reason
        self.message = message


def format_value(value: Any) -> str:
    """How Go's field.Invalid prints a value: strings quoted, numbers bare, objects as JSON."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return 'null'
    return json.dumps(value, separators=(',', ':'))


def _type_name(value: Any) -> str:
    return ('object' if isinstance(value, dict) else 'array' if isinstance(value, list) else
            'boolean' if isinstance(value, bool) else 'integer' if isinstance(value, int) else
            'number' if isinstance(value, float) else 'string' if isinstance(value, str) else 'null')


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f'{path}[{key}]'
    if not re.fullmatch(r'[A-Za-z0-9_$-]+', key):  # Kubernetes prints odd map keys in brackets
        return f'{path}[{key}]'
    return f'{path}.{key}' if path else key


def to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (Kubernetes flavour) → JSON Schema draft 4, which keeps the boolean
    `exclusiveMinimum`/`exclusiveMaximum` of OpenAPI v3 with the same meaning."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith('x-kubernetes-') or key in ('nullable', 'description', 'default',
                                                      'example', 'format'):
            continue  # validation-free annotations; `format` is not enforced for CRDs here
        if key == 'properties':
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ('items', 'not') and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key == 'additionalProperties' and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ('allOf', 'anyOf', 'oneOf'):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if schema.get('x-kubernetes-int-or-string'):
        out.pop('type', None)
        out.setdefault('anyOf', [{'type': 'integer'}, {'type': 'string'}])
    if schema.get('nullable') and 'type' in out:
        out['type'] = [out['type'], 'null']
        if 'enum' in out:
            out['enum'] = [*out['enum'], None]
    return out


class SchemaWalker:
    """Structural passes over an object guided by its OpenAPI schema (pruning, defaulting)."""

    @staticmethod
    def _prop_schema(schema: dict[str, Any], key: str) -> dict[str, Any] | None:
        props = schema.get('properties')
        if props is not None and key in props:
            return props[key]
        additional = schema.get('additionalProperties')
        if isinstance(additional, dict):
            return additional
        if additional is True or schema.get('x-kubernetes-preserve-unknown-fields'):
            return {'x-kubernetes-preserve-unknown-fields': True}
        return None

    def prune_nulls(self, value: Any, schema: dict[str, Any]) -> Any:
        if isinstance(value, dict):
            for key in list(value):
                sub = self._prop_schema(schema, key)
                if value[key] is None and sub is not None and not sub.get('nullable'):
                    del value[key]
                elif sub is not None:
                    self.prune_nulls(value[key], sub)
        elif isinstance(value, list) and isinstance(schema.get('items'), dict):
            for item in value:
                self.prune_nulls(item, schema['items'])
        return value

    def apply_defaults(self, value: Any, schema: dict[str, Any]) -> Any:
        if isinstance(value, dict):
            for key, sub in (schema.get('properties') or {}).items():
                if key not in value and 'default' in sub:
                    value[key] = copy.deepcopy(sub['default'])
            for key in list(value):
                sub = self._prop_schema(schema, key)
                if sub is not None:
                    self.apply_defaults(value[key], sub)
        elif isinstance(value, list) and isinstance(schema.get('items'), dict):
            for item in value:
                self.apply_defaults(item, schema['items'])
        return value

    def unknown_fields(self, value: Any, schema: dict[str, Any], path: tuple[str | int, ...] = ()
                       ) -> Iterator[tuple[str | int, ...]]:
        """Paths (as key tuples: formatting is paid only for the few found) of unknown fields."""
        if schema.get('x-kubernetes-preserve-unknown-fields') and 'properties' not in schema:
            return
        if isinstance(value, dict) and (schema.get('type') == 'object' or 'properties' in schema
                                        or 'additionalProperties' in schema):
            for key in list(value):
                sub = self._prop_schema(schema, key)
                if sub is None:
                    yield (*path, key)
                elif isinstance(value[key], (dict, list)):
                    yield from self.unknown_fields(value[key], sub, (*path, key))
        elif isinstance(value, list) and isinstance(schema.get('items'), dict):
            for index, item in enumerate(value):
                if isinstance(item, (dict, list)):
                    yield from self.unknown_fields(item, schema['items'], (*path, index))

    def drop_unknown(self, value: Any, schema: dict[str, Any]) -> Any:
        if schema.get('x-kubernetes-preserve-unknown-fields') and 'properties' not in schema:
            return value
        if isinstance(value, dict) and (schema.get('type') == 'object' or 'properties' in schema
                                        or 'additionalProperties' in schema):
            for key in list(value):
                sub = self._prop_schema(schema, key)
                if sub is None:
                    del value[key]
                else:
                    self.drop_unknown(value[key], sub)
        elif isinstance(value, list) and isinstance(schema.get('items'), dict):
            for item in value:
                self.drop_unknown(item, schema['items'])
        return value

    def cel_nodes(self, value: Any, schema: dict[str, Any], path: tuple[str | int, ...] = ()
                  ) -> Iterator[tuple[Any, dict[str, Any], tuple[str | int, ...]]]:
        """(value, schema, path) of every node whose schema carries CEL rules, outermost last."""
        if isinstance(value, dict):
            for key, item in value.items():
                sub = self._prop_schema(schema, key)
                if sub is not None and (isinstance(item, (dict, list)) or 'x-kubernetes-validations' in sub):
                    yield from self.cel_nodes(item, sub, (*path, key))
        elif isinstance(value, list) and isinstance(schema.get('items'), dict):
            for index, item in enumerate(value):
                yield from self.cel_nodes(item, schema['items'], (*path, index))
        if schema.get('x-kubernetes-validations') and value is not None:
            yield value, schema, path


def format_path(keys: tuple[str | int, ...]) -> str:
    path = ''
    for key in keys:
        path = _join(path, key)
    return path


def _schema_error_cause(error: jsonschema.ValidationError) -> Cause:
    path = ''
    for key in error.absolute_path:
        path = _join(path, key)
    value, keyword, bound = error.instance, error.validator, error.validator_value
    shown = format_value(value)
    if keyword == 'required':
        missing = re.search(r"'([^']+)' is a required property", error.message)
        field = _join(path, missing.group(1)) if missing else path
        return Cause(field, 'Required value', 'FieldValueRequired')
    if keyword == 'enum':
        options = ', '.join(format_value(option) for option in bound if option is not None)
        return Cause(path, f'Unsupported value: {shown}: supported values: {options}',
                     'FieldValueNotSupported')
    if keyword == 'type' or (keyword == 'anyOf' and error.schema.get('x-kubernetes-int-or-string')):
        expected = bound if isinstance(bound, str) else ' or '.join(
            t for t in (bound if isinstance(bound, list) else ['integer', 'string']) if t != 'null')
        return Cause(path, f'Invalid value: {shown}: {path} in body must be of type {expected}: '
                           f'"{_type_name(value)}"', 'FieldValueTypeInvalid')
    if keyword in ('maxLength', 'maxItems', 'maxProperties'):
        unit = {'maxLength': 'bytes', 'maxItems': 'items', 'maxProperties': 'properties'}[keyword]
        return Cause(path, f'Too long: may not be more than {bound} {unit}', 'FieldValueTooLong')
    if keyword in ('minLength', 'minItems', 'minProperties'):
        unit = {'minLength': 'chars long', 'minItems': 'items', 'minProperties': 'properties'}[keyword]
        return Cause(path, f'Invalid value: {shown}: {path} in body should be at least {bound} {unit}')
    if keyword == 'minimum':
        op = 'greater than' if error.schema.get('exclusiveMinimum') else 'greater than or equal to'
        return Cause(path, f'Invalid value: {shown}: {path} in body should be {op} {format_value(bound)}')
    if keyword == 'maximum':
        op = 'less than' if error.schema.get('exclusiveMaximum') else 'less than or equal to'
        return Cause(path, f'Invalid value: {shown}: {path} in body should be {op} {format_value(bound)}')
    if keyword == 'pattern':
        return Cause(path, f"Invalid value: {shown}: {path} in body should match '{bound}'")
    return Cause(path, f'Invalid value: {shown}: {error.message}')


def _expand_field_path(base: str, field_path: str) -> str:
    # fieldPath is relative to the rule's node: `.a.b`, `.a['key']` or `.list[0]`.
    out = base
    for match in re.finditer(r"\.([A-Za-z0-9_$-]+)|\['([^']*)'\]|\[(\d+)\]", field_path):
        name, quoted, index = match.groups()
        out = _join(out, int(index) if index is not None else name if name is not None else quoted)
    return out


@dataclasses.dataclass
class _Rule:
    program: Any
    source: str
    message: str | None
    field_path: str | None
    reason: str
    transition: bool
    # The top-level fields a root-level rule reads (None: all, as `self` is used whole); the
    # others are left out of its context, which costs a conversion per field per object.
    reads: frozenset[str] | None = None


class CrdSchemaValidator:
    """Admission of one version of one CRD: defaults, pruning, structural schema, CEL rules."""

    def __init__(self, crd: dict[str, Any], version: str | None = None) -> None:
        spec = crd['spec']
        versions = spec['versions']
        chosen = next((v for v in versions if v['name'] == version), None) if version else \
            next((v for v in versions if v.get('storage')), versions[0])
        if chosen is None:
            raise ValueError(f'{crd["metadata"]["name"]} has no version {version!r}')
        self.crd = crd
        self.group: str = spec['group']
        self.version: str = chosen['name']
        self.kind: str = spec['names']['kind']
        self.list_kind: str = spec['names'].get('listKind', self.kind + 'List')
        self.plural: str = spec['names']['plural']
        self.singular: str = spec['names'].get('singular', self.kind.lower())
        self.short_names: list[str] = spec['names'].get('shortNames', [])
        self.categories: list[str] = spec['names'].get('categories', [])
        self.namespaced: bool = spec.get('scope', 'Namespaced') == 'Namespaced'
        self.subresources: list[str] = sorted((chosen.get('subresources') or {}).keys())
        self.schema: dict[str, Any] = chosen['schema']['openAPIV3Schema']
        # metadata is ObjectMeta, validated by the emulator itself, never by the CRD schema.
        self._body_schema = copy.deepcopy(self.schema)
        self._body_schema.get('properties', {}).pop('metadata', None)
        json_schema = to_json_schema(self._body_schema)
        jsonschema.Draft4Validator.check_schema(json_schema)
        self._validator = jsonschema.Draft4Validator(json_schema)
        self._walker = SchemaWalker()
        self._rules: dict[int, list[_Rule]] = {}
        self._compile_rules(self._body_schema)
        self._has_transition_rules = any(rule.transition for rules in self._rules.values() for rule in rules)
        self._verdicts: dict[str, list[Cause]] = {}  # insertion-ordered: the oldest goes first
        # Top-level fields that ratchet (see admit): the object-valued ones, as spec and status.
        self._ratcheted = frozenset(key for key, sub in self._body_schema.get('properties', {}).items()
                                    if sub.get('type') == 'object')
        self._ratchet_validators: dict[frozenset[str], jsonschema.Draft4Validator] = {}
        self._verdicts_lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, version: str | None = None) -> CrdSchemaValidator:
        return cls(yaml.safe_load(Path(path).read_text()), version)

    def _compile_rules(self, schema: Any) -> None:
        if isinstance(schema, dict):
            rules = schema.get('x-kubernetes-validations')
            if rules:
                self._rules[id(schema)] = [_Rule(
                    program=cel.compile(rule['rule']), source=rule['rule'],
                    message=rule.get('message'), field_path=rule.get('fieldPath'),
                    reason=rule.get('reason', 'FieldValueInvalid'),
                    transition='oldSelf' in rule['rule'],
                    reads=_top_level_reads(rule['rule']),
                ) for rule in rules]
            for value in schema.values():
                self._compile_rules(value)
        elif isinstance(schema, list):
            for value in schema:
                self._compile_rules(value)

    def admit(self, obj: dict[str, Any], *, old: dict[str, Any] | None = None,
              field_validation: str = 'Strict') -> tuple[dict[str, Any], list[str]]:
        """The object as it would be stored (pruned, defaulted) and the warnings to send.

        Raises AdmissionError: 400 BadRequest for unknown fields under Strict field validation,
        422 Invalid for schema and CEL rule violations (all causes collected, as the API server).
        """
        metadata = obj.get('metadata')
        body = {key: value for key, value in copy.deepcopy(obj).items() if key != 'metadata'}
        self._walker.prune_nulls(body, self._body_schema)
        self._walker.apply_defaults(body, self._body_schema)

        warnings: list[str] = []
        unknown = [format_path(keys) for keys in self._walker.unknown_fields(body, self._body_schema)
                   if keys not in (('apiVersion',), ('kind',))]
        if unknown and field_validation == 'Strict':
            text = ', '.join(f'unknown field "{path}"' for path in unknown)
            raise AdmissionError(
                [Cause(path, f'unknown field "{path}"', 'FieldValueInvalid') for path in unknown],
                status=400, reason='BadRequest',
                message=f'{self.kind} in version "{self.version}" cannot be handled as a '
                        f'{self.kind}: strict decoding error: {text}')
        if unknown and field_validation == 'Warn':
            warnings += [f'unknown field "{path}"' for path in unknown]
        self._walker.drop_unknown(body, self._body_schema)

        # Validation ratcheting (Kubernetes 1.30+, on by default): on an update, errors in a field
        # equal to its stored value are not reported. Done per top-level field (spec, status): a
        # status write does not validate the unchanged spec again, nor run its non-transition
        # rules; a stored spec that today's schema refuses does not block status writes.
        unchanged = frozenset(key for key, value in body.items()
                              if old is not None and key in self._ratcheted and old.get(key) == value)
        old_body = {k: v for k, v in old.items() if k != 'metadata'} if old and self._has_transition_rules else None
        # Validation is a pure function of the body (and, with transition rules, the old body):
        # benchmarks write thousands of near-identical objects, so verdicts are memoized.
        checked = {key: value for key, value in body.items() if key not in unchanged}
        cache_key = json.dumps([checked, old_body, sorted(unchanged)], sort_keys=True)
        with self._verdicts_lock:
            causes = self._verdicts.get(cache_key)
        if causes is None:
            validator = self._validator_skipping(unchanged)
            causes = [_schema_error_cause(error)
                      for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))]
            if not causes:
                causes = self._evaluate_rules(body, old_body, unchanged)
            with self._verdicts_lock:  # validators are shared by emulators on several threads
                if len(self._verdicts) >= 4096:
                    self._verdicts.pop(next(iter(self._verdicts)))
                self._verdicts[cache_key] = causes
        if not causes and self._rules.get(id(self._body_schema)):
            # Root-level rules also see metadata.name and generateName (and nothing else of
            # ObjectMeta): evaluated per object, outside the memo, as names differ.
            names = {key: metadata[key] for key in ('name', 'generateName')
                     if isinstance(metadata, dict) and key in metadata}
            causes = self._evaluate_node({**body, 'metadata': names}, self._body_schema, (),
                                         old_body, unchanged)
        if causes:
            raise AdmissionError(list(causes))
        body['metadata'] = metadata
        stored = {'apiVersion': body.pop('apiVersion', f'{self.group}/{self.version}'),
                  'kind': body.pop('kind', self.kind), 'metadata': body.pop('metadata'), **body}
        return stored, warnings

    def _validator_skipping(self, keys: frozenset[str]) -> jsonschema.Draft4Validator:
        """The schema validator with the top-level properties `keys` accepting anything."""
        if not keys:
            return self._validator
        with self._verdicts_lock:
            validator = self._ratchet_validators.get(keys)
            if validator is None:
                schema = dict(self._validator.schema)
                schema['properties'] = {**schema.get('properties', {}), **{key: {} for key in keys}}
                validator = self._ratchet_validators[keys] = jsonschema.Draft4Validator(schema)
        return validator

    def _evaluate_rules(self, body: dict[str, Any], old_body: dict[str, Any] | None,
                        unchanged: frozenset[str] = frozenset()) -> list[Cause]:
        """The rules of every node but the root (see admit)."""
        causes: list[Cause] = []
        for value, schema, keys in self._walker.cel_nodes(body, self._body_schema):
            if keys:
                causes += self._evaluate_node(value, schema, keys, old_body, unchanged)
        return causes

    def _evaluate_node(self, value: Any, schema: dict[str, Any], keys: tuple[str | int, ...],
                       old_body: dict[str, Any] | None, unchanged: frozenset[str]) -> list[Cause]:
        causes: list[Cause] = []
        path = format_path(keys)
        ratcheted = bool(keys) and keys[0] in unchanged
        for rule in self._rules.get(id(schema), []):
            if ratcheted and not rule.transition:
                continue  # an unchanged value; rules that compare with oldSelf still run
            context: dict[str, Any] = {'self': value}
            if not keys and rule.reads is not None:
                context['self'] = {key: value[key] for key in rule.reads if key in value}
            if rule.transition:
                old_value = _lookup(old_body, path)
                if old_value is None:
                    continue  # transition rules only run on updates of an existing value
                context['oldSelf'] = old_value
            field = _expand_field_path(path, rule.field_path) if rule.field_path else path
            try:
                ok = rule.program.execute(context)
            except Exception as exc:  # a rule erroring at runtime is a validation failure too
                causes.append(Cause(field, f'Invalid value: "{_type_name(value)}": '
                                           f'rule evaluation error: {exc}', rule.reason))
                continue
            if ok is not True:
                message = rule.message or f'failed rule: {rule.source}'
                causes.append(Cause(field, f'Invalid value: "{_type_name(value)}": {message}',
                                    rule.reason))
        return causes


def _top_level_reads(source: str) -> frozenset[str] | None:
    """The fields of `self` a rule names (`self.spec...`), or None when it uses `self` whole."""
    uses = re.findall(r'\bself\b(\.[A-Za-z_][A-Za-z0-9_]*)?', source)
    if any(not use for use in uses):
        return None
    return frozenset(use[1:] for use in uses)


def _lookup(body: Any, path: str) -> Any:
    value = body
    for match in re.finditer(r'([A-Za-z0-9_$-]+)|\[(\d+)\]|\[([^\]]*)\]', path):
        name, index, odd = match.groups()
        if value is None:
            return None
        if index is not None:
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
        else:
            value = value.get(name if name is not None else odd) if isinstance(value, dict) else None
    return value
