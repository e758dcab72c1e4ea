"""What the non-LoRA families (LoHa, LoKr, IA3, AdaLoRA, OFT) share: finding their modules in the tensor
names, the tensors they save besides their own (``modules_to_save`` …), and fitting a module to the base.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from adaptool.adapters.config import config_of
from adaptool.errors import AdaptoolError

# transformers models built from GPT-2's Conv1D (transformers.pytorch_utils.Conv1D), by config.json model_type.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_encoder",
                                "clvp_decoder"})


class AdapterNote(UserWarning):
    """Something PEFT would have warned about while loading the adapter (the result follows PEFT)."""


def module_keys(adapter, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``{module path: {suffix: tensor name}}`` for every tensor whose name ends in one of ``suffixes``.

    Modules come in the adapter file's order. A suffix matches whole (``.lokr_w1`` does not match
    ``….lokr_w1_a``), so families whose parameter names share a prefix need no special care.
    """
    modules: dict[str, dict[str, str]] = {}
    for name in adapter.names:
        for suffix in suffixes:
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[suffix] = name
                break
    return modules


def extra_edits(adapter, base, resolve, own_suffixes: tuple[str, ...]) -> list:
    """Replacements for what the adapter saves besides its own factors: ``modules_to_save`` copies, saved
    ``base_layer`` tensors (``bias="all"``/``"oft_only"``), trainable-token rows.

    LoRA's reading of those applies unchanged once the family's own tensors are out of sight.
    """
    from adaptool.adapters.lora import aux_edits

    return aux_edits(_WithoutOwn(adapter, own_suffixes), base, resolve)


class _WithoutOwn:
    """The adapter with its family's own tensors hidden (``aux_edits`` would read them as base tensors)."""

    def __init__(self, adapter, own_suffixes: tuple[str, ...]):
        self._adapter = adapter
        self.names = [n for n in adapter.names if not n.endswith(own_suffixes)]

    def __getattr__(self, attr):
        return getattr(self._adapter, attr)


def lycoris_scaling(adapter, path: str) -> tuple[int, float]:
    """(r, alpha / r) of module ``path`` for LoHa and LoKr, under PEFT's first-match pattern rule.

    LyCORIS configs call alpha ``alpha`` (LoRA: ``lora_alpha``); there is no rsLoRA variant.
    """
    settings = config_of(adapter)
    r, alpha = settings.rank_for(path), settings.alpha_for(path)  # r > 0: the config parser checked it
    return r, alpha / r


def check_rank(adapter, path: str, on_disk: int, configured: int) -> None:
    """The rank a factor has on disk must be the rank the config gives the module (PEFT could not load it)."""
    if on_disk != configured:
        raise AdaptoolError(f"{adapter.source}: {path} has rank {on_disk} on disk but its config says r={configured}",
                            "fix r/rank_pattern in adapter_config.json")


def misfit(adapter, path: str, implied, actual, hint: str = "check that the adapter was trained on this base model"):
    """The error for a module whose tensors do not fit the base weight (raise it)."""
    return AdaptoolError(f"{adapter.source}: {path} does not fit the base: adapter implies {tuple(implied)}, "
                         f"base has {tuple(actual)}", hint)


def incomplete(adapter, path: str, suffix: str):
    """The error for a module missing one of its tensors (raise it)."""
    return AdaptoolError(f"{adapter.source}: {path} has no {path}{suffix}", "the adapter file is incomplete; re-save it")


def inconsistent(adapter, path: str, *shapes):
    """The error for a module whose saved tensors do not fit each other (raise it)."""
    listed = ", ".join(str(tuple(s)) for s in shapes)
    return AdaptoolError(f"{adapter.source}: {path} has tensors of shapes {listed}, which do not fit together",
                         "the adapter file is inconsistent; re-save it")


def refuse_layer(adapter, path: str, family: str, w_shape, supported: str):
    """The error for a module whose base layer type the family (or adaptool) cannot fold (raise it)."""
    kind = {3: "a Conv1d", 5: "a Conv3d"}.get(len(w_shape), f"a {len(w_shape)}-D")
    return AdaptoolError(f"{adapter.source}: {family} on {path}, {kind} layer {tuple(w_shape)}, cannot be folded by adaptool",
                         f"supported: {supported}")


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
    n = 1
    for d in shape:
        n *= d
    return n


def loader(adapter, key: str):
    """``device -> tensor`` in float32: PEFT upcasts bf16/fp16 adapter weights to float32 when it loads them."""
    import torch

    return lambda device: adapter.load(key).to(device=device, dtype=torch.float32)


def base_layout(base) -> bool | None:
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


@contextmanager
def collected_notes():
    """Collect the :class:`AdapterNote` warnings raised inside (each once, in order) for a summary's notes."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AdapterNote)
        yield notes
    for w in caught:
        if issubclass(w.category, AdapterNote):
            if str(w.message) not in notes:
                notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def effective_fan_in_fan_out(adapter, base) -> bool:
    """The config's ``fan_in_fan_out`` as PEFT applies it to ``base``: on a model without Conv1D layers PEFT
    warns and sets it to False (``dispatch_default``); so do we, and say so (an :class:`AdapterNote`)."""
    fifo = config_of(adapter).fan_in_fan_out
    if fifo and base_layout(base) is False:
        warnings.warn(f"{adapter.source}: fan_in_fan_out is true but the base ({base.config.get('model_type')}) has "
                      "nn.Linear layers, not GPT-2 Conv1D; using fan_in_fan_out=false, as PEFT does", AdapterNote,
                      stacklevel=3)
        return False
    return fifo
