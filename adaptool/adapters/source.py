"""The one protocol every adapter source meets (a PEFT folder, a kohya/LyCORIS file): all that the families,
the planners and provenance may use of an opened adapter.

Tensor names are PEFT-style module paths of the base model plus the family's suffix
(``model.layers.0.self_attn.q_proj.lora_A.weight``), whatever the file calls them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from adaptool.adapters.config import AdapterConfig


@runtime_checkable
class Adapter(Protocol):
    """An opened adapter.

    Attributes:
        source (str): what the user wrote (path or hub id), for messages and provenance.
        settings (AdapterConfig): the typed config, parsed once when the adapter was opened.
    """

    source: str
    settings: AdapterConfig

    @property
    def input_path(self) -> Path:
        """The path the user's input stands for (a folder, or a single file): what an output may not touch."""
        ...

    @property
    def peft_type(self) -> str:
        """Upper case, e.g. ``LORA`` (``settings.peft_type``)."""
        ...

    @property
    def names(self) -> list[str]:
        """Every tensor's name, in the file's order."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (no bytes read)."""
        ...

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (dtype and shape), a CPU tensor the caller owns (it may change it in place)."""
        ...

    def view(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored, viewing the adapter's buffer: read it, never change it (no copy)."""
        ...

    def sha256(self) -> str:
        """Hex digest of the adapter's bytes (for provenance)."""
        ...

    def sha256_soon(self) -> None:
        """Start computing :meth:`sha256` on a thread of its own (it then waits for that)."""
        ...

    def check_finite(self, names=None) -> None:
        """Raise :class:`~adaptool.errors.AdaptoolError` naming the first tensor holding NaN or Inf (of ``names``
        when given, else of all)."""
        ...
