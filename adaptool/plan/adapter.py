"""Plans whose output is one PEFT LoRA adapter folder (merge to an adapter, resize, extract): the computed
modules and carried tensors in ``adapter_model.safetensors``, and the config built from the ranks written; and
plans whose output is a folder of such adapter folders (align), written and swapped into place as one."""

from __future__ import annotations

from typing import Callable

from adaptool.output.adapter_folder import ADAPTER_WEIGHTS, AdapterFolders, PeftAdapterFolder
from adaptool.plan.plan import Computed, Plan, PlannedFile


def lora_adapter_plan(modules: list[Computed], metadata: dict[str, str], config: Callable[[dict, bool], dict],
                      card: Callable[[dict], str], inputs: list) -> Plan:
    """A PEFT adapter folder holding what ``modules`` produce; ``config(ranks, lora_bias)`` and ``card(config)``
    are called once the ranks are known."""
    return Plan([PlannedFile(ADAPTER_WEIGHTS, metadata, computed=list(modules))],
                PeftAdapterFolder(config=config, card=card), inputs)


def adapter_folders_plan(parts: dict[str, tuple], inputs: list) -> Plan:
    """One output folder holding a PEFT adapter folder per entry of ``parts``: ``name -> (modules, metadata,
    config, card)`` as :func:`lora_adapter_plan` takes them; ``name`` is the subfolder (one path component)."""
    files, sinks = [], {}
    for name, (modules, metadata, config, card) in parts.items():
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"not a folder name: {name!r}")
        files.append(PlannedFile(f"{name}/{ADAPTER_WEIGHTS}", metadata, computed=list(modules)))
        sinks[name] = PeftAdapterFolder(config=config, card=card)
    return Plan(files, AdapterFolders(sinks), inputs)


def lora_config(ranks: dict[str, int], *, base_model: str | None, task_type: str | None = None,
                revision: str | None = None, lora_bias: bool = False, fan_in_fan_out: bool = False,
                modules_to_save: list[str] | None = None, trainable_token_indices=None) -> dict:
    """``adapter_config.json`` of a LoRA whose factors carry every scale: ``r`` the largest rank, other
    ranks in ``rank_pattern``, ``alpha = r`` for each module (scaling 1), targets the modules written."""
    r = max(ranks.values()) if ranks else 1
    pattern = {p: k for p, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": lora_bias,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "trainable_token_indices": trainable_token_indices,
    }
