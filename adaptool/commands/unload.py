"""``unload``: fold adapters into a base checkpoint and write a plain model.

The planner: open the inputs, turn every adapter into edits of base tensors (:func:`adaptool.adapters.edits_for`),
and plan the base's shards with those edits; the engine writes them and the model-folder sink the rest. A saved
embedding/lm_head of another vocabulary size replaces the base's tensor with its own shape, and ``vocab_size``
in config.json follows (:mod:`adaptool.plan.model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from adaptool.adapters import edits_for
from adaptool.adapters.notes import collected_notes
from adaptool.device import resolve_device, resolve_dtype
from adaptool.engine import execute
from adaptool.errors import AdaptoolError
from adaptool.io.adapter_folder import is_adapter_folder
from adaptool.io.hub import ADAPTER_PATTERNS, resolve
from adaptool.io.inputs import input_paths, open_adapter, open_base
from adaptool.io.kohya import kohya_file, looks_kohya
from adaptool.output.model_folder import ModelFolder
from adaptool.output.provenance import adapter_name, base_name, metadata, model_card
from adaptool.output.target import preflight
from adaptool.plan import Plan
from adaptool.plan.model import model_files, vocabulary_change
from adaptool.plan.resolve import group_edits
from adaptool.plan.replication import replicate, replication_ranges


def split_sources(spec: str) -> tuple[str | None, list[str]]:
    """``BASE+ADAPTER[+ADAPTER…]`` or ``ADAPTER[+ADAPTER…]`` into (base or None, adapters)."""
    parts = [p.strip() for p in spec.split("+")]
    if any(not p for p in parts):
        raise AdaptoolError(f"cannot read {spec!r}", "write BASE+ADAPTER[+ADAPTER…], e.g. ./base+./my-lora")
    first = parts[0]
    local = Path(first).expanduser()
    if local.exists():
        kohya = kohya_file(local)  # a kohya/LyCORIS file is an adapter; another .safetensors file may be a base
        first_is_adapter = is_adapter_folder(local) or (kohya is not None and looks_kohya(kohya))
    else:
        try:
            first_is_adapter = is_adapter_folder(resolve(first, "adapter", ADAPTER_PATTERNS))
        except AdaptoolError:
            first_is_adapter = False
    if first_is_adapter:
        return None, parts
    if len(parts) == 1:
        raise AdaptoolError(f"{first} is not an adapter folder (no adapter_config.json)",
                            "write BASE+ADAPTER, e.g. ./base+./my-lora")
    return first, parts[1:]


def unload(
    base: str | None,
    adapters: list[str],
    output: str | Path,
    *,
    dtype: str | None = None,
    device: str = "auto",
    force: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Fold ``adapters`` (each at weight 1, in order) into ``base`` and write the model to ``output``.

    Args:
        base (str | None): base folder or hub id; None takes the first adapter's ``base_model_name_or_path``.
        adapters (list[str]): adapter folders or hub ids, or kohya/LyCORIS ``.safetensors`` files (these need ``base``).
        output (str | Path): the output folder (created atomically).
        dtype (str | None): output dtype of float tensors. Default: the base's.
        device (str): auto, cpu, cuda or cuda:N.
        force (bool): replace a non-empty output folder.
        on_start: called with (tensor count, total bytes) once the plan is checked.
        on_progress: called with the bytes of each tensor written.

    Returns:
        dict: a summary (output, tensors_changed, bytes_written, seconds, peak memory, notes, …).

    Raises:
        AdaptoolError: any problem with the inputs, found before anything is written where possible.
    """
    if not adapters:
        raise AdaptoolError("no adapter given", "write BASE+ADAPTER")
    preflight(output, force, [s for s in (base, *adapters) if s and Path(s).expanduser().exists()])
    out_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    with collected_notes() as notes:
        base, plan = plan_unload(base, adapters, output, force, out_dtype)
    change = vocabulary_change(plan.files)
    if change is not None:
        notes.append(f"the vocabulary is resized from {change[0]} to {change[1]} rows and config.json's vocab_size "
                     "follows; the tokenizer files are the base's: use the tokenizer the adapter was trained with")
    stats = execute(plan, Path(output), force, dev, on_start, on_progress)
    return {"output": str(output), "base": base, "adapters": list(adapters), "device": str(dev), "notes": notes,
            **plan.sink.summary(stats)}


def plan_unload(base: str | None, adapters: list[str], output, force: bool, out_dtype) -> tuple[str, Plan]:
    """(the base as named, the plan): every adapter's edits on the base's shards, checked before any write."""
    # The base opens first when given: kohya/LyCORIS files need it to map their module names.
    checkpoint = open_base(base) if base is not None else None
    folders = [open_adapter(a, checkpoint) for a in adapters]
    named = [checkpoint] if checkpoint is not None else []  # what the user named, for the card's command line
    if base is None:
        base = folders[0].settings.base_model_name_or_path
        if not base:
            raise AdaptoolError(f"{adapters[0]} names no base_model_name_or_path", "give the base: BASE+ADAPTER")
        checkpoint = open_base(base)
    inputs = input_paths(checkpoint, folders)
    preflight(output, force, inputs)
    original = checkpoint
    ranges = replication_ranges(folders)
    if ranges:  # the adapter was trained on an expanded layer stack: fold it into that stack, un-shared
        checkpoint = replicate(checkpoint, ranges, folders[0].source)
    edits = []
    for folder in folders:
        folder.check_finite()
        edits += edits_for(folder, checkpoint)
    names = [base_name(c) for c in named] + [adapter_name(f) for f in folders]
    command = "adaptool unload " + "+".join(names)
    title = " + ".join([base_name(original)] + names[len(named):])
    card = lambda stats: model_card(title, command, folders, base=original, stats=stats)  # noqa: E731
    files = model_files(checkpoint, group_edits(edits), out_dtype, metadata("unload", original, folders))
    return base, Plan(files, ModelFolder(checkpoint, out_dtype, card), inputs)
