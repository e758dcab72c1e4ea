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
from adaptool.output.provenance import metadata, model_card
from adaptool.plan.adapter import lora_adapter_plan, lora_config
from adaptool.plan.model import model_files
from adaptool.plan.plan import Computed, Plan
from adaptool.plan.resolve import group_edits


def merge_spec(recipe, n_adapters: int) -> MergeSpec:
    """The recipe's strategy and parameters, as :func:`adaptool.ops.combine.combine_module` takes them."""
    p = recipe.parameters
    return MergeSpec(strategy=recipe.strategy, space=recipe.space, density=p.density,
                     majority_sign_method=p.majority_sign_method, rank=p.rank, clamp=p.clamp, seed=p.seed,
                     to_adapter=recipe.output.kind == "adapter", n_adapters=n_adapters)


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
    return lora_config(ranks, base_model=recipe.base or first.base_model_name_or_path, task_type=first.task_type,
                       revision=first.revision, lora_bias=lora_bias,
                       fan_in_fan_out=any(f.settings.fan_in_fan_out for f in folders),
                       modules_to_save=modules_to_save, trainable_token_indices=tokens)


def recipe_yaml(recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _command(recipe) -> str:
    return f"adaptool merge {recipe.source_path or ''}".strip()


def adapter_plan(recipe, folders, modules: list[Computed], inputs: list) -> Plan:
    """A PEFT adapter folder holding ``modules`` (each a module's merged factors) and the carried tensors."""
    meta = metadata("merge", recipe.base, folders, {"recipe": recipe.to_dict()})
    title = Path(recipe.output.path).name
    return lora_adapter_plan(
        [*modules, carried_tensors(folders)], meta,
        config=lambda ranks, lora_bias: peft_config(recipe, folders, ranks, lora_bias),
        card=lambda config: model_card(title, _command(recipe), config["base_model_name_or_path"], folders,
                                       recipe_yaml=recipe_yaml(recipe)), inputs=inputs)


def model_plan(recipe, folders, edits: list, base, inputs: list) -> Plan:
    """The base with ``edits`` folded in, streamed like ``unload``, the recipe in its model card."""
    out_dtype = resolve_dtype(recipe.output.dtype)
    meta = metadata("merge", recipe.base, folders, {"recipe": recipe.to_dict()})
    title = Path(recipe.output.path).name
    card = lambda stats: model_card(title, _command(recipe), recipe.base, folders, stats,  # noqa: E731
                                    recipe_yaml=recipe_yaml(recipe))
    return Plan(model_files(base, group_edits(edits), out_dtype, meta), ModelFolder(base, out_dtype, card), inputs)


def plan_text(recipe, overview: dict, notes: list[str]) -> str:
    """The dry run's account of a plan (``overview``: adapters, modules, ranks, sizes)."""
    mb = 1024 * 1024
    lines = [f"plan: {recipe.strategy} (space: {recipe.space}) -> {recipe.output.kind} at {recipe.output.path}"]
    for a in overview["adapters"]:
        kind = f" ({a['type']})" if "type" in a else ""
        lines.append(f"  adapter {a['source']}{kind}  weight {a['weight']:g}  {a['modules']} modules")
    if recipe.output.kind == "model":
        lines.append(f"  base {recipe.base}")
    lines.append(f"  modules merged: {overview['modules']}; rank in {overview['rank_in']}, rank out "
                 f"{overview['rank_out'] or 'dense (folded into the base)'}")
    lines.append(f"  output size ~{overview['output_bytes_estimate'] / mb:,.1f} MiB; working memory ~"
                 f"{overview['working_memory_estimate'] / mb:,.1f} MiB beyond one base tensor")
    lines += [f"  note: {n}" for n in notes]
    lines.append("dry run: nothing written")
    return "\n".join(lines)
