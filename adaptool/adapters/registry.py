"""The adapter families by ``peft_type``, listed from explicit imports (no module is looked up by name), and
:func:`edits_for`, which turns one adapter into edits of a base checkpoint.
"""

from __future__ import annotations

from adaptool.adapters.adalora import FAMILY as ADALORA
from adaptool.adapters.family import Family
from adaptool.adapters.ia3 import FAMILY as IA3
from adaptool.adapters.loha import FAMILY as LOHA
from adaptool.adapters.lokr import FAMILY as LOKR
from adaptool.adapters.lora import FAMILY as LORA
from adaptool.adapters.oft import FAMILY as OFT
from adaptool.adapters.source import Adapter
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint

FAMILIES_BY_TYPE: dict[str, Family] = {f.peft_type: f for f in (LORA, LOHA, LOKR, IA3, ADALORA, OFT)}
SUPPORTED = "LORA (incl. rsLoRA, DoRA, modules_to_save, trainable tokens), LOHA, LOKR, IA3, ADALORA, OFT"


def family(peft_type: str, source: str = "adapter") -> Family:
    """The family of ``peft_type`` (upper case, as ``adapter.peft_type`` gives it).

    Raises:
        AdaptoolError: adaptool does not support the type (one line naming ``source`` and the type).
    """
    found = FAMILIES_BY_TYPE.get(peft_type)
    if found is None:
        raise AdaptoolError(f"{source}: adapter type {peft_type} is not supported yet", f"supported: {SUPPORTED}")
    return found


def edits_for(adapter: Adapter, base: Checkpoint) -> list:
    """All edits one adapter makes to a base checkpoint (see :mod:`adaptool.ops.edits`).

    Raises:
        AdaptoolError: an unsupported type, or an adapter that changes nothing (no tensor, or no complete module
            and no saved one).
    """
    peft_type = adapter.settings.peft_type
    edits = family(peft_type, adapter.source).edits(adapter, base)
    if not edits:
        # Structurally empty (a module whose factors are zeros still makes edits: it is a valid no-op adapter).
        what = "holds no tensors" if not adapter.names else f"holds no complete {peft_type} module and no saved module"
        raise AdaptoolError(f"{adapter.source}: adapter changes nothing: it {what}",
                            "the adapter is incomplete; re-save it (with PEFT's save_pretrained)")
    return edits
