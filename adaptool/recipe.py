"""The YAML merge recipe: schema, strict validation and path resolution.

A recipe is data. It is parsed once, at the edge, into frozen dataclasses; nothing below the CLI ever
sees the YAML mapping or a ``.get(...)`` default. Every mistake a user can make in a recipe (an unknown
key, a value of the wrong type or out of range, a parameter the chosen strategy ignores) is a
:class:`RecipeError` naming the file and line and saying what to write instead::

    recipe.yaml:7: unknown key 'densty' in parameters; did you mean 'density'?

The shape (held by outside checks, see ``docs/recipes.md``)::

    base: path-or-hub-id            # needed when output.kind is model
    adapters:
      - path: path-or-hub-id
        weight: 0.7                 # any finite real, negative allowed; default 1.0; or per-module rules
    strategy: ties                  # see STRATEGIES; default linear
    space: delta                    # delta | factors
    parameters: {density: 0.5, majority_sign_method: total, rank: 16, clamp: 0.99, seed: 0, convention: peft}
    output: {path: out/merged, kind: adapter, dtype: bfloat16}
    device: auto                    # auto | cpu | cuda | cuda:N

Per-module values: ``weight`` and ``parameters.density`` also take a list of rules,
``[{match: 'layers\\.[0-7]\\.', value: 0.3}, {value: 1.0}]``: the first rule whose ``match`` regex is found
(``re.search``) in a module's path (``model.layers.0.self_attn.q_proj``, as ``adaptool inspect`` lists it)
gives that module's value, and the list must end with a rule without ``match`` (the default), so every
module has a value: a list without one is an error when the recipe loads, not when a module turns up.

Paths: a relative ``path``/``base``/``output.path`` is resolved against the recipe file's folder and
returned absolute. A value that does not exist there but looks like a hub id (``org/name`` or
``org/name@revision``) is kept as the hub id. So after loading, every local location is an absolute
path and every other location is a hub id; write ``./org/name`` to force a local path.

YAML is read with ``yaml.SafeLoader`` only (no Python objects). This module must not import torch: the
CLI parses recipes before any heavy import.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from adaptool.errors import AdaptoolError

__all__ = [
    "AdapterSpec",
    "MergeParameters",
    "ModuleRules",
    "OutputSpec",
    "Rule",
    "Recipe",
    "RecipeError",
    "STRATEGIES",
    "load_recipe",
    "parse_recipe",
    "recipe_from_mapping",
    "is_hub_id",
    "resolve_location",
    "parameters_used",
    "value_at",
    "as_written",
]

# --------------------------------------------------------------------------------------------------
# The vocabulary. Tables, not branches: each cross-field rule below reads one of these sets.

STRATEGIES = (
    "linear",
    "cat",
    "svd",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
#: strategies that sparsify each delta and so need ``parameters.density``
PRUNING_STRATEGIES = frozenset(
    {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
    | {"ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"}
)
#: strategies with a TIES sign election (``majority_sign_method``)
SIGN_STRATEGIES = frozenset({"ties", "ties_svd", "dare_ties", "dare_ties_svd"})
#: strategies with random (DARE) dropping (``seed``)
RANDOM_STRATEGIES = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
#: strategies that end in a truncated SVD (``clamp``; ``rank`` in factors space)
SVD_STRATEGIES = frozenset({"svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"})
#: combination types PEFT 0.21.2 ``add_weighted_adapter`` has, i.e. what ``space: factors`` can reproduce
FACTOR_SPACE_STRATEGIES = frozenset(STRATEGIES)

SPACES = ("delta", "factors")
OUTPUT_KINDS = ("adapter", "model")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MAJORITY_SIGN_METHODS = ("total", "frequency")
#: whose arithmetic ties/dare/magnitude_prune follow (see docs/recipes.md, "Conventions")
CONVENTIONS = ("peft", "mergekit")
DEVICES = ("auto", "cpu", "cuda")  # plus cuda:N

TOP_KEYS = ("base", "adapters", "strategy", "space", "parameters", "output", "device")
ADAPTER_KEYS = ("path", "weight")
PARAMETER_KEYS = ("density", "majority_sign_method", "rank", "clamp", "seed", "convention")
RULE_KEYS = ("match", "value")
RULES_EXAMPLE = "[{match: 'layers\\.[0-7]\\.', value: 0.3}, {value: 1.0}]"
MAX_RULE_PATTERN = 1000  # characters; the limit adapter configs' regexes have too (Python's re has no timeout)
OUTPUT_KEYS = ("path", "kind", "dtype")
# where a key that was written at the top level belongs (the commonest indentation mistake)
_BELONGS_UNDER = {**{k: "parameters" for k in PARAMETER_KEYS}, "kind": "output", "dtype": "output"}

# A hub repo id: one slash between two names, an optional @revision (which may itself hold slashes,
# e.g. refs/pr/3). No leading ./ or /, no "..".
MAX_RECIPE_BYTES = 1 << 20
_DEVICE = re.compile(r"cuda:(\d+)")
# YAML 1.1 (PyYAML) reads 1e-3 and -.5 as strings; YAML 1.2 and people read them as numbers.
_YAML12_FLOAT = re.compile(r"[-+]?(\.\d+|\d+(\.\d*)?)([eE][-+]?\d+)?")


class RecipeError(AdaptoolError, ValueError):
    """A recipe that cannot be run, explained in one line with its file and line number."""


# --------------------------------------------------------------------------------------------------
# The typed recipe.


@dataclass(frozen=True)
class Rule:
    """One per-module rule: ``value`` for the modules whose path ``match`` is found in (``re.search``);
    ``match`` None: every module (the default, always the last rule)."""

    match: str | None
    value: float


@dataclass(frozen=True)
class ModuleRules:
    """A value per module: the first rule whose ``match`` is found in the module path wins.

    The last rule has no ``match``, so every module gets a value (the recipe reader makes sure of it).

    Args:
        rules (tuple[Rule, ...]): in the order written.
    """

    rules: tuple[Rule, ...]

    def index(self, module: str) -> int:
        """Which rule decides ``module`` (a module path such as ``model.layers.0.self_attn.q_proj``)."""
        for i, rule in enumerate(self.rules):
            if rule.match is None or re.search(rule.match, module):
                return i
        raise AdaptoolError(f"no rule matches module {module!r} and there is no default",  # recipes always have one
                            "end the rules with one without 'match'")

    def at(self, module: str) -> float:
        """The value for ``module``."""
        return self.rules[self.index(module)].value

    def to_list(self) -> list[dict[str, Any]]:
        """As written in a recipe: ``[{"match": ..., "value": ...}, ..., {"value": ...}]``."""
        return [{"value": r.value} if r.match is None else {"match": r.match, "value": r.value} for r in self.rules]


def value_at(value: float | ModuleRules | None, module: str) -> float | None:
    """A recipe value (a number, per-module rules, or None) for one module."""
    return value.at(module) if isinstance(value, ModuleRules) else value


def as_written(value: float | ModuleRules | None) -> Any:
    """A recipe value as a recipe writes it (rules as a list of mappings), for JSON and provenance."""
    return value.to_list() if isinstance(value, ModuleRules) else value


@dataclass(frozen=True)
class AdapterSpec:
    """One input adapter.

    Args:
        path (str): absolute local folder, or hub id ``org/name[@revision]``.
        weight (float | ModuleRules): multiplier of this adapter's delta (negative subtracts it), or one per
            module. Default: 1.0.
    """

    path: str
    weight: float | ModuleRules = 1.0


@dataclass(frozen=True)
class MergeParameters:
    """Strategy knobs. ``None`` means "not given"; the engine picks its documented default.

    Args:
        density (float | ModuleRules | None): fraction of each delta kept, in (0, 1] (or one per module).
            Required by pruning strategies.
        majority_sign_method (str): ``total`` or ``frequency`` (TIES sign election). Default: "total".
        rank (int | None): output rank where a result is re-factored into a LoRA. Default: None.
        clamp (float | None): quantile in (0, 1] at which SVD factors are clamped. Default: None.
        seed (int): DARE seed, combined with each tensor's name. Default: 0.
        convention (str): ``peft`` or ``mergekit``: whose ties/dare arithmetic to follow. Default: "peft".
    """

    density: float | ModuleRules | None = None
    majority_sign_method: str = "total"
    rank: int | None = None
    clamp: float | None = None
    seed: int = 0
    convention: str = "peft"


@dataclass(frozen=True)
class OutputSpec:
    """Where and what to write.

    Args:
        path (str): absolute output folder.
        kind (str): ``adapter`` (a PEFT adapter folder) or ``model`` (the base with the merge folded in).
            Default: "adapter".
        dtype (str | None): ``float32``, ``float16`` or ``bfloat16``; None keeps the inputs' dtype.
    """

    path: str
    kind: str = "adapter"
    dtype: str | None = None


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A validated merge recipe; see the module docstring and ``docs/recipes.md``.

    Args:
        base (str | None): absolute base model folder or hub id; required when ``output.kind`` is model.
        adapters (tuple[AdapterSpec, ...]): at least one.
        strategy (str): one of :data:`STRATEGIES`. Default: "linear".
        space (str): ``delta`` (exact, on ΔW) or ``factors`` (PEFT ``add_weighted_adapter``). Default: "delta".
        parameters (MergeParameters): strategy knobs.
        output (OutputSpec): where and what to write.
        device (str): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Default: "auto".
        source_path (str | None): absolute path of the recipe file, when loaded from one.
        raw (dict): the mapping as parsed, before defaults and path resolution (for provenance).
    """

    base: str | None = None
    adapters: tuple[AdapterSpec, ...]
    strategy: str = "linear"
    space: str = "delta"
    parameters: MergeParameters = field(default_factory=MergeParameters)
    output: OutputSpec
    device: str = "auto"
    source_path: str | None = None
    raw: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    notes: tuple[str, ...] = field(default=(), compare=False, hash=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The normalised recipe as plain JSON-serialisable data, for provenance metadata.

        Paths are resolved, aliases normalised, and only parameters the strategy uses are listed, so the
        result is itself a valid recipe: ``recipe_from_mapping(r.to_dict()) == r`` (up to source_path).
        """
        params = self.parameters
        used = parameters_used(self.strategy, self.space)
        out: dict[str, Any] = {} if self.base is None else {"base": self.base}
        out["adapters"] = [{"path": a.path, "weight": as_written(a.weight)} for a in self.adapters]
        out["strategy"] = self.strategy
        out["space"] = self.space
        values = {k: as_written(getattr(params, k)) for k in PARAMETER_KEYS if k in used}
        # the default convention is left out, so that recipes written before it existed keep their provenance bytes
        parameters = {k: v for k, v in values.items() if v is not None and (k, v) != ("convention", "peft")}
        if parameters:
            out["parameters"] = parameters
        output = {"path": self.output.path, "kind": self.output.kind}
        if self.output.dtype is not None:
            output["dtype"] = self.output.dtype
        out["output"] = output
        out["device"] = self.device
        return out


def parameters_used(strategy: str, space: str = "delta") -> frozenset[str]:
    """The ``parameters`` keys that have an effect for ``strategy`` in ``space``.

    ``rank`` is never used by ``cat`` (its rank is the sum of the inputs'), and in ``factors`` space only
    by the svd family: PEFT's linear/ties/dare/magnitude_prune keep the adapters' common rank.
    """
    used = set()
    if strategy in PRUNING_STRATEGIES:
        used.update(("density", "convention"))
    if strategy in SIGN_STRATEGIES:
        used.add("majority_sign_method")
    if strategy in RANDOM_STRATEGIES:
        used.add("seed")
    if strategy in SVD_STRATEGIES:
        used.update(("clamp", "rank"))
    elif strategy != "cat" and space == "delta":
        used.add("rank")
    return frozenset(used)


# --------------------------------------------------------------------------------------------------
# Public entry points.


def load_recipe(path: str | os.PathLike, output_override: str | None = None) -> Recipe:
    """Read, validate and resolve a recipe file.

    Args:
        path (str | os.PathLike): the YAML file. Relative paths inside it resolve against its folder.
        output_override (str | None): replaces ``output.path`` (the CLI's ``-o``); resolved against the
            current working directory, not the recipe's folder. Default: None.

    Returns:
        Recipe: with ``source_path`` set to the file's absolute path.

    Raises:
        RecipeError: the file is missing or unreadable, or the recipe is invalid.
    """
    shown = os.fspath(path)
    file = Path(os.path.abspath(os.path.expanduser(shown)))
    try:
        info = file.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(f"recipe '{shown}' is not a regular file", "pass the .yaml file itself")
        if info.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file '{shown}' is {info.st_size} bytes; a recipe is a short YAML file",
                              "pass the recipe, not a data file")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file '{shown}' not found", "check the path") from None
    except IsADirectoryError:
        raise RecipeError(f"'{shown}' is a folder, not a recipe file", "pass the .yaml file itself") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file '{shown}' is not UTF-8 text", "save it as UTF-8 YAML") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe file '{shown}': {e.strerror}", "check its permissions") from None
    data, where = _parse_yaml(text, shown)
    return _build(data, _Doc(shown, where), file.parent, output_override, source_path=str(file))


def parse_recipe(
    text: str,
    base_dir: str | os.PathLike,
    source_name: str = "<recipe>",
    *,
    output_override: str | None = None,
) -> Recipe:
    """Validate recipe YAML given as text (as :func:`load_recipe`, without the file).

    Args:
        text (str): the YAML.
        base_dir (str | os.PathLike): folder that relative paths resolve against.
        source_name (str): name used in error messages. Default: "<recipe>".
        output_override (str | None): replaces ``output.path``, resolved against the working directory.

    Raises:
        RecipeError: the YAML is invalid or does not describe a valid recipe.
    """
    data, where = _parse_yaml(text, source_name)
    return _build(data, _Doc(source_name, where), Path(os.path.abspath(base_dir)), output_override, None)


def recipe_from_mapping(
    data: Mapping[str, Any],
    base_dir: str | os.PathLike = ".",
    *,
    output_override: str | None = None,
    source_name: str = "<recipe>",
) -> Recipe:
    """Validate a recipe given as Python data (the Python API's way in; errors carry no line numbers).

    Raises:
        RecipeError: ``data`` does not describe a valid recipe.
    """
    data = copy.deepcopy(data)  # never keep (or let the caller later mutate) their objects
    return _build(data, _Doc(source_name, {}), Path(os.path.abspath(base_dir)), output_override, None)


def is_hub_id(value: str) -> bool:
    """Whether ``value`` has the shape of a hub repo id, ``org/name`` or ``org/name@revision``."""
    from adaptool.io.hub import looks_like_hub_id

    return looks_like_hub_id(value)


def resolve_location(value: str, base_dir: str | os.PathLike) -> str:
    """Resolve an input location: an absolute local path, or ``value`` unchanged when it is a hub id.

    A relative value is looked up under ``base_dir``; if nothing exists there and the value looks like
    ``org/name[@revision]``, it is a hub id. Otherwise it is a local path (which may not exist yet: the
    reader reports that, with the path).
    """
    local = Path(os.path.expanduser(value))
    if not local.is_absolute():
        local = Path(base_dir) / local
    if not local.exists() and is_hub_id(value):
        return value
    return os.path.normpath(os.path.abspath(local))


# --------------------------------------------------------------------------------------------------
# YAML with line numbers: a SafeLoader that remembers, for every mapping and list it builds, the node
# each key and item came from. Validation then walks plain Python values and asks for lines by
# (container, key). Anchors, aliases and merge keys behave exactly as in yaml.safe_load.


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[int, tuple[Any, Any]]]:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def construct_map(loader, node):
        data: dict = {}
        yield data
        _reject_duplicate_keys(loader, node)
        data.update(loader.construct_mapping(node))  # flattens << merges in place first
        keys = {loader.construct_object(k): (k, v) for k, v in node.value}  # later pairs win, as in data
        where[id(data)] = (node, keys)

    def construct_seq(loader, node):
        data: list = []
        yield data
        data.extend(loader.construct_sequence(node))
        where[id(data)] = (node, list(node.value))

    where: dict[int, tuple[Any, Any]] = {}
    _Loader.add_constructor("tag:yaml.org,2002:map", construct_map)
    _Loader.add_constructor("tag:yaml.org,2002:seq", construct_seq)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except _DuplicateKey as e:
        raise RecipeError(f"{source}:{e.line}: key {e.key!r} appears twice", "keep only one of them") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{source}:{mark.line + 1}" if mark else source
        problem = " ".join(str(e.problem or e.context or "could not parse").split())
        raise RecipeError(f"{at}: invalid YAML: {problem}", "check indentation and quoting there") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: invalid YAML: {' '.join(str(e).split())}", "fix the YAML syntax") from None
    finally:
        loader.dispose()
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty", "start from an example in recipes/ (see docs/recipes.md)")
    return data, where


def _reject_duplicate_keys(loader, node) -> None:
    # yaml.safe_load silently keeps the last of two equal keys; in a recipe that hides a mistake.
    # Keys brought in by a << merge may be overridden: that is what merges are for.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or key_node.id != "scalar":
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        seen.add(key)


# --------------------------------------------------------------------------------------------------
# Validation: typed readers that point at lines.


class _Doc:
    """Reads checked values out of parsed YAML; every failure names ``source:line``."""

    def __init__(self, source: str, where: dict[int, tuple[Any, Any]]):
        self.source = source
        self.notes: list[str] = []
        self.where = where  # id(dict or list) -> (node, {key: (key_node, value_node)} or [item_node])

    def line(self, container: Any, key: Any = None, *, of_key: bool = False) -> int | None:
        """Line of ``container[key]`` (or of the key itself), or of the container when key is None."""
        record = self.where.get(id(container))
        if record is None:
            return None
        node, parts = record
        if key is not None:
            if isinstance(parts, dict) and key in parts:
                node = parts[key][0 if of_key else 1]
            elif isinstance(parts, list) and isinstance(key, int) and key < len(parts):
                node = parts[key]
        return node.start_mark.line + 1

    def node(self, container: Any, key: Any) -> Any:
        record = self.where.get(id(container))
        if record is None or not isinstance(record[1], dict) or key not in record[1]:
            return None
        return record[1][key][1]

    def fail(self, line: int | None, message: str, hint: str | None = None) -> NoReturn:
        at = f"{self.source}:{line}" if line else self.source
        raise RecipeError(f"{at}: {message}", hint)

    # -- containers --------------------------------------------------------------------------------

    def section(self, parent: Mapping, key: str, allowed: tuple[str, ...]) -> Mapping:
        """``parent[key]`` as a mapping with only ``allowed`` keys; absent or null reads as empty."""
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(self.line(parent, key), f"{key} must be a mapping, got {_describe(value)}",
                      f"write its keys indented under '{key}:' ({', '.join(allowed)})")
        self.known_keys(value, allowed, f"in {key}")
        return value

    def known_keys(self, mapping: Mapping, allowed: tuple[str, ...], where: str,
                   belongs_under: Mapping[str, str] | None = None) -> None:
        for key in mapping:
            line = self.line(mapping, key, of_key=True)
            if not isinstance(key, str):
                self.fail(line, f"key {key!r} {where} is not a name", f"allowed keys: {', '.join(allowed)}")
            if key in allowed:
                continue
            if belongs_under and key in belongs_under:
                self.fail(line, f"unknown key {key!r} {where}",
                          f"'{key}' belongs under '{belongs_under[key]}:'; indent it there")
            self.fail(line, f"unknown key {key!r} {where}", _suggest(key, allowed, "allowed keys"))

    # -- scalars -----------------------------------------------------------------------------------

    def string(self, mapping: Mapping, key: str, name: str) -> str | None:
        value = mapping.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            what = "empty" if isinstance(value, str) else f"{_describe(value)}"
            self.fail(self.line(mapping, key), f"{name} must be a non-empty string, got {what}",
                      f"quote it if needed, e.g. {key}: \"...\"")
        return value

    def choice(self, mapping: Mapping, key: str, name: str, choices: tuple[str, ...],
               aliases: Mapping[str, str] | None = None) -> str | None:
        value = self.string(mapping, key, name)
        if value is None:
            return None
        aliases = aliases or {}
        if value in aliases:
            return aliases[value]
        if value not in choices:
            self.fail(self.line(mapping, key), f"unknown {name} {value!r}",
                      _suggest(value, (*choices, *aliases), "use one of"))
        return value

    def number(self, mapping: Mapping, key: str, name: str, hint: str) -> float | None:
        value = mapping.get(key)
        if value is None:
            return None
        if isinstance(value, str) and self._plain(mapping, key) and _YAML12_FLOAT.fullmatch(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(self.line(mapping, key), f"{name} must be a number, got {_describe(value)}", hint)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            self.fail(self.line(mapping, key), f"{name} must be a finite number, got {value}", hint)
        return number

    def integer(self, mapping: Mapping, key: str, name: str, hint: str) -> int | None:
        value = mapping.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(self.line(mapping, key), f"{name} must be a whole number, got {_describe(value)}", hint)
        return value

    def fraction(self, mapping: Mapping, key: str, name: str, hint: str) -> float | None:
        """A number in (0, 1]."""
        value = self.number(mapping, key, name, hint)
        if value is not None and not 0 < value <= 1:
            self.fail(self.line(mapping, key), f"{name} must be > 0 and <= 1, got {_show(mapping[key])}", hint)
        return value

    def per_module(self, mapping: Mapping, key: str, name: str, read, hint: str) -> float | ModuleRules | None:
        """A number checked by ``read`` (:meth:`number` or :meth:`fraction`), or a list of per-module rules whose
        values ``read`` checks; the last rule, and only it, has no ``match`` (the default)."""
        items = mapping.get(key)
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
            return read(mapping, key, name, hint)
        if not items:
            self.fail(self.line(mapping, key), f"{name} is an empty list", f"write a number, or rules: {RULES_EXAMPLE}")
        rules = [self._rule(items, i, name, read, hint) for i in range(len(items))]
        for i, rule in enumerate(rules[:-1]):
            if rule.match is None:
                self.fail(self.line(items, i), f"{name}[{i}] has no 'match' but is not the last rule",
                          "a rule without 'match' is the default for every module, so it comes last")
        if rules[-1].match is not None:
            self.fail(self.line(items, len(items) - 1), f"{name} has no default rule",
                      "end the list with a rule without 'match' (e.g. '- value: 1.0'), the value of every module "
                      "no rule matches")
        return rules[0].value if len(rules) == 1 else ModuleRules(tuple(rules))

    def _rule(self, items: Sequence, i: int, name: str, read, hint: str) -> Rule:
        item, where = items[i], f"{name}[{i}]"
        if not isinstance(item, Mapping):
            number = isinstance(item, (int, float)) and not isinstance(item, bool)
            gradient = " (mergekit's gradients, lists of numbers, are not supported)" if number else ""
            self.fail(self.line(items, i), f"{where} must be a rule {{match: REGEX, value: X}}, got "
                      f"{_describe(item)}{gradient}", f"write rules like {RULES_EXAMPLE}")
        if "filter" in item:
            self.fail(self.line(item, "filter", of_key=True), f"unknown key 'filter' in {where}",
                      "write 'match: REGEX', a regular expression searched in the module path (mergekit's "
                      "'filter' is a substring)")
        self.known_keys(item, RULE_KEYS, f"in {where}")
        if item.get("value") is None:
            self.fail(self.line(items, i), f"{where} has no 'value'", "add 'value: X' to the rule")
        value = read(item, "value", f"{where}.value", hint)
        match = self.string(item, "match", f"{where}.match")
        if match is not None:
            problem = f"is {len(match)} characters long (the limit is {MAX_RULE_PATTERN})" \
                if len(match) > MAX_RULE_PATTERN else _regex_problem(match)
            if problem:
                shown = match if len(match) <= 60 else match[:57] + "..."  # as written: repr would double backslashes
                self.fail(self.line(item, "match"), f"{where}.match '{shown}' {problem}",
                          "fix the regex (Python re syntax); in YAML, single-quote it, e.g. match: 'layers\\.0\\.'")
        return Rule(match, value)

    def _plain(self, mapping: Mapping, key: str) -> bool:
        """Whether the YAML scalar was written unquoted (Python data counts as quoted)."""
        node = self.node(mapping, key)
        return node is not None and node.id == "scalar" and node.style is None


def _regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a regex Python can compile, or None when it is one."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"is not a valid regex ({' '.join(str(e).split())})"
    return None


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (int, float)):
        return f"the number {_show(value)}"
    return f"a {type(value).__name__} ({_show(value)})"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(value: str, choices: tuple[str, ...], listing: str) -> str:
    close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"{listing}: {', '.join(choices)}"


# --------------------------------------------------------------------------------------------------
# The recipe, section by section, then the rules that tie sections together.


def _build(data: Any, doc: _Doc, base_dir: Path, output_override: str | None,
           source_path: str | None) -> Recipe:
    if not isinstance(data, Mapping):
        doc.fail(doc.line(data), f"a recipe must be a mapping of keys, got {_describe(data)}",
                 "start with 'adapters:' (see docs/recipes.md)")
    doc.known_keys(data, TOP_KEYS, "in the recipe", _BELONGS_UNDER)
    strategy = doc.choice(data, "strategy", "strategy", STRATEGIES) or "linear"
    space = doc.choice(data, "space", "space", SPACES) or "delta"
    base = doc.string(data, "base", "base")
    recipe = Recipe(
        base=None if base is None else resolve_location(base, base_dir),
        adapters=_adapters(doc, data, base_dir),
        strategy=strategy,
        space=space,
        parameters=_parameters(doc, data, strategy, space),
        output=_output(doc, data, base_dir, output_override),
        device=_device(doc, data),
        source_path=source_path,
        raw=_plain_copy(data),
        notes=tuple(doc.notes),
    )
    _check_output(doc, data, recipe)
    return recipe


def _adapters(doc: _Doc, data: Mapping, base_dir: Path) -> tuple[AdapterSpec, ...]:
    items = data.get("adapters")
    example = "e.g. adapters: [{path: ./adapters/math, weight: 0.5}]"
    if items is None:
        doc.fail(doc.line(data), "missing required key 'adapters'", f"list the adapters to merge, {example}")
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        doc.fail(doc.line(data, "adapters"), f"adapters must be a list, got {_describe(items)}",
                 f"write one '- path: ...' item per adapter, {example}")
    if not items:
        doc.fail(doc.line(data, "adapters"), "adapters is empty", f"list at least one adapter, {example}")
    specs = []
    for i, item in enumerate(items):
        name = f"adapters[{i}]"
        if not isinstance(item, Mapping):
            doc.fail(doc.line(items, i), f"{name} must be a mapping with 'path' (and 'weight'), "
                     f"got {_describe(item)}", "write it as '- path: ...' with an optional 'weight: ...' below")
        doc.known_keys(item, ADAPTER_KEYS, f"in {name}")
        path = doc.string(item, "path", f"{name}.path")
        if path is None:
            doc.fail(doc.line(items, i), f"{name} has no 'path'", "add 'path: <folder or org/name>'")
        weight = doc.per_module(item, "weight", f"{name}.weight", doc.number, "write a number, e.g. 'weight: 0.5'")
        specs.append(AdapterSpec(resolve_location(path, base_dir), 1.0 if weight is None else weight))
    return tuple(specs)


def _parameters(doc: _Doc, data: Mapping, strategy: str, space: str) -> MergeParameters:
    p = doc.section(data, "parameters", PARAMETER_KEYS)
    density = doc.per_module(p, "density", "parameters.density", doc.fraction,
                             "density is the fraction of each delta kept, e.g. 'density: 0.5'")
    sign = doc.choice(p, "majority_sign_method", "parameters.majority_sign_method", MAJORITY_SIGN_METHODS)
    convention = doc.choice(p, "convention", "parameters.convention", CONVENTIONS) or "peft"
    rank = doc.integer(p, "rank", "parameters.rank", "write a whole number >= 1, e.g. 'rank: 16'")
    if rank is not None and rank < 1:
        doc.fail(doc.line(p, "rank"), f"parameters.rank must be >= 1, got {rank}", "e.g. 'rank: 16'")
    clamp = doc.fraction(p, "clamp", "parameters.clamp", "clamp is a quantile, e.g. 'clamp: 0.99'")
    seed = doc.integer(p, "seed", "parameters.seed", "write a whole number, e.g. 'seed: 0'")
    if seed is not None and not 0 <= seed < 2**63:
        doc.fail(doc.line(p, "seed"), f"parameters.seed must be >= 0 and < 2**63, got {seed}", "e.g. 'seed: 0'")

    if space == "factors" and convention == "mergekit":
        doc.fail(doc.line(p, "convention"), "parameters.convention 'mergekit' cannot be used with space: factors",
                 "space: factors reproduces PEFT's add_weighted_adapter; use space: delta for mergekit's arithmetic")
    if space == "factors" and strategy not in FACTOR_SPACE_STRATEGIES:
        doc.fail(doc.line(data, "space"), f"space: factors does not support strategy '{strategy}'",
                 "PEFT has no such combination type; use space: delta")
    if strategy in PRUNING_STRATEGIES and density is None:
        doc.fail(doc.line(data, "strategy"), f"strategy '{strategy}' needs parameters.density",
                 "add 'density: 0.5' (the fraction of each delta kept) under 'parameters:'")
    _reject_unused(doc, p, strategy, space)
    return MergeParameters(
        density=density,
        majority_sign_method=sign or "total",
        rank=rank,
        clamp=clamp,
        seed=0 if seed is None else seed,
        convention=convention,
    )


def _reject_unused(doc: _Doc, p: Mapping, strategy: str, space: str) -> None:
    # A knob the strategy ignores is reported, not silently dropped: it often means the recipe does not
    # do what its author thinks (e.g. a seed on ties, which has no randomness). Only cat's rank is an
    # error, since it contradicts what cat is. The rest are notes, so that one recipe can try strategies.
    used = parameters_used(strategy, space)
    for key in PARAMETER_KEYS:
        if p.get(key) is None or key in used:
            continue
        line = doc.line(p, key, of_key=True)
        if key == "rank" and strategy == "cat":
            doc.fail(line, "parameters.rank cannot be used with strategy 'cat'",
                     "cat's rank is the sum of the adapters' ranks; remove rank, or use svd to choose one")
        where = f"{doc.source}:{line}: " if line else ""
        if key == "rank":
            doc.notes.append(f"{where}parameters.rank has no effect with strategy '{strategy}' in space: factors "
                             f"(PEFT keeps the adapters' common rank; use {_svd_variant(strategy)} to choose one)")
            continue
        if key == "convention":
            doc.notes.append(f"{where}parameters.convention has no effect with strategy '{strategy}': both "
                             "conventions compute the weighted sum of the deltas (mergekit's task_arithmetic)")
            continue
        users = [s for s in STRATEGIES if key in parameters_used(s, space)]
        doc.notes.append(f"{where}parameters.{key} has no effect with strategy '{strategy}' "
                         f"(it is read by {', '.join(users)})")


def _svd_variant(strategy: str) -> str:
    return "svd" if strategy == "linear" else f"{strategy}_svd"


def _output(doc: _Doc, data: Mapping, base_dir: Path, override: str | None) -> OutputSpec:
    out = doc.section(data, "output", OUTPUT_KEYS)
    path = doc.string(out, "path", "output.path")
    kind = doc.choice(out, "kind", "output.kind", OUTPUT_KINDS) or "adapter"
    dtype = doc.choice(out, "dtype", "output.dtype", DTYPES, DTYPE_ALIASES)
    if override is not None:
        if not str(override).strip():
            raise RecipeError("the output override (-o) is empty", "pass a folder, e.g. -o out/merged")
        resolved = os.path.abspath(os.path.expanduser(override))  # against the working directory
    elif path is None:
        doc.fail(doc.line(data, "output", of_key=True) if "output" in data else doc.line(data),
                 "missing output.path", "add 'output:' with 'path: out/merged', or pass -o OUT")
    else:
        resolved = os.path.normpath(os.path.abspath(base_dir / os.path.expanduser(path)))
    if kind == "model" and data.get("base") is None:
        doc.fail(doc.line(out, "kind"), "output.kind 'model' needs a base model",
                 "add 'base: <folder or org/name>' at the top level, or use kind: adapter")
    return OutputSpec(path=resolved, kind=kind, dtype=dtype)


def _device(doc: _Doc, data: Mapping) -> str:
    value = doc.string(data, "device", "device")
    if value is None or value in DEVICES:
        return value or "auto"
    match = _DEVICE.fullmatch(value)
    if match is None:
        # no "did you mean": the list is short, and difflib would offer 'cpu' for 'gpu'
        doc.fail(doc.line(data, "device"), f"unknown device {value!r}", "use one of: auto, cpu, cuda, cuda:N")
    return f"cuda:{int(match.group(1))}"


def _check_output(doc: _Doc, data: Mapping, recipe: Recipe) -> None:
    # Writing over an input while reading it would destroy it, --force or not.
    inputs = [("base", recipe.base)] + [(f"adapters[{i}]", a.path) for i, a in enumerate(recipe.adapters)]
    for name, location in inputs:
        if location is not None and location == recipe.output.path:
            out = data.get("output")
            line = doc.line(out, "path") if isinstance(out, Mapping) and "path" in out else None
            doc.fail(line, f"the output folder is the same as {name} ({location})",
                     "write the result to a new folder")


def _plain_copy(data: Any) -> Any:
    """``data`` as JSON-able plain dicts and lists (tuples from Python callers become lists)."""
    if isinstance(data, Mapping):
        return {k: _plain_copy(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain_copy(v) for v in data]
    return data
