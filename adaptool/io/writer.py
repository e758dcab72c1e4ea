"""Header-first safetensors writer: every byte through a few aligned buffers, hashed, written past the page cache.

safetensors has no streaming writer, but every output tensor's name, dtype and shape is known from the
plan before any math runs, so the header (with all offsets) is written first and the tensor bytes are
streamed after it in header order, one tensor at a time.

Every byte a :class:`ShardWriter` writes — the header, each block the engine computed, each unchanged tensor read
from its input file — goes into one of :data:`STAGES` page-aligned buffers of :data:`STAGE` bytes. Each full buffer
goes to two threads of the file's own at once, and back to the ring once both are done with it (so the thread
filling the buffers waits for neither, only for a free buffer: backpressure, bounded memory):

* the hasher: sha256 of the whole file, for the output's manifest, in file order, from the buffer itself
  (nothing is read back);
* the disk writer: ``O_DIRECT`` where the filesystem takes it (ext4, XFS, btrfs, tmpfs), from the buffer to the
  disk, with no page-cache copy to allocate, dirty, write back and reclaim. On the 2-core development VM that is
  0.3-0.9 s of CPU for 6.7 GiB instead of 2.1 s of buffered writes with a bounded write-back (and 4-5 s of plain
  buffered writes, whose pages pile up and are all written back by the final sync). Where a filesystem refuses
  it (some FUSE or network filesystems), the buffer goes through the page cache, written behind: every
  :data:`WINDOW` bytes the kernel is told to start writing them (``sync_file_range``), the window before that is
  waited for and leaves the cache.

Either way the output does not stay in the page cache (as ``dd oflag=direct``): a model of many GB written does not
evict what the machine had cached. An unchanged tensor costs one ``pread`` from the input's page cache into a
buffer (``copy_file_range`` would copy it in the kernel, and the digest would then read it back: two copies).
:meth:`ShardWriter.close` makes the file durable (``fsync``), so a folder renamed into place after a crash never
holds a half-written file; the data is on the disk already, so it costs a cache flush.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import DTYPE_SIZES, dtype_code

ALIGN = 4096  # O_DIRECT: buffer addresses, file offsets and lengths in multiples of this
STAGE = 4 << 20  # bytes per buffer (a multiple of ALIGN)
STAGES = 4  # buffers per file: one filling, the others being hashed and written
WINDOW = 32 << 20  # buffered fallback: bytes written between write-back kicks
SYNC_WRITE, SYNC_WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER
IO_NICE = 5  # how much lower than the computing thread the writing and hashing threads are scheduled
DIRECT = True  # try O_DIRECT (tests turn it off to run the buffered path)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def header_bytes(tensors: list[OutputTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority by :data:`IO_NICE` (Linux, where each thread has its own nice
    value; elsewhere nothing). The engine's writer thread and every digest thread call it: where busy threads
    outnumber free cores (2 cores: compute, write, hash), the scheduler would share them out evenly and the
    compute thread, the one every other waits for, would get two thirds of a core; this way it keeps one, and the
    writer and the hasher, whose work together fits in the other, share it. With cores to spare it changes nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + IO_NICE))
    except (AttributeError, OSError):
        pass


class ShardWriter:
    """Writes one safetensors file whose tensors arrive in the order given to the constructor, and its sha256.

    Every method but the constructor and :meth:`close`/:meth:`abort` may run on another thread than the one that
    made the writer, one call at a time. After :meth:`close`: ``size`` (bytes) and ``sha256`` (hex) of the file.

    Args:
        path (Path): file to create.
        tensors (list[OutputTensor]): every tensor of the file, in write order.
        metadata (dict[str, str] | None): the ``__metadata__`` block.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._expected = list(tensors)
        self._next = 0
        self.size = 0
        self.sha256: str | None = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            self._out = _Stages(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        try:
            header = header_bytes(self._expected, metadata)
            self._copy_in(ctypes.cast(ctypes.c_char_p(header), ctypes.c_void_p).value, len(header))
        except BaseException:
            self.abort()
            raise

    def _take(self, name: str, nbytes: int) -> None:
        if self._next >= len(self._expected) or self._expected[self._next].name != name:
            want = self._expected[self._next].name if self._next < len(self._expected) else "nothing"
            raise RuntimeError(f"writer for {self.path.name} expected {want}, got {name}")
        if self._expected[self._next].nbytes != nbytes:
            raise RuntimeError(f"{name}: {nbytes} bytes, header promised {self._expected[self._next].nbytes}")
        self._next += 1

    def write_tensor(self, name: str, tensor) -> None:
        """Append a whole CPU tensor (it must have the dtype and shape promised in the header)."""
        spec = self._expected[self._next] if self._next < len(self._expected) else None
        if spec is not None and spec.name == name and (dtype_code(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape):
            raise RuntimeError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, header promised {spec.dtype} {spec.shape}")
        self._take(name, tensor.numel() * tensor.element_size())
        self.write_part(tensor)

    def begin_tensor(self, name: str) -> int:
        """Start a tensor that arrives in parts (``write_part``); returns its byte size."""
        spec = self._expected[self._next] if self._next < len(self._expected) else None
        nbytes = spec.nbytes if spec is not None else -1
        self._take(name, nbytes)
        return nbytes

    def write_part(self, tensor) -> None:
        """Append the raw bytes of a CPU tensor block (copied into the buffers before this returns)."""
        if tensor.device.type != "cpu":
            raise RuntimeError(f"{self.path.name}: a block on {tensor.device} was handed to the writer")
        if tensor.numel():
            block = tensor.contiguous()
            self._copy_in(block.data_ptr(), block.numel() * block.element_size())

    def copy_part(self, src_handle, start: int, length: int) -> None:
        """Append ``length`` bytes of another file at ``start`` (an unchanged tensor), read straight into the
        buffers, after ``begin_tensor``.

        Raises:
            AdaptoolError: ``src_handle``'s file ends before ``start + length``.
        """
        fd = src_handle.fileno()
        while length:
            room = self._out.room()
            n = os.preadv(fd, [room[:length]], start)
            if n <= 0:
                raise AdaptoolError(f"{src_handle.name}: file is truncated", "re-download the checkpoint")
            self._filled(n)
            start, length = start + n, length - n

    def _copy_in(self, address: int, length: int) -> None:
        """Append ``length`` bytes from memory at ``address`` (a memmove that lets other threads run)."""
        while length:
            n = min(self._out.space(), length)
            ctypes.memmove(self._out.fill_address(), address, n)
            self._filled(n)
            address, length = address + n, length - n

    def _filled(self, n: int) -> None:
        self.size += n
        if self._out.filled(n):
            self._out.ship()

    def close(self) -> None:
        """Check every tensor was written, write the last buffer, wait for the digest, make the file durable
        (fsync) and close it."""
        if self._next != len(self._expected):
            missing = self._expected[self._next].name
            self.abort()
            raise RuntimeError(f"{self.path.name}: closed before {missing} was written")
        try:
            self._out.ship(last=True)
            self.sha256 = self._out.finish(self.size)
            os.fsync(self._fd)
            self._out.written_behind(self.size)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        """Stop hashing and writing and close the file, whatever state it is in (the caller removes it)."""
        self._out.abort()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Stages:
    """The ring of page-aligned buffers of one file. Each full buffer goes to two threads at once, the hasher and the
    disk writer (``O_DIRECT`` when the filesystem takes it, else through the page cache, written behind), and
    back to the ring once both are done with it: the thread filling the buffers never waits for the disk, only for
    a free buffer."""

    def __init__(self, fd: int):
        assert STAGE % ALIGN == 0
        self._fd = fd
        self._size = STAGE
        self._free: queue.Queue = queue.Queue()
        self._maps = [mmap.mmap(-1, self._size) for _ in range(STAGES)]
        self._addresses = {id(m): ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self._maps}
        for m in self._maps[1:]:
            self._free.put(m)
        self._cur, self._used, self._offset = self._maps[0], 0, 0
        self._users: dict[int, int] = {}
        self._lock = threading.Lock()
        self.direct = DIRECT and _set_direct(fd, True)
        self._behind = _WriteBehind(fd)
        self._hash = hashlib.sha256()
        self._hasher = _Consumer("adaptool-digest", lambda view, offset: self._hash.update(view), self._release)
        self._disk = _Consumer("adaptool-disk", self._write, self._release)

    def room(self) -> memoryview:
        """The free part of the buffer being filled (never empty)."""
        return memoryview(self._cur)[self._used:]

    def space(self) -> int:
        """Bytes left in the buffer being filled (never 0)."""
        return self._size - self._used

    def fill_address(self) -> int:
        return self._addresses[id(self._cur)] + self._used

    def filled(self, n: int) -> bool:
        """``n`` more bytes are in the buffer; whether it is now full."""
        self._used += n
        return self._used == self._size

    def ship(self, last: bool = False) -> None:
        """Hand the buffer to the hasher and the disk writer, and take a free one (waiting for one to come back).
        ``last``: the file's final, partial buffer."""
        buf, used, offset = self._cur, self._used, self._offset
        if used:
            pad = -used % ALIGN if self.direct else 0  # O_DIRECT writes whole blocks: zeros to the next one
            buf[used:used + pad] = bytes(pad)
            with self._lock:
                self._users[id(buf)] = 2
            self._hasher.put(memoryview(buf)[:used], buf, offset)
            self._disk.put(memoryview(buf)[:used + pad], buf, offset)
        elif buf is not None:
            self._free.put(buf)
        self._cur, self._used, self._offset = None, 0, offset + used
        if not last:
            self._cur = self._free.get()

    def _release(self, buf) -> None:
        with self._lock:
            self._users[id(buf)] -= 1
            done = not self._users[id(buf)]
        if done:
            self._free.put(buf)

    def _write(self, view: memoryview, offset: int) -> None:
        """On the disk thread: ``view`` at ``offset``; a filesystem that refuses a direct write after all (EINVAL),
        or writes short, gets the rest through the page cache."""
        while view:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self._fd, False) and False
                continue
            if n < len(view) and self.direct:
                self.direct = _set_direct(self._fd, False) and False
            view, offset = view[n:], offset + n
        if not self.direct:
            self._behind.advance(offset)

    def finish(self, size: int) -> str:
        """Wait for every buffer shipped (the last one included) to be hashed and written; cut the padding of the
        last direct write; the file's sha256 (hex)."""
        for consumer in (self._disk, self._hasher):
            consumer.join()
        for consumer in (self._disk, self._hasher):
            if consumer.error is not None:
                raise consumer.error
        os.ftruncate(self._fd, size)
        return self._hash.hexdigest()

    def written_behind(self, size: int) -> None:
        """After fsync: nothing of a file written through the page cache stays there; the buffers are unmapped."""
        self._behind.finish(size)
        self.free()

    def abort(self) -> None:
        for consumer in (self._disk, self._hasher):
            consumer.cancel()
        self.free()

    def free(self) -> None:
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # still viewed somewhere: the garbage collector unmaps it
                pass


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether it is now on (False where the filesystem refuses it)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
    except OSError:
        return False
    return on


class _Consumer:
    """A thread that does one thing (``work(view, offset)``: hash it, write it) to every buffer it is handed, in
    order, and hands each back (``release``), also after an error or :meth:`cancel`, so that the thread filling
    the buffers never waits for one forever. An error is kept (``error``) and raised at the next :meth:`put`."""

    def __init__(self, name: str, work, release):
        self._work, self._release = work, release
        self._queue: queue.Queue = queue.Queue()  # bounded by the ring: at most STAGES buffers are out
        self.error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, view: memoryview, buf, offset: int) -> None:
        if self.error is not None:
            self._release(buf)
            raise self.error
        self._queue.put((view, buf, offset))

    def _run(self) -> None:
        lower_priority()
        while (item := self._queue.get()) is not None:
            view, buf, offset = item
            try:
                if not self._stop and self.error is None:
                    self._work(view, offset)
            except BaseException as e:
                self.error = e
            finally:
                view.release()
                self._release(buf)

    def join(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def cancel(self) -> None:
        self._stop = True
        self.join()


class _WriteBehind:
    """Keeps few dirty pages of a file written through the page cache (Linux ``sync_file_range``; elsewhere
    nothing): every :data:`WINDOW` bytes start writing the new ones back, wait for the window before, drop it."""

    def __init__(self, fd: int):
        self._fd = fd
        self._kicked = self._settled = 0
        self._sync = None
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            self._sync = fn
        except (AttributeError, OSError):
            pass

    def advance(self, written: int) -> None:
        """The file's first ``written`` bytes are written."""
        if self._sync is None or written - self._kicked < WINDOW:
            return
        if self._sync(self._fd, self._kicked, written - self._kicked, SYNC_WRITE) != 0:
            if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP):
                self._sync = None  # a filesystem without it: fsync at the end does all the work
                return
            _raise_errno()
        self._kicked = written
        older = written - 2 * WINDOW
        if older > self._settled:
            # a write-back error seen here is not seen again by fsync (one report per open file): raise it now
            if self._sync(self._fd, self._settled, older - self._settled, SYNC_WAIT) != 0:
                _raise_errno()
            _drop(self._fd, self._settled, older)
            self._settled = older

    def finish(self, size: int) -> None:
        """After fsync: a file that was written behind leaves the page cache entirely."""
        if self._settled:
            _drop(self._fd, self._settled, size)


def _drop(fd: int, start: int, stop: int) -> None:
    try:
        os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))
