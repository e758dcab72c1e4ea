"""The PEFT adapter-folder sink: ``adapter_config.json`` and a model card beside ``adapter_model.safetensors``.

The config depends on what was computed (each module's rank is the rank its factors came out with), so it
is built from the shapes the engine wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
        self.written_config = self.config(written_ranks(stats.written), lora_bias)
        (folder / "adapter_config.json").write_text(json.dumps(self.written_config, indent=2, sort_keys=True) + "\n")
        (folder / "README.md").write_text(self.card(self.written_config))

    def summary(self, stats) -> dict:
        summary = {"tensors_written": len(stats.written), "bytes_written": stats.bytes_written,
                   "rank": self.written_config.get("r"), "peak_rss_bytes": stats.peak_rss_bytes}
        if stats.energy_kept():
            summary["energy_kept"] = stats.energy_kept()
        return summary
