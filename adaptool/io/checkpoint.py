"""A base model checkpoint: one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.

Only headers are read here; tensors are read one at a time by the engine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import TensorInfo, open_regular, read_header
from adaptool.io.side_files import inside_file, side_files

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Tensor name endings of quantised checkpoints (FP8 block scales, GPTQ/AWQ, bitsandbytes, compressed-tensors).
QUANT_SUFFIXES = ("weight_scale_inv", ".weight_scale", ".input_scale", ".qweight", ".qzeros", ".g_idx", ".absmax",
                  ".nested_absmax", ".quant_map", ".SCB", ".weight_packed", ".quant_state.bitsandbytes__nf4",
                  ".quant_state.bitsandbytes__fp4")


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
        """Read the layout (headers only) of the checkpoint at ``root`` (a folder, or one ``.safetensors`` file).

        Raises:
            AdaptoolError: no weights, a malformed or mismatched index, a file outside the folder (see
                :mod:`adaptool.io.side_files`), an invalid header, or a quantised checkpoint.
        """
        root = Path(root)
        weight_map = None
        if root.is_file():
            if root.suffix != ".safetensors":
                raise AdaptoolError(f"base {root} is not a .safetensors file", "point at the model folder")
            shards, sharded = [root], False
            root = root.parent
        elif (root / INDEX_NAME).exists() or (root / INDEX_NAME).is_symlink():
            weight_map = _read_index(root)
            shards, sharded = sorted(set(weight_map.values()), key=str), True
        elif (root / SINGLE_NAME).exists() or (root / SINGLE_NAME).is_symlink():
            shards, sharded = [inside_file(root, SINGLE_NAME, "weights file")], False
        else:
            if (root / "adapter_config.json").exists():
                raise AdaptoolError(f"{root} is an adapter, not a base model",
                                    "write BASE+ADAPTER, or give only the adapter to use its base_model_name_or_path")
            found = sorted(root.glob("*.safetensors"))
            if len(found) == 1:
                shards, sharded = [inside_file(root, found[0].name, "weights file")], False
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
        if weight_map is not None:
            _check_index(root, weight_map, tensors)
        config = {}
        if (root / "config.json").exists() or (root / "config.json").is_symlink():
            path = inside_file(root, "config.json", "config file")
            try:
                with open_regular(path, "config.json") as f:
                    config = json.loads(f.read().decode("utf-8"))
            except (ValueError, RecursionError) as e:
                raise AdaptoolError(f"{path}: invalid JSON ({str(e)[:200]})", "repair the file") from None
            if not isinstance(config, dict):
                raise AdaptoolError(f"{path}: not a JSON object", "repair the file")
        _refuse_quantised(root, config, tensors)
        side_files(root)  # a side file linking out of the folder is refused now, before anything is written
        return cls(root=root, shards=shards, tensors=tensors, config=config, sharded=sharded)

    def shard_tensors(self, shard: Path) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.file == shard]

    def shard_name(self, shard: Path) -> str:
        """The shard's path relative to the checkpoint folder, as the index names it (``sub/x.safetensors``)."""
        return Path(os.path.relpath(shard, self.root)).as_posix()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _read_index(root: Path) -> dict[str, Path]:
    """``weight_map`` of the index: tensor name -> its shard's path ``root / value``.

    Each value must be a relative file name (a subfolder is fine) that stays inside ``root`` lexically and
    resolves to a regular file inside ``root``'s real path, or inside the hub cache's ``blobs/`` of the same
    repo when ``root`` is a snapshot (:func:`adaptool.io.side_files.inside_file`).
    """
    index_path = inside_file(root, INDEX_NAME, "index")
    hint = "repair or re-download it"
    try:
        with open_regular(index_path, "index") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise AdaptoolError(f"{index_path}: not a valid safetensors index ({str(e)[:200]})", hint) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise AdaptoolError(f"{index_path}: not a valid safetensors index (weight_map is not an object of "
                            "file names)", hint)
    paths: dict[str, Path] = {}
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        if file not in shards:
            shards[file] = inside_file(root, file, f"{INDEX_NAME} entry")
        paths[name] = shards[file]
    return paths


def _check_index(root: Path, weight_map: dict[str, Path], tensors: dict[str, TensorInfo]) -> None:
    """Every tensor of the index is in the shard it names, and every shard tensor is in the index."""
    hint = "repair the index or re-download the checkpoint"
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise AdaptoolError(f"{INDEX_NAME} of {root} lists tensor {name[:200]!r}, which no shard holds", hint)
        if info.file != shard:
            raise AdaptoolError(f"{INDEX_NAME} of {root} puts tensor {name[:200]!r} in "
                                f"{os.path.relpath(shard, root)}, but it is in {os.path.relpath(info.file, root)}", hint)
    for name, info in tensors.items():
        if name not in weight_map:
            raise AdaptoolError(f"tensor {name[:200]!r} of {info.file} is missing from {INDEX_NAME}", hint)


def _refuse_quantised(root: Path, config: dict, tensors: dict[str, TensorInfo]) -> None:
    """Quantised checkpoints (their weights are codes plus scales) cannot take a float delta: refuse them."""
    method = None
    if config.get("quantization_config") is not None:
        qc = config["quantization_config"]
        method = str(qc.get("quant_method", "quantization_config") if isinstance(qc, dict) else "quantization_config")
    else:
        for name in tensors:
            if name.endswith(QUANT_SUFFIXES):
                method = f"tensor {name[:200]}"
                break
    if method is not None:
        raise AdaptoolError(f"quantised base {root} ({method[:200]}) not supported",
                            "unload into the unquantised (bf16) base")
