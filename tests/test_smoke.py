"""The daemon serves a download, an upload and a flush end to end over the local socket."""

import os

from support import read_export, request


def test_roundtrip(daemon, raw_export, raw_image):
    size = os.path.getsize(raw_image)
    daemon.add_ticket(raw_export.url, size)
    status, data = request(daemon.local(), "GET", "/images/test")
    assert status == 200
    with open(raw_image, "rb") as f:
        assert data == f.read()
    payload = os.urandom(3 * 1024**2 + 17)
    status, _ = request(daemon.local(), "PUT", "/images/test", payload,
                        {"Content-Range": f"bytes 4096-{4096 + len(payload) - 1}/*"})
    assert status == 200
    assert read_export(raw_export.sock, 4096, len(payload)) == payload
    with open(raw_image, "rb") as f:
        f.seek(4096)
        assert f.read(len(payload)) == payload
