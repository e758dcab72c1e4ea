"""``merge``: combine adapters with a strategy from a recipe, into one LoRA adapter or into the base.

The planner for LoRA-only recipes (a recipe mixing adapter types is planned by
:mod:`adaptool.commands.merge_mixed`): modules are grouped by path across adapters, and each group becomes
either one :class:`~adaptool.plan.Computed` (its merged factors, for an adapter output) or one edit of its
base weight (for a model output); the engine runs the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adaptool.adapters import edits_for
from adaptool.adapters.layout import effective_fan_in_fan_out
from adaptool.adapters.lora import layout_in, lora_modules
from adaptool.adapters.notes import collected_notes
from adaptool.adapters.saved import aux_edits
from adaptool.ops.combine import MergedRows, combine_module, merged_bias
from adaptool.commands.merge_mixed import MIXABLE, check_mixed, plan_mixed
from adaptool.device import resolve_device
from adaptool.ops.edits import AddDelta, DoraRescale
from adaptool.engine import execute
from adaptool.errors import AdaptoolError
from adaptool.io.inputs import input_paths, open_adapter, open_base
from adaptool.output.target import preflight
from adaptool.plan import Computed, Plan, TensorResolver
from adaptool.plan.merge import (
    adapter_plan,
    merge_spec,
    model_plan,
    output_dtype,
    output_rank,
    per_module_values,
    plan_text,
    prod,
    span,
)
from adaptool.recipe import Recipe, as_written, load_recipe, value_at
from adaptool.strategies import peft_effective_type, peft_new_rank
from adaptool.strategies.workspace import Workspace


@dataclass
class ModuleGroup:
    """One module path and the adapters (index, LoraModule, weight for this module) that adapt it."""

    path: str
    kind: str
    entries: list = field(default_factory=list)
    fifo: bool = False

    @property
    def ranks(self) -> list[int]:
        return [m.rank for _, m, _ in self.entries]


def merge(
    recipe,
    *,
    output: str | Path | None = None,
    device: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Run a merge recipe.

    LoRA-only recipes go through the strategies (:mod:`adaptool.ops.combine`); a recipe with LoHa, LoKr, AdaLoRA,
    IA3 or OFT adapters is a mixed merge (linear only, applied in recipe order; see
    :mod:`adaptool.commands.merge_mixed`).

    Args:
        recipe (str | Path | Recipe): a recipe file or a loaded :class:`~adaptool.recipe.Recipe`.
        output (str | Path | None): overrides ``output.path`` (a recipe file only; the CLI applies ``-o`` as
            it loads the recipe).
        device (str | None): overrides the recipe's ``device``.
        dry_run (bool): check everything a real run checks, plan, write nothing.
        force (bool): replace a non-empty output folder.
        on_start, on_progress: progress callbacks (units: bytes).

    Returns:
        dict: a summary (output, modules, ranks, energy kept, seconds, peak memory; the plan for a dry run).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, None if output is None else str(output))
    start = time.perf_counter()
    target = Path(recipe.output.path)
    dev = resolve_device(device or recipe.device)
    with collected_notes() as adapter_notes:
        plan, overview, notes = plan_merge(recipe, force)
    notes = [*notes, *adapter_notes]
    if dry_run:
        return {"dry_run": True, "output": str(target), "notes": notes, **overview,
                "plan_text": plan_text(recipe, overview, notes)}
    stats = execute(plan, target, force, dev, on_start, on_progress)
    summary = plan.sink.summary(stats)
    summary["seconds"] = time.perf_counter() - start
    return {"output": str(target), "strategy": recipe.strategy, "space": recipe.space, "kind": recipe.output.kind,
            "device": str(dev), "notes": notes, **overview, **summary}


def plan_merge(recipe: Recipe, force: bool) -> tuple[Plan, dict, list[str]]:
    """(plan, overview for the summary and the dry run, notes): every input opened and checked, the target too."""
    local = [p for p in (recipe.source_path, recipe.base, *(a.path for a in recipe.adapters))
             if p and Path(p).expanduser().exists()]
    preflight(recipe.output.path, force, local)
    base = open_base(recipe.base) if recipe.base else None
    folders = [open_adapter(a.path, base) for a in recipe.adapters]
    inputs = input_paths(base, folders, *local)
    preflight(recipe.output.path, force, inputs)
    weights = [a.weight for a in recipe.adapters]
    for f in folders:
        if f.peft_type not in MIXABLE:
            raise AdaptoolError(f"{f.source}: merging {f.peft_type} adapters is not supported yet",
                                "supported: " + ", ".join(MIXABLE))
    if any(f.peft_type != "LORA" for f in folders):
        check_mixed(recipe, folders, weights)
    for f in folders:
        f.check_finite()
    if any(f.peft_type != "LORA" for f in folders):
        return plan_mixed(recipe, folders, weights, base, inputs)
    return plan_lora_merge(recipe, folders, weights, base, inputs)


def plan_lora_merge(recipe, folders, weights, base, inputs) -> tuple[Plan, dict, list[str]]:
    """The plan of a LoRA-only merge (see :func:`plan_merge`)."""
    groups, dora = _group_modules(folders, weights, recipe, base)
    spec = merge_spec(recipe, len(folders))
    if recipe.space == "factors":
        spec.peft_rank = peft_new_rank([_config_rank(f) for f in folders],
                                       peft_effective_type(len(folders), recipe.strategy), recipe.parameters.rank)
    if base is not None and recipe.output.kind == "adapter":
        for f in folders:  # the edits are lazy: building them checks every module against the base
            edits_for(f, base)
    overview = _plan_summary(recipe, folders, groups, spec, base)
    adapted = {path: [i for i, _, _ in g.entries] for path, g in groups.items()}
    for i, _, m, _ in dora:
        adapted.setdefault(m.path, []).append(i)
    rule_notes = per_module_values(recipe, adapted, overview)
    if recipe.output.kind == "adapter":
        dtype = output_dtype(recipe, folders)
        modules = [_merged_module(g, spec, dtype) for g in groups.values()]
        plan = adapter_plan(recipe, folders, modules, inputs, base)
    else:
        plan = model_plan(recipe, folders, _fold_edits(folders, groups, dora, spec, base), base, inputs)
    return plan, overview, [*recipe.notes, *rule_notes]


def _config_rank(folder) -> int:
    """PEFT's per-adapter rank for its rank rules: r, or the largest rank_pattern value."""
    settings = folder.settings
    return max([settings.r, *[int(p.value) for p in settings.rank_pattern]])


def _fan_in_fan_out(folder, base) -> bool:
    """The config's fan_in_fan_out, as PEFT applies it to ``base`` when one is given."""
    return effective_fan_in_fan_out(folder, base) if base is not None else folder.settings.fan_in_fan_out


def _group_modules(folders, weights, recipe, base) -> tuple[dict[str, ModuleGroup], list]:
    """Modules by path across adapters, each adapter's weight resolved for the module, checked for agreement;
    DoRA modules set aside (they are not additive)."""
    groups: dict[str, ModuleGroup] = {}
    dora = []
    shapes: dict[str, tuple] = {}
    for i, (folder, weight) in enumerate(zip(folders, weights)):
        fifo = _fan_in_fan_out(folder, base)
        for m in lora_modules(folder):
            w = value_at(weight, m.path)
            shape = _module_io(folder, m)
            if m.path in shapes and shapes[m.path][:2] != (m.kind, shape):
                raise AdaptoolError(
                    f"{folder.source}: {m.path} is a {m.kind} of {shape} here but a {shapes[m.path][0]} of "
                    f"{shapes[m.path][1]} in {shapes[m.path][2]}", "merge adapters trained on the same base model")
            shapes.setdefault(m.path, (m.kind, shape, folder.source))
            if m.magnitude_key is not None:
                if recipe.output.kind == "adapter":
                    raise AdaptoolError(
                        f"{folder.source}: DoRA adapters cannot be merged into a LoRA adapter (their magnitude "
                        "rescales the whole weight)", "use output.kind: model to fold them into the base")
                dora.append((i, folder, m, w))
                continue
            g = groups.setdefault(m.path, ModuleGroup(m.path, m.kind))
            g.fifo = g.fifo or fifo
            g.entries.append((i, m, w))
            if m.bias_key and recipe.output.kind == "adapter" and recipe.strategy not in ("linear", "cat", "svd"):
                raise AdaptoolError(f"{folder.source}: lora_bias adapters can only be merged linearly into an adapter",
                                    "use strategy linear/cat/svd, or output.kind: model")
    return groups, dora


def _module_io(folder, m) -> tuple:
    a, b = folder.shape(m.a_key), folder.shape(m.b_key)
    return (b[0], *a[1:])


def _plan_summary(recipe, folders, groups, spec, base) -> dict:
    ranks_in = {g.path: g.ranks for g in groups.values()}
    out_rank = {path: output_rank(rs, recipe.strategy, spec) for path, rs in ranks_in.items()}
    largest = 0
    out_bytes = 0
    itemsize = 4 if recipe.output.dtype == "float32" else 2
    for g in groups.values():
        m = g.entries[0][1]
        io = _module_io(m.adapter, m)
        numel = io[0] * prod(io[1:])
        largest = max(largest, numel)
        r = out_rank[g.path]
        if r:
            out_bytes += r * (io[0] + prod(io[1:])) * itemsize
    dense = spec.space == "delta" and recipe.strategy not in ("linear", "cat", "svd")
    n = len(folders)
    memory = largest * 4 * ((n + 3) if dense else 2)
    if recipe.output.kind == "model" and base is not None:
        out_bytes = base.total_bytes
    return {
        "adapters": [{"source": f.source, "weight": as_written(a.weight),
                      "modules": sum(1 for g in groups.values() for j, _, _ in g.entries if j == i)}
                     for i, (f, a) in enumerate(zip(folders, recipe.adapters))],
        "modules": len(groups),
        "rank_in": span([r for rs in ranks_in.values() for r in rs]),
        "rank_out": span([r for r in out_rank.values() if r]),
        "output_bytes_estimate": out_bytes,
        "working_memory_estimate": memory,
    }


def _merged_module(g: ModuleGroup, spec, dtype) -> Computed:
    """One module's merged factors under PEFT's names (conv factors shaped like the inputs')."""
    entries = [(m, w) for _, m, w in g.entries]
    first = entries[0][0]

    def produce(device):
        c = combine_module(g.path, entries, spec, device, g.fifo)
        A, B = c.A, c.B
        if g.kind == "conv":
            A = A.reshape(A.shape[0], *first.adapter.shape(first.a_key)[1:])
            B = B.reshape(B.shape[0], B.shape[1], *first.adapter.shape(first.b_key)[2:])
        names = ("lora_embedding_A", "lora_embedding_B") if g.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        key = "base_model.model." + g.path
        tensors = {f"{key}.{names[0]}": A, f"{key}.{names[1]}": B}
        bias = merged_bias(entries, device)
        if bias is not None:
            tensors[f"{key}.lora_B.bias"] = bias
        return tensors, (c.energy if c.truncated else None)

    io = _module_io(first.adapter, first)
    rank = output_rank(g.ranks, spec.strategy, spec) or max(g.ranks)
    return Computed(g.path, produce, dtype, nbytes_estimate=rank * (io[0] + prod(io[1:])) * dtype.itemsize)


def _fold_edits(folders, groups, dora, spec, base) -> list:
    """Edits of the base: replacements (modules_to_save …) first, then each group's merged ΔW, then DoRA."""
    edits = []
    replaced: dict[str, str] = {}
    for f in folders:
        for e in aux_edits(f, base, TensorResolver(base, f)):
            if e.target in replaced:
                raise AdaptoolError(f"{e.target} is replaced by both {replaced[e.target]} and {f.source}",
                                    "keep modules_to_save/trainable tokens in one adapter only")
            replaced[e.target] = f.source
            edits.append(e)
    workspace = Workspace()  # block buffers faulted in once for every module, and a helper thread
    for g in groups.values():
        first = g.entries[0][1]
        resolve = TensorResolver(base, first.adapter)
        target_name = resolve.tensor(g.path, "weight")
        w_shape = base.tensors[target_name].shape
        fifo = layout_in(first.adapter, first, base, w_shape)
        rows = MergedRows(g.path, [(m, w) for _, m, w in g.entries], spec, g.kind, fifo, tuple(w_shape), workspace)
        edits.append(AddDelta(target_name, "the merged adapters", rows, row_wise=g.kind != "conv"))
        biases = [(m, w) for _, m, w in g.entries if m.bias_key]
        if biases:
            bias_name = resolve.tensor(g.path, "bias", why="lora_bias=True needs a bias in the base layer")
            edits.append(AddDelta(bias_name, "the merged adapters", _bias_rows(biases), row_wise=False))
    for i, folder, m, w in dora:
        target_name = TensorResolver(base, folder).tensor(m.path, "weight")
        w_shape = base.tensors[target_name].shape
        fifo = layout_in(folder, m, base, w_shape)
        layout = "conv" if m.kind == "conv" else "embedding" if m.kind == "embedding" else "fifo" if fifo else "linear"
        key = m.magnitude_key
        edits.append(DoraRescale(target_name, folder.source, _weighted(m, w, w_shape, fifo),
                                 lambda device, folder=folder, key=key: folder.load(key).to(device=device, dtype=torch.float32),
                                 layout))
    return edits


def _bias_rows(biases):
    def prepare(device):
        total = sum(m.adapter.load(m.bias_key).to(device=device, dtype=torch.float32) * (w * m.scaling) for m, w in biases)
        return lambda start, stop: total[start:stop].clone()

    return prepare


def _weighted(m, w, w_shape, fifo):
    def prepare(device):
        rows = m.delta_rows(device, w_shape, fifo)
        return lambda start, stop: rows(start, stop).mul_(w)

    return prepare
