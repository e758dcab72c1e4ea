"""What an adapter saves besides its family's own factors, as PEFT loads it back: ``modules_to_save`` copies
and saved ``base_layer`` tensors (``bias="all"``/``"oft_only"``) replace base tensors whole, and trainable
tokens replace rows of an embedding. Every family reads these the same way (:func:`aux_edits`).

Which tensors are a family's own: those ending in one of its suffixes (``Family.own``), and for every family
LoRA's tensor names (``OWN_MARKERS``: PEFT would not take them for a saved copy either).
"""

from __future__ import annotations

from adaptool.adapters.source import Adapter
from adaptool.ops.edits import Replace, ReplaceRows
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.plan.resolve import TensorResolver

TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
BASE_LAYER = ".base_layer."
# Markers of LoRA's own tensors (factors, DoRA magnitudes, lora bias) and of trainable tokens.
OWN_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_vector", TOKENS_SUFFIX)


def is_own(name: str, own: tuple[str, ...] = ()) -> bool:
    """Whether tensor ``name`` belongs to the adapter's family (``own``: the family's own suffixes), not to what
    it saves besides: LoRA factors are never saved copies; trainable tokens always are."""
    if name.endswith(TOKENS_SUFFIX):
        return False
    return any(marker in name for marker in OWN_MARKERS) or (bool(own) and name.endswith(own))


def aux_edits(adapter: Adapter, base: Checkpoint, resolve: TensorResolver, own: tuple[str, ...] = ()) -> list:
    """modules_to_save copies, saved base_layer tensors and trainable-token rows (full replacements), in the
    adapter file's order.

    Args:
        adapter: the adapter; ``own``: its family's own suffixes (hidden here: they are not base tensors).
        base: the checkpoint the edits apply to; ``resolve`` maps module paths to its tensor names.

    Returns:
        list: :class:`~adaptool.ops.edits.Replace` (a tensor of the base's shape) and
        :class:`~adaptool.ops.edits.ReplaceRows` (rows ``(len(indices), *w_shape[1:])`` of an embedding) edits.
    """
    edits = []
    for name in adapter.names:
        if own and name.endswith(own):
            continue
        if name.endswith(TOKENS_SUFFIX):
            edits.append(_token_rows(adapter, base, resolve, name))
            continue
        if any(marker in name for marker in OWN_MARKERS):
            continue
        module_path, _, param = name.rpartition(".")
        if module_path.endswith(BASE_LAYER[:-1]):
            module_path = module_path[: -len(BASE_LAYER) + 1]
        target = resolve.tensor(module_path, param)
        if tuple(base.tensors[target].shape) != tuple(adapter.shape(name)):
            raise AdaptoolError(
                f"{adapter.source}: {name} has shape {tuple(adapter.shape(name))}, base {target} has {tuple(base.tensors[target].shape)}",
                "the adapter resized this module (e.g. a resized vocabulary); resize the base to match first",
            )
        edits.append(Replace(target, adapter.source, _loader(adapter, name)))
    return edits


def _token_rows(adapter: Adapter, base: Checkpoint, resolve: TensorResolver, name: str) -> ReplaceRows:
    """The rows trainable tokens replace: the saved tensor (n, *w_shape[1:]) holds the new rows themselves."""
    path = name[: -len(TOKENS_SUFFIX)]
    target = resolve.tensor(path, "weight")
    indices = token_indices(adapter, path)
    rows_shape = tuple(adapter.shape(name))
    w_shape = tuple(base.tensors[target].shape)
    if (not rows_shape or len(rows_shape) != len(w_shape) or len(indices) != rows_shape[0]
            or rows_shape[1:] != w_shape[1:] or max(indices, default=0) >= w_shape[0]):
        raise AdaptoolError(f"{adapter.source}: trainable tokens of {path} ({name} {rows_shape}, "
                            f"{len(indices)} indices) do not fit the base {w_shape}",
                            "check trainable_token_indices and the base model")
    return ReplaceRows(target, adapter.source, _loader(adapter, name), indices)


def _loader(adapter: Adapter, key: str):
    """``device -> tensor`` as stored (no upcast: PEFT loads saved copies in their own dtype)."""
    return lambda device: adapter.load(key).to(device)


def token_indices(adapter: Adapter, path: str) -> list[int]:
    """The token rows of embedding ``path`` that ``trainable_token_indices`` names (refused when it names none)."""
    indices = adapter.settings.token_indices(path)
    if indices is not None:
        return list(indices)
    raise AdaptoolError(f"{adapter.source}: trainable tokens saved for {path} but trainable_token_indices does not name it",
                        "fix trainable_token_indices in adapter_config.json")
