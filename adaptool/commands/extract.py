"""``extract``: a PEFT LoRA that carries a full fine-tune, ΔW = W_tuned − W_base truncated by a rank rule.

The planner pairs the two checkpoints' tensors by name, module by module, from their headers only:

* a module whose weight is a 2-D ``nn.Linear`` or GPT-2 ``Conv1D`` weight (with at most a bias) becomes one
  :class:`~adaptool.plan.Computed` that reads both weights, forms ΔW in float32 on the device (in LoRA
  orientation, (out, in)) and truncates it (:mod:`adaptool.strategies.dense_lowrank`); a changed bias of such a
  module goes in ``lora_B.bias`` (PEFT's ``lora_bias``);
* any other module (norms, embeddings, ``lm_head``, conv kernels, …) becomes a Computed that, when any of its
  tensors differs, carries TUNED's tensors whole as ``modules_to_save``;
* a module where nothing differs produces nothing.

The engine runs every Computed in order, one pair of tensors in memory at a time, and the PEFT adapter-folder
sink writes ``adapter_config.json`` from the ranks written. What each module came out with (rank, energy,
error) is recorded in an :class:`Extraction` as the engine produces it.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adaptool.adapters.layout import base_layout
from adaptool.device import resolve_device, resolve_dtype
from adaptool.engine import execute
from adaptool.errors import AdaptoolError
from adaptool.io.adapter_folder import is_adapter_folder
from adaptool.io.checkpoint import Checkpoint
from adaptool.io.hub import BASE_PATTERNS, resolve
from adaptool.io.inputs import input_paths
from adaptool.io.safetensors_file import FLOAT_CODES, TensorInfo, load_tensor, open_regular, read_block, torch_dtype
from adaptool.io.weights_buffer import all_finite
from adaptool.output.adapter_folder import PEFT_PREFIX
from adaptool.output.provenance import base_entry, base_name, hub_model_id, metadata, portable_spec
from adaptool.output.target import preflight
from adaptool.plan import Computed
from adaptool.plan.adapter import lora_adapter_plan, lora_config
from adaptool.strategies.dense_lowrank import rounding_error, truncate_dense
from adaptool.strategies.rank_rules import RankRule
from adaptool.version import __version__

# GPT-2-family modules built from transformers' Conv1D (weights stored (in, out)); other 2-D weights of those
# models (heads, decision_transformer's embed_*/predict_* layers) are nn.Linear.
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Modules whose 2-D weight is an embedding or an output head: carried whole, never factored.
EMBEDDING_LEAVES = frozenset({"wte", "wpe", "lm_head", "embed_out", "shared"})
MAX_REGEX = 1000
BLOCK_ELEMS = 1 << 18  # elements per row block read from each checkpoint (converted while in cache)


@dataclass
class Pair:
    """One tensor of a module, in BASE and in TUNED."""

    name: str
    base: TensorInfo
    tuned: TensorInfo


@dataclass
class ModuleWork:
    """One module of the output: a LoRA target (``lora``) or a candidate for ``modules_to_save``."""

    module: str
    pairs: dict[str, Pair]
    lora: bool
    conv1d: bool = False

    @property
    def first_read(self) -> tuple:
        t = min(self.pairs.values(), key=lambda p: (str(p.tuned.file), p.tuned.start)).tuned
        return str(t.file), t.start


@dataclass
class Workspace:
    """Buffers kept from module to module: fresh ones would be page-faulted in (and handed back by the engine's
    trim) for every module, which costs more than the conversions written into them."""

    delta: torch.Tensor | None = None
    reads: tuple | None = None

    def delta_for(self, shape: tuple, device, largest: int) -> torch.Tensor:
        """A float32 tensor of ``shape`` on ``device`` (its storage reused; ``largest``: the most it will hold)."""
        n = max(1, math.prod(shape))
        device = torch.device(device)
        if (self.delta is None or self.delta.numel() < n or self.delta.device.type != device.type
                or device.index not in (None, self.delta.device.index)):
            self.delta = None
            self.delta = torch.empty(max(n, largest), dtype=torch.float32, device=device)
        return self.delta[:n].view(shape)

    def read_buffers(self, nbytes: int) -> tuple:
        if self.reads is None or self.reads[0].numel() < nbytes:
            self.reads = (torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8))
        return self.reads


@dataclass
class Extraction:
    """What a run found, filled in as the engine produces each module; read by the config, card and summary."""

    base: str
    tuned: str
    rule: RankRule
    out_dtype: object  # torch.dtype | None
    records: dict = field(default_factory=dict)  # module -> its line of the summary
    carried: list = field(default_factory=list)  # tensor names carried whole
    carried_modules: set = field(default_factory=set)
    bias_modules: set = field(default_factory=set)  # LoRA targets with a bias delta
    fifo: bool = False
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    workspace: Workspace = field(default_factory=Workspace)
    largest: int = 0  # elements of the largest LoRA target weight
    checkpoints: tuple = ()  # (BASE, TUNED) opened, for provenance

    def dtype_of(self, info: TensorInfo):
        """The output dtype of a tensor produced from TUNED's ``info``: ``--dtype`` for float tensors, else its own."""
        own = torch_dtype(info.dtype)
        return self.out_dtype if self.out_dtype is not None and own.is_floating_point else own


def extract(
    base: str,
    tuned: str,
    output: str | Path,
    rule: RankRule,
    *,
    modules: str | None = None,
    skip_missing: bool = False,
    dtype: str | None = None,
    device: str = "auto",
    force: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Write a PEFT LoRA to ``output`` whose ``unload`` onto ``base`` reproduces ``tuned`` up to the truncation.

    Args:
        base (str): the base model (folder, ``.safetensors`` file or hub id ``org/name[@rev]``).
        tuned (str): the fine-tuned model, same architecture.
        output (str | Path): the adapter folder to write (atomically).
        rule (RankRule): how many singular values each module keeps (``--rank`` … ``--sv-ratio``, ``--max-rank``).
        modules (str | None): only modules whose name ``re.search``-es this regex are compared and written.
        skip_missing (bool): skip (and list) tensors found on one side only, or of another shape, instead of failing.
        dtype (str | None): output dtype of float tensors. Default: TUNED's.
        device (str): auto, cpu, cuda or cuda:N (where ΔW and its SVD are computed).
        force (bool): replace a non-empty output folder.
        on_start, on_progress: progress callbacks (tensor count and bytes; bytes written per module).

    Returns:
        dict: ``output``, ``command``, per-module ``modules`` (rank, energy kept, error, best error), ``rank_out``,
        ``carried``, ``skipped``, ``energy_kept``, ``bytes_written``, ``seconds``, ``peak_rss_bytes``, ``notes``.

    Raises:
        AdaptoolError: a problem with the inputs or the target (found before any write where it can be), or
            nothing differs between the two checkpoints.
    """
    start = time.perf_counter()
    preflight(output, force, [s for s in (base, tuned) if Path(s).expanduser().exists()])
    out_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    pattern = _module_pattern(modules)
    base_ckpt, tuned_ckpt = _open(base, "BASE"), _open(tuned, "TUNED")
    inputs = input_paths(base_ckpt, [], tuned_ckpt.root, *tuned_ckpt.shards)
    preflight(output, force, inputs)
    if sorted(map(Path.resolve, base_ckpt.shards)) == sorted(map(Path.resolve, tuned_ckpt.shards)):
        raise AdaptoolError(f"BASE and TUNED are the same checkpoint ({base}): nothing differs",
                            "give the fine-tuned model as TUNED")
    state = Extraction(base, tuned, rule, out_dtype, checkpoints=(base_ckpt, tuned_ckpt))
    works = plan_modules(base_ckpt, tuned_ckpt, pattern, skip_missing, state)
    computed = [_lora_module(w, state) if w.lora else _carried_module(w, state) for w in works]
    computed.append(Computed("lora_B biases", lambda device: (_zero_biases(works, state), None)))
    meta = metadata("extract", base_ckpt, [], {"tuned": base_entry(tuned_ckpt), "rule": rule.describe(),
                                               "modules": modules or ""})
    task = _task_type(tuned_ckpt.config or base_ckpt.config)
    plan = lora_adapter_plan(computed, meta, config=lambda ranks, lora_bias: _config(state, ranks, lora_bias, task,
                                                                                      modules),
                             card=lambda config: _card(state, config), inputs=inputs)
    stats = execute(plan, Path(output), force, dev, on_start, on_progress)
    return _summary(state, stats, output, dev, time.perf_counter() - start)


def _open(spec: str, role: str) -> Checkpoint:
    """A full checkpoint (headers only); an adapter folder here is a user error."""
    root = resolve(spec, f"{role} model", BASE_PATTERNS)
    if root.is_dir() and is_adapter_folder(root):
        raise AdaptoolError(f"{role} {spec} is an adapter, not a model: extract compares two full checkpoints",
                            "to fold an adapter into its base, use adaptool unload BASE+ADAPTER")
    return Checkpoint.open(root)


def _module_pattern(modules: str | None):
    if modules is None:
        return None
    if len(modules) > MAX_REGEX:
        raise AdaptoolError(f"--modules is {len(modules)} characters long (at most {MAX_REGEX})", "shorten the regex")
    try:
        return re.compile(modules)
    except re.error as e:
        raise AdaptoolError(f"--modules {modules!r} is not a valid regular expression ({e})",
                            "e.g. --modules 'mlp|self_attn'") from None


def plan_modules(base: Checkpoint, tuned: Checkpoint, pattern, skip_missing: bool, state: Extraction) -> list[ModuleWork]:
    """Pair the two checkpoints' tensors (those ``pattern`` selects) by module, and sort out what cannot be paired:
    an error, or skipped and listed with ``skip_missing``. Modules come in TUNED's file order (sequential reads)."""
    selected = [n for n in {**base.tensors, **tuned.tensors} if pattern is None or pattern.search(_module(n))]
    if not selected:
        raise AdaptoolError(f"--modules {pattern.pattern!r} matches no module of BASE or TUNED",
                            "module names look like model.layers.0.self_attn.q_proj")
    groups: dict[str, dict[str, Pair]] = {}
    lost = []
    for name in sorted(selected):
        b, t = base.tensors.get(name), tuned.tensors.get(name)
        if b is None or t is None:
            lost.append(f"{name} (only in {'TUNED' if b is None else 'BASE'})")
            continue
        groups.setdefault(_module(name), {})[name.rpartition(".")[2]] = Pair(name, b, t)
    conv1d_model = base_layout(base) is True
    works = []
    for module, pairs in groups.items():
        work = _classify(module, pairs, conv1d_model)
        weight = pairs.get("weight")
        if work.lora and weight.base.shape != weight.tuned.shape:
            lost += [f"{p.name} (shape {list(p.base.shape)} in BASE, {list(p.tuned.shape)} in TUNED)"
                     for p in pairs.values()]
            continue
        works.append(work)
    if lost and not skip_missing:
        more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
        raise AdaptoolError(f"BASE and TUNED differ in architecture: {lost[0]}{more}",
                            "pass --skip-missing to skip such tensors, or --modules to leave them out")
    state.skipped = lost
    state.largest = max([math.prod(w.pairs["weight"].tuned.shape) for w in works if w.lora], default=0)
    if lost:
        state.notes.append(f"{len(lost)} tensor(s) found on one side only or with another shape were skipped")
    return sorted(works, key=lambda w: w.first_read)


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def _classify(module: str, pairs: dict[str, Pair], conv1d_model: bool) -> ModuleWork:
    """A LoRA target: a float 2-D ``weight`` of a module that is not an embedding or head, with at most a 1-D
    ``bias`` besides. Anything else is carried whole when it differs."""
    leaf = module.rpartition(".")[2]
    weight = pairs.get("weight")
    lora = (
        weight is not None and module != ""
        and len(weight.base.shape) == 2 and len(weight.tuned.shape) == 2
        and weight.base.dtype in FLOAT_CODES and weight.tuned.dtype in FLOAT_CODES
        and "embed" not in leaf and leaf not in EMBEDDING_LEAVES
        and set(pairs) <= {"weight", "bias"}
        and all(len(p.base.shape) == 1 == len(p.tuned.shape) for k, p in pairs.items() if k == "bias")
    )
    return ModuleWork(module, pairs, lora, conv1d=lora and conv1d_model and leaf in CONV1D_LEAVES)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors: the same bytes, or (dtypes differing) the same values."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return torch.equal(a.double(), b.double())


def _finite(x: torch.Tensor) -> bool:
    return not x.is_floating_point() or all_finite(x)


def _blame_non_finite(pair: Pair) -> None:
    """Name the side whose tensor holds a NaN or Inf (called once a difference came out non-finite)."""
    for side, info in (("BASE", pair.base), ("TUNED", pair.tuned)):
        if not _finite(load_tensor(info)):
            raise AdaptoolError(f"tensor {pair.name} of {side} contains NaN or Inf", "repair the checkpoint")
    raise AdaptoolError(f"the difference of tensor {pair.name} overflows float32", "check the checkpoints")


def _pair_blocks(pair: Pair, workspace: Workspace):
    """``(start, stop, base rows, tuned rows)`` of two same-shaped tensors, read in row blocks of about
    ``BLOCK_ELEMS`` elements into the workspace's two buffers (each block is a view: use it before the next)."""
    b_info, t_info = pair.base, pair.tuned
    n_rows = t_info.shape[0] if t_info.shape else 1
    rows = min(n_rows, max(1, BLOCK_ELEMS // max(1, t_info.numel // max(1, n_rows))))
    buf_b, buf_t = workspace.read_buffers(max(1, max(b_info.nbytes, t_info.nbytes) * rows // n_rows))
    with open_regular(b_info.file) as fb, open_regular(t_info.file) as ft:
        for start in range(0, n_rows, rows):
            stop = min(n_rows, start + rows)
            yield start, stop, read_block(fb, b_info, start, stop, buf_b), read_block(ft, t_info, start, stop, buf_t)


def _differs(pair: Pair, workspace: Workspace) -> bool:
    return (pair.base.shape != pair.tuned.shape
            or any(not _same(b, t) for _, _, b, t in _pair_blocks(pair, workspace)))


def weight_delta(pair: Pair, device, state: Extraction) -> tuple[torch.Tensor, bool]:
    """``(W_tuned - W_base, whether it is non-zero)``, in float32 on ``device``, built a row block at a time
    (neither whole input is ever in memory) into the workspace's buffer; checked finite."""
    D = state.workspace.delta_for(tuple(pair.tuned.shape), device, state.largest)
    for start, stop, b, t in _pair_blocks(pair, state.workspace):
        rows = D[start:stop]
        rows.copy_(t)
        rows.sub_(b.to(device))
    total = D.sum(dtype=torch.float32)
    if not bool(torch.isfinite(total)) and not bool(torch.isfinite(D).all()):
        _blame_non_finite(pair)  # finite inputs give a finite difference; a NaN or Inf in either shows in it
    return D, bool(total != 0) or bool(D.any())


def _lora_module(work: ModuleWork, state: Extraction) -> Computed:
    """One LoRA target: ΔW truncated by the rule, factors under PEFT's names (and ``lora_B.bias`` when the bias
    changed); nothing when neither weight nor bias differs."""
    weight, bias = work.pairs["weight"], work.pairs.get("bias")
    key = PEFT_PREFIX + work.module
    shape = weight.tuned.shape[::-1] if work.conv1d else weight.tuned.shape  # (out, in)
    dtype = state.dtype_of(weight.tuned)

    def produce(device):
        bias_delta = _bias_delta(bias, device) if bias is not None else None
        D, changed = weight_delta(weight, device, state)
        if bias_delta is None and not changed:
            return {}, None
        if work.conv1d:
            D = D.T  # Conv1D stores (in, out); the LoRA's ΔW is (out, in), applied with fan_in_fan_out
        cut = truncate_dense(D, state.rule, seed=zlib.crc32(work.module.encode()))
        out = {f"{key}.lora_A.weight": cut.A, f"{key}.lora_B.weight": cut.B}
        if bias_delta is not None:
            out[f"{key}.lora_B.bias"] = bias_delta
            state.bias_modules.add(work.module)
        state.fifo = state.fifo or work.conv1d
        state.records[work.module] = {
            "module": work.module, "rank": cut.rank, "shape": list(shape), "energy_kept": cut.energy,
            "error": cut.error, "best_error": cut.best_error, "error_written": _written_error(cut, dtype),
            "method": cut.method, "bias": bias_delta is not None}
        return out, cut.energy

    estimate = _rank_estimate(state.rule) * (shape[0] + shape[1]) * (dtype.itemsize if dtype else 4)
    return Computed(work.module, produce, dtype, nbytes_estimate=estimate)


def _written_error(cut, dtype) -> float:
    """The error of the factors as written (rounded to ``dtype``): the truncation's, and the rounding's on top
    (orthogonal to it, up to second order)."""
    if dtype == torch.float32 or cut.norm == 0.0:
        return cut.error
    return math.sqrt(cut.error ** 2 + (rounding_error(cut.B, cut.A, dtype) / cut.norm) ** 2)


def _bias_delta(pair: Pair, device) -> torch.Tensor | None:
    """``b_tuned - b_base`` in float32, or None when the bias did not change."""
    b, t = load_tensor(pair.base), load_tensor(pair.tuned)
    if _same(b, t):
        return None
    delta = t.to(device=device, dtype=torch.float32) - b.to(device=device, dtype=torch.float32)
    if not _finite(delta):
        _blame_non_finite(pair)
    return delta


def _rank_estimate(rule: RankRule) -> int:
    k = int(rule.value) if rule.kind == "rank" else 16
    return min(k, rule.max_rank or k)


def _carried_module(work: ModuleWork, state: Extraction) -> Computed:
    """A module that is not a LoRA target: all of TUNED's tensors of it, when any differs from BASE (compared in
    row blocks; only then is each read whole)."""

    def produce(device):
        changed = [p for p in work.pairs.values() if _differs(p, state.workspace)]
        if not changed:
            return {}, None
        if work.module == "":
            raise AdaptoolError(f"{changed[0].name} differs, but it is a parameter of the model itself, which a PEFT "
                                "adapter cannot carry", "leave it out with --modules")
        out = {}
        for p in work.pairs.values():
            t = load_tensor(p.tuned)
            if not _finite(t):
                raise AdaptoolError(f"tensor {p.name} of TUNED contains NaN or Inf", "repair the checkpoint")
            out[PEFT_PREFIX + p.name] = t.to(state.dtype_of(p.tuned))
            if p.base.shape != p.tuned.shape:
                state.notes.append(f"{p.name} has shape {list(p.base.shape)} in BASE and {list(p.tuned.shape)} in "
                                   "TUNED: carried whole (adaptool unload applies it and updates vocab_size; PEFT "
                                   "needs the base's embeddings resized to match first)")
        state.carried += [p.name for p in work.pairs.values()]
        state.carried_modules.add(work.module)
        return out, None

    nbytes = sum(p.tuned.nbytes for p in work.pairs.values())
    return Computed(work.module, produce, None, nbytes_estimate=nbytes)


def _zero_biases(works: list[ModuleWork], state: Extraction) -> dict:
    """Runs last. With ``lora_bias`` (some target's bias changed) PEFT gives every target a ``lora_B.bias``:
    write zeros for the targets whose base has an unchanged bias, so PEFT finds every key it expects."""
    if not state.bias_modules:
        return {}
    zeros, bare = {}, []
    for w in works:
        if not w.lora or w.module not in state.records or w.module in state.bias_modules:
            continue
        bias = w.pairs.get("bias")
        if bias is None:
            bare.append(w.module)
            continue
        zeros[f"{PEFT_PREFIX}{w.module}.lora_B.bias"] = torch.zeros(bias.tuned.shape, dtype=state.dtype_of(bias.tuned))
    if bare:
        state.notes.append(f"lora_bias is on, but {len(bare)} target(s) have no bias in the base (e.g. {bare[0]}): "
                           "PEFT loads and runs the adapter, but its merge_and_unload refuses them; adaptool unload "
                           "folds it")
    return zeros


def _task_type(config: dict) -> str | None:
    archs = config.get("architectures") or []
    causal = any(isinstance(a, str) and (a.endswith("ForCausalLM") or a.endswith("LMHeadModel")) for a in archs)
    return "CAUSAL_LM" if causal else None


def _config(state: Extraction, ranks: dict, lora_bias: bool, task: str | None, modules: str | None) -> dict:
    """``adapter_config.json`` once the engine has run; nothing written at all is an error (and nothing is kept)."""
    if not ranks and not state.carried:
        where = f" in the modules --modules {modules!r} selects" if modules else ""
        raise AdaptoolError(f"nothing differs between BASE and TUNED{where}: there is nothing to extract",
                            "check that TUNED is the fine-tuned model")
    if not ranks:
        state.notes.append("no Linear weight differs: the adapter only carries modules_to_save (PEFT refuses an "
                           "adapter without target modules; adaptool unload applies it)")
    return lora_config(ranks, base_model=portable_spec(state.base), task_type=task, lora_bias=lora_bias, fan_in_fan_out=state.fifo,
                       modules_to_save=sorted(state.carried_modules) or None)


def _card(state: Extraction, config: dict) -> str:
    """The model card: inputs by portable name (:mod:`adaptool.output.provenance`), ``base_model:`` only a hub id."""
    ranks = [r["rank"] for r in state.records.values()]
    span = f"rank {min(ranks)}–{max(ranks)}" if ranks else "no LoRA modules"
    base_ckpt, tuned_ckpt = state.checkpoints
    base, tuned = base_name(base_ckpt), base_name(tuned_ckpt)
    hub_id = hub_model_id(portable_spec(state.base), base_ckpt.config.get("_name_or_path"))
    lines = ["---", *([f"base_model: {hub_id}"] if hub_id else []), "library_name: peft", "tags:", "  - adaptool",
             "  - lora", "  - extracted", "---", "", f"# LoRA extracted from {tuned}", "",
             f"Made by [adaptool](https://pypi.org/project/adaptool/) {__version__} with `adaptool extract "
             f"{base} {tuned} {state.rule.describe()}`.", "",
             f"A LoRA of the difference between `{tuned}` and its base `{base}`: each changed Linear "
             f"weight's ΔW truncated to its best rank-k approximation ({len(ranks)} modules, {span}, scaling 1).", ""]
    if config.get("modules_to_save"):
        lines += [f"Carried whole (modules_to_save): {', '.join(config['modules_to_save'])}.", ""]
    return "\n".join(lines)


def _summary(state: Extraction, stats, output, dev, seconds: float) -> dict:
    records = [state.records[m] for m in sorted(state.records)]
    ranks = [r["rank"] for r in records]
    worst = max(records, key=lambda r: r["error"], default=None)
    return {
        "output": str(output), "command": "extract", "base": state.base, "tuned": state.tuned,
        "rule": state.rule.describe(), "device": str(dev), "modules": records,
        "rank_out": [min(ranks), max(ranks)] if ranks else None,
        "error": {"mean": sum(r["error"] for r in records) / len(records), "max": worst["error"],
                  "worst_module": worst["module"],
                  "max_written": max(r["error_written"] for r in records)} if records else None,
        "energy_kept": stats.energy_kept(), "carried": sorted(state.carried), "skipped": list(state.skipped),
        "tensors_written": len(stats.written), "bytes_written": stats.bytes_written, "seconds": seconds,
        "peak_rss_bytes": stats.peak_rss_bytes, "peak_gpu_bytes": stats.peak_gpu_bytes, "notes": list(state.notes),
    }
