"""qemu-nbd and qemu-img as nbdproxy runs them: one runner for the daemon's image tickets and the
client's local images, with qemu's refusals as errors that say why (400, 409, 503).

A qemu-nbd never outlives the process that started it: it gets SIGTERM from the kernel when its
parent thread ends (PR_SET_PDEATHSIG, set by setpriv), so the daemon starts them from one thread
that lives as long as it does (Supervisor). SIGTERM, not SIGKILL: qemu-nbd then flushes and
stores its persistent bitmaps, which a SIGKILL leaves marked in use (unusable).
"""

import ctypes
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

from .. import errors

log = logging.getLogger("nbdproxy.qemu_nbd")

PR_SET_PDEATHSIG = 1

# glibc's malloc settings for qemu-nbd (issue 15, point 5): with the defaults a fresh qemu-nbd
# maps and unmaps its request buffers again and again. 1 GiB download through nbdproxy from a
# fresh qemu-nbd (cache=writeback), 3 runs: default 1107-1202 MiB/s with 0.78-0.83 CPU-s in
# qemu-nbd; with these 1593-1694 MiB/s with 0.39-0.44 CPU-s.
FAST_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864"}

# How long a qemu-nbd has to exit after SIGTERM before it gets SIGKILL (API.md 7d).
STOP_TIMEOUT = 10

# The NBD greeting (newstyle): what a serving qemu-nbd sends first.
_GREETING = b"NBDMAGICIHAVEOPT"
# The probe's goodbye: client flags (fixed newstyle, no zeroes), then NBD_OPT_ABORT, so that
# qemu-nbd does not log a failed negotiation for every ticket.
_ABORT = (b"\x00\x00\x00\x03" + b"IHAVEOPT" + (2).to_bytes(4, "big") + (0).to_bytes(4, "big"))

_SETPRIV = shutil.which("setpriv")


def _die_with_parent(parent):
    """A preexec_fn, where setpriv is missing: SIGTERM when the thread that started us ends,
    even by SIGKILL of its process."""
    def preexec():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except Exception:
            pass
        if os.getppid() != parent:
            os._exit(1)     # the parent died before prctl: nobody would stop us
    return preexec


def one_line(text):
    """qemu's messages on one line, without the program name: "qemu-img: Could not open..."."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line.split(": ", 1)[1] if line.startswith(("qemu-img: ", "qemu-nbd: ")) else line
             for line in lines]
    return " ".join(lines)


def run(argv, timeout=None):
    """Run a qemu tool; its output, or errors.BadRequest with qemu's message; one that has not
    finished in timeout seconds (storage that stopped answering) is killed: ServiceUnavailable."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=timeout)
    except FileNotFoundError:
        raise errors.BackendError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise errors.ServiceUnavailable(f"{argv[0]} did not finish in {timeout} s") from None
    if p.returncode != 0:
        raise errors.BadRequest(one_line(p.stderr)
                                or f"{argv[0]} failed with exit status {p.returncode}")
    return p.stdout


def image_info(path, force_share=False, timeout=None):
    """qemu-img info of path: format, virtual-size, backing file...; force_share reads an image
    another process holds (only to learn what it is)."""
    if not os.path.exists(path):
        raise errors.BadRequest(f"{path}: no such file")
    share = ["-U"] if force_share else []
    return json.loads(run(["qemu-img", "info", *share, "--output=json", path], timeout))


def direct_io(path):
    """True when the file system takes O_DIRECT for path (not tmpfs, ramfs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def spawn(argv, stderr, env=None):
    """Start argv, to get SIGTERM when the calling thread ends (see the module docstring)."""
    try:
        if _SETPRIV:
            return subprocess.Popen([_SETPRIV, "--pdeathsig", "TERM", "--", *argv],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, env=env, start_new_session=True)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent(os.getpid()))
    except FileNotFoundError:
        raise errors.BackendError(f"{argv[0]} is not installed") from None


class Server:
    """A qemu-nbd serving one image on a unix socket, ready (it sent the NBD greeting) once
    constructed.

    clients: connections it must admit (--shared is one more, for the readiness probe);
    direct: O_DIRECT (None: where the file system takes it); discard: unmap zeroed ranges
    (sparse); timeout: seconds to greet, else it is killed (None: no limit); supervisor: starts it
    and reports its exit (None: started from this thread). Refusals: BadRequest (it cannot open
    the image), Conflict (another process holds the image's lock), ServiceUnavailable (no
    greeting in time); nothing is left running.
    """

    def __init__(self, path, fmt, sock, *, read_only=False, clients=8, bitmap=None,
                 discard=False, detect_zeroes=False, direct=None, timeout=30,
                 supervisor=None, on_exit=None):
        self.path = path
        self.sock = sock
        self.ready = False
        self.stopping = False
        self.returncode = None
        self.on_exit = on_exit
        self._stop_lock = threading.Lock()
        if direct is None:
            direct = direct_io(path)
        # O_DIRECT where the file system has it: no copy through the host's page cache, which
        # shared storage must not use either; qemu-nbd cannot open the image otherwise.
        cache = ["--cache=none", "--aio=native"] if direct else \
            ["--cache=writeback", "--aio=threads"]
        argv = ["qemu-nbd", "--persistent", f"--shared={clients + 1}", f"--socket={sock}",
                f"--format={fmt}", *cache, "--allocation-depth"]
        if bitmap:
            argv.append(f"--bitmap={bitmap}")
        if read_only:
            argv.append("--read-only")
        if discard and not read_only:
            argv.append("--discard=unmap")
        if detect_zeroes and not read_only:
            argv.append("--detect-zeroes=unmap" if discard else "--detect-zeroes=on")
        argv.append(path)
        self.argv = argv
        log.debug("starting %s", argv)
        # Its messages go to an unlinked file: a pipe nobody reads could fill up and stop it,
        # and nothing is left on disk whatever happens to us.
        self.stderr = open_stderr(os.path.dirname(sock))
        env = dict(os.environ, **FAST_ENV)
        try:
            if supervisor is not None:
                self.proc = supervisor.spawn(argv, self.stderr, env, self._exited)
            else:
                self.proc = spawn(argv, self.stderr, env)
        except BaseException:
            self.stderr.close()
            raise
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self):
        return self.proc.pid

    def _wait_ready(self, timeout):
        """Wait for the NBD greeting: qemu-nbd listens before it opens the image, so an accepted
        connection says nothing; a greeting says the image is open and served."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self._refusal()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                log.warning("qemu-nbd for %s did not start in %s s; killing it", self.path,
                            timeout)
                raise errors.ServiceUnavailable(
                    f"qemu-nbd for {self.path} did not start in {timeout} s")
            if self._probe(left):
                self.ready = True
                return
            time.sleep(0.002)

    def _probe(self, left):
        """True once qemu-nbd greets on its socket; False to try again."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(left)
            try:
                s.connect(self.sock)
            except (FileNotFoundError, ConnectionRefusedError):
                return False    # not bound, or bound but not listening yet
            except socket.timeout:
                return False
            got = b""
            try:
                while len(got) < len(_GREETING) + 2:
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
            except socket.timeout:
                return False
            except OSError:
                pass
            if not got.startswith(_GREETING):
                # It closed the connection: it is exiting (it could not open the image).
                try:
                    self.proc.wait(max(left or 1, 1))
                except subprocess.TimeoutExpired:
                    pass
                return False
            try:
                s.sendall(_ABORT)
            except OSError:
                pass
            return True

    def _refusal(self):
        """The error for a qemu-nbd that exited before greeting, with qemu's reason."""
        why = self.message()
        if not why:
            why = f"qemu-nbd exited with status {self.proc.returncode}"
        why = _strip_open_prefix(why)
        if "lock" in why and "Failed to get" in why:
            return errors.Conflict(f"{self.path} is in use by another process: {why}")
        return errors.BadRequest(f"cannot open {self.path}: {why}")

    def message(self):
        """What qemu-nbd wrote to its stderr, on one line (the last 4 KiB)."""
        try:
            self.stderr.flush()
            size = os.fstat(self.stderr.fileno()).st_size
            data = os.pread(self.stderr.fileno(), 4096, max(0, size - 4096))
        except (OSError, ValueError):
            return ""
        return one_line(data.decode("utf-8", "replace"))

    def _exited(self, status):
        """From the supervisor: the process has exited with status (-N: signal N)."""
        self.returncode = status
        if self.on_exit is not None:
            self.on_exit(self, status)

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM (qemu-nbd flushes and exits), SIGKILL if it has not exited after timeout;
        then its socket and log go. Once, however often called."""
        with self._stop_lock:
            self.stopping = True
            proc = self.proc if hasattr(self, "proc") else None
            if proc is not None and proc.poll() is None:
                # qemu-nbd loses a SIGTERM that comes before its main loop runs; one that has not
                # greeted yet served nothing, so nothing is lost either.
                proc.send_signal(signal.SIGTERM if self.ready else signal.SIGKILL)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("qemu-nbd for %s did not exit %s s after SIGTERM; killing it",
                                self.path, timeout)
                    proc.kill()
                    proc.wait()
            try:
                os.unlink(self.sock)
            except OSError:
                pass
            if not self.stderr.closed:
                self.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def open_stderr(directory):
    """An unlinked file in directory (a temporary one if it cannot have one) for qemu's stderr."""
    try:
        return tempfile.TemporaryFile(dir=directory)
    except OSError:
        return tempfile.TemporaryFile()


def _strip_open_prefix(why):
    """"Failed to blk_new_open '/x': Could not open '/x': ..." -> "Could not open '/x': ..."."""
    if why.startswith("Failed to blk_new_open "):
        head, sep, rest = why.partition("': ")
        if sep:
            return rest
    return why


def describe_status(status):
    return f"killed by signal {-status}" if status < 0 else f"exit status {status}"


class Supervisor:
    """Starts the daemon's qemu-nbd processes from one thread that lives as long as the daemon
    (PR_SET_PDEATHSIG fires when the thread that started a child ends, not its process), reaps
    them, and tells each Server when its process exits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs = []
        self._procs = {}        # pidfd -> (Popen, on_exit)
        self._thread = None
        self._wake_r = self._wake_w = None

    def spawn(self, argv, stderr, env, on_exit):
        """Start argv in the supervisor's thread; the Popen. on_exit(status) once it exits."""
        job = {"args": (argv, stderr, env), "on_exit": on_exit, "done": threading.Event()}
        with self._lock:
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe()
                self._thread = threading.Thread(target=self._run, name="qemu-nbd",
                                                daemon=True)
                self._thread.start()
            self._jobs.append(job)
        os.write(self._wake_w, b"x")
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["proc"]

    def running(self):
        """How many of its processes have not exited (one stop() waited for may not be reaped
        by this thread yet: it does not count)."""
        with self._lock:
            procs = [proc for proc, _ in self._procs.values()]
            starting = len(self._jobs)
        return sum(1 for proc in procs if proc.poll() is None) + starting

    def processes(self):
        with self._lock:
            return [proc for proc, _ in self._procs.values()]

    def stop_all(self, timeout=STOP_TIMEOUT):
        """SIGTERM to every process still running, SIGKILL to those alive after timeout."""
        procs = [p for p in self.processes() if p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _run(self):
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                # This thread must outlive every failure: spawn() waits on it, and its end would
                # send SIGTERM to every qemu-nbd it started.
                try:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                        self._start_jobs(poller)
                    else:
                        self._reap(poller, fd)
                except Exception:
                    log.exception("qemu-nbd supervisor")

    def _start_jobs(self, poller):
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            proc = None
            try:
                proc = spawn(*job["args"])
                pidfd = os.pidfd_open(proc.pid)
            except Exception as e:
                if proc is not None:    # out of descriptors: not watched, so not kept
                    proc.kill()
                    proc.wait()
                job["error"] = e
            else:
                job["proc"] = proc
                with self._lock:
                    self._procs[pidfd] = (proc, job["on_exit"])
                poller.register(pidfd, select.POLLIN)
            job["done"].set()

    def _reap(self, poller, pidfd):
        poller.unregister(pidfd)
        proc, on_exit = self._procs[pidfd]
        status = proc.wait()    # exited: at most waits for a stop() reaping it right now
        with self._lock:
            del self._procs[pidfd]
        os.close(pidfd)
        try:
            on_exit(status)
        except Exception:
            log.exception("qemu-nbd exit handler failed")
