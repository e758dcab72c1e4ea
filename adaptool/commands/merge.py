"""``merge``: combine adapters with a strategy from a recipe, into one LoRA adapter or into the base."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptool.errors import AdaptoolError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: adapter types a merge recipe accepts; a recipe with any but LORA is a mixed merge (see :mod:`adaptool.commands.merge_mixed`)
MIXABLE = ("LORA", "LOHA", "LOKR", "ADALORA", "IA3", "OFT")
#: types whose delta adds to the weight (can be weighted, summed and re-factored into a LoRA)
ADDITIVE = ("LORA", "LOHA", "LOKR", "ADALORA")


@dataclass
class ModuleGroup:
    """One module path and the adapters (index, LoraModule, weight) that adapt it."""

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

    LoRA-only recipes go through the strategies (:mod:`adaptool.combine`); a recipe with LoHa, LoKr, AdaLoRA,
    IA3 or OFT adapters is a mixed merge (linear only, applied in recipe order; see :mod:`adaptool.commands.merge_mixed`).

    Args:
        recipe (str | Path | Recipe): a recipe file or a loaded :class:`~adaptool.recipe.Recipe`.
        output (str | Path | None): overrides ``output.path``.
        device (str | None): overrides the recipe's ``device``.
        dry_run (bool): plan and check only; write nothing.
        force (bool): replace a non-empty output folder.
        on_start, on_progress: progress callbacks (units: bytes).

    Returns:
        dict: a summary (output, modules, ranks, energy kept, seconds, peak memory; the plan for a dry run).
    """
    from adaptool.adapters.common import collected_notes
    from adaptool.recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, None if output is None else str(output))
    with collected_notes() as adapter_notes:
        summary = _merge(recipe, device, dry_run, force, on_start, on_progress)
    summary["notes"] = [*summary.get("notes", []), *adapter_notes]
    return summary


def _merge(recipe, device, dry_run, force, on_start, on_progress) -> dict:
    import time

    from adaptool.commands.unload import check_finite, open_adapter, open_base
    from adaptool.device import resolve_device
    from adaptool.io.output_dir import preflight
    from adaptool.strategies import peft_new_rank

    start = time.perf_counter()
    target = Path(recipe.output.path)
    local = [p for p in (recipe.source_path, recipe.base, *(a.path for a in recipe.adapters))
             if p and Path(p).expanduser().exists()]
    preflight(target, force, local)
    dev = resolve_device(device or recipe.device)
    base = open_base(recipe.base) if recipe.base else None
    folders = [open_adapter(a.path, base) for a in recipe.adapters]
    preflight(target, force, [*local, *(f.input_path for f in folders),
                              *([base.root, *base.shards] if base is not None else [])])
    weights = [a.weight for a in recipe.adapters]
    for f in folders:
        if f.peft_type not in MIXABLE:
            raise AdaptoolError(f"{f.source}: merging {f.peft_type} adapters is not supported yet",
                                "supported: " + ", ".join(MIXABLE))
    if any(f.peft_type != "LORA" for f in folders):
        from adaptool.commands.merge_mixed import check_mixed, merge_mixed

        check_mixed(recipe, folders, weights)
        for f in folders:
            check_finite(f)
        return merge_mixed(recipe, folders, weights, base, dev, target, dry_run, force, on_start, on_progress, start)
    for f in folders:
        check_finite(f)
    groups, dora = _group_modules(folders, weights, recipe, base)
    p = recipe.parameters
    from adaptool.combine import MergeSpec

    spec = MergeSpec(strategy=recipe.strategy, space=recipe.space, density=p.density,
                     majority_sign_method=p.majority_sign_method, rank=p.rank, clamp=p.clamp, seed=p.seed,
                     to_adapter=recipe.output.kind == "adapter", n_adapters=len(folders))
    if recipe.space == "factors":
        spec.peft_rank = peft_new_rank([_config_rank(f.config) for f in folders],
                                       _peft_type_for(len(folders), recipe.strategy), p.rank)
    notes = list(recipe.notes)
    if base is not None and recipe.output.kind == "adapter":
        from adaptool.adapters import edits_for

        for f in folders:  # the edits are lazy: building them checks every module against the base
            edits_for(f, base)
    plan = _plan_summary(recipe, folders, groups, spec, base)
    if dry_run:
        return {"dry_run": True, "output": str(target), "notes": notes, **plan, "plan_text": _plan_text(recipe, folders, plan, notes)}
    if recipe.output.kind == "adapter":
        summary = _write_adapter(recipe, folders, groups, spec, dev, target, force, on_start, on_progress,
                                 plan["output_bytes_estimate"])
    else:
        summary = _fold_into_base(recipe, folders, groups, dora, spec, dev, base, target, force, on_start, on_progress)
    summary["seconds"] = time.perf_counter() - start
    return {"output": str(target), "strategy": recipe.strategy, "space": recipe.space, "kind": recipe.output.kind,
            "device": str(dev), "notes": notes, **plan, **summary}


def _peft_type_for(n: int, strategy: str) -> str:
    from adaptool.strategies import peft_effective_type

    return peft_effective_type(n, strategy)


def _config_rank(config: dict) -> int:
    """PEFT's per-adapter rank for its rank rules: r, or the largest rank_pattern value."""
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r", 8)), *[int(v) for v in pattern.values()]])


def _fan_in_fan_out(folder, base) -> bool:
    """The config's fan_in_fan_out, as PEFT applies it to ``base`` when one is given."""
    from adaptool.adapters.common import effective_fan_in_fan_out
    from adaptool.adapters.config import config_of

    return effective_fan_in_fan_out(folder, base) if base is not None else config_of(folder).fan_in_fan_out


def _group_modules(folders, weights, recipe, base) -> tuple[dict[str, ModuleGroup], list]:
    """Modules by path across adapters, checked for agreement; DoRA modules set aside (they are not additive)."""
    from adaptool.adapters.lora import lora_modules

    groups: dict[str, ModuleGroup] = {}
    dora = []
    shapes: dict[str, tuple] = {}
    for i, (folder, w) in enumerate(zip(folders, weights)):
        fifo = _fan_in_fan_out(folder, base)
        for m in lora_modules(folder):
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


# --------------------------------------------------------------------------------------------------
# Plan and dry run


def _plan_summary(recipe, folders, groups, spec, base) -> dict:
    ranks_in = {g.path: g.ranks for g in groups.values()}
    out_rank = {path: _output_rank(rs, recipe.strategy, spec) for path, rs in ranks_in.items()}
    largest = 0
    out_bytes = 0
    itemsize = 4 if recipe.output.dtype == "float32" else 2
    for g in groups.values():
        m = g.entries[0][1]
        io = _module_io(m.adapter, m)
        numel = io[0] * _prod(io[1:])
        largest = max(largest, numel)
        r = out_rank[g.path]
        if r:
            out_bytes += r * (io[0] + _prod(io[1:])) * itemsize
    dense = spec.space == "delta" and recipe.strategy not in ("linear", "cat", "svd")
    n = len(folders)
    memory = largest * 4 * ((n + 3) if dense else 2)
    if recipe.output.kind == "model" and base is not None:
        out_bytes = base.total_bytes
    return {
        "adapters": [{"source": f.source, "weight": a.weight,
                      "modules": sum(1 for g in groups.values() for j, _, _ in g.entries if j == i)}
                     for i, (f, a) in enumerate(zip(folders, recipe.adapters))],
        "modules": len(groups),
        "rank_in": _span([r for rs in ranks_in.values() for r in rs]),
        "rank_out": _span([r for r in out_rank.values() if r]),
        "output_bytes_estimate": out_bytes,
        "working_memory_estimate": memory,
    }


def _output_rank(ranks: list[int], strategy: str, spec) -> int | None:
    """The rank a module comes out with (None: a dense delta folded into the base)."""
    if spec.space == "factors":
        return spec.peft_rank
    if strategy == "cat" or (strategy == "linear" and spec.rank is None):
        return sum(ranks)  # exact concatenation
    if strategy in ("linear", "svd"):
        return min(spec.rank or max(ranks), sum(ranks))
    if spec.to_adapter or strategy.endswith("_svd"):
        return spec.rank or max(ranks)
    return None


def _span(values: list[int]) -> list[int] | None:
    return [min(values), max(values)] if values else None


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _plan_text(recipe, folders, plan, notes) -> str:
    mb = 1024 * 1024
    lines = [f"plan: {recipe.strategy} (space: {recipe.space}) -> {recipe.output.kind} at {recipe.output.path}"]
    for a in plan["adapters"]:
        kind = f" ({a['type']})" if "type" in a else ""
        lines.append(f"  adapter {a['source']}{kind}  weight {a['weight']:g}  {a['modules']} modules")
    if recipe.output.kind == "model":
        lines.append(f"  base {recipe.base}")
    lines.append(f"  modules merged: {plan['modules']}; rank in {plan['rank_in']}, rank out "
                 f"{plan['rank_out'] or 'dense (folded into the base)'}")
    lines.append(f"  output size ~{plan['output_bytes_estimate'] / mb:,.1f} MiB; working memory ~"
                 f"{plan['working_memory_estimate'] / mb:,.1f} MiB beyond one base tensor")
    lines += [f"  note: {n}" for n in notes]
    lines.append("dry run: nothing written")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# kind: adapter


def _write_adapter(recipe, folders, groups, spec, dev, target, force, on_start, on_progress, total_bytes) -> dict:
    import torch

    from adaptool.combine import combine_module

    dtype = _output_dtype(recipe, folders)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    energies = []
    if on_start:
        on_start(len(groups), total_bytes)
    for g in groups.values():
        entries = [(m, w) for _, m, w in g.entries]
        c = combine_module(g.path, entries, spec, dev, g.fifo)
        if c.truncated:
            energies.append((g.path, c.energy))
        _check_finite_result(g.path, c)
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if g.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        A, B = c.A, c.B
        if g.kind == "conv":
            a_shape = entries[0][0].adapter.shape(entries[0][0].a_key)
            b_shape = entries[0][0].adapter.shape(entries[0][0].b_key)
            A = A.reshape(A.shape[0], *a_shape[1:])
            B = B.reshape(B.shape[0], B.shape[1], *b_shape[2:])
        key = "base_model.model." + g.path
        tensors[f"{key}.{a_name}"] = A.to(dtype).cpu().contiguous()
        tensors[f"{key}.{b_name}"] = B.to(dtype).cpu().contiguous()
        bias = _merged_bias(entries, dev)
        if bias is not None:
            tensors[f"{key}.lora_B.bias"] = bias.to(dtype).cpu()
        ranks[g.path] = A.shape[0]
        if on_progress:
            on_progress(A.numel() * A.element_size() + B.numel() * B.element_size())
    return _save_adapter(recipe, folders, tensors, ranks, energies, target, force)


def _save_adapter(recipe, folders, tensors: dict, ranks: dict[str, int], energies: list, target, force) -> dict:
    """Write merged LoRA factors (plus carried modules_to_save/tokens) as a PEFT adapter folder, atomically."""
    from adaptool.io.output_dir import AtomicDir
    from adaptool.io.safetensors_file import dtype_code
    from adaptool.io.writer import OutputTensor, ShardWriter
    from adaptool.provenance import metadata, model_card

    tensors.update(_carried_aux(folders))
    config = _adapter_config(recipe, folders, ranks, any(k.endswith("lora_B.bias") for k in tensors))
    meta = metadata("merge", recipe.base, folders, {"recipe": recipe.to_dict()})
    names = sorted(tensors)
    with AtomicDir(target, force) as tmp:
        writer = ShardWriter(tmp / ADAPTER_WEIGHTS,
                             [OutputTensor(n, dtype_code(tensors[n].dtype), tuple(tensors[n].shape)) for n in names], meta)
        for n in names:
            writer.write_tensor(n, tensors[n])
        writer.close()
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(target.name, f"adaptool merge {recipe.source_path or ''}".strip(),
                                                  config["base_model_name_or_path"], folders,
                                                  recipe_yaml=_recipe_yaml(recipe)))
    out = {"tensors_written": len(tensors), "bytes_written": sum(t.numel() * t.element_size() for t in tensors.values()),
           "rank": config["r"], "peak_rss_bytes": _peak_rss()}
    if energies:
        out["energy_kept"] = {"mean": sum(e for _, e in energies) / len(energies),
                              "min": min(e for _, e in energies),
                              "worst_module": min(energies, key=lambda x: x[1])[0]}
    return out


def _output_dtype(recipe, folders):
    import torch

    if recipe.output.dtype:
        return getattr(torch, recipe.output.dtype)
    m = next(iter(folders[0].names))
    return folders[0].load(m).dtype


def _check_finite_result(path, c) -> None:
    import torch

    for t in (c.A, c.B, c.dense):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise AdaptoolError(f"merging {path} produced NaN or Inf", "check the adapters and weights")


def _merged_bias(entries, dev):
    """lora_bias adapters: their bias deltas add linearly (Σ w·s·bias; the merged adapter's scaling is 1)."""
    total = None
    for m, w in entries:
        if m.bias_key:
            import torch

            b = m.adapter.load(m.bias_key).to(device=dev, dtype=torch.float32) * (w * m.scaling)
            total = b if total is None else total + b
    return total


def _carried_aux(folders) -> dict:
    """modules_to_save copies and trainable tokens travel into the merged adapter (one owner each)."""
    from adaptool.adapters.lora import OWN_MARKERS, TOKENS_SUFFIX

    out, owner = {}, {}
    for f in folders:
        family_own = _family_own(f)
        for name in f.names:
            own = any(marker in name for marker in OWN_MARKERS) and not name.endswith(TOKENS_SUFFIX)
            if own or (family_own and name.endswith(family_own)):
                continue
            if name in owner:
                raise AdaptoolError(f"{name} is saved by both {owner[name]} and {f.source}",
                                    "keep modules_to_save/trainable tokens in one adapter only")
            owner[name] = f.source
            out["base_model.model." + name] = f.load(name)
    return out


def _family_own(folder) -> tuple[str, ...]:
    """The suffixes of a non-LoRA family's own tensors (LoHa's ``hada_*`` …); () for LoRA."""
    if folder.peft_type == "LORA":
        return ()
    import importlib

    from adaptool.adapters import FAMILIES

    return importlib.import_module(f"adaptool.adapters.{FAMILIES[folder.peft_type][0]}").OWN


def _adapter_config(recipe, folders, ranks: dict[str, int], lora_bias: bool) -> dict:
    first = folders[0].config
    r = max(ranks.values()) if ranks else 1
    pattern = {p: k for p, k in sorted(ranks.items()) if k != r}
    modules_to_save = sorted({m for f in folders for m in (f.config.get("modules_to_save") or [])}) or None
    tokens = None
    for f in folders:
        t = f.config.get("trainable_token_indices")
        if t:
            tokens = t
    return {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": recipe.base or first.get("base_model_name_or_path"),
        "revision": first.get("revision"),
        "r": r,
        "lora_alpha": r,  # scaling 1: the merged factors carry every weight and scale
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": lora_bias,
        "fan_in_fan_out": any(bool(f.config.get("fan_in_fan_out")) for f in folders),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "trainable_token_indices": tokens,
    }


def _recipe_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------------
# kind: model


def _fold_into_base(recipe, folders, groups, dora, spec, dev, base, target, force, on_start, on_progress) -> dict:
    import torch

    from adaptool.adapters.lora import aux_edits, layout_in
    from adaptool.edits import AddDelta, DoraRescale
    from adaptool.plan import Plan, TensorResolver

    plan = Plan()
    replaced: dict[str, str] = {}
    for f in folders:
        for e in aux_edits(f, base, TensorResolver(base, f)):
            if e.target in replaced:
                raise AdaptoolError(f"{e.target} is replaced by both {replaced[e.target]} and {f.source}",
                                    "keep modules_to_save/trainable tokens in one adapter only")
            replaced[e.target] = f.source
            plan.add([e])
    energies = []
    for g in groups.values():
        first = g.entries[0][1]
        resolve = TensorResolver(base, first.adapter)
        target_name = resolve.tensor(g.path, "weight")
        w_shape = base.tensors[target_name].shape
        fifo = layout_in(first.adapter, first, base, w_shape)
        plan.add([AddDelta(target_name, "the merged adapters", _merged_rows(g, spec, fifo, w_shape, energies),
                           row_wise=g.kind != "conv")])
        biases = [(m, w) for _, m, w in g.entries if m.bias_key]
        if biases:
            bias_name = resolve.tensor(g.path, "bias", why="lora_bias=True needs a bias in the base layer")
            plan.add([AddDelta(bias_name, "the merged adapters", _bias_rows(biases), row_wise=False)])
    for i, folder, m, w in dora:
        resolve = TensorResolver(base, folder)
        target_name = resolve.tensor(m.path, "weight")
        w_shape = base.tensors[target_name].shape
        fifo = layout_in(folder, m, base, w_shape)
        layout = "conv" if m.kind == "conv" else "embedding" if m.kind == "embedding" else "fifo" if fifo else "linear"
        key = m.magnitude_key
        plan.add([DoraRescale(target_name, folder.source, _weighted(m, w, w_shape, fifo),
                              lambda device, folder=folder, key=key: folder.load(key).to(device=device, dtype=torch.float32),
                              layout)])
    summary = _write_model(recipe, folders, plan.edits, dev, base, target, force, on_start, on_progress)
    if energies:
        summary["energy_kept"] = {"mean": sum(e for _, e in energies) / len(energies), "min": min(e for _, e in energies),
                                  "worst_module": min(energies, key=lambda x: x[1])[0]}
    return summary



def _write_model(recipe, folders, edits: dict, dev, base, target, force, on_start, on_progress) -> dict:
    """Stream ``edits`` into the base like ``unload`` does: atomic folder, side files, model card with the recipe."""
    from adaptool.device import resolve_dtype
    from adaptool.engine import output_layout, run
    from adaptool.io.output_dir import AtomicDir
    from adaptool.provenance import metadata, model_card
    from adaptool.commands.unload import copy_side_files, dtype_name

    out_dtype = resolve_dtype(recipe.output.dtype)
    layout = output_layout(base, out_dtype)
    if on_start:
        on_start(len(base.tensors), sum(t.nbytes for _, ts in layout for t in ts))
    meta = metadata("merge", recipe.base, folders, {"recipe": recipe.to_dict()})
    with AtomicDir(target, force) as tmp:
        stats = run(base, edits, tmp, out_dtype, dev, meta, on_progress)
        copy_side_files(base.root, tmp, dtype_name(out_dtype))
        summary = stats.as_dict()
        (tmp / "README.md").write_text(model_card(target.name, f"adaptool merge {recipe.source_path or ''}".strip(),
                                                  recipe.base, folders, summary, recipe_yaml=_recipe_yaml(recipe)))
    return summary

def _merged_rows(g: ModuleGroup, spec, fifo, w_shape, energies):
    from adaptool.combine import combine_module, rows_in_base_layout

    def prepare(device):
        c = combine_module(g.path, [(m, w) for _, m, w in g.entries], spec, device, fifo)
        if c.truncated:
            energies.append((g.path, c.energy))
        rows, _ = rows_in_base_layout(c, g.kind, fifo, w_shape)
        return rows

    return prepare


def _bias_rows(biases):
    def prepare(device):
        import torch

        total = sum(m.adapter.load(m.bias_key).to(device=device, dtype=torch.float32) * (w * m.scaling) for m, w in biases)
        return lambda start, stop: total[start:stop].clone()

    return prepare


def _weighted(m, w, w_shape, fifo):
    def prepare(device):
        rows = m.delta_rows(device, w_shape, fifo)
        return lambda start, stop: rows(start, stop).mul_(w)

    return prepare
