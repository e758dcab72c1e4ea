"""One module of a merge: the adapters' factors in, a low-rank pair or a dense delta out.

Orientation: everything here is in LoRA factor orientation, ``B (out, r) @ A (r, in)``; for embeddings
that is ``(dim, num_embeddings)``, the transpose of the weight, and conv kernels are flattened to
``(out, in*k*k)``. Folding into a base weight (layout, transpose, reshape) is :func:`rows_in_base_layout`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptool.recipe import ModuleRules, value_at
from adaptool.strategies import (
    clamp_factors,
    combine_factors,
    concat_lowrank,
    generator_for,
    refactor,
    truncate_lowrank,
)
from adaptool.strategies.blockwise import BlockwiseMerge
from adaptool.strategies.workspace import Workspace

SVD_SUFFIX = "_svd"
LOWRANK_STRATEGIES = ("linear", "cat", "svd")


@dataclass
class Combined:
    """A merged module: ``B @ A`` (low rank) or ``dense``, with the share of energy a truncation kept."""

    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    dense: BlockwiseMerge | None = None  # evaluated block by block when folded into a base
    energy: float = 1.0
    truncated: bool = False

    @property
    def rank(self) -> int | None:
        return None if self.B is None else self.B.shape[1]


@dataclass
class MergeSpec:
    """What every module of one merge shares (``density`` may be per-module rules, resolved by module path)."""

    strategy: str
    space: str  # delta | factors
    density: float | ModuleRules | None
    majority_sign_method: str
    rank: int | None
    clamp: float | None
    seed: int
    to_adapter: bool  # the result must be a LoRA (re-factored where dense)
    n_adapters: int  # in the whole recipe (PEFT forces linear for one adapter)
    peft_rank: int | None = None  # space: factors, from PEFT's rank rules
    convention: str = "peft"  # peft | mergekit: whose ties/dare arithmetic (space: delta)


def flat(t: torch.Tensor) -> torch.Tensor:
    """Conv factors as matrices: A (r, in, k, k) -> (r, in*k*k), B (out, r, 1, 1) -> (out, r)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 2 else t


def combine_module(path: str, entries: list, spec: MergeSpec, device, fifo: bool = False,
                   workspace: Workspace | None = None) -> Combined:
    """Merge one module.

    Args:
        path (str): module path (seeds DARE's generators, so results do not depend on order).
        entries (list[tuple[LoraModule, float]]): the adapters that adapt this module, with their weights for it.
        spec (MergeSpec): the strategy and its parameters (a per-module density is resolved at ``path``).
        device: where the math runs.
        fifo (bool): the base stores this weight (in, out) (GPT-2 Conv1D); PEFT's svd path prunes the
            transposed delta, which only matters in ``space: factors``.
        workspace (Workspace | None): working buffers and a helper thread shared across modules, for a
            block-wise (dense) result (see :class:`~adaptool.strategies.blockwise.BlockwiseMerge`).
    """
    factors = [m.factors(device) for m, _ in entries]
    Bs = [flat(b) for b, _ in factors]
    As = [flat(a) for _, a in factors]
    scalings = [m.scaling for m, _ in entries]
    weights = [w for _, w in entries]
    density = value_at(spec.density, path)
    if spec.space == "factors":
        return _factors_space(path, As, Bs, scalings, weights, density, spec, device,
                              entries[0][0].kind == "embedding", fifo)
    coeffs = [w * s for w, s in zip(weights, scalings)]
    max_rank = max(b.shape[1] for b in Bs)
    if spec.strategy in LOWRANK_STRATEGIES:  # exact low-rank algebra
        B, A = concat_lowrank(Bs, As, coeffs)
        if spec.strategy == "cat" or (spec.strategy == "linear" and spec.rank is None):
            return Combined(B, A)
        k = spec.rank or max_rank
        Bk, Ak, energy = truncate_lowrank(B, A, k)
        if spec.clamp is not None:
            Bk, Ak = clamp_factors(Bk, Ak, spec.clamp)
        return Combined(Bk, Ak, energy=energy, truncated=Bk.shape[1] < B.shape[1])
    generators = [generator_for(spec.seed, f"{path}#{i}", device) for i in range(len(Bs))]
    merged = BlockwiseMerge(Bs, As, scalings, weights, spec.strategy, density, spec.majority_sign_method,
                            generators, spec.convention, workspace=workspace)
    if not (spec.to_adapter or spec.strategy.endswith(SVD_SUFFIX)):
        return Combined(dense=merged)
    Bk, Ak, energy = refactor(merged.full(), spec.rank or max_rank)
    if spec.clamp is not None:
        Bk, Ak = clamp_factors(Bk, Ak, spec.clamp)
    return Combined(Bk, Ak, energy=energy, truncated=True)


def _factors_space(path, As, Bs, scalings, weights, density, spec: MergeSpec, device, is_embedding, fifo) -> Combined:
    from adaptool.strategies import peft_effective_type

    ctype = peft_effective_type(spec.n_adapters, spec.strategy)
    A, B = combine_factors(As, Bs, scalings, weights, ctype, new_rank=spec.peft_rank, density=density,
                           majority_sign_method=spec.majority_sign_method, svd_clamp=spec.clamp,
                           generator=generator_for(spec.seed, path, device), is_embedding=is_embedding,
                           fan_in_fan_out=fifo)
    return Combined(B, A)


def rows_in_base_layout(c: Combined, kind: str, fifo: bool, weight_shape: tuple[int, ...]):
    """``(start, stop) -> rows of the merged ΔW`` in the base weight's layout (float32), and whether row
    blocks are possible (they are for low-rank linear results)."""
    transposed = kind == "embedding" or fifo
    if kind == "conv":
        full = (c.dense.full() if c.dense is not None else c.B @ c.A).reshape(weight_shape)
        return (lambda start, stop: full[start:stop].clone()), False
    if c.dense is not None:
        m = c.dense
        if transposed:
            return (lambda start, stop: m.block(cols=slice(start, stop)).T), True
        return (lambda start, stop: m.block(rows=slice(start, stop))), True
    B, A = c.B, c.A
    if transposed:
        return (lambda start, stop: (B @ A[:, start:stop]).T), True
    return (lambda start, stop: B[start:stop] @ A), True


class MergedRows:
    """``device -> (start, stop) -> rows of the merged ΔW`` of one module in the base weight's layout, for
    :class:`~adaptool.ops.edits.AddDelta`; once called, ``energy_kept`` is (module, share of energy its rank cut
    kept), or None when nothing was cut. The modules of one plan share ``workspace`` (the engine streams one
    tensor at a time)."""

    def __init__(self, path: str, entries: list, spec: MergeSpec, kind: str, fifo: bool, weight_shape: tuple[int, ...],
                 workspace: Workspace | None = None):
        self.path, self.entries, self.spec = path, entries, spec
        self.kind, self.fifo, self.weight_shape = kind, fifo, weight_shape
        self.workspace = workspace
        self.energy_kept: tuple[str, float] | None = None

    def __call__(self, device):
        c = combine_module(self.path, self.entries, self.spec, device, self.fifo, self.workspace)
        if c.truncated:
            self.energy_kept = (self.path, c.energy)
        rows, _ = rows_in_base_layout(c, self.kind, self.fifo, self.weight_shape)
        return rows


def merged_bias(entries: list, device) -> torch.Tensor | None:
    """``lora_bias`` adapters' bias deltas add linearly: Σ w·s·bias (out,), float32; None when none has one."""
    total = None
    for m, w in entries:
        if m.bias_key:
            b = m.adapter.load(m.bias_key).to(device=device, dtype=torch.float32) * (w * m.scaling)
            total = b if total is None else total + b
    return total
