"""Linux primitives of the file backend: fallocate modes, block device ioctls, FIEMAP, buffer
addresses for O_DIRECT, and the per-block lock table that serializes read-modify-write."""

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
ALLOCATE = FALLOC_FL_KEEP_SIZE

BLKSSZGET = 0x1268              # _IO(0x12, 104): logical block size (int)
BLKZEROOUT = 0x127f             # _IO(0x12, 127): zero [start, start+len), no unmap
BLKGETSIZE64 = 0x80081272       # _IOR(0x12, 114, size_t)
FS_IOC_FIEMAP = 0xc020660b      # _IOWR('f', 11, struct fiemap)

FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")          # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")     # logical, physical, length, flags
# Extents asked per FIEMAP call: 512 * 56 bytes; a multi-TiB file is mapped in bounded calls.
FIEMAP_BATCH = 512

# Errors meaning "this file or filesystem does not do that", after which a fallback is tried.
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd, mode, offset, length):
    """fallocate(2) with a mode (os.posix_fallocate has none); the GIL is released."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def write_out(fd, offset, length, wait=False):
    """Start writeback of the range's dirty pages now (sync_file_range); with wait, until they
    are written. Not a flush: no metadata, no device cache."""
    flags = SYNC_FILE_RANGE_WRITE
    if wait:
        flags |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER
    if _sync_file_range(fd, offset, length, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def try_fallocate(fd, mode, offset, length):
    """fallocate; False where the file or filesystem does not support the mode."""
    try:
        fallocate(fd, mode, offset, length)
        return True
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise
        return False


class Refused(Exception):
    """The path cannot be served; str() says why."""


_NOT_FILES = ((stat.S_ISDIR, "is a directory"), (stat.S_ISCHR, "is a character device"),
              (stat.S_ISFIFO, "is a FIFO"), (stat.S_ISSOCK, "is a socket"))


def open_checked(path, flags, direct):
    """Open a regular file or block device: (fd, is a block device, O_DIRECT in use); Refused
    says why not. O_DIRECT falls back to the page cache where the filesystem refuses it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise Refused(e.strerror) from None
    for test, reason in _NOT_FILES:
        if test(st.st_mode):
            raise Refused(reason)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise Refused("not a regular file or block device")
    flags |= os.O_NONBLOCK      # a FIFO swapped in after the stat must not hang the open
    try:
        try:
            fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            direct = False      # a filesystem without O_DIRECT (ramfs)
            fd = os.open(path, flags)
    except OSError as e:
        op = "writing" if flags & os.O_RDWR else "reading"
        raise Refused(f"cannot open for {op}: {e.strerror}") from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino, now.st_mode) != (st.st_dev, st.st_ino, st.st_mode):
        os.close(fd)
        raise Refused("changed while it was opened")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd, stat.S_ISBLK(st.st_mode), direct


def dio_alignment(fd, block):
    """O_DIRECT alignment: the logical block size; for files, 512 if a 512-byte read works."""
    if block:
        return blk_sector_size(fd)
    with mmap.mmap(-1, mmap.PAGESIZE) as buf:
        view = memoryview(buf)
        try:
            for a in (512, mmap.PAGESIZE):
                try:
                    if os.preadv(fd, [view[:a]], 0) > 0:
                        return a
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
        finally:
            view.release()
    return mmap.PAGESIZE    # an empty file tells nothing: the page size is always safe


def zero_range(fd, block, offset, length, punch_hole):
    """Zero in the kernel without changing the size; False if the caller must write zeros.
    punch_hole deallocates; else the range stays allocated (ZERO_RANGE, unwritten extents)."""
    if block:
        # PUNCH_HOLE on a block device guarantees zeros (or fails); BLKZEROOUT never unmaps.
        if not (punch_hole and try_fallocate(fd, PUNCH, offset, length)):
            blk_zeroout(fd, offset, length)
        return True
    if try_fallocate(fd, PUNCH if punch_hole else ZERO_RANGE, offset, length):
        return True
    # No ZERO_RANGE (tmpfs): punch, then allocate again. No fallocate at all (ramfs): False.
    if not try_fallocate(fd, PUNCH, offset, length):
        return False
    if not punch_hole:
        try_fallocate(fd, ALLOCATE, offset, length)
    return True


def blk_size(fd):
    buf = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, buf, True)
    return struct.unpack("=Q", buf)[0]


def blk_sector_size(fd):
    buf = bytearray(4)
    fcntl.ioctl(fd, BLKSSZGET, buf, True)
    return struct.unpack("=i", buf)[0]


def blk_zeroout(fd, offset, length):
    """Zero a logical-block aligned range of a block device in the kernel."""
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))


def layout(fd, start, end):
    """Yield (start, length, zero, hole) covering [start, end) in order: FIEMAP, else
    SEEK_DATA/SEEK_HOLE (unwritten extents are then data), else all data."""
    pos = start
    try:
        for logical, n, flags in fiemap(fd, start, end):
            s, e = max(logical, pos), min(logical + n, end)
            if e <= s:
                continue
            if s > pos:
                yield pos, s - pos, True, True
            yield s, e - s, bool(flags & FIEMAP_EXTENT_UNWRITTEN), False
            pos = e
    except OSError as e:
        if pos != start or e.errno not in UNSUPPORTED:
            raise
        try:
            for s, n in seek_data(fd, start, end):
                if s > pos:
                    yield pos, s - pos, True, True
                yield s, n, False, False
                pos = s + n
        except OSError as e:
            if pos != start or e.errno not in UNSUPPORTED:
                raise
            yield start, end - start, False, False
            return
    if pos < end:
        yield pos, end - pos, True, True


def merged(extents):
    """Join neighbours with equal flags (namedtuples with start, length first)."""
    cur = None
    for e in extents:
        if cur is not None and cur[2:] == e[2:] and cur.start + cur.length == e.start:
            cur = cur._replace(length=cur.length + e.length)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def fiemap(fd, start, end):
    """Yield (logical, length, flags) of the file's extents meeting [start, end), in order, at
    most FIEMAP_BATCH per ioctl. OSError when the filesystem has no FIEMAP.

    FIEMAP_FLAG_SYNC writes dirty pages back first: data written through the page cache into an
    unwritten extent would otherwise be reported as zeros (why qemu gave up FIEMAP)."""
    buf = bytearray(_FIEMAP_HEAD.size + FIEMAP_BATCH * _FIEMAP_EXTENT.size)
    pos = start
    while pos < end:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, FIEMAP_FLAG_SYNC, 0, FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        last = None
        for i in range(mapped):
            last = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            logical, _, length, flags = last
            yield logical, length, flags
        if mapped < FIEMAP_BATCH or last[3] & FIEMAP_EXTENT_LAST:
            return
        pos = last[0] + last[2]


def seek_data(fd, start, end):
    """Yield (offset, length) of the data ranges in [start, end) by SEEK_DATA/SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def address(view):
    """The memory address of a writable view, or None (read-only or empty)."""
    try:
        c = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return None
    try:
        return ctypes.addressof(c)
    finally:
        del c       # drop the export at once, or the owner's mmap cannot be closed


class BlockLocks:
    """Locks keyed by block index, shared by a backend's channels: a read-modify-write of a
    partial block holds its block so a concurrent one on the same block cannot undo it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._held = set()

    @contextlib.contextmanager
    def hold(self, key):
        with self._cond:
            while key in self._held:
                self._cond.wait()
            self._held.add(key)
        try:
            yield
        finally:
            with self._cond:
                self._held.discard(key)
                self._cond.notify_all()
