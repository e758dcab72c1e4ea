"""kohya / LyCORIS single-file adapters (one ``.safetensors``), presented as if they were PEFT adapters.

A kohya file names each module by its path in the model with ``.`` flattened to ``_`` after a prefix
(``lora_unet_``, ``lora_te_``/``lora_te1_``, ``lora_transformer_``, ``lora_`` …)::

    lora_model_layers_0_self_attn_q_proj.lora_down.weight   (r, in)      -> <path>.lora_A.weight
    lora_model_layers_0_self_attn_q_proj.lora_up.weight     (out, r)     -> <path>.lora_B.weight
    lora_model_layers_0_self_attn_q_proj.alpha              scalar       -> alpha_pattern[<path>]

LyCORIS LoHa (``hada_w1_a`` …) and LoKr (``lokr_w1`` …) modules keep their tensor names. The flattening is
lossy (``self_attn`` holds a ``_`` too), so paths are recovered from the base checkpoint: every ``X.weight``
of the base gives ``X.replace('.', '_') -> X``, and a kohya module must match exactly one of them (also
trying the base prefixes ``model_``/``transformer_``). An unmatched or ambiguous module is an error, never
skipped.

Scale: kohya and LyCORIS use ``alpha / r``, with alpha taken as r when the ``.alpha`` tensor is missing or 0.
LoKr with both factors whole uses scale 1 whatever alpha says (LyCORIS's rule; PEFT would use alpha/r, so
such modules get r = alpha = 1 here). The synthetic config states every module's r and alpha through
``rank_pattern``/``alpha_pattern`` keyed by its exact path, so the PEFT families fold it unchanged.

Orientation: kohya factors are (out, in) like ``nn.Linear``; on a base whose 2-D weights are GPT-2 ``Conv1D``
(stored (in, out)) the synthetic config says ``fan_in_fan_out``, so a square weight is not taken the wrong way.
``alphas`` keeps each module's ``.alpha`` tensor (its dtype and shape), for ``convert`` to give it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptool.adapters.config import AdapterConfig, parse_config
from adaptool.adapters.layout import base_layout
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.io.safetensors_file import TensorInfo, read_header
from adaptool.io.weights_buffer import WeightsBuffer, first_non_finite, non_finite_error

# Prefixes kohya-style trainers put before the flattened module path, most specific first.
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_", "lycoris_", "lora_")
# Prefixes the base's own tensor names may carry or lack (a bare model vs. its *ForCausalLM wrapper).
BASE_PREFIXES = ("model_", "transformer_")

ALPHA = ".alpha"
LORA = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight"}
LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")
LOKR = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
FAMILY = {**{s: "LORA" for s in LORA}, **{s: "LOHA" for s in LOHA}, **{s: "LOKR" for s in LOKR}}
# Known kohya/LyCORIS tensors whose merge adaptool does not implement: suffix -> what it is.
REFUSED = {
    ".lora_mid.weight": "a LoCon module with a CP-decomposed conv (lora_mid)",
    ".dora_scale": "a LyCORIS DoRA module (dora_scale)",
    ".lokr_t1": "a LoKr module with a CP-decomposed w1 (lokr_t1)",
    ".diff": "a full-difference module (diff)",
    ".diff_b": "a full-difference bias (diff_b)",
    ".w_norm": "a norm module (w_norm)",
    ".b_norm": "a norm module (b_norm)",
    ".oft_blocks": "a (B)OFT module (oft_blocks)",
    ".oft_diag": "a Diag-OFT module (oft_diag)",
    ".on_input": "an IA3 module (on_input)",
}


@dataclass
class KohyaAdapter:
    """One kohya/LyCORIS file as an :class:`~adaptool.adapters.source.Adapter`, like a PEFT folder.

    The file is read once, on first use (the ``.alpha`` tensors when it is opened, or :meth:`load`,
    :meth:`sha256`, :meth:`check_finite`), into one buffer that all of them use.

    Attributes:
        source (str): what the user wrote, for messages and provenance.
        root (Path): the folder holding the file.
        config (dict): a synthetic PEFT config (peft_type, per-module rank_pattern/alpha_pattern).
        weights (Path): the file.
        infos (dict[str, TensorInfo]): tensors by PEFT-style name (base module path + PEFT suffix).
        modules (dict[str, str]): kohya module name -> base module path.
        settings (AdapterConfig): ``config`` parsed (source: the file).
        alphas (dict[str, TensorInfo]): base module path -> its ``.alpha`` tensor (modules without one absent).
    """

    source: str
    root: Path
    config: dict
    weights: Path
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    settings: AdapterConfig | None = field(default=None, repr=False, compare=False)
    alphas: dict[str, TensorInfo] = field(default_factory=dict, repr=False, compare=False)
    buffer: WeightsBuffer | None = field(default=None, repr=False, compare=False)
    _non_finite: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.settings is None:
            self.settings = parse_config(self.config, self.source)
        if self.buffer is None:
            self.buffer = WeightsBuffer(self.weights)

    @property
    def input_path(self) -> Path:
        """What the user gave: the file (the folder around it may hold anything)."""
        return self.weights

    @property
    def peft_type(self) -> str:
        return self.settings.peft_type

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (a copy out of the file's buffer: the caller may change it)."""
        return self.buffer.tensor(self.infos[name])

    def view(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored, viewing the file's buffer (read it, never change it)."""
        return self.buffer.view(self.infos[name])

    def sha256(self) -> str:
        """Hex digest of the file's bytes."""
        return self.buffer.sha256()

    def sha256_soon(self) -> None:
        self.buffer.sha256_soon()

    def check_finite(self, names=None) -> None:
        """Refuse a file with NaN/Inf in any tensor (of ``names`` when given), naming the first (from the same
        buffer; all of them checked once).

        Raises:
            AdaptoolError: ``<source>: tensor <name> contains NaN or Inf``.
        """
        if names is not None:
            bad = first_non_finite((n, self.buffer.view(self.infos[n])) for n in names)
            if bad:
                raise non_finite_error(self.source, bad)
            return
        if self._non_finite is None:
            self._non_finite = first_non_finite((n, self.buffer.view(self.infos[n])) for n in self.names) or ""
        if self._non_finite:
            raise non_finite_error(self.source, self._non_finite)


def kohya_file(path: Path) -> Path | None:
    """The kohya/LyCORIS file ``path`` stands for, or None when it is not one.

    A ``.safetensors`` file is always taken as one (and refused later if its keys are not). A folder
    counts only when it has no ``adapter_config.json`` and holds exactly one ``.safetensors`` file whose
    keys look like kohya/LyCORIS keys.
    """
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if not path.is_dir() or (path / "adapter_config.json").exists():
        return None
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1 and looks_kohya(found[0]):
        return found[0]
    return None


def looks_kohya(path: Path) -> bool:
    """Whether a ``.safetensors`` file has kohya/LyCORIS keys (header only)."""
    try:
        infos, _ = read_header(Path(path))
    except AdaptoolError:
        return False
    return any(_split(k)[1] in FAMILY for k in infos)


def open_kohya(path: Path, base: Checkpoint | None, source: str | None = None) -> KohyaAdapter:
    """Read a kohya/LyCORIS file and map its modules onto ``base`` (a :class:`~adaptool.io.checkpoint.Checkpoint`).

    Raises:
        AdaptoolError: no base given; keys adaptool cannot read; a module that matches no base module or
            several; a module with missing or malformed tensors; modules of more than one family.
    """
    path = Path(path)
    source = source or str(path)
    if base is None:
        raise AdaptoolError(f"{source}: a kohya/LyCORIS file names its modules only by flattened paths, "
                            "so adaptool needs the base model to map them",
                            "give the base model first: adaptool unload BASE+ADAPTER")
    infos, _ = read_header(path)
    groups = _group(source, infos)
    families = {fam for _, fam in groups.values()}
    if len(families) > 1:
        raise AdaptoolError(f"{source}: mixes {' and '.join(sorted(families))} modules in one file",
                            "adaptool reads one adapter family per file; split the file by family")
    family = families.pop()
    buffer = WeightsBuffer(path)
    table = _module_table(base)
    modules: dict[str, str] = {}
    seen: dict[str, str] = {}
    for kname in groups:
        target = _map_module(source, kname, table)
        if target in seen:
            raise AdaptoolError(f"{source}: modules {seen[target]} and {kname} both map to {target} of the base",
                                "remove the duplicate module from the file")
        seen[target], modules[kname] = kname, target
    config, renamed = _config(source, family, groups, modules, buffer)
    if base_layout(base) is True:  # kohya factors are (out, in); a GPT-2 Conv1D base stores its weights (in, out)
        config["fan_in_fan_out"] = True
    alphas = {modules[k]: tensors[ALPHA] for k, (tensors, _) in groups.items() if ALPHA in tensors}
    return KohyaAdapter(source, path.parent, config, path, renamed, modules, buffer=buffer, alphas=alphas)


def _split(key: str) -> tuple[str, str]:
    """``module.suffix.with.dots`` -> (module, ``.suffix.with.dots``); kohya module names hold no dot."""
    module, dot, rest = key.partition(".")
    return module, dot + rest


def _group(source: str, infos: dict[str, TensorInfo]) -> dict[str, tuple[dict[str, TensorInfo], str]]:
    """``{kohya module: ({suffix: info}, family)}`` in file order; refuses keys adaptool cannot read."""
    if any(".lora_A." in k or ".lora_B." in k for k in infos):
        raise AdaptoolError(f"{source}: holds PEFT tensors (lora_A/lora_B), not kohya/LyCORIS ones",
                            "point at the PEFT adapter's folder (with adapter_config.json) instead of its weights file")
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in infos.items():
        module, suffix = _split(key)
        if suffix in REFUSED:
            raise AdaptoolError(f"{source}: {key} belongs to {REFUSED[suffix]}, which adaptool cannot fold yet",
                                "supported in kohya/LyCORIS files: LoRA/LoCon (lora_down/lora_up), LoHa, LoKr")
        if suffix not in FAMILY and suffix != ALPHA:
            if not any(_split(k)[1] in FAMILY for k in infos):
                raise AdaptoolError(f"{source}: no kohya/LyCORIS adapter keys (first key: {key})",
                                    "give a kohya/LyCORIS file (keys like lora_unet_….lora_down.weight, "
                                    "….hada_w1_a, ….lokr_w1) or a PEFT adapter folder")
            raise AdaptoolError(f"{source}: key {key} is not a kohya/LyCORIS tensor adaptool can read",
                                "remove it from the file, or convert the adapter to PEFT format")
        groups.setdefault(module, {})[suffix] = info
    if not any(s in FAMILY for g in groups.values() for s in g):
        raise AdaptoolError(f"{source}: no kohya/LyCORIS adapter keys", "give a kohya/LyCORIS file or a PEFT adapter folder")
    out = {}
    for module, tensors in groups.items():
        fams = {FAMILY[s] for s in tensors if s in FAMILY}
        if not fams:
            raise AdaptoolError(f"{source}: {module}.alpha has no adapter tensors beside it",
                                "the file is incomplete; re-save it")
        if len(fams) > 1:
            raise AdaptoolError(f"{source}: module {module} mixes {' and '.join(sorted(fams))} tensors",
                                "the file is inconsistent; re-save it")
        out[module] = (tensors, fams.pop())
    return out


def _module_table(base: Checkpoint) -> dict[str, list[str]]:
    """``flattened path -> [module paths]`` for every ``X.weight`` of the base (several where flattening collides)."""
    table: dict[str, list[str]] = {}
    for name in base.tensors:
        if name.endswith(".weight"):
            path = name[: -len(".weight")]
            table.setdefault(path.replace(".", "_"), []).append(path)
    return table


def _map_module(source: str, kname: str, table: dict[str, list[str]]) -> str:
    """The base module path of kohya module ``kname``: the most specific prefix that yields a match wins;
    more than one match under it is ambiguous."""
    for prefix in PREFIXES:
        if not kname.startswith(prefix):
            continue
        flat = kname[len(prefix):]
        found: list[str] = []
        for cand in _candidates(flat):
            for path in table.get(cand, ()):
                if path not in found:
                    found.append(path)
        if len(found) == 1:
            return found[0]
        if found:
            raise AdaptoolError(f"{source}: kohya module {kname} could be any of {', '.join(found)} in the base",
                                "rename the module in the file, or convert the adapter to PEFT format")
    raise AdaptoolError(f"{source}: kohya module {kname} matches no module of the base model",
                        "check that the adapter was made for this base; adaptool maps <prefix><module path with "
                        "'.' as '_'> (prefixes lora_unet_, lora_te_, lora_transformer_, lora_ …) onto the base's weights")


def _candidates(flat: str):
    """The base names a flattened path may stand for: itself, with a base prefix added, with one dropped."""
    yield flat
    for p in BASE_PREFIXES:
        yield p + flat
        if flat.startswith(p):
            yield flat[len(p):]


def _config(source, family, groups, modules, buffer: WeightsBuffer) -> tuple[dict, dict[str, TensorInfo]]:
    """The synthetic PEFT config and the tensors under PEFT names (``buffer``: the file, for the alphas)."""
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    renamed: dict[str, TensorInfo] = {}
    for kname, (tensors, _) in groups.items():
        path = modules[kname]
        r, whole = _rank(source, family, kname, tensors)
        if r < 1:
            raise AdaptoolError(f"{source}: {kname} has rank {r}", "the file is inconsistent; re-save it")
        alpha = _alpha(source, kname, tensors.get(ALPHA), buffer)
        if alpha is None or alpha == 0:  # kohya and LyCORIS: no alpha (or 0) means alpha = r, scale 1
            alpha = r
        if whole:  # LyCORIS LoKr with both factors whole: scale 1 whatever alpha says
            r, alpha = 1, 1
        ranks[path], alphas[path] = r, alpha
        for suffix, info in tensors.items():
            if suffix != ALPHA:
                renamed[path + LORA.get(suffix, suffix)] = info
    # Patterns are regexes matched at a dot boundary, first match wins: longest paths first, so a module's
    # own (escaped) path is met before any shorter path that happens to be its dotted suffix.
    order = sorted(ranks, key=len, reverse=True)
    rank_pattern = {re.escape(p): ranks[p] for p in order}
    alpha_pattern = {re.escape(p): alphas[p] for p in order}
    first = order[0]
    config = {"peft_type": family, "r": ranks[first], "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "lora_alpha" if family == "LORA" else "alpha": alphas[first], "format": "kohya"}
    return config, renamed


def _rank(source, family, kname, tensors) -> tuple[int, bool]:
    """(r as kohya/LyCORIS take it, whether a LoKr module has both factors whole)."""
    shape = lambda s: tensors[s].shape  # noqa: E731
    if family == "LORA":
        for s in LORA:
            if s not in tensors:
                raise AdaptoolError(f"{source}: {kname} has no {kname}{s}", "the file is incomplete; re-save it")
        down, up = shape(".lora_down.weight"), shape(".lora_up.weight")
        if len(down) < 2 or len(up) < 2 or up[1] != down[0]:
            raise AdaptoolError(f"{source}: {kname} has lora_down {tuple(down)} and lora_up {tuple(up)}, which do not fit",
                                "the file is inconsistent; re-save it")
        return down[0], False
    if family == "LOHA":
        if ".hada_w1_a" not in tensors:
            raise AdaptoolError(f"{source}: {kname} has no {kname}.hada_w1_a", "the file is incomplete; re-save it")
        a = shape(".hada_w1_a")
        if len(a) != 2:
            raise AdaptoolError(f"{source}: {kname}.hada_w1_a has shape {tuple(a)}", "the file is inconsistent; re-save it")
        return (a[0] if ".hada_t1" in tensors else a[1]), False  # CP cores: w1_a is (r, out)
    for suffix, axis in ((".lokr_w1_a", -1), (".lokr_t2", 0), (".lokr_w2_a", -1)):
        if suffix in tensors:
            if len(shape(suffix)) < 2:
                raise AdaptoolError(f"{source}: {kname}{suffix} has shape {tuple(shape(suffix))}",
                                    "the file is inconsistent; re-save it")
            return shape(suffix)[axis], False
    return 1, True


def _alpha(source, kname, info: TensorInfo | None, buffer: WeightsBuffer) -> float | None:
    """The value of a module's ``.alpha`` tensor (one finite number of any shape), None when it has none."""
    if info is None:
        return None
    t = buffer.view(info)
    number = t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8)
    if t.numel() != 1 or not number:
        raise AdaptoolError(f"{source}: {kname}.alpha has shape {tuple(t.shape)} and dtype {t.dtype}, not one number",
                            "the file is inconsistent; re-save it")
    value = float(t.reshape(-1)[0].item())
    if value != value or value in (float("inf"), float("-inf")):
        raise AdaptoolError(f"{source}: {kname}.alpha is {value}", "the adapter is broken; retrain or re-export it")
    return value
