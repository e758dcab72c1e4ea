"""Adapter families: each turns one adapter's tensors into edits of base tensors.

``edits_for(adapter, base)`` dispatches on ``peft_type``.
"""

from __future__ import annotations

from adaptool.errors import AdaptoolError


def edits_for(adapter, base):
    """All edits one adapter makes to a base checkpoint (see :mod:`adaptool.edits`)."""
    peft_type = adapter.peft_type
    if peft_type == "LORA":
        from adaptool.adapters.lora import lora_edits

        return lora_edits(adapter, base)
    raise AdaptoolError(
        f"{adapter.source}: adapter type {peft_type} is not supported yet",
        "supported: LORA (incl. rsLoRA, DoRA, modules_to_save, trainable tokens)",
    )
