"""A PEFT adapter folder: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or ``.bin``).

Tensor names are normalised to module paths of the base model: PEFT's ``base_model.model.`` prefix is
stripped (transformers' ``save_pretrained(save_peft_format=False)`` writes none).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import TensorInfo, load_tensor, open_regular, read_header

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"


@dataclass
class AdapterFolder:
    """One adapter on disk.

    Attributes:
        source (str): what the user wrote (path or hub id), for messages and provenance.
        root (Path): the local folder.
        config (dict): ``adapter_config.json``.
        weights (Path): the weights file.
        infos (dict[str, TensorInfo]): tensors by normalised name (safetensors only).
    """

    source: str
    root: Path
    config: dict
    weights: Path
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    _pickled: dict | None = None
    _sha256: str | None = None
    settings: object = field(default=None, repr=False, compare=False)  # typed config, checked at open

    def __post_init__(self):
        from adaptool.adapters.config import parse_config

        if self.settings is None:
            self.settings = parse_config(self.config, str(Path(self.source) / CONFIG_NAME))

    @property
    def input_path(self) -> Path:
        return self.root

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA")).upper()

    @property
    def names(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return self.infos[name].shape

    def load(self, name: str):
        """Read one tensor (as stored)."""
        if self._pickled is not None:
            return self._pickled[name]
        return load_tensor(self.infos[name])

    def sha256(self) -> str:
        if self._sha256 is None:
            h = hashlib.sha256()
            h.update((self.root / CONFIG_NAME).read_bytes())
            with open_regular(self.weights) as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256

    @classmethod
    def open(cls, root: Path, source: str | None = None) -> "AdapterFolder":
        root = Path(root)
        source = source or str(root)
        cfg_path = root / CONFIG_NAME
        if not cfg_path.exists():
            raise AdaptoolError(f"{source}: no {CONFIG_NAME} in {root}",
                                "point at a PEFT adapter folder (made by save_pretrained)")
        try:
            with open_regular(cfg_path, CONFIG_NAME) as f:
                config = json.loads(f.read().decode("utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as e:
            raise AdaptoolError(f"{cfg_path}: invalid JSON ({str(e)[:200]})", "repair or re-save the adapter") from None
        st, pt = root / "adapter_model.safetensors", root / "adapter_model.bin"
        if st.exists() or st.is_symlink():
            infos, _ = read_header(st)
            normalised = {}
            for name, info in infos.items():
                if normalise_key(name) in normalised:
                    raise AdaptoolError(f"{st}: tensor {normalise_key(name)[:200]!r} appears twice (with and without "
                                        f"the {PEFT_PREFIX!r} prefix)", "re-save the adapter with PEFT")
                normalised[normalise_key(name)] = info
            return cls(source, root, config, st, normalised)
        if pt.exists() or pt.is_symlink():
            return cls(source, root, config, pt, {}, _load_pickle(pt))
        raise AdaptoolError(f"{source}: no adapter_model.safetensors in {root}", "re-save the adapter with PEFT")


def normalise_key(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _load_pickle(path: Path) -> dict:
    import pickle

    import torch

    hint = "re-save the adapter as safetensors; only plain tensors are read from .bin"
    try:
        with open_regular(path, "adapter_model.bin") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except AdaptoolError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError, RecursionError, MemoryError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AdaptoolError(f"{path}: refused to load ({first})", hint) from None
    if not isinstance(state, dict):
        raise AdaptoolError(f"{path}: not a state dict", "re-save the adapter with PEFT")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise AdaptoolError(f"{path}: holds a key that is not a tensor name ({type(k).__name__})", hint)
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_quantized or v.is_meta:
            raise AdaptoolError(f"{path}: entry {k[:200]!r} is not a plain tensor ({type(v).__name__})", hint)
        if normalise_key(k) in out:
            raise AdaptoolError(f"{path}: tensor {normalise_key(k)[:200]!r} appears twice (with and without the "
                                f"{PEFT_PREFIX!r} prefix)", "re-save the adapter with PEFT")
        out[normalise_key(k)] = v
    return out


def is_adapter_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).exists()
