"""Sparsification: keep a fraction of a tensor's entries, by magnitude or at random.

These are the "trim" and "drop" steps shared by TIES, DARE and magnitude pruning. They follow PEFT 0.21.2
``peft.utils.merge_utils`` (``magnitude_based_pruning``, ``random_pruning``) operation for operation, so that
the same inputs and the same random draws give bit-identical results.

``density`` is always the fraction of entries KEPT. A density of 1 or more returns the tensor unchanged (no
rescale), as PEFT's ``prune`` does.
"""

import hashlib

import torch

from adaptool.errors import AdaptoolError


def check_density(density: float | None, method: str) -> float:
    """Validate the ``density`` parameter of a pruning method.

    Args:
        density (float | None): fraction of entries kept.
        method (str): the strategy that needs it, named in the error.

    Returns:
        float: ``density`` as a float.

    Raises:
        AdaptoolError: if ``density`` is missing or not in (0, 1].
    """
    if density is None:
        raise AdaptoolError(
            f"strategy {method} needs parameters.density",
            "set parameters.density to the fraction of entries to keep, e.g. 0.5",
        )
    density = float(density)
    # 0 would make DARE divide by zero (PEFT returns NaN); above 1 is most likely a percentage typo.
    if not 0.0 < density <= 1.0:
        raise AdaptoolError(
            f"parameters.density must be in (0, 1], got {density:g}",
            "density is the fraction of entries kept: 0.5 keeps half",
        )
    return density


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * t.numel())`` entries of largest magnitude and zero the rest.

    Ties in ``|t|`` are broken by ``torch.topk``, exactly as PEFT breaks them (on the same device: the CPU and
    CUDA kernels order ties differently).

    Args:
        t (torch.Tensor): tensor of any shape.
        density (float): fraction of entries kept; the count is floored, as in PEFT.

    Returns:
        torch.Tensor: same shape and dtype as ``t``.
    """
    if density >= 1:
        return t
    k = int(density * t.numel())
    # topk rather than a sort or a quantile threshold: it is what PEFT uses, so ties break identically, and it
    # needs no 2**24-element cap.
    keep = torch.topk(t.abs().reshape(-1), k=k, largest=True).indices
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[keep] = 1
    return t * mask.reshape(t.shape)


def prune_random(
    t: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True
) -> torch.Tensor:
    """Drop entries at random (DARE): keep each with probability ``density``, then divide by ``density``.

    The mask is drawn as PEFT draws it, ``bernoulli(full_like(t, density))``, so the keep-probability is
    ``density`` rounded to ``t.dtype`` (0.3 becomes 0.30078125 in bfloat16) and the rescale happens in
    ``t.dtype``. Pass float32 tensors to avoid both roundings.

    Args:
        t (torch.Tensor): tensor of any shape.
        density (float): probability of keeping an entry.
        generator (torch.Generator | None): source of the draws, on ``t``'s device. ``None`` uses torch's
            global generator; only tests that replay PEFT should want that.
        rescale (bool): divide the kept entries by ``density`` so the expectation is unchanged. Default: True.

    Returns:
        torch.Tensor: same shape and dtype as ``t``.
    """
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    pruned = t * mask
    if rescale:
        pruned = pruned / density
    return pruned


def generator_for(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A random generator that depends only on ``(seed, name)``.

    Each output tensor gets its own stream, so DARE masks do not depend on the order tensors are processed
    in or on the number of worker threads. The seed is a SHA-256 digest, not Python's ``hash()``, which is
    salted per process.

    The stream does depend on the device type: CPU and CUDA generators are different algorithms, so the
    same seed gives different masks on ``cpu`` and ``cuda``.

    Args:
        seed (int): the recipe's seed.
        name (str): the output tensor's name.
        device (torch.device | str): where the draws happen; must be the device of the tensors pruned with
            it. Default: "cpu".

    Returns:
        torch.Generator: a freshly seeded generator.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    generator = torch.Generator(device=device)
    # 63 bits: every generator type accepts a non-negative int64 seed.
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator
