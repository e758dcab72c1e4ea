"""Merges that mix adapter types (LoRA with LoHa, LoKr, AdaLoRA, IA3, OFT).

Recipes with only LoRA adapters never come here (see :mod:`adaptool.commands.merge`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from adaptool.adapters import edits_for, family
from adaptool.adapters.adalora import A, B
from adaptool.adapters.common import module_keys
from adaptool.adapters.layout import base_layout, effective_fan_in_fan_out, transposed_layout
from adaptool.adapters.lora import layout_in, lora_modules
from adaptool.ops.combine import combine_module, flat, merged_bias
from adaptool.ops.edits import AddDelta, DoraRescale, Replace, ReplaceRows, Rotate, ScaleRowsCols
from adaptool.errors import AdaptoolError
from adaptool.plan import Computed, Plan, TensorResolver, group_edits
from adaptool.plan.merge import (
    adapter_plan,
    merge_spec,
    model_plan,
    output_dtype,
    output_rank,
    per_module_values,
    prod,
    span,
)
from adaptool.recipe import ModuleRules, as_written, value_at
from adaptool.strategies import clamp_factors, refactor

#: adapter types a merge recipe accepts; a recipe with any but LORA is a mixed merge
MIXABLE = ("LORA", "LOHA", "LOKR", "ADALORA", "IA3", "OFT")


@dataclass
class _Slot:
    """One base weight that the additive adapters of a mixed merge change (``kind: adapter``).

    ``transposed``: the weight is stored as the transpose of LoRA's ``B @ A`` (embeddings, GPT-2 ``Conv1D``).
    """

    target: str
    path: str
    kind: str  # linear | conv | embedding
    w_shape: tuple
    transposed: bool
    lora: list = field(default_factory=list)  # (LoraModule, weight)
    dense: list = field(default_factory=list)  # (AddDelta in the base layout, weight)
    a_shape: tuple | None = None  # a LoRA entry's A and B shapes (conv outputs are written like them)
    b_shape: tuple | None = None
    adapters: list = field(default_factory=list)  # indices of the adapters that change it


def _has_dora(folder) -> bool:
    return folder.peft_type == "LORA" and any(m.magnitude_key for m in lora_modules(folder))


def check_mixed(recipe, folders, weights) -> None:
    """Refuse, in one line each, what a mix of adapter types cannot do (before anything is read)."""
    other = next(f for f in folders if f.peft_type != "LORA")
    what = f"{other.source} is a {other.peft_type} adapter"
    if recipe.space == "factors":
        raise AdaptoolError(f"space: factors reproduces PEFT's add_weighted_adapter, which combines LoRA adapters only, "
                            f"but {what}", "use space: delta (the default) to mix adapter types")
    if recipe.output.kind == "model":
        if recipe.strategy != "linear":
            raise AdaptoolError(f"strategy {recipe.strategy} works on LoRA deltas only, but {what}",
                                "use strategy: linear to mix adapter types, or merge the LoRA adapters on their own first")
        for f, w in zip(folders, weights):
            bad = [v for v in ([r.value for r in w.rules] if isinstance(w, ModuleRules) else [w]) if v not in (0, 1)]
            if f.peft_type == "OFT" and bad:
                raise AdaptoolError(f"{f.source}: an OFT adapter's weight must be 1 (or 0 to leave it out), got "
                                    f"{bad[0]:g}: a scaled rotation is no longer a rotation", "set its weight to 1")
        return
    if recipe.strategy not in ("linear", "svd"):
        raise AdaptoolError(f"strategy {recipe.strategy} cannot mix adapter types into a LoRA adapter ({what})",
                            "use strategy: linear (or svd) with parameters.rank, or output.kind: model")
    for f in folders:
        if not family(f.peft_type).additive or _has_dora(f):
            name = "DoRA" if f.peft_type == "LORA" else f.peft_type
            how = {"IA3": "scale", "OFT": "rotate"}.get(f.peft_type, "rescale")
            raise AdaptoolError(f"{f.source}: {name} adapters {how} the base weight, so they cannot be merged into a "
                                "LoRA adapter", "use output.kind: model to fold the mix into the base")
    if recipe.parameters.rank is None:
        raise AdaptoolError(f"mixing adapter types into a LoRA adapter re-factors each module's summed delta by SVD, "
                            f"which needs a rank ({what})", "set parameters.rank, e.g. 'rank: 16'")
    if recipe.base is None:
        raise AdaptoolError(f"mixing adapter types into a LoRA adapter needs the base model for the layer shapes ({what})",
                            "add 'base: <folder or org/name>' at the top level")


def plan_mixed(recipe, folders, weights, base, inputs) -> tuple[Plan, dict, list[str]]:
    """A recipe that mixes adapter types (``strategy: linear``; ``svd`` too for ``kind: adapter``).

    ``kind: model``: every adapter's edits (the ones ``unload`` applies, :func:`adaptool.adapters.edits_for`)
    are applied to each base tensor **in recipe order**, float32, rounded once. Replacements
    (``modules_to_save``, trainable tokens, saved base layers) come first, as in a LoRA-only merge. The weight
    multiplies what each adapter changes:

    * LoRA, LoHa, LoKr, AdaLoRA (additive): ``W + w·ΔW``; additive deltas commute, so their order only
      matters relative to the multiplicative ones.
    * IA3: ``W · (1 + w·(l − 1))``: the change IA3 makes to the weight it meets, times ``w``
      (``w = 1``: ``W · l``; ``w = 0``: untouched).
    * OFT: ``w`` must be 1 (``W Rᵀ``) or 0 (left out); a scaled rotation is not a rotation.
    * DoRA: ``w`` scales the directional update, the magnitude vector applies as it is (as in a LoRA-only
      merge); its norm is taken against the untouched base weight, as ``unload`` does.

    So ``[LoRA, IA3]`` gives ``(W + ΔW)·l`` and ``[IA3, LoRA]`` gives ``W·l + ΔW``. This is PEFT's
    ``PeftMixedModel.merge_and_unload``, which merges the adapters of one module in the order they were
    loaded, each onto the weight the previous ones left; PEFT rounds to the model dtype after every adapter,
    adaptool once at the end (bit-identical in float32 where the operations agree, within an ulp in bf16).

    ``kind: adapter``: only additive types mix. Per module, the dense ``Σ wᵢ·ΔWᵢ`` (LoRA factor orientation,
    ``(out, in)``, conv kernels flattened) is re-factored by a truncated SVD at ``parameters.rank`` into one
    LoRA (scaling 1), and the energy kept is reported. Modules that only LoRA adapters touch take the exact
    low-rank path of a LoRA-only merge (the same best rank-k).
    """
    notes = list(recipe.notes)
    if recipe.output.kind == "model":
        edits, adapted = _mixed_edits(folders, weights, base)
        if recipe.parameters.rank is not None:
            notes.append("parameters.rank has no effect when adapter types are mixed into a model: "
                         "every delta is folded in whole")
        overview = _mixed_model_summary(folders, recipe, group_edits(edits), base)
        notes += per_module_values(recipe, adapted, overview)
        return model_plan(recipe, folders, edits, base, inputs), overview, notes
    slots = _mixed_slots(folders, weights, base)
    spec = merge_spec(recipe, len(folders))
    modules = [_slot_module(s, spec, output_dtype(recipe, folders)) for s in slots.values()]
    overview = _mixed_adapter_summary(folders, recipe, slots)
    notes += per_module_values(recipe, {s.path: s.adapters for s in slots.values()}, overview)
    return adapter_plan(recipe, folders, modules, inputs, base), overview, notes


def _module_paths(folder, base) -> dict[str, str]:
    """Base tensor name -> the adapter's module path, for the tensors ``folder`` changes (what rules match)."""
    resolve = TensorResolver(base, folder)
    if folder.peft_type == "LORA":
        paths = {resolve.tensor(m.path, "weight"): m.path for m in lora_modules(folder)}
        paths.update({resolve.tensor(m.path, "bias"): m.path for m in lora_modules(folder) if m.bias_key})
        return paths
    return {resolve.tensor(p, "weight"): p for p in module_keys(folder, family(folder.peft_type).own)}


def _mixed_edits(folders, weights, base):
    """The edits of a mixed ``kind: model`` merge: replacements first, then each adapter's weighted edits in
    recipe order (the plan keeps each tensor's edits in the order they are added); and module path -> the
    adapters that change it. Per-module weights are resolved at the adapter's module path of each edit."""
    replacements, changes = [], []
    replaced: dict[str, str] = {}
    adapted: dict[str, list[int]] = {}
    ruled = any(isinstance(w, ModuleRules) for w in weights)
    for i, (f, weight) in enumerate(zip(folders, weights)):
        paths = _module_paths(f, base) if ruled else {}
        for e in edits_for(f, base):
            if isinstance(e, (Replace, ReplaceRows)):
                if e.target in replaced:
                    raise AdaptoolError(f"{e.target} is replaced by both {replaced[e.target]} and {f.source}",
                                        "keep modules_to_save/trainable tokens in one adapter only")
                replaced[e.target] = f.source
                replacements.append(e)
                continue
            path = paths.get(e.target, e.target.rsplit(".", 1)[0])
            if i not in adapted.setdefault(path, []):
                adapted[path].append(i)
            weighted = _weighted_edit(e, value_at(weight, path), f)
            if weighted is not None:
                changes.append(weighted)
    return replacements + changes, adapted


def _weighted_edit(e, w: float, folder):
    """Edit ``e`` of ``folder`` at recipe weight ``w`` (see :func:`_merge_mixed`); None: nothing to do."""
    if w == 1:
        return e
    if isinstance(e, (AddDelta, DoraRescale)):
        return dataclasses.replace(e, delta_rows=_scaled_rows(e.delta_rows, w))
    if isinstance(e, ScaleRowsCols):
        return dataclasses.replace(e, scale=_interpolated_scale(e.scale, w))
    if isinstance(e, Rotate) and w == 0:
        return None
    raise AdaptoolError(f"{folder.source}: a {type(e).__name__} edit of {e.target} cannot be weighted by {w:g}",
                        "set this adapter's weight to 1")


def _scaled_rows(delta_rows, w: float):
    def prepare(device):
        rows = delta_rows(device)
        return lambda start, stop: rows(start, stop) * w

    return prepare


def _interpolated_scale(scale, w: float):
    """IA3 at weight ``w``: ``1 + w·(l − 1)``, the change ``W·(l − 1)`` scaled by ``w``."""

    def prepare(device):
        return (scale(device).to(torch.float32) - 1.0) * w + 1.0

    return prepare


def _adapter_module_counts(folders, edits) -> list[int]:
    """How many weights each adapter changes (its non-replacement edits of ``…weight`` tensors)."""
    counts = {f.source: set() for f in folders}
    for target, eds in edits.items():
        for e in eds:
            if not isinstance(e, (Replace, ReplaceRows)) and target.endswith("weight"):
                counts.setdefault(e.source, set()).add(target)
    return [len(counts[f.source]) for f in folders]


def _lora_rank_span(folders):
    return span([m.rank for f in folders if f.peft_type == "LORA" for m in lora_modules(f)])


def _mixed_model_summary(folders, recipe, edits: dict, base) -> dict:
    counts = _adapter_module_counts(folders, edits)
    changed = {t for t, eds in edits.items() if any(not isinstance(e, (Replace, ReplaceRows)) for e in eds)}
    largest = max((prod(base.tensors[t].shape) for t in edits), default=0)
    return {
        "adapters": [{"source": f.source, "type": f.peft_type, "weight": as_written(a.weight), "modules": n}
                     for f, a, n in zip(folders, recipe.adapters, counts)],
        "modules": len({t for t in changed if t.endswith("weight")}),
        "rank_in": _lora_rank_span(folders),
        "rank_out": None,
        "output_bytes_estimate": base.total_bytes,
        "working_memory_estimate": largest * 4 * 3,
    }


def _mixed_slots(folders, weights, base) -> dict[str, _Slot]:
    """The base weights the additive adapters change, with each adapter's contribution (checked against the base)."""
    slots: dict[str, _Slot] = {}

    def slot(folder, target, path, kind, transposed) -> _Slot:
        w_shape = tuple(base.tensors[target].shape)
        s = slots.setdefault(target, _Slot(target, path, kind, w_shape, transposed))
        if (s.kind, s.transposed) != (kind, transposed):
            raise AdaptoolError(f"{folder.source}: {path} is adapted as a {kind}{' (transposed)' if transposed else ''} "
                                f"here but as a {s.kind}{' (transposed)' if s.transposed else ''} by another adapter",
                                "merge adapters trained on the same base model")
        return s

    for i, (f, weight) in enumerate(zip(folders, weights)):
        resolve = TensorResolver(base, f)
        if f.peft_type == "LORA":
            for m in lora_modules(f):
                target = resolve.tensor(m.path, "weight")
                fifo = layout_in(f, m, base, base.tensors[target].shape)
                s = slot(f, target, m.path, m.kind, m.kind == "embedding" or fifo)
                s.lora.append((m, value_at(weight, m.path)))
                s.adapters.append(i)
                s.a_shape, s.b_shape = tuple(f.shape(m.a_key)), tuple(f.shape(m.b_key))
            continue
        own = family(f.peft_type).own
        paths = {resolve.tensor(path, "weight"): (path, keys) for path, keys in module_keys(f, own).items()}
        for e in edits_for(f, base):
            if not isinstance(e, AddDelta):
                continue  # modules_to_save copies and the like travel as saved (_carried_aux)
            path, keys = paths[e.target]
            w_shape = tuple(base.tensors[e.target].shape)
            transposed = f.peft_type == "ADALORA" and _adalora_transposed(f, keys, w_shape, base)
            s = slot(f, e.target, path, "conv" if len(w_shape) > 2 else "linear", transposed)
            s.dense.append((e, value_at(weight, path)))
            s.adapters.append(i)
    return slots


def _adalora_transposed(folder, keys, w_shape, base) -> bool:
    """Whether AdaLoRA stores this 2-D weight (in, out) (GPT-2 Conv1D), as :mod:`adaptool.adapters.adalora` decides."""
    if len(w_shape) != 2:
        return False
    a, b = folder.shape(keys[A]), folder.shape(keys[B])
    return bool(transposed_layout(b[0], a[1], w_shape, effective_fan_in_fan_out(folder, base), base_layout(base) is False))


def _slot_io(s: _Slot) -> tuple[int, int]:
    """(out, in) of the slot's delta in LoRA factor orientation."""
    if s.transposed:
        return s.w_shape[1], s.w_shape[0]
    return s.w_shape[0], prod(s.w_shape[1:])


def _mixed_adapter_summary(folders, recipe, slots) -> dict:
    counts = [0] * len(folders)
    index = {id(f): i for i, f in enumerate(folders)}
    sources = {f.source: i for i, f in enumerate(folders)}
    for s in slots.values():
        for m, _ in s.lora:
            counts[index[id(m.adapter)]] += 1
        for e, _ in s.dense:
            counts[sources[e.source]] += 1
    itemsize = 4 if recipe.output.dtype == "float32" else 2
    out_bytes, largest, ranks = 0, 0, []
    for s in slots.values():
        o, i = _slot_io(s)
        r = min(recipe.parameters.rank, o, i) if s.dense else output_rank([m.rank for m, _ in s.lora], recipe.strategy,
                                                                         merge_spec(recipe, len(folders)))
        ranks.append(r)
        out_bytes += r * (o + i) * itemsize
        largest = max(largest, o * i)
    return {
        "adapters": [{"source": f.source, "type": f.peft_type, "weight": as_written(a.weight), "modules": n}
                     for f, a, n in zip(folders, recipe.adapters, counts)],
        "modules": len(slots),
        "rank_in": _lora_rank_span(folders),
        "rank_out": span(ranks),
        "output_bytes_estimate": out_bytes,
        "working_memory_estimate": largest * 4 * 3,
    }


def _slot_factors(s: _Slot, spec, device):
    """(B, A, energy) of one slot: the exact low-rank path for LoRA-only slots, else an SVD of the dense sum."""
    if not s.dense:
        c = combine_module(s.path, s.lora, spec, device, s.transposed and s.kind != "embedding")
        return c.B, c.A, (c.energy if c.truncated else None)
    D = None
    for m, w in s.lora:
        b, a = m.factors(device)
        d = (flat(b) @ flat(a)) * (w * m.scaling)
        D = d if D is None else D.add_(d)
    for e, w in s.dense:
        d = e.delta_rows(device)(0, s.w_shape[0]).reshape(s.w_shape[0], -1)
        d = (d.T if s.transposed else d) * w
        D = d if D is None else D.add_(d)
    if not bool(torch.isfinite(D).all()):
        raise AdaptoolError(f"merging {s.path} produced NaN or Inf", "check the adapters and weights")
    B, A, energy = refactor(D, spec.rank)
    if spec.clamp is not None:
        B, A = clamp_factors(B, A, spec.clamp)
    return B, A, energy


def _slot_module(s: _Slot, spec, dtype) -> Computed:
    """One slot's merged factors under PEFT's names (conv factors shaped like a LoRA entry's, or the weight's)."""

    def produce(device):
        B, A, energy = _slot_factors(s, spec, device)
        k = A.shape[0]
        if s.kind == "conv":
            a_tail = s.a_shape[1:] if s.a_shape else s.w_shape[1:]
            b_tail = s.b_shape[2:] if s.b_shape else (1,) * (len(s.w_shape) - 2)
            A, B = A.reshape(k, *a_tail), B.reshape(B.shape[0], k, *b_tail)
        names = ("lora_embedding_A", "lora_embedding_B") if s.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        key = "base_model.model." + s.path
        tensors = {f"{key}.{names[0]}": A, f"{key}.{names[1]}": B}
        bias = merged_bias(s.lora, device)
        if bias is not None:
            tensors[f"{key}.lora_B.bias"] = bias
        return tensors, energy

    out_f, in_f = _slot_io(s)
    rank = min(spec.rank or 1, out_f, in_f)
    return Computed(s.path, produce, dtype, nbytes_estimate=rank * (out_f + in_f) * dtype.itemsize)
