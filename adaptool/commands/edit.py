"""``edit``: keep or drop an adapter's modules and scale their ΔW, writing the same adapter type back.

Modules are chosen by regexes ``re.search``-ed in the base module name (``model.layers.3.self_attn.q_proj``):
with ``--keep`` rules a module is kept when one of them matches (a union) and no ``--drop`` does; without, when
no ``--drop`` does. ``--scale [REGEX=]X`` multiplies a kept module's ΔW by X, the first rule that matches
deciding (``REGEX=X`` is split at the last ``=``; a bare ``X`` matches every module; negative X allowed, 0 not:
use ``--drop``).

Nothing is recomputed: every kept tensor is copied bit for bit, and a scale is written into the config, where
PEFT reads it. LoRA's ΔW is ``alpha/r·B·A`` (rsLoRA: ``alpha/sqrt(r)·B·A``), LoHa's and LoKr's
``alpha/r·…``: all linear in alpha, so a module's ΔW times X is the same factors with alpha times X. The
output's ``alpha_pattern`` is rewritten with one exact entry (the module's full path) per kept module whose
alpha differs from the global ``lora_alpha``/``alpha`` (set to the most common one), the input's own entries
resolved by PEFT's first-match rule (:mod:`adaptool.adapters.patterns`) first; ``rank_pattern`` is left as
written. The rewritten config is parsed back and every kept module's rank and alpha checked before anything is
written.

Refused with one line: ``--scale`` on a DoRA module (its magnitude renormalises the weight, so its effect is not
linear in alpha), on IA3 (it scales the weight; there is no ΔW), OFT (a rotation) and AdaLoRA (one global alpha,
divided by a rank PEFT tracks) modules; a scale of 0; no module left; a bad regex; kohya files and LoRA variants.

Dropping a module removes its tensors, and ``target_modules`` becomes the list of kept modules' full paths
(IA3's ``feedforward_modules`` the kept feedforward ones; AdaLoRA's ``rank_pattern`` keeps the kept modules'
masks), so PEFT loads the output without missing keys. ``modules_to_save`` copies and trainable tokens are kept
unless a ``--drop`` regex matches their module's name (``--keep`` does not select them); saved base-layer tensors
(``bias: all``/``lora_only``) are always carried.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adaptool.adapters import family
from adaptool.adapters.common import module_keys
from adaptool.adapters.config import MAX_PATTERN_CHARS, parse_config
from adaptool.adapters.ia3 import is_feedforward
from adaptool.adapters.lora import lora_modules
from adaptool.adapters.notes import collected_notes
from adaptool.adapters.saved import BASE_LAYER, TOKENS_SUFFIX
from adaptool.device import resolve_device
from adaptool.engine import execute
from adaptool.errors import AdaptoolError
from adaptool.io.inputs import input_paths, open_adapter
from adaptool.io.kohya import kohya_file
from adaptool.output.adapter_folder import PEFT_PREFIX
from adaptool.output.provenance import adapter_name, metadata, model_card
from adaptool.output.target import preflight
from adaptool.plan import Computed
from adaptool.plan.adapter import lora_adapter_plan

#: the families whose ΔW is linear in an alpha that PEFT reads per module (``alpha_pattern``), and its global key
ALPHA_KEYS = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}
NOT_SCALABLE = {"IA3": "IA3 multiplies the weight by learned vectors: there is no ΔW to scale",
                "OFT": "OFT rotates the weight: its change is not linear in a scalar",
                "ADALORA": "AdaLoRA has one global alpha, divided by a rank PEFT tracks: no per-module scale"}


@dataclass(frozen=True)
class ScaleRule:
    """``--scale [REGEX=]X``: ``pattern`` None matches every module."""

    text: str
    pattern: re.Pattern | None
    value: float

    def matches(self, path: str) -> bool:
        return self.pattern is None or self.pattern.search(path) is not None


@dataclass
class Module:
    """One adapted module: its tensors, and (LoRA) whether it is a DoRA module."""

    path: str
    tensors: list[str]
    dora: bool = False


@dataclass
class Choice:
    """What the rules decided: kept and dropped modules, the scale of each scaled one, saved tensors dropped."""

    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)
    saved_dropped: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def edit(
    adapter: str,
    output: str | Path,
    *,
    keep: list[str] | tuple = (),
    drop: list[str] | tuple = (),
    scale: list[str] | tuple = (),
    force: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Keep/drop ``adapter``'s modules and scale their ΔW; write the same adapter type to ``output``.

    Args:
        adapter (str): a PEFT adapter folder or hub id (LoRA incl. rsLoRA/DoRA, LoHa, LoKr, IA3, AdaLoRA, OFT).
        output (str | Path): the output folder (created atomically).
        keep (list[str]): regexes; a module is kept only if one matches (none given: every module is).
        drop (list[str]): regexes; a module (or saved module) one of them matches is dropped.
        scale (list[str]): ``"REGEX=X"`` or ``"X"`` rules, first match wins (``(regex, x)`` pairs work too).
        force (bool): replace a non-empty output folder.
        on_start, on_progress: progress callbacks (units: bytes).

    Returns:
        dict: a summary: modules kept, dropped and scaled, saved modules dropped, rules that matched nothing.

    Example:
        >>> edit("my-lora", "lora-early", keep=[r"layers\\.[0-3]\\."], scale=["mlp=0.5"])  # doctest: +SKIP
    """
    start = time.perf_counter()
    keeps = [_regex("--keep", k) for k in _as_list(keep)]
    drops = [_regex("--drop", d) for d in _as_list(drop)]
    scales = [parse_scale(s) for s in _as_list(scale)]
    if Path(adapter).expanduser().exists() and kohya_file(Path(adapter).expanduser()) is not None:
        raise AdaptoolError(f"{adapter}: edit takes PEFT adapter folders, and this is a kohya/LyCORIS file",
                            "convert it first: adaptool convert FILE -o FOLDER --to peft --base BASE")
    preflight(output, force, [adapter] if Path(adapter).expanduser().exists() else [])
    with collected_notes() as notes:
        folder = open_adapter(adapter)
        inputs = input_paths(None, [folder])
        preflight(output, force, inputs)
        folder.check_finite()
        modules = _modules(folder)
        choice = choose(folder, modules, keeps, drops, scales)
        config = edited_config(folder, modules, choice)
    computed = [_copied(folder, modules[p].tensors, p) for p in choice.kept]
    computed.append(_copied(folder, _saved_kept(folder, modules, choice), "saved tensors"))
    meta = metadata("edit", None, [folder], {"keep": [k.pattern for k in keeps], "drop": [d.pattern for d in drops],
                                              "scale": [s.text for s in scales]})
    command = "adaptool edit " + " ".join([adapter_name(folder), *(f"--keep '{k.pattern}'" for k in keeps),
                                           *(f"--drop '{d.pattern}'" for d in drops),
                                           *(f"--scale '{s.text}'" for s in scales)])
    plan = lora_adapter_plan(computed, meta, config=lambda ranks, lora_bias: config,
                             card=lambda cfg: model_card(f"{adapter_name(folder)} edited", command, [folder],
                                                         base_model=cfg.get("base_model_name_or_path")), inputs=inputs)
    stats = execute(plan, Path(output), force, resolve_device("cpu"), on_start, on_progress)
    return {"output": str(output), "command": "edit", "adapter": adapter, "peft_type": folder.peft_type,
            "kept": choice.kept, "dropped": choice.dropped, "scaled": choice.scales,
            "saved_dropped": choice.saved_dropped, "unmatched_rules": choice.unmatched,
            "tensors_total": stats.tensors_total, "tensors_changed": 0, "bytes_written": stats.bytes_written,
            "peak_rss_bytes": stats.peak_rss_bytes, "notes": [*notes, *_notes(modules, choice)],
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------- rules


def _as_list(rules) -> list:
    """One rule (a string) or a list of them."""
    return [rules] if isinstance(rules, str) else list(rules or ())


def _regex(flag: str, text: str) -> re.Pattern:
    """A user's regex, compiled (one line naming it when it is not one)."""
    if not isinstance(text, str) or not text:
        raise AdaptoolError(f"{flag} needs a regex, got {text!r}", f"e.g. {flag} 'layers\\.[0-3]\\.'")
    if len(text) > MAX_PATTERN_CHARS:
        raise AdaptoolError(f"{flag} regex is {len(text)} characters long (the limit is {MAX_PATTERN_CHARS})",
                            "shorten it")
    try:
        return re.compile(text)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdaptoolError(f"{flag} {text!r} is not a valid regex ({e})",
                            "fix the regex (Python re syntax; quote it in the shell)") from None


def parse_scale(rule) -> ScaleRule:
    """``"REGEX=X"`` (split at the last ``=``), a bare ``"X"`` (every module), or a ``(regex | None, x)`` pair.

    Raises:
        AdaptoolError: X not a finite number, X = 0, an empty regex before ``=``, a bad regex.
    """
    if isinstance(rule, tuple) and len(rule) == 2:
        pattern, value = rule
        text = f"{pattern}={value}" if pattern is not None else str(value)
    elif isinstance(rule, str):
        text = rule
        pattern, eq, value = rule.rpartition("=")
        if not eq:
            pattern = None
        elif not pattern:
            raise AdaptoolError(f"--scale {rule!r} has an empty regex before '='",
                                "write just the number to scale every module, e.g. --scale 0.5")
    else:
        raise AdaptoolError(f"--scale must be 'REGEX=X' or 'X', got {rule!r}", "e.g. --scale 'mlp=0.5'")
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise AdaptoolError(f"--scale {text!r}: {str(value)[:40]!r} is not a finite number",
                            "write REGEX=X with a number X, e.g. --scale 'layers\\.0\\.=0.5' (split at the last '=')")
    if x == 0:
        raise AdaptoolError(f"--scale {text!r} scales by 0, which would leave nothing of those modules",
                            "drop them instead: --drop REGEX")
    return ScaleRule(text, None if pattern is None else _regex("--scale", pattern), x)


# ------------------------------------------------------------------------------------------------- modules


def _modules(folder) -> dict[str, Module]:
    """The adapter's modules by path, each with its own tensors (LoRA: A, B, bias, DoRA magnitude)."""
    kind = folder.peft_type
    fam = family(kind, folder.source)
    if kind == "LORA":
        found = {m.path: Module(m.path, [k for k in (m.a_key, m.b_key, m.bias_key, m.magnitude_key) if k],
                                dora=m.magnitude_key is not None) for m in lora_modules(folder)}
    else:
        found = {p: Module(p, list(keys.values())) for p, keys in module_keys(folder, fam.own).items()}
    if not found:
        raise AdaptoolError(f"{folder.source}: the adapter has no {kind} module",
                            "the adapter is incomplete; re-save it")
    return found


def choose(folder, modules: dict[str, Module], keeps: list, drops: list, scales: list[ScaleRule]) -> Choice:
    """Apply the rules: which modules stay, the scale of each (first match), which saved modules go."""
    c = Choice()
    for path in modules:
        kept = (not keeps or any(k.search(path) for k in keeps)) and not any(d.search(path) for d in drops)
        (c.kept if kept else c.dropped).append(path)
    if not c.kept:
        raise AdaptoolError(f"{folder.source}: the rules leave no module of the adapter ({len(modules)} dropped)",
                            "loosen --keep/--drop: check the regexes against `adaptool inspect` module names")
    for path in c.kept:
        rule = next((s for s in scales if s.matches(path)), None)
        if rule is not None and rule.value != 1.0:
            _check_scalable(folder, modules[path], rule)
            c.scales[path] = rule.value
    saved = _saved_modules(folder)
    c.saved_dropped = sorted(p for p in saved if any(d.search(p) for d in drops))
    every = list(modules) + list(saved)
    c.unmatched = [f"--keep {k.pattern!r}" for k in keeps if not any(k.search(p) for p in modules)]
    c.unmatched += [f"--drop {d.pattern!r}" for d in drops if not any(d.search(p) for p in every)]
    c.unmatched += [f"--scale {s.text!r}" for s in scales if not any(s.matches(p) for p in c.kept)]
    return c


def _check_scalable(folder, module: Module, rule: ScaleRule) -> None:
    kind = folder.peft_type
    if kind in NOT_SCALABLE:
        raise AdaptoolError(f"{folder.source}: --scale {rule.text!r} matches {module.path}, but {NOT_SCALABLE[kind]}",
                            "keep or drop its modules instead")
    if module.dora:
        raise AdaptoolError(f"{folder.source}: --scale {rule.text!r} matches the DoRA module {module.path}: its "
                            "magnitude renormalises the weight, so scaling alpha does not scale its effect",
                            "keep or drop DoRA modules; scale plain LoRA modules only")


def _saved_modules(folder) -> dict[str, list[str]]:
    """modules_to_save copies and trainable tokens by module path (what ``--drop`` may remove by name)."""
    fam, s = family(folder.peft_type, folder.source), folder.settings
    found: dict[str, list[str]] = {}
    for name in folder.names:
        if fam.is_own(name):
            continue
        if name.endswith(TOKENS_SUFFIX):
            found.setdefault(name[: -len(TOKENS_SUFFIX)], []).append(name)
            continue
        path = name.rpartition(".")[0]
        if path.endswith(BASE_LAYER[:-1]):
            continue  # a saved base layer (bias: all / lora_only): carried as it is
        if any(path.endswith(m) for m in s.modules_to_save or ()):
            found.setdefault(path, []).append(name)
    return found


def _saved_kept(folder, modules: dict[str, Module], choice: Choice) -> list[str]:
    """Every tensor that is no module's own and not of a dropped saved module."""
    fam = family(folder.peft_type, folder.source)
    dropped = {n for p in choice.saved_dropped for n in _saved_modules(folder)[p]}
    return [n for n in folder.names if not fam.is_own(n) and n not in dropped]


def _copied(folder, names: list[str], label: str) -> Computed:
    """Tensors copied as stored (dtype, shape and bytes), under PEFT's names."""
    nbytes = sum(math.prod(folder.shape(n)) for n in names) * 4
    return Computed(label, lambda device: ({PEFT_PREFIX + n: folder.load(n) for n in names}, None),
                    nbytes_estimate=nbytes)


# -------------------------------------------------------------------------------------------------- config


def edited_config(folder, modules: dict[str, Module], choice: Choice) -> dict:
    """The input's ``adapter_config.json`` (as written) with the targets, saved modules and patterns the choice
    needs; every kept module's rank and alpha checked by parsing it back."""
    raw = json.loads(json.dumps(folder.config))
    s = folder.settings
    if choice.dropped:
        raw["target_modules"] = sorted(choice.kept)
        if folder.peft_type == "IA3" and s.feedforward_modules is not None:
            raw["feedforward_modules"] = sorted(p for p in choice.kept if is_feedforward(
                folder, p, folder.shape(modules[p].tensors[0])))
        if folder.peft_type == "ADALORA" and raw.get("rank_pattern"):
            raw["rank_pattern"] = {k: v for k, v in raw["rank_pattern"].items() if _mask_module(k) in choice.kept}
    if choice.saved_dropped:
        _drop_saved(raw, folder, choice)
    if choice.scales:
        for escape in (False, True):
            _write_alphas(raw, folder, choice, escape)
            if _patterns_hold(raw, folder, choice):
                break
        else:
            raise AdaptoolError(f"{folder.source}: could not write alpha_pattern entries that PEFT resolves to each "
                                "module alone", "report this as a bug, with the module names")
    return raw


def _mask_module(key: str) -> str:
    """The module path of an AdaLoRA ``rank_pattern`` key (``<module>.lora_E``, maybe with an adapter name after)."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return key.rsplit(".lora_E", 1)[0]


def _drop_saved(raw: dict, folder, choice: Choice) -> None:
    """Remove dropped saved modules from ``modules_to_save`` (kept ones by full path) and trainable tokens."""
    saved = _saved_modules(folder)
    gone = set(choice.saved_dropped)
    copies = [p for p in saved if not all(n.endswith(TOKENS_SUFFIX) for n in saved[p])]
    if any(p in gone for p in copies):
        kept = sorted(p for p in copies if p not in gone)
        raw["modules_to_save"] = kept or None
    tokens = raw.get("trainable_token_indices")
    token_paths = [p for p in gone if any(n.endswith(TOKENS_SUFFIX) for n in saved[p])]
    if token_paths and isinstance(tokens, dict):
        left = {k: v for k, v in tokens.items() if not any(p == k or p.endswith("." + k) for p in token_paths)}
        raw["trainable_token_indices"] = left or None
    elif token_paths:
        raw["trainable_token_indices"] = None


def _write_alphas(raw: dict, folder, choice: Choice, escape: bool) -> None:
    """``alpha_pattern`` with one entry per kept module whose alpha (times its scale) is not the global one; the
    global one becomes the most common such alpha (the input's own when it ties)."""
    s, key = folder.settings, ALPHA_KEYS[folder.peft_type]
    alphas = {p: s.alpha_for(p) * choice.scales[p] if p in choice.scales else s.alpha_for(p) for p in choice.kept}
    counts = Counter(alphas.values())
    top = max(counts.values())
    current = raw.get(key, s.alpha if folder.peft_type != "LORA" else s.lora_alpha)
    glob = current if counts.get(current) == top else next(a for a in alphas.values() if counts[a] == top)
    raw[key] = glob
    raw["alpha_pattern"] = {(re.escape(p) if escape else p): a for p, a in sorted(alphas.items()) if a != glob}


def _patterns_hold(raw: dict, folder, choice: Choice) -> bool:
    """Whether PEFT, reading ``raw`` (keys in the sorted order the file will have), gives every kept module its
    input rank and its scaled alpha."""
    written = json.loads(json.dumps(raw, sort_keys=True))
    parsed = parse_config(written, f"{folder.source} (edited config)")
    s = folder.settings
    for p in choice.kept:
        want = s.alpha_for(p) * choice.scales[p] if p in choice.scales else s.alpha_for(p)
        if parsed.rank_for(p) != s.rank_for(p) or parsed.alpha_for(p) != want:
            return False
    return True


def _notes(modules: dict[str, Module], choice: Choice) -> list[str]:
    lines = [f"kept {len(choice.kept)} of {len(modules)} modules, factors copied bit for bit"
             + (f"; {len(choice.scales)} scaled through alpha_pattern" if choice.scales else "")]
    if choice.saved_dropped:
        lines.append("dropped saved modules: " + ", ".join(choice.saved_dropped))
    lines += [f"{rule} matched no module" for rule in choice.unmatched]
    return lines
