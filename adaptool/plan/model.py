"""The files of a model output: the base's shard layout, each tensor copied or edited.

A whole-tensor replacement may change the vocabulary (rows) of an embedding or output head: that tensor is
planned with the new shape (:attr:`~adaptool.plan.FromBase.shape`), the rows of every embedding and head of the
old vocabulary must follow, and the sink updates ``vocab_size`` from :func:`vocabulary_change`.
"""

from __future__ import annotations

from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import SINGLE_NAME, Checkpoint
from adaptool.io.safetensors_file import FLOAT_CODES, dtype_code
from adaptool.ops.edits import Replace
from adaptool.plan.plan import FromBase, PlannedFile

# Modules whose weight is (vocabulary, hidden): input embeddings and output heads. Position embeddings (wpe) are not.
VOCABULARY_LEAVES = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings", "shared"})


def is_vocabulary(name: str) -> bool:
    """Whether tensor ``name`` is the weight of an input embedding or an output head (one row per token)."""
    module, _, param = name.rpartition(".")
    return param == "weight" and module.rpartition(".")[2] in VOCABULARY_LEAVES


def model_files(base: Checkpoint, edits: dict[str, list], out_dtype, metadata: dict[str, str]) -> list[PlannedFile]:
    """One planned file per base shard, tensors in base order, the output dtype applied to float tensors.

    A sharded base keeps its layout: each name is the shard's path relative to the base folder, as its index
    gives it (``sub/model-00001-of-00002.safetensors`` stays in ``sub/``).

    Args:
        base (Checkpoint): the base model.
        edits (dict[str, list]): base tensor name -> edits, applied in order.
        out_dtype (torch.dtype | None): dtype of every float tensor; None keeps each tensor's.
        metadata (dict[str, str]): provenance for every shard's header.

    Raises:
        AdaptoolError: an edit of a quantised tensor, or a resized vocabulary the other tensors do not follow.
    """
    check_editable(base, edits)
    code = dtype_code(out_dtype) if out_dtype is not None else None
    files = []
    for shard in base.shards:
        name = base.shard_name(shard) if base.sharded else SINGLE_NAME
        tensors = [_planned(t, code if (code and t.dtype in FLOAT_CODES) else t.dtype, edits.get(t.name, ()))
                   for t in base.shard_tensors(shard)]
        files.append(PlannedFile(name, metadata, tensors))
    check_vocabulary(base, files)
    return files


def _planned(info, dtype: str, eds) -> FromBase:
    """``info`` after ``eds``. Where a replacement changes the shape, the edits before the last replacement are
    dropped (it overwrites them) and none may follow it (each was checked against the base's shape)."""
    eds = tuple(eds)
    if not any(isinstance(e, Replace) and e.shape is not None for e in eds):
        return FromBase(info, dtype, eds)
    last = max(i for i, e in enumerate(eds) if isinstance(e, Replace))
    replace, after = eds[last], eds[last + 1:]
    if replace.shape is None:  # the last replacement has the base's shape again
        return FromBase(info, dtype, eds[last:])
    if after:
        raise AdaptoolError(f"{info.name}: {replace.source} replaces it with shape {tuple(replace.shape)}, but "
                            f"{after[0].source} then changes it as a tensor of shape {tuple(info.shape)}",
                            "apply the adapter that resizes the vocabulary last, or resize the base model first")
    return FromBase(info, dtype, (replace,), tuple(replace.shape))


def check_vocabulary(base: Checkpoint, files: list[PlannedFile]) -> None:
    """Where a tensor's vocabulary is resized, every embedding and head of the old vocabulary (the base's tensors
    with its row count) must end with one new row count, and only the rows may change."""
    planned = [t for f in files for t in f.tensors]
    resized = [t for t in planned if t.resized]
    if not resized:
        return
    first = resized[0]
    old_rows = {t.source.shape[0] for t in resized}
    for t in planned:
        if not (is_vocabulary(t.source.name) and len(t.source.shape) == 2 and t.source.shape[0] in old_rows):
            continue
        if not t.resized:
            raise AdaptoolError(f"{first.source.name} is resized from {first.source.shape[0]} to {first.out.shape[0]} "
                                f"rows, but {t.source.name} keeps {t.source.shape[0]}",
                                "save every embedding and head of the new vocabulary in the adapter "
                                "(modules_to_save=['embed_tokens', 'lm_head'])")
        if t.out.shape[0] != first.out.shape[0]:
            raise AdaptoolError(f"the vocabulary is resized to {first.out.shape[0]} rows in {first.source.name} but to "
                                f"{t.out.shape[0]} in {t.source.name}",
                                "give every embedding and head of the new vocabulary the same number of rows")


def vocabulary_change(files: list[PlannedFile]) -> tuple[int, int] | None:
    """(old rows, new rows) of the resized vocabulary (see :func:`check_vocabulary`), None when nothing is resized."""
    for f in files:
        for t in f.tensors:
            if t.resized:
                return t.source.shape[0], t.out.shape[0]
    return None


def check_editable(base: Checkpoint, edits: dict) -> None:
    """Refuse edits to tensors stored as float8 or integers (quantised weights), before anything is written."""
    for name in edits:
        info = base.tensors.get(name)
        if info is not None and info.dtype not in FLOAT_CODES:
            raise AdaptoolError(f"quantised base {base.root}: tensor {name} is stored as {info.dtype}, not supported",
                                "unload into the unquantised (bf16) base")
