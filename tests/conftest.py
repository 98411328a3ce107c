"""Fixtures: real qemu-nbd and nbdkit exports, and a real nbdproxy daemon with TLS."""

import os
import subprocess

import pytest

from support import Daemon, make_cert, nbdkit, qemu_nbd


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (load, fuzzing); still part of make test")


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def daemon(tmp_path, cert):
    d = Daemon(str(tmp_path), *cert)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def module_daemon(workdir, cert):
    """One daemon for a whole module whose tests each use tickets of their own; a module takes
    it with `daemon = module_daemon` style override (see test_checksum.py)."""
    d = Daemon(str(workdir / "daemon"), *cert)
    yield d
    d.stop()


@pytest.fixture(params=["local", "remote"])
def connect(request, daemon):
    """A function making a new connection to the local (unix) or the remote (TLS) service."""
    return daemon.local if request.param == "local" else daemon.remote


@pytest.fixture
def raw_image(tmp_path):
    """A 64 MiB sparse raw image with data at the start, middle and end."""
    path = str(tmp_path / "disk.raw")
    size = 64 * 1024**2
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, size // 2, size - 65536):
            f.seek(offset)
            f.write(os.urandom(65536))
    return path


@pytest.fixture
def raw_export(tmp_path, raw_image):
    server = qemu_nbd(raw_image, str(tmp_path / "nbd.sock"))
    yield server
    server.stop()


@pytest.fixture
def qcow2_image(tmp_path):
    """A 64 MiB qcow2 image with a 1 MiB cluster of data at 1 MiB and 40 MiB."""
    path = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x55 1M 1M",
                    "-c", "write -q -P 0xaa 40M 1M", path], check=True)
    return path


@pytest.fixture
def memory_export(tmp_path):
    server = nbdkit(str(tmp_path / "mem.sock"), "memory", "size=64M")
    yield server
    server.stop()
