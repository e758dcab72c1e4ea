"""The streaming engine: base tensors in, edited tensors out, one at a time.

For every shard of the base, the output shard's header is written first (the plan fixes every name, dtype
and shape), then each tensor is either copied byte-for-byte by the kernel (untouched, same dtype) or read,
edited in float32 on the compute device, rounded once, and appended. A reader thread keeps the next tensor
ready and a writer thread drains finished ones, so disk and math overlap while at most a handful of tensors
are in memory. Nothing else in adaptool knows about threads or devices.
"""

from __future__ import annotations

import json
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
from adaptool.io.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from adaptool.io.safetensors_file import FLOAT_CODES, dtype_code, open_regular, prefetch, read_block
from adaptool.io.writer import OutputTensor, ShardWriter

WRITE_QUEUE = 4
BLOCK_ELEMS = 1 << 21  # ~8 MB of float32 per row block: the math stays in cache on a CPU
BLOCK_ELEMS_CUDA = 1 << 28
RETENTION_SAMPLE = 4  # measure rounding loss on every 4th block


@dataclass
class EngineStats:
    tensors_total: int = 0
    tensors_changed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    delta_retention: float | None = None  # share of the intended change that survived rounding (mean)
    worst_retention: tuple[str, float] | None = None
    _retention: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        if self.worst_retention:
            d["worst_retention"] = {"tensor": self.worst_retention[0], "retention": self.worst_retention[1]}
        return d


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def output_layout(base: Checkpoint, out_dtype: torch.dtype | None) -> list[tuple[str, list[OutputTensor]]]:
    """Output shard file names with their tensors (base order, the output dtype applied to float tensors).

    A sharded base keeps its layout: each name is the shard's path relative to the base folder, as its index
    gives it (``sub/model-00001-of-00002.safetensors`` stays in ``sub/``).
    """
    code = dtype_code(out_dtype) if out_dtype is not None else None
    shards = []
    for shard in base.shards:
        name = base.shard_name(shard) if base.sharded else SINGLE_NAME
        tensors = [
            OutputTensor(t.name, code if (code and t.dtype in FLOAT_CODES) else t.dtype, t.shape)
            for t in base.shard_tensors(shard)
        ]
        shards.append((name, tensors))
    return shards


def run(
    base: Checkpoint,
    edits: dict[str, list],
    out_dir: Path,
    out_dtype: torch.dtype | None,
    device: torch.device,
    metadata: dict[str, str],
    on_progress: Callable[[int], None] | None = None,
    measure_retention: bool = True,
) -> EngineStats:
    """Write the edited checkpoint into ``out_dir`` (shards + index when the base was sharded).

    Args:
        base (Checkpoint): the base model.
        edits (dict[str, list]): base tensor name -> edits, applied in order.
        out_dir (Path): an existing (temporary) folder.
        out_dtype (torch.dtype | None): dtype of every float tensor; None keeps each tensor's.
        device (torch.device): where the float32 math runs.
        metadata (dict[str, str]): provenance written into every shard's header.
        on_progress (Callable[[int], None] | None): called with the bytes of each tensor written.
    """
    check_editable(base, edits)
    stats = EngineStats()
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    layout = output_layout(base, out_dtype)
    stats.tensors_total = sum(len(ts) for _, ts in layout)
    threads = torch.get_num_threads()
    # The writer thread needs a core too: an OpenMP team that oversubscribes the CPU spins at its barriers
    # and runs ~7x slower (measured on 2 cores), so the math gets the cores the I/O leaves.
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    handles: dict[Path, object] = {}
    writes: deque = deque()
    try:
        with ThreadPoolExecutor(1, "adaptool-write") as pool:
            def submit(fn, *args):
                writes.append(pool.submit(fn, *args))
                while len(writes) > WRITE_QUEUE:
                    writes.popleft().result()

            for (name, tensors), shard in zip(layout, base.shards):
                src = handles.get(shard) or handles.setdefault(shard, open_regular(shard))
                (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
                writer = ShardWriter(out_dir / name, tensors, metadata)
                try:
                    for i, out in enumerate(tensors):
                        info = base.tensors[out.name]
                        if i + 1 < len(tensors):
                            prefetch(src, base.tensors[tensors[i + 1].name])
                        eds = edits.get(out.name, [])
                        if not eds and out.dtype == info.dtype:
                            writer.begin_tensor(out.name)
                            submit(writer.copy_part, src, info.start, info.nbytes)
                        else:
                            writer.begin_tensor(out.name)
                            _stream_tensor(src, info, out, eds, device, stats, measure_retention,
                                           lambda block: submit(writer.write_part, block))
                        stats.bytes_written += out.nbytes
                        if on_progress:
                            submit(on_progress, out.nbytes)
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
        torch.set_num_threads(threads)
        for fh in handles.values():
            fh.close()

    if base.sharded:
        _write_index(out_dir, layout, metadata)
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_bytes = peak_rss_bytes()
    if device.type == "cuda":
        stats.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    if stats._retention:
        stats.delta_retention = sum(r for _, r in stats._retention) / len(stats._retention)
        stats.worst_retention = min(stats._retention, key=lambda x: x[1])
    return stats


def _stream_tensor(src, info, out, eds, device, stats: EngineStats, measure_retention: bool, emit) -> None:
    """Read, edit in float32, round once and emit one tensor, in row blocks that stay in cache.

    Edits that are not row-wise (DoRA on column-normalised layouts, row replacement) get the whole tensor
    as one block. Each emitted block is a fresh CPU tensor in the output dtype.
    """
    out_dtype = _torch_dtype(out.dtype)
    if eds:
        stats.tensors_changed += 1
    fns = [e.prepare(device) for e in eds]
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
        stats._retention.append((info.name, max(0.0, 1.0 - (lost2 / intended2) ** 0.5)))


def _torch_dtype(code: str):
    from adaptool.io.safetensors_file import torch_dtype

    return torch_dtype(code)


def _all_finite(x) -> bool:
    """No NaN/Inf in ``x``: one float32 sum first (NaN/Inf whenever an element is), the full check only when the
    sum is not finite (it may overflow on its own)."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def _blame_non_finite(name: str, w0, eds, out_dtype, w=None) -> None:
    if not bool(torch.isfinite(w0).all()):
        raise AdaptoolError(f"base tensor {name} contains NaN or Inf", "repair the base checkpoint")
    sources = ", ".join(sorted({e.source for e in eds}))
    if w is not None and not bool(torch.isfinite(w).all()):
        raise AdaptoolError(f"merging into {name} produced NaN or Inf (adapter: {sources})",
                            "check the adapter for NaN/Inf or overflowing values")
    dtype = str(out_dtype).replace("torch.", "")
    raise AdaptoolError(f"tensor {name} overflows {dtype}: values beyond its range would be written as Inf",
                        "use --dtype bfloat16 or --dtype float32")


def check_editable(base: Checkpoint, edits: dict) -> None:
    """Refuse edits to tensors stored as float8 or integers (quantised weights), before anything is written."""
    for name in edits:
        info = base.tensors.get(name)
        if info is not None and info.dtype not in FLOAT_CODES:
            raise AdaptoolError(f"quantised base {base.root}: tensor {name} is stored as {info.dtype}, not supported",
                                "unload into the unquantised (bf16) base")


def _write_index(out_dir: Path, layout, metadata: dict[str, str]) -> None:
    weight_map, total = {}, 0
    for name, tensors in layout:
        for t in tensors:
            weight_map[t.name] = name
            total += t.nbytes
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
