"""Sign consensus (the "elect" and "disjoint merge" steps of TIES).

Same semantics as PEFT 0.21.2 ``calculate_majority_sign_mask`` and ``disjoint_merge``: the election runs on
the pruned but UNWEIGHTED tensors, a tie (or an all-zero column) elects +1, and pruned zeros never agree with
the elected sign, so they do not count in the mean.
"""

import torch

from adaptool.errors import AdaptoolError

SIGN_METHODS = ("total", "frequency")


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Which entries agree with the elected sign of their position.

    Args:
        stacked (torch.Tensor): ``(n, *shape)``, the n pruned task tensors stacked on dim 0, before weighting.
        method (str): ``"total"`` elects the sign of the sum of values; ``"frequency"`` the sign held by
            more tensors. Default: "total".

    Returns:
        torch.Tensor: bool ``(n, *shape)``, True where ``sign(stacked)`` equals the elected sign.

    Raises:
        AdaptoolError: on an unknown ``method``.
    """
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise AdaptoolError(
            f"unknown majority_sign_method {method!r}", f"use one of: {', '.join(SIGN_METHODS)}"
        )
    # ">= 0": a tie elects +1, as in PEFT.
    elected = torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected


def disjoint_merge(weighted_stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted entries that agree with the elected sign.

    This is a mean over the agreeing entries, not a sum, and the weights are not normalised: it is PEFT's
    definition. Positions where nothing agrees are 0 (the count is clamped to 1).

    Args:
        weighted_stacked (torch.Tensor): ``(n, *shape)``, the pruned tensors times their weights.
        mask (torch.Tensor): bool ``(n, *shape)`` from :func:`majority_sign_mask`.

    Returns:
        torch.Tensor: ``(*shape)``.
    """
    total = (weighted_stacked * mask).sum(dim=0)
    count = mask.sum(dim=0)
    return total / torch.clamp(count, min=1.0)
