"""A client of the daemon's control socket (/tickets/...)."""

import json

from .. import errors
from .connections import UnixHTTPConnection


class ControlClient:
    def __init__(self, path, timeout=120):
        self.path = path
        self.timeout = timeout

    def _request(self, method, url, body=None):
        conn = UnixHTTPConnection(self.path, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            try:
                conn.request(method, url, body=data)
                resp = conn.getresponse()
                payload = resp.read()
            except OSError as e:
                raise errors.Error(f"cannot reach the daemon at {self.path}: {e}") from None
            if resp.status == 404:
                raise errors.NotFound(payload.decode(errors="replace").strip())
            if resp.status >= 400:
                raise errors.Error(f"{method} {url}: {resp.status} "
                                   f"{payload.decode(errors='replace').strip()}")
            return json.loads(payload) if payload else None
        finally:
            conn.close()

    def add(self, ticket):
        self._request("PUT", f"/tickets/{ticket['uuid']}", ticket)

    def show(self, ticket_id):
        return self._request("GET", f"/tickets/{ticket_id}")

    def list(self):
        return self._request("GET", "/tickets/")

    def extend(self, ticket_id, timeout):
        self._request("PATCH", f"/tickets/{ticket_id}", {"timeout": timeout})

    def delete(self, ticket_id):
        self._request("DELETE", f"/tickets/{ticket_id}")
