"""Label and field selectors as the API server parses them for list and watch."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Matcher = Callable[[Mapping[str, Any]], bool]


class SelectorError(ValueError):
    """A selector the API server would reject with 400 BadRequest."""


def _split_terms(text: str) -> list[str]:
    # Commas separate terms, except inside the value sets of `in (a,b)`.
    terms, depth, current = [], 0, []
    for char in text:
        if char == '(':
            depth += 1
        elif char == ')':
            depth -= 1
        if char == ',' and depth == 0:
            terms.append(''.join(current).strip())
            current = []
        else:
            current.append(char)
    terms.append(''.join(current).strip())
    return [term for term in terms if term]


_SET_TERM = re.compile(r'^(?P<key>[^\s!=]+)\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)$')
_EQ_TERM = re.compile(r'^(?P<key>[^\s!=]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s,]*)$')
_EXISTS_TERM = re.compile(r'^(?P<neg>!?)\s*(?P<key>[^\s!=()]+)$')


def parse_label_selector(text: str | None) -> Matcher:
    """`a=b,c!=d,e in (x,y),f notin (z),g,!h` → a predicate over metadata.labels."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_terms(text or ''):
        if match := _SET_TERM.match(term):
            key, op = match['key'], match['op']
            values = {value.strip() for value in match['values'].split(',') if value.strip()}
            if op == 'in':
                checks.append(lambda labels, k=key, v=values: labels.get(k) in v)
            else:  # notin also matches objects without the label, as in Kubernetes
                checks.append(lambda labels, k=key, v=values: labels.get(k) not in v)
        elif match := _EQ_TERM.match(term):
            key, op, value = match['key'], match['op'], match['value']
            if op == '!=':
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif match := _EXISTS_TERM.match(term):
            key, negated = match['key'], bool(match['neg'])
            checks.append(lambda labels, k=key, n=negated: (k in labels) != n)
        else:
            raise SelectorError(f'unable to parse requirement: {term!r}')

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get('metadata') or {}).get('labels') or {}
        return all(check(labels) for check in checks)
    return matches


def _field_value(obj: Mapping[str, Any], path: str) -> str | None:
    value: Any = obj
    for part in path.split('.'):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, str) else None if value is None else str(value)


def parse_field_selector(text: str | None) -> Matcher:
    """`metadata.name=x,metadata.namespace!=y,involvedObject.name=z` → a predicate over the object."""
    checks: list[Matcher] = []
    for term in _split_terms(text or ''):
        match = _EQ_TERM.match(term)
        if not match:
            raise SelectorError(f'invalid field selector: {term!r}')
        path, op, value = match['key'], match['op'], match['value']
        if op == '!=':
            checks.append(lambda obj, p=path, v=value: _field_value(obj, p) != v)
        else:
            checks.append(lambda obj, p=path, v=value: _field_value(obj, p) == v)
    return lambda obj: all(check(obj) for check in checks)
