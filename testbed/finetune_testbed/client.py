"""A small synchronous Kubernetes client over urllib, for tests and helpers (no extra packages)."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml


class ApiStatusError(Exception):
    """A non-2xx answer; `status` is the HTTP code and `body` the decoded Kubernetes Status."""

    def __init__(self, status: int, body: Any) -> None:
        message = body.get('message') if isinstance(body, dict) else body
        super().__init__(f'{status}: {message}')
        self.status = status
        self.body = body


def resource_path(api_version: str, plural: str, namespace: str | None = None,
                  name: str | None = None, subresource: str | None = None) -> str:
    base = f'/apis/{api_version}' if '/' in api_version else f'/api/{api_version}'
    path = base + (f'/namespaces/{namespace}' if namespace else '') + f'/{plural}'
    path += f'/{name}' if name else ''
    path += f'/{subresource}' if subresource else ''
    return path


class KubeClient:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip('/'), token

    def request(self, method: str, path: str, body: Any = None, *, params: dict[str, str] | None = None,
                content_type: str = 'application/json', expect_status: bool = False) -> Any:
        """The decoded JSON answer; raises ApiStatusError on non-2xx (or returns (status, body)
        with expect_status=True)."""
        data = None
        if body is not None:
            data = (yaml.safe_dump(body) if content_type.endswith('yaml') else json.dumps(body)).encode()
        query = ('?' + urllib.parse.urlencode(params)) if params else ''
        request = urllib.request.Request(self.url + path + query, data=data, method=method, headers={
            'Authorization': f'Bearer {self.token}', 'Content-Type': content_type, 'Accept': 'application/json'})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        decoded = json.loads(payload) if payload else None
        if expect_status:
            return status, decoded
        if status >= 400:
            raise ApiStatusError(status, decoded)
        return decoded

    def get(self, api_version: str, plural: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.request('GET', resource_path(api_version, plural, namespace, name))

    def get_or_none(self, api_version: str, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.get(api_version, plural, name, namespace)
        except ApiStatusError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None, **params: str) -> list[dict[str, Any]]:
        return self.request('GET', resource_path(api_version, plural, namespace), params=params or None)['items']

    def create(self, obj: dict[str, Any], plural: str, namespace: str | None = None) -> dict[str, Any]:
        namespace = namespace or (obj.get('metadata') or {}).get('namespace')
        return self.request('POST', resource_path(obj['apiVersion'], plural, namespace), obj)

    def patch(self, api_version: str, plural: str, name: str, patch: Any, namespace: str | None = None,
              subresource: str | None = None, content_type: str = 'application/merge-patch+json') -> dict[str, Any]:
        return self.request('PATCH', resource_path(api_version, plural, namespace, name, subresource), patch,
                            content_type=content_type)

    def replace(self, obj: dict[str, Any], plural: str, subresource: str | None = None) -> dict[str, Any]:
        meta = obj['metadata']
        return self.request('PUT', resource_path(obj['apiVersion'], plural, meta.get('namespace'), meta['name'], subresource), obj)

    def delete(self, api_version: str, plural: str, name: str, namespace: str | None = None, **options: Any) -> dict[str, Any]:
        return self.request('DELETE', resource_path(api_version, plural, namespace, name), options or None)
