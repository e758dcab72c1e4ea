"""Edits: what an adapter does to one base tensor.

An edit's ``apply(w, w0)`` takes the tensor so far and the untouched base tensor (both float32, on the
compute device) and returns the new float32 tensor. The engine applies a tensor's edits in adapter order and
rounds once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class AddDelta:
    """``w + Δ`` for an additive adapter module (LoRA, and later LoHa/LoKr/AdaLoRA)."""

    target: str
    source: str
    delta: Callable[[torch.device], torch.Tensor]  # float32 Δ in the base tensor's layout
    round_delta_to: torch.dtype | None = None  # PEFT rounds embedding deltas to the weight dtype before adding

    def apply(self, w, w0):
        d = self.delta(w.device)
        if self.round_delta_to is not None:
            d = d.to(self.round_delta_to).to(torch.float32)
        return w + d


@dataclass
class DoraRescale:
    """DoRA: ``(m / ‖W0 + Δ‖) · (W + Δ)``, the norm taken per output feature against the unmerged base."""

    target: str
    source: str
    delta: Callable[[torch.device], torch.Tensor]
    magnitude: Callable[[torch.device], torch.Tensor]
    layout: str  # "linear" | "fifo" | "embedding" | "conv"

    def apply(self, w, w0):
        d = self.delta(w.device)
        m = self.magnitude(w.device)
        if self.layout == "conv":
            dims = tuple(range(1, w0.dim()))
            norm = (w0 + d).norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
            factor = (m / norm).view(-1, *([1] * (w.dim() - 1)))
        elif self.layout == "linear":
            factor = (m / torch.linalg.norm(w0 + d, dim=1)).view(-1, 1)
        else:  # fifo (GPT-2 Conv1D) and embeddings keep the output feature in dim 1
            factor = (m / torch.linalg.norm(w0.T + d.T, dim=1)).view(1, -1)
        return factor * (w + d)


@dataclass
class Replace:
    """The whole tensor replaced (``modules_to_save``, ``bias='all'``, a saved ``base_layer`` weight)."""

    target: str
    source: str
    value: Callable[[torch.device], torch.Tensor]

    def apply(self, w, w0):
        return self.value(w.device).to(torch.float32)


@dataclass
class ReplaceRows:
    """Rows ``indices`` replaced (PEFT trainable tokens: the saved 'delta' holds the new rows themselves)."""

    target: str
    source: str
    rows: Callable[[torch.device], torch.Tensor]
    indices: list[int]

    def apply(self, w, w0):
        idx = torch.tensor(self.indices, device=w.device)
        return w.index_copy(0, idx, self.rows(w.device).to(torch.float32))
