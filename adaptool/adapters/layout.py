"""How an adapted module lies in its base weight: GPT-2 ``Conv1D`` stores 2-D weights (in, out), ``nn.Linear``
(out, in); which one a base has, and which one a module's shapes (and ``fan_in_fan_out``) say.
"""

from __future__ import annotations

import warnings

from adaptool.adapters.notes import AdapterNote
from adaptool.adapters.source import Adapter
from adaptool.io.checkpoint import Checkpoint

# transformers models built from GPT-2's Conv1D (transformers.pytorch_utils.Conv1D), by config.json model_type.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_encoder",
                                "clvp_decoder"})


def base_layout(base: Checkpoint) -> bool | None:
    """Whether the base model can hold GPT-2 ``Conv1D`` layers (weights stored (in, out)), by its config.json.

    True: a transformers model type built from Conv1D (``CONV1D_MODEL_TYPES``, also as a sub-config such as
    ``text_config``). False: a transformers model of another type, whose 2-D weights are all ``nn.Linear``
    (out, in): PEFT then sets ``fan_in_fan_out`` to False whatever the config says. None: unknown (no
    config.json or no ``model_type``, or remote code via ``auto_map``): the shapes and the config decide.
    """
    cfg = getattr(base, "config", None)
    if not isinstance(cfg, dict):
        return None
    types = {t for t in [cfg.get("model_type"), *(v.get("model_type") for v in cfg.values() if isinstance(v, dict))]
             if isinstance(t, str)}
    if types & CONV1D_MODEL_TYPES:
        return True
    if not isinstance(cfg.get("model_type"), str) or "auto_map" in cfg:
        return None
    return False


def effective_fan_in_fan_out(adapter: Adapter, base: Checkpoint) -> bool:
    """The config's ``fan_in_fan_out`` as PEFT applies it to ``base``: on a model without Conv1D layers PEFT
    warns and sets it to False (``dispatch_default``); so do we, and say so (an :class:`AdapterNote`)."""
    fifo = adapter.settings.fan_in_fan_out
    if fifo and base_layout(base) is False:
        warnings.warn(f"{adapter.source}: fan_in_fan_out is true but the base ({base.config.get('model_type')}) has "
                      "nn.Linear layers, not GPT-2 Conv1D; using fan_in_fan_out=false, as PEFT does", AdapterNote,
                      stacklevel=3)
        return False
    return fifo


def transposed_layout(out_f: int, in_f: int, w_shape, fifo_default: bool, linear_only: bool = False) -> bool | None:
    """Whether a 2-D base weight is stored (in, out) like GPT-2's ``Conv1D``; None when it fits neither way.

    A square weight fits both ways: then the config's ``fan_in_fan_out`` decides, as PEFT set it at injection.
    ``linear_only``: the base has no Conv1D (:func:`base_layout` is False), so only (out, in) fits.
    """
    w_shape = tuple(w_shape)
    straight, flipped = w_shape == (out_f, in_f), w_shape == (in_f, out_f)
    if linear_only:
        return False if straight else None
    if straight and flipped:
        return fifo_default
    if straight or flipped:
        return flipped
    return None


def same_kernel(implied, w_shape) -> bool:
    """``implied == w_shape`` where PEFT's reshape drops trailing 1s (Conv1d kernels built as (k, 1))."""
    implied, w_shape = tuple(implied), tuple(w_shape)
    extra = implied[len(w_shape):]
    return implied[: len(w_shape)] == w_shape and all(d == 1 for d in extra)


def numel(shape) -> int:
    """The number of elements of a tensor of ``shape`` (1 for ``()``)."""
    n = 1
    for d in shape:
        n *= d
    return n
