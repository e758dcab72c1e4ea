"""``unload``: fold adapters into a base checkpoint and write a plain model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from adaptool.errors import AdaptoolError


def open_adapter(spec: str, base=None):
    """A PEFT adapter folder, or a kohya/LyCORIS single ``.safetensors`` file, which needs ``base`` (the opened
    base Checkpoint) to map its flattened module names."""
    from adaptool.io.adapter_folder import AdapterFolder
    from adaptool.io.hub import ADAPTER_PATTERNS, resolve
    from adaptool.io.kohya import kohya_file, open_kohya

    root = resolve(spec, "adapter", ADAPTER_PATTERNS)
    single = kohya_file(root)
    if single is not None:
        return open_kohya(single, base, spec)
    return AdapterFolder.open(root, source=spec)


def open_base(spec: str):
    from adaptool.io.checkpoint import Checkpoint
    from adaptool.io.hub import BASE_PATTERNS, resolve

    return Checkpoint.open(resolve(spec, "base model", BASE_PATTERNS))


def split_sources(spec: str) -> tuple[str | None, list[str]]:
    """``BASE+ADAPTER[+ADAPTER…]`` or ``ADAPTER[+ADAPTER…]`` into (base or None, adapters)."""
    from adaptool.io.adapter_folder import is_adapter_folder
    from adaptool.io.hub import ADAPTER_PATTERNS, resolve
    from adaptool.io.kohya import kohya_file, looks_kohya

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
        dict: a summary (output, tensors_changed, bytes_written, seconds, peak memory, …).

    Raises:
        AdaptoolError: any problem with the inputs, found before anything is written where possible.
    """
    from adaptool.adapters import edits_for
    from adaptool.adapters.common import collected_notes
    from adaptool.device import resolve_device, resolve_dtype
    from adaptool.engine import output_layout, run
    from adaptool.io.output_dir import AtomicDir, preflight
    from adaptool.plan import Plan
    from adaptool.provenance import metadata, model_card
    from adaptool.replication import replicate, replication_ranges, update_config

    if not adapters:
        raise AdaptoolError("no adapter given", "write BASE+ADAPTER")
    preflight(output, force, [s for s in (base, *adapters) if s and Path(s).expanduser().exists()])
    target = Path(output)
    out_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    # The base opens first when given: kohya/LyCORIS files need it to map their module names.
    checkpoint = open_base(base) if base is not None else None
    folders = [open_adapter(a, checkpoint) for a in adapters]
    if base is None:
        base = folders[0].config.get("base_model_name_or_path")
        if not base:
            raise AdaptoolError(f"{adapters[0]} names no base_model_name_or_path", "give the base: BASE+ADAPTER")
        checkpoint = open_base(base)
    preflight(output, force, [checkpoint.root, *checkpoint.shards, *(f.input_path for f in folders)])
    ranges = replication_ranges(folders)
    if ranges:  # the adapter was trained on an expanded layer stack: fold it into that stack, un-shared
        checkpoint = replicate(checkpoint, ranges, folders[0].source)
    plan = Plan()
    with collected_notes() as notes:
        for folder in folders:
            check_finite(folder)
            plan.add(edits_for(folder, checkpoint))

    layout = output_layout(checkpoint, out_dtype)
    total_bytes = sum(t.nbytes for _, ts in layout for t in ts)
    if on_start:
        on_start(len(checkpoint.tensors), total_bytes)
    command = "adaptool unload " + "+".join([base, *adapters])
    meta = metadata("unload", base, folders)
    with AtomicDir(target, force) as tmp:
        stats = run(checkpoint, plan.edits, tmp, out_dtype, dev, meta, on_progress)
        copy_side_files(checkpoint.root, tmp, dtype_name(out_dtype))
        if ranges:
            update_config(tmp / "config.json", checkpoint)
        summary = stats.as_dict()
        (tmp / "README.md").write_text(model_card(target.name, command, base, folders, summary))
    return {"output": str(target), "base": base, "adapters": list(adapters), "device": str(dev), "notes": notes,
            **summary}


def dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def copy_side_files(src: Path, dst: Path, new_dtype: str | None) -> None:
    """config.json, generation_config.json and tokenizer files travel with the weights (regular files inside
    ``src`` only: see :mod:`adaptool.io.side_files`)."""
    from adaptool.io.side_files import copy_side_files as copy

    copy(src, dst, new_dtype)


def check_finite(folder) -> None:
    """Refuse an adapter with NaN/Inf anywhere, naming the tensor, before any output is written."""
    import torch

    for name in folder.names:
        t = folder.load(name)
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise AdaptoolError(f"{folder.source}: tensor {name} contains NaN or Inf",
                                "the adapter is broken; retrain or re-export it")
