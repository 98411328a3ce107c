"""`make bench`: the same transfers against nbdproxy, ovirt-imageio 2.5 and the limits (issue 5).

    .venv/bin/python bench/run.py [--runs N] [--quick] [--only REGEX] [--output FILE]

Prints a table of medians with the ratios nbdproxy/imageio and nbdproxy/limit, and saves all
samples as JSON under bench/results/. bench/README.md explains the scenarios and the table.
"""

import argparse
import datetime
import fnmatch
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import clients  # noqa: E402
import systems  # noqa: E402
from clients import GiB, MiB  # noqa: E402

RESULTS = os.path.join(BENCH, "results")

# Image sizes: default and --quick.
SIZES = {
    False: {"dense": 2 * GiB, "sparse": 1024 * GiB, "sparse_data": 64 * MiB,
            "piece": MiB, "small_per_conn": 400},
    True: {"dense": 256 * MiB, "sparse": 1024 * GiB, "sparse_data": 64 * MiB,
           "piece": MiB, "small_per_conn": 50},
}
DAEMONS = ("nbdproxy", "imageio")
BUFFERED = "nbdproxy-buffered"   # nbdproxy --no-file-direct: page-cache file rows
FILE_CPU_TARGET = 0.5    # file rows, unix-socket downloads: daemon CPU/GiB at most 0.5x imageio's
LIMIT_TARGET = 0.9       # where the limit is under 1.5x imageio: at least 0.9x the limit
SPEED_TARGET = 1.5       # every scenario: at least 1.5 times imageio
NBDCOPY_TARGET = 0.8     # dense download over the unix socket: at least 0.8 times nbdcopy
CPU_TARGET = 0.6         # server CPU per GiB: at most 0.6 times imageio's
EXTENTS_TARGET = 0.5     # seconds for the extents of the 1 TiB sparse image
SPARSE_DL_TARGET = 1.0   # seconds for its extent-driven data download
IMAGE_START_TARGET = 0.15  # seconds from PUT /tickets (image ticket) to a GET's first byte
HOST2 = "127.0.0.2"      # the upstream hosts of the proxy rows (issue 14)
REQUEST_SIZES = {"64k": 64 * 1024, "512k": 512 * 1024, "2m": 2 * MiB}   # nbd_request_size rows


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Scenario:
    """One row of the table.

    run(ctx, system) measures one sample for system "nbdproxy", "imageio" or "limit" and returns
    a dict with at least "value" (in unit), and where it applies "seconds", "bytes", "server_cpu".
    """

    def __init__(self, name, unit, run, limit=None, higher=True, targets=(), daemons=DAEMONS,
                 repeat=1, tls=None, new=False, rule_target=True):
        self.name, self.unit, self.run = name, unit, run
        self.tls = tls              # TLS rows: tls(ctx) -> (source buffer, plans of tls_copy)
        self.new = new              # issue 13-15's rows: the rule is a target, not a report
        self.rule_target = rule_target  # False: a new row whose targets are its own (absolute)
        self.repeat = repeat        # samples per run: short scenarios take more, noise is large
        self.limit = limit          # description of the limit column, or None
        self.higher = higher        # True: bigger is better (MiB/s, req/s); False: seconds
        self.targets = targets
        self.daemons = daemons

    def systems(self):
        return (list(self.daemons) + (["limit"] if self.limit else [])
                + (["tls-limit"] if self.tls else []))

    def sample(self, ctx, system):
        if system == "tls-limit":
            return tls_limit(ctx, self)
        return self.run(ctx, system)


class Context:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.sizes = SIZES[args.quick]
        self.work = systems.WORK
        self.daemons = {}
        self.counter = 0
        self.notes = []
        self.extra = {}             # daemons started on first use (proxy rows, request sizes)

    def setup(self):
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(RESULTS, exist_ok=True)
        self.imageio_python = systems.ensure_imageio_venv(log)
        systems.Imageio.python = self.imageio_python
        self.cert, self.key = systems.make_cert(self.work)
        self.direct = systems.direct_io_supported(self.work)
        self.nbd = systems.NBDFactory(os.path.join(self.work, "sockets"), self.direct)
        os.makedirs(self.nbd.workdir, exist_ok=True)
        s = self.sizes
        name = f"dense-{s['dense'] >> 20}m"
        self.dense_path = systems.make_dense(os.path.join(self.work, name + ".raw"), s["dense"], log)
        self.dst_path = systems.copy_file(self.dense_path,
                                          os.path.join(self.work, name + "-dst.raw"), log)
        self.dense = self._map(self.dense_path)
        self.sparse_path, self.layout = systems.make_sparse(
            os.path.join(self.work, "sparse-1t.raw"), s["sparse"], s["sparse_data"], s["piece"],
            log)
        self.sparse = self._map(self.sparse_path)
        self.sparse_dst_path = os.path.join(self.work, "sparse-1t-dst.raw")
        free = shutil.disk_usage(self.work).free
        if free < 8 * GiB:
            raise SystemExit(f"bench: only {free >> 30} GiB free under {self.work}; need 8")

    @staticmethod
    def _map(path):
        """The image in memory for the whole run: uploads send from it, downloads check with it.

        For the sparse image only the data pieces are touched, so its holes cost nothing.
        """
        with open(path, "rb") as f:
            flags = mmap.MAP_SHARED
            if os.path.getsize(path) <= 16 * GiB:
                flags |= mmap.MAP_POPULATE
            return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)

    def start_daemons(self):
        for cls in (systems.NbdProxy, systems.Imageio):
            self.daemons[cls.name] = cls(os.path.join(self.work, cls.name), self.cert, self.key)
        # The page-cache file rows: a second nbdproxy, its only difference the flag.
        self.daemons[BUFFERED] = systems.NbdProxy(os.path.join(self.work, BUFFERED), self.cert,
                                                  self.key, extra_args=["--no-file-direct"])
        self.daemons[BUFFERED].name = BUFFERED
        # The TLS limit must use the cipher the daemons negotiate with this client.
        self.ciphers = {}
        for name, d in self.daemons.items():
            conn = d.endpoint("tls").connect()
            self.ciphers[name] = conn.sock.cipher()[0]
            conn.close()

    def daemon(self, system, buffered=False):
        """The daemon of a system; "nbdproxy" on a buffered file row is the --no-file-direct one."""
        return self.daemons[BUFFERED if buffered and system == "nbdproxy" else system]

    def stop_daemons(self):
        for d in list(self.extra.values()) + list(self.daemons.values()):
            d.stop()

    def lazy(self, name, start):
        """A daemon only some rows need, started by start(directory) on first use, kept."""
        if name not in self.extra:
            d = start(os.path.join(self.work, name))
            d.name = name
            self.extra[name] = d
        return self.extra[name]

    def proxy_pair(self, system):
        """(proxy, host) of a proxy row: the host on HOST2 with a certificate valid there, the
        proxy trusting it (nbdproxy --backend-ca-file; imageio its tls ca_file)."""
        cert, key = systems.make_cert(self.work, "-proxy", ("127.0.0.1", HOST2))
        if system == "imageio":
            host = self.lazy("imageio-host", lambda d: systems.Imageio(d, cert, key, host=HOST2))
            proxy = self.lazy("imageio-proxy", lambda d: systems.Imageio(d, cert, key))
        else:
            host = self.lazy("nbdproxy-host", lambda d: systems.NbdProxy(d, cert, key,
                                                                         host=HOST2))
            proxy = self.lazy("nbdproxy-proxy", lambda d: systems.NbdProxy(
                d, cert, key, extra_args=["--backend-ca-file", cert]))
        return proxy, host

    def request_size_daemon(self, label):
        return self.lazy(f"nbdproxy-rs{label}", lambda d: systems.NbdProxy(
            d, self.cert, self.key, extra_args=["--nbd-request-size",
                                                str(REQUEST_SIZES[label])]))

    def ticket_id(self):
        self.counter += 1
        return f"bench-{self.counter}"


# Measuring

def measure(ctx, daemon, kind, image, size, fn, sparse=False, discard=False, before=None,
            after=None, cache=None):
    """A fresh NBD server on image, a ticket for it, and fn(url) timed with the CPU it cost.

    fn returns the bytes it moved. before() runs before the NBD server starts; after(server) runs
    after the transfer, outside of the timing (checks).
    """
    if before:
        before()
    with ctx.nbd.start(kind, image, discard=discard, cache=cache) as server:
        tid = ctx.ticket_id()
        url = daemon.add_ticket(tid, server.url, size, sparse=sparse)
        try:
            cpu0, c0 = daemon.cpu(), os.times()
            start = time.perf_counter()
            moved = fn(url)
            seconds = time.perf_counter() - start
            cpu1, c1 = daemon.cpu(), os.times()
            nbd_cpu = server.cpu()
        finally:
            daemon.delete_ticket(tid)
        if after:
            after(server)
    if isinstance(moved, tuple):
        extra, moved = moved[0], moved[1]
    else:
        extra = None
    return {"seconds": seconds, "bytes": moved, "server_cpu": cpu1 - cpu0, "nbd_cpu": nbd_cpu,
            "client_cpu": (c1.user + c1.system) - (c0.user + c0.system), "extra": extra}


def measure_file(ctx, daemon, path, size, fn, ops, before=None, after=None):
    """A file: ticket on path (ovirt-imageio's form, file:///path) and fn(url) timed with the CPU
    it cost; before() and after() run outside of the timing."""
    if before:
        before()
    tid = ctx.ticket_id()
    url = daemon.add_ticket(tid, "file://" + path, size, ops=ops)
    try:
        cpu0, c0 = daemon.cpu(), os.times()
        start = time.perf_counter()
        moved = fn(url)
        seconds = time.perf_counter() - start
        cpu1, c1 = daemon.cpu(), os.times()
    finally:
        daemon.delete_ticket(tid)
    if after:
        after()
    return {"seconds": seconds, "bytes": moved, "server_cpu": cpu1 - cpu0,
            "client_cpu": (c1.user + c1.system) - (c0.user + c0.system)}


def tls_limit(ctx, scenario):
    """The row's bytes (and requests) as a plain Python TLS socket copy: clients.tls_copy."""
    src, plans = scenario.tls(ctx)
    s = clients.tls_copy(ctx.cert, ctx.key, ctx.cert, plans, src)
    if scenario.unit == "MiB/s":
        s["value"] = s["bytes"] / MiB / s["seconds"]
    elif scenario.unit == "req/s":
        s["value"] = s["requests"] / s["seconds"]
    else:
        s["value"] = s["seconds"]
    return s


def rate(sample):
    sample["value"] = sample["bytes"] / MiB / sample["seconds"]
    return sample


def time_limit(ctx, kind, image, fn, discard=False, before=None, after=None, cache=None):
    """A limit measured on a fresh NBD server: fn(server) returns (seconds, bytes)."""
    if before:
        before()
    with ctx.nbd.start(kind, image, discard=discard, cache=cache) as server:
        seconds, moved = fn(server)
        nbd_cpu = server.cpu()
        if after:
            after(server)
    return {"seconds": seconds, "bytes": moved, "nbd_cpu": nbd_cpu}


def scribble(path, samples):
    """Overwrite sample ranges of an upload target, so that the upload must rewrite them."""
    with open(path, "r+b") as f:
        for off, n in samples:
            f.seek(off)
            f.write(b"\xa5" * n)
        os.fsync(f.fileno())


def upload_samples(size):
    n = 64 * 1024
    return [(0, n), (size // 3 // n * n, n), (size // 2 + 12345 * 4096 % (size // 4), n),
            (size - n, n)]


# Scenarios

def dense_scenarios(ctx):
    size = ctx.sizes["dense"]
    out = []
    for op in ("download", "upload"):
        for kind, transport in (("qemu-nbd", "unix"), ("qemu-nbd", "tls"), ("nbdkit", "unix")):
            for conns in (1, 4):
                out.append(_dense(ctx, op, kind, transport, conns, size))
    return out


def _dense(ctx, op, kind, transport, conns, size):
    name = f"{op}/{transport}/{conns}conn/{kind}"
    samples = upload_samples(size)

    def run(ctx, system):
        if op == "download":
            if system == "limit":
                return rate(time_limit(ctx, kind, ctx.dense_path, lambda s: (
                    clients.nbdcopy(s.uri, "null:", conns), size)))
            ep = ctx.daemons[system].endpoint(transport)
            return rate(measure(ctx, ctx.daemons[system], kind, ctx.dense_path, size,
                                lambda url: clients.download(ep, url, size, conns, ctx.dense)))
        before = lambda: scribble(ctx.dst_path, samples)  # noqa: E731
        after = lambda server: clients.verify_export(server.sock, ctx.dense, samples)  # noqa: E731
        if system == "limit":
            return rate(time_limit(ctx, kind, ctx.dst_path, lambda s: (
                clients.nbdcopy(ctx.dense_path, s.uri, conns, flush=True), size),
                before=before, after=after))
        ep = ctx.daemons[system].endpoint(transport)
        return rate(measure(ctx, ctx.daemons[system], kind, ctx.dst_path, size,
                            lambda url: clients.upload(ep, url, size, conns, ctx.dense),
                            before=before, after=after))

    targets = []
    if op == "download" and transport == "unix" and kind == "qemu-nbd":
        targets.append(("limit", NBDCOPY_TARGET))
    return Scenario(name, "MiB/s", run, limit=f"nbdcopy -C {conns}", targets=targets,
                    tls=dense_tls(op, size, conns) if transport == "tls" else None)


def dense_tls(op, size, conns):
    """The TLS copy of a dense row: a contiguous part per connection, uploads in PUT pieces."""
    def plans(ctx):
        direction, piece = ("D", None) if op == "download" else ("U", clients.PIECE)
        return ctx.dense, clients.tls_plans_stream(clients.split(0, size, conns), direction,
                                                   piece)
    return plans


def file_scenarios(ctx):
    """Issue 13: file: tickets against ovirt-imageio's file backend (O_DIRECT, its only mode) on
    the same file, O_DIRECT (nbdproxy's default) and --no-file-direct (a second daemon)."""
    size = ctx.sizes["dense"]
    out = []
    for op in ("download", "upload"):
        for mode in ("direct", "buffered"):
            for transport in ("unix", "tls"):
                for conns in (1, 4):
                    out.append(_file(op, mode, transport, conns, size))
    return out


FILE_LIMITS = {
    ("download", "direct"): f"O_DIRECT preadv, {clients.FILE_IN_FLIGHT} in flight",
    ("download", "buffered"): "sendfile page cache -> AF_UNIX",
    ("upload", "direct"): f"O_DIRECT pwritev, {clients.FILE_IN_FLIGHT} in flight + fdatasync",
    ("upload", "buffered"): "AF_UNIX -> pwrite page cache + fdatasync",
}


def _file(op, mode, transport, conns, size):
    name = f"file-{op}/{transport}/{conns}conn/{mode}"
    samples = upload_samples(size)
    buffered = mode == "buffered"

    def run(ctx, system):
        if op == "download":
            path = ctx.dense_path
            # Buffered rows serve from the page cache: make sure the file is there.
            before = (lambda: clients.warm(path, size)) if buffered else None  # noqa: E731
            after = None
        else:
            path = ctx.dst_path
            before = lambda: scribble(path, samples)  # noqa: E731
            after = lambda: clients.verify_file(path, ctx.dense, samples)  # noqa: E731
        if system == "limit":
            if before:
                before()
            if op == "download" and not buffered:
                seconds, cpu = clients.direct_read(path, size)
            elif op == "download":
                seconds, cpu, _ = clients.sendfile_copy(path, size, conns)
            elif not buffered:
                seconds, cpu = clients.direct_write(path, ctx.dense, size)
            else:
                seconds, cpu, _ = clients.socket_to_file(path, ctx.dense, size, conns)
            if after:
                after()
            return rate({"seconds": seconds, "bytes": size, "client_cpu": cpu})
        daemon = ctx.daemon(system, buffered)
        ep = daemon.endpoint(transport)
        if op == "download":
            fn = lambda url: clients.download(ep, url, size, conns, ctx.dense)  # noqa: E731
            ops = ("read",)
        else:
            fn = lambda url: clients.upload(ep, url, size, conns, ctx.dense)  # noqa: E731
            ops = ("read", "write")
        return rate(measure_file(ctx, daemon, path, size, fn, ops, before, after))

    targets = [("cpu", FILE_CPU_TARGET)] if op == "download" and transport == "unix" else []
    return Scenario(name, "MiB/s", run, limit=FILE_LIMITS[op, mode], targets=targets,
                    tls=dense_tls(op, size, conns) if transport == "tls" else None, new=True)


def socket_copy_scenario(ctx):
    size = ctx.sizes["dense"]

    def run(ctx, system):
        seconds, cpu, child = clients.socket_copy(size)
        return {"seconds": seconds, "bytes": size, "value": size / MiB / seconds,
                "client_cpu": cpu, "sender_cpu": child}
    return Scenario("socket-copy/unix/1conn", "MiB/s", run, limit="python AF_UNIX copy",
                    daemons=())


def sparse_scenarios(ctx):
    size, piece, layout = ctx.sizes["sparse"], ctx.sizes["piece"], ctx.layout
    out = []
    for transport in ("unix", "tls"):
        def extents(ctx, system, transport=transport):
            if system == "limit":
                def nbdinfo(server):
                    start = time.perf_counter()
                    subprocess.run(["nbdinfo", "--map", server.uri], check=True,
                                   capture_output=True)
                    return time.perf_counter() - start, 0
                s = time_limit(ctx, "qemu-nbd", ctx.sparse_path, nbdinfo)
            else:
                ep = ctx.daemons[system].endpoint(transport)

                def get(url):
                    ext = clients.get_extents(ep, url)
                    clients.check_extents(ext, size, layout, piece)
                    return len(ext), 0
                s = measure(ctx, ctx.daemons[system], "qemu-nbd", ctx.sparse_path, size, get)
            s["value"] = s["seconds"]
            return s
        out.append(Scenario(f"sparse-extents/{transport}", "s", extents, limit="nbdinfo --map",
                            higher=False, targets=[("max", EXTENTS_TARGET)], repeat=3,
                            tls=sparse_tls("extents") if transport == "tls" else None))

        def download(ctx, system, transport=transport):
            if system == "limit":
                s = time_limit(ctx, "qemu-nbd", ctx.sparse_path, lambda server: (
                    clients.nbdcopy(server.uri, "null:", 4), len(layout) * piece))
            else:
                ep = ctx.daemons[system].endpoint(transport)
                s = measure(ctx, ctx.daemons[system], "qemu-nbd", ctx.sparse_path, size,
                            lambda url: clients.sparse_download(ep, url, 4, ctx.sparse))
            s["value"] = s["seconds"]
            return s
        out.append(Scenario(f"sparse-download/{transport}/4conn", "s", download,
                            limit="nbdcopy -C 4", higher=False,
                            targets=[("max", SPARSE_DL_TARGET)], repeat=3,
                            tls=sparse_tls("download") if transport == "tls" else None))

        def upload(ctx, system, transport=transport):
            before = lambda: systems.fresh_sparse_target(ctx.sparse_dst_path, size)  # noqa: E731
            samples = [(off, piece) for off in layout[::16]]

            def after(server):
                clients.verify_export(server.sock, ctx.sparse, samples)
                used = systems.allocated(ctx.sparse_dst_path)
                if used > 16 * len(layout) * piece:
                    raise clients.BenchError(f"sparse upload allocated {used >> 20} MiB")
            if system == "limit":
                s = time_limit(ctx, "qemu-nbd", ctx.sparse_dst_path, lambda server: (
                    clients.nbd_sparse_upload(server.sock, size, layout, piece, 4, ctx.sparse)),
                    discard=True, before=before, after=after)
            else:
                ep = ctx.daemons[system].endpoint(transport)
                s = measure(ctx, ctx.daemons[system], "qemu-nbd", ctx.sparse_dst_path, size,
                            lambda url: clients.sparse_upload(ep, url, size, layout, piece, 4,
                                                              ctx.sparse),
                            sparse=True, discard=True, before=before, after=after)
            s["value"] = s["seconds"]
            return s
        out.append(Scenario(f"sparse-upload/{transport}/4conn", "s", upload,
                            limit="libnbd, same requests", higher=False, repeat=3,
                            tls=sparse_tls("upload") if transport == "tls" else None))
    return out


def sparse_tls(what):
    """The TLS copy of a sparse row: the extents JSON (its size as imageio formats it), then the
    data extents in 8 MiB GETs, or the data PUTs and the zero PATCHes (as empty requests), dealt
    round-robin to 4 connections."""
    def plans(ctx):
        size, piece, layout = ctx.sizes["sparse"], ctx.sizes["piece"], ctx.layout
        plan = clients.sparse_plan(size, layout, piece)
        extents = json.dumps([{"start": off, "length": n, "zero": kind == "zero",
                               "hole": kind == "zero"} for kind, off, n in plan]).encode()
        head = [("D", 0, len(extents))]
        if what == "extents":
            return ctx.sparse, [head]
        items = []
        for kind, off, n in plan:
            if kind == "data":
                parts = clients.split(off, n, -(-n // (8 * MiB)))
                items += [("D" if what == "download" else "U", o, m) for o, m in parts]
            elif what == "upload":
                items.append(("U", off, 0))
        conns = [items[i::4] for i in range(4)]
        if what == "download":
            conns[0] = head + conns[0]
        return ctx.sparse, conns
    return plans


def small_scenarios(ctx):
    size, per_conn, conns = ctx.sizes["dense"], ctx.sizes["small_per_conn"], 4
    out = []
    for op in ("get", "put"):
        for transport in ("unix", "tls"):
            def run(ctx, system, op=op, transport=transport):
                image = ctx.dense_path if op == "get" else ctx.dst_path
                plans = [clients.small_plan(size, per_conn, i, conns) for i in range(conns)]
                samples = [r for p in plans for r in p[-2:]]
                before = after = None
                if op == "put":
                    before = lambda: scribble(ctx.dst_path, samples)  # noqa: E731
                    after = lambda server: clients.verify_export(  # noqa: E731
                        server.sock, ctx.dense, samples)
                if system == "limit":
                    s = time_limit(ctx, "qemu-nbd", image, lambda server: clients.nbd_small(
                        server.sock, op, plans, ctx.dense), before=before, after=after)
                    s["requests"] = conns * per_conn
                else:
                    ep = ctx.daemons[system].endpoint(transport)
                    s = measure(ctx, ctx.daemons[system], "qemu-nbd", image, size,
                                lambda url: clients.small_requests(ep, url, op, size, conns,
                                                                   per_conn, ctx.dense),
                                before=before, after=after)
                    s["requests"] = s.pop("extra")
                s["value"] = s["requests"] / s["seconds"]
                return s
            out.append(Scenario(f"small-{op}/{transport}/4conn", "req/s", run,
                                limit="libnbd, same requests", repeat=2,
                                tls=small_tls(op, size, per_conn, conns)
                                if transport == "tls" else None))
    return out


def small_tls(op, size, per_conn, conns):
    """The TLS copy of a small-request row: the same requests, a 17-byte header each."""
    def plans(ctx):
        direction = "D" if op == "get" else "U"
        return ctx.dense, [[(direction, off, n) for off, n in
                            clients.small_plan(size, per_conn, i, conns)] for i in range(conns)]
    return plans


def checksum_scenarios(ctx):
    out = []
    for which in ("dense", "sparse"):
        def run(ctx, system, which=which):
            if which == "dense":
                path, size = ctx.dense_path, ctx.sizes["dense"]
                expected = ctx.dense_checksum
            else:
                path, size = ctx.sparse_path, ctx.sizes["sparse"]
                expected = ctx.sparse_checksum
            if system == "limit":
                start = time.perf_counter()
                if which == "dense":
                    clients.blkhash_dense(ctx.dense, size)
                else:
                    clients.blkhash_sparse(ctx.sparse, size, ctx.layout, ctx.sizes["piece"])
                s = {"seconds": time.perf_counter() - start, "bytes": size}
            else:
                ep = ctx.daemons[system].endpoint("unix")

                def get(url):
                    got = clients.checksum(ep, url)
                    if got.get("checksum") != expected:
                        raise clients.BenchError(f"{system} checksum {got} != {expected}")
                    # CPU per GiB only for the dense image: per virtual TiB says nothing.
                    return None, size if which == "dense" else 0
                s = measure(ctx, ctx.daemons[system], "qemu-nbd", path, size, get)
            s["value"] = s["seconds"]
            return s
        limit = "local blkhash (Python, in memory)"
        out.append(Scenario(f"checksum/{which}/unix", "s", run, limit=limit, higher=False,
                            repeat=3 if which == "sparse" else 1))
    return out


def busy_scenario(ctx):
    """8 connections over TLS on a freshly started daemon: 4 GETs of one image and 4 PUTs of
    another; server CPU per GiB and the daemon's peak RSS (VmHWM)."""
    size = ctx.sizes["dense"]
    samples = upload_samples(size)

    def run(ctx, system):
        cls = systems.NbdProxy if system == "nbdproxy" else systems.Imageio
        scribble(ctx.dst_path, samples)
        with cls(os.path.join(ctx.work, f"{system}-busy"), ctx.cert, ctx.key) as daemon, \
                ctx.nbd.start("qemu-nbd", ctx.dense_path) as src, \
                ctx.nbd.start("qemu-nbd", ctx.dst_path) as dst:
            t1, t2 = ctx.ticket_id(), ctx.ticket_id()
            url_src = daemon.add_ticket(t1, src.url, size, ops=("read",))
            url_dst = daemon.add_ticket(t2, dst.url, size)
            ep = daemon.endpoint("tls")
            cpu0, start = daemon.cpu(), time.perf_counter()
            clients.run_threads(lambda f: f(), [
                (lambda: clients.download(ep, url_src, size, 4, ctx.dense),),
                (lambda: clients.upload(ep, url_dst, size, 4, ctx.dense),)])
            seconds = time.perf_counter() - start
            cpu = daemon.cpu() - cpu0
            rss = daemon.peak_rss()
            nbd_cpu = src.cpu() + dst.cpu()
            daemon.delete_ticket(t1)
            daemon.delete_ticket(t2)
            clients.verify_export(dst.sock, ctx.dense, samples)
        return {"seconds": seconds, "bytes": 2 * size, "server_cpu": cpu, "nbd_cpu": nbd_cpu,
                "peak_rss": rss, "value": 2 * size / MiB / seconds}
    def tls(ctx):
        parts = clients.split(0, size, 4)
        return ctx.dense, (clients.tls_plans_stream(parts, "D")
                           + clients.tls_plans_stream(parts, "U", clients.PIECE))
    return Scenario("busy8/tls/4get+4put", "MiB/s", run, tls=tls)


def proxy_scenarios(ctx):
    """Issue 14: the dense transfers through a proxy daemon (client on its unix socket) in front
    of a host daemon of the same kind on HOST2 over TLS; the limit is the same transfer straight
    to nbdproxy's host over TLS."""
    size = ctx.sizes["dense"]
    return [_proxy(op, conns, size) for op in ("download", "upload") for conns in (1, 4)]


def _proxy(op, conns, size):
    samples = upload_samples(size)

    def run(ctx, system):
        proxy, host = ctx.proxy_pair("nbdproxy" if system == "limit" else system)
        upload = op == "upload"
        image = ctx.dst_path if upload else ctx.dense_path
        ops = ("read", "write") if upload else ("read",)
        if upload:
            scribble(ctx.dst_path, samples)
        with ctx.nbd.start("qemu-nbd", image) as server:
            tid = ctx.ticket_id()
            host.add_ticket(tid, server.url, size, ops=ops)
            daemons = [host]
            try:
                if system == "limit":
                    ep, url = host.endpoint("tls"), f"/images/{tid}"
                else:
                    url = proxy.add_ticket(tid, host.https_url(tid), size, ops=ops)
                    ep = proxy.endpoint("unix")
                    daemons.insert(0, proxy)
                cpu0, c0 = [d.cpu() for d in daemons], os.times()
                start = time.perf_counter()
                if upload:
                    clients.upload(ep, url, size, conns, ctx.dense)
                else:
                    clients.download(ep, url, size, conns, ctx.dense)
                seconds = time.perf_counter() - start
                cpu1, c1 = [d.cpu() for d in daemons], os.times()
                nbd_cpu = server.cpu()
            finally:
                if system != "limit":
                    proxy.delete_ticket(tid)
                host.delete_ticket(tid)
            if upload:
                clients.verify_export(server.sock, ctx.dense, samples)
        # server_cpu: the daemon the client talks to (the proxy); host_cpu: its upstream.
        return rate({"seconds": seconds, "bytes": size, "server_cpu": cpu1[0] - cpu0[0],
                     "host_cpu": cpu1[-1] - cpu0[-1], "nbd_cpu": nbd_cpu,
                     "client_cpu": (c1.user + c1.system) - (c0.user + c0.system)})
    return Scenario(f"proxy-{op}/unix/{conns}conn/tls-host", "MiB/s", run,
                    limit="nbdproxy host direct over TLS", new=True)


def image_scenarios(ctx):
    """Issue 15: image tickets (the daemon starts qemu-nbd) against ovirt-imageio on a qemu-nbd
    started as a host starts it (default environment), in both cache modes; the limit is nbdcopy
    on a qemu-nbd started as the image ticket starts it."""
    size = ctx.sizes["dense"]
    out = [Scenario("image-start/unix", "s", _image_start, limit="qemu-nbd start to 1st byte",
                    higher=False, targets=[("max", IMAGE_START_TARGET)], repeat=5, new=True,
                    rule_target=False)]
    for op in ("download", "upload"):
        for cache in ("none", "writeback"):
            out.append(_image(op, cache, size))
    return out


def _first_byte(ep, url, length=4 * MiB):
    """GET [0, length): seconds to the first byte of the body (then the rest is read)."""
    conn = ep.connect()
    try:
        conn.putrequest("GET", url, skip_accept_encoding=True)
        conn.putheader("Range", f"bytes=0-{length - 1}")
        conn.endheaders()
        resp = conn.getresponse()
        clients.check_status(resp, (200, 206), "GET")
        resp.read(1)
        first = time.perf_counter()
        resp.read()
        return first
    finally:
        conn.close()


def _image_start(ctx, system):
    """Seconds from asking for a transfer to its first byte: nbdproxy PUT /tickets with an image,
    GET; imageio: the host starts qemu-nbd (waits for its socket, as vdsm), PUT /tickets, GET;
    limit: qemu-nbd started as the image ticket starts it, NBD connect, 1 byte read."""
    tid = ctx.ticket_id()
    if system == "limit":
        start = time.perf_counter()
        with systems.ImageTicketServer(ctx.nbd.sock(), ctx.dense_path, True,
                                       ctx.direct) as server:
            h = clients.nbd.NBD()
            h.connect_unix(server.sock)
            h.pread(1, 0)
            seconds = time.perf_counter() - start
            h.shutdown()
        return {"seconds": seconds, "value": seconds}
    daemon = ctx.daemons[system]
    ep = daemon.endpoint("unix")
    if system == "nbdproxy":
        start = time.perf_counter()
        url = daemon.add_image_ticket(tid, ctx.dense_path, ops=("read",))
        try:
            seconds = _first_byte(ep, url) - start
        finally:
            daemon.delete_ticket(tid)
        return {"seconds": seconds, "value": seconds}
    start = time.perf_counter()
    with ctx.nbd.start("qemu-nbd", ctx.dense_path, env=systems.host_env()) as server:
        url = daemon.add_ticket(tid, server.url, ctx.sizes["dense"], ops=("read",))
        try:
            seconds = _first_byte(ep, url) - start
        finally:
            daemon.delete_ticket(tid)
    return {"seconds": seconds, "value": seconds}


def _image(op, cache, size):
    samples = upload_samples(size)
    upload = op == "upload"

    def run(ctx, system):
        image = ctx.dst_path if upload else ctx.dense_path
        if upload:
            scribble(ctx.dst_path, samples)

        def transfer(ep, url):
            if upload:
                return clients.upload(ep, url, size, 1, ctx.dense)
            return clients.download(ep, url, size, 1, ctx.dense)
        if system == "limit":
            with systems.ImageTicketServer(ctx.nbd.sock(), image, not upload,
                                           cache == "none") as server:
                start = time.perf_counter()
                if upload:
                    clients.nbdcopy(ctx.dense_path, server.uri, 1, flush=True)
                else:
                    clients.nbdcopy(server.uri, "null:", 1)
                seconds = time.perf_counter() - start
                nbd_cpu = server.cpu()
                if upload:
                    clients.verify_export(server.sock, ctx.dense, samples)
            return rate({"seconds": seconds, "bytes": size, "nbd_cpu": nbd_cpu})
        daemon = ctx.daemons[system]
        ep = daemon.endpoint("unix")

        def timed(tid, url, nbd_cpu):
            """The transfer through the ticket, which is deleted after it; the sample."""
            try:
                cpu0, c0 = daemon.cpu(), os.times()
                start = time.perf_counter()
                transfer(ep, url)
                seconds = time.perf_counter() - start
                cpu1, c1 = daemon.cpu(), os.times()
                return {"seconds": seconds, "bytes": size, "server_cpu": cpu1 - cpu0,
                        "nbd_cpu": nbd_cpu(),
                        "client_cpu": (c1.user + c1.system) - (c0.user + c0.system)}
            finally:
                daemon.delete_ticket(tid)

        tid = ctx.ticket_id()
        if system == "imageio":
            # measure() with a host's qemu-nbd: this cache mode, default environment.
            with ctx.nbd.start("qemu-nbd", image, cache=cache, env=systems.host_env()) as server:
                sample = timed(tid, daemon.add_ticket(tid, server.url, size), server.cpu)
                if upload:
                    clients.verify_export(server.sock, ctx.dense, samples)
        else:
            # The image ticket as it is: nbdproxy picks the cache mode (cache=none where
            # O_DIRECT works); there is no setting for writeback.
            url = daemon.add_image_ticket(tid, image,
                                          ops=("read", "write") if upload else ("read",))
            sample = timed(tid, url, daemon.qemu_nbd_cpu)
            if upload:
                clients.verify_file(image, ctx.dense, samples)
        return rate(sample)
    return Scenario(f"image-{op}/unix/1conn/{cache}", "MiB/s", run,
                    limit=f"nbdcopy -C 1, image ticket's qemu-nbd", new=True)


def request_size_scenarios(ctx):
    """Issue 15 point 5: download/upload unix 1conn qemu-nbd (the dense rows) through nbdproxy
    daemons that differ only in --nbd-request-size, on qemu-nbd --cache=none and writeback."""
    size = ctx.sizes["dense"]
    out = []
    for op in ("download", "upload"):
        for cache in ("none", "writeback"):
            for label in REQUEST_SIZES:
                out.append(_request_size(op, cache, label, size))
    return out


def _request_size(op, cache, label, size):
    samples = upload_samples(size)

    def run(ctx, system):
        if op == "download":
            if system == "limit":
                return rate(time_limit(ctx, "qemu-nbd", ctx.dense_path, lambda s: (
                    clients.nbdcopy(s.uri, "null:", 1), size), cache=cache))
            ep = ctx.request_size_daemon(label).endpoint("unix")
            return rate(measure(ctx, ctx.request_size_daemon(label), "qemu-nbd", ctx.dense_path,
                                size, lambda url: clients.download(ep, url, size, 1, ctx.dense),
                                cache=cache))
        before = lambda: scribble(ctx.dst_path, samples)  # noqa: E731
        after = lambda server: clients.verify_export(server.sock, ctx.dense, samples)  # noqa: E731
        if system == "limit":
            return rate(time_limit(ctx, "qemu-nbd", ctx.dst_path, lambda s: (
                clients.nbdcopy(ctx.dense_path, s.uri, 1, flush=True), size),
                before=before, after=after, cache=cache))
        ep = ctx.request_size_daemon(label).endpoint("unix")
        return rate(measure(ctx, ctx.request_size_daemon(label), "qemu-nbd", ctx.dst_path, size,
                            lambda url: clients.upload(ep, url, size, 1, ctx.dense),
                            before=before, after=after, cache=cache))
    return Scenario(f"reqsize/{op}/unix/1conn/{cache}/{label}", "MiB/s", run,
                    limit="nbdcopy -C 1", daemons=("nbdproxy",))


def all_scenarios(ctx):
    return (dense_scenarios(ctx) + file_scenarios(ctx) + [socket_copy_scenario(ctx)]
            + sparse_scenarios(ctx)
            + small_scenarios(ctx) + checksum_scenarios(ctx) + [busy_scenario(ctx)]
            + proxy_scenarios(ctx) + image_scenarios(ctx) + request_size_scenarios(ctx))


# Summary

def median(values):
    return statistics.median(values) if values else None


def summarize(scenario, samples):
    row = {"scenario": scenario.name, "unit": scenario.unit, "higher_is_better": scenario.higher,
           "limit": scenario.limit, "new": scenario.new, "median": {}, "samples": samples}
    for system, ss in samples.items():
        vals = [s["value"] for s in ss]
        row["median"][system] = median(vals)
        cpu = [s["server_cpu"] / (s["bytes"] / GiB) for s in ss
               if s.get("server_cpu") is not None and s.get("bytes")]
        if cpu:
            row.setdefault("cpu_per_gib", {})[system] = median(cpu)
        nbd = [s["nbd_cpu"] / (s["bytes"] / GiB) for s in ss
               if s.get("nbd_cpu") is not None and s.get("bytes")]
        if nbd:
            row.setdefault("nbd_cpu_per_gib", {})[system] = median(nbd)
        client = [s["client_cpu"] / (s["bytes"] / GiB) for s in ss
                  if s.get("client_cpu") is not None and s.get("bytes")]
        if client:
            row.setdefault("client_cpu_per_gib", {})[system] = median(client)
        rss = [s["peak_rss"] for s in ss if s.get("peak_rss")]
        if rss:
            row.setdefault("peak_rss_mib", {})[system] = median(rss) / MiB

    def speedup(a, b):
        if a is None or b is None or a == 0 or b == 0:
            return None
        return a / b if scenario.higher else b / a

    m = row["median"]
    row["ratio_imageio"] = speedup(m.get("nbdproxy"), m.get("imageio"))
    row["ratio_limit"] = speedup(m.get("nbdproxy"), m.get("limit"))
    row["ratio_tls_limit"] = speedup(m.get("nbdproxy"), m.get("tls-limit"))
    cpu = row.get("cpu_per_gib", {})
    row["cpu_ratio_imageio"] = (cpu["nbdproxy"] / cpu["imageio"]
                                if cpu.get("nbdproxy") and cpu.get("imageio") else None)
    # How much faster than imageio the limit itself is: below the target, the target is out of
    # reach of any daemon that is not faster than the limit.
    row["ratio_limit_imageio"] = speedup(m.get("limit"), m.get("imageio"))
    # The lower of the row's limits (storage or NBD, and TLS) bounds any daemon.
    limits = [v for v in (m.get("limit"), m.get("tls-limit")) if v]
    bound = (min(limits) if scenario.higher else max(limits)) if limits else None
    row["bound"] = bound
    row["ratio_bound_imageio"] = speedup(bound, m.get("imageio"))
    row["rule"] = rule(row["ratio_imageio"], speedup(m.get("nbdproxy"), bound),
                       row["ratio_bound_imageio"])
    if not scenario.rule_target:
        row["rule"] = None      # its targets are absolute (image-start: seconds)
    if scenario.new:
        row["misses"] = new_row_misses(scenario, row)
        return row
    misses = []
    if row["ratio_imageio"] is not None and row["ratio_imageio"] < SPEED_TARGET:
        ceiling = row["ratio_limit_imageio"]
        # Marked only where the limit bounds nbdproxy (not where nbdproxy is faster than it).
        bound = (ceiling is not None and ceiling < SPEED_TARGET
                 and row["ratio_limit"] is not None and row["ratio_limit"] < 1)
        misses.append(f"<{SPEED_TARGET}x imageio" + (" (lim/io<1.5)" if bound else ""))
    for kind, target in scenario.targets:
        if kind == "limit" and row["ratio_limit"] is not None and row["ratio_limit"] < target:
            misses.append(f"<{target}x nbdcopy")
        if kind == "max" and m.get("nbdproxy") is not None and m["nbdproxy"] > target:
            misses.append(f">{target}s")
    if row["cpu_ratio_imageio"] is not None and row["cpu_ratio_imageio"] > CPU_TARGET:
        misses.append(f"cpu>{CPU_TARGET}x imageio")
    row["misses"] = misses
    return row


def rule(np_io, np_bound, bound_io):
    """Issue 13's rule: at least 1.5x imageio, or at least 0.9x the row's limit where that limit
    (the lower of its limits) is itself under 1.5x imageio. "met", "MISS" or None."""
    if np_io is None:
        return None
    if np_io >= SPEED_TARGET:
        return "met"
    if bound_io is not None and bound_io < SPEED_TARGET and np_bound is not None:
        return "met" if np_bound >= LIMIT_TARGET else "MISS"
    return "MISS"


def new_row_misses(scenario, row):
    """The targets of issue 13's rows: the rule, and daemon CPU on unix-socket downloads."""
    misses = []
    for kind, target in scenario.targets:
        if kind == "max" and row["median"].get("nbdproxy") is not None \
                and row["median"]["nbdproxy"] > target:
            misses.append(f">{target}s")
    if not scenario.rule_target:
        return misses
    if row["rule"] == "MISS":
        if row["ratio_bound_imageio"] is not None and row["ratio_bound_imageio"] < SPEED_TARGET:
            tls = row["bound"] == row["median"].get("tls-limit")
            misses.append(f"<{LIMIT_TARGET}x {'TLS ' if tls else ''}limit")
        else:
            misses.append(f"<{SPEED_TARGET}x imageio")
    for kind, target in scenario.targets:
        if kind == "cpu" and row["cpu_ratio_imageio"] is not None \
                and row["cpu_ratio_imageio"] > target:
            misses.append(f"cpu>{target}x imageio")
    return misses


def fmt(value, unit=None):
    if value is None:
        return "-"
    if unit == "s" or (unit is None and value < 10):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return f"{value:.0f}"


def table(rows):
    head = ["scenario", "unit", "nbdproxy", "imageio", "limit", "tls lim", "np/io", "np/lim",
            "np/tls", "lim/io", "cpu s/GiB np", "io", "cpu np/io", "rss MiB np/io", "rule",
            "misses"]
    lines = [head]
    for r in rows:
        m = r["median"]
        cpu = r.get("cpu_per_gib", {})
        rss = r.get("peak_rss_mib", {})
        lines.append([
            r["scenario"], r["unit"], fmt(m.get("nbdproxy"), r["unit"]),
            fmt(m.get("imageio"), r["unit"]), fmt(m.get("limit"), r["unit"]),
            fmt(m.get("tls-limit"), r["unit"]),
            f"{r['ratio_imageio']:.2f}x" if r["ratio_imageio"] else "-",
            f"{r['ratio_limit']:.2f}x" if r["ratio_limit"] else "-",
            f"{r['ratio_tls_limit']:.2f}x" if r.get("ratio_tls_limit") else "-",
            f"{r['ratio_limit_imageio']:.2f}x" if r.get("ratio_limit_imageio") else "-",
            f"{cpu['nbdproxy']:.2f}" if cpu.get("nbdproxy") is not None else "-",
            f"{cpu['imageio']:.2f}" if cpu.get("imageio") is not None else "-",
            f"{r['cpu_ratio_imageio']:.2f}" if r["cpu_ratio_imageio"] else "-",
            (f"{rss['nbdproxy']:.0f}/{rss['imageio']:.0f}" if rss.get("nbdproxy")
             and rss.get("imageio") else "-"),
            (r.get("rule") or "-") + ("*" if r.get("new") else ""),
            " ".join(r["misses"]) or "ok" if (r["ratio_imageio"] or r["misses"]) else "",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i in (0, 1, len(head) - 1) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def request_size_summary(rows):
    """The nbd_request_size rows per size: each row's median over the best size of that row, and
    their geometric mean over both operations and cache modes (1.00 = best everywhere)."""
    by = {}
    for r in rows:
        parts = r["scenario"].split("/")
        if parts[0] == "reqsize" and r["median"].get("nbdproxy"):
            by.setdefault("/".join(parts[1:5]), {})[parts[5]] = r["median"]["nbdproxy"]
    if not by:
        return ""
    lines = ["", "", "nbd_request_size: MiB/s (fraction of the row's best size)"]
    scores = {label: [] for label in REQUEST_SIZES}
    for row, values in by.items():
        best = max(values.values())
        cells = []
        for label in REQUEST_SIZES:
            if label in values:
                scores[label].append(values[label] / best)
                cells.append(f"{label} {values[label]:5.0f} ({values[label] / best:.2f})")
        lines.append(f"  {row:32} " + "  ".join(cells))
    lines.append("  geometric mean of the fractions: " + "  ".join(
        f"{label} {statistics.geometric_mean(v):.2f}" for label, v in scores.items() if v))
    return "\n".join(lines)


def limits_legend(rows):
    seen = {}
    for r in rows:
        if r["limit"]:
            seen.setdefault(r["limit"], []).append(r["scenario"].split("/")[0])
    return "; ".join(f"{k} ({', '.join(sorted(set(v)))})" for k, v in seen.items())


# Main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, help="samples per scenario and system (default 5; 1 "
                   "with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a 256 MiB dense image, fewer small requests, 1 run: for development")
    p.add_argument("--only", metavar="REGEX", action="append",
                   help="scenarios whose name matches (re.search; a glob works too); repeatable")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--nbd-env", metavar="NAME=VALUE", action="append", default=[],
                   help="more environment for qemu-nbd and nbdkit (all systems), e.g. "
                   "MALLOC_TRIM_THRESHOLD_=67108864; repeatable")
    p.add_argument("--output", help="JSON file (default bench/results/<date>.json)")
    p.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    p.add_argument("--table", metavar="JSON",
                   help="print the table of a saved run again (with this tree's targets)")
    args = p.parse_args(argv)
    for item in args.nbd_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--nbd-env wants NAME=VALUE, not {item!r}")
        systems.NBD_SERVER_ENV[name] = value
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    return args


def print_saved_table(path, scenarios):
    with open(path) as f:
        saved = json.load(f)
    by_name = {s.name: s for s in scenarios}
    rows = [summarize(by_name[r["scenario"]], r["samples"])
            for r in saved["rows"] if r["scenario"] in by_name]
    print(table(rows))
    return 0


def selected(name, patterns):
    if not patterns:
        return True
    for pattern in patterns:
        if fnmatch.fnmatch(name, pattern):
            return True
        try:
            if re.search(pattern, name):
                return True
        except re.error:
            pass
    return False


def main(argv=None):
    args = parse_args(argv)
    ctx = Context(args)
    if args.list or args.table:
        ctx.sizes = SIZES[args.quick]
        ctx.layout = []
        if args.table:
            return print_saved_table(args.table, all_scenarios(ctx))
        for s in all_scenarios(ctx):
            print(s.name)
        return 0
    started = datetime.datetime.now()
    load_before = os.getloadavg()   # the machine may be shared: say how busy it was
    ctx.setup()
    scenarios = [s for s in all_scenarios(ctx) if selected(s.name, args.only)]
    if not scenarios:
        raise SystemExit("bench: no scenario matches --only")
    log("bench: checking the reference checksums")
    ctx.dense_checksum = clients.blkhash_dense(ctx.dense, ctx.sizes["dense"])
    ctx.sparse_checksum = clients.blkhash_sparse(ctx.sparse, ctx.sizes["sparse"], ctx.layout,
                                                 ctx.sizes["piece"])
    log(f"bench: {len(scenarios)} scenarios x {args.runs} runs; NBD servers: {ctx.nbd.describe()}")
    samples = {s.name: {system: [] for system in s.systems()} for s in scenarios}
    ctx.start_daemons()
    try:
        for run in range(args.runs):
            for scenario in scenarios:
                order = scenario.systems()
                # Rotate who goes first, so that a slow moment of the machine is shared.
                k = (run + scenarios.index(scenario)) % len(order)
                for system in order[k:] + order[:k]:
                    for _ in range(scenario.repeat):
                        s = scenario.sample(ctx, system)
                        samples[scenario.name][system].append(s)
                        log(f"[{run + 1}/{args.runs}] {scenario.name:32} {system:9} "
                            f"{fmt(s['value'], scenario.unit):>8} {scenario.unit}")
    finally:
        ctx.stop_daemons()
    rows = [summarize(s, samples[s.name]) for s in scenarios]
    cache = "none (O_DIRECT), aio=native" if ctx.direct else "writeback (no O_DIRECT here)"
    header = [
        f"nbdproxy benchmark {started:%Y-%m-%d %H:%M}, {args.runs} run(s) per cell "
        "(x2-3 samples per run for short rows), medians"
        + (" (--quick)" if args.quick else ""),
        f"dense image {ctx.sizes['dense'] >> 20} MiB random data; sparse image "
        f"{ctx.sizes['sparse'] >> 30} GiB virtual, {ctx.sizes['sparse_data'] >> 20} MiB data in "
        f"{ctx.sizes['piece'] >> 20} MiB pieces",
        f"qemu-nbd cache={cache}; fresh NBD server per sample; "
        + " ".join(f"{k}={v}" for k, v in systems.NBD_SERVER_ENV.items())
        + " in the environment of qemu-nbd and nbdkit for every system",
        f"ovirt-imageio {systems.IMAGEIO_VERSION} (default configuration, TLS) from "
        f"{os.path.relpath(systems.IMAGEIO_VENV, systems.TOP)}",
        "np/io and np/lim: how many times faster nbdproxy is (>1 is better; for rows in s the "
        "inverse ratio of times); lim/io: the same for the limit over imageio (a miss marked "
        "lim/io<1.5 is a target above the limit); cpu: daemon CPU seconds per GiB moved (lower "
        "is better)",
        "limits: " + limits_legend(rows),
    ]
    delete_errors = {n: len(d.delete_errors) for n, d in ctx.daemons.items() if d.delete_errors}
    if delete_errors:
        header.append(f"note: DELETE /tickets/ID answered 500 (ticket removed) {delete_errors}")
    tls_ciphers = sorted({c for ss in samples.values() for s in ss.get("tls-limit", [])
                          for c in s["cipher"]})
    if tls_ciphers:
        header.append(
            "tls lim: the same bytes (and requests) as a plain Python TLS socket copy, no HTTP, "
            "no storage (ssl module, server forked, same certificate, client recv_into 4 MiB), "
            f"handshakes timed; cipher {', '.join(tls_ciphers)} (daemons: "
            + ", ".join(f"{k} {v}" for k, v in ctx.ciphers.items()) + "); np/tls: nbdproxy "
            "over it")
    header.append("rule: issue 13's rule (also issues 14 and 15's), >= 1.5x imageio or, where the lower of the row's "
                  "limits is under 1.5x imageio, >= 0.9x that limit; * marks the rows it is a "
                  "target for (misses of those rows: that rule, and daemon CPU/GiB <= 0.5x "
                  "imageio's on unix-socket downloads)")
    text = "\n".join(header) + "\n\n" + table(rows) + request_size_summary(rows)
    print(text)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "nbdproxy_commit": _git_head(), "nbdproxy_uncommitted": _git_dirty(),
        "runs": args.runs, "quick": args.quick, "only": args.only,
        "sizes": ctx.sizes, "qemu_nbd_cache": "none" if ctx.direct else "writeback",
        "nbd_servers": ctx.nbd.describe(), "nbd_server_env": systems.NBD_SERVER_ENV,
        "tls_ciphers": ctx.ciphers, "load_before": load_before, "load_after": os.getloadavg(),
        "imageio_version": systems.IMAGEIO_VERSION, "delete_ticket_errors": delete_errors,
        "targets": {"speed_vs_imageio": SPEED_TARGET, "download_vs_nbdcopy": NBDCOPY_TARGET,
                    "cpu_vs_imageio": CPU_TARGET, "sparse_extents_s": EXTENTS_TARGET,
                    "sparse_download_s": SPARSE_DL_TARGET, "file_rows_vs_limit": LIMIT_TARGET,
                    "file_rows_cpu_vs_imageio": FILE_CPU_TARGET},
        "rows": rows, "table": text,
    }
    if not args.no_save:
        path = args.output or os.path.join(RESULTS, f"{started:%Y-%m-%dT%H%M%S}"
                                           + ("-quick" if args.quick else "") + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.rename(path + ".tmp", path)
        log(f"bench: saved {os.path.relpath(path, systems.TOP)}")
    return 0


def _git_head():
    try:
        return subprocess.run(["git", "-C", systems.TOP, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def _git_dirty():
    """Files of the daemon that differ from the commit (the tree is shared while it is tuned)."""
    try:
        out = subprocess.run(["git", "-C", systems.TOP, "status", "--porcelain", "nbdproxy"],
                             capture_output=True, text=True).stdout
    except OSError:
        return None
    return [line[3:] for line in out.splitlines()]


if __name__ == "__main__":
    sys.exit(main())
