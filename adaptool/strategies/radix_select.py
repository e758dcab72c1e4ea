"""The exact k-th largest ``|value|`` of a tensor given block by block, in two cheap passes.

Pass 1 rounds each block's magnitudes to bfloat16 (round to nearest is monotone, so every bfloat16 value is a
contiguous range of float32 values: a bucket) and histograms the 16-bit patterns; the histogram names the
bucket that holds the k-th largest and how many values lie above it. Pass 2 picks that bucket's values out
(a byte mask read eight bytes at a time, so the few hits cost little: ~4x faster than ``masked_select``) and
``kthvalue`` finishes among them. Per 2M values on one core: ~2 ms for pass 1 (most of it ``bincount``),
~1 ms for pass 2, against ~40 ms for ``torch.kthvalue`` on the whole tensor.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from adaptool.strategies.workspace import Workspace

_BINS = 1 << 15  # bfloat16 patterns of non-negative values (the sign bit is 0), NaN included


def kth_largest_abs(t: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest ``|t|`` (1 <= k <= numel), exactly, as a 0-dim float32 tensor."""
    x = t.detach().to(torch.float32).contiguous()
    return kth_largest_abs_blocks(lambda: [x], k)


def kth_largest_abs_blocks(blocks: Callable[[], Iterable[torch.Tensor]], k: int,
                           workspace: Workspace | None = None) -> torch.Tensor:
    """:func:`kth_largest_abs` of a tensor given as ``blocks()``: an iterable of contiguous float32 blocks of
    its values (signs do not matter), called twice, each time yielding the same values.

    Args:
        blocks: returns the blocks (any shapes; together, every value once).
        k (int): 1 <= k <= the number of values.
        workspace (Workspace | None): where the per-block buffers come from (the first pass's bucket patterns
            are kept there for the second, one buffer per block). Default: fresh ones.
    """
    ws = workspace or Workspace(0, helper=False)
    hist, kept = None, []
    for j, x in enumerate(blocks()):
        ids = _bucket_ids(x, ws, f"radix.ids{j}")
        kept.append(ids)
        h = torch.bincount(ids.view(-1), minlength=_BINS)
        hist = h if hist is None else hist.add_(h)
    top_down = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(top_down, k))
    above = int(top_down[idx - 1]) if idx > 0 else 0
    wanted = _BINS - 1 - idx
    parts = []
    for x, ids in zip(blocks(), kept):
        hit = ws.take("radix.hit", ids.shape, torch.bool, x.device)
        torch.eq(ids, wanted, out=hit)  # into bool: ~2x faster than into uint8 (no cast)
        parts.append(select_where(x, hit))
    bucket = torch.cat(parts).abs_()
    return torch.kthvalue(bucket, bucket.numel() - (k - above) + 1).values


def _bucket_ids(x: torch.Tensor, ws: Workspace, name: str) -> torch.Tensor:
    """bfloat16 patterns of ``|x|`` as int16 (all >= 0): ordered like the magnitudes. The sign bit is cleared by
    a bitwise and (the bits of ``abs``, ~2x faster)."""
    ids = ws.take(name, x.shape, torch.bfloat16, x.device)
    ids.copy_(x)
    return ids.view(torch.int16).bitwise_and_(0x7FFF)


def select_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[mask]`` (flattened, in order) for a bool (or uint8 0/1) ``mask`` with few ones: the mask is scanned as
    int64 words, and only the words holding a one are gathered and looked at (~4x faster than ``masked_select``)."""
    flat, m = x.reshape(-1), mask.reshape(-1)
    if m.storage_offset() % 8:
        return flat[m.view(torch.bool)]
    whole = (m.numel() // 8) * 8
    parts = [flat[:0]]
    if whole:
        words = m[:whole].view(torch.int64)
        hit = words.nonzero().squeeze(1)
        values = torch.index_select(flat[:whole].view(-1, 8), 0, hit).view(-1)
        parts.append(values[torch.index_select(words, 0, hit).view(torch.uint8).view(torch.bool)])
    if whole < m.numel():
        parts.append(flat[whole:][m[whole:].view(torch.bool)])
    return torch.cat(parts)
