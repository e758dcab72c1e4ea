"""The model-folder sink: what a plain model needs besides its shards.

The engine has written the planned shards; this adds the index (when the base was sharded), the base's
config and tokenizer files (``torch_dtype`` updated), the expanded layer count of a replicated base, the new
``vocab_size`` of a resized vocabulary, and a model card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import INDEX_NAME, Checkpoint
from adaptool.io.side_files import copy_side_files
from adaptool.output.provenance import portable_reference
from adaptool.plan.model import vocabulary_change
from adaptool.plan.replication import ReplicatedCheckpoint, update_config


def dtype_name(dtype) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (None stays None)."""
    return None if dtype is None else str(dtype).replace("torch.", "")


@dataclass
class ModelFolder:
    """Sink for a model output.

    Attributes:
        base (Checkpoint): the base the shards were planned from (a replicated view included).
        out_dtype (torch.dtype | None): the output dtype, written into config.json.
        card (Callable[[dict], str]): the model card's text, given the run's stats.
    """

    base: Checkpoint
    out_dtype: object
    card: Callable[[dict], str]

    def finish(self, folder: Path, plan, stats) -> None:
        if self.base.sharded:
            write_index(folder, plan)
        copy_side_files(self.base.root, folder, dtype_name(self.out_dtype))
        for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
            portable_name_or_path(folder / name, key)
        if isinstance(self.base, ReplicatedCheckpoint):
            update_config(folder / "config.json", self.base)
        change = vocabulary_change(plan.files)
        if change is not None:
            update_vocab_size(folder / "config.json", *change)
        (folder / "README.md").write_text(self.card(stats.as_dict()))

    def summary(self, stats) -> dict:
        summary = stats.as_dict()
        if stats.energy_kept():
            summary["energy_kept"] = stats.energy_kept()
        return summary


def portable_name_or_path(path: Path, key: str) -> None:
    """A copied JSON side file whose top-level ``key`` is a local path gets its folder name there instead (a hub id
    stays); the file is left byte for byte as it was otherwise."""
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return  # not ours to repair: it is copied as the base has it
    if not isinstance(data, dict) or not isinstance(data.get(key), str):
        return
    portable = portable_reference(data[key])
    if portable != data[key]:
        data[key] = portable
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def update_vocab_size(path: Path, old: int, new: int) -> None:
    """The resized vocabulary in an output ``config.json``: every ``vocab_size`` equal to the old row count, at the
    top or in a nested config (``text_config``), becomes ``new``. Where none equals it (rows padded beyond
    ``vocab_size``) the text config's is set, as transformers' ``resize_token_embeddings`` does."""
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdaptoolError(f"config.json of the base: invalid JSON ({e})", "repair the file") from None
    if not isinstance(data, dict):
        raise AdaptoolError("config.json of the base is not a JSON object", "repair the file")
    configs = [data, *(v for v in data.values() if isinstance(v, dict))]
    found = [c for c in configs if c.get("vocab_size") == old]
    if not found:
        text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
        found = [c for c in (text, data) if "vocab_size" in c][:1]
    for c in found:
        c["vocab_size"] = new
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_index(folder: Path, plan) -> None:
    """``model.safetensors.index.json`` naming each tensor's file, with the shards' metadata."""
    weight_map, total = {}, 0
    for planned in plan.files:
        for t in planned.tensors:
            weight_map[t.out.name] = planned.name
            total += t.out.nbytes
    metadata = plan.files[0].header_metadata() if plan.files else {}
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
