"""The task-arithmetic family on low-rank inputs, evaluated block by block.

``delta``-space ties/dare/magnitude_prune need each adapter's dense ΔWᵢ = sᵢ·Bᵢ·Aᵢ, which for a big model is
hundreds of MB per module. Everything they do is elementwise except one number per adapter — the magnitude
threshold (or one random mask) — so :class:`BlockwiseMerge` finds those first and then rebuilds any block of
ΔWᵢ from the factors on demand (a small matmul, in cache) and merges it there. Same semantics as
:func:`~adaptool.strategies.task_arithmetic.combine`, except that magnitude pruning keeps every entry at
least as large as the k-th largest (``k = int(density·n)``), so values tied at the threshold are all kept
(``torch.topk`` would keep an arbitrary, device-dependent subset of them).

Two conventions (``parameters.convention`` of a recipe):

* ``peft`` (PEFT 0.21.2 ``merge_utils``): the signs are elected on the pruned, UNWEIGHTED deltas, and ties /
  dare_ties take the mean of the agreeing weighted values (divided by their count); DARE rescales by 1/density.
* ``mergekit`` (mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge`` with each method's default parameters): the
  weights multiply the pruned deltas BEFORE the election (the sign of wᵢ·δᵢ votes and must agree); ties divides
  the agreeing sum by the sum of the agreeing weights (``normalize``, its default for ties; a zero sum divides by
  1) and keeps at least one entry per delta; dare_ties sums the agreeing values (no normalize); DARE rescales by
  ‖δ‖₁/‖mask·δ‖₁ (left unscaled when either is below 1e-7). magnitude_prune is mergekit's breadcrumbs with
  gamma 0 and linear its task_arithmetic, which are the same arithmetic in both conventions.

How it is fast and still bit-identical to the plain evaluation
(:class:`~adaptool.strategies.blockwise_reference.ReferenceBlockwiseMerge`, which the tests hold it equal to):

* Every value is produced by the same operation on the same operands as there: ΔWᵢ blocks by the same matmul
  of the same factor slices, then the same ``mul``/``add(alpha=w)``/``div`` sequence. Only the masks are
  computed differently, and they are equal, not close.
* The threshold is the exact k-th largest ``|ΔWᵢ|`` by :mod:`~adaptool.strategies.radix_select` (a bfloat16
  histogram, then one bucket picked out: two passes of a few element-wise operations).
* When ``n × |ΔW| × 4 bytes`` fits :data:`CACHE_LIMIT`, the threshold (or L1) pass keeps ΔWᵢ's row blocks,
  and the merge reads them instead of multiplying again (the engine asks for the same row blocks).
* Pruning is ``hardshrink`` at the float just below the threshold (``|d| > λ`` is ``|d| >= t``), with
  ``copysign`` restoring the sign of the zeros where no sign election follows (``d·0`` is ``-0`` for a
  negative ``d``, and ``-0 + -0`` stays ``-0`` when it lands on a ``-0`` base weight). With an election,
  pruned zeros never agree and add ``±0`` to a sum that starts at ``+0``, so their sign cannot matter.
* The elected sign is ``2·[T >= 0] - 1`` and agreement ``sign(p) == it``, as float tensors (boolean
  tensors are ~4x slower per element); mergekit's ``divisor.masked_fill_(divisor == 0, 1)`` is
  ``divisor + [divisor == 0]``; DARE's mask is a float 0/1 tensor (``d·1.0``, ``d·0.0`` as from a boolean).
* The element-wise work runs over ~1 MB row tiles of the engine's ~8 MB block, so its buffers stay in cache
  (2x faster), where :func:`position_free` shows that no operation's rounding depends on where an element
  sits in a loop (else over whole blocks, the reference's shapes).
* Buffers and a helper thread come from a :class:`~adaptool.strategies.workspace.Workspace` shared by the
  modules of a plan: adapters' thresholds and masks, and a block's tiles, are split between two threads.
* These shortcuts assume finite deltas and tallies; when the factors could overflow float32 (a bound from
  their largest entries), the module is evaluated by the reference instead.
"""

from __future__ import annotations

import functools
import math

import torch

from adaptool.errors import AdaptoolError
from adaptool.strategies.blockwise_reference import BLOCK_ELEMS, CONVENTIONS, L1_EPS, ReferenceBlockwiseMerge
from adaptool.strategies.radix_select import kth_largest_abs, kth_largest_abs_blocks
from adaptool.strategies.sparsify import check_density
from adaptool.strategies.task_arithmetic import METHODS, base_method
from adaptool.strategies.workspace import Workspace

__all__ = ["BlockwiseMerge", "CACHE_LIMIT", "TILE_ELEMS", "kth_largest_abs", "position_free"]

CACHE_LIMIT = 512 << 20  # bytes of ΔW row blocks (all adapters) kept from the threshold pass for the merge
TILE_ELEMS = 1 << 18  # element-wise work runs over ~1 MB row tiles of a block (a dozen buffers stay in cache)
_SAFE = 1e37  # bounds below this leave float32 (max 3.4e38) a 34x margin: no delta or tally can overflow
_ALIGN = 16  # cached row blocks start on 64-byte boundaries, like freshly allocated tensors
_F32 = torch.float32


class BlockwiseMerge:
    """Merge of n low-rank deltas by a task-arithmetic method, evaluated on blocks of the result.

    Args:
        Bs, As (list[torch.Tensor]): float32 factors, ``(out, r_i)`` and ``(r_i, in)``.
        coeffs (list[float]): the LoRA scalings sᵢ (ΔWᵢ = sᵢ·Bᵢ·Aᵢ).
        weights (list[float]): merge weights wᵢ.
        method (str): linear, ties, dare_linear, dare_ties, magnitude_prune (or an ``_svd`` strategy name).
        density (float | None): fraction kept, for the pruning methods.
        majority_sign_method (str): total or frequency.
        generators (list[torch.Generator] | None): one per input, for DARE.
        convention (str): ``peft`` or ``mergekit`` (see the module docstring). Default: "peft".
        workspace (Workspace | None): working buffers and a helper thread shared with other modules; without
            one, buffers are allocated as needed and everything runs on the calling thread. Either way every
            block returned is a tensor of its own (the engine may hand it on: a float32 block is written as
            is, by its writer thread, while the next is computed). Default: None.
    """

    def __init__(self, Bs, As, coeffs, weights, method, density=None, majority_sign_method="total", generators=None,
                 convention="peft", workspace: Workspace | None = None):
        sparsify, self.elect = METHODS[base_method(method)]
        if convention not in CONVENTIONS:
            raise AdaptoolError(f"unknown convention {convention!r}", f"use one of: {', '.join(CONVENTIONS)}")
        self.shape = (Bs[0].shape[0], As[0].shape[1])
        self.density = 1.0 if sparsify is None else check_density(density, method)
        self._reference = None
        if _may_overflow(Bs, As, coeffs, weights):
            self._reference = ref = ReferenceBlockwiseMerge(Bs, As, coeffs, weights, method, density,
                                                            majority_sign_method, generators, convention)
            self.thresholds, self.masks, self.l1_scales = ref.thresholds, ref.masks, ref.l1_scales
            return
        self.Bs, self.As, self.coeffs, self.weights = Bs, As, list(coeffs), list(weights)
        self.msm = majority_sign_method
        self.mergekit = convention == "mergekit"
        self.normalize = self.mergekit and base_method(method) == "ties"
        self.sparsify = None if self.density >= 1 else sparsify  # PEFT and mergekit: density >= 1 is a no-op
        self.ws = workspace or Workspace(0, helper=False)
        self.device = Bs[0].device
        self.rows = max(1, BLOCK_ELEMS // max(1, self.shape[1]))  # the reference's row blocks before the merge
        self.thresholds = self.masks = self.l1_scales = self.lambdas = None
        self._filled: set[tuple[int, int]] = set()  # (adapter, start) of the cached row blocks computed
        self._cache = self._cache_views()
        adapters = range(len(Bs))
        if self.sparsify == "magnitude":
            k = int(self.density * (self.shape[0] * self.shape[1]))  # as the reference: 0.35·1440 = 503.99…
            if self.normalize:
                k = max(1, k)  # mergekit's magnitude() keeps one; breadcrumbs (our magnitude_prune) may keep none
            self.thresholds = self.ws.map(lambda i: self._threshold(i, k) if k else None, adapters, self.device)
            # |d| > λ, λ the float just below the threshold, is |d| >= threshold
            self.lambdas = [None if t is None else float(torch.nextafter(t, torch.zeros_like(t)))
                            for t in self.thresholds]
        elif self.sparsify == "random":
            self._generators = list(generators)
            self._mask_states = [g.get_state() for g in self._generators]  # to draw a mask again if it is lost
            self.masks = self.ws.map(self._draw_mask, adapters, self.device)
            if self.mergekit:
                self.l1_scales = self.ws.map(self._l1_scale, adapters, self.device)

    # ------------------------------------------------------------------ passes before the merge

    def _starts(self) -> range:
        return range(0, self.shape[0], self.rows)

    def _cache_views(self) -> list[dict[int, torch.Tensor]] | None:
        """Per adapter, ``start -> (rows, in)`` float32 views that hold ΔWᵢ's row blocks once the first pass has
        run, when a pass precedes the merge and all of them fit :data:`CACHE_LIMIT` (else None)."""
        n_rows, n_cols = self.shape
        sizes = [(min(n_rows, s + self.rows) - s) * n_cols for s in self._starts()]
        padded = [-(-size // _ALIGN) * _ALIGN for size in sizes]
        offsets = [sum(padded[:j]) for j in range(len(padded))]
        nbytes = sum(padded) * 4
        before_merge = self.sparsify == "magnitude" or (self.sparsify == "random" and self.mergekit)
        if not before_merge or nbytes * len(self.Bs) > CACHE_LIMIT or not self.ws.keeps(nbytes, self.device):
            return None
        views = []
        for i in range(len(self.Bs)):
            buf = self.ws.take(f"blockwise.x{i}", (sum(padded),), _F32, self.device, owner=self)
            views.append({s: buf[o:o + size].view(-1, n_cols) for s, o, size in zip(self._starts(), offsets, sizes)})
        return views

    def _product(self, i: int, start: int) -> torch.Tensor:
        """``sᵢ·Bᵢ[start:start+rows]·Aᵢ``, the reference's row block of ΔWᵢ: from the cache, computed into it the
        first time, or into a working buffer when nothing is cached."""
        rows = slice(start, start + self.rows)
        if self._cache is None:
            n = min(self.shape[0], start + self.rows) - start
            out = self.ws.take("blockwise.x", (n, self.shape[1]), _F32, self.device)
            return torch.mm(self.Bs[i][rows], self.As[i], out=out).mul_(self.coeffs[i])
        view = self._cache[i][start]
        if (i, start) not in self._filled:
            torch.mm(self.Bs[i][rows], self.As[i], out=view).mul_(self.coeffs[i])
            self._filled.add((i, start))
        return view

    def _threshold(self, i: int, k: int) -> torch.Tensor:
        return kth_largest_abs_blocks(lambda: (self._product(i, s) for s in self._starts()), k, self.ws)

    def _draw_mask(self, i: int) -> torch.Tensor:
        """DARE's keep-mask of adapter i, ``rand(shape) < density`` drawn as the reference draws it: as 0/1
        float32 in a shared buffer when that is kept (a float compare is ~6x faster than a boolean one, and the
        merge multiplies by it directly), else as a boolean tensor of its own."""
        nbytes = self.shape[0] * self.shape[1] * 4
        if nbytes * len(self.Bs) <= CACHE_LIMIT and self.ws.keeps(nbytes, self.device):
            draws = self.ws.take(f"blockwise.mask{i}", self.shape, _F32, self.device, owner=self)
            torch.rand(self.shape, generator=self._generators[i], out=draws)
            return torch.lt(draws, self.density, out=draws)
        draws = self.ws.take("blockwise.rand", self.shape, _F32, self.device)
        torch.rand(self.shape, generator=self._generators[i], out=draws)
        return torch.lt(draws, self.density)

    def _l1_scale(self, i: int) -> float:
        """mergekit's DARE rescale of delta i: ‖δ‖₁ / ‖mask·δ‖₁ (sums in float64), 1 when either is below 1e-7."""
        before = after = 0.0
        for start in self._starts():
            x = self._product(i, start)
            d = torch.abs(x, out=self.ws.take("blockwise.l1", x.shape, _F32, self.device))
            before += float(d.sum(dtype=torch.float64))
            rows = slice(start, start + self.rows)
            after += float(d.mul_(self._mask(i, rows, slice(None), x.shape)).sum(dtype=torch.float64))
        return 1.0 if before < L1_EPS or after < L1_EPS else before / after

    def _mask(self, i: int, rows: slice, cols: slice, shape) -> torch.Tensor:
        """DARE mask i on ``[rows, cols]`` as float32 0/1."""
        mask = self.masks[i]
        if mask.dtype != torch.bool:
            return mask[rows, cols]
        m = self.ws.take("blockwise.mask", shape, _F32, self.device)
        return m.copy_(mask[rows, cols].view(torch.uint8))  # through uint8: ~9x faster than from bool

    def _keep_masks(self) -> None:
        """Draw again (same generator state, same mask) any mask whose shared buffer another module took."""
        for i, mask in enumerate(self.masks or ()):
            if mask.dtype != torch.bool and not self.ws.held_by(f"blockwise.mask{i}", self):
                self._generators[i].set_state(self._mask_states[i])
                self.masks[i] = self._draw_mask(i)

    # ------------------------------------------------------------------ the merge, one block at a time

    def block(self, rows=slice(None), cols=slice(None)) -> torch.Tensor:
        """``merged[rows, cols]`` in float32, a tensor of its own.

        Each ΔWᵢ block is the reference's (a cached row block or the same matmul); the element-wise rest runs
        over row tiles, split between the threads of the workspace, into one output block."""
        if self._reference is not None:
            return self._reference.block(rows, cols)
        r0, r1, step_r = rows.indices(self.shape[0])
        c0, c1, step_c = cols.indices(self.shape[1])
        if step_r != 1 or step_c != 1:
            raise ValueError("blocks are contiguous row and column ranges")
        shape = (max(0, r1 - r0), max(0, c1 - c0))
        self._keep_masks()
        sources = self.ws.map(lambda i: self._source(i, r0, r1, c0, c1, shape), range(len(self.Bs)), self.device)
        out = torch.empty(shape, dtype=_F32, device=self.device)  # handed on: never a shared buffer
        tiled = self.device.type == "cpu" and position_free()  # a GPU has no cache to keep tiles in
        step = max(1, TILE_ELEMS // max(1, shape[1])) if tiled else max(1, shape[0])

        def tile(t0: int) -> None:
            t1 = min(shape[0], t0 + step)
            self._merge_tile([src[t0:t1] for src in sources], slice(r0 + t0, r0 + t1), slice(c0, c1), out[t0:t1])

        self.ws.map(tile, range(0, shape[0], step), self.device)
        return out

    def _source(self, i: int, r0: int, r1: int, c0: int, c1: int, shape) -> torch.Tensor:
        """``ΔWᵢ[r0:r1, c0:c1]``: the cached row block when it is one, else the reference's matmul (into a
        working buffer)."""
        cache = self._cache[i] if self._cache is not None else {}
        if c0 == 0 and c1 == self.shape[1] and (i, r0) in self._filled \
                and cache[r0].shape[0] == r1 - r0 and self.ws.held_by(f"blockwise.x{i}", self):
            return cache[r0]
        d = self.ws.take(f"blockwise.src{i}", shape, _F32, self.device)
        torch.mm(self.Bs[i][r0:r1], self.As[i][:, c0:c1], out=d)
        return d.mul_(self.coeffs[i])

    def _merge_tile(self, sources: list[torch.Tensor], rows: slice, cols: slice, out: torch.Tensor) -> None:
        """The merged tile into ``out`` (``sources``: each ΔWᵢ on it; ``rows``, ``cols``: where it lies)."""
        shape = tuple(out.shape)
        pruned = [self._pruned(i, src, rows, cols, shape) for i, src in enumerate(sources)]
        if not self.elect:
            torch.mul(pruned[0], self.weights[0], out=out)
            for p, w in zip(pruned[1:], self.weights[1:]):
                out.add_(p, alpha=w)
        elif self.mergekit:
            self._mergekit_consensus(pruned, shape, out)
        else:
            self._peft_consensus(pruned, shape, out)

    def _pruned(self, i: int, src: torch.Tensor, rows: slice, cols: slice, shape) -> torch.Tensor:
        """Pruned ΔWᵢ on a tile, in a working buffer (``src`` is only read)."""
        d = self.ws.take(f"blockwise.d{i}", shape, _F32, self.device)
        if self.sparsify == "magnitude":
            lam = self.lambdas[i]
            if lam is None:
                return d.zero_()
            if self.elect:  # pruned zeros never agree: their sign does not matter
                return torch.hardshrink(src, lam, out=d)
            kept = torch.hardshrink(src, lam, out=self.ws.take("blockwise.kept", shape, _F32, self.device))
            return torch.copysign(kept, src, out=d)  # d·0 keeps d's sign; so must we
        if self.sparsify == "random":
            torch.mul(src, self._mask(i, rows, cols, shape), out=d)
            return d.mul_(self.l1_scales[i]) if self.mergekit else d.div_(self.density)
        return d.copy_(src)

    def _summed(self, values: list[torch.Tensor], name: str, shape) -> torch.Tensor:
        """``((v0 + v1) + v2) + …`` into a working buffer: the reference's ``clone`` then ``add_`` sequence."""
        out = self.ws.take(name, shape, _F32, self.device)
        if len(values) == 1:
            return out.copy_(values[0])
        torch.add(values[0], values[1], out=out)
        for v in values[2:]:
            out.add_(v)
        return out

    def _agreeing(self, values: list[torch.Tensor], shape) -> list[torch.Tensor]:
        """Per value tensor, 1.0 where its sign is the elected one (+1 where the votes sum to >= 0: a tie or a
        zero elects +1, as in PEFT and mergekit; else -1), 0.0 elsewhere: zeros have sign 0 and never agree."""
        signs = [torch.sign(v, out=self.ws.take(f"blockwise.s{i}", shape, _F32, self.device))
                 for i, v in enumerate(values)]
        tally = self._summed(values if self.msm == "total" else signs, "blockwise.elected", shape)
        elected = torch.ge(tally, 0, out=tally).mul_(2).sub_(1)
        return [torch.eq(s, elected, out=s) for s in signs]

    def _peft_consensus(self, pruned: list[torch.Tensor], shape, out: torch.Tensor) -> None:
        """Signs elected on the unweighted values; the mean of the agreeing weighted values, into ``out``."""
        agrees = self._agreeing(pruned, shape)
        count = self._summed(agrees, "blockwise.count", shape)  # small whole numbers: exact in any order
        total = out.zero_()
        for p, agree, w in zip(pruned, agrees, self.weights):
            total.add_(p.mul_(agree), alpha=w)
        total.div_(count.clamp_(min=1))

    def _mergekit_consensus(self, pruned: list[torch.Tensor], shape, out: torch.Tensor) -> None:
        """Signs elected on the weighted values; their agreeing sum, over the agreeing weights for ties, into
        ``out``."""
        weighted = [p.mul_(w) for p, w in zip(pruned, self.weights)]
        agrees = self._agreeing(weighted, shape)
        total = out.zero_()
        divisor = self.ws.take("blockwise.count", shape, _F32, self.device).zero_()
        for p, agree, w in zip(weighted, agrees, self.weights):
            total.add_(p.mul_(agree))
            divisor.add_(agree, alpha=w)
        if self.normalize:
            zero = torch.eq(divisor, 0, out=self.ws.take("blockwise.zero", shape, _F32, self.device))
            total.div_(divisor.add_(zero))  # a zero sum of weights divides by 1

    def full(self) -> torch.Tensor:
        """The whole merged ΔW, a tensor of its own."""
        if self._reference is not None:
            return self._reference.full()
        return self.block()


@functools.lru_cache(maxsize=None)
def position_free() -> bool:
    """Whether every element-wise operation used here rounds the same wherever an element sits in a loop.

    ``add(alpha=w)`` is the only one that could differ: its vectorised body is a fused multiply-add, its
    scalar tail ``a + w*b`` is fused or not depending on how torch was compiled. Tiling a block (or a thread
    count) moves elements between body and tail, so tiles are used only where both paths agree, as they do in
    torch's x86 builds: checked once on a contiguous run (vector body) against the same values laid out as
    rows of 15 (shorter than a vector: scalar code)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 15, generator=g), torch.randn(4096, 15, generator=g) * 1e-3
    body = a.clone().add_(b, alpha=0.3)
    wide_a, wide_b = torch.zeros(4096, 32), torch.zeros(4096, 32)
    wide_a[:, :15], wide_b[:, :15] = a, b
    tail = wide_a[:, :15].add_(wide_b[:, :15], alpha=0.3)
    return torch.equal(body, tail)


def _may_overflow(Bs, As, coeffs, weights) -> bool:
    """Whether some Bᵢ·Aᵢ, sᵢ·Bᵢ·Aᵢ, or a tally of the (weighted) deltas could leave float32's range: a bound
    from the factors' largest entries (``|(B·A)_jk| <= r·max|B|·max|A|``)."""
    tally = 0.0
    for B, A, c, w in zip(Bs, As, coeffs, weights):
        if B.numel() == 0 or A.numel() == 0:
            continue
        product = B.shape[1] * float(B.abs().max()) * float(A.abs().max())
        if not product < _SAFE:
            return True
        tally += product * abs(float(c)) * max(1.0, abs(float(w)))
    return not (tally < _SAFE and all(math.isfinite(float(x)) for x in (*coeffs, *weights)))
