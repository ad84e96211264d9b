"""The patch flavours the API server accepts: JSON merge patch (RFC 7386) and JSON patch (RFC 6902)."""
from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """A patch that cannot apply; `status` is the HTTP code the API server answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, null deletes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _unescape(token: str) -> str:
    return token.replace('~1', '/').replace('~0', '~')


def _resolve(doc: Any, pointer: str) -> tuple[Any, str | int]:
    """The container holding the pointer's last token, and that token (an int index for lists)."""
    if not pointer.startswith('/'):
        raise PatchError(f'invalid JSON pointer: {pointer!r}')
    tokens = [_unescape(token) for token in pointer[1:].split('/')]
    container = doc
    for token in tokens[:-1]:
        container = _child(container, token, pointer)
    last = tokens[-1]
    if isinstance(container, list):
        if last == '-':
            return container, len(container)
        if not last.isdigit():
            raise PatchError(f'invalid list index {last!r} in {pointer!r}')
        return container, int(last)
    if not isinstance(container, dict):
        raise PatchError(f'path {pointer!r} does not point into an object or array')
    return container, last


def _child(container: Any, token: str, pointer: str) -> Any:
    if isinstance(container, dict) and token in container:
        return container[token]
    if isinstance(container, list) and token.isdigit() and int(token) < len(container):
        return container[int(token)]
    raise PatchError(f'doc is missing path: {pointer!r}')


def _get(doc: Any, pointer: str) -> Any:
    if pointer == '':
        return doc
    container, key = _resolve(doc, pointer)
    if isinstance(container, list):
        if not isinstance(key, int) or key >= len(container):
            raise PatchError(f'doc is missing path: {pointer!r}')
        return container[key]
    if key not in container:
        raise PatchError(f'doc is missing path: {pointer!r}')
    return container[key]


def _remove(doc: Any, pointer: str) -> Any:
    container, key = _resolve(doc, pointer)
    try:
        return container.pop(key)
    except (KeyError, IndexError):
        raise PatchError(f'unable to remove nonexistent key: {pointer!r}') from None


def _add(doc: Any, pointer: str, value: Any) -> Any:
    if pointer == '':
        return value
    container, key = _resolve(doc, pointer)
    if isinstance(container, list):
        if not isinstance(key, int) or key > len(container):
            raise PatchError(f'index out of range in {pointer!r}')
        container.insert(key, value)
    else:
        container[key] = value
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 with all six ops; a failed `test` is 422 Invalid, as in the API server."""
    if not isinstance(operations, list):
        raise PatchError('a JSON patch must be a list of operations', status=400)
    doc = copy.deepcopy(doc)
    for operation in operations:
        if not isinstance(operation, dict) or 'op' not in operation or 'path' not in operation:
            raise PatchError(f'invalid JSON patch operation: {operation!r}', status=400)
        op, path = operation['op'], operation['path']
        if op == 'test':
            if _get(doc, path) != operation.get('value'):
                raise PatchError(f'testing value {path} failed')
        elif op == 'add':
            doc = _add(doc, path, copy.deepcopy(operation.get('value')))
        elif op == 'remove':
            _remove(doc, path)
        elif op == 'replace':
            _get(doc, path)  # replace needs the target to exist
            if path == '':
                doc = copy.deepcopy(operation.get('value'))
            else:
                container, key = _resolve(doc, path)
                container[key] = copy.deepcopy(operation.get('value'))
        elif op == 'move':
            value = _remove(doc, operation['from'])
            doc = _add(doc, path, value)
        elif op == 'copy':
            doc = _add(doc, path, copy.deepcopy(_get(doc, operation['from'])))
        else:
            raise PatchError(f'unknown JSON patch op {op!r}', status=400)
    return doc
