"""The spec reference (docs/spec-reference.md), generated from the schema so it cannot drift."""

from __future__ import annotations

import json

from . import API_VERSION, KIND
from .schema import Schema, openapi_schema
from .events import EVENTS
from .status import EXITS, ConditionType, Phase, Reason, Vocabulary


def _type(schema: Schema) -> str:
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of {schema['additionalProperties'].get('type', 'any')}"
    return kind


def _constraints(schema: Schema) -> str:
    out = []
    if "enum" in schema:
        out.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    if "minimum" in schema:
        out.append(("> " if schema.get("exclusiveMinimum") else "≥ ") + str(schema["minimum"]))
    if "maximum" in schema:
        out.append(f"≤ {schema['maximum']}")
    if "pattern" in schema:
        out.append(f"matches `{schema['pattern']}`")
    if "maxItems" in schema:
        out.append(f"at most {schema['maxItems']} items")
    return "; ".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(schema: Schema, path: str, required: set[str], rows: list[str], rules: list[str]):
    for spec in schema.get("x-kubernetes-validations", []):
        where = path + spec.get("fieldPath", "")
        rules.append(f"| `{where}` | {_cell(spec['message'])} | `{_cell(spec['rule'])}` |")
    for key, child in (schema.get("properties") or {}).items():
        field = f"{path}.{key}"
        default = f"`{json.dumps(child['default'])}`" if "default" in child else ""
        rows.append(f"| `{field}` | {_type(child)} | {'yes' if key in required else ''} | "
                    f"{default} | {_cell(_constraints(child))} | {_cell(child.get('description', ''))} |")
        if child.get("type") == "object":
            _rows(child, field, set(child.get("required", [])), rows, rules)
        elif child.get("type") == "array" and child.get("items", {}).get("type") == "object":
            _rows(child["items"], f"{field}[]", set(child["items"].get("required", [])),
                  rows, rules)


def _words(title: str, column: str, words: type[Vocabulary]) -> list[str]:
    return [f"### {title}", "", f"| {column} | meaning |", "|---|---|",
            *(f"| `{w}` | {_cell(m)} |" for w, m in words.meanings.items()), ""]


def vocabulary_section() -> list[str]:
    """The status vocabulary (finetune_api.status): what each word the operator writes means."""
    retried = {True: "yes", False: "no"}
    exits = [f"| {e.code} | {f'`{e.reason}`' if e.reason else ''} | "
             f"{retried[e.retryable] if e.reason else ''} | {_cell(e.meaning)} |"
             for e in EXITS.values()]
    return [
        "## Status vocabulary",
        "",
        "The words of `status` and of the operator's Events, from `api/finetune_api/status.py`.",
        "",
        *_words("Phases (`status.phase`)", "phase", Phase),
        *_words("Condition types (`status.conditions[].type`)", "type", ConditionType),
        *_words("Reasons (of conditions and Events)", "reason", Reason),
        "### Trainer exit codes (`finetune-train`, `finetune run`)",
        "",
        "| code | reason | retried | meaning |",
        "|---|---|---|---|",
        *exits,
        "",
    ]


def events_section() -> list[str]:
    """The trainer's JSON events (finetune_api.events), one row per field."""
    rows = [f"| `{kind}` | `{name}` | {_cell(meaning)} |"
            for kind, fields in EVENTS.items() for name, meaning in fields.items()]
    return [
        "## Trainer events (the JSON stream)",
        "",
        "The trainer prints one JSON object per line for programs (the operator reads them from "
        "its log); without a terminal, or with `--plain`, `finetune run`'s stdout is these "
        "events alone, one per line (`finetune run job.yaml | jq -c 'select(.event == "
        "\"progress\") | [.step, .loss]'`), and its text for people goes to stderr. Every event "
        "has `event` (its kind) and `time` (Unix seconds); fields may be added, never renamed. "
        "From `api/finetune_api/events.py`.",
        "",
        "| event | field | meaning |",
        "|---|---|---|",
        *rows,
        "",
    ]


def render_reference() -> str:
    root = openapi_schema()
    spec = root["properties"]["spec"]
    rows: list[str] = []
    rules: list[str] = [f"| `{r['fieldPath'].lstrip('.')}` | {_cell(r['message'])} | "
                        f"`{_cell(r['rule'])}` |" for r in root["x-kubernetes-validations"]]
    _rows(spec, "spec", set(spec.get("required", [])), rows, rules)
    status_rows: list[str] = []
    _rows(openapi_schema()["properties"]["status"], "status", set(), status_rows, [])
    return "\n".join([
        f"# {KIND} spec reference (`{API_VERSION}`)",
        "",
        "Generated from `api/finetune_api/schema.py` and `status.py` by `finetune docs`; do not "
        "edit by hand.",
        "The same schema is the CRD in `crds/` and the validator of `finetune validate`.",
        "",
        "## Fields",
        "",
        "| field | type | required | default | constraints | description |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "## Cross-field rules (CEL, checked at admission and by `finetune validate`)",
        "",
        "| field | message | rule |",
        "|---|---|---|",
        *rules,
        "",
        "## Status (written by the operator)",
        "",
        "| field | type | required | default | constraints | description |",
        "|---|---|---|---|---|---|",
        *status_rows,
        "",
        *vocabulary_section(),
        *events_section(),
    ]).rstrip("\n") + "\n"
