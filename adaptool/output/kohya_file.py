"""The kohya/LyCORIS single-file sink: one ``.safetensors`` at the target path, written atomically.

A kohya file names each module ``<prefix><module path with '.' as '_'>`` and gives it an ``.alpha`` scalar, its
scale being ``alpha / r``; the ``ss_`` metadata keys are the ones kohya's sd-scripts write and its tools read
(``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args``).

The engine writes the file into a temporary folder beside the target (:class:`~adaptool.output.target.AtomicFile`);
its header then gets the file's own digests (:func:`adaptool.output.manifest.seal_file`: a single file has no folder
for a manifest), and it is renamed onto the target only once complete, so an interrupted run leaves nothing at the
target path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from adaptool.engine import EngineStats, run
from adaptool.errors import AdaptoolError
from adaptool.io.kohya import PREFIXES
from adaptool.output.manifest import seal_file
from adaptool.output.target import AtomicFile

#: the file's name inside the temporary folder, before it is renamed onto the target
KOHYA_WEIGHTS = "adapter.safetensors"
#: the prefix written when the adapter does not say which one it came with
DEFAULT_PREFIX = "lora_"
#: ``ss_network_module`` / the LyCORIS ``algo`` of each family, as kohya's sd-scripts and LyCORIS record them
NETWORK = {"LORA": ("networks.lora", None), "LOHA": ("lycoris.kohya", "loha"), "LOKR": ("lycoris.kohya", "lokr")}


def check_prefix(prefix: str) -> str:
    """``prefix`` when adaptool reads it back (:data:`adaptool.io.kohya.PREFIXES`), else a one-line refusal."""
    if prefix not in PREFIXES:
        raise AdaptoolError(f"unknown kohya prefix {prefix!r}", "use one of " + ", ".join(PREFIXES))
    return prefix


def kohya_names(paths: list[str], prefix: str, recorded: dict[str, str] | None = None) -> dict[str, str]:
    """``{module path: kohya module name}``: the name a kohya→PEFT conversion recorded for the path, else
    ``prefix`` + the path with ``.`` as ``_``.

    Raises:
        AdaptoolError: two modules whose flattened names collide (kohya's naming cannot tell them apart).
    """
    names, seen = {}, {}
    for path in paths:
        name = (recorded or {}).get(path) or prefix + path.replace(".", "_")
        if name in seen:
            raise AdaptoolError(f"modules {seen[name]} and {path} both flatten to the kohya name {name}",
                                "kohya names cannot tell them apart; keep one of them (adaptool edit --drop)")
        seen[name], names[path] = path, name
    return names


def network_metadata(peft_type: str, dims: list[int], alphas: list[float]) -> dict[str, str]:
    """The ``ss_`` keys kohya tools read: the network module (and LyCORIS algo), the dim and alpha (one number
    when every module shares it, else ``Dynamic``, as kohya's ``resize_lora`` writes)."""
    module, algo = NETWORK[peft_type]
    meta = {"ss_network_module": module,
            "ss_network_dim": str(dims[0]) if len(set(dims)) == 1 else "Dynamic",
            "ss_network_alpha": _number(alphas[0]) if len(set(alphas)) == 1 else "Dynamic"}
    if algo:
        meta["ss_network_args"] = json.dumps({"algo": algo}, separators=(",", ":"))
    return meta


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass
class KohyaFile:
    """Sink of a kohya/LyCORIS file: the engine wrote every tensor; nothing else goes beside it.

    Attributes:
        modules (int): how many modules the file holds (for the summary).
    """

    modules: int = 0

    def finish(self, folder: Path, plan, stats) -> None:
        """Nothing to add: a kohya file carries its metadata in its own header."""

    def summary(self, stats) -> dict:
        return {"tensors_written": len(stats.written), "bytes_written": stats.bytes_written,
                "peak_rss_bytes": stats.peak_rss_bytes}


def execute_file(plan, target: Path, force: bool, device, on_start: Callable[[int, int], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> EngineStats:
    """Run ``plan`` (one planned file, named :data:`KOHYA_WEIGHTS`) into the file ``target``, all or nothing: the
    engine writes it into a temporary folder beside the target, then it is renamed onto the target."""
    if len(plan.files) != 1 or plan.files[0].name != KOHYA_WEIGHTS:
        raise AdaptoolError("a kohya plan must hold exactly one file", "this is a bug; please report it")
    if on_start:
        on_start(plan.items, plan.nbytes_estimate)
    with AtomicFile(target, force, plan.inputs, inner=KOHYA_WEIGHTS) as tmp:
        stats = run(plan, tmp, device, on_progress)
        seal_file(tmp / KOHYA_WEIGHTS)  # the file's own digests: `adaptool verify FILE` checks them
        plan.sink.finish(tmp, plan, stats)
    return stats
