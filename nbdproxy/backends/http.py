"""The http backend (API.md 7b): a ticket served by forwarding to another daemon with this API
(nbdproxy or ovirt-imageio) over kept-alive connections, one per channel, streaming both ways.

In front of ovirt-imageio it supplies what that daemon lacks: the size (from its extents),
extent windows (its full map, clipped), chunked bodies (sent as sized PUTs); HEAD needs no
upstream request. Upstream failures become errors.BadGateway (502) naming the upstream; its 4xx
answers become the matching project errors, so the client sees the upstream's status.
"""

import logging
import threading
import urllib.parse

from .. import errors
from . import Caps
from .pool import Pool
from .upstream import Upstream

log = logging.getLogger("nbdproxy.http")

# max_readers/max_writers are honoured up to this many connections per ticket.
MAX_CONNECTIONS = 64


def parse_url(url):
    """(scheme, host, port, path) of an https: or http: ticket URL; ValueError if unusable."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r}: expecting https://HOST:PORT/images/ID")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{url!r}: invalid port") from None
    path = parts.path.rstrip("/")
    if not path.startswith("/images/") or "/" in path[len("/images/"):] or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r}: expecting https://HOST:PORT/images/ID")
    return parts.scheme, parts.hostname, port, path


def open_backend(url, writable, settings):
    """The backend of an https: or http: ticket (no I/O here: the upstream is asked on first use)."""
    try:
        scheme, host, port, path = parse_url(url)
    except ValueError as e:
        raise errors.BadRequest(f"Invalid ticket: {e}") from None
    return HTTPBackend(scheme, host, port, path, writable, settings)


class HTTPBackend(Pool):
    """One ticket's upstream: a pool of Upstream connections, bounded by the upstream's
    max_readers/max_writers once its OPTIONS is known (one connection until then)."""

    def __init__(self, scheme, host, port, path, writable, settings):
        self.scheme, self.host, self.port, self.path = scheme, host, port, path
        self.writable = writable
        self.settings = settings
        self.where = f"{scheme}://{host}:{port}"
        self.info = None        # the upstream's OPTIONS, and its size
        self._probe_lock = threading.Lock()
        super().__init__(self._connect_upstream, f"upstream {self.where}", 1,
                         settings.nbd_idle_timeout, settings.closer)

    def _connect_upstream(self):
        return Upstream(self)

    def acquire(self):
        ch = super().acquire()
        if self.info is None:
            try:
                with self._probe_lock:
                    if self.info is None:
                        self._probe(ch)
            except BaseException:
                self.release(ch, reuse=False)
                raise
        return ch

    def _probe(self, ch):
        """Ask the upstream's OPTIONS (and its size from its extents when OPTIONS has none)."""
        info = ch.options()
        if "size" not in info:
            end = 0
            if "extents" in info["features"]:
                for e in ch.upstream_extents("zero", None, None):
                    end = e.start + e.length
            info["size"] = end
        limit = min(info["max_readers"], info["max_writers"], MAX_CONNECTIONS)
        self.info = info
        with self._cond:
            self.limit = limit
            self._cond.notify_all()
        log.debug("%s: features=%s size=%d connections=%d", self.where, info["features"],
                  info["size"], limit)

    def caps(self, ch):
        features = set(self.info["features"])
        if not self.writable:
            features -= {"zero", "flush"}
        return Caps(zero="zero" in features, flush="flush" in features,
                    extents=frozenset({"zero", "dirty"} if "extents" in features else ()),
                    multi_conn=True, max_connections=self.limit, zero_copy=False,
                    checksum="checksum" in features, features=frozenset(features))
