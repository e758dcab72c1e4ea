"""``space: factors``: PEFT 0.21.2 ``LoraModel.add_weighted_adapter``, one module at a time.

This reproduces PEFT's numbers on purpose, including where they are not the weighted sum of the deltas:

* ``cat``: ``A = cat(A_i * w_i * s_i)``, ``B = cat(B_i)``: exact, rank ``sum r_i``.
* ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``: the method is applied to the A matrices and to the B
  matrices separately, with weights ``sqrt(|w_i s_i|)`` (sign on A only). ``B_new @ A_new`` then contains
  cross terms ``B_i A_j``; only a single adapter is exact. ``space: delta`` is the exact alternative.
* ``svd`` and ``*_svd``: the method is applied to the dense deltas ``w_i``-weighted
  ``D_i = B_i A_i s_i``, then a rank-``new_rank`` SVD, with ``B = U S`` and ``A = Vh``.

The merged adapter has ``lora_alpha = r = new_rank`` (scaling 1) in PEFT, so the factors returned here
already contain every scaling. Results are float32; the caller rounds once to the output dtype (PEFT rounds
the A/B-path results to the dtype of the first adapter's A).

Factors are Linear-style: ``A (r, in)``, ``B (out, r)``. PEFT's embedding factors have the same layout
(``lora_embedding_A (r, num_embeddings)``, ``lora_embedding_B (dim, r)``); its SVD path builds their delta
transposed, which matters for which entries tie and for the order of the random draws, hence
``is_embedding``. The same holds for ``fan_in_fan_out`` (GPT-2 ``Conv1D``).
"""

import difflib
import math

import torch

from adaptool.errors import AdaptoolError
from adaptool.strategies.lowrank import clamp_factors, concat_lowrank, svd_dense
from adaptool.strategies.task_arithmetic import base_method, combine

ELEMENTWISE_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ELEMENTWISE_TYPES + ("cat",) + SVD_TYPES


def peft_effective_type(n_adapters: int, combination_type: str) -> str:
    """The combination type PEFT actually runs: any type with one adapter becomes ``linear``.

    Args:
        n_adapters (int): number of adapters in the whole merge (not on one module).
        combination_type (str): the requested type.

    Returns:
        str: the type PEFT uses.

    Raises:
        AdaptoolError: on an unknown type.
    """
    _check_type(combination_type)
    # PEFT's _check_add_weighted_adapter: with one adapter, svd_rank, density etc. are ignored.
    return "linear" if n_adapters == 1 else combination_type


def peft_new_rank(ranks: list[int], combination_type: str, svd_rank: int | None = None) -> int:
    """Rank of the merged adapter, by PEFT's rules.

    Args:
        ranks (list[int]): each adapter's rank: ``r``, or ``max(r, *rank_pattern.values())`` when it has a
            rank_pattern, as PEFT counts it.
        combination_type (str): the requested type (one adapter means ``linear``).
        svd_rank (int | None): the requested rank for the svd types; None or 0 means ``max(ranks)``.

    Returns:
        int: equal rank for the element-wise types, ``sum(ranks)`` for cat, ``svd_rank or max(ranks)`` for svd.

    Raises:
        AdaptoolError: on no adapters, an unknown type, or unequal ranks for an element-wise type.
    """
    if not ranks:
        raise AdaptoolError("nothing to merge: no adapters were given", "list at least one adapter")
    combination_type = peft_effective_type(len(ranks), combination_type)
    if combination_type in ELEMENTWISE_TYPES:
        if len(set(ranks)) != 1:
            raise AdaptoolError(
                f"strategy {combination_type} in space: factors needs adapters of equal rank, got ranks {list(ranks)}",
                "use space: delta (exact for any ranks), or strategy cat or svd",
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def combine_factors(
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scalings: list[float],
    weights: list[float],
    combination_type: str,
    *,
    new_rank: int,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
    generator: torch.Generator | None = None,
    is_embedding: bool = False,
    fan_in_fan_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module of PEFT's ``add_weighted_adapter``.

    Pass only the adapters that target this module, in recipe order, and the type from
    :func:`peft_effective_type`. PEFT applies no check on alpha, DoRA, rsLoRA or bias; neither does this.

    Args:
        As (list[torch.Tensor]): n ``lora_A`` (or ``lora_embedding_A``) ``(r_i, in)``.
        Bs (list[torch.Tensor]): n ``lora_B`` (or ``lora_embedding_B``) ``(out, r_i)``.
        scalings (list[float]): n LoRA scalings (``alpha / r`` or ``alpha / sqrt(r)``) for this module.
        weights (list[float]): n merge weights, any sign.
        combination_type (str): one of :data:`COMBINATION_TYPES`.
        new_rank (int): from :func:`peft_new_rank`. Results are zero-padded to it, so modules whose
            adapters have a smaller rank still load (PEFT leaves them short, #3737).
        density (float | None): fraction kept, for the pruning types.
        majority_sign_method (str): ``"total"`` or ``"frequency"``. Default: "total".
        svd_clamp (float | None): quantile in [0, 1] to clamp the svd factors to; None for no clamp.
        generator (torch.Generator | None): DARE's randomness, drawn for all A_i then all B_i (or for each
            D_i), as PEFT draws it. None uses torch's global generator, which replays PEFT after
            ``torch.manual_seed``. Default: None.
        is_embedding (bool): the module is an ``nn.Embedding``. Default: False.
        fan_in_fan_out (bool): the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``). Default: False.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: float32 ``A (new_rank, in)`` and ``B (out, new_rank)``.

    Raises:
        AdaptoolError: on an unknown type, missing density, or factors that cannot be combined.
    """
    _check_type(combination_type)
    _check_lengths(As, Bs, scalings, weights)
    if combination_type == "cat":
        B, A = concat_lowrank(Bs, [a * w for a, w in zip(As, weights)], scalings)
    elif combination_type in SVD_TYPES:
        A, B = _svd_path(As, Bs, scalings, weights, combination_type, new_rank, density,
                         majority_sign_method, svd_clamp, generator, is_embedding or fan_in_fan_out)
    else:
        A, B = _elementwise_path(As, Bs, scalings, weights, combination_type, density,
                                 majority_sign_method, generator)
    return _pad_rank(A.float(), B.float(), new_rank)


def _elementwise_path(As, Bs, scalings, weights, combination_type, density, majority_sign_method, generator):
    weights_A, weights_B = [], []
    for w, s in zip(weights, scalings):
        # Computed in Python floats exactly as PEFT does; the sign goes on A only (#2918).
        ws = w * s
        sign = 1 if ws >= 0 else -1
        weights_A.append(math.sqrt(abs(ws)) * sign)
        weights_B.append(math.sqrt(abs(ws)))
    # A first, then B: the order PEFT draws DARE masks in.
    A = combine(list(As), weights_A, combination_type, density, majority_sign_method, generator)
    B = combine(list(Bs), weights_B, combination_type, density, majority_sign_method, generator)
    return A, B


def _svd_path(As, Bs, scalings, weights, combination_type, new_rank, density, majority_sign_method,
              svd_clamp, generator, transposed):
    for a in As:
        if a.dim() != 2:
            raise AdaptoolError(
                f"{combination_type} in space: factors supports 2-D LoRA factors, got A of shape {tuple(a.shape)}",
                "use space: delta, or strategy cat or linear, for conv adapters",
            )
    deltas = [_peft_delta(a, b, s, transposed) for a, b, s in zip(As, Bs, scalings)]
    D = combine(deltas, list(weights), base_method(combination_type), density, majority_sign_method, generator)
    if transposed:
        D = D.T
    B, A, _ = svd_dense(D, new_rank)
    if svd_clamp is not None:
        B, A = clamp_factors(B, A, svd_clamp)
    return A, B


def _peft_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """``get_delta_weight`` of a LoRA Linear/Embedding: ``(B @ A)[.T] * s``, rounded to the factors' dtype."""
    # PEFT multiplies half-precision factors in float32 (on CPU) and rounds the delta back to their dtype;
    # the pruning that follows sees those rounded values, so we round them too.
    delta = B.float() @ A.float()
    if transposed:
        delta = delta.T
    return (delta * scaling).to(A.dtype)


def _pad_rank(A: torch.Tensor, B: torch.Tensor, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = A.shape[0]
    if r > new_rank:
        raise AdaptoolError(
            f"merged factors have rank {r}, above the adapter's rank {new_rank}",
            "compute new_rank with peft_new_rank over all adapters",
        )
    if r == new_rank:
        return A, B
    # Zero rows of A / columns of B leave B @ A unchanged and keep every module at the config's rank.
    A_pad = A.new_zeros((new_rank,) + tuple(A.shape[1:]))
    B_pad = B.new_zeros((B.shape[0], new_rank) + tuple(B.shape[2:]))
    A_pad[:r] = A
    B_pad[:, :r] = B
    return A_pad, B_pad


def _check_type(combination_type: str) -> None:
    if combination_type not in COMBINATION_TYPES:
        close = difflib.get_close_matches(combination_type, COMBINATION_TYPES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(COMBINATION_TYPES)}"
        raise AdaptoolError(f"unknown strategy {combination_type!r}", hint)


def _check_lengths(As, Bs, scalings, weights) -> None:
    if not As:
        raise AdaptoolError("nothing to merge on this module: no adapters target it", "skip the module")
    if not (len(As) == len(Bs) == len(scalings) == len(weights)):
        raise AdaptoolError(
            f"got {len(As)} A, {len(Bs)} B, {len(scalings)} scalings and {len(weights)} weights",
            "give one of each per adapter on the module",
        )
