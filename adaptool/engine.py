"""The engine: runs any :class:`~adaptool.plan.Plan` into a folder, and is the only code that knows about
devices, threads, memory accounting and progress.

Base tensors stream: for every planned file the header is written first (the plan fixes every name, dtype
and shape), then each tensor is either copied byte-for-byte by the kernel (untouched, same dtype) or read in
row blocks, edited in float32 on the compute device, rounded once, and appended by a writer thread, so disk
and math overlap while at most a handful of blocks are in memory (a tensor replaced whole by one of another
shape, a resized vocabulary, comes from the replacement alone). Computed tensors (merged factors) are
produced on the device, checked, moved to the CPU and written sorted by name. Nothing written is NaN/Inf.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import dtype_code, open_regular, prefetch, read_block, torch_dtype
from adaptool.io.weights_buffer import all_finite
from adaptool.io.writer import OutputTensor, ShardWriter
from adaptool.output.target import AtomicDir
from adaptool.plan import Computed, Plan, PlannedFile

WRITE_QUEUE = 4
BLOCK_ELEMS = 1 << 21  # ~8 MB of float32 per row block: the math stays in cache on a CPU
BLOCK_ELEMS_CUDA = 1 << 28
RETENTION_SAMPLE = 4  # measure rounding loss on every 4th block


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
    sink's files added, then the folder swapped into place (see :class:`~adaptool.output.target.AtomicDir`)."""
    if on_start:
        on_start(plan.items, plan.nbytes_estimate)
    with AtomicDir(target, force, plan.inputs) as tmp:
        stats = run(plan, tmp, device, on_progress)
        plan.sink.finish(tmp, plan, stats)
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
    try:
        with ThreadPoolExecutor(1, "adaptool-write") as pool:
            for planned in plan.files:
                path = out_dir / planned.name
                path.parent.mkdir(parents=True, exist_ok=True)
                if planned.computed:
                    _write_computed(planned, path, device, stats, on_progress, threads)
                else:
                    _write_streamed(planned, path, device, stats, pool, on_progress, measure_retention)
    finally:
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
                    measure_retention: bool) -> None:
    """Header first, then each base tensor copied by the kernel or streamed through its edits."""
    writes: deque = deque()

    def submit(fn, *args):
        writes.append(pool.submit(fn, *args))
        while len(writes) > WRITE_QUEUE:
            writes.popleft().result()

    handles: dict[Path, object] = {}
    writer = ShardWriter(path, [t.out for t in planned.tensors], planned.header_metadata())
    try:
        for i, t in enumerate(planned.tensors):
            info = t.source
            src = handles.get(info.file) or handles.setdefault(info.file, open_regular(info.file))
            if i + 1 < len(planned.tensors) and planned.tensors[i + 1].source.file == info.file:
                prefetch(src, planned.tensors[i + 1].source)
            writer.begin_tensor(info.name)
            if t.is_copy:
                submit(writer.copy_part, src, info.start, info.nbytes)
            else:
                _stream_tensor(src, info, t.out, list(t.edits), device, stats, measure_retention,
                               lambda block: submit(writer.write_part, block))
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
        for fh in handles.values():
            fh.close()


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


def _stream_tensor(src, info, out, eds, device, stats: EngineStats, measure_retention: bool, emit) -> None:
    """Read, edit in float32, round once and emit one tensor, in row blocks that stay in cache.

    Edits that are not row-wise (DoRA on column-normalised layouts, row replacement) get the whole tensor
    as one block. Each emitted block is a fresh CPU tensor in the output dtype.
    """
    out_dtype = torch_dtype(out.dtype)
    if eds:
        stats.tensors_changed += 1
    if tuple(out.shape) != tuple(info.shape):
        return _stream_replacement(info.name, out, eds, device, emit)
    fns = [e.prepare(device) for e in eds]
    stats.energies += [kept for e in eds if (kept := getattr(e, "energy_kept", None))]
    n_rows = info.shape[0] if info.shape else 1
    row_elems = max(1, info.numel // max(1, n_rows))
    if all(e.row_wise for e in eds) and info.shape:
        block = max(1, (BLOCK_ELEMS_CUDA if device.type == "cuda" else BLOCK_ELEMS) // row_elems)
    else:
        block = n_rows
    lost2 = intended2 = 0.0
    buf = torch.empty(min(n_rows, block) * (info.nbytes // max(1, n_rows)) or 1, dtype=torch.uint8)
    for i, start in enumerate(range(0, n_rows, block)):
        stop = min(n_rows, start + block)
        raw = read_block(src, info, start, stop, buf) if info.shape else read_block(src, info, 0, 1)
        if device.type == "cpu" and raw.dtype == torch.float32:
            raw = raw.clone()  # the float32 "conversion" below would alias the reused read buffer
        if not fns:
            converted = raw.to(device=device, dtype=torch.float32).to(out_dtype) if device.type != "cpu" else raw.to(out_dtype)
            if converted.is_floating_point() and not _all_finite(converted):
                _blame_non_finite(info.name, raw, eds, out_dtype)
            emit(converted.cpu())
            continue
        w0 = raw.to(device=device, dtype=torch.float32)
        w = w0
        for fn in fns:
            w = fn(w, w0, start, stop)
        rounded = w.to(out_dtype)
        if not _all_finite(rounded):  # what is written: the rounding itself may overflow (float16)
            _blame_non_finite(info.name, w0, eds, out_dtype, w)
        if measure_retention and out_dtype != torch.float32 and i % RETENTION_SAMPLE == 0:
            lost2 += float(torch.linalg.vector_norm(rounded.to(torch.float32) - w)) ** 2
            intended2 += float(torch.linalg.vector_norm(w - w0)) ** 2
        emit(rounded.cpu())
    if intended2 > 0:
        stats.retention.append((info.name, max(0.0, 1.0 - (lost2 / intended2) ** 0.5)))


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
