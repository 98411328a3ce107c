"""NBD ticket URLs: the forms API.md 5 allows, parsed here so that libnbd's own URI parser never
sees a client's URL (nothing in one can make libnbd read a local file or pick another transport).
"""

import re
import urllib.parse

import nbd

class Address:
    """Where an export is: a unix socket path or a TCP host and port, the export name, and the CA
    directory that verifies the server when TLS is required (None: no TLS)."""

    def __init__(self, unix=None, host=None, port=None, export="", tls_certificates=None):
        self.unix, self.host, self.port, self.export = unix, host, port, export
        self.tls_certificates = tls_certificates

    def aio_connect(self, h):
        """Start connecting h; the handshake is then driven by polling (see Handle._settle).

        Every URL form comes here parsed: libnbd's own URI parser never sees a client's URL,
        so nothing in it can make libnbd read a local file or pick another transport."""
        if self.tls_certificates is not None:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(self.tls_certificates)
            h.set_tls_verify_peer(True)
            if self.unix:
                # A unix socket has no host name to check the certificate against: the server
                # is local, its certificate must be valid for localhost (parse_url refuses
                # nbds+unix where libnbd has no set_tls_hostname).
                h.set_tls_hostname("localhost")
        h.set_export_name(self.export)
        if self.unix:
            h.aio_connect_unix(self.unix)
        else:
            h.aio_connect_tcp(self.host, str(self.port))

    def __str__(self):
        where = self.unix or f"{self.host}:{self.port}"
        return f"{where} export {self.export!r}" if self.export else where


# qemu's legacy forms (API.md 5); the export name is taken as it is, as qemu does.
_OLD_UNIX = re.compile(r"nbd:unix:(?P<path>[^:]+)(?::exportname=(?P<export>.*))?", re.S)
_OLD_TCP = re.compile(r"nbd:(?P<host>[A-Za-z0-9._~-]+|\[[0-9a-fA-F:.]+\]):(?P<port>[0-9]{1,5})"
                      r"(?::exportname=(?P<export>.*))?", re.S)
# NBD URIs (the NBD URI standard, as libnbd spells them: lower-case schemes only).
_URI = re.compile(r"(?P<scheme>nbds?(?:\+unix)?)://(?P<authority>[^/?#]*)"
                  r"(?P<path>/[^?#]*)?(?:\?(?P<query>[^#]*))?(?P<fragment>#.*)?", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HOST = re.compile(r"(?P<host>[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]*))?")
NBD_PORT = 10809
MAX_EXPORT_NAME = 4096      # bytes, the NBD protocol's limit
# Query parameters libnbd knows that read local files or override our TLS settings.
_TLS_PARAMS = ("tls-psk-file", "tls-certificates", "tls-verify-peer", "tls-username",
               "tls-hostname")


def parse_url(url, tls_certificates=None):
    """Parse a ticket URL into an Address; ValueError says what is wrong.

    tls_certificates is the CA directory (the nbd_tls_certificates setting) that verifies the
    servers of nbds:// and nbds+unix:// URLs; without it those URLs are refused.
    """
    m = _OLD_UNIX.fullmatch(url)
    if m:
        return Address(unix=m["path"], export=_export(m["export"] or ""))
    m = _OLD_TCP.fullmatch(url)
    if m:
        return Address(host=m["host"].strip("[]"), port=_port(m["port"]),
                       export=_export(m["export"] or ""))
    m = _URI.fullmatch(url)
    if not m and re.match(r"(?i)nbds?(\+unix)?://", url):
        raise ValueError(f"NBD URL schemes are lower case: {_show(url)}")
    if not m:
        raise ValueError(f"unsupported NBD URL {_show(url)}: expecting nbd:unix:/path, "
                         "nbd:HOST:PORT, nbd://HOST[:PORT]/NAME, nbd+unix:///NAME?socket=/path "
                         "or their nbds forms")
    scheme = m["scheme"]
    if m["fragment"] is not None:
        raise ValueError(f"a fragment (#...) is not allowed in an NBD URL: {_show(url)}")
    tls = None
    if scheme.startswith("nbds"):
        if not tls_certificates:
            raise ValueError(f"{scheme}:// URLs need the nbd_tls_certificates setting "
                             "(the CA directory that verifies NBD servers)")
        tls = tls_certificates
    export = _export(_unquote(m["path"][1:] if m["path"] else "", "the export name"))
    query = _query(scheme, m["query"])
    if scheme.endswith("+unix"):
        if tls and not hasattr(nbd.NBD, "set_tls_hostname"):
            # libnbd before 1.22 checks a certificate only against a TCP host name: on a unix
            # socket it would take any certificate.
            raise ValueError(f"this libnbd ({nbd.NBD().get_version()}) cannot verify the "
                             "certificate of an NBD server on a unix socket (libnbd 1.22 can); "
                             "use nbds://HOST:PORT/NAME")
        if m["authority"]:
            raise ValueError(f"{scheme}:// URLs name no host: {scheme}:///NAME?socket=/path")
        if "socket" not in query:
            raise ValueError(f"{scheme}:// URLs need ?socket=/path")
        return Address(unix=query["socket"], export=export, tls_certificates=tls)
    if "@" in m["authority"]:
        raise ValueError(f"a user name is not allowed in an NBD URL: {_show(url)}")
    h = _HOST.fullmatch(m["authority"])
    if not h:
        raise ValueError(f"{scheme}:// URLs need a host: {scheme}://HOST[:PORT]/NAME")
    port = NBD_PORT if h["port"] is None else _port(h["port"])
    return Address(host=h["host"].strip("[]"), port=port, export=export, tls_certificates=tls)


def _query(scheme, raw):
    """The query's parameters as a dict; only socket= in a +unix URL is allowed."""
    params = {}
    for part in (raw or "").split("&"):
        if not part:
            continue    # "a&&b", a trailing "&": libnbd skips empty parts too
        name, _, value = part.partition("=")
        name = _unquote(name, "a query parameter name")
        if name in _TLS_PARAMS:
            raise ValueError(f"query parameter {name!r} is not allowed: TLS is verified with "
                             "the nbd_tls_certificates setting, and the URL may not name "
                             "local files")
        if name != "socket" or not scheme.endswith("+unix"):
            raise ValueError(f"query parameter {name!r} is not allowed in {scheme}:// URLs")
        if name in params:
            raise ValueError("socket= is given twice in the NBD URL")
        params[name] = _unquote(value, "the socket path")
        if not params[name]:
            raise ValueError("an empty socket= in the NBD URL")
    return params


def _port(text):
    port = int(text) if text and len(text) <= 5 else 0
    if not 0 < port < 65536:
        raise ValueError(f"bad port {text[:10]!r} in the NBD URL: expecting 1 to 65535")
    return port


def _unquote(text, what):
    try:
        value = urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what} in the NBD URL is not UTF-8 once percent-decoded") from None
    # Decoded, as in the ticket's own strings (API.md 5): no NUL for libnbd's C strings, and no
    # CR/LF for the log.
    if _CONTROL.search(value):
        raise ValueError(f"{what} in the NBD URL holds a control character once percent-decoded")
    return value


def _export(name):
    if len(name.encode("utf-8", "surrogatepass")) > MAX_EXPORT_NAME:
        raise ValueError(f"the export name is longer than {MAX_EXPORT_NAME} bytes")
    return name


def _show(url):
    """The URL for a message: quoted, and not all of a 64 KiB body."""
    return repr(url if len(url) <= 200 else url[:200] + "...")
