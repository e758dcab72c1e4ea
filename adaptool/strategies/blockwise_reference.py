"""The task-arithmetic merge of low-rank deltas, evaluated the plain way: the reference of
:class:`~adaptool.strategies.blockwise.BlockwiseMerge`.

Every block recomputes each ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` from the factors, prunes it with a boolean mask, and runs the sign
election with fresh tensors, exactly as the maths reads. ``BlockwiseMerge`` produces the same bits faster; it
hands a module to this class when a ΔWᵢ could overflow float32 (the only case where its shortcuts could differ),
and the tests hold the two equal bit for bit. Same arguments, same semantics (see that module's docstring).
"""

from __future__ import annotations

import torch

from adaptool.errors import AdaptoolError
from adaptool.strategies.sparsify import check_density
from adaptool.strategies.task_arithmetic import METHODS, base_method

_BINS = 1 << 15  # top 15 bits of a non-negative float32 (sign bit is 0): exponent and 7 mantissa bits
BLOCK_ELEMS = 1 << 21  # threshold passes run over ~8 MB blocks, in cache
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor leaves a tensor unscaled when either L1 norm is below this
CONVENTIONS = ("peft", "mergekit")


def _bucket_of(a: torch.Tensor) -> torch.Tensor:
    """Top bits of non-negative float32 values: their bit patterns order like the values."""
    return (a.reshape(-1).view(torch.int32) >> 16)


def kth_largest_abs_blocks(blocks, k: int) -> torch.Tensor:
    """The k-th largest of a tensor's ``|values|``, given as ``blocks()`` (float32, called twice), exactly: a
    histogram of the top 16 bits, then a pass collecting the one bucket that holds the k-th value."""
    hist = None
    for a in blocks():
        h = torch.bincount(_bucket_of(a), minlength=_BINS)
        hist = h if hist is None else hist.add_(h)
    top_down = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(top_down, k))
    above = int(top_down[idx - 1]) if idx > 0 else 0
    wanted = _BINS - 1 - idx
    bucket = torch.cat([a.reshape(-1)[_bucket_of(a) == wanted] for a in blocks()])
    return torch.kthvalue(bucket, bucket.numel() - (k - above) + 1).values


class ReferenceBlockwiseMerge:
    """Merge of n low-rank deltas by a task-arithmetic method, evaluated on blocks of the result (plainly).

    Args:
        Bs, As (list[torch.Tensor]): float32 factors, ``(out, r_i)`` and ``(r_i, in)``.
        coeffs (list[float]): the LoRA scalings sᵢ (ΔWᵢ = sᵢ·Bᵢ·Aᵢ).
        weights (list[float]): merge weights wᵢ.
        method (str): linear, ties, dare_linear, dare_ties, magnitude_prune (or an ``_svd`` strategy name).
        density (float | None): fraction kept, for the pruning methods.
        majority_sign_method (str): total or frequency.
        generators (list[torch.Generator] | None): one per input, for DARE.
        convention (str): ``peft`` or ``mergekit`` (see the module docstring). Default: "peft".
    """

    def __init__(self, Bs, As, coeffs, weights, method, density=None, majority_sign_method="total", generators=None,
                 convention="peft"):
        self.Bs, self.As, self.coeffs, self.weights = Bs, As, list(coeffs), list(weights)
        self.sparsify, self.elect = METHODS[base_method(method)]
        self.msm = majority_sign_method
        if convention not in CONVENTIONS:
            raise AdaptoolError(f"unknown convention {convention!r}", f"use one of: {', '.join(CONVENTIONS)}")
        self.mergekit = convention == "mergekit"
        self.normalize = self.mergekit and base_method(method) == "ties"
        self.shape = (Bs[0].shape[0], As[0].shape[1])
        n = self.shape[0] * self.shape[1]
        self.density = 1.0 if self.sparsify is None else check_density(density, method)
        self.thresholds = self.masks = self.l1_scales = None
        if self.density >= 1:
            self.sparsify = None  # PEFT and mergekit: density >= 1 returns the tensor unchanged
        elif self.sparsify == "magnitude":
            k = int(self.density * n)
            if self.normalize:
                k = max(1, k)  # mergekit's magnitude() keeps one; breadcrumbs (our magnitude_prune) may keep none
            self.thresholds = [self._threshold(i, k) if k else None for i in range(len(Bs))]
        elif self.sparsify == "random":
            self.masks = [torch.rand(self.shape, generator=g, device=Bs[0].device) < self.density for g in generators]
            if self.mergekit:
                self.l1_scales = [self._l1_scale(i) for i in range(len(Bs))]

    def _threshold(self, i: int, k: int) -> torch.Tensor:
        rows = max(1, BLOCK_ELEMS // max(1, self.shape[1]))

        def blocks():
            for start in range(0, self.shape[0], rows):
                yield self._delta(i, slice(start, start + rows)).abs_()

        return kth_largest_abs_blocks(blocks, k)

    def _l1_scale(self, i: int) -> float:
        """mergekit's DARE rescale of delta i: ‖δ‖₁ / ‖mask·δ‖₁ (sums in float64), 1 when either is below 1e-7."""
        rows = max(1, BLOCK_ELEMS // max(1, self.shape[1]))
        before = after = 0.0
        for start in range(0, self.shape[0], rows):
            block = slice(start, start + rows)
            d = self._delta(i, block).abs_()
            before += float(d.sum(dtype=torch.float64))
            after += float(d.mul_(self.masks[i][block]).sum(dtype=torch.float64))
        return 1.0 if before < L1_EPS or after < L1_EPS else before / after

    def _delta(self, i: int, rows=slice(None), cols=slice(None)) -> torch.Tensor:
        return (self.Bs[i][rows] @ self.As[i][:, cols]).mul_(self.coeffs[i])

    def _pruned(self, i: int, rows, cols) -> torch.Tensor:
        d = self._delta(i, rows, cols)
        if self.sparsify == "magnitude":
            thr = self.thresholds[i]
            return d.zero_() if thr is None else d.mul_(d.abs() >= thr)
        if self.sparsify == "random":
            d.mul_(self.masks[i][rows, cols])
            return d.mul_(self.l1_scales[i]) if self.mergekit else d.div_(self.density)
        return d

    def block(self, rows=slice(None), cols=slice(None)) -> torch.Tensor:
        """``merged[rows, cols]`` in float32."""
        pruned = [self._pruned(i, rows, cols) for i in range(len(self.Bs))]
        if not self.elect:
            out = pruned[0].mul_(self.weights[0])
            for p, w in zip(pruned[1:], self.weights[1:]):
                out.add_(p, alpha=w)
            return out
        if self.mergekit:
            return self._mergekit_consensus(pruned)
        return self._peft_consensus(pruned)

    def _peft_consensus(self, pruned: list[torch.Tensor]) -> torch.Tensor:
        """Signs elected on the unweighted values; the mean of the agreeing weighted values."""
        signs = [p.sign() for p in pruned]
        votes = pruned if self.msm == "total" else signs
        tally = votes[0].clone()
        for v in votes[1:]:
            tally.add_(v)
        majority = torch.where(tally >= 0, 1.0, -1.0)  # a tie or zero elects +1, as PEFT
        total = torch.zeros_like(tally)
        count = torch.zeros_like(tally)
        for p, s, w in zip(pruned, signs, self.weights):
            agree = (s == majority).to(p.dtype)  # pruned zeros have sign 0 and never agree
            total.add_(p.mul_(agree), alpha=w)
            count.add_(agree)
        return total.div_(count.clamp_(min=1))

    def _mergekit_consensus(self, pruned: list[torch.Tensor]) -> torch.Tensor:
        """Signs elected on the weighted values; their agreeing sum, over the agreeing weights for ties."""
        weighted = [p.mul_(w) for p, w in zip(pruned, self.weights)]
        signs = [p.sign() for p in weighted]
        votes = weighted if self.msm == "total" else signs
        tally = votes[0].clone()
        for v in votes[1:]:
            tally.add_(v)
        majority = torch.where(tally >= 0, 1.0, -1.0)
        total = torch.zeros_like(tally)
        divisor = torch.zeros_like(tally)
        for p, s, w in zip(weighted, signs, self.weights):
            agree = (s == majority).to(p.dtype)  # zeros (pruned or weight 0) have sign 0 and never agree
            total.add_(p.mul_(agree))
            divisor.add_(agree, alpha=w)
        if not self.normalize:
            return total
        return total.div_(divisor.masked_fill_(divisor == 0, 1.0))

    def full(self) -> torch.Tensor:
        return self.block()
