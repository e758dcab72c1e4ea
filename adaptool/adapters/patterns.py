"""PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys (``peft.utils.other.get_pattern_key``).

The FIRST pattern in the config's (JSON) order that matches wins, not the most specific one; a pattern is a
regex anchored at the end of the module path and starting at a dot boundary. The patterns are compiled once,
when the config is parsed (:mod:`adaptool.adapters.config`), and only matched against module names of a
bounded length.
"""

from __future__ import annotations

import re

from adaptool.errors import AdaptoolError

MAX_NAME_CHARS = 1000  # real module paths are well under 200 characters


def key_regex(key: str) -> re.Pattern:
    """The regex PEFT matches a pattern key with (``re.match``). Raises ``re.error`` for a bad key."""
    return re.compile(rf"(.*\.)?({key})$")


def first_match(patterns, module_path: str, default):
    """Value of the first of ``patterns`` (``.regex``/``.value`` pairs, config order) matching ``module_path``,
    else ``default``.

    Example:
        >>> from adaptool.adapters.config import parse_config
        >>> cfg = parse_config({"rank_pattern": {"q_proj": 3, "layers.0.self_attn.q_proj": 2}}, "example")
        >>> first_match(cfg.rank_pattern, "model.layers.0.self_attn.q_proj", 8)
        3
    """
    if not patterns:
        return default
    check_name(module_path)
    for p in patterns:
        if p.regex.match(module_path):
            return p.value
    return default


def check_name(module_path: str) -> None:
    """Refuse a module name too long to run a config's regexes on."""
    if len(module_path) > MAX_NAME_CHARS:
        raise AdaptoolError(f"module name {module_path[:60]}... is {len(module_path)} characters long "
                            f"(the limit is {MAX_NAME_CHARS})",
                            "the adapter's tensor names are not module names of a model; re-save it")
