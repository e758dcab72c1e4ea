"""Adapter families: each turns one adapter's tensors into edits of base tensors.

* :mod:`~adaptool.adapters.source`: the :class:`Adapter` protocol every source (PEFT folder, kohya file) meets;
* :mod:`~adaptool.adapters.config`: the typed adapter config, parsed once by the reader;
* :mod:`~adaptool.adapters.registry`: :func:`family` by ``peft_type`` and :func:`edits_for`;
* one module per family (:mod:`~adaptool.adapters.lora`, ``loha``, ``lokr``, ``ia3``, ``adalora``, ``oft``), and
  what they share: :mod:`~adaptool.adapters.saved` (``modules_to_save`` copies, trainable tokens),
  :mod:`~adaptool.adapters.layout` (Linear vs GPT-2 Conv1D), :mod:`~adaptool.adapters.common`,
  :mod:`~adaptool.adapters.notes`, :mod:`~adaptool.adapters.patterns`.
"""

from __future__ import annotations

from adaptool.adapters.family import Family
from adaptool.adapters.registry import FAMILIES_BY_TYPE, edits_for, family
from adaptool.adapters.source import Adapter

__all__ = ["FAMILIES_BY_TYPE", "Adapter", "Family", "edits_for", "family"]
