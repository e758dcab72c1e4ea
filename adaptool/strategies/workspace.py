"""What the block-wise merge of one plan's modules shares: reusable buffers, and one helper thread.

Buffers: a fresh 8 MB float32 buffer costs ~3 ms of page faults the first time it is written on this kind of
machine, more than the arithmetic done in it; a merge folded into a base runs a dozen working buffers per block
and keeps each adapter's ΔW (46 MB per adapter for a 5632 x 2048 MLP weight) from one pass to the next. One
:class:`Workspace` is made per plan and handed to every module, so the buffers are faulted in once per run.
Only CPU buffers are kept (CUDA's caching allocator already reuses memory), each at most ``limit_bytes``;
larger ones are allocated fresh. A buffer taken under a name stays valid until the same name is
taken again, so nothing taken here may leave the module that took it (a result handed to the engine is a tensor
of its own); names taken with an ``owner`` are shared by every thread (a module's cached ΔW), the others are per
thread (the working buffers of a tile).

Helper thread: where the engine runs the maths on one CPU thread (it leaves the other core of a 2-core
machine to its writer), independent pieces of a module — each adapter's threshold, DARE mask or ΔW block, each
tile of a block — are shared out between the calling thread and one helper with the same single-thread torch
setting, so every value is computed by the same operations as on one thread, bit for bit the same (ties into
the 1.6 GB benchmark base: 7.4 s instead of 9.7 s end to end).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_LIMIT = 512 << 20  # bytes kept per buffer (a 70B MLP's float32 ΔW, 940 MB, is allocated fresh)


class Workspace:
    """Named, reusable tensors (contents undefined when taken) and :meth:`map` over a helper thread.

    Args:
        limit_bytes (int): the largest buffer kept for reuse; larger ones are allocated fresh each time. 0 keeps
            nothing. Default: :data:`DEFAULT_LIMIT`.
        helper (bool): allow the helper thread (see the module docstring). Default: True.
    """

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT, helper: bool = True):
        self.limit_bytes = limit_bytes
        self.helper = helper
        self._buffers: dict[tuple, torch.Tensor] = {}  # (name,) shared, (thread, name) per thread -> flat buffer
        self._views: dict[tuple, torch.Tensor] = {}  # (buffer key, shape, dtype) -> its view
        self._owners: dict[tuple, object] = {}
        self._lock = threading.Lock()  # taken only where a view is made; handing one out again is a look-up
        self._pool: ThreadPoolExecutor | None = None
        self._cores = os.cpu_count() or 1

    def keeps(self, nbytes: int, device) -> bool:
        """Whether a buffer of ``nbytes`` on ``device`` would be kept for reuse."""
        return getattr(device, "type", device) == "cpu" and nbytes <= self.limit_bytes

    def take(self, name: str, shape, dtype: torch.dtype, device, owner: object = None) -> torch.Tensor:
        """A contiguous ``shape`` tensor starting at an aligned address (the start of its buffer); ``owner``
        marks who took it last (see :meth:`held_by`) and makes the name shared by all threads. Called a dozen
        times per tile, so it is kept to a few dictionary look-ups (a view once made is handed out again)."""
        shape = tuple(shape)
        numel = math.prod(shape)
        if not self.keeps(numel * dtype.itemsize, device):
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name,) if owner is not None else (threading.get_ident(), name)
        if owner is not None:
            self._owners[key] = owner
        view = self._views.get((key, shape, dtype))
        if view is not None:
            return view
        with self._lock:  # the helper and the caller may both be here (their first tiles): the dicts change
            buf = self._buffers.get(key)
            if buf is None or buf.dtype != dtype or buf.numel() < numel:
                self._buffers.pop(key, None)  # let the old one go before the new one is faulted in
                self._views = {k: v for k, v in self._views.items() if k[0] != key}
                buf = self._buffers[key] = torch.empty(max(numel, 1), dtype=dtype)
            view = self._views[(key, shape, dtype)] = buf[:numel].view(shape)
        return view

    def held_by(self, name: str, owner: object) -> bool:
        """Whether the shared buffer ``name`` was last taken by ``owner``."""
        return self._owners.get((name,)) is owner

    def map(self, fn: Callable[[T], R], items: Iterable[T], device) -> list[R]:
        """``[fn(x) for x in items]``, the items shared out between this thread and the helper when it may run
        (each takes the next item left, so a helper kept off its core by other work takes fewer); ``fn`` must
        only read shared state and write disjoint outputs."""
        items = list(items)
        if len(items) < 2 or not self._helps(device):
            return [fn(x) for x in items]
        results: list = [None] * len(items)
        left = iter(range(len(items)))
        lock = threading.Lock()

        def work() -> None:
            nonlocal left
            while True:
                with lock:
                    i = next(left, None)
                if i is None:
                    return
                try:
                    results[i] = fn(items[i])
                except BaseException:
                    with lock:
                        left = iter(())  # the other thread takes nothing more
                    raise

        helper = self._helper_pool().submit(work)
        try:
            work()
        finally:
            helper.exception()  # never leave the helper working on buffers the caller moves on from
        helper.result()
        return results

    def _helps(self, device) -> bool:
        """The helper runs where the maths is on the CPU with one torch thread and another core is there."""
        return (self.helper and getattr(device, "type", device) == "cpu" and self._cores >= 2
                and torch.get_num_threads() == 1)

    def _helper_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="adaptool-merge",
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self._pool

    def close(self) -> None:
        """Stop the helper thread (buffers go with the object)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
