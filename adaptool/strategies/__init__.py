"""Merge strategies: pure functions over torch tensors (no I/O, no global state).

* :mod:`~adaptool.strategies.sparsify`: magnitude and random (DARE) pruning, per-tensor generators.
* :mod:`~adaptool.strategies.consensus`: TIES sign election and disjoint merge.
* :mod:`~adaptool.strategies.task_arithmetic`: linear / ties / dare / magnitude_prune as one table.
* :mod:`~adaptool.strategies.lowrank`: exact concat, QR+SVD truncation, dense SVD, clamping.
* :mod:`~adaptool.strategies.peft_factors`: ``space: factors``, PEFT's ``add_weighted_adapter`` per module.
"""

from adaptool.strategies.consensus import SIGN_METHODS, disjoint_merge, majority_sign_mask
from adaptool.strategies.lowrank import clamp_factors, concat_lowrank, refactor, svd_dense, truncate_lowrank
from adaptool.strategies.peft_factors import (
    COMBINATION_TYPES,
    ELEMENTWISE_TYPES,
    SVD_TYPES,
    combine_factors,
    peft_effective_type,
    peft_new_rank,
)
from adaptool.strategies.sparsify import check_density, generator_for, prune_magnitude, prune_random
from adaptool.strategies.task_arithmetic import METHODS, base_method, combine

__all__ = [
    "COMBINATION_TYPES",
    "ELEMENTWISE_TYPES",
    "METHODS",
    "SIGN_METHODS",
    "SVD_TYPES",
    "base_method",
    "check_density",
    "clamp_factors",
    "combine",
    "combine_factors",
    "concat_lowrank",
    "disjoint_merge",
    "generator_for",
    "majority_sign_mask",
    "peft_effective_type",
    "peft_new_rank",
    "prune_magnitude",
    "prune_random",
    "refactor",
    "svd_dense",
    "truncate_lowrank",
]
