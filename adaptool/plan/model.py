"""The files of a model output: the base's shard layout, each tensor copied or edited."""

from __future__ import annotations

from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import SINGLE_NAME, Checkpoint
from adaptool.io.safetensors_file import FLOAT_CODES, dtype_code
from adaptool.plan.plan import FromBase, PlannedFile


def model_files(base: Checkpoint, edits: dict[str, list], out_dtype, metadata: dict[str, str]) -> list[PlannedFile]:
    """One planned file per base shard, tensors in base order, the output dtype applied to float tensors.

    A sharded base keeps its layout: each name is the shard's path relative to the base folder, as its index
    gives it (``sub/model-00001-of-00002.safetensors`` stays in ``sub/``).

    Args:
        base (Checkpoint): the base model.
        edits (dict[str, list]): base tensor name -> edits, applied in order.
        out_dtype (torch.dtype | None): dtype of every float tensor; None keeps each tensor's.
        metadata (dict[str, str]): provenance for every shard's header.
    """
    check_editable(base, edits)
    code = dtype_code(out_dtype) if out_dtype is not None else None
    files = []
    for shard in base.shards:
        name = base.shard_name(shard) if base.sharded else SINGLE_NAME
        tensors = [FromBase(t, code if (code and t.dtype in FLOAT_CODES) else t.dtype, tuple(edits.get(t.name, ())))
                   for t in base.shard_tensors(shard)]
        files.append(PlannedFile(name, metadata, tensors))
    return files


def check_editable(base: Checkpoint, edits: dict) -> None:
    """Refuse edits to tensors stored as float8 or integers (quantised weights), before anything is written."""
    for name in edits:
        info = base.tensors.get(name)
        if info is not None and info.dtype not in FLOAT_CODES:
            raise AdaptoolError(f"quantised base {base.root}: tensor {name} is stored as {info.dtype}, not supported",
                                "unload into the unquantised (bf16) base")
