"""Reads job files into JSON values the way kubectl does, one problem per line when it cannot.

kubectl turns YAML into JSON with sigs.k8s.io/yaml (go-yaml v2 underneath) and sends the JSON
to the API server; PyYAML reads YAML 1.1 differently (`3e-3` is a string there, `2024-01-01`
a date, `0o17` a string, `y` a string, `1:30` the integer 90). So this module parses with
PyYAML's event parser only and resolves every plain scalar itself, with go-yaml v2's rules:

- null: `~`, `null`, `Null`, `NULL`, empty; booleans: `true/false`, `yes/no`, `on/off`, `y/n`
  in their three spellings (`True`, `TRUE`, ...);
- integers as Go's `strconv.ParseInt(s, 0, 64)` reads them once `_` is removed: `1_000`,
  `+1`, `0x1F`, `0o17`, `017` (octal), `0b101`;
- floats: `3e-3`, `1e5`, `.5`, `1.`, `08` (not octal, so a float); `.inf` and `.nan`, which
  JSON cannot carry (kubectl refuses the file);
- timestamps (`2024-01-01`) stay the text they are; everything else is a string.

The value then takes the trip kubectl gives it (Go's `json.Marshal`, then the API server's
decoder): a float with an integral value within int64 arrives as an integer (`1e5` ->
100000, so `maxSteps: 1e5` is an integer, as at the API server), an integer past int64 as a
float. Duplicate keys are refused, as strict field validation (kubectl apply's default)
refuses them. JSON input (a stream of objects, as `kubectl apply -f` reads it) goes through
Python's JSON parser with the same checks.

Nothing here recurses with the input: a file nested deeper than MAX_DEPTH levels is refused
with a message, not a RecursionError, and aliases may not repeat more than MAX_NODES
values in a document (go-yaml refuses "excessive aliasing" too).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

import yaml

# No FineTuneJob field is nested more than 8 levels; the raw DeepSpeed config is free-form,
# and 100 leaves it room while keeping every recursive reader downstream (the validator,
# CEL, json.dumps in the operator) far from Python's recursion limit.
MAX_DEPTH = 100
# What aliases may repeat in one document: a "billion laughs" file is mostly repetition.
MAX_NODES = 100_000

_INT64 = 2 ** 63
_UINT64 = 2 ** 64
_NULLS = {"", "~", "null", "Null", "NULL"}
_TRUE = {"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"}
_FALSE = {"n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"}
_SPECIAL_FLOATS = {".nan": math.nan, ".NaN": math.nan, ".NAN": math.nan,
                   ".inf": math.inf, ".Inf": math.inf, ".INF": math.inf,
                   "+.inf": math.inf, "+.Inf": math.inf, "+.INF": math.inf,
                   "-.inf": -math.inf, "-.Inf": -math.inf, "-.INF": -math.inf}
# go-yaml v2's yamlStyleFloat, tried after the integer forms.
_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
# strconv.ParseInt/ParseUint with base 0 (underscores already removed).
_GO_INT = re.compile(r"^[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)$")
_TAG = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class Problem:
    """One problem with one document (or with a whole file), as `finetune validate` reports it."""
    source: str
    message: str
    document: int | None = None  # 1-based position in the file's stream
    line: int | None = None      # 1-based, where known
    field: str | None = None     # the field path, as the API server names it
    label: str | None = None     # KIND/NAME of the document, where known

    def __str__(self) -> str:
        where = self.source
        if self.document is not None:
            where += f"#{self.document}"
            if self.label:
                where += f" {self.label}"
        elif self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.source, "document": self.document, "line": self.line,
                "object": self.label, "field": self.field, "message": self.message}


@dataclass
class Document:
    """One document of a stream: its JSON value, or the problems that keep kubectl from
    sending it."""
    source: str
    index: int
    line: int
    value: Any = None
    problems: list[Problem] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # field path -> line of its key

    @property
    def label(self) -> str:
        doc = self.value
        if not isinstance(doc, dict):
            return type(doc).__name__ if doc is not None else "<empty>"
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = meta.get("name") or meta.get("generateName") or "<no name>"
        return f"{doc.get('kind') or '<no kind>'}/{name}"

    def line_of(self, path: str | None) -> int:
        """The line of a field, or of its nearest ancestor written in the file (a defaulted
        field has none of its own)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.line

    def problem(self, message: str, path: str | None = None, line: int | None = None) -> Problem:
        return Problem(self.source, message, self.index, line or self.line_of(path), path,
                       self.label if self.value is not None else None)


class ReadError(ValueError):
    """A file (or text) kubectl would not send: its one-line problems."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


# -- scalars -------------------------------------------------------------------------------

def _as_sent(value: Any) -> Any:
    """The value after Go's json.Marshal and the API server's decoder (int64, else float64)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else float(value)
    if math.isfinite(value) and value == math.floor(value) and -_INT64 <= value < _INT64:
        return int(value)
    return value


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64), then ParseUint (no sign) as go-yaml does; None if
    neither reads it."""
    if not _GO_INT.match(text):
        return None
    body = text.lstrip("+-")
    if len(body) > 1 and body[0] == "0" and body[1] in "xXoObB":
        number = int(body[2:], {"x": 16, "o": 8, "b": 2}[body[1].lower()])
    elif len(body) > 1 and body[0] == "0":
        number = int(body, 8)
    else:
        number = int(body)
    if text[0] == "-":
        number = -number
    if -_INT64 <= number < _INT64 or (text[0] not in "+-" and number < _UINT64):
        return number
    return None


def resolve_plain(text: str) -> Any:
    """A plain (unquoted, untagged) scalar as go-yaml v2 resolves it."""
    if text in _NULLS:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text]
    head = text[0]
    if head == ".":
        try:
            return float(text) if re.fullmatch(r"\.[0-9]+([eE][-+]?[0-9]+)?", text) else text
        except ValueError:
            return text
    if head in "+-0123456789":
        if re.match(r"^[0-9]{4}-", text):  # looks like a timestamp: go-yaml keeps the text
            return text
        plain = text.replace("_", "")
        number = _go_int(plain)
        if number is not None:
            return number
        if _YAML_FLOAT.match(plain) and math.isfinite(float(plain)):
            return float(plain)  # out of range (1e400) fails ParseFloat: the text stays
    return text


def _go_float_key(value: float) -> str:
    """strconv.FormatFloat(value, 'g', -1, 32): how sigs.k8s.io/yaml spells a float map key."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    single = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(1, 10):  # the shortest decimal that reads back as the same float32
        mantissa, exponent = f"{single:.{digits - 1}e}".split("e")
        if struct.unpack("f", struct.pack("f", float(f"{mantissa}e{exponent}")))[0] == single:
            break
    exp = int(exponent)
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    if exp < -4 or exp >= 6:  # Go's %g with the shortest precision switches at 6
        return f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return repr(float(f"{mantissa}e{exp}")).removesuffix(".0")


def _key_text(key: Any) -> str | None:
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, str):
        return key
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float):
        return _go_float_key(key)
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- decoding ------------------------------------------------------------------------------

def _decode(data: bytes | str, source: str) -> str:
    if isinstance(data, str):
        return data
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise ReadError([Problem(source, "not valid UTF-16 after its byte-order mark")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ReadError([Problem(source, f"not UTF-8: byte 0x{data[exc.start]:02x} at column "
                                         f"{column} (kubectl reads UTF-8, or UTF-16 with a "
                                         "byte-order mark)", line=line)]) from None


# -- YAML ----------------------------------------------------------------------------------

_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Frame:
    __slots__ = ("kind", "value", "path", "anchor", "line", "key", "key_line", "first_line",
                 "merges", "nodes")

    def __init__(self, kind: str, path: str, anchor: str | None, line: int):
        self.kind = kind
        self.value: Any = {} if kind == "map" else []
        self.path = path
        self.anchor = anchor
        self.line = line
        self.key: Any = _NO_KEY
        self.key_line = line
        self.first_line: dict[str, int] = {}
        self.merges: list[Any] = []
        self.nodes = 1


_NO_KEY = object()
_MERGE = object()


class _Composer:
    """Builds one document from parser events with an explicit stack (no recursion)."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.aliased = 0  # values that aliases repeat: what a "billion laughs" file inflates
        self.skipping = 0  # depth of a subtree dropped past MAX_DEPTH
        self.abandoned = False  # past MAX_NODES: the rest of the document is not built
        self.done = False

    def fail(self, message: str, path: str | None, line: int) -> None:
        self.doc.problems.append(Problem(self.doc.source, message, self.doc.index, line,
                                         path or None))

    def child_path(self) -> str:
        if not self.stack:
            return ""
        top = self.stack[-1]
        if top.kind == "seq":
            return f"{top.path}[{len(top.value)}]"
        return _join(top.path, top.key) if isinstance(top.key, str) else top.path

    def scalar(self, event: yaml.ScalarEvent) -> Any:
        line = event.start_mark.line + 1
        text, tag = event.value, event.tag
        if tag is None and event.implicit[0]:  # plain and untagged: resolved by its text
            value = resolve_plain(text)
        elif tag is None or tag in ("!", _TAG + "str"):  # quoted, or forced to a string
            value = text
        elif tag == _TAG + "binary":
            try:
                value = base64.b64decode("".join(text.split()), validate=True).decode(
                    "utf-8", "replace")
            except (binascii.Error, ValueError):
                self.fail(f"!!binary {text[:40]!r} is not base64", self.child_path(), line)
                value = text
        elif tag == _TAG + "timestamp":
            value = text
        elif tag in (_TAG + "int", _TAG + "float", _TAG + "bool", _TAG + "null"):
            value = resolve_plain(text)
            want = tag[len(_TAG):]
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "bool": isinstance(value, bool), "null": value is None}[want]
            if not ok:
                self.fail(f"cannot read {text!r} as !!{want}", self.child_path(), line)
                value = text
            elif want == "float":
                value = float(value)
        else:  # other tags (!foo, !!set...) on a scalar: go-yaml keeps the text
            value = text
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(f"Invalid value: {text}: JSON has no NaN or infinity, so kubectl "
                      "cannot send it", self.child_path(), line)
        return _as_sent(value)

    def feed(self, event: yaml.Event) -> None:
        if self.abandoned:
            return
        if self.skipping:
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                self.skipping += 1
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                self.skipping -= 1
                if not self.skipping:
                    self.attach(None, 1, event.start_mark.line + 1)
            return
        line = event.start_mark.line + 1
        if isinstance(event, yaml.ScalarEvent):
            is_merge = event.value == "<<" and event.tag is None and event.implicit[0]
            value = self.scalar(event)
            if event.anchor:
                self.anchors[event.anchor] = (value, 1)
            if is_merge and self.stack and self.stack[-1].kind == "map" \
                    and self.stack[-1].key is _NO_KEY:
                value = _MERGE
            self.attach(value, 1, line)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.anchors:
                self.fail(f"unknown anchor '{event.anchor}' (or an anchor used inside itself)",
                          self.child_path(), line)
                self.attach(None, 1, line)
                return
            value, size = self.anchors[event.anchor]
            self.aliased += size
            self.attach(value, size, line)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            path = self.child_path()
            if len(self.stack) >= MAX_DEPTH:
                self.fail(f"nested deeper than {MAX_DEPTH} levels", path, line)
                self.skipping = 1
                return
            kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
            self.stack.append(_Frame(kind, path, event.anchor, line))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            frame = self.stack.pop()
            if frame.kind == "map":
                self.apply_merges(frame)
            if frame.anchor:
                self.anchors[frame.anchor] = (frame.value, frame.nodes)
            self.attach(frame.value, frame.nodes, frame.line)

    def apply_merges(self, frame: _Frame) -> None:
        # `<<: *base` or `<<: [*a, *b]`: keys written in the mapping win, then earlier sources.
        for source in frame.merges:
            for key, value in source.items():
                frame.value.setdefault(key, value)

    def attach(self, value: Any, size: int, line: int) -> None:
        """Puts a value in its place; `size` counts the values it holds (what an alias of it
        repeats)."""
        if self.aliased > MAX_NODES:
            self.fail(f"its aliases repeat more than {MAX_NODES} values (excessive aliasing)",
                      None, line)
            self.abandoned = True
            self.doc.value = None
            return
        if not self.stack:
            self.doc.value = value
            return
        top = self.stack[-1]
        top.nodes += size
        if top.kind == "seq":
            self.doc.lines.setdefault(f"{top.path}[{len(top.value)}]", line)
            top.value.append(value)
            return
        if top.key is _NO_KEY:
            if value is _MERGE:
                top.key = _MERGE
            else:
                text = _key_text(value)
                if text is None:
                    self.fail(f"a {type(value).__name__ if value is not None else 'null'} map "
                              "key cannot be converted to JSON", top.path, line)
                    text = ""
                top.key = text
            top.key_line = line
            return
        key, top.key = top.key, _NO_KEY
        if key is _MERGE:
            sources = value if isinstance(value, list) else [value]
            if not all(isinstance(s, dict) for s in sources):
                self.fail("<< merges mappings only", top.path, top.key_line)
            else:
                top.merges.extend(sources)
            return
        path = _join(top.path, key)
        if key in top.first_line:
            self.fail(f"duplicate key {key!r} (first at line {top.first_line[key]}): strict "
                      "field validation, kubectl apply's default, refuses it", path, top.key_line)
        else:
            top.first_line[key] = top.key_line
        self.doc.lines.setdefault(path, top.key_line)
        top.value[key] = value


def _read_yaml(text: str, source: str) -> tuple[list[Document], list[Problem]]:
    docs: list[Document] = []
    problems: list[Problem] = []
    composer: _Composer | None = None
    try:
        for event in yaml.parse(text, Loader=_PARSER):
            if isinstance(event, yaml.DocumentStartEvent):
                doc = Document(source, len(docs) + 1, event.start_mark.line + 1)
                docs.append(doc)
                composer = _Composer(doc)
            elif isinstance(event, (yaml.NodeEvent, yaml.CollectionEndEvent)):
                assert composer is not None
                composer.feed(event)
            elif isinstance(event, yaml.DocumentEndEvent) and composer is not None:
                composer.done = True
    except yaml.reader.ReaderError as exc:
        problems.append(Problem(source, f"not valid YAML: unacceptable character "
                                        f"#x{exc.character:04x}: special characters are not "
                                        "allowed", line=text.count("\n", 0, exc.position) + 1))
        if docs and not _composer_done(composer):
            docs.pop()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"not valid YAML: {reason}" + (f" ({context})" if context else "")
        problems.append(Problem(source, " ".join(message.split()),
                                line=mark.line + 1 if mark else None))
        if docs and not _composer_done(composer):
            docs.pop()  # the document the error cut short
    return docs, problems


def _composer_done(composer: _Composer | None) -> bool:
    return composer is not None and composer.done


# -- JSON ----------------------------------------------------------------------------------

class _Pairs(dict):
    """A JSON object that remembers its duplicate keys until its path is known."""
    duplicates: list[str]


def _pairs(items: list[tuple[str, Any]]) -> dict:
    out = _Pairs()
    out.duplicates = []
    for key, value in items:
        if key in out:
            out.duplicates.append(key)
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_depth(text: str) -> int:
    depth = deepest = 0
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', text):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _finish_json(doc: Document, value: Any) -> Any:
    """Checks and converts a parsed JSON value without recursion: duplicate keys, numbers."""
    root = [value]
    work: list[tuple[Any, Any, str]] = [(root, 0, "")]
    while work:
        parent, key, path = work.pop()
        item = parent[key]
        if isinstance(item, dict):
            for dup in getattr(item, "duplicates", ()):
                doc.problems.append(doc.problem(
                    f"duplicate key {dup!r}: strict field validation, kubectl apply's default, "
                    "refuses it", _join(path, dup)))
            plain = dict(item)
            parent[key] = plain
            work.extend((plain, k, _join(path, k)) for k in plain)
        elif isinstance(item, list):
            work.extend((item, i, f"{path}[{i}]") for i in range(len(item)))
        elif isinstance(item, (int, float)):
            parent[key] = _as_sent(item)
    return root[0]


def _read_json(text: str, source: str) -> tuple[list[Document], list[Problem]]:
    docs: list[Document] = []
    decoder = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_refuse_constant)
    position = 0
    ws = re.compile(r"\s*")
    while True:
        position = ws.match(text, position).end()
        if position >= len(text):
            return docs, []
        line = text.count("\n", 0, position) + 1
        doc = Document(source, len(docs) + 1, line)
        docs.append(doc)
        end = _json_end(text, position)
        if _json_depth(text[position:end]) > MAX_DEPTH:
            doc.problems.append(doc.problem(f"nested deeper than {MAX_DEPTH} levels"))
            if end >= len(text):
                return docs, []
            position = end
            continue
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError as exc:  # json.JSONDecodeError, or NaN/Infinity refused above
            at = getattr(exc, "pos", position)
            docs.pop()
            reason = getattr(exc, "msg", str(exc))
            if "is not JSON" in reason:
                reason += " (JSON has no NaN or infinity, so kubectl cannot send it)"
            return docs, [Problem(source, f"not valid JSON: {reason}",
                                  line=text.count("\n", 0, at) + 1)]
        doc.value = _finish_json(doc, value)


def _json_end(text: str, start: int) -> int:
    """Where the JSON value starting at `start` ends, by bracket counting (no parsing)."""
    depth = 0
    in_string = escape = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escape:
                escape = False
            elif char == "\\":
                escape = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
    return len(text)


# -- entry points --------------------------------------------------------------------------

def _parse(text: str, source: str) -> tuple[list[Document], list[Problem]]:
    if text.lstrip().startswith("{"):
        return _read_json(text, source)
    return _read_yaml(text, source)


_MARK = "\ue000"  # a private-use character standing in for bytes that are not UTF-8
codecs.register_error("finetune-mark", lambda exc: (_MARK, exc.end))


def _where_undecodable(data: bytes, source: str, problem: Problem) -> Problem:
    """The document and field of the first byte that is not UTF-8, where the file says."""
    text = data.decode("utf-8", "finetune-mark")
    if _MARK in data.decode("utf-8", "ignore"):
        return problem  # the file has the stand-in character of its own: no telling
    docs, _ = _parse(text, source)
    for doc in docs:
        work: list[tuple[Any, str]] = [(doc.value, "")]
        while work:
            value, path = work.pop()
            if isinstance(value, dict):
                for key, item in value.items():
                    if _MARK in key:
                        return dataclasses.replace(problem, document=doc.index,
                                                   field=_join(path, key.replace(_MARK, "?")),
                                                   label=doc.label.replace(_MARK, "?"))
                    work.append((item, _join(path, key)))
            elif isinstance(value, list):
                work.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
            elif isinstance(value, str) and _MARK in value:
                return dataclasses.replace(problem, document=doc.index, field=path or None,
                                           label=doc.label.replace(_MARK, "?"))
    return problem


def read_stream(data: bytes | str, source: str) -> tuple[list[Document], list[Problem]]:
    """Every document of a file or stream (YAML, or JSON when it starts with `{`, as kubectl
    decides), and the problems that concern the whole file (not UTF-8, a syntax error)."""
    try:
        text = _decode(data, source)
    except ReadError as exc:
        if isinstance(data, bytes) and exc.problems[0].line is not None:
            return [], [_where_undecodable(data, source, exc.problems[0])]
        return [], exc.problems
    return _parse(text, source)


def iter_values(docs: list[Document]) -> Iterator[Document]:
    """The documents that hold something (an empty document between two `---` is skipped)."""
    for doc in docs:
        if doc.value is not None or doc.problems:
            yield doc


def read_one(data: bytes | str, source: str) -> Any:
    """The single document of a text (the trainer's --job file or FINETUNE_JOB), or ReadError."""
    docs, problems = read_stream(data, source)
    found = list(iter_values(docs))
    problems = problems + [p for d in found for p in d.problems]
    if problems:
        raise ReadError(problems)
    if len(found) != 1:
        raise ReadError([Problem(source, f"must hold one document; it holds {len(found)}")])
    return found[0].value


# -- writing -------------------------------------------------------------------------------

class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """PyYAML's safe dumper, quoting every string that go-yaml would not read back as one
    (PyYAML leaves `129e6`, `0o17` or `y` bare: they are strings in YAML 1.1)."""


def _represent_str(dumper: Any, value: str) -> yaml.ScalarNode:
    if not isinstance(resolve_plain(value), str) if value else True:
        return dumper.represent_scalar(_TAG + "str", value, style="'")
    return dumper.represent_str(value)


_Dumper.add_representer(str, _represent_str)


def dump_all(documents: list[Any]) -> str:
    """YAML that kubectl reads back as the same JSON values."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False)


def dump(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False)
