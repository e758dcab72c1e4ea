"""``align``: rewrite a set of LoRA adapters so that transformers' ``load_adapter(…, hotswap=True)`` (and PEFT's
``hotswap_adapter``) swaps between them plainly, without ``enable_peft_hotswap``.

Hotswapping copies the new adapter's tensors into the old one's parameters and keeps everything else: the
modules adapted, each module's rank and its scaling. So every output folder ``DIR/<input name>/`` gets the one
``adapter_config.json`` they all share: the union of the inputs' modules as ``target_modules`` (full module
paths), one rank ``R`` (the largest input rank, or ``--rank``), ``lora_alpha = R`` (scaling 1), no rsLoRA and no
rank/alpha patterns. Each module of each input is rewritten so that it computes exactly what it computed:

* rank ``r ≤ R``: ``A`` padded with ``R - r`` zero rows (its values copied bit for bit), ``B`` with zero
  columns, and the module's scaling ``s`` (``alpha/r``, ``alpha/sqrt(r)`` for rsLoRA, patterns resolved) folded
  into B: ``B' = round(s·B)``, computed in float64 and rounded once to the stored dtype. When every ``s`` is a
  power of two (``alpha = r`` gives 1) the fold is bit-exact, so the aligned ΔW equals the input's exactly;
  otherwise B' carries one rounding of the stored dtype (the summary gives the relative ΔW error it causes,
  computed from the factors' Gram matrices in float64);
* rank ``r > R`` (``--rank`` below an input's rank): the best rank-R factors of ``s·B·A``
  (:func:`adaptool.strategies.best_rank.best_from_factors`, the maths ``resize`` uses), zero-padded if ΔW's
  rank is lower still; the energy kept is reported;
* a module the input does not adapt: explicit zeros (a hotswap keeps the old adapter's values for keys the new
  one lacks).

Only plain LoRA inputs (rsLoRA, rank/alpha patterns, embeddings, convs) are aligned; DoRA, ``lora_bias``, LoRA
variants, ``layer_replication`` and other adapter types are refused in one line. ``modules_to_save``, trainable
tokens and saved biases are carried when every input saves the same ones (same names and shapes, same config
entries), and refused otherwise: a hotswap would keep the old adapter's copies. Saved base-layer copies (PEFT
saves the base embedding with an adapted embedding) go with the inputs that hold them, and must be equal where
several do; transformers' hotswap loads them, PEFT's ``hotswap_adapter`` cannot swap adapters holding any saved
copy (a PEFT limitation). Two inputs whose folder names
coincide (compared case-insensitively) are refused: rename one. The whole ``DIR`` is one atomic output.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adaptool.adapters import family
from adaptool.adapters.lora import LoraModule, lora_modules
from adaptool.adapters.notes import collected_notes
from adaptool.adapters.saved import BASE_LAYER
from adaptool.device import resolve_device, resolve_dtype
from adaptool.engine import execute
from adaptool.errors import AdaptoolError
from adaptool.io.inputs import input_paths, open_adapter
from adaptool.io.kohya import kohya_file
from adaptool.output.adapter_folder import PEFT_PREFIX
from adaptool.output.provenance import adapter_name, metadata, model_card
from adaptool.output.target import preflight
from adaptool.plan import Computed
from adaptool.plan.adapter import adapter_folders_plan, lora_config
from adaptool.plan.merge import carried_tensors
from adaptool.strategies.best_rank import best_from_factors, energy_kept
from adaptool.strategies.rank_rules import RankRule

LINEAR_NAMES = ("lora_A.weight", "lora_B.weight")
EMBEDDING_NAMES = ("lora_embedding_A", "lora_embedding_B")
MAX_INPUTS = 1000


@dataclass
class AlignInput:
    """One opened input: its output folder name, the adapter, its modules by path, the dtype of its factors."""

    name: str
    folder: object
    modules: dict[str, LoraModule]
    dtype: torch.dtype


@dataclass(frozen=True)
class Slot:
    """One module of the union: its kind and the factor shapes without the rank (``A (R, *a_tail)``,
    ``B (out, R, *b_tail)``), which every input adapting it must agree on."""

    path: str
    kind: str
    a_tail: tuple
    out: int
    b_tail: tuple

    @property
    def names(self) -> tuple[str, str]:
        suffixes = EMBEDDING_NAMES if self.kind == "embedding" else LINEAR_NAMES
        return tuple(f"{PEFT_PREFIX}{self.path}.{s}" for s in suffixes)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of ΔW with kernels flattened (embeddings: ``(dim, num)``)."""
        return self.out, math.prod(self.a_tail)


@dataclass
class Report:
    """What one input came out with (filled in while the engine computes its modules)."""

    scales: set = field(default_factory=set)
    ranks: set = field(default_factory=set)
    zero: int = 0
    truncated: dict = field(default_factory=dict)  # path -> energy kept
    fold_exact: bool = True
    fold_error: float = 0.0  # worst module's ‖ΔW' − ΔW‖_F / ‖ΔW‖_F caused by rounding s·B


def align(
    adapters: list[str],
    output: str | Path,
    *,
    rank: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    force: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Write one hot-swappable PEFT LoRA per input into ``output/<input name>/``, all with one config.

    Args:
        adapters (list[str]): two or more PEFT LoRA folders (or hub ids), trained on the same base.
        output (str | Path): the output folder, which will hold one subfolder per input (created atomically).
        rank (int | None): the common rank R. Default: the largest rank of any input module; below an input's
            rank, that input's modules are cut to their best rank-R approximation.
        dtype (str | None): dtype of the written factors (float32, bfloat16, float16). Default: each input's. A
            16-bit input whose scale is no power of two folds exactly only into float32 (``s·B`` needs more bits).
        device (str): where a rank cut runs: cpu (default: the same bytes on every machine), auto, cuda, cuda:N.
        force (bool): replace a non-empty output folder.
        on_start, on_progress: progress callbacks (units: bytes).

    Returns:
        dict: a summary: the common rank, the modules, per input its subfolder, scales folded, whether the fold
        was exact (and the ΔW error where not), modules written as zeros, modules cut and the energy they kept.

    Example:
        >>> align(["runs/style-a", "runs/style-b"], "aligned")  # doctest: +SKIP
        {'output': 'aligned', 'command': 'align', 'rank': 16, ...}
    """
    start = time.perf_counter()
    if isinstance(adapters, (str, Path)) or len(adapters) < 2:
        raise AdaptoolError("align needs at least two adapters", "e.g. adaptool align ./lora-a ./lora-b -o aligned/")
    if len(adapters) > MAX_INPUTS:
        raise AdaptoolError(f"align takes at most {MAX_INPUTS} adapters, got {len(adapters)}", "align them in groups")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdaptoolError(f"--rank must be a positive integer, got {rank!r}", "e.g. --rank 16")
    adapters = [str(a) for a in adapters]
    preflight(output, force, [a for a in adapters if Path(a).expanduser().exists()])
    out_dtype = resolve_dtype(dtype)
    dev = resolve_device(device, gpu_pays=False)
    with collected_notes() as notes:
        plan, inputs, slots, R, reports = plan_align(adapters, output, rank, force, out_dtype)
    stats = execute(plan, Path(output), force, dev, on_start, on_progress)
    summary = plan.sink.summary(stats)
    return {"output": str(output), "command": "align", "device": str(dev), **summary, "rank": R,
            "modules": len(slots), "adapters": [_input_report(i, reports[i.name]) for i in inputs],
            "fold_exact": all(r.fold_exact for r in reports.values()),
            "tensors_total": stats.tensors_total, "tensors_changed": 2 * len(slots) * len(inputs),
            "notes": [*notes, *_notes(inputs, reports, R)], "seconds": time.perf_counter() - start}


def plan_align(adapters: list[str], output, rank: int | None, force: bool, out_dtype=None):
    """``(plan, inputs, slots, R, reports)``: every input opened and checked against the others, the target
    too, and per input one computed module per slot of the union plus its carried tensors."""
    inputs = [_open_input(spec) for spec in adapters]
    _check_names(inputs)
    _check_same_base(inputs)
    _check_saved(inputs)
    paths = input_paths(None, [i.folder for i in inputs])
    preflight(output, force, paths)
    slots = _union(inputs)
    R = rank or max(m.rank for i in inputs for m in i.modules.values())
    config = _config(inputs, slots, R)
    rule = RankRule.from_options(rank=R)
    reports = {i.name: Report() for i in inputs}
    command = f"adaptool align {' '.join(adapter_name(i.folder) for i in inputs)} --rank {R}"
    parts = {}
    for inp in inputs:
        modules = [_aligned_module(inp, s, R, rule, reports[inp.name], out_dtype) for s in slots]
        meta = metadata("align", None, [inp.folder], {"rank": str(R), "modules": str(len(slots))})
        card = lambda cfg, inp=inp: model_card(  # noqa: E731
            inp.name, command, [inp.folder], base_model=cfg["base_model_name_or_path"])
        parts[inp.name] = ([*modules, carried_tensors([inp.folder])], meta, lambda ranks, lora_bias: config, card)
    return adapter_folders_plan(parts, paths), inputs, slots, R, reports


# ------------------------------------------------------------------------------------------------- inputs


def _open_input(spec: str) -> AlignInput:
    """Open one input and refuse, in one line, what cannot be aligned (kohya files, other types, DoRA,
    ``lora_bias``, variants, ``layer_replication``, an adapter without modules)."""
    local = Path(spec).expanduser()
    if local.exists() and kohya_file(local) is not None:
        raise AdaptoolError(f"{spec}: align takes PEFT adapter folders, and this is a kohya/LyCORIS file",
                            "convert it first: adaptool convert FILE -o FOLDER --to peft --base BASE")
    folder = open_adapter(spec)
    if folder.peft_type != "LORA":
        family(folder.peft_type, spec)  # an unknown type: its own one-line refusal
        raise AdaptoolError(f"{spec}: cannot align a {folder.peft_type} adapter: hotswapping swaps LoRA adapters only",
                            "align LoRA adapters (plain, rsLoRA, rank/alpha patterns)")
    s = folder.settings
    if s.layer_replication:
        raise AdaptoolError(f"{spec}: cannot align an adapter with layer_replication",
                            "fold it into its base with adaptool unload, then adaptool extract a LoRA from the result")
    modules = lora_modules(folder)
    if s.use_dora or any(m.magnitude_key for m in modules):
        raise AdaptoolError(f"{spec}: cannot align a DoRA adapter: PEFT does not hotswap DoRA, and its magnitude "
                            "is no part of a low-rank ΔW", "align plain LoRA adapters")
    if s.lora_bias or any(m.bias_key for m in modules):
        raise AdaptoolError(f"{spec}: cannot align an adapter with lora_bias", "align LoRA adapters without lora_bias")
    if not modules:
        raise AdaptoolError(f"{spec}: the adapter has no LoRA module", "the adapter is incomplete; re-save it")
    folder.check_finite()
    return AlignInput(_input_name(spec, folder), folder, {m.path: m for m in modules},
                      folder.load(modules[0].a_key).dtype)


def _input_name(spec: str, folder) -> str:
    """The output subfolder of an input: its folder's name as written (a hub id: the repository's name)."""
    local = Path(spec).expanduser()
    if local.exists():
        return Path(os.path.abspath(local)).name
    return spec.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _check_names(inputs: list[AlignInput]) -> None:
    seen: dict[str, str] = {}
    for i in inputs:
        if not i.name or i.name in (".", "..") or len(i.name) > 255:
            raise AdaptoolError(f"{i.folder.source}: its folder has no name to give its output subfolder",
                                "copy the adapter into a named folder")
        key = i.name.casefold()
        if key in seen:
            raise AdaptoolError(f"{seen[key]} and {i.folder.source} would both be written to the subfolder {i.name!r}",
                                "each input's folder name names its output: rename one of the folders (or copy it)")
        seen[key] = i.folder.source


def _loose(name: str | None) -> str | None:
    """A base model's name for a loose comparison: its last path component, lower case (``/data/Llama-3.2-1B/``
    and ``meta-llama/Llama-3.2-1B`` agree)."""
    if not name or not name.strip():
        return None
    return name.strip().rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].casefold() or None


def _check_same_base(inputs: list[AlignInput]) -> None:
    """Inputs naming different base models (by :func:`_loose` names) are refused; unnamed ones pass (their
    module shapes are still checked against each other)."""
    named = [(i, _loose(i.folder.settings.base_model_name_or_path)) for i in inputs]
    named = [(i, n) for i, n in named if n]
    for i, n in named[1:]:
        if n != named[0][1]:
            first = named[0][0]
            raise AdaptoolError(f"{first.folder.source} was trained on {first.folder.settings.base_model_name_or_path}"
                                f" but {i.folder.source} on {i.folder.settings.base_model_name_or_path}",
                                "align adapters of one base model (or fix base_model_name_or_path in "
                                "adapter_config.json)")


def _saved(inp: AlignInput) -> tuple:
    """What an input saves besides its LoRA modules: config entries and (name, shape) of the saved tensors."""
    s, fam = inp.folder.settings, family("LORA")
    tensors = tuple(sorted((n, tuple(inp.folder.shape(n))) for n in inp.folder.names
                           if not fam.is_own(n) and BASE_LAYER not in n))
    tokens = s.trainable_token_indices
    tokens = tuple(sorted(tokens.items())) if isinstance(tokens, dict) else tokens
    return (tuple(sorted(s.modules_to_save or ())), tokens, s.bias, s.fan_in_fan_out), tensors


def _check_saved(inputs: list[AlignInput]) -> None:
    """modules_to_save, trainable tokens, saved biases, fan_in_fan_out and the task type (where stated) must
    agree: the config is one for all, and a hotswap keeps the old adapter's saved copies where the new one has
    none."""
    tasks = {i.folder.settings.task_type for i in inputs} - {None}
    if len(tasks) > 1:
        raise AdaptoolError(f"the inputs were trained for different tasks ({', '.join(sorted(tasks))})",
                            "align adapters of one task type")
    _check_base_copies(inputs)
    first = _saved(inputs[0])
    for i in inputs[1:]:
        (cfg, tensors), (cfg0, tensors0) = _saved(i), first
        if cfg != cfg0 or tensors != tensors0:
            keys = ("modules_to_save", "trainable_token_indices", "bias", "fan_in_fan_out")
            what = next(k for k, a, b in zip(keys, cfg, cfg0) if a != b) if cfg != cfg0 else "saved tensors"
            raise AdaptoolError(f"{inputs[0].folder.source} and {i.folder.source} differ in {what}: one config cannot "
                                "hold both", "align adapters that save the same modules (modules_to_save, trainable "
                                "tokens, bias), or drop them from all with adaptool edit --drop")


def _check_base_copies(inputs: list[AlignInput]) -> None:
    """Saved base-layer copies (PEFT saves the base embedding of an adapted embedding) travel with the inputs
    that hold them; where several hold one, the copies must be equal, or a hotswap would keep a stale one."""
    seen: dict[str, AlignInput] = {}
    for inp in inputs:
        for name in inp.folder.names:
            if BASE_LAYER not in name or family("LORA").is_own(name):
                continue
            first = seen.setdefault(name, inp)
            if first is not inp and not (first.folder.shape(name) == inp.folder.shape(name)
                                         and torch.equal(first.folder.load(name), inp.folder.load(name))):
                raise AdaptoolError(f"{first.folder.source} and {inp.folder.source} save different copies of {name}",
                                    "align adapters of one base model (the copies are of its layers)")


def _slot(inp: AlignInput, m: LoraModule) -> Slot:
    a, b = tuple(inp.folder.shape(m.a_key)), tuple(inp.folder.shape(m.b_key))
    return Slot(m.path, m.kind, a[1:], b[0], b[2:])


def _union(inputs: list[AlignInput]) -> list[Slot]:
    """Every module any input adapts, sorted by path; the shapes of a module must agree across inputs."""
    slots: dict[str, tuple[Slot, str]] = {}
    for inp in inputs:
        for m in inp.modules.values():
            slot = _slot(inp, m)
            known = slots.setdefault(m.path, (slot, inp.folder.source))
            if known[0] != slot:
                raise AdaptoolError(
                    f"{m.path} is a {known[0].kind} ({known[0].out} x {known[0].a_tail}) in {known[1]} but a "
                    f"{slot.kind} ({slot.out} x {slot.a_tail}) in {inp.folder.source}",
                    "align adapters of one base model")
    return [slots[p][0] for p in sorted(slots)]


def _config(inputs: list[AlignInput], slots: list[Slot], R: int) -> dict:
    """The one ``adapter_config.json``: rank R and alpha R everywhere, targets the union (full paths)."""
    s = next((i.folder.settings for i in inputs if i.folder.settings.base_model_name_or_path),
             inputs[0].folder.settings)
    task = next((i.folder.settings.task_type for i in inputs if i.folder.settings.task_type), None)
    tokens = s.trainable_token_indices
    tokens = {k: list(v) for k, v in tokens.items()} if isinstance(tokens, dict) else (list(tokens) if tokens else None)
    config = lora_config({slot.path: R for slot in slots}, base_model=s.base_model_name_or_path, task_type=task,
                         revision=s.revision, fan_in_fan_out=s.fan_in_fan_out,
                         modules_to_save=list(s.modules_to_save) if s.modules_to_save else None,
                         trainable_token_indices=tokens)
    config["bias"] = s.bias
    return config


# ------------------------------------------------------------------------------------------------- modules


def _aligned_module(inp: AlignInput, slot: Slot, R: int, rule: RankRule, report: Report, out_dtype=None) -> Computed:
    """Input ``inp``'s module at ``slot`` as rank-R factors with scaling 1 (zeros where it has none), in
    ``out_dtype`` (None: the input's)."""
    m = inp.modules.get(slot.path)
    a_name, b_name = slot.names
    dtype = out_dtype or (inp.folder.load(m.a_key).dtype if m is not None else inp.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    estimate = R * (slot.out + slot.shape[1]) * itemsize

    def produce(device):
        A = torch.zeros((R, *slot.a_tail), dtype=dtype, device=device)
        B = torch.zeros((slot.out, R, *slot.b_tail), dtype=dtype, device=device)
        if m is None:
            report.zero += 1
            return {a_name: A, b_name: B}, None
        a, b = inp.folder.load(m.a_key).to(device), inp.folder.load(m.b_key).to(device)
        report.scales.add(m.scaling)
        report.ranks.add(m.rank)
        if m.rank <= R:
            A[: m.rank] = a.to(dtype)
            B[:, : m.rank] = fold(b, m.scaling, dtype)
            error = fold_error(b, a, m.scaling, B[:, : m.rank], A[: m.rank])
            report.fold_exact = report.fold_exact and error == 0.0
            report.fold_error = max(report.fold_error, error)
            return {a_name: A, b_name: B}, None
        B_k, A_k, S, k = best_from_factors(b.reshape(slot.out, -1), a.reshape(m.rank, -1), m.scaling, rule, slot.shape,
                                           dtype, fast=dtype in (torch.bfloat16, torch.float16))
        A[:k] = A_k.reshape(k, *slot.a_tail)
        B[:, :k] = B_k.reshape(slot.out, k, *slot.b_tail)
        report.truncated[slot.path] = energy_kept(S, k)
        return {a_name: A, b_name: B}, report.truncated[slot.path]

    return Computed(f"{inp.name}: {slot.path}", produce, None, nbytes_estimate=estimate)


def fold(b: torch.Tensor, scale: float, dtype) -> torch.Tensor:
    """``round(scale·B)`` in ``dtype``: the product taken in float64 (exact for a 16-bit B and a power-of-two
    scale, and rounded at most once more than the final rounding otherwise), rounded once to ``dtype``."""
    return (b.double() * scale).to(dtype)


def fold_error(b: torch.Tensor, a: torch.Tensor, scale: float, B: torch.Tensor, A: torch.Tensor) -> float:
    """``‖B'A' − s·B·A‖_F / ‖s·B·A‖_F`` in float64 from the factors alone, 0.0 when ``A' = A`` and
    ``B' = s·B`` exactly: ``B'A' − sBA = X Y`` with ``X = [B' − sB, sB]`` and ``Y = [A'; A' − A]``, whose norm is
    ``tr(XᵀX · YYᵀ)`` ((out + in)·(2r)² work; written with the small differences, so nothing cancels).

    Args:
        b, a: the input's ``B (out, r, 1…)`` and ``A (r, in, k…)``; B, A: what is written in their place (same r).
    """
    r = b.shape[1]
    b64 = b.double().transpose(0, 1).reshape(r, -1).T * scale
    a64 = a.double().reshape(r, -1)
    B64, A64 = B.double().transpose(0, 1).reshape(r, -1).T, A.double().reshape(r, -1)
    if torch.equal(B64, b64) and torch.equal(A64, a64):
        return 0.0
    X, Y = torch.cat([B64 - b64, b64], dim=1), torch.cat([A64, A64 - a64], dim=0)
    err2 = float(((X.T @ X) * (Y @ Y.T)).sum())
    total2 = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    return math.sqrt(max(err2, 0.0) / total2) if total2 > 0 else 0.0


# ------------------------------------------------------------------------------------------------ summary


def _input_report(inp: AlignInput, r: Report) -> dict:
    energies = list(r.truncated.values())
    worst = min(r.truncated.items(), key=lambda x: x[1]) if energies else None
    return {"name": inp.name, "source": inp.folder.source, "modules_adapted": len(inp.modules),
            "modules_zero": r.zero, "rank_in": [min(r.ranks), max(r.ranks)] if r.ranks else None,
            "scales": sorted(r.scales), "fold_exact": r.fold_exact, "fold_error": r.fold_error,
            "truncated": len(energies),
            "energy_kept": {"mean": sum(energies) / len(energies), "min": worst[1], "worst_module": worst[0]}
            if energies else None}


def _notes(inputs: list[AlignInput], reports: dict[str, Report], R: int) -> list[str]:
    """One line per input for the summary: scales folded (exact or not), zeros, rank cuts."""
    lines = []
    for inp in inputs:
        r = reports[inp.name]
        scales = ", ".join(f"{s:g}" for s in sorted(r.scales))
        fold_text = ("bit-exact" if r.fold_exact else
                     f"rounded once: ΔW error up to {r.fold_error:.2e} relative"
                     + ("; --dtype float32 keeps more" if r.fold_error > 1e-6 else ""))
        line = f"{inp.name}: scale {scales} folded into lora_B ({fold_text}); {r.zero} modules written as zeros"
        if r.truncated:
            worst = min(r.truncated.items(), key=lambda x: x[1])
            line += f"; {len(r.truncated)} modules cut to rank {R}, energy kept min {worst[1]:.4f} ({worst[0]})"
        lines.append(line)
    return lines
