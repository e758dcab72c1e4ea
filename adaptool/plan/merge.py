"""What every merge plan shares, whatever the adapter types: the merge spec, output ranks and dtype, the
tensors a merged adapter carries over, its ``adapter_config.json``, the two kinds of output plan, and the
dry run's text."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from adaptool.adapters import family
from adaptool.ops.combine import MergeSpec
from adaptool.device import resolve_dtype
from adaptool.errors import AdaptoolError
from adaptool.output.adapter_folder import PEFT_PREFIX
from adaptool.output.model_folder import ModelFolder
from adaptool.output.provenance import metadata, model_card, portable_recipe, portable_spec
from adaptool.plan.adapter import lora_adapter_plan, lora_config
from adaptool.plan.model import model_files
from adaptool.plan.plan import Computed, Plan
from adaptool.plan.resolve import group_edits
from adaptool.recipe import ModuleRules, parameters_used, value_at


def merge_spec(recipe, n_adapters: int) -> MergeSpec:
    """The recipe's strategy and parameters, as :func:`adaptool.ops.combine.combine_module` takes them."""
    p = recipe.parameters
    return MergeSpec(strategy=recipe.strategy, space=recipe.space, density=p.density,
                     majority_sign_method=p.majority_sign_method, rank=p.rank, clamp=p.clamp, seed=p.seed,
                     to_adapter=recipe.output.kind == "adapter", n_adapters=n_adapters, convention=p.convention)


def output_rank(ranks: list[int], strategy: str, spec: MergeSpec) -> int | None:
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


def output_dtype(recipe, folders) -> torch.dtype:
    """``output.dtype``, or the dtype of the first adapter's first tensor."""
    if recipe.output.dtype:
        return getattr(torch, recipe.output.dtype)
    return folders[0].load(next(iter(folders[0].names))).dtype


def span(values: list[int]) -> list[int] | None:
    return [min(values), max(values)] if values else None


def prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def carried_tensors(folders) -> Computed:
    """``modules_to_save`` copies and trainable tokens travel into a merged adapter as saved (one owner each)."""
    owner: dict[str, str] = {}
    for f in folders:
        fam = family(f.peft_type, f.source)
        for name in f.names:
            if fam.is_own(name):
                continue
            if name in owner:
                raise AdaptoolError(f"{name} is saved by both {owner[name]} and {f.source}",
                                    "keep modules_to_save/trainable tokens in one adapter only")
            owner[name] = f.source
    by_source = {f.source: f for f in folders}
    return Computed("carried tensors",
                    lambda device: ({PEFT_PREFIX + n: by_source[s].load(n) for n, s in owner.items()}, None))


def peft_config(recipe, folders, ranks: dict[str, int], lora_bias: bool) -> dict:
    """``adapter_config.json`` of a merged LoRA (scaling 1: the merged factors carry every weight and scale)."""
    first = folders[0].settings
    modules_to_save = sorted({m for f in folders for m in (f.settings.modules_to_save or [])}) or None
    tokens = None
    for f in folders:
        if f.settings.trainable_token_indices:
            tokens = f.settings.trainable_token_indices
    return lora_config(ranks, base_model=portable_spec(recipe.base) or first.base_model_name_or_path,
                       task_type=first.task_type,
                       revision=first.revision, lora_bias=lora_bias,
                       fan_in_fan_out=any(f.settings.fan_in_fan_out for f in folders),
                       modules_to_save=modules_to_save, trainable_token_indices=tokens)


def recipe_yaml(recipe, base=None, folders=()) -> str:
    """The recipe as YAML; with the opened ``base`` and ``folders``, in portable terms (inputs by name, no output
    path: :func:`adaptool.output.provenance.portable_recipe`), as outputs record it."""
    data = portable_recipe(recipe, base, list(folders)) if folders else recipe.to_dict()
    return yaml.safe_dump(data, sort_keys=False)


def _command(recipe) -> str:
    return f"adaptool merge {Path(recipe.source_path).name if recipe.source_path else ''}".strip()


def _title(recipe) -> str:
    return f"{Path(recipe.source_path).stem} (adaptool merge)" if recipe.source_path else "adaptool merge"


def adapter_plan(recipe, folders, modules: list[Computed], inputs: list, base=None) -> Plan:
    """A PEFT adapter folder holding ``modules`` (each a module's merged factors) and the carried tensors
    (``base``: the opened base, when the recipe names one, for provenance)."""
    meta = metadata("merge", base, folders, {"recipe": portable_recipe(recipe, base, folders)})
    return lora_adapter_plan(
        [*modules, carried_tensors(folders)], meta,
        config=lambda ranks, lora_bias: peft_config(recipe, folders, ranks, lora_bias),
        card=lambda config: model_card(_title(recipe), _command(recipe), folders, base=base,
                                       base_model=config["base_model_name_or_path"],
                                       recipe_yaml=recipe_yaml(recipe, base, folders)), inputs=inputs)


def model_plan(recipe, folders, edits: list, base, inputs: list) -> Plan:
    """The base with ``edits`` folded in, streamed like ``unload``, the recipe in its model card."""
    out_dtype = resolve_dtype(recipe.output.dtype)
    meta = metadata("merge", base, folders, {"recipe": portable_recipe(recipe, base, folders)})
    card = lambda stats: model_card(_title(recipe), _command(recipe), folders, base=base, stats=stats,  # noqa: E731
                                    recipe_yaml=recipe_yaml(recipe, base, folders))
    return Plan(model_files(base, group_edits(edits), out_dtype, meta), ModelFolder(base, out_dtype, card), inputs)


def per_module_values(recipe, adapted: dict[str, list[int]], overview: dict) -> list[str]:
    """What per-module rules resolve to, for the summary and the dry run (nothing when the recipe has none).

    Sets ``overview["per_module"]``: the modules grouped by their resolved values, ``[{"weights": [w or None
    per adapter (None: it does not adapt the module)], "density": d (where the strategy reads it), "modules":
    [...]}, ...]``; returns notes for rules that decide no module (most likely a typo in the regex).

    Args:
        adapted (dict[str, list[int]]): module path -> the indices of the adapters that adapt it.
    """
    weights = [a.weight for a in recipe.adapters]
    density = recipe.parameters.density if "density" in parameters_used(recipe.strategy, recipe.space) else None
    ruled = [(f"adapters[{i}].weight", w, [p for p, ids in adapted.items() if i in ids])
             for i, w in enumerate(weights) if isinstance(w, ModuleRules)]
    if isinstance(density, ModuleRules):
        ruled.append(("parameters.density", density, list(adapted)))
    if not ruled:
        return []
    groups: dict[tuple, list[str]] = {}
    for path in sorted(adapted):
        ws = tuple(value_at(w, path) if i in adapted[path] else None for i, w in enumerate(weights))
        groups.setdefault((ws, value_at(density, path)), []).append(path)
    overview["per_module"] = [{"weights": list(ws), **({} if d is None else {"density": d}), "modules": paths}
                              for (ws, d), paths in groups.items()]
    notes = []
    for name, rules, paths in ruled:
        deciding = {rules.index(p) for p in paths}
        notes += [f"{name}[{j}] (match '{r.match}') decides no module; check it against the module paths "
                  "`adaptool inspect` lists" for j, r in enumerate(rules.rules) if r.match is not None and j not in deciding]
    return notes


def compact_names(names: list[str], limit: int = 4) -> str:
    """Module paths with one numeric component folded into ranges: ``model.layers.{0-3,6}.mlp.up_proj, …``."""
    folded: dict[str, list[int]] = {}
    for name in names:
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        if len(digits) != 1:
            folded.setdefault(name, [])
            continue
        j = digits[0]
        folded.setdefault(".".join([*parts[:j], "\0", *parts[j + 1:]]), []).append(int(parts[j]))
    shown = [t if not ns else t.replace("\0", str(ns[0]) if len(ns) == 1 else "{" + _ranges(sorted(ns)) + "}")
             for t, ns in folded.items()]
    more = f", … (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 3, 6]`` -> ``0-3,6``."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _weight_text(weight) -> str:
    return f"weight per module ({len(weight)} rules)" if isinstance(weight, list) else f"weight {weight:g}"


def plan_text(recipe, overview: dict, notes: list[str]) -> str:
    """The dry run's account of a plan (``overview``: adapters, modules, ranks, sizes)."""
    mb = 1024 * 1024
    lines = [f"plan: {recipe.strategy} (space: {recipe.space}) -> {recipe.output.kind} at {recipe.output.path}"]
    for a in overview["adapters"]:
        kind = f" ({a['type']})" if "type" in a else ""
        lines.append(f"  adapter {a['source']}{kind}  {_weight_text(a['weight'])}  {a['modules']} modules")
    if recipe.output.kind == "model":
        lines.append(f"  base {recipe.base}")
    lines.append(f"  modules merged: {overview['modules']}; rank in {overview['rank_in']}, rank out "
                 f"{overview['rank_out'] or 'dense (folded into the base)'}")
    if overview.get("per_module"):
        lines.append("  per-module values (weights in adapter order, '-' where an adapter lacks the module):")
        for g in overview["per_module"]:
            ws = ", ".join("-" if w is None else f"{w:g}" for w in g["weights"])
            density = f"  density {g['density']:g}" if "density" in g else ""
            n = len(g["modules"])
            lines.append(f"    weights {ws}{density}  {n} module{'' if n == 1 else 's'}: {compact_names(g['modules'])}")
    lines.append(f"  output size ~{overview['output_bytes_estimate'] / mb:,.1f} MiB; working memory ~"
                 f"{overview['working_memory_estimate'] / mb:,.1f} MiB beyond one base tensor")
    lines += [f"  note: {n}" for n in notes]
    lines.append("dry run: nothing written")
    return "\n".join(lines)
