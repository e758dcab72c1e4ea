"""``verify``: check that an output is, byte for byte, what adaptool wrote.

An output folder is checked against its ``adaptool-manifest.json`` (every file's path, size and sha256); a
single-file output (a kohya/LyCORIS ``.safetensors``) against the digests in its own header. The first problem
ends the check with one line (see :mod:`adaptool.output.manifest` for which one comes first).
"""

from __future__ import annotations

import os
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.output.manifest import MANIFEST_NAME, check_file, check_folder


def verify(path: str | Path) -> dict:
    """Check the output at ``path`` (a folder adaptool wrote, or a single ``.safetensors`` file it wrote).

    Args:
        path (str | Path): the output.

    Returns:
        dict: ``output``, ``command`` ("verify"), ``intact`` (True), ``kind`` ("folder" or "file"), ``files``,
        ``bytes``, and ``made_by``: the command and the recipe hash the output records.

    Raises:
        adaptool.output.manifest.VerifyError: (an :class:`~adaptool.errors.AdaptoolError`) the first missing,
            changed or unexpected file, or a manifest missing or not adaptool's; its ``problem`` says which.
        AdaptoolError: ``path`` does not exist.

    Example:
        >>> verify("out/merged")  # doctest: +SKIP
        {'output': 'out/merged', 'intact': True, 'files': 7, ...}
    """
    shown = str(path)
    local = Path(os.path.expanduser(shown))
    if local.is_dir():
        kind, report = "folder", check_folder(local)
    elif local.is_file():
        kind, report = "file", check_file(local)
    elif os.path.lexists(local):
        raise AdaptoolError(f"{shown} is neither a folder nor a regular file", "give the output folder or file")
    else:
        raise AdaptoolError(f"{shown} not found", f"give an output folder (it holds {MANIFEST_NAME}) or a "
                            ".safetensors file adaptool wrote")
    return {"output": shown, "command": "verify", "intact": True, "kind": kind, "files": report["files"],
            "bytes": report["bytes"],
            "made_by": {"command": report["command"], "recipe_sha256": report["recipe_sha256"]}}
