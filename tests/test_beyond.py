"""What nbdproxy adds to the ovirt-imageio API (API.md 6, issue 7), each against real processes."""

import json
import os
import re
import socket
import subprocess
import time

import pytest

from support import qemu_nbd, read_export, request, response

MiB = 1024**2


def qemu_map(path, fmt="raw"):
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def data_ranges(path, fmt="raw"):
    return [(e["start"], e["length"]) for e in qemu_map(path, fmt) if e["data"]]


# 1. HEAD and Accept-Ranges: plain HTTP readers work.

def test_head_has_get_headers_and_no_body(daemon, raw_export, raw_image):
    size = os.path.getsize(raw_image)
    daemon.add_ticket(raw_export.url, size, filename="disk.raw")
    conn = daemon.local()
    head = response(conn, "HEAD", "/images/test")
    get = response(conn, "GET", "/images/test", headers={"Range": "bytes=0-9"})
    assert head.status == 200 and head.data == b""
    assert head.getheader("Content-Length") == str(size)
    assert head.getheader("Accept-Ranges") == "bytes"
    assert head.getheader("Content-Disposition") == "attachment; filename=disk.raw"
    assert get.status == 206 and get.getheader("Accept-Ranges") == "bytes"


def test_curl_head_over_tls(daemon, raw_export, raw_image):
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    out = subprocess.run(["curl", "-sS", "-I", "--cacert", daemon.cert,
                          f"https://localhost:{daemon.port}/images/test"],
                         check=True, capture_output=True, text=True).stdout
    assert out.startswith("HTTP/1.1 200")
    assert re.search(r"(?mi)^accept-ranges: bytes\r?$", out)
    assert re.search(rf"(?mi)^content-length: {os.path.getsize(raw_image)}\r?$", out)


def test_qemu_img_convert_reads_the_https_url(daemon, raw_export, raw_image, tmp_path):
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    source = json.dumps({"file.driver": "https", "file.sslverify": False,
                         "file.url": f"https://localhost:{daemon.port}/images/test"})
    out = str(tmp_path / "copy.raw")
    # qemu 7.2's curl driver now and then stops asking for more under load (seen here in about
    # 1 in 12 runs on a loaded machine): every byte we sent was received, both sides' socket
    # queues empty, our connections idle and waiting for the next request. So a bounded try,
    # at most three.
    for attempt in range(3):
        try:
            subprocess.run(["qemu-img", "convert", "-f", "raw", "json:" + source, "-O", "raw",
                            out], check=True, capture_output=True, timeout=30)
            break
        except subprocess.TimeoutExpired:
            assert attempt < 2, "qemu-img convert hung three times"
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw_image, out], check=True,
                   capture_output=True)


# 2. size and transfer_id in OPTIONS.

def test_options_has_size_and_transfer_id(daemon, raw_export, raw_image):
    size = os.path.getsize(raw_image)
    daemon.add_ticket(raw_export.url, size, transfer_id="transfer-42")
    status, body = request(daemon.local(), "OPTIONS", "/images/test")
    info = json.loads(body)
    assert status == 200 and info["size"] == size and info["transfer_id"] == "transfer-42"


# 3. Windowed, streamed extents.

def test_extents_window(daemon, raw_export, raw_image):
    size = os.path.getsize(raw_image)
    daemon.add_ticket(raw_export.url, size)
    _, body = request(daemon.local(), "GET", "/images/test/extents")
    full = json.loads(body)
    start, length = 3 * MiB, size // 2
    _, body = request(daemon.local(), "GET", f"/images/test/extents?start={start}&length={length}")
    window = json.loads(body)
    assert window[0]["start"] == start
    assert window[-1]["start"] + window[-1]["length"] == start + length
    assert all(a["start"] + a["length"] == b["start"] for a, b in zip(window, window[1:]))
    # The window says what the full map says about the same bytes.
    for e in window:
        covering = [f for f in full if f["start"] <= e["start"] < f["start"] + f["length"]]
        assert covering[0]["zero"] == e["zero"]
    status, _ = request(daemon.local(), "GET", f"/images/test/extents?start={size + 1}")
    assert status == 416
    status, _ = request(daemon.local(), "GET", "/images/test/extents?start=-1")
    assert status == 400


def test_large_map_is_streamed_with_bounded_memory(daemon, tmp_path):
    """A 1 TiB image with 40,000 data pieces: the map arrives chunked, first bytes fast."""
    path = str(tmp_path / "fragmented.raw")
    with open(path, "wb") as f:
        f.truncate(1024**4)
        block = b"\x01" * 4096
        for i in range(20000):
            f.seek(i * 32 * MiB)
            f.write(block)
    server = qemu_nbd(path, str(tmp_path / "frag.sock"))
    try:
        daemon.add_ticket(server.url, 1024**4)
        conn = daemon.local()
        started = time.monotonic()
        conn.request("GET", "/images/test/extents")
        resp = conn.getresponse()
        first = resp.read(1)
        first_seconds = time.monotonic() - started
        extents = json.loads(first + resp.read())
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert first_seconds < 0.5
        assert len(extents) == 40000
        assert extents[-1]["start"] + extents[-1]["length"] == 1024**4
        assert all(a["start"] + a["length"] == b["start"] for a, b in zip(extents, extents[1:]))
        with open(f"/proc/{daemon.proc.pid}/status") as f:
            rss_kib = int(re.search(r"VmHWM:\s+(\d+)", f.read())[1])
        assert rss_kib < 200 * 1024
    finally:
        server.stop()


# 4. PUT with Transfer-Encoding: chunked.

def test_chunked_put(daemon, raw_export, raw_image):
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    payload = os.urandom(5 * MiB + 123)
    conn = daemon.local()
    pieces = [payload[i:i + 777777] for i in range(0, len(payload), 777777)]
    conn.request("PUT", "/images/test", body=iter(pieces),
                 headers={"Content-Range": f"bytes {MiB}-*/*"}, encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert read_export(raw_export.sock, MiB, len(payload)) == payload
    # The connection stays usable after a chunked body.
    assert response(conn, "OPTIONS", "/images/test").status == 200


def test_chunked_put_past_the_end(daemon, raw_export, raw_image):
    size = os.path.getsize(raw_image)
    daemon.add_ticket(raw_export.url, size)
    conn = daemon.local()
    conn.request("PUT", "/images/test", body=iter([os.urandom(2 * MiB)]),
                 headers={"Content-Range": f"bytes {size - MiB}-*/*"}, encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 416
    assert resp.getheader("Content-Range") == f"bytes */{size}"


def test_chunked_put_with_curl(daemon, raw_export, raw_image):
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    payload = os.urandom(3 * MiB)
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", "-",
                          "--unix-socket", daemon.local_socket, "http://localhost/images/test"],
                         input=payload, check=True, capture_output=True).stdout
    assert out == b"200"
    assert read_export(raw_export.sock, 0, len(payload)) == payload


def _raw_chunked_put(daemon, body):
    """Send a chunked PUT head and body bytes, close our side; everything the daemon answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(daemon.local_socket)
    s.sendall(b"PUT /images/test HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              + body)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def test_chunked_put_chunk_line_too_long(daemon, raw_export, raw_image):
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    before = read_export(raw_export.sock, 0, 4096)
    out = _raw_chunked_put(daemon, b"1" + b"0" * 2000 + b"\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"line too long" in out
    assert read_export(raw_export.sock, 0, 4096) == before


def test_chunked_put_ending_inside_a_chunk_line(daemon, raw_export, raw_image):
    """A body cut inside a chunk-size line is a body that ended early, not a line too long; the
    write is logged as failed and nothing is acknowledged."""
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    log_start = len(daemon.read_log().splitlines())
    out = _raw_chunked_put(daemon, b"1000\r\n" + b"\x09" * 4096 + b"\r\n10")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"ended inside a chunk line" in out
    deadline = time.monotonic() + 5
    while not any("op=write ticket=test" in line and line.endswith(" failed")
                  for line in daemon.read_log().splitlines()[log_start:]):
        assert time.monotonic() < deadline, daemon.read_log()
        time.sleep(0.02)
    assert "Traceback" not in daemon.read_log()


# 5. Zero detection on PUT.

@pytest.mark.parametrize("sparse", [True, False])
def test_zero_pieces_keep_the_target_sparse(daemon, tmp_path, sparse):
    path = str(tmp_path / "target.raw")
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
        f.write(b"\xff" * 32 * MiB)   # allocated and not zero, so a hole shows where we punched
    server = qemu_nbd(path, str(tmp_path / "t.sock"))
    try:
        daemon.add_ticket(server.url, 32 * MiB, sparse=sparse)
        payload = os.urandom(2 * MiB) + bytes(8 * MiB) + os.urandom(2 * MiB)
        status, _ = request(daemon.local(), "PUT", "/images/test", payload)
        assert status == 200
        assert read_export(server.sock, 0, len(payload)) == payload
        allocated = os.stat(path).st_blocks * 512
        if sparse:
            # A hole was punched where the zeros went.
            assert (2 * MiB, 8 * MiB) in [(e["start"], e["length"]) for e in qemu_map(path)
                                          if not e["data"]]
            assert 24 * MiB <= allocated < 24 * MiB + 256 * 1024
        else:
            # Zeroed with NO_HOLE: the blocks stay allocated (maybe as unwritten extents).
            assert allocated >= 32 * MiB
    finally:
        server.stop()


# 6. Sub-paths that do not exist are 404, not a 403 about a ticket.

@pytest.mark.parametrize("path", ["/images/test/extent", "/images/test/", "/images/test/x/y",
                                  "/images/nosuch/extent", "/images/", "/imagesx/test"])
def test_unknown_sub_path_is_404(daemon, raw_export, raw_image, path):
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    status, body = request(daemon.local(), "GET", path)
    assert status == 404, body


# 7. A flush makes everything written through the ticket durable, whichever connection wrote it.

def test_flush_covers_writes_of_other_connections(daemon, tmp_path):
    path = str(tmp_path / "target.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    # cache=writeback keeps qcow2 metadata in qemu-nbd's memory until a flush.
    server = qemu_nbd(path, str(tmp_path / "q.sock"), "qcow2")
    daemon.add_ticket(server.url, 64 * MiB)
    writers = [daemon.local() for _ in range(3)]
    pieces = {}
    for i, conn in enumerate(writers):
        offset = i * 8 * MiB
        pieces[offset] = os.urandom(MiB)
        resp = response(conn, "PUT", "/images/test?flush=n", pieces[offset],
                        {"Content-Range": f"bytes {offset}-{offset + MiB - 1}/*"})
        assert resp.status == 200
    flusher = daemon.local()
    assert response(flusher, "PATCH", "/images/test", b'{"op":"flush"}').status == 200
    server.kill()
    check = qemu_nbd(path, str(tmp_path / "check.sock"), "qcow2")
    try:
        for offset, data in pieces.items():
            assert read_export(check.sock, offset, MiB) == data
    finally:
        check.stop()
        for conn in writers + [flusher]:
            conn.close()


# 8. The ticket list and Prometheus metrics on the control socket.

def test_ticket_list(daemon, raw_export, raw_image):
    size = os.path.getsize(raw_image)
    for name in ("a", "b", "c"):
        daemon.add_ticket(raw_export.url, size, ticket_id=name)
    status, body = request(daemon.control(), "GET", "/tickets/")
    assert status == 200
    assert sorted(t["uuid"] for t in json.loads(body)) == ["a", "b", "c"]


def test_metrics(daemon, raw_export, raw_image):
    daemon.add_ticket(raw_export.url, os.path.getsize(raw_image))
    request(daemon.local(), "GET", "/images/test", headers={"Range": "bytes=0-1048575"})
    request(daemon.local(), "PUT", "/images/test", os.urandom(MiB))
    request(daemon.local(), "GET", "/images/nosuch")
    conn = daemon.control()
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/plain")
    assert 'nbdproxy_requests_total{op="images.get",status="206"} 1' in text
    assert 'nbdproxy_requests_total{op="images.put",status="200"} 1' in text
    assert 'nbdproxy_requests_total{op="images.get",status="403"} 1' in text
    assert 'nbdproxy_bytes_total{op="read"} 1048576' in text
    assert 'nbdproxy_bytes_total{op="write"} 1048576' in text
    assert re.search(r"^nbdproxy_nbd_request_seconds_count [1-9]", text, re.M)
    assert re.search(r"^nbdproxy_connections \d+$", text, re.M)
    assert "nbdproxy_active_transfers 0" in text
    assert "nbdproxy_errors_total 0" in text
    for line in text.splitlines():
        assert line.startswith("#") or line.startswith("nbdproxy_")


def test_metrics_not_on_data_services(daemon):
    assert request(daemon.local(), "GET", "/metrics")[0] == 404
    assert request(daemon.remote(), "GET", "/metrics")[0] == 404
