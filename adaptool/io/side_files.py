"""Files an input folder names, and the side files (config, tokenizer…) that travel with the weights.

An input folder may only lend us its own regular files. A name is a relative path that stays inside the
folder when read lexically (no absolute path, no ``..``); what it resolves to (symlinks followed) must be a
regular file inside the folder's real path, or, when the folder is a hub-cache snapshot
(``…/models--org--name/snapshots/<revision>``), inside that same repo's ``blobs/`` folder, where
huggingface_hub keeps the bytes its snapshot symlinks point at. Anything else (a link to ``/proc/self/environ``
or another user's file, a FIFO, a device) is refused with one line, before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from adaptool.errors import AdaptoolError

SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
SKIP_SIDE_FILES = {"model.safetensors.index.json", "adapter_config.json"}
HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def allowed_roots(root: Path) -> list[Path]:
    """Real folders the files of input folder ``root`` may resolve into: its own, and its hub repo's blobs."""
    lexical = Path(os.path.abspath(root))
    real = Path(os.path.realpath(root))
    roots = [real]
    for snap in (lexical, real):
        if snap.parent.name == "snapshots" and snap.parent.parent.name.startswith(HUB_REPO_PREFIXES):
            blobs = Path(os.path.realpath(snap.parent.parent / "blobs"))
            if blobs not in roots:
                roots.append(blobs)
    return roots


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def inside_file(root: Path, name: str, what: str = "file") -> Path:
    """``root / name`` (normalised), after checking that it is a regular file inside input folder ``root``.

    Args:
        root (Path): the input folder.
        name (str): a relative file name or path, as an index or a pattern gives it.
        what (str): what the file is, for messages.

    Raises:
        AdaptoolError: ``name`` is absolute, climbs out with ``..``, resolves outside the folder (see the
            module docstring for hub-cache snapshots), is missing, or is not a regular file.
    """
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name):
        raise AdaptoolError(f"{what} {str(name)[:200]!r} of {root} is not a relative file name",
                            "an input may only name files inside its own folder")
    norm = os.path.normpath(name)
    if norm == "." or norm == ".." or norm.startswith(".." + os.sep):
        raise AdaptoolError(f"{what} {name[:200]!r} points outside {root}",
                            "an input may only name files inside its own folder")
    path = root / norm
    real = Path(os.path.realpath(path))
    if not any(_within(real, r) for r in allowed_roots(root)):
        raise AdaptoolError(f"{what} {path} links outside its folder (to {real})",
                            "copy the file into the folder instead of linking to it")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise AdaptoolError(f"{what} {path} is missing", "re-download the model") from None
    except OSError as e:
        raise AdaptoolError(f"{what} {path}: cannot read ({e.strerror or e})", "check the file") from None
    if not stat.S_ISREG(mode):
        raise AdaptoolError(f"{what} {path} is not a regular file", "replace it with the real file")
    return path


def side_files(src: Path) -> list[Path]:
    """config.json, generation_config.json, tokenizer files… of ``src``, each checked with :func:`inside_file`
    (folders matching a pattern are skipped)."""
    found = []
    for pattern in SIDE_FILE_PATTERNS:
        for f in sorted(Path(src).glob(pattern)):
            if f.name in SKIP_SIDE_FILES or f.is_dir():
                continue
            found.append(inside_file(src, f.name, "side file"))
    return found


def copy_side_files(src: Path, dst: Path, new_dtype: str | None) -> None:
    """Copy the side files of ``src`` into ``dst`` as regular files (the bytes a link resolves to, never the
    link), with ``torch_dtype``/``dtype`` of config.json set to ``new_dtype`` when given."""
    for f in side_files(src):
        try:
            shutil.copyfile(os.path.realpath(f), dst / f.name)
        except OSError as e:
            raise AdaptoolError(f"side file {f}: cannot copy ({e.strerror or e})", "check the file") from None
    cfg = dst / "config.json"
    if new_dtype and cfg.exists():
        try:
            data = json.loads(cfg.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise AdaptoolError(f"{src / 'config.json'}: invalid JSON ({e})", "repair the file") from None
        if not isinstance(data, dict):
            raise AdaptoolError(f"{src / 'config.json'}: not a JSON object", "repair the file")
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = new_dtype
        cfg.write_text(json.dumps(data, indent=2) + "\n")
