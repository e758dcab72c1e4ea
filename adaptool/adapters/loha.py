"""LoHa (low-rank Hadamard product) as PEFT 0.21.2 merges it (``tuners/loha/layer.py``).

Per module ``ΔW = ((w1_a @ w1_b) * (w2_a @ w2_b)) * scale`` reshaped to the weight, ``scale = alpha / r``
(rank_pattern/alpha_pattern by first match). Linear: ``w1_a`` (out, r), ``w1_b`` (r, in). Conv1d/Conv2d keep
the kernel flattened into the columns (``w1_b`` (r, in·k…)) unless ``use_effective_conv2d`` saved the CP
cores ``hada_t1``/``hada_t2`` (r, r, kh, kw; Conv1d (r, r, k, 1)), with ``w1_a`` (r, out), ``w1_b`` (r, in):
``rebuild = einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``, ``ΔW = rebuild1 * rebuild2 * scale``. PEFT adds ΔW
(float32) to the weight in place, one rounding; so do we.
"""

from __future__ import annotations

import torch

from adaptool.adapters.common import (check_rank, incomplete, inconsistent, loader, lycoris_scaling, misfit, module_keys,
                                      refuse_layer)
from adaptool.adapters.family import Family
from adaptool.adapters.layout import numel, same_kernel
from adaptool.adapters.saved import aux_edits
from adaptool.adapters.source import Adapter
from adaptool.ops.edits import AddDelta
from adaptool.io.checkpoint import Checkpoint
from adaptool.plan.resolve import TensorResolver

W1A, W1B, W2A, W2B, T1, T2 = ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"
OWN = (W1A, W1B, W2A, W2B, T1, T2)
FACTORS = (W1A, W1B, W2A, W2B)


def loha_edits(adapter: Adapter, base: Checkpoint) -> list:
    """Edits of a LoHa adapter against checkpoint ``base`` (names resolved, shapes checked)."""
    resolve = TensorResolver(base, adapter)
    edits = aux_edits(adapter, base, resolve, OWN)
    for path, keys in module_keys(adapter, OWN).items():
        needed = FACTORS + ((T1, T2) if T1 in keys or T2 in keys else ())
        missing = [s for s in needed if s not in keys]
        if missing:
            raise incomplete(adapter, path, missing[0])
        target = resolve.tensor(path, "weight")
        w_shape = tuple(base.tensors[target].shape)
        if len(w_shape) not in (2, 3, 4):
            raise refuse_layer(adapter, path, "LoHa", w_shape, "Linear, Conv1d and Conv2d layers")
        r, scaling = lycoris_scaling(adapter, path)
        cp = T1 in keys
        rank = _check_shapes(adapter, path, keys, w_shape, cp)
        check_rank(adapter, path, rank, r)
        edits.append(AddDelta(target, adapter.source, _delta(adapter, keys, w_shape, scaling, cp), row_wise=not cp))
    return edits


def _check_shapes(adapter, path, keys, w_shape, cp: bool) -> int:
    """Check the four factors (and CP cores) against each other and the base; return the rank on disk."""
    a1, b1, a2, b2 = (tuple(adapter.shape(keys[s])) for s in FACTORS)
    if a1 != a2 or b1 != b2 or len(a1) != 2 or len(b1) != 2:
        raise inconsistent(adapter, path, a1, b1, a2, b2)
    if cp:
        t1, t2 = tuple(adapter.shape(keys[T1])), tuple(adapter.shape(keys[T2]))
        rank = a1[0]
        if t1 != t2 or len(t1) != 4 or t1[:2] != (rank, rank) or b1[0] != rank:
            raise inconsistent(adapter, path, t1, a1, b1)
        implied = (a1[1], b1[1], *t1[2:])  # Conv1d cores are (r, r, k, 1)
        if len(w_shape) < 3 or not same_kernel(implied, w_shape):
            raise misfit(adapter, path, implied, w_shape)
        return rank
    if a1[1] != b1[0]:
        raise inconsistent(adapter, path, a1, b1)
    # A conv without CP cores has its kernel flattened into w1_b's columns.
    if a1[0] != w_shape[0] or b1[1] != numel(w_shape[1:]):
        raise misfit(adapter, path, (a1[0], b1[1]), w_shape)
    return a1[1]


def _delta(adapter, keys, w_shape, scaling: float, cp: bool):
    """``device -> ((start, stop) -> ΔW[start:stop])`` in PEFT's operation order, float32: a block is
    ``(stop - start, *w_shape[1:])``."""
    loads = {s: loader(adapter, keys[s]) for s in keys}

    def rows(device):
        w1a, w1b, w2a, w2b = (loads[s](device) for s in FACTORS)
        # PEFT passes the scale as a 0-dim float32 tensor (torch.tensor(alpha / r)); same rounding here.
        scale = torch.tensor(scaling, dtype=torch.float32)
        if cp:
            t1, t2 = loads[T1](device), loads[T2](device)
            rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
            full = (rebuild1 * rebuild2 * scale).reshape(w_shape)
            return lambda start, stop: full[start:stop].clone()  # the engine adds into what we return
        tail = w_shape[1:]
        # A row of ΔW needs only that row of w1_a and w2_a: each block is the same products PEFT computes.
        return lambda start, stop: (((w1a[start:stop] @ w1b) * (w2a[start:stop] @ w2b)) * scale).reshape(stop - start, *tail)

    return rows


# What the registry (adaptool.adapters.registry) knows of this family.
FAMILY = Family("LOHA", loha_edits, OWN, additive=True)
