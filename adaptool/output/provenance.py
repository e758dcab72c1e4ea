"""What went into an output: safetensors metadata and the model card, in portable terms.

The same inputs and settings give the same bytes wherever the inputs lie and wherever the output goes, so no
path of the machine enters an output. Every input is named portably:

* a hub input (a folder or file inside a hub-cache snapshot, ``…/models--org--name/snapshots/<commit>``) by its
  repo id and the commit it resolved to: ``{"hub": "org/name", "revision": "<commit>"}``;
* a local input by its folder (or file) name: ``{"name": "my-lora"}``.

An adapter's entry adds its type and ``sha256`` (its ``adapter_config.json`` bytes then its weights file: what
:meth:`~adaptool.io.adapter_folder.AdapterFolder.sha256` computes); a base checkpoint's adds
``headers_sha256``: a digest of what identifies it cheaply, never its weights (see :func:`headers_sha256`).
``adaptool.recipe_sha256`` is the sha256 of everything else the metadata records (command, settings, inputs;
not adaptool's version), so two outputs with the same recipe hash were made from the same inputs the same way.
The output path is no part of any of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path, PurePosixPath

from adaptool.io.hub import looks_like_hub_id
from adaptool.io.safetensors_file import open_regular
from adaptool.version import __version__

#: the metadata keys left out of the recipe hash (they say which adaptool wrote the file, not what it made)
NOT_HASHED = ("format", "adaptool.version", "adaptool.recipe_sha256")
HUB_REPO_PREFIX = "models--"


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def hub_origin(path: str | Path) -> dict | None:
    """``{"hub": repo id, "revision": commit[, "file": path inside the snapshot]}`` when ``path`` lies in a
    hub-cache snapshot (symlinks not followed: a snapshot's files link into its ``blobs/``), else None."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    for snap in (p, *p.parents):
        if snap.parent.name == "snapshots" and snap.parent.parent.name.startswith(HUB_REPO_PREFIX) and snap.name:
            repo = snap.parent.parent.name[len(HUB_REPO_PREFIX):].replace("--", "/")
            entry = {"hub": repo, "revision": snap.name}
            if snap != p:
                entry["file"] = p.relative_to(snap).as_posix()
            return entry
    return None


def input_entry(path: str | Path) -> dict:
    """How an output names the local folder or file ``path`` that an input was read from (see the module
    docstring)."""
    return hub_origin(path) or {"name": Path(os.path.abspath(os.path.expanduser(str(path)))).name}


def portable_name(entry: dict) -> str:
    """An input entry as one string for command lines and cards: ``org/name@<commit>`` or the local name."""
    if "hub" in entry:
        return f"{entry['hub']}@{entry['revision']}"
    return entry["name"]


def portable_spec(spec: str | None) -> str | None:
    """What a user named (a path or a hub id) in portable terms: an existing local path becomes its hub repo id
    (inside a hub-cache snapshot) or its name; a hub id stays as written; any other path string its last part."""
    if spec is None:
        return None
    spec = str(spec)
    local = Path(os.path.expanduser(spec))
    if spec and local.exists():
        origin = hub_origin(local)
        return origin["hub"] if origin else Path(os.path.abspath(local)).name
    return portable_reference(spec)


def portable_reference(text: str | None) -> str | None:
    """A model reference read from a file (``base_model_name_or_path``, ``_name_or_path``): a hub id stays, a
    local path becomes its last part (``/home/me/models/llama`` -> ``llama``). Idempotent."""
    if not isinstance(text, str) or not text:
        return text
    if looks_like_hub_id(text) and not text.startswith(("/", "~", ".")):
        return text
    origin = hub_origin(text) if os.path.isabs(os.path.expanduser(text)) else None
    if origin is not None:
        return origin["hub"]
    name = PurePosixPath(text.replace("\\", "/").rstrip("/")).name
    return name or text


def hub_model_id(*candidates: str | None) -> str | None:
    """The first candidate that is a hub id (its ``@revision`` dropped), for a card's ``base_model:``."""
    for c in candidates:
        if isinstance(c, str) and looks_like_hub_id(c) and not c.startswith(("/", "~", ".")):
            return c.split("@", 1)[0]
    return None


def headers_sha256(checkpoint) -> str:
    """sha256 over what identifies a base checkpoint cheaply: its ``config.json`` bytes, its index's bytes (when
    sharded) and every shard's safetensors header (the 8-byte length and the JSON: names, dtypes, shapes,
    offsets, metadata), each preceded by its name. Equal digests mean the same layout and config, not the same
    weights: hashing the weights of a 400B model would take longer than the run."""
    h = hashlib.sha256()
    root = Path(checkpoint.root)
    files = [root / "config.json"]
    if checkpoint.sharded:
        files.append(root / "model.safetensors.index.json")
    for f in files:
        if f.is_file():
            with open_regular(f) as fh:
                h.update(f.name.encode() + b"\0" + fh.read() + b"\0")
    for shard in sorted(checkpoint.shards, key=lambda s: Path(os.path.relpath(s, root)).as_posix()):
        with open_regular(shard, "weights file") as fh:
            prefix = fh.read(8)
            (n,) = struct.unpack("<Q", prefix)
            h.update(Path(os.path.relpath(shard, root)).as_posix().encode() + b"\0" + prefix + fh.read(n) + b"\0")
    return h.hexdigest()


def base_entry(checkpoint) -> dict:
    """A base checkpoint's entry: its portable name and :func:`headers_sha256`."""
    if checkpoint is None:
        return None
    return {**input_entry(checkpoint.root), "headers_sha256": headers_sha256(checkpoint)}


def adapter_entry(adapter) -> dict:
    """An adapter's entry: its portable name, type and sha256."""
    return {**input_entry(adapter.input_path), "peft_type": adapter.peft_type, "sha256": adapter.sha256()}


def adapter_name(adapter) -> str:
    return portable_name(input_entry(adapter.input_path))


def base_name(checkpoint) -> str:
    return portable_name(input_entry(checkpoint.root))


def portable_recipe(recipe, base, adapters: list) -> dict:
    """``recipe.to_dict()`` with every input path replaced by its portable name and no output path."""
    d = json.loads(json.dumps(recipe.to_dict()))
    if d.get("base") is not None and base is not None:
        d["base"] = base_name(base)
    elif d.get("base") is not None:
        d["base"] = portable_spec(d["base"])
    for spec, a in zip(d.get("adapters", []), adapters):
        spec["path"] = adapter_name(a)
    d.get("output", {}).pop("path", None)
    return d


def recipe_sha256(meta: dict[str, str]) -> str:
    """sha256 of the portable recipe: every metadata entry but :data:`NOT_HASHED`, canonical JSON."""
    return hashlib.sha256(_canonical({k: v for k, v in meta.items() if k not in NOT_HASHED}).encode()).hexdigest()


def metadata(command: str, base, adapters: list, extra: dict | None = None) -> dict[str, str]:
    """String-valued ``__metadata__`` for every output shard (safetensors allows only strings).

    Args:
        command (str): the command's name.
        base (Checkpoint | None): the base checkpoint read, if any.
        adapters (list): the adapters read.
        extra (dict | None): the command's settings (``adaptool.<key>``; non-strings as JSON). No paths.
    """
    meta = {
        "format": "pt",
        "adaptool.version": __version__,
        "adaptool.command": command,
        "adaptool.adapters": _canonical([adapter_entry(a) for a in adapters]),
    }
    if base is not None:
        meta["adaptool.base"] = _canonical(base_entry(base))
    for k, v in (extra or {}).items():
        meta[f"adaptool.{k}"] = v if isinstance(v, str) else _canonical(v)
    meta["adaptool.recipe_sha256"] = recipe_sha256(meta)
    return meta


def deferred_metadata(command: str, base, adapters: list, extra: dict | None = None):
    """:func:`metadata` as a function to call when the header is written; the adapters' digests start now, each
    on a thread of its own, and overlap the work until then."""
    for a in adapters:
        a.sha256_soon()
    return lambda: metadata(command, base, adapters, extra)


def model_card(title: str, command: str, adapters: list, *, base=None, base_model: str | None = None,
               stats: dict | None = None, recipe_yaml: str | None = None) -> str:
    """The ``README.md`` of an output.

    Args:
        title (str): the heading (portable: no path).
        command (str): the command line, inputs by portable name.
        adapters (list): the adapters read.
        base (Checkpoint | None): the base read, if any.
        base_model (str | None): a further candidate for the card's ``base_model:`` (an adapter config's
            ``base_model_name_or_path``): the front matter names a base only when it is a hub id: the base input's
            repo, else the base config's ``_name_or_path``, else this.
        stats (dict | None): the engine's stats (tensors changed, delta retention).
        recipe_yaml (str | None): the portable recipe, shown in the card.
    """
    origin = input_entry(base.root) if base is not None else {}
    hub_id = hub_model_id(origin.get("hub"), (base.config if base is not None else {}).get("_name_or_path"),
                          base_model)
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines += ["tags:", "  - adaptool", "  - merged", "---", "", f"# {title}", ""]
    lines.append(f"Made by [adaptool](https://pypi.org/project/adaptool/) {__version__} with `{command}`.")
    lines.append("")
    if base is not None:
        lines += [f"Base model: `{portable_name(origin)}`", ""]
    lines += ["| adapter | type | sha256 |", "|---|---|---|"]
    for a in adapters:
        lines.append(f"| `{adapter_name(a)}` | {a.peft_type} | `{a.sha256()[:16]}…` |")
    if stats:
        lines += ["", f"Tensors changed: {stats.get('tensors_changed')} of {stats.get('tensors_total')}."]
        if stats.get("delta_retention") is not None:
            lines.append(f"Share of the adapters' change kept after rounding to the output dtype: "
                         f"{stats['delta_retention']:.4f} (mean over tensors).")
    if recipe_yaml:
        lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"
