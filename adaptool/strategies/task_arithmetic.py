"""The task-arithmetic family as one table: sparsification x sign consensus.

===============  ==============  ==============
method           sparsification  sign consensus
===============  ==============  ==============
linear           none            no
magnitude_prune  magnitude       no
ties             magnitude       yes
dare_linear      random          no
dare_ties        random          yes
===============  ==============  ==============

Without consensus the result is ``sum_i w_i * prune(t_i)``; with it, the mean over entries that agree with the
elected sign (:mod:`adaptool.strategies.consensus`). These reproduce PEFT 0.21.2 ``merge_utils``
(``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties``) bit for bit when given the
same random draws.
"""

import difflib
from collections.abc import Sequence

import torch

from adaptool.errors import AdaptoolError
from adaptool.strategies.consensus import SIGN_METHODS, disjoint_merge, majority_sign_mask
from adaptool.strategies.sparsify import check_density, prune_magnitude, prune_random

# method -> (sparsification or None, whether signs are elected)
METHODS: dict[str, tuple[str | None, bool]] = {
    "linear": (None, False),
    "magnitude_prune": ("magnitude", False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
}

Generators = torch.Generator | Sequence[torch.Generator] | None


def base_method(strategy: str) -> str:
    """The task-arithmetic method under a strategy name: ``svd`` is ``linear``, ``ties_svd`` is ``ties``, ...

    Args:
        strategy (str): a method of :data:`METHODS`, ``svd``, or a method with the ``_svd`` suffix.

    Returns:
        str: a key of :data:`METHODS`.

    Raises:
        AdaptoolError: if there is no such method.
    """
    if strategy == "svd":
        return "linear"
    method = strategy.removesuffix("_svd")
    _lookup(method)
    return method


def combine(
    tensors: list[torch.Tensor],
    weights: list[float],
    method: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    generators: Generators = None,
) -> torch.Tensor:
    """Merge same-shaped task tensors with a task-arithmetic method.

    Pruning runs in the tensors' own dtype, as in PEFT (so a bfloat16 input draws PEFT's DARE mask); the
    weighting, election and sum run in float32. Pass float32 tensors for the most accurate result.

    Args:
        tensors (list[torch.Tensor]): n tensors of one shape ``(*shape)``, on one device.
        weights (list[float]): n weights, any sign. They are not normalised.
        method (str): a key of :data:`METHODS`.
        density (float | None): fraction of entries kept; required by every method but ``linear``, ignored
            by ``linear``.
        majority_sign_method (str): ``"total"`` or ``"frequency"``, for ``ties`` and ``dare_ties``.
            Default: "total".
        generators (torch.Generator | Sequence[torch.Generator] | None): DARE's randomness: one generator
            per tensor, or one shared generator drawn from in tensor order. ``None`` uses torch's global
            generator (only to replay PEFT). Default: None.

    Returns:
        torch.Tensor: float32 ``(*shape)``.

    Raises:
        AdaptoolError: on an unknown method, a missing or invalid density, or mismatched inputs.
    """
    sparsification, elect = _lookup(method)
    _check_inputs(tensors, weights, majority_sign_method)
    if sparsification is not None:
        density = check_density(density, method)
        tensors = _sparsify(tensors, sparsification, density, generators)
    stacked = torch.stack([t.float() for t in tensors], dim=0)
    # torch.tensor of Python floats is float32, as in PEFT, so the products round identically.
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=stacked.device)
    weighted = stacked * w.view((-1,) + (1,) * (stacked.dim() - 1))
    if elect:
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


def _lookup(method: str) -> tuple[str | None, bool]:
    if method not in METHODS:
        close = difflib.get_close_matches(method, list(METHODS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(METHODS)}"
        raise AdaptoolError(f"unknown task-arithmetic method {method!r}", hint)
    return METHODS[method]


def _check_inputs(tensors: list[torch.Tensor], weights: list[float], majority_sign_method: str) -> None:
    if not tensors:
        raise AdaptoolError("nothing to merge: no tensors were given", "give at least one adapter")
    if len(tensors) != len(weights):
        raise AdaptoolError(
            f"{len(tensors)} tensors but {len(weights)} weights", "give one weight per adapter"
        )
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise AdaptoolError(
            f"cannot merge tensors of different shapes {sorted(shapes)}",
            "element-wise strategies need adapters of equal shape (and rank); use cat or svd",
        )
    if majority_sign_method not in SIGN_METHODS:
        raise AdaptoolError(
            f"unknown majority_sign_method {majority_sign_method!r}", f"use one of: {', '.join(SIGN_METHODS)}"
        )


def _sparsify(
    tensors: list[torch.Tensor], sparsification: str, density: float, generators: Generators
) -> list[torch.Tensor]:
    if sparsification == "magnitude":
        return [prune_magnitude(t, density) for t in tensors]
    if generators is None or isinstance(generators, torch.Generator):
        # One stream for all tensors, drawn in order: this is how PEFT consumes the global RNG.
        generators = [generators] * len(tensors)
    if len(generators) != len(tensors):
        raise AdaptoolError(
            f"{len(tensors)} tensors but {len(generators)} generators", "give one generator per tensor"
        )
    return [prune_random(t, density, g, rescale=True) for t, g in zip(tensors, generators)]
