"""``push``: publish a finished output to the Hugging Face Hub, after checking it is what adaptool wrote.

The output is verified first (:mod:`adaptool.output.manifest`; a folder that fails is refused, nothing is sent),
then the files its manifest lists, and the manifest, go to ``ORG/NAME`` in one commit
(:func:`adaptool.io.hub_upload.upload`: the repo created if missing, ``--private`` when asked, the branch
``--revision`` created from the default branch if missing). The commit message names the command and the
recipe hash the output records, so a commit on the hub says how its files were made::

    adaptool merge, recipe 3f2a…9c1d

Every writing command's ``--push-to-hub ORG/NAME`` calls :func:`push` once its output is in place.
"""

from __future__ import annotations

import os
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.io.hub_upload import check_repo_id, check_revision, upload
from adaptool.output.manifest import MANIFEST_NAME, check_file, check_folder
from adaptool.version import __version__


def check_push_options(repo_id: str | None, private: bool = False, revision: str | None = None) -> None:
    """What a writing command checks before any work when ``--push-to-hub`` (or its companions) is given."""
    if repo_id is None:
        if private or revision is not None:
            raise AdaptoolError(f"{'--private' if private else '--revision'} needs --push-to-hub ORG/NAME",
                                "add --push-to-hub ORG/NAME, or leave the option out")
        return
    check_repo_id(repo_id)
    check_revision(revision)


def commit_message(made_by: dict) -> tuple[str, str]:
    """(summary line, description) of the commit: the command and the recipe hash."""
    command = made_by.get("command") or "output"
    recipe = made_by.get("recipe_sha256")
    summary = f"adaptool {command}" + (f", recipe {recipe[:16]}" if recipe else "")
    description = (f"recipe_sha256: {recipe}\n" if recipe else "") + (
        f"Made by adaptool {__version__}; `adaptool verify` checks the files against {MANIFEST_NAME}.")
    return summary, description


def push(output: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> dict:
    """Verify ``output`` and commit it to the hub repo ``repo_id``.

    Args:
        output (str | Path): an output folder (with its manifest) or a single ``.safetensors`` file adaptool wrote.
        repo_id (str): ``ORG/NAME``; created (``exist_ok``) when missing.
        private (bool): create the repo private (an existing repo keeps its visibility).
        revision (str | None): the branch to commit to (created from the default branch when missing).

    Returns:
        dict: ``output``, ``command`` ("push"), ``repo_id``, ``revision``, ``commit``, ``url``, ``files``,
        ``message``.

    Raises:
        AdaptoolError: the output fails verification (nothing is sent), or the hub or network refuses (one line).
    """
    check_push_options(repo_id, private, revision)
    local = Path(os.path.expanduser(str(output)))
    if local.is_dir():
        report = check_folder(local)
        root, entries = local, [*report["entries"], {"path": MANIFEST_NAME, "sha256": None}]
    elif local.is_file():
        report = check_file(local)
        root, entries = local.parent, [{"path": local.name, "sha256": None}]
    else:
        raise AdaptoolError(f"{output} not found", "give the output folder or file to push")
    message, description = commit_message(report)
    result = upload(root, entries, repo_id, private=private, revision=revision, message=message,
                    description=description)
    return {"output": str(output), "command": "push", **result, "message": message}
