"""What an adapter saves besides its family's own factors, as PEFT loads it back: ``modules_to_save`` copies
and saved ``base_layer`` tensors (``bias="all"``/``"oft_only"``) replace base tensors whole, and trainable
tokens replace rows of an embedding. Every family reads these the same way (:func:`aux_edits`).

Which tensors are a family's own: those ending in one of its suffixes (``Family.own``), and for every family
LoRA's tensor names (``OWN_MARKERS``: PEFT would not take them for a saved copy either).

A saved embedding or output head may have another vocabulary (rows) than the base's: PEFT loads such an adapter
after ``resize_token_embeddings``, and its merged model has the new shape, so the replacement carries it
(``Replace.shape``; :mod:`adaptool.plan.model` checks that the other vocabulary tensors follow). When PEFT saves the
embedding layers of a resized vocabulary it adds its wrapper's insides (``X.original_module.weight``, the resized
base, and ``X.modules_to_save.weight``, the copy again) beside the copy ``X.weight``: the merged model is the copy,
so those are skipped. A base that ties its head to the input embeddings stores no head: an ``lm_head`` copy equal
to the saved input embedding (PEFT's ``ensure_weight_tying``) is the same tensor and is skipped too.
"""

from __future__ import annotations

import torch

from adaptool.adapters.source import Adapter
from adaptool.ops.edits import Replace, ReplaceRows
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.plan.model import is_vocabulary
from adaptool.plan.resolve import TensorResolver

TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
BASE_LAYER = ".base_layer."
# Markers of LoRA's own tensors (factors, DoRA magnitudes, lora bias) and of trainable tokens.
OWN_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_vector", TOKENS_SUFFIX)
# The insides of PEFT's ModulesToSaveWrapper, saved beside the copy when PEFT saves the embedding layers.
WRAPPER_INSIDES = (".original_module.", ".modules_to_save.")


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
        list: :class:`~adaptool.ops.edits.Replace` (a tensor of the base's shape, or of another vocabulary size) and
        :class:`~adaptool.ops.edits.ReplaceRows` (rows ``(len(indices), *w_shape[1:])`` of an embedding) edits.
    """
    edits = []
    for name in adapter.names:
        if own and name.endswith(own):
            continue
        if name.endswith(TOKENS_SUFFIX):
            edits.append(_token_rows(adapter, base, resolve, name))
            continue
        if (any(marker in name for marker in OWN_MARKERS) or _wrapper_inside(adapter, name)
                or _tied_head(adapter, base, name)):
            continue
        module_path, _, param = name.rpartition(".")
        if module_path.endswith(BASE_LAYER[:-1]):
            module_path = module_path[: -len(BASE_LAYER) + 1]
        target = resolve.tensor(module_path, param)
        edits.append(Replace(target, adapter.source, _loader(adapter, name),
                             shape=_new_shape(adapter, name, target, tuple(base.tensors[target].shape))))
    return edits


def _new_shape(adapter: Adapter, name: str, target: str, base_shape: tuple) -> tuple | None:
    """The shape of the saved tensor ``name`` where it is not the base's: only the vocabulary (rows) of an
    embedding or head may change; None where the shapes agree."""
    shape = tuple(adapter.shape(name))
    if shape == base_shape:
        return None
    if is_vocabulary(target) and len(shape) == len(base_shape) == 2 and shape[0] > 0:
        if shape[1:] == base_shape[1:]:
            return shape
        raise AdaptoolError(f"{adapter.source}: {name} has shape {shape}, base {target} has {base_shape}: only the "
                            "vocabulary (rows) may differ, not the hidden size",
                            "check that the adapter was trained on this base model")
    raise AdaptoolError(f"{adapter.source}: {name} has shape {shape}, base {target} has {base_shape}",
                        "only an embedding or lm_head may change shape (a resized vocabulary); "
                        "check that the adapter was trained on this base model")


def _wrapper_inside(adapter: Adapter, name: str) -> bool:
    """``X.original_module.P`` or ``X.modules_to_save.P`` beside the copy ``X.P`` (PEFT saved its wrapper's insides
    with the embedding layers). The copy is what the merged model holds; a second copy that differs is refused."""
    for inside in WRAPPER_INSIDES:
        head, found, param = name.rpartition(inside)
        plain = f"{head}.{param}"
        if not found or "." in param or plain not in adapter.names:
            continue
        if inside == ".modules_to_save." and not _same(adapter.load(name), adapter.load(plain)):
            raise AdaptoolError(f"{adapter.source}: {name} differs from {plain}, its modules_to_save copy",
                                "re-save the adapter with PEFT's save_pretrained")
        return True
    return False


def _tied_head(adapter: Adapter, base: Checkpoint, name: str) -> bool:
    """An ``lm_head`` copy for a base that ties its head to the input embeddings and stores none, equal to the input
    embedding the adapter saves (PEFT's ``ensure_weight_tying``): the head follows that embedding on load."""
    module_path, _, param = name.rpartition(".")
    if module_path.rpartition(".")[2] != "lm_head" or not _ties_embeddings(base.config):
        return False
    if any(n.rpartition(".")[0].rpartition(".")[2] == "lm_head" for n in base.tensors):
        return False  # the base stores its head: the copy replaces it
    twins = [n for n in adapter.names if n != name and n.endswith("." + param) and is_vocabulary(n)
             and not is_own(n) and not any(inside in n for inside in WRAPPER_INSIDES)
             and n.rpartition(".")[0].rpartition(".")[2] != "lm_head"]
    return len(twins) == 1 and _same(adapter.load(twins[0]), adapter.load(name))


def _ties_embeddings(config: dict) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor: dtype, shape and values (adapters are checked finite before their edits are made)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


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
