"""The typed adapter config: ``adapter_config.json`` parsed once, with PEFT 0.21.2's defaults in one place.

Every key an adapter family reads is checked here, so a hostile or mistyped config fails with one line naming
the key and the file, instead of deep inside the maths (or, worse, meaning something else: ``"use_dora":
"false"`` is a true string to PEFT). The rules follow what PEFT itself could load:

* integers are JSON integers, never booleans or strings (``"r": "8"`` and ``"r": true`` are refused; PEFT fails
  on them too); ranks are positive; every number is finite;
* switches (``use_dora``, ``fan_in_fan_out`` …) are JSON booleans; ``null`` reads as false, as PEFT's truth
  test reads it;
* ``rank_pattern``/``alpha_pattern`` map strings to a positive integer rank / a finite alpha (AdaLoRA's
  ``rank_pattern`` maps ``<module>.lora_E`` to a boolean mask instead);
* ``trainable_token_indices`` is a list of non-negative integers or a map of module names to such lists.

Only the keys of the adapter's own family are checked (an unsupported ``peft_type`` is refused later, by
name). Keys adaptool does not read are left alone: PEFT configs carry many.

Bounds, so that nothing a config says can hang a run:

* regexes (``target_modules`` as a string, ``rank_pattern``/``alpha_pattern`` keys, ``layers_pattern``,
  IA3's ``feedforward_modules``) must compile and be at most ``MAX_PATTERN_CHARS`` long; the module names
  they are matched against are at most ``MAX_NAME_CHARS`` (Python's ``re`` can still backtrack badly on a
  pathological pattern, but only over a short subject);
* OFT's ``num_cayley_neumann_terms`` is at most ``MAX_NEUMANN_TERMS``. PEFT loops once per term; the series
  ``I + 2Q + 2Q² + …`` converges only while ‖Q‖ < 1, so extra terms are not harmless in general, and no
  trained adapter uses more than a handful (PEFT's default is 5). A larger value is refused, not clipped,
  since clipping would change the numbers.

Opened adapters carry it as ``adapter.settings``; nothing below the reader looks at the raw JSON.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from adaptool.adapters.patterns import first_match, key_regex
from adaptool.errors import AdaptoolError

MAX_PATTERN_CHARS = 1000
MAX_NEUMANN_TERMS = 1000
MAX_INT = 2**31 - 1  # ranks, layer and token indices: anything larger is no real model's

# The peft_types whose keys are checked here (their families: :mod:`adaptool.adapters.registry`).
PEFT_TYPES = ("LORA", "LOHA", "LOKR", "IA3", "ADALORA", "OFT")
# Config switches of LoRA variants whose merged weight is not the plain/DoRA formula (refused by lora.py).
LORA_VARIANTS = ("use_qalora", "alora_invocation_tokens", "velora_config", "use_bdlora", "arrow_config",
                 "kasa_config", "monteclora_config", "target_parameters")
BIAS_VALUES = {"LORA": ("none", "all", "lora_only"), "ADALORA": ("none", "all", "lora_only"),
               "OFT": ("none", "all", "oft_only")}


@dataclass(frozen=True)
class Pattern:
    """One ``rank_pattern``/``alpha_pattern`` entry: PEFT matches ``(.*\\.)?(key)$`` against the module path."""

    key: str
    regex: re.Pattern
    value: int | float


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter's config as the families and the commands read it (PEFT 0.21.2's defaults where a key is
    absent: the defaults below are the only place they are written down).

    Attributes:
        where (str): the file (or synthetic source) it came from, for messages.
        peft_type (str): upper case, e.g. ``LORA``. Default: LORA.
        base_model_name_or_path, task_type, revision (str | None): as written (copied into outputs).
        r (int): LoRA/LoHa/LoKr rank (default 8); OFT's block count (default 0).
        lora_alpha (int | float): LoRA/AdaLoRA alpha. Default: 8.
        alpha (int | float): LoHa/LoKr alpha. Default: 8.
        use_rslora, use_dora, lora_bias (bool): LoRA switches. Default: False.
        fan_in_fan_out (bool): the weights are stored (in, out) (GPT-2 ``Conv1D``); read for LoRA, AdaLoRA, IA3
            and OFT (the families whose PEFT config has the key), False for the others. Default: False.
        bias (str): ``none``, ``all``, ``lora_only`` (OFT: ``oft_only``). Default: none.
        rank_pattern / alpha_pattern (tuple[Pattern, ...]): first match wins, in the file's order.
        rank_masks (tuple[tuple[str, tuple[bool, ...]], ...]): AdaLoRA's ``rank_pattern`` (key, mask).
        target_modules, exclude_modules, layers_pattern: a regex string, a tuple of names, or None.
        modules_to_save (tuple[str, ...] | None): modules saved whole.
        layers_to_transform: a layer index, a tuple of them, or None.
        trainable_token_indices: a tuple of indices, a ``{module: tuple}`` dict, or None.
        layer_replication (tuple[tuple[int, int], ...] | None): ``[start, end)`` layer ranges; () for ``[]``.
        variants (tuple[str, ...]): LoRA variant switches that are set (see ``LORA_VARIANTS``).
        init_r, target_r (int): AdaLoRA's ranks. Default: 12, 8.
        oft_block_size (int | None): None when the key is absent (an OFT adapter from before PEFT 0.14).
        coft, eps, block_share, use_cayley_neumann, num_cayley_neumann_terms: OFT's settings.
        feedforward_modules: IA3's rule, a string (regex, ``re.fullmatch``), a tuple of suffixes, or None.
    """

    where: str = "adapter_config.json"
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    revision: str | None = None
    r: int = 8
    lora_alpha: int | float = 8
    alpha: int | float = 8
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    bias: str = "none"
    rank_pattern: tuple = ()
    alpha_pattern: tuple = ()
    rank_masks: tuple = ()
    target_modules: tuple | str | None = None
    exclude_modules: tuple | str | None = None
    modules_to_save: tuple | None = None
    layers_to_transform: tuple | int | None = None
    layers_pattern: tuple | str | None = None
    trainable_token_indices: tuple | dict | None = None
    layer_replication: tuple | None = None
    variants: tuple = ()
    init_r: int = 12
    target_r: int = 8
    oft_block_size: int | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    feedforward_modules: tuple | str | None = None

    # --- what the families ask -------------------------------------------------------------------------

    def rank_for(self, path: str) -> int:
        """r of module ``path`` (``rank_pattern`` by PEFT's first-match rule, else ``r``)."""
        return first_match(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> int | float:
        """alpha of module ``path``: ``alpha_pattern``, else ``lora_alpha`` (LoRA) or ``alpha`` (LoHa/LoKr)."""
        return first_match(self.alpha_pattern, path, self.alpha if self.peft_type in ("LOHA", "LOKR") else self.lora_alpha)

    def token_indices(self, path: str) -> tuple[int, ...] | None:
        """The trainable token rows of embedding ``path``, or None when the config does not name it."""
        spec = self.trainable_token_indices
        if isinstance(spec, tuple):
            return spec
        if isinstance(spec, dict):
            for suffix, idx in spec.items():
                if path == suffix or path.endswith("." + suffix):
                    return idx
        return None


DEFAULTS = AdapterConfig()


# ------------------------------------------------------------------------------------------------ parsing


def parse_config(raw, where: str) -> AdapterConfig:
    """Check ``raw`` (the JSON object of ``adapter_config.json``) and build the typed config.

    Args:
        raw (dict): the parsed JSON.
        where (str): the file, named in every message.

    Raises:
        AdaptoolError: a key of the wrong type or out of range, one line naming the key and ``where``.
    """
    if not isinstance(raw, dict):
        raise AdaptoolError(f"{where}: not a JSON object", "repair or re-save the adapter")
    c = _Reader(raw, where)
    peft_type = c.text("peft_type", DEFAULTS.peft_type).upper()
    kw = dict(where=where, peft_type=peft_type, base_model_name_or_path=c.optional_text("base_model_name_or_path"))
    if peft_type not in PEFT_TYPES:
        return AdapterConfig(**kw)  # refused by name where its edits are asked for
    kw.update(_shared_keys(c))
    if peft_type in BIAS_VALUES:
        kw["bias"] = c.choice("bias", DEFAULTS.bias, BIAS_VALUES[peft_type])
    kw.update(_FAMILY_KEYS[peft_type](c))
    kw.update(_copied_keys(c))
    return AdapterConfig(**kw)


def _shared_keys(c: "_Reader") -> dict:
    """Keys every supported family's config may hold."""
    return dict(
        target_modules=c.names_or_regex("target_modules"),
        exclude_modules=c.names_or_regex("exclude_modules"),
        modules_to_save=c.names("modules_to_save"),
        layers_to_transform=c.layers("layers_to_transform"),
        layers_pattern=c.names_or_regex("layers_pattern"),
        trainable_token_indices=c.token_indices("trainable_token_indices"),
    )


def _copied_keys(c: "_Reader") -> dict:
    """Keys read after the family's own (so a config with several bad keys names the same one first as before)."""
    return dict(
        # PEFT's LoRA and AdaLoRA have it; any family's config that states it gets the expanded stack.
        layer_replication=c.ranges("layer_replication"),
        task_type=c.optional_text("task_type"),
        revision=c.optional_text("revision"),
    )


def _lora_keys(c: "_Reader") -> dict:
    """LoRA (plain, rsLoRA, DoRA; variants are only noted, and refused by the LoRA family)."""
    return dict(r=c.integer("r", DEFAULTS.r, 1), lora_alpha=c.number("lora_alpha", DEFAULTS.lora_alpha),
                use_rslora=c.switch("use_rslora", DEFAULTS.use_rslora), use_dora=c.switch("use_dora", DEFAULTS.use_dora),
                fan_in_fan_out=c.switch("fan_in_fan_out", DEFAULTS.fan_in_fan_out),
                lora_bias=c.switch("lora_bias", DEFAULTS.lora_bias), rank_pattern=c.patterns("rank_pattern", rank=True),
                alpha_pattern=c.patterns("alpha_pattern", rank=False),
                variants=tuple(k for k in LORA_VARIANTS if c.raw.get(k)))


def _lycoris_keys(c: "_Reader") -> dict:
    """LoHa and LoKr."""
    return dict(r=c.integer("r", DEFAULTS.r, 1), alpha=c.number("alpha", DEFAULTS.alpha),
                rank_pattern=c.patterns("rank_pattern", rank=True), alpha_pattern=c.patterns("alpha_pattern", rank=False))


def _adalora_keys(c: "_Reader") -> dict:
    """AdaLoRA (its rank_pattern holds kept-rank masks)."""
    return dict(init_r=c.integer("init_r", DEFAULTS.init_r, 1), target_r=c.integer("target_r", DEFAULTS.target_r, 0),
                lora_alpha=c.number("lora_alpha", DEFAULTS.lora_alpha),
                fan_in_fan_out=c.switch("fan_in_fan_out", DEFAULTS.fan_in_fan_out), rank_masks=c.masks("rank_pattern"))


def _ia3_keys(c: "_Reader") -> dict:
    """(IA)³."""
    return dict(fan_in_fan_out=c.switch("fan_in_fan_out", DEFAULTS.fan_in_fan_out),
                feedforward_modules=c.names_or_regex("feedforward_modules"))


def _oft_keys(c: "_Reader") -> dict:
    """OFT (PEFT >= 0.14's parametrisation)."""
    return dict(r=c.integer("r", 0, 0),  # OFT: r counts blocks; 0 lets oft_block_size decide
                oft_block_size=c.integer("oft_block_size", DEFAULTS.oft_block_size, 0),
                coft=c.switch("coft", DEFAULTS.coft), eps=float(c.number("eps", DEFAULTS.eps)),
                block_share=c.switch("block_share", DEFAULTS.block_share),
                use_cayley_neumann=c.switch("use_cayley_neumann", DEFAULTS.use_cayley_neumann),
                num_cayley_neumann_terms=c.integer("num_cayley_neumann_terms", DEFAULTS.num_cayley_neumann_terms, 0,
                                                   MAX_NEUMANN_TERMS),
                fan_in_fan_out=c.switch("fan_in_fan_out", DEFAULTS.fan_in_fan_out))


_FAMILY_KEYS = {"LORA": _lora_keys, "LOHA": _lycoris_keys, "LOKR": _lycoris_keys, "ADALORA": _adalora_keys,
                "IA3": _ia3_keys, "OFT": _oft_keys}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_INT


def _is_number(v) -> bool:
    """A JSON number that is finite as a float (an integer too large for one is refused as well)."""
    if not (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _show(v) -> str:
    """A value for a message: its repr, short, on one line, with its JSON type where that is the problem."""
    kind = {str: " (a string)", bool: " (a boolean)", list: " (a list)", dict: " (an object)"}.get(type(v), "")
    return _short(v) + kind


def _short(v) -> str:
    text = repr(v) if not isinstance(v, int) or abs(v) < 10 ** 30 else f"an integer of {len(str(abs(v)))} digits"
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Typed access to one raw config, each failure one line naming key and file."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where
        self.file = where.replace("\\", "/").rsplit("/", 1)[-1]

    def fail(self, key: str, what: str, value):
        return AdaptoolError(f"{self.where}: {key} must be {what}, not {_show(value)}", f"fix {key} in {self.file}")

    def text(self, key: str, default: str) -> str:
        v = self.raw.get(key, default)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.fail(key, "a string", v)
        return v

    def optional_text(self, key: str) -> str | None:
        v = self.raw.get(key)
        if v is not None and not isinstance(v, str):
            raise self.fail(key, "a string or null", v)
        return v

    def choice(self, key: str, default: str, allowed: tuple) -> str:
        v = self.raw.get(key)
        if v is None:
            return default
        if v not in allowed:
            raise self.fail(key, "one of " + ", ".join(repr(a) for a in allowed), v)
        return v

    def integer(self, key: str, default, minimum: int, maximum: int | None = None):
        if key not in self.raw:
            return default
        v = self.raw[key]
        maximum = MAX_INT if maximum is None else maximum
        limits = f"an integer from {minimum} to {maximum}"
        if not _is_int(v) or v < minimum or v > maximum:
            raise self.fail(key, limits, v)
        return v

    def number(self, key: str, default):
        if key not in self.raw:
            return default
        v = self.raw[key]
        if not _is_number(v):
            raise self.fail(key, "a finite number", v)
        return v

    def switch(self, key: str, default: bool) -> bool:
        if key not in self.raw:
            return default
        v = self.raw[key]
        if v is None:
            return False  # PEFT tests the value's truth: null is off
        if not isinstance(v, bool):
            raise self.fail(key, "true or false", v)
        return v

    def regex(self, key: str, pattern: str, compile_=re.compile) -> re.Pattern:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise AdaptoolError(f"{self.where}: {key} holds a pattern of {len(pattern)} characters "
                                f"(the limit is {MAX_PATTERN_CHARS})", f"shorten it in {self.file}")
        try:
            return compile_(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise AdaptoolError(f"{self.where}: {key} holds {_show(pattern)}, which is no valid regex ({e})",
                                f"fix {key.removesuffix(' key')} in {self.file}") from None

    def names(self, key: str):
        v = self.raw.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
            raise self.fail(key, "a list of module names or null", v)
        return tuple(v)

    def names_or_regex(self, key: str):
        v = self.raw.get(key)
        if isinstance(v, str):
            self.regex(key, v)
            return v
        return self.names(key) if v is None or isinstance(v, list) else self._bad_names(key, v)

    def _bad_names(self, key, v):
        raise self.fail(key, "a regex string, a list of module names or null", v)

    def layers(self, key: str):
        v = self.raw.get(key)
        if v is None or (_is_int(v) and v >= 0):
            return v
        if isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v):
            return tuple(v)
        raise self.fail(key, "a layer index, a list of layer indices or null", v)

    def token_indices(self, key: str):
        v = self.raw.get(key)
        if v is None:
            return None
        ok = lambda idx: isinstance(idx, list) and all(_is_int(i) and i >= 0 for i in idx)  # noqa: E731
        if ok(v):
            return tuple(v)
        if isinstance(v, dict) and all(ok(idx) for idx in v.values()):
            return {name: tuple(idx) for name, idx in v.items()}
        raise self.fail(key, "a list of non-negative token indices, or an object mapping module names to such lists", v)

    def patterns(self, key: str, rank: bool) -> tuple:
        v = self.raw.get(key)
        if v is None:
            return ()
        what = "an object mapping module patterns to " + ("positive integer ranks" if rank else "finite numbers")
        if not isinstance(v, dict):
            raise self.fail(key, what, v)
        out = []
        for k, value in v.items():
            good = _is_int(value) and value >= 1 if rank else _is_number(value)
            if not good:
                raise self.fail(f"{key}[{_short(k)}]", "a positive integer" if rank else "a finite number", value)
            out.append(Pattern(k, self.regex(f"{key} key", k, key_regex), value))
        return tuple(out)

    def masks(self, key: str) -> tuple:
        """AdaLoRA's rank_pattern: ``{"<module>.lora_E": [true, false, …]}``."""
        v = self.raw.get(key)
        if v is None:
            return ()
        if not isinstance(v, dict):
            raise self.fail(key, "an object mapping '<module>.lora_E' to a list of booleans (AdaLoRA)", v)
        out = []
        for k, mask in v.items():
            if not isinstance(mask, list) or not all(isinstance(m, bool) or m in (0, 1) for m in mask):
                raise self.fail(f"{key}[{_short(k)}]", "a list of booleans (AdaLoRA's kept-rank mask)", mask)
            out.append((k, tuple(bool(m) for m in mask)))
        return tuple(out)

    def ranges(self, key: str):
        v = self.raw.get(key)
        if v is None or v == []:
            return None if v is None else ()
        ok = isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(_is_int(i) and i >= 0 for i in p)
                                         and p[0] <= p[1] for p in v)
        if not ok:
            raise self.fail(key, "a list of [start, end] layer index pairs", v)
        return tuple(tuple(p) for p in v)
