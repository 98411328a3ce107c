#!/usr/bin/env python3
"""Move an image through nbdproxy the way ovirt-imageio's own client does: the "seed" flow.

    seed_flow.py [--cafile CA] [--insecure] download URL FILE
    seed_flow.py [--cafile CA] [--insecure] upload FILE URL

URL is a transfer URL on the TLS service, https://HOST:PORT/images/TICKET. The flow:

1. OPTIONS URL over TLS. The answer is JSON: "features", "max_readers"/"max_writers", and
   "unix_socket", the daemon's local data socket: a path, or an abstract name that starts
   with a NUL character ("\\u0000/org/nbdproxy" in the JSON).
2. If the daemon is on this host (the TLS connection's two ends have the same address) and
   advertised a unix socket, move the data over that socket instead: plain HTTP, no TLS, same
   paths. Python's socket.connect() takes an abstract name as a str starting with "\\0", so
   the value from the JSON is used as it is. If it cannot connect, stay on TLS.
3. download: the size comes from OPTIONS "size" (nbdproxy) or else from the end of the last
   extent; GET with Range in pieces, 206 expected; pieces that are all zeros are not written,
   so the file stays sparse.
   upload: PUT with Content-Range and ?flush=n per piece (200 expected); pieces that are all
   zeros become PATCH {"op": "zero"} (when the server has the "zero" feature); one PATCH
   {"op": "flush"} at the end makes the data durable.

Standard library only; works against nbdproxy and the ovirt-imageio daemon alike. It says on
stderr which transport it used. Exit status 0 on success, 1 with a message otherwise.

Example (the `make run` demo):
    contrib/examples/seed_flow.py --cafile demo/cert.pem download \\
        https://localhost:54322/images/demo /tmp/demo.raw
"""

import argparse
import http.client
import json
import os
import socket
import ssl
import sys
import urllib.parse

PIECE = 8 * 1024**2
ZEROS = bytes(PIECE)


def is_zero(view):
    return view == ZEROS[:len(view)]


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: a path, or an abstract name starting with NUL."""

    def __init__(self, address, timeout=60):
        self.address = address
        super().__init__("localhost", timeout=timeout)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(self.address)
        except OSError:
            self.sock.close()
            self.sock = None
            raise


class Error(Exception):
    pass


def check(resp, expected, what):
    body = resp.read()
    if resp.status != expected:
        raise Error(f"{what}: {resp.status} {resp.reason}: "
                    f"{body[:200].decode('utf-8', 'replace').strip()}")
    return body


def connect(url, cafile, insecure):
    """OPTIONS over TLS, then the unix socket if advertised and local; (connection, options)."""
    ctx = ssl.create_default_context(cafile=cafile)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    tls = http.client.HTTPSConnection(url.hostname, url.port or 443, context=ctx, timeout=60)
    tls.request("OPTIONS", url.path)
    resp = tls.getresponse()
    if resp.status == 405:          # an old server: no features, no unix socket
        resp.read()
        options = {}
    else:
        options = json.loads(check(resp, 200, "OPTIONS"))
    address = options.get("unix_socket")
    local = tls.sock.getsockname()[0] == tls.sock.getpeername()[0]
    if address and local:
        conn = UnixHTTPConnection(address)
        try:
            conn.connect()
        except OSError as e:
            print(f"cannot use unix socket {address!r}: {e}; using TLS", file=sys.stderr)
        else:
            tls.close()
            print(f"using unix socket {address!r}", file=sys.stderr)
            return conn, options
    print(f"using TLS to {url.netloc}", file=sys.stderr)
    return tls, options


def image_size(conn, path, options):
    if "size" in options:
        return options["size"]
    conn.request("GET", path + "/extents")
    extents = json.loads(check(conn.getresponse(), 200, "GET extents"))
    return extents[-1]["start"] + extents[-1]["length"] if extents else 0


def download(conn, path, options, filename):
    size = image_size(conn, path, options)
    buf = bytearray(PIECE)
    with open(filename, "wb") as f:
        f.truncate(size)
        offset = 0
        while offset < size:
            n = min(PIECE, size - offset)
            conn.request("GET", path, headers={"Range": f"bytes={offset}-{offset + n - 1}"})
            resp = conn.getresponse()
            if resp.status != 206:
                check(resp, 206, f"GET {offset}+{n}")
            view = memoryview(buf)[:n]
            got = 0
            while got < n:
                m = resp.readinto(view[got:])
                if not m:
                    raise Error(f"GET {offset}+{n}: short body, {got} bytes")
                got += m
            resp.read()
            if not is_zero(view):
                f.seek(offset)
                f.write(view)
            offset += n


def upload(conn, path, options, filename):
    features = options.get("features", [])
    flush = "?flush=n" if "flush" in features else ""
    size = os.path.getsize(filename)
    buf = bytearray(PIECE)
    with open(filename, "rb") as f:
        offset = 0
        while offset < size:
            n = f.readinto(memoryview(buf)[:min(PIECE, size - offset)])
            if not n:
                raise Error(f"{filename}: short read at {offset}")
            view = memoryview(buf)[:n]
            if "zero" in features and is_zero(view):
                body = json.dumps({"op": "zero", "offset": offset, "size": n}).encode()
                conn.request("PATCH", path, body=body,
                             headers={"Content-Type": "application/json"})
                check(conn.getresponse(), 200, f"PATCH zero {offset}+{n}")
            else:
                conn.request("PUT", path + flush, body=view,
                             headers={"Content-Range": f"bytes {offset}-{offset + n - 1}/*",
                                      "Content-Length": str(n)})
                check(conn.getresponse(), 200, f"PUT {offset}+{n}")
            offset += n
    if "flush" in features:
        conn.request("PATCH", path, body=b'{"op":"flush"}',
                     headers={"Content-Type": "application/json"})
        check(conn.getresponse(), 200, "PATCH flush")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cafile", help="CA certificate of the daemon's TLS certificate")
    p.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="copy the image at URL to FILE (raw)")
    d.add_argument("url")
    d.add_argument("file")
    u = sub.add_parser("upload", help="copy FILE (raw) to the image at URL")
    u.add_argument("file")
    u.add_argument("url")
    args = p.parse_args()
    url = urllib.parse.urlsplit(args.url)
    if url.scheme != "https":
        p.error("URL must be https://HOST:PORT/images/TICKET")
    try:
        conn, options = connect(url, args.cafile, args.insecure)
        try:
            if args.command == "download":
                download(conn, url.path, options, args.file)
            else:
                upload(conn, url.path, options, args.file)
        finally:
            conn.close()
    except (Error, OSError, ValueError) as e:
        print(f"seed_flow: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
