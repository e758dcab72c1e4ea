"""What the user names on the command line or in a recipe, opened: a base checkpoint, an adapter (a PEFT
folder or a kohya/LyCORIS file), each a local path or a hub id."""

from __future__ import annotations

from adaptool.io.adapter_folder import AdapterFolder
from adaptool.io.checkpoint import Checkpoint
from adaptool.io.hub import ADAPTER_PATTERNS, BASE_PATTERNS, resolve
from adaptool.io.kohya import kohya_file, open_kohya


def open_adapter(spec: str, base: Checkpoint | None = None):
    """A PEFT adapter folder, or a kohya/LyCORIS single ``.safetensors`` file, which needs ``base`` (the opened
    base checkpoint) to map its flattened module names."""
    root = resolve(spec, "adapter", ADAPTER_PATTERNS)
    single = kohya_file(root)
    if single is not None:
        return open_kohya(single, base, spec)
    return AdapterFolder.open(root, source=spec)


def open_base(spec: str) -> Checkpoint:
    """The base checkpoint at a folder, a ``.safetensors`` file or a hub id (headers only)."""
    return Checkpoint.open(resolve(spec, "base model", BASE_PATTERNS))


def input_paths(base: Checkpoint | None, adapters: list, *more) -> list:
    """Every path a run reads (resolved): what its output may not touch."""
    paths = [p for p in more if p]
    if base is not None:
        paths += [base.root, *base.shards]
    return paths + [a.input_path for a in adapters]
