"""What the registry knows of an adapter family (:class:`Family`); each family's module declares its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adaptool.adapters.saved import is_own
from adaptool.adapters.source import Adapter
from adaptool.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class Family:
    """One adapter family as PEFT 0.21.2 defines it.

    Attributes:
        peft_type (str): e.g. ``LOHA``.
        edits (Callable[[Adapter, Checkpoint], list[Edit]]): every edit the adapter makes to a base checkpoint
            (:mod:`adaptool.ops.edits`), names resolved and shapes checked.
        own (tuple[str, ...]): suffixes of the family's own tensors (LoHa's ``.hada_w1_a`` …); () for LoRA, whose
            tensors every family tells apart by name (:data:`adaptool.adapters.saved.OWN_MARKERS`).
        additive (bool): the family adds a ΔW to each weight (LoRA, LoHa, LoKr, AdaLoRA), so adapters of it can
            be summed; IA3 scales and OFT rotates the weight instead.
    """

    peft_type: str
    edits: Callable[[Adapter, Checkpoint], list]
    own: tuple[str, ...]
    additive: bool

    def is_own(self, name: str) -> bool:
        """Whether tensor ``name`` is one of this family's own (not a ``modules_to_save`` copy, a saved base
        tensor or trainable tokens, which travel as saved)."""
        return is_own(name, self.own)
