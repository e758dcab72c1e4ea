"""LoRA ``layer_replication``: PEFT's expanded layer stack as a view of the base checkpoint.

PEFT (``tuners_utils.replicate_layers``) builds a new layer list from ``[start, end)`` ranges of the base's
layers, e.g. ``[[0, 2], [1, 2]]`` on a 2-layer model gives layers ``[0, 1, 1]``. The replicas SHARE their base
weights, each replica gets its own LoRA modules, and the adapter's keys use the EXPANDED indices
(``model.layers.2.self_attn.q_proj`` is the second copy of base layer 1). PEFT's ``merge_and_unload`` adds both
replicas' deltas into the one shared weight, which is wrong.

Here the replicas are un-shared: :func:`replicate` returns a checkpoint whose tensor table lists every tensor
of the expanded model under its new name, each pointing at the bytes of its source tensor. The plan resolves
adapter keys against that table, the engine reads each output tensor from where its entry points (a replica
lands in the shard of its source), and :func:`update_config` writes the new layer count into ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from adaptool.adapters.source import Adapter
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint

# ``<prefix>.<index>.<rest>`` where the prefix ends in a layer-list attribute (Llama ``model.layers``, GPT-2
# ``transformer.h``, OPT ``model.decoder.layers``, BERT ``bert.encoder.layer``, bare checkpoints without the
# outer prefix).
LAYER_NAME = re.compile(r"^((?:.+\.)?(?:layers|layer|h))\.(\d+)\.(.+)$")
# Which stack to take when a checkpoint has several (PEFT looks for ``model(.model)*.layers``, then
# ``encoder.layer``, then ``h``).
PREFERRED_PREFIXES = ("model.layers", "layers", "model.model.layers", "model.language_model.layers",
                      "bert.encoder.layer", "encoder.layer", "transformer.h", "h", "model.decoder.layers")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class ReplicatedCheckpoint(Checkpoint):
    """A base checkpoint seen through ``layer_replication``.

    ``tensors`` maps each tensor name of the expanded model to the :class:`TensorInfo` of its source bytes
    (renamed; file and offsets are the source's), so everything downstream reads it like any checkpoint.

    Attributes:
        layer_replication (list[list[int]]): the ranges, as the adapter config states them.
        layer_map (list[int]): source layer of each new layer, e.g. ``[0, 1, 1]``.
        layer_prefix (str): the layer stack's name prefix, e.g. ``model.layers``.
        base_layers (int): the base's layer count.
    """

    layer_replication: list = field(default_factory=list)
    layer_map: list = field(default_factory=list)
    layer_prefix: str = ""
    base_layers: int = 0


def replication_ranges(folders: list[Adapter]) -> list[list[int]] | None:
    """The ``layer_replication`` of the adapters being unloaded, as ``[[start, end], …]`` (None when none has one).

    An adapter with layer_replication was trained on a different layer stack than any other adapter, so it is
    unloaded alone.
    """
    with_ranges = [f for f in folders if _ranges(f)]
    if not with_ranges:
        return None
    if len(folders) > 1:
        named = ", ".join(f"{f.source} ({_ranges(f)})" if _ranges(f) else f"{f.source} (none)" for f in folders)
        raise AdaptoolError(f"adapters disagree on layer_replication: {named}; an adapter with layer_replication "
                            "changes the layer stack the others were trained on",
                            "unload it alone, then apply the other adapters to that output")
    return _ranges(with_ranges[0])


def _ranges(adapter: Adapter) -> list[list[int]] | None:
    """The adapter's ``layer_replication`` as the config writes it (lists), None when it has none."""
    ranges = adapter.settings.layer_replication
    return [list(r) for r in ranges] if ranges else None


def layer_map(ranges, n_layers: int, source: str) -> list[int]:
    """Source layer of each layer of the expanded stack (PEFT's order: ranges in turn, each ascending)."""
    new = []
    try:
        pairs = [(r[0], r[1]) for r in ranges if len(r) == 2]
        ok = len(pairs) == len(ranges) and all(isinstance(v, int) and not isinstance(v, bool) for p in pairs for v in p)
    except TypeError:
        ok = False
    if not ok:
        raise AdaptoolError(f"{source}: layer_replication {ranges!r} is not a list of [start, end] integer pairs",
                            "fix layer_replication in adapter_config.json")
    for start, end in pairs:
        if not 0 <= start <= end <= n_layers:
            raise AdaptoolError(f"{source}: layer_replication range [{start}, {end}) is outside the base's "
                                f"{n_layers} layers", "check that the adapter was trained on this base model")
        new.extend(range(start, end))
    if not new:
        raise AdaptoolError(f"{source}: layer_replication {ranges!r} selects no layer", "fix layer_replication")
    return new


def find_layer_stack(base: Checkpoint) -> tuple[str, int]:
    """(prefix, layer count) of the base's decoder layer stack, read from its tensor names."""
    stacks: dict[str, set[int]] = {}
    for name in base.tensors:
        m = LAYER_NAME.match(name)
        if m:
            stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    if len(stacks) == 1:
        prefix = next(iter(stacks))
    else:
        prefix = next((p for p in PREFERRED_PREFIXES if p in stacks), None)
        if prefix is None:
            found = ", ".join(sorted(stacks)) or "none"
            raise AdaptoolError(f"layer_replication: cannot tell which layer stack of {base.root} to replicate "
                                f"(found: {found})", "layer_replication works on Llama-, BERT- and Falcon-like models")
    indices = stacks[prefix]
    n = len(indices)
    if indices != set(range(n)):
        raise AdaptoolError(f"layer_replication: the layers {prefix}.N of {base.root} are not numbered 0..{n - 1}",
                            "repair the base checkpoint")
    for key in LAYER_COUNT_KEYS:
        if isinstance(base.config.get(key), int) and base.config[key] != n:
            raise AdaptoolError(f"layer_replication: config.json of {base.root} says {key}={base.config[key]} but "
                                f"the weights hold {n} layers under {prefix}", "repair the base checkpoint")
    return prefix, n


def replicate(base: Checkpoint, ranges, source: str) -> ReplicatedCheckpoint:
    """The expanded model as a checkpoint view: layer ``j`` is a renamed copy of layer ``layer_map[j]``.

    Tensor order: the base's, with the whole expanded stack where the base's first layer tensor was.
    """
    prefix, n = find_layer_stack(base)
    mapping = layer_map(ranges, n, source)
    per_layer: dict[int, list] = {i: [] for i in range(n)}
    for name, info in base.tensors.items():
        m = LAYER_NAME.match(name)
        if m and m.group(1) == prefix:
            per_layer[int(m.group(2))].append((m.group(3), info))
    tensors, placed = {}, False
    for name, info in base.tensors.items():
        m = LAYER_NAME.match(name)
        if not (m and m.group(1) == prefix):
            tensors[name] = info
        elif not placed:
            placed = True
            for j, src in enumerate(mapping):
                for rest, src_info in per_layer[src]:
                    new_name = f"{prefix}.{j}.{rest}"
                    tensors[new_name] = dataclasses.replace(src_info, name=new_name)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Checkpoint)}
    fields["tensors"] = tensors
    return ReplicatedCheckpoint(**fields, layer_replication=[list(r) for r in ranges], layer_map=mapping,
                                layer_prefix=prefix, base_layers=n)


def update_config(path: Path, view: ReplicatedCheckpoint) -> None:
    """Write the expanded layer count (and per-layer ``layer_types``) into an output ``config.json``."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    for cfg in (data, data.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in LAYER_COUNT_KEYS:
            if cfg.get(key) == view.base_layers:
                cfg[key] = len(view.layer_map)
        types = cfg.get("layer_types")
        if isinstance(types, list) and len(types) == view.base_layers:
            cfg["layer_types"] = [types[i] for i in view.layer_map]
    path.write_text(json.dumps(data, indent=2) + "\n")
