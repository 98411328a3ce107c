"""A client of the daemon's control socket (/tickets/...)."""

import http.client
import json
import urllib.parse

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
            except (OSError, http.client.HTTPException) as e:
                raise errors.Error(f"cannot reach the daemon at {self.path}: {e}") from None
            if resp.status == 404:
                raise errors.NotFound(payload.decode(errors="replace").strip())
            if resp.status >= 400:
                raise errors.Error(f"{method} {url}: {resp.status} "
                                   f"{payload.decode(errors='replace').strip()}")
            try:
                return json.loads(payload) if payload else None
            except (ValueError, RecursionError):
                raise errors.Error(f"{method} {url}: the daemon's answer is not JSON") from None
        finally:
            conn.close()

    @staticmethod
    def _url(ticket_id):
        """The ticket's URL: every byte of the id but unreserved ones percent-encoded (UTF-8), so
        "disk 1", "a?b" or "%41" name that very ticket."""
        if not ticket_id:
            raise errors.Error("a ticket id may not be empty")
        try:
            return "/tickets/" + urllib.parse.quote(ticket_id, safe="")
        except UnicodeEncodeError:
            raise errors.Error(f"a ticket id must be UTF-8 text: {ticket_id!r}") from None

    def add(self, ticket):
        self._request("PUT", self._url(ticket["uuid"]), ticket)

    def show(self, ticket_id):
        return self._request("GET", self._url(ticket_id))

    def list(self):
        return self._request("GET", "/tickets/")

    def extend(self, ticket_id, timeout):
        self._request("PATCH", self._url(ticket_id), {"timeout": timeout})

    def delete(self, ticket_id):
        self._request("DELETE", self._url(ticket_id))
