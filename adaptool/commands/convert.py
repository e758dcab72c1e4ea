"""``convert``: PEFT ⇄ kohya/LyCORIS single files, and PiSSA/OLoRA residual adapters into plain LoRAs.

Both formats store the same factors for LoRA (``lora_A``/``lora_B`` = ``lora_down``/``lora_up``), LoHa
(``hada_*``) and LoKr (``lokr_*``), Linear and Conv, so a conversion only renames: every factor keeps its dtype
and its bits. What differs is how the scale is stated:

* PEFT: ``alpha / r`` per module (``rank_pattern``/``alpha_pattern``, first match), ``alpha / sqrt(r)`` with
  rsLoRA. kohya/LyCORIS: ``alpha / r`` with the ``.alpha`` scalar of the module and r read from the factors;
  a LoKr module with both factors whole always has scale 1.
* PEFT → kohya writes for each module the float32 ``alpha`` whose ``alpha / r`` rounds to the same float32 as
  PEFT's scale (PEFT multiplies the float32 product by the scale rounded to float32), so rsLoRA and patterns
  are folded into the alpha and ΔW is bit-identical. A LoKr module with both factors whole and a PEFT scale
  other than 1 gets its scale folded into ``lokr_w1`` when the scale is a power of two (exact), and is refused
  otherwise.
* kohya → PEFT (needs the base, to name the modules: :func:`adaptool.io.kohya.open_kohya`) states every
  module's r and alpha through ``rank_pattern``/``alpha_pattern``. For LoHa and LoKr the config also has to
  make PEFT build the same tensors: ``use_effective_conv2d`` (CP cores), and for LoKr ``decompose_both``,
  ``decompose_factor`` and an r that gives PEFT's whole-or-factored choice; a file no single PEFT config can
  describe is refused. The kohya names (and alpha dtypes) are recorded in the output's metadata, so converting
  back gives the same keys and tensors.

``--initial`` turns an adapter trained on a residual base (PiSSA, OLoRA, CorDA, LoRA-GA) into a LoRA for the
original base, as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=…)`` does:
``ΔW = s·(B_t·A_t − B_0·A_0)`` is the rank-2r LoRA ``A' = [A_t; A_0]``, ``B' = [B_t, −B_0]``, with ``r``,
``lora_alpha`` (×√2 with rsLoRA) and both patterns doubled and ``init_lora_weights: true``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from adaptool.adapters import edits_for
from adaptool.adapters.common import lycoris_scaling, module_keys
from adaptool.adapters.loha import FACTORS as LOHA_FACTORS, OWN as LOHA_OWN, T1 as HADA_T1, T2 as HADA_T2
from adaptool.adapters.loha import W1A as HADA_W1A
from adaptool.adapters.lokr import OWN as LOKR_OWN, T2, W1, W1A, W1B, W2, W2A, W2B
from adaptool.adapters.lora import lora_modules
from adaptool.adapters.notes import collected_notes
from adaptool.adapters.saved import is_own
from adaptool.engine import execute
from adaptool.errors import AdaptoolError
from adaptool.io.hub import ADAPTER_PATTERNS, resolve
from adaptool.io.inputs import input_paths, open_adapter, open_base
from adaptool.io.kohya import KohyaAdapter, kohya_file
from adaptool.io.safetensors_file import read_header, torch_dtype
from adaptool.output.adapter_folder import ADAPTER_WEIGHTS, PEFT_PREFIX, PeftAdapterFolder
from adaptool.output.kohya_file import (DEFAULT_PREFIX, KOHYA_WEIGHTS, KohyaFile, check_prefix, execute_file,
                                        kohya_names, network_metadata)
from adaptool.output.provenance import adapter_name, base_name, metadata, model_card, portable_spec
from adaptool.output.target import preflight, preflight_file
from adaptool.plan import Computed, Plan, PlannedFile, TensorResolver

TARGETS = ("peft", "kohya")
KOHYA_TYPES = ("LORA", "LOHA", "LOKR")
#: safetensors metadata key of a kohya → PEFT output: ``{path: [kohya name, alpha dtype, alpha, alpha shape]}``
KOHYA_RECORD = "adaptool.kohya_modules"
LORA_SUFFIXES = {"linear": (".lora_A.weight", ".lora_B.weight"), "conv": (".lora_A.weight", ".lora_B.weight"),
                 "embedding": (".lora_embedding_A", ".lora_embedding_B")}
OWN = {"LOHA": LOHA_OWN, "LOKR": LOKR_OWN}


@dataclass
class Module:
    """One adapted module on its way through convert.

    Attributes:
        path (str): the base model's module path.
        kind (str): a LoRA module's linear, conv or embedding; "factors" for LoHa and LoKr.
        tensors (dict[str, Callable]): PEFT suffix (``.lora_A.weight``, ``.hada_w1_a`` …) -> ``() -> tensor`` as
            stored (dtype and shape kept).
        shapes (dict[str, tuple]): PEFT suffix -> stored shape.
        rank, alpha (int, float): r and alpha as a PEFT config states them for this module.
        scale (float): what the module's product is multiplied by (``alpha / r``, ``alpha / sqrt(r)`` rsLoRA).
        kohya_rank (int | None): r as kohya/LyCORIS read it from the factors; None for a LoKr module with both
            factors whole (scale 1 in LyCORIS).
    """

    path: str
    kind: str
    tensors: dict
    shapes: dict
    rank: int
    alpha: float
    scale: float
    kohya_rank: int | None


@dataclass
class Inputs:
    """What a conversion reads: the adapter, the optional base and initial adapter, their modules."""

    adapter: object
    peft_type: str
    modules: list[Module]
    base: object = None
    initial: object = None
    paths: list = field(default_factory=list)


def convert(
    input: str,
    output: str | Path,
    to: str,
    *,
    base: str | None = None,
    initial: str | None = None,
    prefix: str | None = None,
    force: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Convert ``input`` to a PEFT adapter folder (``to="peft"``) or one kohya/LyCORIS ``.safetensors`` file
    (``to="kohya"``) at ``output``.

    Args:
        input (str): a PEFT adapter folder, a kohya/LyCORIS ``.safetensors`` file, or a hub id.
        output (str | Path): the output folder (peft) or file (kohya), written atomically.
        to (str): ``peft`` or ``kohya``.
        base (str | None): the base model; needed to read a kohya/LyCORIS file (its names are flattened).
        initial (str | None): the adapter as saved at initialisation (PiSSA, OLoRA …): the output is then the
            plain LoRA that applies to the original base.
        prefix (str | None): the kohya name prefix (``lora_``, ``lora_unet_``, ``lycoris_`` …). Default: the one a
            kohya → PEFT conversion recorded, else ``lora_``.
        force (bool): replace an existing output.
        on_start, on_progress: progress callbacks (units: bytes).

    Returns:
        dict: a summary: type, modules, ranks, tensors and bytes written, seconds, notes.

    Raises:
        AdaptoolError: a bad ``to``, an input the target format cannot carry exactly, an initial adapter that does
            not match, and every input error (one line each).
    """
    start = time.perf_counter()
    to = _check_to(to)
    target = Path(output)
    if to == "kohya" and target.suffix != ".safetensors":
        raise AdaptoolError(f"--to kohya writes one .safetensors file, and {str(output)!r} does not end in .safetensors",
                            "give a file path with -o, e.g. -o out/my_lora.safetensors")
    check = preflight_file if to == "kohya" else preflight
    check(target, force, [s for s in (input, base, initial) if s and Path(s).expanduser().exists()])
    with collected_notes() as notes:
        inputs = open_inputs(input, to, base, initial)
        check(target, force, inputs.paths)
        plan, report = (plan_kohya if to == "kohya" else plan_peft)(inputs, target, input, base, initial, prefix)
    # conversion only renames and concatenates: the CPU does it, bit for bit
    stats = (execute_file if to == "kohya" else execute)(plan, target, force, torch.device("cpu"), on_start, on_progress)
    ranks = [m.rank for m in inputs.modules]
    return {**plan.sink.summary(stats), "output": str(output), "command": "convert", "input": input, "to": to,
            "base": base, "initial": initial, "peft_type": inputs.peft_type, "modules": len(inputs.modules),
            "ranks": [min(ranks), max(ranks)], "notes": list(notes) + report, "seconds": time.perf_counter() - start}


def _check_to(to) -> str:
    if to not in TARGETS:
        import difflib

        close = difflib.get_close_matches(str(to), TARGETS, n=1)
        raise AdaptoolError(f"unknown format --to {to!r}" + (f" (did you mean {close[0]}?)" if close else ""),
                            "use --to peft or --to kohya")
    return to


# ---------------------------------------------------------------------------------------------------- inputs


def open_inputs(spec: str, to: str, base: str | None, initial: str | None) -> Inputs:
    """Open and check what the conversion reads: the base (when given), the adapter, the initial adapter."""
    if base is None and kohya_file(resolve(spec, "adapter", ADAPTER_PATTERNS)) is not None:
        raise AdaptoolError(f"{spec} is a kohya/LyCORIS file, which names its modules only by flattened paths",
                            "give the base model it was trained on with --base")
    checkpoint = open_base(base) if base is not None else None
    adapter = open_adapter(spec, checkpoint)
    is_kohya = isinstance(adapter, KohyaAdapter)
    if initial is None and is_kohya == (to == "kohya"):
        raise AdaptoolError(f"{spec} is already a {'kohya/LyCORIS file' if is_kohya else 'PEFT adapter'}",
                            f"nothing to convert; use --to {'peft' if is_kohya else 'kohya'}, or --initial to turn "
                            "a PiSSA/OLoRA adapter into a plain LoRA")
    if adapter.peft_type not in KOHYA_TYPES:
        raise AdaptoolError(f"{spec}: cannot convert {adapter.peft_type} adapters: kohya/LyCORIS files carry LoRA, "
                            "LoHa and LoKr only", "fold it into the base with adaptool unload instead")
    adapter.check_finite()
    if checkpoint is not None:
        edits_for(adapter, checkpoint)  # every module checked against the base
    modules = read_modules(adapter)
    if not modules:
        raise AdaptoolError(f"{spec}: the adapter has no module to convert", "the adapter is incomplete; re-save it")
    opened = Inputs(adapter, adapter.peft_type, modules, checkpoint)
    if initial is not None:
        opened.initial = open_adapter(initial, checkpoint)
        opened.initial.check_finite()
        opened.modules = residual_modules(adapter, opened.initial, modules)
    opened.paths = input_paths(checkpoint, [a for a in (adapter, opened.initial) if a is not None])
    return opened


def read_modules(adapter) -> list[Module]:
    """Every module of a LoRA, LoHa or LoKr adapter (PEFT folder or kohya file), in the file's order."""
    if adapter.peft_type == "LORA":
        out = []
        for m in lora_modules(adapter):
            a, b = LORA_SUFFIXES[m.kind]
            tensors = {a: _loader(adapter, m.a_key), b: _loader(adapter, m.b_key)}
            shapes = {a: tuple(adapter.shape(m.a_key)), b: tuple(adapter.shape(m.b_key))}
            if m.bias_key:
                tensors[".lora_B.bias"], shapes[".lora_B.bias"] = _loader(adapter, m.bias_key), adapter.shape(m.bias_key)
            if m.magnitude_key:
                suffix = m.magnitude_key[len(m.path):]
                tensors[suffix], shapes[suffix] = _loader(adapter, m.magnitude_key), adapter.shape(m.magnitude_key)
            out.append(Module(m.path, m.kind, tensors, shapes, m.rank, adapter.settings.alpha_for(m.path), m.scaling,
                              m.rank))
        return out
    out = []
    for path, keys in module_keys(adapter, OWN[adapter.peft_type]).items():
        r, scale = lycoris_scaling(adapter, path)
        shapes = {s: tuple(adapter.shape(k)) for s, k in keys.items()}
        module = Module(path, "factors", {s: _loader(adapter, k) for s, k in keys.items()}, shapes, r,
                        adapter.settings.alpha_for(path), scale, None)
        module.kohya_rank = _lycoris_rank(adapter, module)
        out.append(module)
    return out


def _loader(adapter, name: str):
    return lambda: adapter.load(name)


def _lycoris_rank(adapter, m: Module) -> int | None:
    """r as kohya/LyCORIS read a LoHa/LoKr module (LoKr: None when both factors are whole), checked against the
    rank the config states (PEFT could not load the adapter otherwise)."""
    shapes = m.shapes
    if adapter.peft_type == "LOHA":
        if HADA_W1A not in shapes or len(shapes[HADA_W1A]) != 2:
            raise AdaptoolError(f"{adapter.source}: {m.path} has no 2-D {m.path}{HADA_W1A}",
                                "the adapter file is incomplete; re-save it")
        ranks = [shapes[HADA_W1A][0] if HADA_T1 in shapes else shapes[HADA_W1A][1]]
        needed = [*LOHA_FACTORS, *((HADA_T1, HADA_T2) if HADA_T1 in shapes or HADA_T2 in shapes else ())]
    else:
        ranks = [shapes[s][axis] for s, axis in ((W1A, -1), (T2, 0), (W2A, -1)) if s in shapes
                 and not (s == W2A and T2 in shapes)]
        needed = [W1 if W1 in shapes else W1A, W2 if W2 in shapes else W2A]
        needed += [W1B] * (W1A in shapes) + [W2B] * (W2A in shapes) + [W2A] * (T2 in shapes)
    missing = [s for s in needed if s not in shapes]
    if missing:
        raise AdaptoolError(f"{adapter.source}: {m.path} has no {m.path}{missing[0]}",
                            "the adapter file is incomplete; re-save it")
    for r in ranks:
        if r != m.rank:
            raise AdaptoolError(f"{adapter.source}: {m.path} has rank {r} on disk but its config says r={m.rank}",
                                "fix r/rank_pattern in adapter_config.json")
    return ranks[0] if ranks else None


# ---------------------------------------------------------------------------------------------- residuals


def residual_modules(adapter, initial, trained: list[Module]) -> list[Module]:
    """The plain LoRA modules of a residual adapter: ``A' = [A_t; A_0]``, ``B' = [B_t, −B_0]``, rank 2r, the same
    scale (PEFT doubles alpha with r; rsLoRA: alpha × √2).

    Raises:
        AdaptoolError: not a LoRA; DoRA or lora_bias; an initial adapter of other modules, shapes, dtypes or
            scales; an initial adapter whose ``lora_B`` are all zero (a plain LoRA init, not a residual one).
    """
    settings = adapter.settings
    if adapter.peft_type != "LORA" or initial.peft_type != "LORA":
        raise AdaptoolError(f"--initial converts residual LoRA adapters (PiSSA, OLoRA …), not "
                            f"{adapter.peft_type if adapter.peft_type != 'LORA' else initial.peft_type}",
                            "give the LoRA adapter and its initial state")
    if settings.use_rslora and (settings.rank_pattern or settings.alpha_pattern):
        raise AdaptoolError(f"{adapter.source}: --initial with use_rslora and rank/alpha patterns is not defined "
                            "(PEFT refuses it too)", "retrain without rank_pattern/alpha_pattern, or without rsLoRA")
    start = {m.path: m for m in read_modules(initial)}
    for m in trained:
        for suffix in (".lora_B.bias", ".lora_magnitude_vector", ".lora_magnitude_vector.weight"):
            if suffix in m.tensors:
                what = "lora_bias" if suffix == ".lora_B.bias" else "DoRA"
                raise AdaptoolError(f"{adapter.source}: --initial cannot convert a {what} adapter ({m.path})",
                                    "PiSSA/OLoRA conversion is defined for plain LoRA factors")
    _check_initial(adapter, initial, trained, start)
    out = []
    for m in trained:
        m0 = start[m.path]
        a, b = LORA_SUFFIXES[m.kind]
        r, alpha = 2 * m.rank, _doubled_alpha(m.alpha, settings.use_rslora)
        scale = alpha / math.sqrt(r) if settings.use_rslora else alpha / r
        tensors = {a: _cat(m.tensors[a], m0.tensors[a], 0, False), b: _cat(m.tensors[b], m0.tensors[b], 1, True)}
        shapes = {a: _cat_shape(m.shapes[a], 0, 2), b: _cat_shape(m.shapes[b], 1, 2)}
        out.append(Module(m.path, m.kind, tensors, shapes, r, alpha, scale, r))
    return out


def _check_initial(adapter, initial, trained: list[Module], start: dict[str, Module]) -> None:
    """The initial adapter must have the trained one's modules, shapes, dtypes and scales, and some B_0 ≠ 0."""
    paths = [m.path for m in trained]
    if set(paths) != set(start):
        odd = sorted(set(paths) ^ set(start))[0]
        where = initial.source if odd in start else adapter.source
        raise AdaptoolError(f"{initial.source} does not match {adapter.source}: module {odd} is only in {where}",
                            "give the initial state saved for this adapter (same target modules)")
    residual = False
    for m in trained:
        m0 = start[m.path]
        for suffix in LORA_SUFFIXES[m.kind]:
            t, t0 = m.tensors[suffix](), m0.tensors.get(suffix, lambda: None)()
            if t0 is None or t0.shape != t.shape or t0.dtype != t.dtype:
                got = "missing" if t0 is None else f"{tuple(t0.shape)} {t0.dtype}"
                raise AdaptoolError(f"{initial.source} does not match {adapter.source}: {m.path}{suffix} is "
                                    f"{tuple(t.shape)} {t.dtype} in the adapter, {got} in the initial one",
                                    "give the initial state saved for this adapter")
            if suffix.endswith("B.weight") or suffix.endswith("_B"):
                residual = residual or bool(t0.any())
        if m0.scale != m.scale:
            raise AdaptoolError(f"{initial.source} does not match {adapter.source}: {m.path} has scale {m0.scale} "
                                f"in the initial adapter and {m.scale} in the trained one",
                                "give the initial state saved for this adapter (same r and alpha)")
    if not residual:
        raise AdaptoolError(f"{initial.source}: every lora_B is zero, so the initial adapter is a plain LoRA init, "
                            "not a residual (PiSSA/OLoRA) one", "nothing to subtract; convert the adapter without --initial")


def _doubled_alpha(alpha, rslora: bool):
    """PEFT's ``lora_alpha *= 2`` (rsLoRA: ``*= 2**0.5``), keeping an int an int."""
    return alpha * 2 ** 0.5 if rslora else alpha * 2


def _cat(trained, initial, dim: int, negate: bool):
    return lambda: torch.cat([trained(), -initial() if negate else initial()], dim=dim)


def _cat_shape(shape, dim: int, times: int) -> tuple:
    return tuple(d * times if i == dim else d for i, d in enumerate(shape))


# -------------------------------------------------------------------------------------------- PEFT output


def plan_peft(inputs: Inputs, target: Path, source: str, base: str | None, initial: str | None,
              prefix: str | None) -> tuple[Plan, list[str]]:
    """A PEFT adapter folder holding every module's factors (bit for bit) and a config that makes PEFT build and
    scale them as the input does."""
    if prefix is not None:
        raise AdaptoolError("--prefix names kohya modules; it has no meaning with --to peft", "leave --prefix out")
    adapter = inputs.adapter
    modules = inputs.modules
    if initial is not None and not isinstance(adapter, KohyaAdapter):
        config = residual_config(adapter)
    else:
        config = kohya_peft_config(inputs, base)
    computed = [Computed(m.path, _peft_producer(m), nbytes_estimate=_nbytes(m)) for m in modules]
    carried = _carried(adapter)
    if carried:
        computed.append(Computed("carried tensors", lambda device: ({PEFT_PREFIX + n: adapter.load(n) for n in carried},
                                                                    None)))
    adapters = [a for a in (adapter, inputs.initial) if a is not None]
    extra = {"to": "peft"}
    if isinstance(adapter, KohyaAdapter):
        extra[KOHYA_RECORD[len("adaptool."):]] = json.dumps(_kohya_record(adapter), separators=(",", ":"),
                                                            sort_keys=True)
    meta = metadata("convert", inputs.base, adapters, extra)
    card = model_card(f"{adapter_name(adapter)} (PEFT)", _command(inputs, "peft"), adapters, base=inputs.base,
                      base_model=config.get("base_model_name_or_path"))
    sink = PeftAdapterFolder(config=lambda ranks, lora_bias: config, card=lambda cfg: card)
    return Plan([PlannedFile(ADAPTER_WEIGHTS, meta, computed=computed)], sink, inputs.paths), []


def _command(inputs: Inputs, to: str) -> str:
    """The command line, inputs by portable name."""
    line = f"adaptool convert {adapter_name(inputs.adapter)} --to {to}"
    if inputs.base is not None:
        line += f" --base {base_name(inputs.base)}"
    return line + (f" --initial {adapter_name(inputs.initial)}" if inputs.initial is not None else "")


def _peft_producer(m: Module):
    key = PEFT_PREFIX + m.path
    return lambda device: ({key + s: load() for s, load in m.tensors.items()}, None)


def _nbytes(m: Module) -> int:
    return sum(math.prod(s) * 4 for s in m.shapes.values())


def _carried(adapter) -> list[str]:
    """Tensors that are no family factor (``modules_to_save`` copies, trainable tokens), carried as saved."""
    own = OWN.get(adapter.peft_type, ())
    return [n for n in adapter.names if not is_own(n, own)]


def residual_config(adapter) -> dict:
    """The trained adapter's ``adapter_config.json`` changed as PEFT's conversion changes it: ``r`` and
    ``lora_alpha`` doubled (rsLoRA: alpha × √2), both patterns' values doubled, ``init_lora_weights: true``."""
    config = json.loads(json.dumps(adapter.config))
    rslora = adapter.settings.use_rslora
    config["init_lora_weights"] = True
    config["r"] = 2 * adapter.settings.r
    config["lora_alpha"] = _doubled_alpha(adapter.settings.lora_alpha, rslora)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {k: 2 * v for k, v in config[key].items()}
    config["inference_mode"] = True
    return config


def kohya_peft_config(inputs: Inputs, base: str | None) -> dict:
    """The ``adapter_config.json`` of a kohya file's modules: the most common r and alpha as defaults, every other
    module's in ``rank_pattern``/``alpha_pattern`` (keyed by its full path); for LoHa/LoKr the switches that make
    PEFT build the same tensors (:func:`lycoris_layout`)."""
    adapter, peft_type = inputs.adapter, inputs.peft_type
    modules = inputs.modules
    extra = lycoris_layout(inputs) if peft_type in ("LOHA", "LOKR") else {}
    modules = inputs.modules = [replace(m, **extra.pop(m.path, {})) for m in modules] if extra else modules
    switches = extra.pop("", {})
    ranks = {m.path: m.rank for m in modules}
    alphas = {m.path: _plain(m.alpha) for m in modules}
    r, alpha = _most_common(ranks), _most_common(alphas)
    config = {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": portable_spec(base),
              "revision": None, "r": r, "target_modules": sorted(ranks), "inference_mode": True,
              "rank_pattern": {p: v for p, v in sorted(ranks.items()) if v != r},
              "alpha_pattern": {p: v for p, v in sorted(alphas.items()) if v != alpha}, "modules_to_save": None}
    if peft_type == "LORA":
        s = adapter.settings
        config.update({"lora_alpha": alpha, "use_rslora": False, "use_dora": False, "lora_bias": False,
                       "fan_in_fan_out": s.fan_in_fan_out, "lora_dropout": 0.0, "bias": "none",
                       "init_lora_weights": True})
    else:
        config.update({"alpha": alpha, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, **switches})
    return config


def _plain(x):
    """An alpha as JSON shows it best: an int when it is a whole number."""
    return int(x) if float(x).is_integer() and abs(x) < 2 ** 53 else float(x)


def _most_common(values: dict):
    """The value most modules share (ties: the first module's), so the patterns stay short."""
    counts = Counter(values.values())
    best = max(counts.values())
    return next(v for v in values.values() if counts[v] == best)


def _kohya_record(adapter: KohyaAdapter) -> dict:
    """``{path: [kohya name, alpha dtype, alpha value, alpha shape]}`` (None where the file had no alpha)."""
    record = {}
    for kname, path in adapter.modules.items():
        info = adapter.alphas.get(path)
        if info is None:
            record[path] = [kname, None, None, None]
        else:
            value = float(adapter.buffer.view(info).reshape(-1)[0].item())
            record[path] = [kname, info.dtype, value, list(info.shape)]
    return record


# ---------------------------------------------------------------------- LoHa / LoKr layouts PEFT can build


def lycoris_layout(inputs: Inputs) -> dict:
    """``{path: {"rank": r, "alpha": a}}`` where PEFT needs another r than the file's (LoKr with both factors
    whole: an r large enough that PEFT keeps both whole, alpha = r for scale 1), and under ``""`` the config
    switches (``use_effective_conv2d``; LoKr: ``decompose_both``, ``decompose_factor``) that make PEFT build
    exactly the file's tensors.

    Raises:
        AdaptoolError: the file's modules need settings no single PEFT config has (one line naming a module).
    """
    resolve = TensorResolver(inputs.base, inputs.adapter)
    weights = {m.path: tuple(inputs.base.tensors[resolve.tensor(m.path, "weight")].shape) for m in inputs.modules}
    source = inputs.adapter.source
    if inputs.peft_type == "LOHA":
        return _loha_layout(source, inputs.modules, weights)
    return _lokr_layout(source, inputs.modules, weights)


def _kernel_counts(w_shape) -> bool:
    """PEFT uses CP cores only on a conv whose kernel is not 1 (1x1 Conv2d, k=1 Conv1d are flattened)."""
    return len(w_shape) > 2 and any(d != 1 for d in w_shape[2:])


def _loha_layout(source, modules, weights) -> dict:
    cp = any(HADA_T1 in m.shapes for m in modules)
    for m in modules:
        if (HADA_T1 in m.shapes) != (cp and _kernel_counts(weights[m.path])):
            why = "has CP cores (hada_t1)" if HADA_T1 in m.shapes else "has no CP cores"
            raise AdaptoolError(f"{source}: LoHa module {m.path} {why} unlike the file's other conv modules, which "
                                "one PEFT LoHaConfig (use_effective_conv2d) cannot state", "convert it to PEFT by hand")
    return {"": {"use_effective_conv2d": cp}}


def _lokr_layout(source, modules, weights) -> dict:
    decompose_both = any(W1A in m.shapes for m in modules)
    effective = any(T2 in m.shapes for m in modules)
    ranks = {m.path: m.kohya_rank or _whole_rank(m) for m in modules}
    closest = None  # (modules PEFT would build otherwise, the first of them, what PEFT would build)
    for factor in _factor_candidates(modules):
        built = {m.path: peft_lokr_shapes(weights[m.path], ranks[m.path], decompose_both, factor, effective)
                 for m in modules}
        bad = [m for m in modules if built[m.path] != m.shapes]
        if not bad:
            extra = {m.path: {"rank": ranks[m.path], "alpha": ranks[m.path]} for m in modules if m.kohya_rank is None}
            extra[""] = {"use_effective_conv2d": effective, "decompose_both": decompose_both,
                         "decompose_factor": factor, "rank_dropout_scale": False}
            return extra
        if closest is None or len(bad) < closest[0]:
            closest = (len(bad), bad[0], built[bad[0].path])
    _, m, built = closest
    raise AdaptoolError(f"{source}: LoKr module {m.path} has factors {_show(m.shapes)}, but PEFT's LoKr (one "
                        f"decompose_factor for every module) would build {_show(built)}",
                        "keep it as a kohya/LyCORIS file (adaptool reads it as it is)")


def _show(shapes: dict) -> str:
    return ", ".join(f"{s.lstrip('.')} {tuple(v)}" for s, v in shapes.items())


def _whole_rank(m: Module) -> int:
    """An r for which PEFT keeps both LoKr factors whole (r ≥ half of every factor dimension)."""
    return max(*m.shapes[W1][:2], *m.shapes[W2][:2])


def _factor_candidates(modules) -> list[int]:
    """``decompose_factor`` values to try: -1 (balanced), then every w1 dimension (a factor f gives w1 (f, f))."""
    dims = set()
    for m in modules:
        w1 = m.shapes.get(W1) or (m.shapes[W1A][0], m.shapes[W1B][1])
        dims.update(d for d in w1 if d > 1)
    return [-1, *sorted(dims)]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT 0.21.2's ``factorization`` (``tuners/lokr/layer.py``): ``dimension = m·n`` with m = ``factor`` when it
    divides (kept first even when larger: LyCORIS would swap), else m ≤ n the most balanced pair with m ≤
    ``factor`` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def peft_lokr_shapes(w_shape, r: int, decompose_both: bool, factor: int, effective: bool) -> dict:
    """``{suffix: shape}`` of the tensors PEFT 0.21.2's LoKr builds for a layer whose weight is ``w_shape``
    (``tuners/lokr/layer.py`` ``update_layer``/``create_adapter_parameters``)."""
    out_l, out_k = factorization(w_shape[0], factor)
    in_m, in_n = factorization(w_shape[1], factor)
    kernel = tuple(w_shape[2:])
    use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    shapes = {W1: (out_l, in_m)} if use_w1 else {W1A: (out_l, r), W1B: (r, in_m)}
    if use_w2:
        shapes[W2] = (out_k, in_n, *kernel)
    elif kernel and effective and _kernel_counts(w_shape):
        shapes.update({T2: (r, r, *(kernel if len(kernel) == 2 else (kernel[0], 1))), W2A: (r, out_k), W2B: (r, in_n)})
    else:
        shapes.update({W2A: (out_k, r), W2B: (r, in_n * math.prod(kernel))})
    return shapes


# ------------------------------------------------------------------------------------------- kohya output


def plan_kohya(inputs: Inputs, target: Path, source: str, base: str | None, initial: str | None,
               prefix: str | None) -> tuple[Plan, list[str]]:
    """One kohya/LyCORIS file: every module's factors (bit for bit) under ``<prefix><flattened path>`` names and
    an ``.alpha`` that keeps its scale."""
    adapter = inputs.adapter
    _refuse_for_kohya(adapter, inputs.modules)
    record = {} if prefix is not None else _read_record(adapter)
    names = kohya_names([m.path for m in inputs.modules], check_prefix(prefix or DEFAULT_PREFIX),
                        {p: r[0] for p, r in record.items()})
    notes, computed, dims, alphas = [], [], [], []
    for m in inputs.modules:
        alpha, fold = kohya_alpha(adapter.source, m, record.get(m.path))
        if fold != 1.0:
            notes.append(f"{m.path}: LoKr with both factors whole has scale 1 in LyCORIS; its scale {m.scale} "
                         "(a power of two) was folded into lokr_w1, exactly")
        computed.append(Computed(m.path, _kohya_producer(m, names[m.path], alpha, fold), nbytes_estimate=_nbytes(m)))
        dims.append(m.kohya_rank or 1)
        alphas.append(float(alpha.item()) if alpha is not None else float(m.kohya_rank or 1))
    adapters = [a for a in (adapter, inputs.initial) if a is not None]
    meta = {**metadata("convert", inputs.base, adapters, {"to": "kohya"}),
            **network_metadata(inputs.peft_type, dims, alphas)}
    plan = Plan([PlannedFile(KOHYA_WEIGHTS, meta, computed=computed)], KohyaFile(len(computed)), inputs.paths)
    return plan, notes


def _refuse_for_kohya(adapter, modules: list[Module]) -> None:
    """What a kohya file cannot carry, refused in one line naming it."""
    for m in modules:
        if m.kind == "embedding":
            raise AdaptoolError(f"{adapter.source}: a kohya file cannot carry an embedding LoRA ({m.path})",
                                "drop the module (adaptool edit --drop), or keep the adapter in PEFT format")
        extra = [s for s in m.shapes if "magnitude" in s or s.endswith(".bias")]
        if extra:
            what = "DoRA magnitude vectors" if "magnitude" in extra[0] else "lora_bias"
            raise AdaptoolError(f"{adapter.source}: a kohya file cannot carry {what} exactly ({m.path}{extra[0]})",
                                "fold the adapter into the base with adaptool unload, or keep it in PEFT format")
    carried = _carried(adapter)
    if carried:
        what = "trainable tokens" if "trainable_tokens" in carried[0] else "modules_to_save / saved base tensors"
        raise AdaptoolError(f"{adapter.source}: a kohya file cannot carry {what} ({carried[0]})",
                            "drop them (adaptool edit), or keep the adapter in PEFT format")


def _read_record(adapter) -> dict:
    """The kohya names and alphas a kohya → PEFT conversion recorded in the PEFT folder's metadata ({} if none)."""
    weights = getattr(adapter, "weights", None)
    if isinstance(adapter, KohyaAdapter) or weights is None or Path(weights).suffix != ".safetensors":
        return {}
    raw = read_header(Path(weights))[1].get(KOHYA_RECORD)
    try:
        record = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    good = isinstance(record, dict) and all(isinstance(v, list) and len(v) == 4 and isinstance(v[0], str)
                                            and "." not in v[0] for v in record.values())
    return record if good else {}


def kohya_alpha(source: str, m: Module, recorded: list | None) -> tuple[torch.Tensor | None, float]:
    """``(alpha tensor or None, factor folded into lokr_w1)`` for module ``m``: kohya's ``alpha / r`` rounds to
    the float32 PEFT multiplies by. An alpha a kohya → PEFT conversion recorded comes back as it was (its dtype,
    its shape, or no alpha at all) while it still means the module's scale.

    Raises:
        AdaptoolError: a LoKr module with both factors whole whose scale is not a power of two (LyCORIS fixes 1).
    """
    target, r = _f32(m.scale), m.kohya_rank
    dtype, value, shape = (recorded[1], recorded[2], recorded[3]) if recorded else (None, None, None)
    if r is None:  # LoKr, both factors whole: LyCORIS applies scale 1 whatever alpha says
        fold = 1.0 if target == 1.0 else m.scale
        if fold != 1.0 and math.frexp(fold)[0] != 0.5:
            raise AdaptoolError(f"{source}: LoKr module {m.path} has both factors whole, which LyCORIS always applies "
                                f"at scale 1, but its scale is {m.scale}",
                                "save it with alpha = r, or fold it into the base with adaptool unload")
        if recorded:
            return (torch.tensor(value, dtype=torch_dtype(dtype)).reshape(shape) if dtype else None), fold
        return torch.tensor(1.0), fold
    if recorded and _f32((value or r) / r) == target:  # no alpha, or alpha 0, means alpha = r
        return (torch.tensor(value, dtype=torch_dtype(dtype)).reshape(shape) if dtype else None), 1.0
    alpha = _exact_alpha(m.alpha if _f32(m.alpha / r) == target else m.scale * r, r, target)
    out = torch.float32
    if dtype and float(torch.tensor(alpha, dtype=torch_dtype(dtype)).item()) == alpha:
        out = torch_dtype(dtype)
    return torch.tensor(alpha, dtype=out), 1.0


def _exact_alpha(guess: float, r: int, target: float) -> float:
    """The float32 nearest ``guess`` whose ``alpha / r`` (float64, as kohya readers and PEFT compute it) rounds
    to ``target`` in float32 (a few neighbours tried; one always exists since alpha/r is finer than float32)."""
    start = torch.tensor(guess, dtype=torch.float32)
    up, down = start.clone(), start.clone()
    for _ in range(64):
        for cand in (down, up):
            if _f32(float(cand.item()) / r) == target:
                return float(cand.item())
        up = torch.nextafter(up, torch.tensor(math.inf))
        down = torch.nextafter(down, torch.tensor(-math.inf))
    raise AdaptoolError(f"no float32 alpha gives the scale {target} at rank {r}", "this is a bug; please report it")


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32).item())


def _kohya_producer(m: Module, name: str, alpha: torch.Tensor | None, fold: float):
    renames = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}

    def produce(device):
        tensors = {}
        for suffix, load in m.tensors.items():
            t = load()
            if suffix == W1 and fold != 1.0:
                t = _folded(t, fold, m.path)
            tensors[name + renames.get(suffix, suffix)] = t
        if alpha is not None:
            tensors[name + ".alpha"] = alpha
        return tensors, None

    return produce


def _folded(w1: torch.Tensor, factor: float, path: str) -> torch.Tensor:
    """``w1 × factor`` (a power of two), checked exact (no overflow, no precision lost to subnormals)."""
    out = (w1.float() * factor).to(w1.dtype)
    if not torch.equal(out.float() / factor, w1.float()) or not bool(torch.isfinite(out).all()):
        raise AdaptoolError(f"{path}: folding the scale {factor} into lokr_w1 would round its values",
                            "save it with alpha = r, or fold it into the base with adaptool unload")
    return out
