"""What went into an output: safetensors metadata and the model card."""

from __future__ import annotations

import json

from adaptool.version import __version__


def metadata(command: str, base: str | None, adapters: list, extra: dict | None = None) -> dict[str, str]:
    """String-valued ``__metadata__`` for every output shard (safetensors allows only strings)."""
    meta = {
        "format": "pt",
        "adaptool.version": __version__,
        "adaptool.command": command,
        "adaptool.adapters": json.dumps(
            [{"source": a.source, "peft_type": a.peft_type, "sha256": a.sha256()} for a in adapters],
            separators=(",", ":"),
        ),
    }
    if base:
        meta["adaptool.base"] = base
    for k, v in (extra or {}).items():
        meta[f"adaptool.{k}"] = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return meta


def deferred_metadata(command: str, base: str | None, adapters: list, extra: dict | None = None):
    """:func:`metadata` as a function to call when the header is written; the adapters' digests start now, each
    on a thread of its own, and overlap the work until then."""
    for a in adapters:
        a.sha256_soon()
    return lambda: metadata(command, base, adapters, extra)


def model_card(title: str, command: str, base: str | None, adapters: list, stats: dict | None = None,
               recipe_yaml: str | None = None) -> str:
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "  - adaptool", "  - merged", "---", "", f"# {title}", ""]
    lines.append(f"Made by [adaptool](https://pypi.org/project/adaptool/) {__version__} with `{command}`.")
    lines.append("")
    if base:
        lines += [f"Base model: `{base}`", ""]
    lines += ["| adapter | type | sha256 |", "|---|---|---|"]
    for a in adapters:
        lines.append(f"| `{a.source}` | {a.peft_type} | `{a.sha256()[:16]}…` |")
    if stats:
        lines += ["", f"Tensors changed: {stats.get('tensors_changed')} of {stats.get('tensors_total')}."]
        if stats.get("delta_retention") is not None:
            lines.append(f"Share of the adapters' change kept after rounding to the output dtype: "
                         f"{stats['delta_retention']:.4f} (mean over tensors).")
    if recipe_yaml:
        lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"
