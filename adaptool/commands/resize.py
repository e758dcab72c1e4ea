"""``resize``: a PEFT LoRA whose ΔW per module is the best rank-k approximation of the input's ΔW, k chosen
per module by a rule (:mod:`adaptool.strategies.rank_rules`).

LoRA inputs (plain, rsLoRA, rank/alpha patterns, ``lora_bias``, embeddings, convs, kohya files) are resized
from their factors, never from a dense out x in matrix: with ``ΔW = s·B·A`` (``B (out, r)``, ``A (r, in)``),
the Gram matrices ``BᵀB = V_B Λ_B V_Bᵀ`` and ``AAᵀ = V_A Λ_A V_Aᵀ`` give ``B = Q_B Λ_B^½ V_Bᵀ`` and
``A = V_A Λ_A^½ Q_Aᵀ`` with orthonormal ``Q``, so ``ΔW = Q_B (s·Λ_B^½ V_Bᵀ V_A Λ_A^½) Q_Aᵀ`` and the SVD
of that r x r core is the SVD of ΔW (the maths: :mod:`adaptool.strategies.best_rank`, shared with ``align``).
Cost: O((out + in)·r²), two passes over the factors in cache-sized blocks.
The Gram matrices are float64 (float32 when the output is 16-bit and the factors well conditioned, see
:func:`best_from_factors`); where a factor is too ill-conditioned (or rank-deficient) for that, the module takes
the QR route of :func:`adaptool.strategies.lowrank.factor_svd` instead (same result, slower). LoHa, LoKr and
AdaLoRA are resized from their dense ΔW (which needs the base for the layer shapes), by an exact float64 SVD.

The result puts the singular values on B (``B_k = U_k S_k``, ``A_k = V_kᵀ``) and states ``alpha = r`` for every
module (scaling 1) through ``rank_pattern``/``alpha_pattern``. A LoRA module whose rule keeps every direction
is written as it was (its factors untouched, its scale kept through ``alpha_pattern``), so ``--rank`` at or
above the input rank changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adaptool.adapters import edits_for, family
from adaptool.adapters.adalora import A as ADA_A, B as ADA_B
from adaptool.adapters.common import module_keys
from adaptool.adapters.layout import base_layout, effective_fan_in_fan_out, transposed_layout
from adaptool.adapters.lora import lora_modules
from adaptool.adapters.notes import collected_notes
from adaptool.device import resolve_device, resolve_dtype
from adaptool.engine import execute
from adaptool.errors import AdaptoolError
from adaptool.io.inputs import input_paths, open_adapter, open_base
from adaptool.io.kohya import kohya_file
from adaptool.ops.edits import AddDelta
from adaptool.output.adapter_folder import PEFT_PREFIX, written_ranks
from adaptool.output.provenance import adapter_name, base_name, deferred_metadata, model_card, portable_spec
from adaptool.output.target import preflight
from adaptool.plan import Computed, Plan, TensorResolver
from adaptool.plan.adapter import lora_adapter_plan, lora_config
from adaptool.plan.merge import carried_tensors, span
# gram_svd is re-exported: resize's tests reach the maths through this module
from adaptool.strategies.best_rank import (NonFiniteFactors, best_from_dense, best_from_factors,  # noqa: F401
                                           energy_kept, gram_svd)
from adaptool.strategies.rank_rules import RankRule, numerical_rank

#: input types resized through their dense ΔW (they need the base for the layer shapes)
DENSE_TYPES = ("LOHA", "LOKR", "ADALORA")
NOT_ADDITIVE = {"IA3": "IA3 adapters scale the base weight (no additive ΔW)",
                "OFT": "OFT adapters rotate the base weight (no additive ΔW)"}


@dataclass
class ModuleSource:
    """One module of the input, as resize reads it.

    ``factors(device)`` gives a LoRA module's ``(B, A)`` as stored (dtype and shape); ``dense(device)`` gives
    ``(ΔW (out, in), stored dtype)`` (float32, LoRA orientation, kernels flattened) for the other families.
    ``a_tail``/``b_tail``: the trailing dims the output factors are reshaped to; ``scale``: a LoRA's scaling.
    """

    path: str
    kind: str  # linear | embedding | conv
    rank_in: int | None  # the factors' rank (None: a dense delta, counted when computed)
    shape: tuple[int, int]
    a_tail: tuple
    b_tail: tuple
    factors: Callable | None = None
    dense: Callable | None = None
    bias: Callable | None = None  # device -> lora_B bias (unscaled), or None
    scale: float = 1.0
    check_finite: Callable | None = None  # raises naming a factor that holds NaN/Inf


@dataclass
class Results:
    """What each module came out with (filled in as the engine computes them)."""

    rank_in: dict = field(default_factory=dict)
    energy: dict = field(default_factory=dict)
    kept_scale: dict = field(default_factory=dict)  # module kept whole -> its scaling (goes in alpha_pattern)


def resize(
    adapter: str,
    output: str | Path,
    rule: RankRule,
    *,
    base: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    force: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Resize every module of ``adapter`` to the rank ``rule`` picks and write a PEFT LoRA to ``output``.

    Args:
        adapter (str): a PEFT folder, a kohya/LyCORIS ``.safetensors`` file (needs ``base``) or a hub id.
        output (str | Path): the output folder (created atomically).
        rule (RankRule): ``--rank``/``--sv-fro``/``--sv-cumulative``/``--sv-ratio`` and ``--max-rank``.
        base (str | None): the base model; needed for kohya files and for LoHa, LoKr and AdaLoRA inputs.
        dtype (str | None): output dtype of the factors. Default: each module's input dtype.
        device (str): auto (the CPU: see :func:`~adaptool.device.resolve_device`), cpu, cuda or cuda:N.
        force (bool): replace a non-empty output folder.
        on_start, on_progress: progress callbacks (units: bytes).

    Returns:
        dict: a summary: per module rank in -> out and energy kept, ranks out, bytes before/after, seconds,
        peak memory, notes.
    """
    start = time.perf_counter()
    if not isinstance(rule, RankRule):
        raise AdaptoolError(f"rule must be a RankRule, got {type(rule).__name__}",
                            "build it with RankRule.from_options(rank=16) or similar")
    preflight(output, force, [s for s in (base, adapter) if s and Path(s).expanduser().exists()])
    out_dtype = resolve_dtype(dtype)
    dev = resolve_device(device, gpu_pays=False)
    with collected_notes() as notes:
        plan, folder, results = plan_resize(adapter, output, rule, base, out_dtype, force)
    stats = execute(plan, Path(output), force, dev, on_start, on_progress)
    summary = plan.sink.summary(stats)
    return {"output": str(output), "command": "resize", "adapter": adapter, "base": base, "rule": rule.describe(),
            "device": str(dev), "notes": list(notes), **summary,
            **_module_report(results, written_ranks(stats.written)),
            "bytes_before": _input_bytes(folder), "seconds": time.perf_counter() - start}


def plan_resize(adapter: str, output, rule: RankRule, base: str | None, out_dtype,
                force: bool) -> tuple[Plan, object, Results]:
    """(plan, opened adapter, results filled in while the plan runs): the input opened and checked, the target
    too, one computed module per adapted module plus the tensors carried over unchanged."""
    if base is None and Path(adapter).expanduser().exists() and kohya_file(Path(adapter).expanduser()) is not None:
        raise AdaptoolError(f"{adapter} is a kohya/LyCORIS file, which names its modules only by flattened paths",
                            "give the base model it was trained on with --base")
    checkpoint = open_base(base) if base is not None else None
    folder = open_adapter(adapter, checkpoint)
    inputs = input_paths(checkpoint, [folder])
    preflight(output, force, inputs)
    _check_type(folder, checkpoint)
    if folder.peft_type == "LORA":
        if checkpoint is not None:
            edits_for(folder, checkpoint)  # checks every module against the base
        sources = _lora_sources(folder)
        # the factors' finiteness is read off their Gram matrices (best_from_factors), the rest checked here
        factors = {k for m in lora_modules(folder) for k in (m.a_key, m.b_key)}
        folder.check_finite([n for n in folder.names if n not in factors])
    else:
        folder.check_finite()
        sources = _dense_sources(folder, checkpoint)
    if not sources:
        raise AdaptoolError(f"{adapter}: the adapter has no module to resize",
                            "the adapter is incomplete; re-save it (with PEFT's save_pretrained)")
    results = Results()
    modules = [_resized_module(s, rule, out_dtype, results) for s in sources]
    meta = deferred_metadata("resize", checkpoint, [folder], {"rule": rule.describe()})
    command = f"adaptool resize {adapter_name(folder)} {rule.describe()}" + (
        f" --base {base_name(checkpoint)}" if checkpoint is not None else "")
    plan = lora_adapter_plan(
        [*modules, carried_tensors([folder])], meta,
        config=lambda ranks, lora_bias: _config(folder, portable_spec(base), ranks, lora_bias, results),
        card=lambda config: model_card(f"{adapter_name(folder)} resized", command, [folder], base=checkpoint,
                                       base_model=config["base_model_name_or_path"]),
        inputs=inputs)
    return plan, folder, results


def _check_type(folder, checkpoint) -> None:
    """Refuse, in one line, what resize cannot do: a non-additive type, DoRA, layer replication, a dense type
    without the base."""
    kind = folder.peft_type
    if kind in NOT_ADDITIVE:
        raise AdaptoolError(f"{folder.source}: cannot resize: {NOT_ADDITIVE[kind]}",
                            "fold it into the base with adaptool unload, then adaptool extract a LoRA from the result")
    if kind != "LORA" and kind not in DENSE_TYPES:
        family(kind, folder.source)  # an unknown type: its own one-line refusal
        raise AdaptoolError(f"{folder.source}: cannot resize {kind} adapters",
                            "resize takes LoRA, LoHa, LoKr and AdaLoRA adapters")
    settings = folder.settings
    if kind == "LORA" and settings.layer_replication:
        raise AdaptoolError(f"{folder.source}: cannot resize an adapter with layer_replication",
                            "fold it into its base with adaptool unload, then adaptool extract a LoRA from the result")
    if kind == "LORA" and (settings.use_dora or any(m.magnitude_key for m in lora_modules(folder))):
        raise AdaptoolError(f"{folder.source}: cannot resize a DoRA adapter: its magnitude vector rescales the "
                            "whole weight, so its change is not the low-rank ΔW",
                            "fold it into the base with adaptool unload, then adaptool extract a LoRA from the result")
    if kind in DENSE_TYPES and checkpoint is None:
        raise AdaptoolError(f"{folder.source}: resizing a {kind} adapter goes through its dense ΔW, which needs the "
                            "base model for the layer shapes", "give the base model with --base")


def _lora_sources(folder) -> list[ModuleSource]:
    """A LoRA's modules, read from their factors."""
    sources = []
    for m in lora_modules(folder):
        a_shape, b_shape = tuple(folder.shape(m.a_key)), tuple(folder.shape(m.b_key))
        n_in = 1
        for d in a_shape[1:]:
            n_in *= d

        def factors(device, m=m):
            return folder.view(m.b_key).to(device), folder.view(m.a_key).to(device)  # read only, never changed

        def check(m=m):
            folder.check_finite([m.a_key, m.b_key])

        def bias(device, key=m.bias_key):
            return folder.load(key).to(device=device, dtype=torch.float32)

        sources.append(ModuleSource(m.path, m.kind, m.rank, (b_shape[0], n_in), a_shape[1:], b_shape[2:],
                                    factors=factors, bias=bias if m.bias_key else None, scale=m.scaling,
                                    check_finite=check))
    return sources


def _dense_sources(folder, checkpoint) -> list[ModuleSource]:
    """LoHa, LoKr and AdaLoRA modules, read as their dense ΔW (the edits ``unload`` applies), in LoRA
    orientation ``(out, in)`` with conv kernels flattened."""
    resolve = TensorResolver(checkpoint, folder)
    own = family(folder.peft_type).own
    paths = {}
    for path, keys in module_keys(folder, own).items():
        paths[resolve.tensor(path, "weight")] = (path, keys)
    sources = []
    for e in edits_for(folder, checkpoint):
        if not isinstance(e, AddDelta):
            continue  # modules_to_save copies and the like travel unchanged (carried_tensors)
        path, keys = paths[e.target]
        w_shape = tuple(checkpoint.tensors[e.target].shape)
        transposed = folder.peft_type == "ADALORA" and _adalora_transposed(folder, keys, w_shape, checkpoint)
        n_in = 1
        for d in w_shape[1:]:
            n_in *= d
        shape = (w_shape[1], w_shape[0]) if transposed else (w_shape[0], n_in)

        def dense(device, e=e, w_shape=w_shape, transposed=transposed, first=next(iter(keys.values()))):
            d = e.delta_rows(device)(0, w_shape[0]).reshape(w_shape[0], -1)
            return (d.T if transposed else d), folder.load(first).dtype

        kind = "conv" if len(w_shape) > 2 else "linear"
        sources.append(ModuleSource(path, kind, None, shape, tuple(w_shape[1:]) if kind == "conv" else (shape[1],),
                                    (1,) * (len(w_shape) - 2), dense=dense))
    return sources


def _adalora_transposed(folder, keys, w_shape, checkpoint) -> bool:
    """Whether AdaLoRA stores this 2-D weight (in, out) (GPT-2 Conv1D), as :mod:`adaptool.adapters.adalora` decides."""
    if len(w_shape) != 2:
        return False
    a, b = folder.shape(keys[ADA_A]), folder.shape(keys[ADA_B])
    fifo = effective_fan_in_fan_out(folder, checkpoint)
    return bool(transposed_layout(b[0], a[1], w_shape, fifo, base_layout(checkpoint) is False))


def _resized_module(src: ModuleSource, rule: RankRule, dtype, results: Results) -> Computed:
    """One module's best rank-k factors under PEFT's names (its energy kept recorded in ``results``)."""
    key = PEFT_PREFIX + src.path
    names = ("lora_embedding_A", "lora_embedding_B") if src.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
    itemsize = 4 if dtype == torch.float32 else 2
    estimate = (src.rank_in or min(src.shape)) * sum(src.shape) * itemsize

    def produce(device):
        stored = b = a = None
        if src.factors is not None:
            b, a = src.factors(device)
            stored = a.dtype
            out_dtype = dtype or stored
            try:
                B_k, A_k, S, k = best_from_factors(b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), src.scale,
                                                   rule, src.shape, out_dtype,
                                                   fast=out_dtype in (torch.bfloat16, torch.float16))
            except NonFiniteFactors:
                src.check_finite()  # names the tensor holding NaN/Inf
                raise AdaptoolError(f"{src.path}: the products of the factors overflow float64",
                                    "the adapter's values are out of range; re-export it") from None
            rank_in = src.rank_in
        else:
            D, stored = src.dense(device)
            B_k, A_k, S, k = best_from_dense(D, rule)
            rank_in = numerical_rank(S, src.shape)
        results.rank_in[src.path] = rank_in
        results.energy[src.path] = energy_kept(S, k)
        bias = src.bias(device) if src.bias is not None else None
        if a is not None and k >= src.rank_in:  # every direction kept: the module as it was
            A_k, B_k = a, b
            results.kept_scale[src.path] = src.scale
        else:
            A_k = A_k.reshape(A_k.shape[0], *src.a_tail)
            B_k = B_k.reshape(B_k.shape[0], B_k.shape[1], *src.b_tail)
            bias = None if bias is None else bias * src.scale
        tensors = {f"{key}.{names[0]}": A_k, f"{key}.{names[1]}": B_k}
        if bias is not None:
            tensors[f"{key}.lora_B.bias"] = bias
        tensors = {n: t.to(dtype or stored) for n, t in tensors.items()}  # the input's dtype unless --dtype
        return tensors, (results.energy[src.path] if k < (rank_in or 0) else None)

    return Computed(src.path, produce, None, nbytes_estimate=estimate, concurrent=src.factors is not None)


# ----------------------------------------------------------------------------------------------- outputs


def _config(folder, base: str | None, ranks: dict[str, int], lora_bias: bool, results: Results) -> dict:
    """The output's ``adapter_config.json``: scaling 1 for every re-factored module, the input's scale (via
    ``alpha_pattern``) for a module kept whole; the input's base, task, saved modules and tokens."""
    s = folder.settings
    config = lora_config(ranks, base_model=s.base_model_name_or_path or base, task_type=s.task_type,
                         revision=s.revision, lora_bias=lora_bias, fan_in_fan_out=s.fan_in_fan_out,
                         modules_to_save=list(s.modules_to_save) if s.modules_to_save else None,
                         trainable_token_indices=_tokens(s.trainable_token_indices))
    for path, scale in sorted(results.kept_scale.items()):
        if scale != 1.0:
            config["alpha_pattern"][path] = scale * ranks[path]
    if s.bias in ("all", "lora_only"):
        config["bias"] = s.bias
    return config


def _tokens(spec):
    if isinstance(spec, dict):
        return {k: list(v) for k, v in spec.items()}
    return list(spec) if spec is not None else None


def _module_report(results: Results, ranks: dict[str, int]) -> dict:
    """Per module rank in -> out and energy kept; the ranks out; mean and worst energy kept."""
    modules = [{"module": p, "rank_in": results.rank_in.get(p), "rank": ranks[p], "energy_kept": results.energy.get(p)}
               for p in ranks]
    energies = [(m["module"], m["energy_kept"]) for m in modules if m["energy_kept"] is not None]
    energy = None
    if energies:
        worst = min(energies, key=lambda x: x[1])
        energy = {"mean": sum(e for _, e in energies) / len(energies), "min": worst[1], "worst_module": worst[0]}
    return {"modules": modules, "rank_in": span([r for r in results.rank_in.values() if r is not None]),
            "rank_out": span(list(ranks.values())), "energy_kept": energy}


def _input_bytes(folder) -> int | None:
    """Size of the input's weights file."""
    weights = getattr(folder, "weights", None)
    try:
        return Path(weights).stat().st_size if weights is not None else None
    except OSError:
        return None
