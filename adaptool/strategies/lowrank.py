"""Exact low-rank algebra on LoRA factors: concatenate, truncate, re-factor, clamp.

A LoRA delta is ``B @ A`` with ``B: (out, r)`` and ``A: (r, in)``. A weighted sum of such deltas is again a
product of two factors (their concatenation), and its best rank-k approximation can be found from the
factors alone, with QR and an SVD of an R x R core, never forming the dense out x in matrix.

As in PEFT's ``svd`` merge, re-factored results put the singular values on ``B`` (``B = U diag(S)``,
``A = Vh``), so a LoRA built from them has scaling 1.
"""

import torch

from adaptool.errors import AdaptoolError

# torch.quantile refuses inputs above this many elements; beyond it a float32 rank cannot index exactly.
_QUANTILE_LIMIT = 2**24


def concat_lowrank(
    Bs: list[torch.Tensor], As: list[torch.Tensor], coeffs: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``sum_i c_i B_i A_i``, exactly, by concatenation (rank ``sum_i r_i``).

    The coefficient goes on A only, as in PEFT's ``cat``. Computed in the inputs' dtype.

    Args:
        Bs (list[torch.Tensor]): n tensors ``(out, r_i)``.
        As (list[torch.Tensor]): n tensors ``(r_i, in)``.
        coeffs (list[float]): n coefficients, any sign (weight times LoRA scaling).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``B (out, sum r_i)`` and ``A (sum r_i, in)``.
    """
    if not (len(Bs) == len(As) == len(coeffs)) or not Bs:
        raise AdaptoolError(
            f"concat needs as many B, A and coefficients, got {len(Bs)}, {len(As)}, {len(coeffs)}",
            "give one (B, A, coefficient) per adapter",
        )
    B = torch.cat(list(Bs), dim=1)
    A = torch.cat([a * c for a, c in zip(As, coeffs)], dim=0)
    return B, A


def truncate_lowrank(
    B: torch.Tensor, A: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k approximation (Eckart-Young) of ``B @ A`` without forming ``B @ A``.

    With ``B = Qb Rb`` and ``A^T = Qa Ra`` (reduced QR), ``B @ A = Qb (Rb Ra^T) Qa^T``, so the SVD of the small
    core ``Rb Ra^T = U S Vh`` gives the SVD of ``B @ A``. Cost: O((out + in) R^2 + R^3) time and O((out + in) R)
    memory, instead of O(out * in * min(out, in)) and O(out * in) for a dense SVD.

    Args:
        B (torch.Tensor): ``(out, R)``.
        A (torch.Tensor): ``(R, in)``.
        rank (int): target rank k >= 1.

    Returns:
        tuple[torch.Tensor, torch.Tensor, float]: float32 ``B_k (out, k')`` and ``A_k (k', in)`` with
        ``k' = min(k, R, out, in)``, and ``energy_kept = sum(S_k^2) / sum(S^2)`` (1.0 when ``B @ A`` is 0).
        When ``k >= R`` the product is already of rank <= k: the factors come back unchanged (as float32)
        with energy 1.0.
    """
    _check_rank(rank)
    if rank >= B.shape[1]:
        return B.float(), A.float(), 1.0
    # float64 for the small pieces: the cost is O((out + in) R^2) either way, and it keeps the result at the
    # float32 storage limit of the best rank-k approximation (a float32 QR adds ~1e-5 relative error).
    Qb, Rb = torch.linalg.qr(B.double())  # (out, m), (m, R)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (in, p), (p, R)
    U, S, Vh = deterministic_svd(Rb @ Ra.T)
    k = min(rank, S.numel())
    B_k = Qb @ (U[:, :k] * S[:k])
    A_k = Vh[:k] @ Qa.T
    return B_k.float(), A_k.float(), _energy(S, k)


def factor_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``B @ A`` from the factors (QR of each, SVD of the small core), in float64.

    Args:
        B (torch.Tensor): ``(out, R)``.
        A (torch.Tensor): ``(R, in)``.

    Returns:
        tuple: ``U (out, m)``, ``S (m,)`` descending, ``Vh (m, in)`` with ``B @ A = U diag(S) Vh`` and
        ``m = min(out, in, R)``; the best rank-k factors are ``U[:, :k] * S[:k]`` and ``Vh[:k]``.
    """
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = deterministic_svd(Rb @ Ra.T)
    return Qb @ U, S, Vh @ Qa.T


def svd_dense(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of a dense delta (a TIES/DARE result, which is not low-rank).

    Uses ``torch.linalg.svd(full_matrices=False)`` in float32: O(out * in * min(out, in)) time and about
    ``2 * out * in + min(out, in) * (out + in)`` floats of memory. For a 4096 x 14336 MLP matrix that is
    ~0.5 GB and seconds on a GPU, minutes on a CPU. For low-rank inputs use :func:`truncate_lowrank`.

    Args:
        D (torch.Tensor): ``(out, in)``.
        rank (int): target rank k >= 1.

    Returns:
        tuple[torch.Tensor, torch.Tensor, float]: float32 ``B_k (out, k')`` = ``U_k diag(S_k)`` and
        ``A_k (k', in)`` = ``Vh_k`` with ``k' = min(k, out, in)``, and ``energy_kept`` as in
        :func:`truncate_lowrank`.
    """
    _check_rank(rank)
    if D.dim() != 2:
        raise AdaptoolError(
            f"svd needs a 2-D delta, got shape {tuple(D.shape)}", "flatten conv kernels to (out, in*k*k) first"
        )
    U, S, Vh = deterministic_svd(D.float())
    k = min(rank, S.numel())
    # U * S equals PEFT's U @ diag(S) entry for entry, without the k x k matmul.
    return U[:, :k] * S[:k], Vh[:k], _energy(S, k)


RANDOMIZED_MIN_DIM = 1024  # below this an exact SVD is cheap enough
POWER_ITERATIONS = 4
OVERSAMPLE = 32


def refactor(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-k factors of a dense delta: exact SVD for small matrices, randomized subspace iteration for big ones.

    A dense float32 SVD of a 4096 x 14336 matrix takes minutes on a CPU; when ``k`` is well below
    ``min(out, in)`` a randomized range finder (``k + 32`` columns, 4 power iterations, a fixed seed so the
    result is reproducible) followed by an exact SVD of the small projection gets within a hair of the
    optimum at a few percent of the cost. ``energy_kept`` is always measured against the whole ``‖D‖²``.

    Returns:
        tuple[torch.Tensor, torch.Tensor, float]: ``B_k (out, k')``, ``A_k (k', in)``, energy kept.
    """
    _check_rank(rank)
    small = min(D.shape)
    if small <= RANDOMIZED_MIN_DIM or rank + OVERSAMPLE >= small // 2:
        return svd_dense(D, rank)
    D = D.float()
    g = torch.Generator(device=D.device).manual_seed(0)
    omega = torch.randn(D.shape[1], rank + OVERSAMPLE, generator=g, device=D.device)
    Q = torch.linalg.qr(D @ omega).Q
    for _ in range(POWER_ITERATIONS):
        Q = torch.linalg.qr(D @ torch.linalg.qr(D.T @ Q).Q).Q
    U, S, Vh = deterministic_svd(Q.T @ D)
    k = min(rank, S.numel())
    total = float(torch.linalg.vector_norm(D)) ** 2
    energy = float((S[:k] ** 2).sum()) / total if total > 0 else 1.0
    return Q @ (U[:, :k] * S[:k]), Vh[:k], min(1.0, energy)


def clamp_factors(
    B: torch.Tensor, A: torch.Tensor, quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to ``(-hi, hi)``, ``hi`` the ``quantile`` of all their entries (PEFT ``svd_clamp``).

    ``hi`` is taken over the signed values of ``B`` and ``A`` together, with linear interpolation, equal bit
    for bit to ``torch.quantile(cat([B.flatten(), A.flatten()]), quantile)`` where that works. It is found
    with two ``torch.kthvalue`` calls, so it also works past ``torch.quantile``'s 2**24-element limit.
    As in PEFT, a quantile below 0.5 usually gives a negative ``hi`` and then every entry becomes ``hi``.

    Args:
        B (torch.Tensor): ``(out, k)``.
        A (torch.Tensor): ``(k, in)``.
        quantile (float): in [0, 1].

    Returns:
        tuple[torch.Tensor, torch.Tensor]: the clamped ``B`` and ``A``.
    """
    quantile = float(quantile)
    if not 0.0 <= quantile <= 1.0:
        raise AdaptoolError(
            f"svd_clamp must be a quantile in [0, 1], got {quantile:g}", "e.g. 0.99 clamps the top 1%"
        )
    hi = _quantile_linear(torch.cat([B.flatten(), A.flatten()]), quantile)
    return B.clamp(-hi, hi), A.clamp(-hi, hi)


def _quantile_linear(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's default ("linear") for a 1-D tensor, by selection instead of a sort."""
    n = x.numel()
    # torch.quantile computes the rank as float(q) * (n - 1) in the input dtype; do the same to match it bit
    # for bit, and switch to float64 where float32 can no longer hold every index.
    pos_dtype = x.dtype if n <= _QUANTILE_LIMIT else torch.float64
    pos = torch.tensor(q, dtype=pos_dtype, device=x.device) * (n - 1)
    below = int(pos.floor())
    above = int(pos.ceil())
    v_below = torch.kthvalue(x, below + 1).values
    v_above = v_below if above == below else torch.kthvalue(x, above + 1).values
    return torch.lerp(v_below, v_above, (pos - below).to(x.dtype))


def deterministic_svd(M: torch.Tensor):
    """Reduced SVD whose bits do not depend on the thread count.

    LAPACK's CPU SVD splits its work by thread, so 1 and 2 threads give different last bits, and a merge
    would not be reproducible across machines. On the CPU it runs on one thread (QR, used above, is
    already thread-count independent); on a GPU the result is what the device's solver gives.
    """
    if M.device.type != "cpu":
        return torch.linalg.svd(M, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(M, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def _energy(S: torch.Tensor, k: int) -> float:
    total = float((S.double() ** 2).sum())
    if total == 0.0:
        return 1.0
    return float((S[:k].double() ** 2).sum()) / total


def _check_rank(rank: int) -> None:
    if int(rank) != rank or rank < 1:
        raise AdaptoolError(f"rank must be a positive integer, got {rank!r}", "set parameters.rank, e.g. 16")
