"""A PEFT adapter folder: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or ``.bin``).

Tensor names are normalised to module paths of the base model: PEFT's ``base_model.model.`` prefix is
stripped (transformers' ``save_pretrained(save_peft_format=False)`` writes none).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptool.adapters.config import AdapterConfig, parse_config
from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import TensorInfo, open_regular, read_header
from adaptool.io.weights_buffer import WeightsBuffer, first_non_finite, non_finite_error, stream_sha256

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"


@dataclass
class AdapterFolder:
    """One adapter on disk (an :class:`~adaptool.adapters.source.Adapter`).

    The weights file is read once, on first use (:meth:`load`, :meth:`sha256` or :meth:`check_finite`), into one
    buffer that all three use; a ``.bin`` is loaded whole when the folder is opened.

    Attributes:
        source (str): what the user wrote (path or hub id), for messages and provenance.
        root (Path): the local folder.
        config (dict): ``adapter_config.json`` as written (for callers that predate ``settings``).
        weights (Path): the weights file.
        infos (dict[str, TensorInfo]): tensors by normalised name (safetensors only).
        settings (AdapterConfig): the typed config, parsed when the folder is opened.
        config_bytes (bytes | None): ``adapter_config.json``'s bytes as read (hashed with the weights).
    """

    source: str
    root: Path
    config: dict
    weights: Path
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    pickled: dict | None = field(default=None, repr=False)
    settings: AdapterConfig | None = field(default=None, repr=False, compare=False)
    config_bytes: bytes | None = field(default=None, repr=False, compare=False)
    _buffer: WeightsBuffer | None = field(default=None, init=False, repr=False, compare=False)
    _sha256: str | None = field(default=None, init=False, repr=False, compare=False)
    _non_finite: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.settings is None:
            self.settings = parse_config(self.config, str(Path(self.source) / CONFIG_NAME))

    @property
    def input_path(self) -> Path:
        return self.root

    @property
    def peft_type(self) -> str:
        return self.settings.peft_type

    @property
    def names(self) -> list[str]:
        return list(self.pickled) if self.pickled is not None else list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.pickled is not None:
            return tuple(self.pickled[name].shape)
        return self.infos[name].shape

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (a copy out of the file's buffer: the caller may change it)."""
        if self.pickled is not None:
            return self.pickled[name]
        return self._bytes().tensor(self.infos[name])

    def sha256(self) -> str:
        """Hex digest of ``adapter_config.json``'s bytes followed by the weights file's."""
        if self._sha256 is None:
            prefix = self._config_bytes()
            self._sha256 = stream_sha256(self.weights, prefix) if self.pickled is not None else self._bytes().sha256()
        return self._sha256

    def sha256_soon(self) -> None:
        if self.pickled is None and self._sha256 is None:
            self._bytes().sha256_soon()

    def view(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored, viewing the file's buffer (read it, never change it)."""
        return self._view(name)

    def check_finite(self, names=None) -> None:
        """Refuse an adapter with NaN/Inf in any tensor (of ``names`` when given), naming the first (from the same
        buffer; all of them checked once).

        Raises:
            AdaptoolError: ``<source>: tensor <name> contains NaN or Inf``.
        """
        if names is not None:
            bad = first_non_finite((n, self._view(n)) for n in names)
            if bad:
                raise non_finite_error(self.source, bad)
            return
        if self._non_finite is None:
            self._non_finite = first_non_finite((n, self._view(n)) for n in self.names) or ""
        if self._non_finite:
            raise non_finite_error(self.source, self._non_finite)

    def _view(self, name: str) -> torch.Tensor:
        return self.pickled[name] if self.pickled is not None else self._bytes().view(self.infos[name])

    def _bytes(self) -> WeightsBuffer:
        if self._buffer is None:
            self._buffer = WeightsBuffer(self.weights, self._config_bytes())
        return self._buffer

    def _config_bytes(self) -> bytes:
        if self.config_bytes is None:
            self.config_bytes = (self.root / CONFIG_NAME).read_bytes()
        return self.config_bytes

    @classmethod
    def open(cls, root: Path, source: str | None = None) -> "AdapterFolder":
        """Open the adapter folder ``root``: its config parsed and checked, the weights' header read (a ``.bin``
        loaded), no tensor bytes read yet.

        Raises:
            AdaptoolError: no config or invalid JSON, a config key of the wrong type, no weights file, a weights
                file that is not valid safetensors (or a ``.bin`` of anything but plain tensors).
        """
        root = Path(root)
        source = source or str(root)
        cfg_path = root / CONFIG_NAME
        if not cfg_path.exists():
            raise AdaptoolError(f"{source}: no {CONFIG_NAME} in {root}",
                                "point at a PEFT adapter folder (made by save_pretrained)")
        try:
            with open_regular(cfg_path, CONFIG_NAME) as f:
                config_bytes = f.read()
            config = json.loads(config_bytes.decode("utf-8"))
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
            return cls(source, root, config, st, normalised, config_bytes=config_bytes)
        if pt.exists() or pt.is_symlink():
            return cls(source, root, config, pt, {}, _load_pickle(pt), config_bytes=config_bytes)
        raise AdaptoolError(f"{source}: no adapter_model.safetensors in {root}", "re-save the adapter with PEFT")


def normalise_key(name: str) -> str:
    """A tensor name without PEFT's ``base_model.model.`` prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _load_pickle(path: Path) -> dict:
    """The plain tensors of a ``.bin`` state dict (``torch.load(weights_only=True)``), by normalised name."""
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
    """Whether ``path`` holds an ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).exists()
