"""(IA)³ as PEFT 0.21.2 merges it (``tuners/ia3/layer.py``): a learned vector ``l`` multiplies the weight.

* Not feedforward: ``l`` is (out, 1) and scales the output features, and the base bias too (``bias * l``).
* Feedforward (``feedforward_modules``): ``l`` is (1, in) and scales the input features; the bias is left alone.
* GPT-2 ``Conv1D`` keeps its weight (in, out), so PEFT multiplies by ``lᵀ``: the same features, other axis.
* Conv2d/Conv3d: ``l`` is (1, C, 1, 1[, 1]): output channels (not feedforward) or input channels (feedforward).

PEFT computes ``mul(W, l)`` in float32 and casts back: one rounding, as here. Which modules count as
feedforward is PEFT's rule: ``re.fullmatch`` for a string, a plain suffix test (no dot boundary) for a list.
"""

from __future__ import annotations

import re

from adaptool.adapters.common import loader, misfit, module_keys, refuse_layer
from adaptool.adapters.family import Family
from adaptool.adapters.layout import base_layout, effective_fan_in_fan_out
from adaptool.adapters.patterns import check_name
from adaptool.adapters.saved import aux_edits
from adaptool.adapters.source import Adapter
from adaptool.ops.edits import ScaleRowsCols
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.plan.resolve import TensorResolver

L = ".ia3_l"
OWN = (L,)


def ia3_edits(adapter: Adapter, base: Checkpoint) -> list:
    """Edits of an IA3 adapter against checkpoint ``base`` (names resolved, shapes checked)."""
    resolve = TensorResolver(base, adapter)
    edits = aux_edits(adapter, base, resolve, OWN)
    linear_only = base_layout(base) is False
    fifo_default = effective_fan_in_fan_out(adapter, base)
    for path, keys in module_keys(adapter, OWN).items():
        key = keys[L]
        l_shape = tuple(adapter.shape(key))
        target = resolve.tensor(path, "weight")
        w_shape = tuple(base.tensors[target].shape)
        ff = is_feedforward(adapter, path, l_shape)
        along, shape_for = _orientation(adapter, path, l_shape, w_shape, ff, fifo_default, linear_only)
        load = loader(adapter, key)
        edits.append(ScaleRowsCols(target, adapter.source, lambda device, load=load, f=shape_for: f(load(device)), along))
        bias = target[: -len("weight")] + "bias"
        if not ff and target.endswith(".weight") and bias in base.tensors:
            # PEFT: bias * l.reshape(bias.shape), only for modules that scale their outputs.
            edits.append(ScaleRowsCols(bias, adapter.source, lambda device, load=load: load(device).reshape(-1), "rows"))
    return edits


def is_feedforward(adapter: Adapter, path: str, l_shape) -> bool:
    """PEFT's ``_check_target_module_feedforward``; without the key in the config, the vector's shape decides."""
    rule = adapter.settings.feedforward_modules
    if isinstance(rule, str):
        check_name(path)
        return re.fullmatch(rule, path) is not None
    if isinstance(rule, tuple):
        return any(path.endswith(t) for t in rule)
    # PEFT fills a missing rule from its per-architecture table when it injects; a Linear vector tells us which.
    if len(l_shape) == 2 and l_shape[0] != l_shape[1]:
        return l_shape[0] == 1
    raise AdaptoolError(f"{adapter.source}: adapter_config.json has no feedforward_modules, so {path} is ambiguous",
                        "add feedforward_modules (the list the adapter was trained with) to adapter_config.json")


def _orientation(adapter, path, l_shape, w_shape, ff: bool, fifo_default: bool, linear_only: bool = False):
    """Which axis of the stored weight the vector scales ("rows"/"cols"), and ``l -> l`` shaped to broadcast.

    ``linear_only``: the base has no GPT-2 Conv1D, so a 2-D weight is (out, in) (PEFT: fan_in_fan_out=False).
    """
    n = 1
    for d in l_shape:
        n *= d
    if len(w_shape) == 2:
        expected = (1, n) if ff else (n, 1)
        if l_shape != expected:
            raise AdaptoolError(f"{adapter.source}: {path}{L} has shape {l_shape}, but the config makes the module "
                                f"{'' if ff else 'not '}feedforward, which needs {expected}",
                                "fix feedforward_modules in adapter_config.json")
        axis = 1 if ff else 0  # of an (out, in) weight
        straight, flipped = w_shape[axis] == n, w_shape[1 - axis] == n and not linear_only
        if not (straight or flipped):
            raise AdaptoolError(f"{adapter.source}: {path} does not fit the base: {path}{L} scales {n} "
                                f"{'input' if ff else 'output'} features, base weight is {w_shape}",
                                "check that the adapter was trained on this base model")
        # A square weight fits both ways round: the config's fan_in_fan_out (set by PEFT for Conv1D) decides.
        fifo = fifo_default if straight and flipped else flipped
        scales_rows = ff == fifo  # out features are rows unless transposed; in features the other way round
        return ("rows", _reshape(n, 1)) if scales_rows else ("cols", _reshape(1, n))
    if len(w_shape) in (4, 5):
        ones = (1,) * (len(w_shape) - 2)
        ok = l_shape == (1, n, *ones)
        if ok and not ff and n == w_shape[0]:
            return "rows", _reshape(n, 1, *ones)  # PEFT: l.transpose(0, 1)
        if ok and ff and n == w_shape[1]:
            return "cols", _reshape(1, n, *ones)
        if ok and ff and w_shape[1] and n % w_shape[1] == 0 and w_shape[0] % (n // w_shape[1]) == 0:
            # A grouped conv sees in/groups channels per filter: PEFT repeats each group's factors over the
            # filters of that group, giving one factor per (filter, channel) - a full-height, row-sliceable scale.
            return "rows", _grouped(n // w_shape[1], w_shape)
        raise misfit(adapter, path, l_shape, w_shape)
    raise refuse_layer(adapter, path, "IA3", w_shape, "Linear, GPT-2 Conv1D, Conv2d and Conv3d layers")


def _reshape(*shape):
    """``l -> l.reshape(shape)``."""
    return lambda l: l.reshape(shape)


def _grouped(groups: int, w_shape):
    """PEFT's ``_get_ia3_scaling_for_weight`` for a grouped conv: (1, C, 1…) -> (out, C / groups, 1…)."""
    out_c, in_per_group, ones = w_shape[0], w_shape[1], (1,) * (len(w_shape) - 2)

    def shape(l):
        l = l.reshape(groups, 1, in_per_group, *ones).expand(groups, out_c // groups, in_per_group, *ones)
        return l.reshape(out_c, in_per_group, *ones)

    return shape


# What the registry (adaptool.adapters.registry) knows of this family.
FAMILY = Family("IA3", ia3_edits, OWN, additive=False)
