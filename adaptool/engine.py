"""The engine: runs any :class:`~adaptool.plan.Plan` into a folder, and is the only code that knows about
devices, threads, memory accounting and progress.

Base tensors stream: for every planned file the header is written first (the plan fixes every name, dtype
and shape), then each tensor is either copied byte-for-byte (untouched, same dtype) or read in row blocks,
edited in float32 on the compute device, rounded once, and handed to a writer thread (a tensor replaced whole by
one of another shape, a resized vocabulary, comes from the replacement alone). The threads overlap: a reader
reads the next row block out of the page cache, this thread does the math (the finite check and the rounding
statistics in the same pass, in buffers reused from block to block), the writer copies each block into the
file's write buffers, and the file's own hasher and disk threads hash each full buffer and write it
(:mod:`adaptool.io.writer`); at most a handful of blocks are in memory. Computed tensors (merged factors) are
produced on the device, checked, moved to the CPU and written sorted by name. Nothing written is NaN/Inf; every
file written is on disk (fsync) with its size and sha256 in :attr:`EngineStats.file_digests`.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import resource
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import dtype_code, open_regular, prefetch, read_block, torch_dtype
from adaptool.io.weights_buffer import all_finite
from adaptool.io.writer import OutputTensor, ShardWriter, lower_priority
from adaptool.output.target import AtomicDir
from adaptool.plan import Computed, Plan, PlannedFile

WRITE_QUEUE = 2  # computed blocks waiting for the writer thread (it copies each into its write buffers)
READ_AHEAD = 1  # row blocks read ahead of the math
READ_AHEAD_MAX = 32 << 20  # bytes: a bigger block (a tensor edited whole) is read when it is needed
KEEP_MAX = 64 << 20  # bytes: a bigger buffer is not kept for the next block
BLOCK_ELEMS = 1 << 21  # ~8 MB of float32 per row block: the math stays in cache on a CPU
BLOCK_ELEMS_CUDA = 1 << 23  # a GPU block: small enough to be read ahead (READ_AHEAD_MAX) even from float32
RETENTION_SAMPLE = 4  # measure rounding loss on every 4th block
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass
class EngineStats:
    """What a run did. ``energies``: (label, share of energy kept) of every rank cut; ``written``: the shape of
    every computed tensor written (the sink derives ranks from them)."""

    tensors_total: int = 0
    tensors_changed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    delta_retention: float | None = None  # share of the intended change that survived rounding (mean)
    worst_retention: tuple[str, float] | None = None
    retention: list = field(default_factory=list, repr=False)
    energies: list = field(default_factory=list, repr=False)
    written: dict = field(default_factory=dict, repr=False)
    # every tensor file written: its path in the output -> (size in bytes, sha256 hex), for the manifest
    file_digests: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("retention", "energies", "written", "file_digests")}
        if self.worst_retention:
            d["worst_retention"] = {"tensor": self.worst_retention[0], "retention": self.worst_retention[1]}
        return d

    def energy_kept(self) -> dict | None:
        """Mean and worst share of energy the rank cuts kept, or None when nothing was cut."""
        if not self.energies:
            return None
        return {"mean": sum(e for _, e in self.energies) / len(self.energies),
                "min": min(e for _, e in self.energies),
                "worst_module": min(self.energies, key=lambda x: x[1])[0]}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def execute(plan: Plan, target: Path, force: bool, device: torch.device,
            on_start: Callable[[int, int], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> EngineStats:
    """Run ``plan`` into ``target``, all or nothing: files written into a temporary folder beside it, the
    sink's files added, the manifest written last (:mod:`adaptool.output.manifest`), then the folder swapped into
    place (see :class:`~adaptool.output.target.AtomicDir`)."""
    from adaptool.output.manifest import write_manifest

    if on_start:
        on_start(plan.items, plan.nbytes_estimate)
    with AtomicDir(target, force, plan.inputs) as tmp:
        stats = run(plan, tmp, device, on_progress)
        plan.sink.finish(tmp, plan, stats)
        write_manifest(tmp, plan, stats)
    return stats


def run(plan: Plan, out_dir: Path, device: torch.device, on_progress: Callable[[int], None] | None = None,
        measure_retention: bool = True) -> EngineStats:
    """Write every file of ``plan`` into the existing folder ``out_dir``.

    Args:
        plan (Plan): what to write.
        out_dir (Path): an existing (temporary) folder.
        device (torch.device): where the float32 math runs.
        on_progress (Callable[[int], None] | None): called with the bytes of each tensor (or module) written.
        measure_retention (bool): sample how much of each edit survives rounding. Default: True.
    """
    stats = EngineStats()
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    threads = torch.get_num_threads()
    # The writer thread needs a core too: an OpenMP team that oversubscribes the CPU spins at its barriers
    # and runs ~7x slower (measured on 2 cores), so the math gets the cores the I/O leaves.
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    buffers = _Buffers()
    if any(not planned.computed for planned in plan.files):
        _reuse_freed_blocks()
    try:
        with ThreadPoolExecutor(1, "adaptool-write", initializer=lower_priority) as pool:
            for planned in plan.files:
                path = out_dir / planned.name
                path.parent.mkdir(parents=True, exist_ok=True)
                if planned.computed:
                    _write_computed(planned, path, device, stats, on_progress, threads)
                else:
                    _write_streamed(planned, path, device, stats, pool, on_progress, measure_retention, buffers)
    finally:
        buffers.release()
        torch.set_num_threads(threads)
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_bytes = peak_rss_bytes()
    if device.type == "cuda":
        stats.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    if stats.retention:
        stats.delta_retention = sum(r for _, r in stats.retention) / len(stats.retention)
        stats.worst_retention = min(stats.retention, key=lambda x: x[1])
    return stats


def _write_streamed(planned: PlannedFile, path: Path, device, stats: EngineStats, pool, on_progress,
                    measure_retention: bool, buffers: "_Buffers") -> None:
    """Header first, then each base tensor copied or streamed through its edits. A reader thread reads the row blocks
    ahead (:class:`_ReadAhead`), this thread computes, the writer thread takes the blocks (at most ``WRITE_QUEUE``
    behind) into the file's buffers, which its hasher and disk threads hash and write: all of it overlaps."""
    writes: deque = deque()

    def submit(fn, *args):
        writes.append(pool.submit(fn, *args))
        while len(writes) > WRITE_QUEUE:
            writes.popleft().result()

    handles: dict[Path, object] = {}
    reader = None
    writer = ShardWriter(path, [t.out for t in planned.tensors], planned.header_metadata())
    try:
        for f in dict.fromkeys(t.source.file for t in planned.tensors):
            handles[f] = open_regular(f)
        reader = _ReadAhead([(handles[t.source.file], t.source, a, b) for t in planned.tensors
                             if not t.is_copy and not t.resized for a, b in _row_blocks(t.source, t.edits, device)],
                            buffers)
        for i, t in enumerate(planned.tensors):
            info = t.source
            if i + 1 < len(planned.tensors) and not planned.tensors[i + 1].resized:  # a resize reads nothing
                prefetch(handles[planned.tensors[i + 1].source.file], planned.tensors[i + 1].source)
            writer.begin_tensor(info.name)
            if t.is_copy:
                submit(writer.copy_part, handles[info.file], info.start, info.nbytes)
            else:
                _stream_tensor(reader, handles[info.file], info, t.out, list(t.edits), device, stats,
                               measure_retention, lambda block: submit(writer.write_part, block), buffers)
            stats.tensors_total += 1
            stats.bytes_written += t.out.nbytes
            if on_progress:
                submit(on_progress, t.out.nbytes)
        while writes:
            writes.popleft().result()
        writer.close()
    except BaseException:
        while writes:  # let queued writes finish before the file goes away
            try:
                writes.popleft().result()
            except Exception:
                pass
        writer.abort()
        raise
    finally:
        if reader is not None:
            reader.close()
        for fh in handles.values():
            fh.close()
    stats.file_digests[planned.name] = (writer.size, writer.sha256)


def _write_computed(planned: PlannedFile, path: Path, device, stats: EngineStats, on_progress, cores: int) -> None:
    """Produce every computed tensor on ``device`` (``cores``: the CPU threads it may use; nothing is written
    meanwhile), check it, then write the file sorted by name."""
    tensors: dict[str, torch.Tensor] = {}
    high_water = peak_rss_bytes()
    for c, (produced, energy, nbytes) in _produced(planned.computed, device, cores):
        if energy is not None:
            stats.energies.append((c.label, energy))
        tensors.update(produced)
        if on_progress:
            on_progress(nbytes)
        if peak_rss_bytes() > high_water:  # only when the heap grew: a trim per module costs seconds on 560
            _release_freed_memory()
            high_water = peak_rss_bytes()
    names = sorted(tensors)
    writer = ShardWriter(path, [OutputTensor(n, dtype_code(tensors[n].dtype), tuple(tensors[n].shape)) for n in names],
                         planned.header_metadata())
    try:
        for n in names:
            writer.write_tensor(n, tensors[n])
        writer.close()
    except BaseException:
        writer.abort()
        raise
    stats.file_digests[planned.name] = (writer.size, writer.sha256)
    stats.written.update({n: tuple(tensors[n].shape) for n in names})
    stats.tensors_total += len(names)
    stats.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())


def _produced(computed: list[Computed], device, cores: int):
    """``(item, (tensors on the CPU, energy, bytes))`` for each computed item, in order. On a CPU, items marked
    ``concurrent`` run on a thread per core with one BLAS thread each (the others in this thread, in their turn):
    small matrix products and LAPACK calls scale better across items than inside one, no OpenMP team spins
    against another busy thread (a digest being computed), and a product's bits do not depend on the core count."""
    if device.type != "cpu" or cores <= 1 or sum(c.concurrent for c in computed) < 2:
        for c in computed:
            yield c, _checked(c, device)
        return
    threads = torch.get_num_threads()
    # a thread's BLAS/OpenMP thread count is its own: set it in each worker too
    pool = ThreadPoolExecutor(cores, thread_name_prefix="adaptool-compute", initializer=torch.set_num_threads,
                              initargs=(1,))
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(_checked, c, device) if c.concurrent else None for c in computed]
        for c, future in zip(computed, futures):
            yield c, (future.result() if future is not None else _checked(c, device))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error or Ctrl-C: the queued items never start
        torch.set_num_threads(threads)


def _checked(c: Computed, device) -> tuple[dict, float | None, int]:
    """One computed item produced, converted to its dtype, checked finite and moved to the CPU."""
    produced, energy = c.produce(device)
    out, nbytes = {}, 0
    for name, t in produced.items():
        if c.dtype is not None:
            t = t.to(c.dtype)
        if t.is_floating_point() and not _all_finite(t):
            raise AdaptoolError(f"merging {c.label} produced NaN or Inf", "check the adapters and weights")
        out[name] = t.cpu().contiguous()
        nbytes += t.numel() * t.element_size()
    return out, energy, nbytes


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; elsewhere nothing). Between computed modules
    the big temporaries are freed, but the small results kept for writing pin the heap around them: without this
    RSS grows by megabytes per module (extract: +290 MB over a 16-layer model)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _stream_tensor(reader: "_ReadAhead", src, info, out, eds, device, stats: EngineStats, measure_retention: bool,
                   emit, buffers: "_Buffers") -> None:
    """Read, edit in float32, round once and emit one tensor, in row blocks that stay in cache (see
    :func:`_row_blocks`): one pass per block, the finite check and the rounding statistics included, in buffers
    reused from block to block. Each emitted block is a fresh CPU tensor in the output dtype.
    """
    out_dtype = torch_dtype(out.dtype)
    if eds:
        stats.tensors_changed += 1
    if tuple(out.shape) != tuple(info.shape):
        return _stream_replacement(info.name, out, eds, device, emit)
    fns = [e.prepare(device) for e in eds]
    stats.energies += [kept for e in eds if (kept := getattr(e, "energy_kept", None))]
    lost2 = intended2 = 0.0
    for i, (start, stop) in enumerate(_row_blocks(info, eds, device)):
        with reader.block(src, info, start, stop) as raw:
            if not fns:
                emit(_converted(info.name, raw, eds, out_dtype, device))
                continue
            w0 = buffers.take("base", raw.numel(), torch.float32, device).view(raw.shape).copy_(_on(raw, device))
        w = w0
        for fn in fns:
            w = fn(w, w0, start, stop)
        rounded = w.to(out_dtype)
        if not _all_finite(rounded):  # what is written: the rounding itself may overflow (float16)
            _blame_non_finite(info.name, w0, eds, out_dtype, w)
        if measure_retention and out_dtype != torch.float32 and i % RETENTION_SAMPLE == 0:
            lost, intended = _rounding_loss(w0, w, rounded, buffers.take("scratch", w.numel(), torch.float32, device))
            lost2, intended2 = lost2 + lost, intended2 + intended
        emit(_fresh_cpu(rounded, w0))
    if intended2 > 0:
        stats.retention.append((info.name, max(0.0, 1.0 - (lost2 / intended2) ** 0.5)))


def _row_blocks(info, eds, device) -> list[tuple[int, int]]:
    """The ``(start, stop)`` row blocks a tensor is streamed in: ~``BLOCK_ELEMS`` elements each, so the float32
    math stays in cache; one block of the whole tensor where an edit is not row-wise (DoRA on column-normalised
    layouts, row replacement) or the tensor is a scalar; none where it has no rows."""
    n_rows = info.shape[0] if info.shape else 1
    if not n_rows:
        return []
    if not (all(e.row_wise for e in eds) and info.shape):
        return [(0, n_rows)]
    block = max(1, (BLOCK_ELEMS_CUDA if device.type == "cuda" else BLOCK_ELEMS) // max(1, info.numel // max(1, n_rows)))
    return [(start, min(n_rows, start + block)) for start in range(0, n_rows, block)]


class _ReadAhead:
    """Reads the row blocks a file's streamed tensors will ask for, in that order, up to ``READ_AHEAD`` blocks ahead
    of the math, on a thread of its own, into a ring of reused buffers: while one block is computed the next ones
    are copied out of the page cache (or wait for the disk) on the other core. A block over ``READ_AHEAD_MAX``
    bytes (a tensor edited whole) is read when asked for, into a buffer of the engine's.

    Args:
        jobs (list): ``(open file, TensorInfo, start row, stop row)`` in the order :meth:`block` will ask for them.
        buffers (_Buffers): where the ring and the big blocks' buffer come from.
    """

    def __init__(self, jobs: list[tuple], buffers: "_Buffers"):
        self._buffers = buffers
        self._jobs = [j for j in jobs if _job_bytes(j) <= READ_AHEAD_MAX]
        self._next = 0
        self._ready: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        size = max((_job_bytes(j) for j in self._jobs), default=0)
        for k in range(READ_AHEAD + 1 if self._jobs else 0):
            self._free.put(buffers.take(f"read-ahead-{k}", size, torch.uint8))
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="adaptool-read", daemon=True) if self._jobs else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        for src, info, start, stop in self._jobs:
            buf = self._free.get()
            if buf is None or self._stop:
                return
            try:
                self._ready.put((read_block(src, info, start, stop, buf), buf, None))
            except BaseException as e:  # raised where the block is asked for
                self._ready.put((None, buf, e))
                return

    @contextmanager
    def block(self, src, info, start: int, stop: int):
        """Rows ``[start, stop)`` of ``info`` as a tensor viewing a buffer that is reused once the block exits."""
        job = self._jobs[self._next] if self._next < len(self._jobs) else None
        if job is None or job[1] is not info or job[2] != start:
            yield read_block(src, info, start, stop, self._buffers.take("read", _job_bytes((src, info, start, stop)),
                                                                        torch.uint8))
            return
        self._next += 1
        raw, buf, error = self._ready.get()
        try:
            if error is not None:
                raise error
            yield raw
        finally:
            self._free.put(buf)

    def close(self) -> None:
        """Stop reading ahead (an error, or the file is done) and wait for the thread."""
        self._stop = True
        if self._thread is not None:
            self._free.put(None)
            self._thread.join()


def _job_bytes(job) -> int:
    _, info, start, stop = job
    return (stop - start) * (info.nbytes // max(1, info.shape[0])) if info.shape else info.nbytes


def _converted(name: str, raw, eds, out_dtype, device):
    """An unedited block in another dtype (through float32 on a GPU), checked finite, as a fresh CPU tensor."""
    converted = _on(raw, device).to(torch.float32).to(out_dtype) if device.type != "cpu" else raw.to(out_dtype)
    if converted.is_floating_point() and not _all_finite(converted):
        _blame_non_finite(name, raw, eds, out_dtype)
    return _fresh_cpu(converted, raw)


def _on(raw, device):
    """``raw`` moved to ``device`` in its own dtype: a copy to a GPU with a dtype change would convert on the CPU
    first and send twice the bytes of a bfloat16 block."""
    return raw if device.type == "cpu" else raw.to(device)


def _fresh_cpu(block, reused):
    """``block`` on the CPU, copied if it still lies in the buffer ``reused`` (the next block overwrites it)."""
    block = block.cpu()
    if block.untyped_storage().data_ptr() == reused.untyped_storage().data_ptr():
        block = block.clone()
    return block


def _rounding_loss(w0, w, rounded, scratch) -> tuple[float, float]:
    """(‖rounded − w‖², ‖w − w0‖²) of one block: what rounding erased of the edit, and the edit. Two elementwise
    passes into one scratch buffer and two dot products (no temporaries: a fresh 8 MB tensor costs more in page
    faults than the arithmetic)."""
    s = scratch.view(w.shape)
    flat = s.view(-1)
    torch.sub(w, w0, out=s)
    intended = float(torch.dot(flat, flat))
    s.copy_(rounded).sub_(w)
    return float(torch.dot(flat, flat)), intended


class _Buffers:
    """Flat buffers reused from block to block (and tensor to tensor), by role, grown when a block needs more. A
    buffer over ``KEEP_MAX`` bytes (a tensor edited whole) is not kept: freed with its tensor, memory stays flat."""

    def __init__(self):
        self._held: dict[tuple, torch.Tensor] = {}

    def take(self, role: str, n: int, dtype, device=None) -> torch.Tensor:
        """The first ``max(n, 1)`` elements of the ``role`` buffer of ``dtype`` on ``device`` (CPU by default)."""
        key = (role, dtype, str(device or "cpu"))
        held = self._held.get(key)
        if held is None or held.numel() < n:
            self._held.pop(key, None)
            held = torch.empty(max(n, 1), dtype=dtype, device=device or "cpu")
            if held.numel() * held.element_size() <= KEEP_MAX:
                self._held[key] = held
        return held[:max(n, 1)]

    def release(self) -> None:
        self._held.clear()


def _reuse_freed_blocks() -> None:
    """Keep freed row blocks in the heap for the next ones (glibc; elsewhere nothing). By default glibc maps every
    block above its adaptive threshold afresh and unmaps it when freed, so each of the few fresh tensors of every
    block (the edit's Δ, the rounded rows) page-faults its megabytes in again: 1.1 million faults, over a second of
    system time, for a 1.6 GB unload. Blocks up to 32 MB (the adaptive threshold's own ceiling) now come from the
    heap, and up to 32 MB may stay free at its top; it applies to the rest of the process (glibc has no way back to
    the adaptive threshold), which costs at most those 32 MB."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 32 << 20)
    except (AttributeError, OSError):
        pass


def _stream_replacement(name: str, out, eds, device, emit) -> None:
    """A tensor replaced whole by one of another shape (a resized vocabulary; the plan makes the replacement its
    only edit): its rows rounded once and emitted in blocks, nothing of the base tensor read."""
    out_dtype = torch_dtype(out.dtype)
    fns = [e.prepare(device) for e in eds]
    n_rows = out.shape[0]
    block = max(1, (BLOCK_ELEMS_CUDA if device.type == "cuda" else BLOCK_ELEMS) // max(1, math.prod(out.shape[1:])))
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        w = None
        for fn in fns:
            w = fn(w, None, start, stop)
        rounded = w.to(out_dtype)
        if not _all_finite(rounded):
            _blame_non_finite(name, None, eds, out_dtype, w)
        emit(rounded.cpu())


def _all_finite(x) -> bool:
    """No NaN/Inf in ``x``: its min and max are finite exactly when every element is (both propagate NaN); one
    pass with no temporary, 3x faster than a float32 sum of bf16 and 50x faster than ``isfinite(x).all()``."""
    return all_finite(x)


def _blame_non_finite(name: str, w0, eds, out_dtype, w=None) -> None:
    if w0 is not None and not bool(torch.isfinite(w0).all()):
        raise AdaptoolError(f"base tensor {name} contains NaN or Inf", "repair the base checkpoint")
    sources = ", ".join(sorted({e.source for e in eds}))
    if w is not None and not bool(torch.isfinite(w).all()):
        raise AdaptoolError(f"merging into {name} produced NaN or Inf (adapter: {sources})",
                            "check the adapter for NaN/Inf or overflowing values")
    dtype = str(out_dtype).replace("torch.", "")
    raise AdaptoolError(f"tensor {name} overflows {dtype}: values beyond its range would be written as Inf",
                        "use --dtype bfloat16 or --dtype float32")
