"""AdaLoRA as PEFT 0.21.2 merges it (``tuners/adalora/layer.py``, ``model.py``).

Per module ``ΔW = transpose(B @ (A * E), fan_in_fan_out) * scaling / (ranknum + 1e-5)`` with A (k, in),
E (k, 1) the singular values, B (out, k); Conv2d keeps the kernel flattened into A's columns and reshapes.
``scaling = lora_alpha`` (or the module's rank when ``lora_alpha <= 0``); there are no alpha patterns.

After rank allocation the config's ``rank_pattern`` holds one boolean mask of length ``init_r`` per module
(``"<module>.lora_E": [...]``) and the file holds only the kept k = sum(mask) triplets. ``ranknum`` is not
saved: PEFT builds every module with ``init_r`` and, when it prunes to the mask, copies the old ranknum back,
so the divisor stays ``init_r`` (a module pruned to k = 0 adds an empty delta), rounded through the base
weight's dtype on the way (see ``_ranknum``).
"""

from __future__ import annotations

import torch

from adaptool.adapters.common import incomplete, inconsistent, loader, misfit, module_keys, refuse_layer
from adaptool.adapters.family import Family
from adaptool.adapters.layout import base_layout, effective_fan_in_fan_out, numel, transposed_layout
from adaptool.adapters.saved import aux_edits
from adaptool.adapters.source import Adapter
from adaptool.ops.edits import AddDelta
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.io.safetensors_file import torch_dtype
from adaptool.plan.resolve import TensorResolver

A, B, E = ".lora_A", ".lora_B", ".lora_E"
OWN = (A, B, E)


def adalora_edits(adapter: Adapter, base: Checkpoint) -> list:
    """Edits of an AdaLoRA adapter against checkpoint ``base`` (names resolved, shapes checked)."""
    resolve = TensorResolver(base, adapter)
    edits = aux_edits(adapter, base, resolve, OWN)
    settings = adapter.settings
    init_r, alpha = settings.init_r, settings.lora_alpha
    masks = _masks(adapter)
    linear_only = base_layout(base) is False
    fifo_default = effective_fan_in_fan_out(adapter, base)
    for path, keys in module_keys(adapter, OWN).items():
        for suffix in OWN:
            if suffix not in keys:
                raise incomplete(adapter, path, suffix)
        a, b, e = (tuple(adapter.shape(keys[s])) for s in OWN)
        if len(a) != 2 or len(b) != 2 or e != (a[0], 1) or b[1] != a[0]:
            raise inconsistent(adapter, path, a, e, b)
        k = a[0]
        _check_rank(adapter, path, k, init_r, masks.get(path))
        target = resolve.tensor(path, "weight")
        w_shape = tuple(base.tensors[target].shape)
        if len(w_shape) == 2:
            fifo = transposed_layout(b[0], a[1], w_shape, fifo_default, linear_only)
            if fifo is None:
                raise misfit(adapter, path, (b[0], a[1]), w_shape)
        elif len(w_shape) == 4:
            fifo = False
            if b[0] != w_shape[0] or a[1] != numel(w_shape[1:]):
                raise misfit(adapter, path, (b[0], a[1]), w_shape)
        else:
            raise refuse_layer(adapter, path, "AdaLoRA", w_shape, "Linear, GPT-2 Conv1D and Conv2d layers")
        # PEFT: scaling = lora_alpha if lora_alpha > 0 else float(r), r being the module's (pruned) rank.
        scaling = alpha if alpha > 0 else float(k)
        ranknum = _ranknum(init_r, base.tensors[target].dtype)
        edits.append(AddDelta(target, adapter.source, _delta(adapter, keys, w_shape, fifo, scaling, ranknum)))
    return edits


def _ranknum(init_r: int, weight_dtype: str) -> float:
    """init_r as PEFT ends up holding it: it moves the ranknum parameter to the base weight's dtype before
    upcasting it to float32, so above 256 a bf16 base rounds it (init_r=257 divides by 256)."""
    dtype = torch_dtype(weight_dtype)
    if not dtype.is_floating_point:
        return float(init_r)
    return float(torch.tensor(float(init_r)).to(dtype))


def _masks(adapter) -> dict[str, list]:
    """``rank_pattern`` by module path. PEFT strips the adapter name from the keys when it saves; a key that
    still carries one (``….lora_E.<name>``) is read the way PEFT's loader reads it."""
    masks = {}
    for key, mask in adapter.settings.rank_masks:
        if key.endswith(E):
            masks[key[: -len(E)]] = mask
        elif E + "." in key:
            masks[key.rsplit(E + ".", 1)[0]] = mask
        else:
            raise AdaptoolError(f"{adapter.source}: rank_pattern key {key!r} names no lora_E",
                                "AdaLoRA's rank_pattern maps '<module>.lora_E' to a list of booleans; fix adapter_config.json")
    return masks


def _check_rank(adapter, path: str, k: int, init_r: int, mask) -> None:
    """The rank on disk must be init_r, or what the module's rank_pattern mask keeps of init_r."""
    if mask is None:
        if k != init_r:
            raise AdaptoolError(f"{adapter.source}: {path} has rank {k} on disk but init_r={init_r} and no rank_pattern entry",
                                "fix init_r/rank_pattern in adapter_config.json")
        return
    if len(mask) != init_r or sum(mask) != k:
        raise AdaptoolError(f"{adapter.source}: {path} has rank {k} on disk but its rank_pattern mask keeps {sum(mask)} of "
                            f"{len(mask)} (init_r={init_r})",
                            "fix init_r/rank_pattern in adapter_config.json")


def _delta(adapter, keys, w_shape, fifo: bool, scaling: float, ranknum: float):
    """``device -> ((start, stop) -> ΔW[start:stop])`` in PEFT's order: matmul, transpose, ``* scaling``,
    ``/ (ranknum + 1e-5)`` with ranknum a one-element float32 tensor, as PEFT holds it.

    A (k, in), E (k, 1), B (out, k); a block is ``(stop - start, *w_shape[1:])`` (GPT-2 Conv1D: ``(A*E)ᵀ Bᵀ`` rows).
    """
    load_a, load_b, load_e = (loader(adapter, keys[s]) for s in OWN)
    tail = w_shape[1:]

    def rows(device):
        ae = load_a(device) * load_e(device)
        b = load_b(device)
        divisor = torch.full((1,), ranknum, dtype=torch.float32, device=device) + 1e-5
        if fifo:  # GPT-2 Conv1D: rows of the stored weight are columns of B @ (A * E)
            return lambda start, stop: (b @ ae[:, start:stop]).T * scaling / divisor
        return lambda start, stop: ((b[start:stop] @ ae) * scaling / divisor).reshape(stop - start, *tail)

    return rows


# What the registry (adaptool.adapters.registry) knows of this family.
FAMILY = Family("ADALORA", adalora_edits, OWN, additive=True)
