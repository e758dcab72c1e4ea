"""What the non-LoRA families (LoHa, LoKr, IA3, AdaLoRA, OFT) share to read one module: finding their modules
in the tensor names, loading a factor, LyCORIS scaling, and the one-line errors for a module that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaptool.adapters.source import Adapter
from adaptool.errors import AdaptoolError


def module_keys(adapter: Adapter, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
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


def loader(adapter: Adapter, key: str) -> Callable[[torch.device], torch.Tensor]:
    """``device -> tensor`` in float32: PEFT upcasts bf16/fp16 adapter weights to float32 when it loads them."""
    return lambda device: adapter.load(key).to(device=device, dtype=torch.float32)


def lycoris_scaling(adapter: Adapter, path: str) -> tuple[int, float]:
    """(r, alpha / r) of module ``path`` for LoHa and LoKr, under PEFT's first-match pattern rule.

    LyCORIS configs call alpha ``alpha`` (LoRA: ``lora_alpha``); there is no rsLoRA variant.
    """
    settings = adapter.settings
    r, alpha = settings.rank_for(path), settings.alpha_for(path)  # r > 0: the config parser checked it
    return r, alpha / r


def check_rank(adapter: Adapter, path: str, on_disk: int, configured: int) -> None:
    """The rank a factor has on disk must be the rank the config gives the module (PEFT could not load it)."""
    if on_disk != configured:
        raise AdaptoolError(f"{adapter.source}: {path} has rank {on_disk} on disk but its config says r={configured}",
                            "fix r/rank_pattern in adapter_config.json")


def misfit(adapter: Adapter, path: str, implied, actual,
           hint: str = "check that the adapter was trained on this base model") -> AdaptoolError:
    """The error for a module whose tensors do not fit the base weight (raise it)."""
    return AdaptoolError(f"{adapter.source}: {path} does not fit the base: adapter implies {tuple(implied)}, "
                         f"base has {tuple(actual)}", hint)


def incomplete(adapter: Adapter, path: str, suffix: str) -> AdaptoolError:
    """The error for a module missing one of its tensors (raise it)."""
    return AdaptoolError(f"{adapter.source}: {path} has no {path}{suffix}", "the adapter file is incomplete; re-save it")


def inconsistent(adapter: Adapter, path: str, *shapes) -> AdaptoolError:
    """The error for a module whose saved tensors do not fit each other (raise it)."""
    listed = ", ".join(str(tuple(s)) for s in shapes)
    return AdaptoolError(f"{adapter.source}: {path} has tensors of shapes {listed}, which do not fit together",
                         "the adapter file is inconsistent; re-save it")


def refuse_layer(adapter: Adapter, path: str, family: str, w_shape, supported: str) -> AdaptoolError:
    """The error for a module whose base layer type the family (or adaptool) cannot fold (raise it)."""
    kind = {3: "a Conv1d", 5: "a Conv3d"}.get(len(w_shape), f"a {len(w_shape)}-D")
    return AdaptoolError(f"{adapter.source}: {family} on {path}, {kind} layer {tuple(w_shape)}, cannot be folded by adaptool",
                         f"supported: {supported}")
