"""The PEFT adapter-folder sink: ``adapter_config.json`` and a model card beside ``adapter_model.safetensors``.

The config depends on what was computed (each module's rank is the rank its factors came out with), so it
is built from the shapes the engine wrote. :class:`AdapterFolders` is the sink of an output that holds several
adapter folders side by side (``align``): one temporary folder, one swap, each subfolder finished like a single
adapter from the shapes of its own weights file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptool.io.safetensors_file import read_header
from adaptool.output.provenance import portable_reference

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
A_NAMES = (".lora_A.weight", ".lora_embedding_A")


def written_ranks(written: dict[str, tuple]) -> dict[str, int]:
    """Module path -> rank, from the shapes of the written ``lora_A`` factors ((r, in…) or, embeddings, (r, num))."""
    ranks = {}
    for name, shape in written.items():
        for suffix in A_NAMES:
            if name.endswith(suffix):
                ranks[name[len(PEFT_PREFIX):-len(suffix)]] = shape[0]
    return ranks


def portable_config(config: dict) -> dict:
    """``config`` with ``base_model_name_or_path`` in portable terms: a hub id stays, a local path becomes its folder
    name (PEFT takes any string there; an output never holds a path of the machine that wrote it)."""
    if config.get("base_model_name_or_path"):
        config = {**config, "base_model_name_or_path": portable_reference(config["base_model_name_or_path"])}
    return config


@dataclass
class PeftAdapterFolder:
    """Sink for an adapter output.

    Attributes:
        config (Callable[[dict[str, int], bool], dict]): ``adapter_config.json`` given each module's rank and
            whether any ``lora_B.bias`` was written.
        card (Callable[[dict], str]): the model card's text, given that config.
    """

    config: Callable[[dict, bool], dict]
    card: Callable[[dict], str]
    written_config: dict = field(default_factory=dict)

    def finish(self, folder: Path, plan, stats) -> None:
        lora_bias = any(name.endswith("lora_B.bias") for name in stats.written)
        self.written_config = portable_config(self.config(written_ranks(stats.written), lora_bias))
        (folder / "adapter_config.json").write_text(json.dumps(self.written_config, indent=2, sort_keys=True) + "\n")
        (folder / "README.md").write_text(self.card(self.written_config))

    def summary(self, stats) -> dict:
        summary = {"tensors_written": len(stats.written), "bytes_written": stats.bytes_written,
                   "rank": self.written_config.get("r"), "peak_rss_bytes": stats.peak_rss_bytes}
        if stats.energy_kept():
            summary["energy_kept"] = stats.energy_kept()
        return summary


@dataclass
class AdapterFolders:
    """Sink for several adapter folders in one output: ``parts[name]`` finishes subfolder ``name`` (whose weights
    file the plan wrote as ``name/adapter_model.safetensors``).

    The engine's ``stats.written`` is keyed by tensor name across all files, so each part is handed the shapes
    read back from its own file's header instead.
    """

    parts: dict[str, PeftAdapterFolder]

    def finish(self, folder: Path, plan, stats) -> None:
        for name, part in self.parts.items():
            infos, _ = read_header(folder / name / ADAPTER_WEIGHTS)
            own = dataclasses.replace(stats, written={n: tuple(i.shape) for n, i in infos.items()})
            part.finish(folder / name, plan, own)

    def summary(self, stats) -> dict:
        configs = [p.written_config for p in self.parts.values()]
        summary = {"tensors_written": stats.tensors_total, "bytes_written": stats.bytes_written,
                   "rank": configs[0].get("r") if configs else None, "folders": list(self.parts),
                   "peak_rss_bytes": stats.peak_rss_bytes}
        if stats.energy_kept():
            summary["energy_kept"] = stats.energy_kept()
        return summary
