"""PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` keys (``peft.utils.other.get_pattern_key``).

The FIRST pattern in the config's (JSON) order that matches wins, not the most specific one; a pattern is a
regex anchored at the end of the module path and starting at a dot boundary.
"""

from __future__ import annotations

import re


def pattern_value(patterns: dict | None, module_path: str, default):
    """Value of the first pattern matching ``module_path``, else ``default``.

    Example:
        >>> pattern_value({"q_proj": 3, "layers.0.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj", 8)
        3
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default
