"""The best rank-k factors of one LoRA module's ``ΔW = scale·B·A`` (or of a dense ΔW), without forming ΔW when it
is given by its factors: the maths ``resize`` introduced and ``align`` reuses for a rank cut.

With ``B (out, r)`` and ``A (r, in)``, the Gram matrices ``BᵀB = V_B Λ_B V_Bᵀ`` and ``AAᵀ = V_A Λ_A V_Aᵀ``
give ``B = Q_B Λ_B^½ V_Bᵀ`` and ``A = V_A Λ_A^½ Q_Aᵀ`` with orthonormal ``Q``, so
``ΔW = Q_B (s·Λ_B^½ V_Bᵀ V_A Λ_A^½) Q_Aᵀ`` and the SVD of that r x r core is the SVD of ΔW. Cost:
O((out + in)·r²), two passes over the factors in cache-sized blocks. Where a factor is too ill-conditioned for
the Gram route, the QR route of :func:`adaptool.strategies.lowrank.factor_svd` (same result, slower).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from adaptool.strategies.lowrank import factor_svd
from adaptool.strategies.rank_rules import RankRule, choose_rank

#: The Gram route in a precision only while each factor's λ_min/λ_max (1/κ²) is above this: κ ≤ 100 for float32
#: Gram matrices (results within ~1e-5, used for 16-bit outputs), κ ≤ 1e4 for float64 (float32 rounding);
#: beyond that the QR route.
GRAM_MIN_RATIO = {torch.float32: 1e-4, torch.float64: 1e-8}
NON_FINITE = "non-finite"  # gram_svd's answer when a Gram matrix holds NaN/Inf
BLOCK_ELEMS = 1 << 19  # elements of a factor converted at a time on a CPU (2 MB of float32)


class NonFiniteFactors(ValueError):
    """The factors hold NaN/Inf (or their products overflow float64): the caller names the tensor."""


def best_from_factors(B: torch.Tensor, A: torch.Tensor, scale: float, rule: RankRule, shape: tuple[int, int],
                      out_dtype=torch.float32, fast: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Best rank-k factors of ``ΔW = scale·B·A``, k by ``rule``, without forming ΔW.

    Three routes, the fastest that stays accurate: float32 Gram matrices when ``fast`` (the result is rounded to
    a 16-bit dtype anyway) and both factors are well conditioned (κ ≤ 100: error ≲ 1e-5 relative, far below
    bf16's 4e-3 rounding); float64 Gram matrices while κ ≤ 1e4 (float32 rounding of the result); else QR of each
    factor (:func:`~adaptool.strategies.lowrank.factor_svd`). On the Gram routes the factors are read in row
    blocks converted into one scratch buffer, and the results written straight into ``out_dtype`` tensors.

    Args:
        B (torch.Tensor): ``(out, r)``, any float dtype. A (torch.Tensor): ``(r, in)``.
        scale (float): the LoRA scaling (any sign).
        rule (RankRule): how many singular values to keep. shape: ``(out, in)`` of ΔW (for the noise floor).
        out_dtype (torch.dtype): dtype of the returned factors. fast (bool): allow the float32 Gram route.

    Returns:
        tuple: ``B_k (out, k)`` = ``U_k S_k`` and ``A_k (k, in)`` = ``V_kᵀ`` in ``out_dtype``, float64 ``S`` (every
        singular value, descending), and k.
    """
    for precision in ((torch.float32, torch.float64) if fast else (torch.float64,)):
        gram = gram_svd(B, A, scale, precision)
        if gram is NON_FINITE and precision == torch.float64:
            raise NonFiniteFactors("a factor holds NaN/Inf, or its Gram matrix overflows float64")
        if gram is not None and gram is not NON_FINITE:
            break
    else:
        U, S, Vh = factor_svd(B.double() * scale, A)
        k = choose_rank(S, rule, shape)
        B_k, A_k = signed(U[:, :k] * S[:k], Vh[:k], Vh[:k].sum(dim=1))
        return B_k.to(out_dtype), A_k.to(out_dtype), S, k
    S, left, right, a_sums = gram
    k = choose_rank(S, rule, shape)
    # B_k = B @ (L_k S_k), A_k = R_k @ A: the signs fixed on the small matrices, before the big products
    L_k, R_k = signed(left[:, :k] * S[:k], right[:k], right[:k] @ a_sums)
    return (blocked_product(B, L_k.to(precision), out_dtype),
            blocked_product(A, R_k.to(precision), out_dtype, cols=True), S, k)


def gram_svd(B: torch.Tensor, A: torch.Tensor, scale: float, precision=torch.float64):
    """``(S, L, R, a)`` with ``scale·B·A = (B L) diag(S) (R A)``, ``B L`` and ``(R A)ᵀ`` orthonormal, from the Gram
    matrices of the factors computed in ``precision`` (L: ``(r, m)``, R: ``(m, r)``, S descending, all float64;
    ``a``: the row sums of A, float64, taken in the same pass);
    None when a factor is too ill-conditioned for that precision (:data:`GRAM_MIN_RATIO`); :data:`NON_FINITE` when
    a Gram matrix is not finite: a NaN/Inf anywhere in a factor reaches its Gram matrix's diagonal (Σ x²), so this
    is the factors' finiteness check, at no cost — or the squares overflowed ``precision``."""
    a_sums = torch.zeros(A.shape[0], dtype=precision, device=A.device)
    gb, ga = blocked_gram(B, precision).double(), blocked_gram(A, precision, cols=True, sums=a_sums).double()
    if not (bool(torch.isfinite(gb).all()) and bool(torch.isfinite(ga).all())):
        return NON_FINITE
    with one_thread(B.device):
        lb, vb = torch.linalg.eigh(gb)
        la, va = torch.linalg.eigh(ga)
        floor = GRAM_MIN_RATIO[precision]
        if not (lb[0] > floor * lb[-1] and la[0] > floor * la[-1]):
            return None
        sb, sa = lb.sqrt(), la.sqrt()
        # B = Q_B diag(sb) vbᵀ and A = va diag(sa) Q_Aᵀ: the core's SVD is ΔW's. Its factors have orthogonal
        # rows/columns and a bounded condition (the floor above), so the product loses nothing a QR would keep.
        U, S, Vh = torch.linalg.svd((sb[:, None] * vb.T * scale) @ (va * sa), full_matrices=False)
    return S, (vb / sb) @ U, (Vh / sa) @ va.T, a_sums.double()


def _blocks(X: torch.Tensor, precision, cols: bool = False):
    """``(start, stop, block)``: the rows of ``X`` (n, r) — or with ``cols`` the columns of ``X`` (r, n) —
    converted to ``precision`` a block at a time into one scratch buffer (on a CPU: cache-sized, and no fresh
    memory to fault in per module; on a GPU: one block)."""
    n, width = (X.shape[1], X.shape[0]) if cols else X.shape
    step = max(1, BLOCK_ELEMS // max(1, width)) if X.device.type == "cpu" else max(1, n)
    shape = (width, min(step, n)) if cols else (min(step, n), width)
    scratch = torch.empty(shape, dtype=precision, device=X.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = scratch[:, : stop - start] if cols else scratch[: stop - start]
        block.copy_(X[:, start:stop] if cols else X[start:stop])
        yield start, stop, block


def blocked_gram(X: torch.Tensor, precision, cols: bool = False, sums: torch.Tensor | None = None) -> torch.Tensor:
    """``XᵀX`` of ``X`` (n, r) — with ``cols``, ``XXᵀ`` of ``X`` (r, n) — an r x r matrix in ``precision``;
    ``sums`` (r,), when given, gets the sums of X's r columns (with ``cols``: rows) added from the same blocks."""
    r = X.shape[0] if cols else X.shape[1]
    G = torch.zeros(r, r, dtype=precision, device=X.device)
    for _, _, block in _blocks(X, precision, cols):
        if cols:
            G.addmm_(block, block.T)
        else:
            G.addmm_(block.T, block)
        if sums is not None:
            sums += block.sum(dim=1 if cols else 0)
    return G


def blocked_product(X: torch.Tensor, M: torch.Tensor, out_dtype, cols: bool = False) -> torch.Tensor:
    """``X @ M`` ((n, r) @ (r, k)) — with ``cols``, ``M @ X`` ((k, r) @ (r, n)) — computed in ``M``'s dtype,
    rounded once into an ``out_dtype`` tensor."""
    n = X.shape[1] if cols else X.shape[0]
    out = torch.empty((M.shape[0], n) if cols else (n, M.shape[1]), dtype=out_dtype, device=X.device)
    tmp = None
    for start, stop, block in _blocks(X, M.dtype, cols):
        if tmp is None:
            tmp = torch.empty((M.shape[0], block.shape[1]) if cols else (block.shape[0], M.shape[1]),
                              dtype=M.dtype, device=X.device)
        if cols:
            part = tmp[:, : stop - start]
            torch.mm(M, block, out=part)
            out[:, start:stop].copy_(part)
        else:
            part = tmp[: stop - start]
            torch.mm(block, M, out=part)
            out[start:stop].copy_(part)
    return out


def best_from_dense(D: torch.Tensor, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Best rank-k factors of a dense ``ΔW (out, in)`` by an exact float64 SVD (see :func:`best_from_factors`)."""
    wide = D.shape[0] < D.shape[1]
    X = (D.T if wide else D).double()  # tall: QR first, then the SVD of the small square R
    with one_thread(D.device):
        Q, R = torch.linalg.qr(X)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    U = Q @ U
    if wide:  # D = (U S Vh)ᵀ = Vhᵀ S Uᵀ
        U, Vh = Vh.T, U.T
    k = choose_rank(S, rule, tuple(D.shape))
    B_k, A_k = signed(U[:, :k] * S[:k], Vh[:k], Vh[:k].sum(dim=1))
    return B_k.float(), A_k.float(), S, k


def signed(left: torch.Tensor, right: torch.Tensor, row_sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each singular pair's sign fixed so that every row of the final ``A_k`` sums to a number ≥ 0 (``row_sums``:
    those sums as computed): every route and device then gives the same factors up to rounding, not up to sign.
    ``left`` (…, k) and ``right`` (k, …) are the factors or the small matrices that make them."""
    sign = torch.where(row_sums < 0, -1.0, 1.0).to(left.dtype)
    return left * sign, right * sign[:, None]


def energy_kept(S: torch.Tensor, k: int) -> float:
    """``Σ_{i≤k} σᵢ² / Σ σᵢ²`` (1.0 for a zero ΔW)."""
    total = float((S.double() ** 2).sum())
    return 1.0 if total == 0.0 else min(1.0, float((S[:k].double() ** 2).sum()) / total)


@contextmanager
def one_thread(device):
    """Small LAPACK calls on one CPU thread: their bits then do not depend on the thread count, and an
    OpenMP team on a 64 x 64 problem only costs time (100x here on 2 cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
