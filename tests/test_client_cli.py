"""The client commands against a real daemon (TLS), real qemu-nbd and nbdkit exports.

Every round trip is checked with `qemu-img compare`, and with --verify (the block hash of both
sides). The ticket's `transferred` shows that only data extents moved.
"""

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from support import NBDPROXY, TOP, Daemon, NBDServer, qemu_nbd

from nbdproxy.client import transfer
from nbdproxy.client.image import ClientError, ImageClient

MiB = 1024**2
GiB = 1024**3


# Helpers

def cli(*args, check=True, timeout=120, **kw):
    p = subprocess.run(NBDPROXY + [str(a) for a in args], cwd=TOP, capture_output=True,
                       text=True, timeout=timeout, **kw)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def assert_one_line_error(p, *words):
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("nbdproxy: "), p.stderr
    for word in words:
        assert word in lines[0], p.stderr
    return lines[0]


def make_raw(path, size, offsets=(), length=64 * 1024):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in offsets:
            f.seek(offset)
            f.write(os.urandom(min(length, size - offset)))
    return str(path)


def qemu_io(path, fmt, *commands):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv + [str(path)], check=True, stdout=subprocess.DEVNULL)


def make_qcow2(path, size, *commands):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if commands:
        qemu_io(path, "qcow2", *commands)
    return str(path)


def compare(a, b):
    p = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def virtual_size(path):
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["virtual-size"]


class Export:
    """qemu-nbd serving an image, and a daemon ticket for it."""

    def __init__(self, daemon, image, fmt="raw", ops=("read",), extra=(), **ticket):
        self.sock = os.path.join(os.path.dirname(daemon.control_socket),
                                 f"nbd-{uuid.uuid4().hex[:8]}.sock")
        size = virtual_size(image)
        self.server = qemu_nbd(str(image), self.sock, fmt, *extra)
        self.id = uuid.uuid4().hex
        try:
            daemon.add_ticket(self.server.url, size, ops, ticket_id=self.id, **ticket)
        except BaseException:
            self.server.stop()
            raise
        self.daemon = daemon
        self.url = f"https://localhost:{daemon.port}/images/{self.id}"

    def info(self):
        return self.daemon.ticket_info(self.id)

    def data_size(self, context="zero"):
        """Bytes the server reports as data (or dirty data): what a sparse client must move."""
        with ImageClient(self.url, self.daemon.cert) as c:
            if context == "dirty":
                return sum(e["length"] for e in c.extents("dirty") if e["dirty"] and not e["zero"])
            return sum(e["length"] for e in c.extents() if not e["zero"])

    def stop(self):
        self.server.stop()


@pytest.fixture
def exports(daemon):
    made = []

    def make(*args, **kw):
        made.append(Export(daemon, *args, **kw))
        return made[-1]

    yield make
    for e in made:
        e.stop()


# Round trips

SIZE = 64 * MiB + 123 * 4096 + 512     # not a multiple of 64 KiB (nor of 4 KiB)


def source(kind, tmp_path):
    """(path, format) of a source image of one kind."""
    if kind == "sparse":
        return make_raw(tmp_path / "src.raw", SIZE, (0, SIZE // 2, SIZE - 70000)), "raw"
    if kind == "empty":
        return make_raw(tmp_path / "src.raw", 8 * MiB), "raw"
    if kind == "full":
        return make_raw(tmp_path / "src.raw", 3 * MiB + 512, (0, MiB, 2 * MiB), MiB), "raw"
    if kind == "big":
        size = 6 * GiB + 4096
        return make_raw(tmp_path / "src.raw", size, (0, 3 * GiB + 5 * MiB, size - MiB), MiB), "raw"
    if kind == "qcow2":
        return make_qcow2(tmp_path / "src.qcow2", SIZE, "write -P 0x55 1M 1M",
                          "write -P 0xaa 40M 65k", f"write -P 0x11 {SIZE - 512} 512"), "qcow2"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["sparse", "empty", "full", "big", "qcow2"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download(daemon, exports, tmp_path, kind, fmt):
    src, src_fmt = source(kind, tmp_path)
    export = exports(src, src_fmt)
    data = export.data_size()
    out = tmp_path / f"out.{fmt}"
    p = cli("download", export.url, out, "--format", fmt, "--cafile", daemon.cert, "--verify")
    assert p.stderr == "" and p.stdout == ""     # no progress bar without a terminal
    compare(src, out)
    assert virtual_size(out) == virtual_size(src)
    # Only the data extents moved, and the result is sparse.
    assert export.info()["transferred"] == data
    assert os.stat(out).st_blocks * 512 <= data + 2 * MiB


@pytest.mark.parametrize("kind", ["sparse", "empty", "big", "qcow2"])
@pytest.mark.parametrize("target_fmt", ["raw", "qcow2"])
def test_upload_to_empty_target(daemon, exports, tmp_path, kind, target_fmt):
    src, _ = source(kind, tmp_path)
    size = virtual_size(src)
    target = tmp_path / f"target.{target_fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", target_fmt, str(target), str(size)],
                   check=True)
    export = exports(target, target_fmt, ops=("write",))
    with ImageClient(export.url, daemon.cert) as c:
        # qemu-img create allocates the first 4 KiB of a raw file: the target's extents do not
        # say it reads as zeros, so the client zeroes it where the source has zeros.
        probed = [(e["start"], e["start"] + e["length"]) for e in c.extents() if not e["zero"]]
    assert sum(b - a for a, b in probed) <= 4096
    p = cli("upload", src, export.url, "--cafile", daemon.cert, "--verify")
    assert p.stderr == ""
    export.stop()
    compare(src, target)
    # Zero extents were skipped where the target's extents say zero: only data, and zeros
    # over the allocated first 4 KiB, were sent.
    sent = [(start, start + length) for start, length, zero in _local_extents(src) if not zero]
    assert export.info()["transferred"] == union_size(sent + probed)


def union_size(ranges):
    total, end = 0, 0
    for a, b in sorted(ranges):
        a = max(a, end)
        if b > a:
            total += b - a
            end = b
    return total


def _local_extents(path):
    from nbdproxy.client import local

    fmt = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                    capture_output=True, check=True).stdout)["format"]
    with local.Server(str(path), fmt, read_only=True) as server:
        h = server.connect()
        try:
            return list(h.zero_extents())
        finally:
            h.close()


def test_upload_over_data_zeroes_holes(daemon, exports, tmp_path):
    """A target full of data: the source's zero extents must be zeroed there (PATCH zero)."""
    src, _ = source("qcow2", tmp_path)
    target = make_raw(tmp_path / "target.raw", SIZE, range(0, SIZE, 4 * MiB), 4 * MiB)
    export = exports(target, "raw", ops=("read", "write"))
    cli("upload", src, export.url, "--cafile", daemon.cert, "--verify", "--connections", "2")
    export.stop()
    compare(src, target)


def test_incremental_backup(daemon, exports, tmp_path):
    disk = make_qcow2(tmp_path / "disk.qcow2", 64 * MiB, "write -P 1 0 1M", "write -P 2 20M 1M",
                      "write -P 3 63M 1M")
    subprocess.run(["qemu-img", "bitmap", "--add", disk, "b0"], check=True)
    full = tmp_path / "full.qcow2"
    export = exports(disk, "qcow2", extra=("-r",))
    cli("download", export.url, full, "--cafile", daemon.cert, "--verify")
    export.stop()
    compare(disk, full)

    # The guest writes: new data, changed data, zeroed data.
    qemu_io(disk, "qcow2", "write -P 4 30M 1M", "write -P 5 64k 64k", "write -z 20M 1M")
    export = exports(disk, "qcow2", extra=("-r", "-B", "b0"), dirty=True)
    dirty_data = export.data_size("dirty")
    assert 0 < dirty_data <= 2 * MiB
    incr = tmp_path / "incr.qcow2"
    cli("download", export.url, incr, "--incremental", "--backing-file", full,
        "--cafile", daemon.cert, "--verify")
    compare(disk, incr)
    assert export.info()["transferred"] == dirty_data
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(incr)],
                                     capture_output=True, check=True).stdout)
    assert info["backing-filename"] == str(full)
    assert info["actual-size"] < 8 * MiB


def test_incremental_needs_dirty_ticket(daemon, exports, tmp_path):
    src, fmt = source("qcow2", tmp_path)
    export = exports(src, fmt)
    backing = make_qcow2(tmp_path / "prev.qcow2", SIZE)
    p = cli("download", export.url, tmp_path / "incr.qcow2", "--incremental", "--backing-file",
            backing, "--cafile", daemon.cert, check=False)
    assert_one_line_error(p, "dirty")
    assert not os.path.exists(tmp_path / "incr.qcow2")


# The unix socket switch, plain HTTP

def test_unix_socket_and_tcp_fallback(daemon, exports, tmp_path):
    src, fmt = source("sparse", tmp_path)
    export = exports(src, fmt)
    stats = transfer.download(export.url, str(tmp_path / "a.raw"), cafile=daemon.cert)
    assert stats["transport"] == "unix"
    compare(src, tmp_path / "a.raw")
    # TCP only: asked for, or because the advertised socket does not answer.
    stats = transfer.download(export.url, str(tmp_path / "b.raw"), cafile=daemon.cert,
                              unix_socket=False)
    assert stats["transport"] == "tcp"
    os.unlink(daemon.local_socket)
    stats = transfer.download(export.url, str(tmp_path / "c.qcow2"), cafile=daemon.cert)
    assert stats["transport"] == "tcp"
    compare(src, tmp_path / "b.raw")
    compare(src, tmp_path / "c.qcow2")


def test_abstract_socket_and_plain_http(tmp_path, cert):
    name = f"@nbdproxy-test-{uuid.uuid4().hex}"
    d = Daemon(str(tmp_path), args=["--local-socket", name])
    try:
        src, fmt = source("sparse", tmp_path)
        server = qemu_nbd(src, str(tmp_path / "nbd.sock"), fmt)
        try:
            d.add_ticket(server.url, SIZE, ("read", "write"))
            url = f"http://localhost:{d.port}/images/test"
            with ImageClient(url) as c:
                assert c.transport == "unix" and c.unix_path == "\0" + name[1:]
            stats = transfer.download(url, str(tmp_path / "out.raw"), verify=True)
            assert stats["transport"] == "unix"
            compare(src, tmp_path / "out.raw")
            p = cli("upload", tmp_path / "out.raw", url, "--verify")
            assert p.returncode == 0
        finally:
            server.stop()
    finally:
        d.stop()


# checksum

def test_checksum_command(daemon, exports, tmp_path):
    from ovirt_imageio import client as imageio

    src, fmt = source("qcow2", tmp_path)
    local = json.loads(cli("checksum", src).stdout)
    assert local == imageio.checksum(src)
    other = json.loads(cli("checksum", src, "--algorithm", "sha256", "--block-size",
                           str(MiB)).stdout)
    assert other == imageio.checksum(src, block_size=MiB, algorithm="sha256")
    export = exports(src, fmt)
    remote = json.loads(cli("checksum", export.url, "--cafile", daemon.cert).stdout)
    assert remote == local
    # An image in use by a writer is refused, in one line.
    p = cli("checksum", src, check=False)
    assert_one_line_error(p, "lock")


def test_verify_mismatch(daemon, tmp_path):
    """nbdkit null drops writes: the upload succeeds, the block hashes differ."""
    sock = str(tmp_path / "null.sock")
    null = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                      "null", f"size={SIZE}"], sock)
    try:
        daemon.add_ticket(null.url, SIZE, ("write",))
        src, _ = source("sparse", tmp_path)
        url = f"https://localhost:{daemon.port}/images/test"
        p = cli("upload", src, url, "--cafile", daemon.cert, "--verify", check=False)
        assert_one_line_error(p, "checksum mismatch")
        # Without --verify the same upload "works": that is what --verify is for.
        cli("upload", src, url, "--cafile", daemon.cert)
    finally:
        null.kill()
        null.stop()


# Errors: one line, exit status 1

def test_errors(daemon, exports, tmp_path):
    src, fmt = source("sparse", tmp_path)
    export = exports(src, fmt, ops=("read", "write"))
    out = tmp_path / "out.raw"

    # Nothing listens there.
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = cli("download", f"https://localhost:{port}/images/x", out, "--cafile", daemon.cert,
            check=False)
    assert_one_line_error(p, "cannot talk to", "refused")

    # A ticket the daemon does not know.
    p = cli("download", f"https://localhost:{daemon.port}/images/nope", out,
            "--cafile", daemon.cert, check=False)
    assert_one_line_error(p, "403")
    assert not out.exists()

    # A certificate we cannot verify.
    p = cli("download", export.url, out, check=False)
    assert_one_line_error(p, "certificate", "--cafile")
    p = cli("download", export.url, out, "--insecure")

    # An image larger than the target.
    big = make_raw(tmp_path / "big.raw", SIZE + 4096, (0,))
    p = cli("upload", big, export.url, "--cafile", daemon.cert, check=False)
    assert_one_line_error(p, "larger than the target")

    # A read-only ticket.
    ro = exports(src, fmt, ops=("read",))
    p = cli("upload", src, ro.url, "--cafile", daemon.cert, check=False)
    assert_one_line_error(p, "does not allow writing")

    p = cli("download", export.url, out, "--cafile", daemon.cert, "--connections", "0",
            check=False)
    assert_one_line_error(p, "--connections")

    # Not an image URL, a missing file.
    p = cli("download", f"https://localhost:{daemon.port}/tickets/x", out, check=False)
    assert_one_line_error(p, "invalid URL")
    p = cli("upload", tmp_path / "missing.raw", export.url, check=False)
    assert_one_line_error(p, "no such file")


def test_disk_full(daemon, exports, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        src = make_raw(tmp_path / "src.raw", 32 * MiB, range(0, 32 * MiB, 4 * MiB), 4 * MiB)
        export = exports(src, "raw")
        p = cli("download", export.url, mnt / "out.raw", "--cafile", daemon.cert, check=False)
        assert_one_line_error(p, "no space left on device")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# Interruption: no qemu-nbd left behind

def qemu_nbd_serving(path):
    """Pids of qemu-nbd processes whose command line names path (a file name, or a function
    of the file names that matches)."""
    match = path if callable(path) else lambda arg: arg == str(path).encode()
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and any(map(match, argv)):
            pids.append(int(pid))
    return pids


def private_dirs(pids):
    """The temporary directories of the client's qemu-nbd processes (their --socket)."""
    dirs = set()
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            for arg in f.read().decode().split("\0"):
                if arg.startswith("--socket="):
                    dirs.add(os.path.dirname(arg[len("--socket="):]))
    return dirs


def wait_for(cond, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError


@pytest.fixture
def slow_export(daemon, tmp_path):
    """1 GiB of data at 20 MiB/s: a download that takes long enough to interrupt."""
    sock = str(tmp_path / "slow.sock")
    server = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                        "--filter=rate", "pattern", "size=1G", "rate=20M"], sock)
    daemon.add_ticket(server.url, GiB, ("read",))
    yield f"https://localhost:{daemon.port}/images/test"
    server.kill()
    server.stop()


def temporary_of(out):
    """The client's name for the file a download to out writes until it is done."""
    prefix = str(out.parent / f".{out.name}.nbdproxy-").encode()
    return lambda arg: arg.startswith(prefix)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_download(daemon, slow_export, tmp_path, sig):
    """Interrupted, the download removes what it wrote and keeps the FILE the user had."""
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"precious" * 4096)
    proc = subprocess.Popen(NBDPROXY + ["download", slow_export, str(out), "--cafile",
                                        daemon.cert], cwd=TOP, stderr=subprocess.PIPE, text=True)
    try:
        pids = wait_for(lambda: qemu_nbd_serving(temporary_of(out)))
        tmpdirs = private_dirs(pids)
        time.sleep(0.5)
        proc.send_signal(sig)
        proc.wait(20)
        err = proc.stderr.read()
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            for d in tmpdirs:   # what a killed client cannot remove
                shutil.rmtree(d, ignore_errors=True)
        else:
            assert not any(os.path.exists(d) for d in tmpdirs)
            assert proc.returncode == 130, err
            assert err.strip() == "nbdproxy: interrupted"
            assert not [name for name in os.listdir(tmp_path) if ".nbdproxy-" in name]
        assert out.read_bytes() == b"precious" * 4096
        # qemu-nbd is gone too, even after SIGKILL (it gets SIGTERM when its parent dies).
        wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and
                                 not _zombie(pid) for pid in pids), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_interrupted_upload(daemon, tmp_path):
    sock = str(tmp_path / "slow.sock")
    target = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                        "--filter=rate", "memory", "size=128M", "rate=10M"], sock)
    try:
        daemon.add_ticket(target.url, 128 * MiB, ("write",))
        src = make_raw(tmp_path / "src.raw", 128 * MiB, range(0, 128 * MiB, 16 * MiB), 8 * MiB)
        proc = subprocess.Popen(NBDPROXY + ["upload", src, f"https://localhost:{daemon.port}"
                                            "/images/test", "--cafile", daemon.cert],
                                cwd=TOP, stderr=subprocess.PIPE, text=True)
        try:
            pids = wait_for(lambda: qemu_nbd_serving(src))
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            proc.wait(20)
            assert proc.returncode == 130
            assert proc.stderr.read().strip() == "nbdproxy: interrupted"
            assert not any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids)
            assert os.path.getsize(src) == 128 * MiB     # the source is untouched
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        target.kill()
        target.stop()


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# Progress

def test_progress_on_terminal(daemon, exports, tmp_path):
    src, fmt = source("sparse", tmp_path)
    export = exports(src, fmt)
    master, slave = pty.openpty()
    try:
        p = subprocess.run(NBDPROXY + ["download", export.url, str(tmp_path / "out.raw"),
                                       "--cafile", daemon.cert],
                           cwd=TOP, stderr=slave, stdout=subprocess.PIPE, timeout=60)
        assert p.returncode == 0
        out = b""
        while select.select([master], [], [], 0.2)[0]:
            out += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    text = out.decode()
    assert "download [100.0%]" in text and "/s" in text, text
    assert text.endswith("\r\n") or text.endswith("\n"), text
    # --quiet: nothing on the terminal.
    master, slave = pty.openpty()
    try:
        p = subprocess.run(NBDPROXY + ["download", export.url, str(tmp_path / "q.raw"),
                                       "--cafile", daemon.cert, "--quiet"],
                           cwd=TOP, stderr=slave, timeout=60)
        assert p.returncode == 0
        assert not select.select([master], [], [], 0.2)[0]
    finally:
        os.close(master)
        os.close(slave)


def test_progress_counts():
    import io

    from nbdproxy.client.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    progress = Progress("upload", total=4 * MiB, stream=stream, interval=0)
    progress.update(MiB)
    assert "upload [ 25.0%] 1.00 MiB of 4.00 MiB" in stream.getvalue()
    assert "left" in stream.getvalue()
    progress.close()
    assert stream.getvalue().endswith("\n") and "[100.0%]" in stream.getvalue()
    quiet = Progress("upload", total=1, stream=Tty(), quiet=True)
    quiet.update(1)
    quiet.close()
    assert quiet.stream.getvalue() == ""


# Library edges

def test_client_errors(daemon, exports, tmp_path):
    src, fmt = source("sparse", tmp_path)
    export = exports(src, fmt)
    with pytest.raises(ClientError, match="invalid URL"):
        ImageClient("ftp://localhost/images/x")
    with pytest.raises(ClientError, match="--backing-file"):
        transfer.download(export.url, str(tmp_path / "x.qcow2"), incremental=True)
    with ImageClient(export.url, daemon.cert, unix_socket=False) as c:
        assert c.size() == SIZE
        assert c.max_readers >= 1 and "extents" in c.features
        buf = bytearray(4096)     # data there: a bytearray is filled, not a copy of it
        c.readinto(SIZE // 2, buf)
        with open(src, "rb") as f:
            f.seek(SIZE // 2)
            assert bytes(buf) == f.read(4096)
        # Windows of the extents map add up to the whole map.
        import nbdproxy.client.image as image
        whole = list(c.extents())
        old, image.EXTENTS_WINDOW = image.EXTENTS_WINDOW, 5 * MiB
        try:
            windowed = list(c.extents())
        finally:
            image.EXTENTS_WINDOW = old
        assert _merge(windowed) == whole


def _merge(extents):
    out = []
    for e in extents:
        if out and out[-1]["zero"] == e["zero"] and out[-1]["hole"] == e["hole"] \
                and out[-1]["start"] + out[-1]["length"] == e["start"]:
            out[-1] = dict(out[-1], length=out[-1]["length"] + e["length"])
        else:
            out.append(dict(e))
    return out


def test_target_disk_full(daemon, tmp_path):
    """The target's writes fail (nbdkit full: ENOSPC): one line, at once, not a hang."""
    sock = str(tmp_path / "full.sock")
    full = NBDServer(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                      "full", f"size={SIZE}"], sock)
    try:
        daemon.add_ticket(full.url, SIZE, ("write",))
        src = make_raw(tmp_path / "src.raw", SIZE, range(0, SIZE, 8 * MiB), 8 * MiB)
        start = time.monotonic()
        p = cli("upload", src, f"https://localhost:{daemon.port}/images/test",
                "--cafile", daemon.cert, check=False, timeout=60)
        assert_one_line_error(p, "PUT failed: 500")
        assert time.monotonic() - start < 30
    finally:
        full.kill()
        full.stop()


# contrib/: the backup example and the virt-v2v guide

def venv_env():
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
                + os.environ["PATH"])


def test_backup_example(tmp_path):
    p = subprocess.run(["bash", os.path.join(TOP, "contrib", "backup", "backup.sh"),
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                       env=dict(venv_env(), NBDPROXY=" ".join(NBDPROXY), PYTHONPATH=TOP))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "OK"
    assert "restored.raw equals the disk" in p.stderr
    # Nothing left running: no qemu-nbd of the example.
    assert not qemu_nbd_serving(str(tmp_path / "work" / "disk.qcow2"))
    assert not qemu_nbd_serving(str(tmp_path / "work" / "restored.raw"))


def guide_block(name):
    with open(os.path.join(TOP, "contrib", "v2v-import.md")) as f:
        text = f.read()
    after = text.split(f"<!-- test: {name} -->", 1)[1]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def test_v2v_guide(daemon, tmp_path):
    out = tmp_path / "v2v"
    out.mkdir()
    # Stands in for virt-v2v -o local -of qcow2: a sparse qcow2 named NAME-sda.
    disk = make_qcow2(out / "guest-sda", 2 * GiB, "write -P 0x10 0 1M", "write -P 0x20 1G 3M",
                      "write -P 0x30 2047M 1M")
    env = dict(venv_env(), OUT=str(out), TARGET=str(tmp_path / "target.raw"),
               CONTROL=daemon.control_socket, HOST="localhost", PORT=str(daemon.port),
               CAFILE=daemon.cert)
    # nbdproxy on PATH is the venv's entry point.
    assert os.path.exists(os.path.join(os.path.dirname(sys.executable), "nbdproxy"))
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", guide_block("upload")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    compare(disk, tmp_path / "target.raw")
    wait_for(lambda: not qemu_nbd_serving(str(tmp_path / "target.raw")), timeout=10)


def test_local_io_keeps_no_buffer_reference(tmp_path):
    """libnbd 1.14 leaks a reference per aio command; the local handle gives it back, so a
    worker's buffer is freed after a transfer, and no memoryview piles up per command."""
    import io

    from nbdproxy.client import local

    path = make_raw(tmp_path / "l.raw", 16 * MiB, (0, 8 * MiB), MiB)
    with local.Server(path, "raw") as server:
        h = server.connect()
        try:
            buf = bytearray(local.BUFFER_SIZE)
            base = sys.getrefcount(buf)
            for _ in range(3):
                for _piece in h.read(buf, 0, 16 * MiB):
                    pass
                del _piece
            h.write_from(io.BytesIO(bytes(16 * MiB)).readinto, buf, 0, 16 * MiB)
            reader = h.read(buf, 0, 16 * MiB)
            next(reader)
            reader.close()      # abandoned with reads in flight
            assert sys.getrefcount(buf) == base
        finally:
            h.close()


# Issue 12, item 13: a --block-size the server would refuse is a usage error.

@pytest.mark.parametrize("value", [str(2**40), "4096", str(MiB + 1), str(32 * MiB), "0", "-4096",
                                   "4M"])
def test_checksum_block_size_usage(tmp_path, value):
    src = make_raw(tmp_path / "src.raw", MiB, (0,))
    p = cli("checksum", src, "--block-size", value, check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "--block-size" in p.stderr
    for ok in (MiB, 16 * MiB, 3 * MiB + 4096):
        assert json.loads(cli("checksum", src, "--block-size", ok).stdout)["block_size"] == ok


# Review 3 (issue 12 item 13): bad input on the command line is one line, never a traceback.

@pytest.mark.parametrize("args,words", [
    ([b"download", b"https://[::1/images/x", b"out.raw"], ["invalid URL", "IPv6"]),
    ([b"checksum", b"https://[::1/images/x"], ["invalid URL", "IPv6"]),
    ([b"upload", b"src.raw", b"https://[::1/images/x"], ["invalid URL", "IPv6"]),
    ([b"checksum", b"https://local host/images/x"], ["invalid URL"]),
    ([b"ticket", b"show", b"--control-socket", b"/nonexistent.sock", b"\xff"],
     ["argument id", "not valid UTF-8"]),
    ([b"ticket", b"add", b"--control-socket", b"/nonexistent.sock", b"--url", b"nbd:unix:/x",
      b"--size", b"1", b"--id", b"a\xffb"], ["argument --id", "not valid UTF-8"]),
    ([b"ticket", b"add", b"--control-socket", b"/nonexistent.sock", b"--url", b"nbd:unix:/\xff",
      b"--size", b"1"], ["argument --url", "not valid UTF-8"]),
], ids=["download-bad-ipv6-url", "checksum-bad-ipv6-url", "upload-bad-ipv6-url",
        "space-in-host", "show-non-utf8-id", "add-non-utf8-id", "add-non-utf8-url"])
def test_cli_bad_input_is_one_line(tmp_path, args, words):
    """Exit status 1 and one line for a bad URL; a usage error (2) for text that is not UTF-8,
    which a ticket (JSON) cannot carry."""
    make_raw(tmp_path / "src.raw", MiB, (0,))
    argv = [a.encode() for a in NBDPROXY] + args
    p = subprocess.run(argv, cwd=str(tmp_path), capture_output=True,
                       env=dict(os.environ, PYTHONPATH=TOP), timeout=60)
    err = p.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if args[0] == b"ticket":
        assert p.returncode == 2, err
    else:
        assert p.returncode == 1 and len(lines) == 1, err
    assert all(word in lines[-1] for word in words), err
    assert not os.path.exists(tmp_path / "out.raw")


def test_ticket_id_of_any_text_in_a_url(daemon, tmp_path):
    """The URL of a ticket whose id HTTP cannot carry as it is (a space, non-ASCII, a byte that
    is not UTF-8) goes as typed: the client percent-encodes it; a %XX stays as typed."""
    src = make_raw(tmp_path / "src.raw", MiB, (0,))
    server = qemu_nbd(src, str(tmp_path / "nbd.sock"))
    base = f"https://localhost:{daemon.port}/images/"
    try:
        for ticket_id, typed in (("disk é 1", "disk é 1"), ("a?b", "a%3Fb")):
            cli("ticket", "--control-socket", daemon.control_socket, "add", "--url", server.url,
                "--size", MiB, "--id", ticket_id)
            out = tmp_path / "out.raw"
            cli("download", base + typed, out, "--cafile", daemon.cert)
            compare(src, out)
        argv = [a.encode() for a in NBDPROXY] + [b"checksum", base.encode() + b"a\xffb",
                                                 b"--cafile", daemon.cert.encode()]
        p = subprocess.run(argv, cwd=TOP, capture_output=True, timeout=60)
        assert_one_line_error(subprocess.CompletedProcess(
            argv, p.returncode, stderr=p.stderr.decode(errors="replace")), "400", "UTF-8")
    finally:
        server.stop()
