"""CORS (API.md 7c): the headers ovirt-imageio adds for a page on another origin, each only when its
request header is there, on answers to /images/... and /info/ (errors too), on both data services;
ours: PATCH gets them, and a writable ticket's preflight allows PATCH."""

import json
import os

import pytest

from support import qemu_nbd

SIZE = 4 * 1024**2
ORIGIN = {"Origin": "http://127.0.0.1:8000"}
PREFLIGHT = {"Origin": "http://127.0.0.1:8000", "Access-Control-Request-Method": "PUT",
             "Access-Control-Request-Headers": "content-range"}
CORS = ("access-control-allow-origin", "access-control-allow-headers",
        "access-control-allow-methods", "access-control-max-age")


@pytest.fixture(scope="module")
def export(workdir):
    path = str(workdir / "disk.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    server = qemu_nbd(path, str(workdir / "nbd.sock"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def daemon(module_daemon, export):
    module_daemon.add_ticket(export.url, SIZE, ticket_id="rw")
    module_daemon.add_ticket(export.url, SIZE, ops=["read"], ticket_id="ro")
    # An NBD server that is not there: every use of the ticket is a 5xx.
    module_daemon.add_ticket("nbd:unix:" + module_daemon.tmpdir + "/missing.sock", SIZE,
                             ticket_id="dead")
    return module_daemon


@pytest.fixture(params=["local", "remote"])
def connect(request, daemon):
    return daemon.local if request.param == "local" else daemon.remote


def call(conn, method, url, body=None, headers=None):
    """(status, headers with lower-case names, body), closing the connection."""
    try:
        conn.request(method, url, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def cors(headers):
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


# Each rule on its own

def test_no_cors_headers_without_request_headers(connect):
    status, headers, _ = call(connect(), "GET", "/images/ro", headers={"Range": "bytes=0-0"})
    assert status == 206
    assert cors(headers) == {}


def test_origin_gives_allow_origin_and_max_age(connect):
    status, headers, _ = call(connect(), "GET", "/images/ro",
                              headers={"Range": "bytes=0-0", **ORIGIN})
    assert status == 206
    assert cors(headers) == {"access-control-allow-origin": "*",
                             "access-control-max-age": "86400"}


def test_request_headers_gives_allow_headers(connect):
    status, headers, _ = call(connect(), "GET", "/images/ro",
                              headers={"Range": "bytes=0-0",
                                       "Access-Control-Request-Headers": "range"})
    assert status == 206
    assert cors(headers) == {"access-control-allow-headers": "*",
                             "access-control-max-age": "86400"}


def test_request_method_on_actual_request_allows_any(connect):
    """As ovirt-imageio's cors.allow() default on GET and PUT: "*"."""
    status, headers, _ = call(connect(), "GET", "/images/ro",
                              headers={"Range": "bytes=0-0",
                                       "Access-Control-Request-Method": "GET"})
    assert status == 206
    assert cors(headers) == {"access-control-allow-methods": "*",
                             "access-control-max-age": "86400"}


def test_empty_request_headers_give_nothing(connect):
    """ovirt-imageio tests the values, not the presence."""
    status, headers, _ = call(connect(), "GET", "/images/ro",
                              headers={"Range": "bytes=0-0", "Origin": "",
                                       "Access-Control-Request-Method": ""})
    assert status == 206
    assert cors(headers) == {}


# Preflight

def test_preflight_writable_ticket_allows_patch(connect):
    status, headers, body = call(connect(), "OPTIONS", "/images/rw",
                                 headers={**PREFLIGHT, "Access-Control-Request-Method": "PATCH"})
    assert status == 200
    assert json.loads(body)["features"] == ["checksum", "extents", "flush", "zero"]
    assert cors(headers) == {"access-control-allow-origin": "*",
                             "access-control-allow-headers": "*",
                             "access-control-allow-methods": "OPTIONS,GET,PUT,PATCH",
                             "access-control-max-age": "86400"}


def test_preflight_read_only_ticket_as_imageio(connect):
    status, headers, _ = call(connect(), "OPTIONS", "/images/ro", headers=PREFLIGHT)
    assert status == 200
    assert headers["allow"] == "OPTIONS,GET"
    assert cors(headers) == {"access-control-allow-origin": "*",
                             "access-control-allow-headers": "*",
                             "access-control-allow-methods": "OPTIONS,GET,PUT",
                             "access-control-max-age": "86400"}


def test_preflight_star(connect):
    status, headers, _ = call(connect(), "OPTIONS", "/images/*", headers=PREFLIGHT)
    assert status == 200
    assert headers["access-control-allow-methods"] == "OPTIONS,GET,PUT,PATCH"


def test_preflight_unknown_ticket_403_with_headers(connect):
    """A browser fails a preflight that is not 2xx; the page can only say the ticket was
    refused or the daemon unreachable. The headers are there all the same, as in imageio."""
    status, headers, body = call(connect(), "OPTIONS", "/images/nope", headers=PREFLIGHT)
    assert status == 403
    assert headers["connection"] == "close"
    assert cors(headers) == {"access-control-allow-origin": "*",
                             "access-control-allow-headers": "*",
                             "access-control-allow-methods": "OPTIONS,GET,PUT",
                             "access-control-max-age": "86400"}


# Actual requests, their errors included

def test_put_and_patch(connect, export):
    data = os.urandom(4096)
    status, headers, _ = call(connect(), "PUT", "/images/rw?flush=n", data,
                              {"Content-Range": "bytes 4096-8191/*", **ORIGIN})
    assert status == 200
    assert headers["access-control-allow-origin"] == "*"
    for msg in ({"op": "zero", "offset": 8192, "size": 4096}, {"op": "flush"}):
        status, headers, _ = call(connect(), "PATCH", "/images/rw", json.dumps(msg).encode(),
                                  {"Content-Type": "application/json", **ORIGIN})
        assert status == 200
        assert headers["access-control-allow-origin"] == "*"
    status, _, back = call(connect(), "GET", "/images/rw", headers={"Range": "bytes=4096-12287"})
    assert back == data + b"\0" * 4096


def test_head(connect):
    status, headers, _ = call(connect(), "HEAD", "/images/ro", headers=ORIGIN)
    assert status == 200
    assert headers["access-control-allow-origin"] == "*"


def test_put_read_only_403_with_headers(connect):
    status, headers, body = call(connect(), "PUT", "/images/ro", b"x" * 512, ORIGIN)
    assert status == 403
    assert b"ticket" in body.lower()
    assert cors(headers) == {"access-control-allow-origin": "*",
                             "access-control-max-age": "86400"}


def test_get_unknown_ticket_403_with_headers(connect):
    status, headers, _ = call(connect(), "GET", "/images/nope", headers=ORIGIN)
    assert status == 403
    assert headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("method,headers", [
    ("GET", {"Range": f"bytes={SIZE}-"}),
    ("PUT", {"Content-Range": f"bytes {SIZE}-{SIZE + 511}/*"}),
])
def test_416_with_headers(connect, method, headers):
    body = b"x" * 512 if method == "PUT" else None
    status, got, _ = call(connect(), method, "/images/rw", body, {**headers, **ORIGIN})
    assert status == 416
    assert got["content-range"] == f"bytes */{SIZE}"
    assert got["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_5xx_with_headers(connect, method):
    status, headers, body = call(connect(), method, "/images/dead", headers=PREFLIGHT)
    assert status >= 500
    assert headers["access-control-allow-origin"] == "*"
    assert headers["access-control-max-age"] == "86400"


def test_sub_resources(connect):
    """Ours: extents and checksum are GETs on /images/... too."""
    for url in ("/images/ro/extents", "/images/ro/checksum", "/images/ro/checksum/algorithms"):
        status, headers, _ = call(connect(), "GET", url, headers=ORIGIN)
        assert status == 200, url
        assert headers["access-control-allow-origin"] == "*", url


def test_info(daemon):
    status, headers, body = call(daemon.remote(), "GET", "/info/", headers=PREFLIGHT)
    assert status == 200
    assert "version" in json.loads(body)
    assert headers["access-control-allow-origin"] == "*"
    assert headers["access-control-allow-methods"] == "*"


def test_not_on_other_methods_and_paths(daemon, connect):
    """As ovirt-imageio: DELETE on /images, unknown paths and the control API get none."""
    for conn, method, url in ((connect(), "DELETE", "/images/ro"),
                              (connect(), "GET", "/elsewhere"),
                              (daemon.control(), "GET", "/tickets/ro")):
        status, headers, _ = call(conn, method, url, headers=PREFLIGHT)
        assert cors(headers) == {}, (method, url, status)


def test_bad_utf8_path_400_without_failing(connect):
    status, headers, _ = call(connect(), "GET", "/images/%ff", headers=ORIGIN)
    assert status == 400
    assert headers["access-control-allow-origin"] == "*"
