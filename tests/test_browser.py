"""The browser page (contrib/web/) in a real headless Chromium driven over its DevTools protocol on
a pipe: the page served from another origin (plain HTTP on 127.0.0.1), nbdproxy over TLS on
localhost and ovirt-imageio as the servers; the bytes checked in the image and in the saved file."""

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from support import qemu_nbd, request

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB = os.path.join(TOP, "contrib", "web")
MiB = 1024**2
IMAGE_SIZE = 8 * MiB
# Pieces of 1 MiB (the page's default is 8) so a few MiB make several pieces, some in parallel.
PIECE = MiB
TIMEOUT = 120       # generous: Chromium on a loaded 2-core machine


def find_chromium():
    # The binary itself: Debian's /usr/bin/chromium is a shell wrapper around it.
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or ""):
        if path and os.access(path, os.X_OK):
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="no chromium (contrib/setup.sh installs Debian's)")


# DevTools protocol over --remote-debugging-pipe: JSON messages ended by NUL, the browser reads
# them on its fd 3 and writes on its fd 4.

class DevTools:
    """A headless Chromium and the DevTools protocol on its pipe."""

    def __init__(self, tmpdir, spki):
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        # Move the child's ends above the fds they must become, so dup2 clobbers nothing.
        child_in = os.dup2(to_browser, 100)
        child_out = os.dup2(from_browser, 101)
        for fd in (to_browser, from_browser):
            os.close(fd)

        def child_fds():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--user-data-dir=" + os.path.join(tmpdir, "profile"),
                "--ignore-certificate-errors-spki-list=" + spki,
                "--remote-debugging-pipe", "about:blank"]
        self.log = open(os.path.join(tmpdir, "chromium.log"), "w")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=self.log, pass_fds=(3, 4),
                                         preexec_fn=child_fds)
        finally:
            os.close(child_in)
            os.close(child_out)
        self._next_id = 0
        self._replies = {}
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        pending = b""
        while True:
            data = os.read(self._in, 1 << 20)
            if not data:
                break
            pending += data
            *messages, pending = pending.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        self._replies[msg["id"]] = msg
                        self._lock.notify_all()
        with self._lock:
            self._replies[None] = "closed"
            self._lock.notify_all()

    def call(self, method, params=None, session=None, timeout=TIMEOUT):
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._lock:
            while msg_id not in self._replies:
                if None in self._replies:
                    raise RuntimeError(f"chromium went away during {method}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to {method}")
                self._lock.wait(left)
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url):
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        return Page(self, target, session["sessionId"])

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        self._reader.join(10)
        os.close(self._in)
        self.log.close()


class Page:
    """One tab with the page."""

    def __init__(self, devtools, target, session):
        self.devtools, self.target, self.session = devtools, target, session

    def evaluate(self, expression, gesture=False):
        """The value of a JavaScript expression (a promise is awaited); gesture: as if the user
        did it (a click that may open a file picker)."""
        result = self.devtools.call("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True,
            "userGesture": gesture,
        }, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{expression} stayed false; status: {self.status()}")

    def choose_file(self, path):
        """What the user does with the file chooser: set the real <input type=file>."""
        node = self.devtools.call("Runtime.evaluate", {
            "expression": "document.getElementById('file')"}, self.session)
        self.devtools.call("DOM.setFileInputFiles", {
            "files": [path], "objectId": node["result"]["objectId"]}, self.session)

    def status(self):
        return self.evaluate("({...document.getElementById('status').dataset,"
                             " text: document.getElementById('status').textContent})")

    def run(self, button):
        """Click a button; the status once the transfer ended."""
        self.evaluate(f"document.getElementById('{button}').click()", gesture=True)
        self.wait_for("document.getElementById('status').dataset.state !== 'running'")
        return self.status()

    def close(self):
        self.devtools.call("Target.closeTarget", {"targetId": self.target})


def spki_hash(cert):
    """base64 SHA-256 of the certificate's public key, for --ignore-certificate-errors-spki-list:
    Chromium trusts that key, and only it."""
    pem = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-pubkey"], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pem,
                         check=True, capture_output=True).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


# Fixtures

@pytest.fixture(scope="module")
def browser(workdir, cert):
    d = DevTools(str(workdir), spki_hash(cert[0]))
    yield d
    d.close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    """The page's origin: a plain static server, as a management UI would serve contrib/web/."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=WEB))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def daemon(module_daemon):
    return module_daemon


@pytest.fixture
def image(tmp_path):
    """An 8 MiB raw image of random bytes, served by qemu-nbd; (path, server)."""
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(IMAGE_SIZE))
    server = qemu_nbd(path, str(tmp_path / "nbd.sock"))
    yield path, server
    server.stop()


@pytest.fixture
def upload_file(tmp_path):
    """A file of 5 MiB + 4 KiB (6 pieces, the last short): random, but its third MiB zeros."""
    data = bytearray(os.urandom(5 * MiB + 4096))
    data[2 * MiB:3 * MiB] = bytes(MiB)
    path = str(tmp_path / "upload.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path, bytes(data)


@pytest.fixture
def open_page(browser, origin):
    pages = []

    def open_(transfer_url):
        page = browser.open(f"{origin}/index.html?url={transfer_url}")
        pages.append(page)
        page.wait_for("document.readyState === 'complete' && !!window.NbdTransfer")
        page.evaluate(f"NbdTransfer.defaults.pieceSize = {PIECE}")
        return page

    yield open_
    for page in pages:
        page.close()


def nbdproxy_url(daemon, ticket):
    return f"https://localhost:{daemon.port}/images/{ticket}"


def patch_requests(daemon):
    _, text = request(daemon.control(), "GET", "/metrics")
    m = re.search(rb'nbdproxy_requests_total\{op="images.patch",status="200"\} (\d+)', text)
    return int(m[1]) if m else 0


def read_image(path, length):
    with open(path, "rb") as f:
        return f.read(length)


def save_to_private_file(page):
    """Stand in for the user's choice in showSaveFilePicker: a file in the origin's private file
    system, which the page writes through the same FileSystemWritableFileStream calls."""
    page.evaluate("""window.showSaveFilePicker = async (options) => {
        window.pickerOptions = options;
        const root = await navigator.storage.getDirectory();
        return root.getFileHandle("saved.raw", {create: true});
    }""")


def private_file_sha256(page):
    return page.evaluate("""(async () => {
        const root = await navigator.storage.getDirectory();
        const file = await (await root.getFileHandle("saved.raw")).getFile();
        const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
        return [file.size, Array.from(new Uint8Array(digest),
                                      b => b.toString(16).padStart(2, "0")).join("")];
    })()""")


def wait_for_file(path, size, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) == size:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path} not saved")


# nbdproxy

def test_upload(daemon, image, upload_file, open_page):
    """PUT pieces in parallel, the zero piece and the flush as PATCH (nbdproxy allows it)."""
    path, server = image
    src, data = upload_file
    before = read_image(path, IMAGE_SIZE)
    daemon.add_ticket(server.url, IMAGE_SIZE, ticket_id="up")
    patches = patch_requests(daemon)
    page = open_page(nbdproxy_url(daemon, "up"))
    page.choose_file(src)
    status = page.run("upload")
    assert status["state"] == "done", status
    assert status["flush"] == "patch"
    assert int(status["bytes"]) == len(data)
    assert page.evaluate("document.getElementById('progress').value") == 1
    # The probe, the zero MiB, the flush.
    assert patch_requests(daemon) - patches == 3
    assert read_image(path, IMAGE_SIZE) == data + before[len(data):]


def test_upload_empty_file(daemon, image, open_page, tmp_path):
    path, server = image
    before = read_image(path, IMAGE_SIZE)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    daemon.add_ticket(server.url, IMAGE_SIZE, ticket_id="empty")
    page = open_page(nbdproxy_url(daemon, "empty"))
    page.choose_file(str(empty))
    status = page.run("upload")
    assert status["state"] == "done", status
    assert status["bytes"] == "0"
    assert read_image(path, IMAGE_SIZE) == before


def test_upload_larger_than_image(daemon, image, open_page, tmp_path):
    path, server = image
    big = tmp_path / "big"
    big.write_bytes(bytes(IMAGE_SIZE + 1))
    daemon.add_ticket(server.url, IMAGE_SIZE, ticket_id="small")
    page = open_page(nbdproxy_url(daemon, "small"))
    page.choose_file(str(big))
    status = page.run("upload")
    assert status["state"] == "error"
    assert status["text"] == (f"the file ({IMAGE_SIZE + 1} bytes) is larger than the image "
                              f"({IMAGE_SIZE} bytes)")


def test_download_file_picker(daemon, image, open_page):
    path, server = image
    daemon.add_ticket(server.url, IMAGE_SIZE, ops=["read"], ticket_id="down")
    page = open_page(nbdproxy_url(daemon, "down"))
    save_to_private_file(page)
    status = page.run("download")
    assert status["state"] == "done", status
    assert int(status["bytes"]) == IMAGE_SIZE
    assert page.evaluate("window.pickerOptions.suggestedName") == "down.raw"
    expected = hashlib.sha256(read_image(path, IMAGE_SIZE)).hexdigest()
    assert private_file_sha256(page) == [IMAGE_SIZE, expected]


def test_download_blob(browser, daemon, image, open_page, tmp_path):
    """Without showSaveFilePicker (Firefox, Safari) the image goes through a Blob and a link."""
    path, server = image
    daemon.add_ticket(server.url, IMAGE_SIZE, ops=["read"], ticket_id="blob")
    saved = tmp_path / "downloads"
    saved.mkdir()
    browser.call("Browser.setDownloadBehavior", {"behavior": "allow",
                                                 "downloadPath": str(saved)})
    page = open_page(nbdproxy_url(daemon, "blob"))
    page.evaluate("window.showSaveFilePicker = undefined")
    status = page.run("download")
    assert status["state"] == "done", status
    wait_for_file(str(saved / "blob.raw"), IMAGE_SIZE)
    assert read_image(str(saved / "blob.raw"), IMAGE_SIZE) == read_image(path, IMAGE_SIZE)


def test_unknown_ticket(daemon, upload_file, open_page):
    """The preflight of the upload's first request is refused: all the page can know."""
    page = open_page(nbdproxy_url(daemon, "no-such-ticket"))
    page.choose_file(upload_file[0])
    status = page.run("upload")
    assert status["state"] == "error"
    assert status["text"] == "ticket refused or daemon unreachable"
    # A download is a plain GET, without preflight: the server's 403 and its message.
    save_to_private_file(page)
    status = page.run("download")
    assert status["state"] == "error"
    assert status["text"].startswith("ticket refused: ")
    assert "no-such-ticket" in status["text"]


def test_read_only_ticket_refuses_upload(daemon, image, upload_file, open_page):
    path, server = image
    before = read_image(path, IMAGE_SIZE)
    daemon.add_ticket(server.url, IMAGE_SIZE, ops=["read"], ticket_id="ro")
    page = open_page(nbdproxy_url(daemon, "ro"))
    page.choose_file(upload_file[0])
    status = page.run("upload")
    assert status["state"] == "error"
    assert status["text"].startswith("ticket refused: ")
    assert len(status["text"]) > len("ticket refused: ")      # the server's message
    assert read_image(path, IMAGE_SIZE) == before


class CutHandler(http.server.BaseHTTPRequestHandler):
    """Promises a whole image, sends 1 MiB of it, and closes."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(IMAGE_SIZE))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(bytes(MiB))
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def cut_server(cert):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_connection_lost_is_network_failure(cut_server, open_page):
    page = open_page(f"https://localhost:{cut_server}/images/cut")
    save_to_private_file(page)
    status = page.run("download")
    assert status["state"] == "error"
    assert status["text"].startswith("network failure")


def test_no_daemon(open_page):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # bound, not listening: connections are refused
        page = open_page(f"https://localhost:{port}/images/t")
        status = page.run("upload")
        assert status["text"] == "choose a file to upload"
        page.choose_file(__file__)
        status = page.run("upload")
        assert status["state"] == "error"
        assert status["text"] == "ticket refused or daemon unreachable"


def test_embedded_page_tells_parent(daemon, image, open_page):
    """In a management UI's frame, the page posts how a transfer ended to its parent."""
    path, server = image
    daemon.add_ticket(server.url, IMAGE_SIZE, ops=["read"], ticket_id="embedded")
    parent = open_page("unused")     # any page of the origin stands for the UI's
    parent.evaluate(f"""new Promise(resolve => {{
        window.messages = [];
        window.addEventListener("message", e => window.messages.push(e.data));
        const frame = document.createElement("iframe");
        frame.id = "frame";
        frame.src = "index.html?url={nbdproxy_url(daemon, 'embedded')}";
        frame.onload = resolve;
        document.body.appendChild(frame);
    }})""")
    parent.evaluate("""(() => {
        const w = document.getElementById("frame").contentWindow;
        w.showSaveFilePicker = async () =>
            (await navigator.storage.getDirectory()).getFileHandle("framed.raw", {create: true});
        w.document.getElementById("download").click();
    })()""", gesture=True)
    message = parent.wait_for("window.messages[0]")
    assert message == {"type": "nbdproxy-transfer", "state": "done",
                       "message": "downloaded 8.0 MiB", "bytes": IMAGE_SIZE}


# ovirt-imageio: it allows only OPTIONS, GET and PUT cross-origin

@pytest.fixture(scope="module")
def imageio(workdir, cert):
    sys.path.insert(0, os.path.join(TOP, "bench"))
    try:
        import systems
    finally:
        sys.path.pop(0)
    d = systems.Imageio(str(workdir / "imageio"), *cert)
    yield d
    d.stop()


def test_imageio(imageio, image, upload_file, open_page):
    path, server = image
    src, data = upload_file
    before = read_image(path, IMAGE_SIZE)
    url = imageio.add_ticket("imageio", server.url, IMAGE_SIZE)
    page = open_page(f"https://localhost:{imageio.port}{url}")
    page.choose_file(src)
    status = page.run("upload")
    assert status["state"] == "done", status
    # PATCH failed its preflight once; the last piece went as PUT ?flush=y.
    assert status["flush"] == "put"
    assert read_image(path, IMAGE_SIZE) == data + before[len(data):]
    assert "PATCH" not in imageio.read_log()

    save_to_private_file(page)
    status = page.run("download")
    assert status["state"] == "done", status
    expected = hashlib.sha256(read_image(path, IMAGE_SIZE)).hexdigest()
    assert private_file_sha256(page) == [IMAGE_SIZE, expected]
