"""Best rank-k factors of a dense matrix (a full fine-tune's ΔW) at a rank chosen by a rule (``extract``).

Small matrices (``min(m, n) <= EXACT_MAX_DIM``) get an exact SVD. Big ones get a seeded randomized range
finder (Halko, Martinsson & Tropp 2011, alg. 4.4) with power iterations that stop once the energy the sketch
captures has settled, so a module costs a few ``m x n x L`` matrix products instead of an
``O(m n min(m, n))`` SVD (a 5632 x 2048 MLP matrix: ~0.2 s on one core instead of ~4 s).

The rules need singular values (:func:`adaptool.strategies.rank_rules.choose_rank`). From a sketch of L
columns we know the top L of them (very nearly) and, exactly, ``‖D‖_F²``; the rest of the energy is spread
evenly over the unknown tail, which bounds it, and the rule is applied to that padded spectrum. The choice
stands when it falls within the sketch's reliable part (its first ``L - OVERSAMPLE`` values) or is the
``max_rank`` cap; otherwise the sketch doubles, and past half of ``min(m, n)`` the exact SVD decides.
``sv_cumulative`` needs ``Σσᵢ`` (the nuclear norm), which no sketch bounds: it always takes the exact SVD.

As everywhere in adaptool, the singular values go on B (``B = U_k diag(S_k)``, ``A = Vh_k``): scaling 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptool.strategies.lowrank import deterministic_svd as svd
from adaptool.strategies.rank_rules import RankRule, choose_rank

EXACT_MAX_DIM = 256  # up to this an exact SVD costs little (a 256 x 2048 one: ~0.05 s)
OVERSAMPLE = 32
MAX_POWER = 8  # power iterations at most (each: two m x n x L products, one per side)
POWER_TOL = 3e-4  # stop when the residual energy moved by less than this share of itself …
NOISE_FLOOR = 1e-7  # … or of ‖D‖² (float32 noise), whichever is larger
BLOCK_ELEMS = 1 << 18  # elements per row block of D - B A when measuring the error (stays in cache)


@dataclass(frozen=True)
class Truncation:
    """Rank-k factors of ``D (m, n)`` and how good they are.

    Attributes:
        B (torch.Tensor): ``(m, k)`` float32, ``U_k diag(S_k)``.
        A (torch.Tensor): ``(k, n)`` float32, ``Vh_k``.
        energy (float): share of ``‖D‖_F²`` the factors hold (1.0 for a zero D).
        error (float): ``‖D - B A‖_F / ‖D‖_F``, measured (0.0 for a zero D).
        best_error (float | None): the best rank-k error, from the exact spectrum; None after a sketch.
        method (str): "exact", "randomized" or "zero".
        norm (float): ``‖D‖_F``.
    """

    B: torch.Tensor
    A: torch.Tensor
    energy: float
    error: float
    best_error: float | None
    method: str
    norm: float = 0.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def truncate_dense(D: torch.Tensor, rule: RankRule, seed: int = 0) -> Truncation:
    """Factors of ``D`` at the rank ``rule`` picks (exact SVD when small, a seeded sketch when big).

    Args:
        D (torch.Tensor): ``(m, n)`` float32, on the compute device; not modified.
        rule (RankRule): ``--rank`` / ``--sv-fro`` / ``--sv-cumulative`` / ``--sv-ratio`` and ``max_rank``.
        seed (int): seeds the sketch's Gaussian test matrix (drawn on the CPU, so every device gets the same).

    Returns:
        Truncation: the factors, energy kept, measured error, and the best error where the spectrum is known.
    """
    m, n = D.shape
    total2 = squared_norm(D)
    if total2 == 0.0:
        return Truncation(D.new_zeros(m, 1), D.new_zeros(1, n), 1.0, 0.0, 0.0, "zero", 0.0)
    small = min(m, n)
    if small > EXACT_MAX_DIM and rule.kind != "sv_cumulative":
        width = _first_width(rule)
        while width < small // 2:
            found = _sketch(D, rule, width, total2, seed)
            if found is not None:
                B, A, energy = found
                return Truncation(B, A, energy, residual(D, B, A, total2), None, "randomized", math.sqrt(total2))
            width *= 2
    B, A, energy, best = _exact(D, rule, total2)
    return Truncation(B, A, energy, residual(D, B, A, total2), best, "exact", math.sqrt(total2))


def _first_width(rule: RankRule) -> int:
    """The first sketch's width: the rank asked for (or the cap) plus the oversampling; else 64 + it."""
    if rule.kind == "rank":
        k = int(rule.value) if rule.max_rank is None else min(int(rule.value), rule.max_rank)
    else:
        k = rule.max_rank or 64
    return k + OVERSAMPLE


def _exact(D: torch.Tensor, rule: RankRule, total2: float):
    """(B, A, energy, best error) from a full SVD."""
    U, S, Vh = svd(D)
    k = choose_rank(S, rule, tuple(D.shape))
    S64 = S.double() ** 2
    all2 = float(S64.sum()) or total2
    kept = float(S64[:k].sum())
    best = math.sqrt(float(S64[k:].sum()) / all2)
    return U[:, :k] * S[:k], Vh[:k].clone(), min(1.0, kept / all2), best


def _sketch(D: torch.Tensor, rule: RankRule, width: int, total2: float, seed: int):
    """(B, A, energy) from a randomized range finder of ``width`` columns, or None when the rule's rank is not
    decided within the sketch's reliable part (the caller widens it).

    Subspace iteration, alternating sides: each product with D refines one orthonormal basis (``left`` (m, L)
    or ``right`` (n, L)), and the R of its QR is the small core of D projected on that basis, whose singular
    values are the estimate so far (the energy it captures only grows, up to rounding). It stops when one
    product moved the captured energy by less than ``POWER_TOL`` of the residual (or float32 noise), so an
    easy spectrum costs four products with D.
    """
    m, n = D.shape
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, width, generator=g).to(D.device)
    left = torch.linalg.qr(D @ omega).Q
    reliable = width - OVERSAMPLE
    prev = None
    for half in range(2 * MAX_POWER + 1):
        if half % 2 == 0:  # D^T left = right R, so left left^T D = left R^T right^T
            right, R = torch.linalg.qr(D.T @ left)
            U, S, Vh = svd(R.T)
        else:  # D right = left R, so D right right^T = left R right^T
            left, R = torch.linalg.qr(D @ right)
            U, S, Vh = svd(R)
        captured = float((S[:reliable].double() ** 2).sum())
        if prev is not None and captured - prev <= POWER_TOL * max(total2 - captured, 0.0) + NOISE_FLOOR * total2:
            break
        prev = captured
    k = choose_rank(padded_spectrum(S, total2, min(m, n)), rule, (m, n))
    if k > reliable and k != rule.max_rank:
        return None
    B = left @ (U[:, :k] * S[:k])
    A = Vh[:k] @ right.T
    return B, A, min(1.0, float((S[:k].double() ** 2).sum()) / total2)


def padded_spectrum(S: torch.Tensor, total2: float, length: int) -> torch.Tensor:
    """The known top singular values ``S``, then the energy they miss, ``‖D‖² - Σ S²``, spread evenly over
    the ``length - len(S)`` unknown ones (as large as the tail can be on average: no rule undercounts it)."""
    missing = length - S.numel()
    if missing <= 0:
        return S.double()
    rest = max(total2 - float((S.double() ** 2).sum()), 0.0)
    tail = torch.full((missing,), math.sqrt(rest / missing), dtype=torch.float64, device=S.device)
    return torch.cat([S.double(), tail])


def squared_norm(D: torch.Tensor, B: torch.Tensor | None = None, A: torch.Tensor | None = None) -> float:
    """``‖D‖_F²``, or ``‖D - B A‖_F²`` (formed a row block at a time): float32 norms of rows (short sums, exact
    to float32 rounding) added in float64. A float32 ``vector_norm`` of a whole 5632 x 2048 matrix is off by
    ~1e-3 on the CPU, and a float64 one copies the matrix."""
    if B is None:
        dim = 1 if D.stride(-1) == 1 else 0  # along the contiguous dimension (Conv1D deltas are transposed views)
        return float((torch.linalg.vector_norm(D, dim=dim).double() ** 2).sum())
    rows = max(1, BLOCK_ELEMS // max(1, D.shape[1]))
    total = 0.0
    for start in range(0, D.shape[0], rows):
        block = D[start:start + rows] - B[start:start + rows] @ A
        total += float((torch.linalg.vector_norm(block, dim=1).double() ** 2).sum())
    return total


def residual(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor, total2: float) -> float:
    """``‖D - B A‖_F / ‖D‖_F`` (0.0 for a zero D), in row blocks (no second m x n matrix)."""
    return math.sqrt(squared_norm(D, B, A) / total2) if total2 > 0 else 0.0


def rounding_error(B: torch.Tensor, A: torch.Tensor, dtype) -> float:
    """``‖B A - round(B) round(A)‖_F`` for factors rounded to ``dtype``, from the factors alone:
    ``‖P Q‖_F² = Σ (PᵀP) ⊙ (Q Qᵀ)`` with ``P = [B, round(B)]``, ``Q = [A; -round(A)]`` (2k x 2k Gram matrices)."""
    P = torch.cat([B, B.to(dtype)], dim=1).double()
    Q = torch.cat([A, -A.to(dtype)], dim=0).double()
    return math.sqrt(max(float(((P.T @ P) * (Q @ Q.T)).sum()), 0.0))
