"""Adapter families: each turns one adapter's tensors into edits of base tensors.

``edits_for(adapter, base)`` dispatches on ``peft_type``.
"""

from __future__ import annotations

from adaptool.errors import AdaptoolError


# peft_type -> (module, function): each family lives in its own module, imported only when used.
FAMILIES = {
    "LORA": ("lora", "lora_edits"),
    "LOHA": ("loha", "loha_edits"),
    "LOKR": ("lokr", "lokr_edits"),
    "IA3": ("ia3", "ia3_edits"),
    "ADALORA": ("adalora", "adalora_edits"),
    "OFT": ("oft", "oft_edits"),
}


def edits_for(adapter, base):
    """All edits one adapter makes to a base checkpoint (see :mod:`adaptool.edits`)."""
    import importlib

    from adaptool.adapters.config import config_of

    peft_type = config_of(adapter).peft_type
    if peft_type not in FAMILIES:
        raise AdaptoolError(
            f"{adapter.source}: adapter type {peft_type} is not supported yet",
            "supported: LORA (incl. rsLoRA, DoRA, modules_to_save, trainable tokens), LOHA, LOKR, IA3, ADALORA, OFT",
        )
    module, function = FAMILIES[peft_type]
    edits = getattr(importlib.import_module(f"adaptool.adapters.{module}"), function)(adapter, base)
    if not edits:
        # Structurally empty (a module whose factors are zeros still makes edits: it is a valid no-op adapter).
        what = "holds no tensors" if not adapter.names else f"holds no complete {peft_type} module and no saved module"
        raise AdaptoolError(f"{adapter.source}: adapter changes nothing: it {what}",
                            "the adapter is incomplete; re-save it (with PEFT's save_pretrained)")
    return edits
