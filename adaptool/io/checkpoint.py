"""A base model checkpoint: one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.

Only headers are read here; tensors are read one at a time by the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class Checkpoint:
    """The layout of a base checkpoint.

    Attributes:
        root (Path): its folder.
        shards (list[Path]): the weight files, in name order.
        tensors (dict[str, TensorInfo]): every tensor by name.
        config (dict): ``config.json`` (empty when absent).
    """

    root: Path
    shards: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)
    sharded: bool = False

    @classmethod
    def open(cls, root: Path) -> "Checkpoint":
        root = Path(root)
        if root.is_file():
            if root.suffix != ".safetensors":
                raise AdaptoolError(f"base {root} is not a .safetensors file", "point at the model folder")
            shards, sharded = [root], False
            root = root.parent
        elif (root / INDEX_NAME).exists():
            shards, sharded = _shards_from_index(root / INDEX_NAME), True
        elif (root / SINGLE_NAME).exists():
            shards, sharded = [root / SINGLE_NAME], False
        else:
            if (root / "adapter_config.json").exists():
                raise AdaptoolError(f"{root} is an adapter, not a base model",
                                    "write BASE+ADAPTER, or give only the adapter to use its base_model_name_or_path")
            found = sorted(root.glob("*.safetensors"))
            if len(found) == 1:
                shards, sharded = found, False
            elif any(root.glob("*.bin")) or any(root.glob("*.pt")):
                raise AdaptoolError(f"base {root} has only pickle (.bin) weights",
                                    "convert it to safetensors first (save_pretrained(safe_serialization=True))")
            else:
                raise AdaptoolError(f"no model.safetensors or {INDEX_NAME} in {root}",
                                    "point at a folder holding a safetensors checkpoint")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            infos, _ = read_header(shard)
            for name, info in infos.items():
                if name in tensors:
                    raise AdaptoolError(f"tensor {name!r} appears in two shards of {root}", "repair the checkpoint index")
                tensors[name] = info
        config = {}
        if (root / "config.json").exists():
            try:
                config = json.loads((root / "config.json").read_text())
            except json.JSONDecodeError as e:
                raise AdaptoolError(f"{root / 'config.json'}: invalid JSON ({e})", "repair the file") from None
        return cls(root=root, shards=shards, tensors=tensors, config=config, sharded=sharded)

    def shard_tensors(self, shard: Path) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.file == shard]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text())
        names = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise AdaptoolError(f"{index_path}: not a valid safetensors index ({e})", "repair or re-download it") from None
    shards = [index_path.parent / n for n in names]
    for s in shards:
        if not s.exists():
            raise AdaptoolError(f"shard {s.name} listed in {index_path.name} is missing", "re-download the checkpoint")
    return shards
