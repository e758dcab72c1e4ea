"""Edits: what an adapter does to one base tensor.

An edit is prepared once per tensor (its adapter tensors loaded on the compute device) into a function
``fn(w, w0, start, stop)``: given rows ``[start, stop)`` of the tensor so far and of the untouched base (both
float32 on the device) it returns those rows edited. Row-wise edits let the engine work through a big
weight in cache-sized blocks; an edit whose rows depend on each other (``row_wise = False``) is called once
with the whole tensor. The engine applies a tensor's edits in adapter order and rounds once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

RowFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass
class AddDelta:
    """``w + Δ`` for an additive module. ``rows(device)`` returns ``(start, stop) -> Δ[start:stop]`` in float32."""

    target: str
    source: str
    delta_rows: Callable[[torch.device], Callable[[int, int], torch.Tensor]]
    row_wise: bool = True
    round_delta_to: torch.dtype | None = None  # PEFT rounds embedding deltas to the weight dtype before adding

    @property
    def energy_kept(self) -> tuple[str, float] | None:
        """(module, share of energy kept) when Δ came out of a rank cut (a merge), once prepared."""
        return getattr(self.delta_rows, "energy_kept", None)

    def prepare(self, device) -> RowFn:
        delta = self.delta_rows(device)
        round_to = self.round_delta_to

        def fn(w, w0, start, stop):
            d = delta(start, stop)
            if round_to is not None:
                d = d.to(round_to).to(torch.float32)
            return d.add_(w)  # Δ is a fresh tensor; Δ + w equals w + Δ bit for bit

        return fn


@dataclass
class DoraRescale:
    """DoRA: ``(m / ‖W0 + Δ‖) · (W + Δ)``, the norm per output feature against the unmerged base weight."""

    target: str
    source: str
    delta_rows: Callable[[torch.device], Callable[[int, int], torch.Tensor]]
    magnitude: Callable[[torch.device], torch.Tensor]
    layout: str  # "linear" | "fifo" | "embedding" | "conv"

    @property
    def row_wise(self) -> bool:
        return self.layout == "linear"  # one norm per row; the other layouts normalise columns

    def prepare(self, device) -> RowFn:
        delta, m, layout = self.delta_rows(device), self.magnitude(device), self.layout

        def fn(w, w0, start, stop):
            d = delta(start, stop)
            if layout == "linear":
                factor = (m[start:stop] / torch.linalg.norm(w0 + d, dim=1)).view(-1, 1)
            elif layout == "conv":
                dims = tuple(range(1, w0.dim()))
                norm = (w0 + d).norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
                factor = (m / norm).view(-1, *([1] * (w.dim() - 1)))
            else:  # GPT-2 Conv1D and embeddings keep the output feature in dim 1
                factor = (m / torch.linalg.norm(w0.T + d.T, dim=1)).view(1, -1)
            return factor * (w + d)

        return fn


@dataclass
class Replace:
    """The whole tensor replaced (``modules_to_save``, ``bias='all'``, a saved ``base_layer`` weight).

    ``shape``: the replacement's shape where it is not the base tensor's (a resized vocabulary: other rows, the
    same row size), None where it is. The function ignores ``w`` and ``w0``, so a replacement of another shape
    needs neither: the engine calls it with None for both (see :attr:`adaptool.plan.FromBase.shape`).
    """

    target: str
    source: str
    value: Callable[[torch.device], torch.Tensor]
    row_wise: bool = True
    shape: tuple[int, ...] | None = None

    def prepare(self, device) -> RowFn:
        value = self.value(device).to(torch.float32)
        return lambda w, w0, start, stop: value[start:stop]


@dataclass
class ReplaceRows:
    """Rows ``indices`` replaced (PEFT trainable tokens: the saved 'delta' holds the new rows themselves)."""

    target: str
    source: str
    rows: Callable[[torch.device], torch.Tensor]
    indices: list[int]
    row_wise: bool = False

    def prepare(self, device) -> RowFn:
        rows = self.rows(device).to(torch.float32)
        idx = torch.tensor(self.indices, device=device)
        return lambda w, w0, start, stop: w.index_copy(0, idx, rows)


@dataclass
class ScaleRowsCols:
    """``w * s`` for a learned scaling vector (IA3): one factor per row or one per column.

    ``scale(device)`` returns ``s`` shaped to broadcast against the whole tensor: for ``along="rows"`` its
    first dim is the tensor's rows (``(rows, 1, …)``; a bias ``(rows,)``; a grouped conv's per-filter factors
    ``(rows, in/groups, 1, 1)``), for ``along="cols"`` it is 1 (``(1, cols, …)``). Either way rows stay
    independent, so the edit is row-wise. PEFT computes ``mul(W, l)`` in float32 and rounds once, as we do.
    """

    target: str
    source: str
    scale: Callable[[torch.device], torch.Tensor]
    along: str  # "rows" | "cols"
    row_wise: bool = True

    def prepare(self, device) -> RowFn:
        s = self.scale(device).to(torch.float32)
        if self.along == "rows":
            return lambda w, w0, start, stop: w * s[start:stop]
        return lambda w, w0, start, stop: w * s


@dataclass
class Rotate:
    """OFT: the input features of every row turned by a block-diagonal rotation ``R = diag(R_1 … R_n)``.

    ``blocks(device)`` returns the blocks ``(n, b, b)`` in float32, ``n * b`` = the product of the tensor's
    trailing dims (Conv2d kernels are flattened as PEFT views them). ``transpose=True`` gives ``W Rᵀ``, which
    PEFT computes as ``(R @ Wᵀ)ᵀ`` for Linear and Conv2d; ``transpose=False`` gives ``W R`` (Embedding). PEFT
    multiplies by the dense (in × in) ``R``; block by block is the same sum without its zeros, in
    O(rows · in · b) time and O(in · b) memory instead of O(rows · in²) and O(in²).
    """

    target: str
    source: str
    blocks: Callable[[torch.device], torch.Tensor]
    transpose: bool
    row_wise: bool = True

    def prepare(self, device) -> RowFn:
        r = self.blocks(device).to(torch.float32)
        n, b, _ = r.shape
        transpose = self.transpose

        def fn(w, w0, start, stop):
            wb = w.reshape(w.shape[0], n, b).transpose(0, 1)  # (n, rows, b)
            if transpose:  # R_j @ W_jᵀ, PEFT's operand order, then back to (rows, n, b)
                out = torch.bmm(r, wb.transpose(1, 2)).permute(2, 0, 1)
            else:
                out = torch.bmm(wb, r).transpose(0, 1)
            return out.reshape(w.shape)

        return fn


# What a family's ``*_edits`` returns: a list of these, applied per tensor in order.
Edit = AddDelta | DoraRescale | Replace | ReplaceRows | ScaleRowsCols | Rotate
