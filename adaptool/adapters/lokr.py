"""LoKr (low-rank Kronecker product) as PEFT 0.21.2 merges it (``tuners/lokr/layer.py``).

Per module ``ΔW = kron(w1, w2) * (alpha / r)`` reshaped to the weight, where each factor is saved either
whole (``lokr_w1``, ``lokr_w2``) or as a low-rank pair (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``),
and for a conv with ``use_effective_conv2d`` ``w2`` is a CP product of ``lokr_t2`` (r, r, kh, kw).
PEFT picks whole or factored from r and the factorisation of the dimensions; we branch on the keys present
and read every size from the tensors. The scale is always ``alpha / r`` (even when both factors are whole,
where LyCORIS uses 1), so r comes from the config and its rank_pattern.
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
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.plan.resolve import TensorResolver

W1, W1A, W1B = ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b"
W2, W2A, W2B, T2 = ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"
OWN = (W1, W1A, W1B, W2, W2A, W2B, T2)


def lokr_edits(adapter: Adapter, base: Checkpoint) -> list:
    """Edits of a LoKr adapter against checkpoint ``base`` (names resolved, shapes checked)."""
    resolve = TensorResolver(base, adapter)
    edits = aux_edits(adapter, base, resolve, OWN)
    for path, keys in module_keys(adapter, OWN).items():
        target = resolve.tensor(path, "weight")
        w_shape = tuple(base.tensors[target].shape)
        if len(w_shape) not in (2, 3, 4):
            raise refuse_layer(adapter, path, "LoKr", w_shape, "Linear, Conv1d and Conv2d layers")
        if T2 in keys and len(w_shape) == 3:
            raise AdaptoolError(f"{adapter.source}: LoKr with use_effective_conv2d on {path}, a Conv1d, cannot be folded: "
                                "PEFT 0.21.2 fails on it in forward and merge alike, so nothing defines its weights",
                                "retrain it without use_effective_conv2d")
        r, scaling = lycoris_scaling(adapter, path)
        w1_shape, w2_shape, ranks = _factor_shapes(adapter, path, keys)
        for rank in ranks:
            check_rank(adapter, path, rank, r)
        _check_fit(adapter, path, w1_shape, w2_shape, w_shape)
        edits.append(AddDelta(target, adapter.source, _delta(adapter, keys, w_shape, w2_shape, scaling),
                              row_wise=len(w2_shape) == 2))
    return edits


def _factor_shapes(adapter, path, keys) -> tuple[tuple, tuple, list[int]]:
    """Shapes of w1 and w2 as PEFT rebuilds them, and the ranks of the factored ones (checked for consistency)."""
    shape = lambda suffix: tuple(adapter.shape(keys[suffix]))  # noqa: E731
    ranks = []
    if W1 in keys:
        w1 = shape(W1)
    else:
        a, b = _need(adapter, path, keys, W1A, W1B, shape)
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise inconsistent(adapter, path, a, b)
        w1, ranks = (a[0], b[1]), ranks + [a[1]]
    if W2 in keys:
        w2 = shape(W2)
    elif T2 in keys:
        t, a, b = shape(T2), *_need(adapter, path, keys, W2A, W2B, shape)
        if len(t) != 4 or len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
            raise inconsistent(adapter, path, t, a, b)
        w2, ranks = (a[1], b[1], t[2], t[3]), ranks + [t[0], t[1]]
    else:
        a, b = _need(adapter, path, keys, W2A, W2B, shape)
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise inconsistent(adapter, path, a, b)
        w2, ranks = (a[0], b[1]), ranks + [a[1]]
    if len(w1) != 2:
        raise inconsistent(adapter, path, w1)
    if not 2 <= len(w2) <= 4:
        raise inconsistent(adapter, path, w1, w2)
    return w1, w2, ranks


def _need(adapter, path, keys, first, second, shape):
    """The shapes of a low-rank pair of factors (refused when one is missing)."""
    for suffix in (first, second):
        if suffix not in keys:
            raise incomplete(adapter, path, suffix)
    return shape(first), shape(second)


def _check_fit(adapter, path, w1, w2, w_shape) -> None:
    """``kron(w1, w2)`` must have the weight's rows, and its columns must reshape onto the weight.

    A 2-D w2 carries a conv's flattened kernel in its columns, like LoHa. A conv-shaped w2 (whole, or the
    CP product, (k, 1) for a Conv1d) gives the kernel its own dims.
    """
    if len(w2) == 2:
        implied = (w1[0] * w2[0], w1[1] * w2[1])
        ok = implied[0] == w_shape[0] and implied[1] == numel(w_shape[1:])
    else:
        implied = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        ok = len(w_shape) > 2 and same_kernel(implied, w_shape)
    if not ok:
        raise misfit(adapter, path, implied, w_shape)


def _delta(adapter, keys, w_shape, w2_shape, scaling: float):
    """``device -> ((start, stop) -> ΔW[start:stop])``, PEFT's ``make_kron`` then reshape.

    With a 2-D w2, row ``i`` of ``kron(w1, w2)`` is row ``i // h`` of w1 times row ``i % h`` of w2 (``h`` =
    w2's rows), each element one product, so the product is built a few rows of w1 at a time, bit-identical
    to the same rows of PEFT's. A conv-shaped w2 is done whole, exactly as PEFT does it: for a Conv1d whole w2
    PEFT's ``torch.kron`` of a 2-D and a 3-D factor pads w1 to (1, a, c) before the reshape, and the adapter
    was trained through that same layout. A block is ``(stop - start, *w_shape[1:])``.
    """
    loads = {s: loader(adapter, keys[s]) for s in keys}
    h = w2_shape[0]
    tail = w_shape[1:]

    def rows(device):
        w1 = loads[W1](device) if W1 in loads else loads[W1A](device) @ loads[W1B](device)
        if W2 in loads:
            w2 = loads[W2](device)
        elif T2 in loads:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", loads[T2](device), loads[W2A](device), loads[W2B](device))
        else:
            w2 = loads[W2A](device) @ loads[W2B](device)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        w2 = w2.contiguous()
        if w2.dim() != 2:
            full = (torch.kron(w1, w2) * scaling).reshape(w_shape)
            return lambda start, stop: full[start:stop].clone()  # the engine adds into what we return

        def block(start, stop):
            first, last = start // h, (stop - 1) // h + 1
            k = torch.kron(w1[first:last], w2)[start - first * h: stop - first * h]
            return (k * scaling).reshape(stop - start, *tail)

        return block

    return rows


# What the registry (adaptool.adapters.registry) knows of this family.
FAMILY = Family("LOKR", lokr_edits, OWN, additive=True)
