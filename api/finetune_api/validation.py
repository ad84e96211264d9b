"""Validates FineTuneJob documents offline, the way the API server admits them.

The steps follow the API server's order for a custom resource: null values of non-nullable
fields are pruned, unknown fields are refused (kubectl's default strict field validation),
defaults are applied, the OpenAPI schema is checked, then the CEL rules
(`x-kubernetes-validations`) run on the defaulted object. The schema is `schema.py` itself,
so this validator cannot drift from the CRD.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import celpy

from . import API_VERSION, KIND
from .schema import Schema, openapi_schema


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ValidationError(ValueError):
    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def _json_type_ok(value: Any, schema: Schema) -> bool:
    expected = schema.get("type")
    if expected is None:
        return True
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return type(value).__name__ if not isinstance(value, dict) else "object"
    return str(value)


class _Validator:
    def __init__(self, rules: bool = True) -> None:
        self.errors: list[FieldError] = []
        self.rules = rules

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    # -- pruning, unknown fields and defaulting ----------------------------------------------
    def normalize(self, value: Any, schema: Schema, path: str) -> Any:
        if not isinstance(value, dict) or schema.get("type") != "object":
            if isinstance(value, list) and "items" in schema:
                return [self.normalize(item, schema["items"], f"{path}[{i}]")
                        for i, item in enumerate(value)]
            return value
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not path and key == "metadata":
                # ObjectMeta is the API server's own type, never pruned by the CRD's schema
                # (which may only constrain its name and generateName).
                out[key] = item
                continue
            child = (props or {}).get(key)
            if child is None and isinstance(extra, dict):
                child = extra
            if child is None:
                if props is None:  # an object with no declared fields (metadata) keeps all
                    out[key] = item
                else:
                    self.error(f"{path}.{key}" if path else key, "unknown field")
                continue
            if item is None and not child.get("nullable"):
                continue  # pruned, as the API server does
            out[key] = self.normalize(item, child, f"{path}.{key}" if path else key)
        for key, child in (props or {}).items():
            if key not in out and "default" in child:
                out[key] = self.normalize(copy.deepcopy(child["default"]), child,
                                          f"{path}.{key}" if path else key)
        return out

    # -- OpenAPI checks ------------------------------------------------------------------------
    def check(self, value: Any, schema: Schema, path: str) -> bool:
        """Checks `value`; returns True when this subtree is structurally valid."""
        if value is None:
            if schema.get("nullable"):
                return True
            self.error(path, "Required value: must not be null")
            return False
        if not _json_type_ok(value, schema):
            self.error(path, f"Invalid value: {_describe(value)}: must be of type "
                             f"{schema['type']}")
            return False
        before = len(self.errors)
        if "enum" in schema and value not in schema["enum"]:
            allowed = ", ".join(_describe(v) for v in schema["enum"])
            self.error(path, f"Unsupported value: {_describe(value)}: supported values: "
                             f"{allowed}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema:
                if schema.get("exclusiveMinimum") and value <= schema["minimum"]:
                    self.error(path, f"Invalid value: {value}: must be greater than "
                                     f"{schema['minimum']}")
                elif value < schema["minimum"]:
                    self.error(path, f"Invalid value: {value}: must be greater than or "
                                     f"equal to {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                self.error(path, f"Invalid value: {value}: must be less than or equal to "
                                 f"{schema['maximum']}")
        if isinstance(value, str):
            if "minLength" in schema and len(value) < schema["minLength"]:
                self.error(path, f"Invalid value: {_describe(value)}: should be at least "
                                 f"{schema['minLength']} chars long")
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                self.error(path, f"Too long: may not be more than {schema['maxLength']} "
                                 f"bytes")
            if "pattern" in schema and not re.search(schema["pattern"], value):
                self.error(path, f"Invalid value: {_describe(value)}: should match "
                                 f"'{schema['pattern']}'")
        if isinstance(value, list):
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                self.error(path, f"Too many: {len(value)}: must have at most "
                                 f"{schema['maxItems']} items")
            for i, item in enumerate(value):
                self.check(item, schema.get("items", {}), f"{path}[{i}]")
        if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key in schema.get("required", []):
                if key not in value:
                    self.error(f"{path}.{key}" if path else key, "Required value")
            props = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                child = props.get(key, extra if isinstance(extra, dict) else None)
                if child is not None:
                    self.check(item, child, f"{path}.{key}" if path else key)
        ok = len(self.errors) == before
        if self.rules and (ok or not path and self._metadata_sound(value, before)):
            self.run_rules(value, schema, path)
        return ok

    def _metadata_sound(self, doc: Any, before: int) -> bool:
        # Root rules read only metadata.name/generateName (all that a CRD's rules may see of
        # ObjectMeta), so they run whenever metadata is sound, next to errors in the spec.
        return isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) and not any(
            e.path.startswith("metadata") for e in self.errors[before:])

    # -- CEL ---------------------------------------------------------------------------------
    def run_rules(self, value: Any, schema: Schema, path: str) -> None:
        for spec in schema.get("x-kubernetes-validations", []):
            program = _compiled(spec["rule"])
            reads = _top_level_reads(spec["rule"]) if not path else None
            seen = value if reads is None else {  # a root rule converts only what it reads
                key: value[key] for key in reads if key in value}
            try:
                result = program.evaluate({"self": celpy.json_to_cel(seen)})
            except Exception as exc:  # a rule that cannot evaluate is an admission error too
                self.error(path, f"Invalid value: rule {spec['rule']!r} failed: {exc}")
                continue
            if isinstance(result, Exception) or not bool(result):
                field = (path + spec.get("fieldPath", "")).lstrip(".")
                self.error(field or path, f"Invalid value: {spec['message']}")


@lru_cache(maxsize=None)
def _top_level_reads(expression: str) -> frozenset[str] | None:
    """The fields of `self` a rule names (`self.metadata...`), None when it uses `self` whole."""
    uses = re.findall(r"\bself\b(\.[A-Za-z_][A-Za-z0-9_]*)?", expression)
    if any(not use for use in uses):
        return None
    return frozenset(use[1:] for use in uses)


@lru_cache(maxsize=None)
def _compiled(expression: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def _check_header(doc: dict[str, Any]) -> list[FieldError]:
    errors = []
    if doc.get("apiVersion") != API_VERSION:
        errors.append(FieldError("apiVersion", f"Unsupported value: "
                                 f"{_describe(doc.get('apiVersion'))}: must be {API_VERSION}"))
    if doc.get("kind") != KIND:
        errors.append(FieldError("kind", f"Unsupported value: {_describe(doc.get('kind'))}: "
                                 f"must be {KIND}"))
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or not (metadata.get("name")
                                              or metadata.get("generateName")):
        # Only the API server can say this one: CEL never sees a job without a name.
        errors.append(FieldError("metadata.name", "Required value: name or generateName is "
                                 "required"))
    return errors


def admit(doc: Any, *, rules: bool = True) -> dict[str, Any]:
    """Returns the defaulted document, or raises ValidationError listing every problem.

    `rules=False` skips the CEL rules (the structural checks and defaults still run): for a
    document the API server already admitted with the same `x-kubernetes-validations`, where
    running them again in celpy costs milliseconds per document and finds nothing.
    """
    if not isinstance(doc, dict):
        raise ValidationError([FieldError("", "a FineTuneJob must be a YAML mapping")])
    errors = _check_header(doc)
    if errors and any(e.path in ("apiVersion", "kind") for e in errors):
        raise ValidationError(errors)
    validator = _Validator(rules)
    body = {k: v for k, v in doc.items() if k != "status"}
    schema = openapi_schema()
    normalized = validator.normalize(body, schema, "")
    validator.check(normalized, schema, "")
    errors += validator.errors
    if errors:
        raise ValidationError(errors)
    return normalized


def validate(doc: Any) -> list[FieldError]:
    try:
        admit(doc)
    except ValidationError as exc:
        return exc.errors
    return []


def iter_rules(schema: Schema | None = None, path: str = "") -> Iterable[tuple[str, dict]]:
    """Every CEL rule of the schema with the path of the object it sits on."""
    schema = schema or openapi_schema()
    for spec in schema.get("x-kubernetes-validations", []):
        yield path, spec
    for key, child in (schema.get("properties") or {}).items():
        yield from iter_rules(child, f"{path}.{key}" if path else key)
    if "items" in schema:
        yield from iter_rules(schema["items"], f"{path}[]")
