"""`nbdproxy ticket add|show|list|extend|delete` against a real daemon's control socket."""

import json
import subprocess
import time
import uuid

import pytest

from support import NBDPROXY, TOP, Daemon, request

URL = "nbd:unix:/nonexistent/nbd.sock"


@pytest.fixture(scope="module")
def d(tmp_path_factory, cert):
    daemon = Daemon(str(tmp_path_factory.mktemp("ticket-cli")), *cert)
    yield daemon
    daemon.stop()


def run(*args, control=None, before=True):
    """Run `nbdproxy ticket ...`; --control-socket goes before the action, or after it."""
    argv = list(args)
    if control is not None:
        if before:
            argv = ["--control-socket", control] + argv
        else:
            argv = argv + ["--control-socket", control]
    return subprocess.run(NBDPROXY + ["ticket"] + argv, cwd=TOP, capture_output=True, text=True,
                          timeout=30)


def ok(*args, **kw):
    proc = run(*args, **kw)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def error_line(proc):
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def show(d, ticket_id):
    status, body = request(d.control(), "GET", f"/tickets/{ticket_id}")
    assert status == 200, body
    return json.loads(body)


@pytest.mark.parametrize("before", [True, False], ids=["option-first", "option-last"])
def test_add_prints_id(d, before):
    out = ok("add", "--url", URL, "--size", "1048576", control=d.control_socket, before=before)
    ticket_id = out.strip()
    assert out == ticket_id + "\n"
    assert uuid.UUID(ticket_id)
    got = show(d, ticket_id)
    assert got["uuid"] == ticket_id
    assert got["url"] == URL
    assert got["size"] == 1048576
    assert got["ops"] == ["read", "write"]
    assert got["timeout"] == 3600
    assert got["sparse"] is False and got["dirty"] is False


def test_add_all_options(d):
    ticket_id = f"cli-{uuid.uuid4().hex[:8]}"
    out = ok("add", "--url", URL, "--size", "4096", "--ops", "read", "--timeout", "77",
             "--inactivity-timeout", "9", "--sparse", "--dirty", "--filename", "disk.qcow2",
             "--transfer-id", "tr-9", "--id", ticket_id, control=d.control_socket)
    assert out == ticket_id + "\n"
    got = show(d, ticket_id)
    assert (got["ops"], got["timeout"], got["inactivity_timeout"], got["sparse"], got["dirty"],
            got["filename"], got["transfer_id"]) == (["read"], 77, 9, True, True, "disk.qcow2",
                                                     "tr-9")


@pytest.mark.parametrize("args,words", [
    (["--url", "http://example.com/disk", "--size", "1"], "Invalid ticket"),
    (["--url", URL, "--size", "-1"], "Invalid ticket"),
    (["--url", URL, "--size", "1", "--ops", "read,delete"], "Invalid ticket"),
    (["--url", URL, "--size", "1", "--ops", ""], "Invalid ticket"),
])
def test_add_invalid(d, args, words):
    line = error_line(run("add", *args, control=d.control_socket))
    assert line.startswith("nbdproxy: ")
    assert words in line


def test_show(d):
    ticket_id = ok("add", "--url", URL, "--size", "512", "--ops", "write",
                   control=d.control_socket).strip()
    out = ok("show", ticket_id, control=d.control_socket)
    got = json.loads(out)
    assert got["uuid"] == ticket_id
    assert got["ops"] == ["write"]
    for key in ("active", "canceled", "connections", "expires", "idle_time", "transferred"):
        assert key in got
    out = ok("show", ticket_id, control=d.control_socket, before=False)
    assert json.loads(out)["uuid"] == ticket_id


def test_show_missing(d):
    missing = str(uuid.uuid4())
    line = error_line(run("show", missing, control=d.control_socket))
    assert line.startswith("nbdproxy: ")
    assert missing in line


def test_list(tmp_path, cert):
    daemon = Daemon(str(tmp_path), *cert)
    try:
        assert json.loads(ok("list", control=daemon.control_socket)) == []
        ids = {ok("add", "--url", URL, "--size", "1", control=daemon.control_socket).strip()
               for _ in range(3)}
        listed = json.loads(ok("list", control=daemon.control_socket))
        assert isinstance(listed, list)
        assert {t["uuid"] for t in listed} == ids
        listed = json.loads(ok("list", control=daemon.control_socket, before=False))
        assert {t["uuid"] for t in listed} == ids
    finally:
        daemon.stop()


def test_extend(d):
    ticket_id = ok("add", "--url", URL, "--size", "1", "--timeout", "10",
                   control=d.control_socket).strip()
    before = show(d, ticket_id)["expires"]
    assert ok("extend", ticket_id, "5000", control=d.control_socket) == ""
    after = show(d, ticket_id)["expires"]
    assert after >= before + 4989
    assert after <= int(time.monotonic()) + 5001
    assert ok("extend", ticket_id, "0", control=d.control_socket, before=False) == ""
    assert show(d, ticket_id)["expires"] <= int(time.monotonic()) + 1


def test_extend_missing(d):
    missing = str(uuid.uuid4())
    line = error_line(run("extend", missing, "10", control=d.control_socket))
    assert missing in line


def test_extend_negative(d):
    ticket_id = ok("add", "--url", URL, "--size", "1", control=d.control_socket).strip()
    line = error_line(run("extend", ticket_id, "-5", control=d.control_socket))
    assert "400" in line or "timeout" in line


def test_delete(d):
    ticket_id = ok("add", "--url", URL, "--size", "1", control=d.control_socket).strip()
    assert ok("delete", ticket_id, control=d.control_socket) == ""
    status, _ = request(d.control(), "GET", f"/tickets/{ticket_id}")
    assert status == 404
    line = error_line(run("delete", ticket_id, control=d.control_socket))
    assert ticket_id in line


def test_delete_option_last(d):
    ticket_id = ok("add", "--url", URL, "--size", "1", control=d.control_socket).strip()
    assert ok("delete", ticket_id, control=d.control_socket, before=False) == ""
    assert request(d.control(), "GET", f"/tickets/{ticket_id}")[0] == 404


@pytest.mark.parametrize("action", [["list"], ["show", "x"], ["delete", "x"], ["extend", "x", "1"],
                                    ["add", "--url", URL, "--size", "1"]])
def test_no_daemon(tmp_path, action):
    path = str(tmp_path / "nothing.sock")
    line = error_line(run(*action, control=path))
    assert line.startswith("nbdproxy: ")
    assert path in line


def test_bad_usage():
    proc = subprocess.run(NBDPROXY + ["ticket"], cwd=TOP, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(NBDPROXY + ["ticket", "add", "--size", "1"], cwd=TOP,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--url" in proc.stderr


# Issue 12, item 13: ids are percent-encoded; bad ids and bad conf files are one line.

@pytest.mark.parametrize("ticket_id", ["disk 1", "диск", "a?b", "%41", "a#b&c=d", "x+y"])
def test_ids_are_percent_encoded(d, ticket_id):
    # A ticket named like the decoded form of ticket_id must not be the one touched.
    decoy = ok("add", "--url", URL, "--size", "1", "--id", "A" if ticket_id == "%41" else "a",
               control=d.control_socket).strip()
    assert ok("add", "--url", URL, "--size", "4096", "--id", ticket_id,
              control=d.control_socket) == ticket_id + "\n"
    assert json.loads(ok("show", ticket_id, control=d.control_socket))["uuid"] == ticket_id
    assert ok("extend", ticket_id, "100", control=d.control_socket) == ""
    assert ticket_id in {t["uuid"] for t in json.loads(ok("list", control=d.control_socket))}
    assert ok("delete", ticket_id, control=d.control_socket) == ""
    line = error_line(run("show", ticket_id, control=d.control_socket))
    assert ticket_id in line
    assert json.loads(ok("show", decoy, control=d.control_socket))["uuid"] == decoy
    ok("delete", decoy, control=d.control_socket)


@pytest.mark.parametrize("action", [["show", ""], ["delete", ""], ["extend", "", "5"],
                                    ["add", "--url", URL, "--size", "1", "--id", ""],
                                    ["show", "a/b"], ["delete", "a/b"]])
def test_bad_ids_are_usage_errors(d, action):
    """An empty id would name the list of all tickets (`delete ""` removed them all)."""
    keep = ok("add", "--url", URL, "--size", "1", control=d.control_socket).strip()
    proc = run(*action, control=d.control_socket)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ticket id" in proc.stderr
    assert show(d, keep)["uuid"] == keep


def test_conf_file_not_utf8(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "nbdproxy.conf").write_bytes(b"[nbdproxy]\n# caf\xe9\nport = -1\n")
    proc = subprocess.run(NBDPROXY + ["serve", "--conf-dir", str(conf), "--control-socket",
                                      str(tmp_path / "c.sock"), "--local-socket", "none"],
                          cwd=TOP, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "nbdproxy.conf" in line and "UTF-8" in line and "0xe9 at offset 16" in line
