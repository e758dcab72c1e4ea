"""Publishing a finished output to the Hugging Face Hub: one commit of the files its manifest lists.

huggingface_hub does the work (``create_repo(exist_ok=True)``, ``create_branch`` for ``--revision``,
``create_commit``) and finds the token where it always does (``HF_TOKEN``, the token file of ``hf auth login``);
``HF_ENDPOINT`` points it at another hub. Every wait is bounded (:func:`adaptool.io.hub.bound_requests`), and
each way it can fail becomes one line: not allowed (HTTP 401/403), not found, unreachable or timed out, offline
mode, a refused repo id.

The files committed are exactly those the caller verified (the manifest's list), never what else may lie in
the folder; their sha256 is handed to the client, which then need not hash them again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.io.hub import bound_requests

#: a hub repo id, ``namespace/name``, as huggingface_hub's ``validate_repo_id`` accepts it (at most 96 characters
#: a part, no ``--`` or ``..``, not ending in ``.git``)
REPO_ID = re.compile(r"^\w[\w.-]{0,95}/\w[\w.-]{0,95}$", re.ASCII)
BRANCH = re.compile(r"^[\w.-]+(?:/[\w.-]+)*$", re.ASCII)
NETWORK_ERRORS = ("TransportError", "TimeoutException", "NetworkError", "ConnectError", "ConnectionError", "Timeout")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is a valid ``namespace/name``; else a one-line refusal (no network, no import)."""
    bad = (not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id
           or repo_id.endswith(".git") or any(part.endswith((".", "-")) for part in repo_id.split("/")))
    if bad:
        raise AdaptoolError(f"{str(repo_id)[:200]!r} is not a hub repo id",
                            "write ORG/NAME: letters, digits, '-', '_' and '.', e.g. my-org/llama-merged")
    return repo_id


def check_revision(revision: str | None) -> str | None:
    """A branch name to push to (None: the default branch)."""
    if revision is None:
        return None
    if not isinstance(revision, str) or not BRANCH.match(revision) or ".." in revision or revision.startswith("refs/"):
        raise AdaptoolError(f"--revision {str(revision)[:200]!r} is not a branch name", "e.g. --revision v1 or "
                            "--revision experiments/ties")
    return revision


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _is_network_error(e: BaseException) -> bool:
    return any(c.__name__ in NETWORK_ERRORS for c in type(e).__mro__)


def _http_status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _failure(e: BaseException, repo_id: str) -> AdaptoolError:
    """The one line for a failed push."""
    status = _http_status(e)
    if status in (401, 403):
        return AdaptoolError(f"the hub refused the push to {repo_id} (HTTP {status}): not logged in, or the token "
                             "may not write there", "log in with `hf auth login` or set HF_TOKEN to a token with "
                             "write access to that namespace")
    if status == 404:
        return AdaptoolError(f"the hub answered HTTP 404 for {repo_id} (no such repo or branch, or no access)",
                             "check ORG/NAME and --revision, and that your token can see the repo")
    if status is not None:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return AdaptoolError(f"the hub answered HTTP {status} to the push to {repo_id}: {first}",
                             "try again later, or check the repo on the hub")
    if type(e).__name__ == "OfflineModeIsEnabled":
        return AdaptoolError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to push")
    if _is_network_error(e):
        what = "timed out" if "Timeout" in type(e).__name__ else f"failed ({type(e).__name__})"
        return AdaptoolError(f"could not reach the hub at {_endpoint()}: the request {what}",
                             "check your network (and HF_ENDPOINT); ADAPTOOL_HUB_TIMEOUT sets how long each wait may "
                             "last")
    if type(e).__name__ == "HFValidationError":
        return AdaptoolError(f"the hub client refused {repo_id!r}: {str(e).splitlines()[0][:200]}",
                             "write ORG/NAME, e.g. my-org/llama-merged")
    return AdaptoolError(f"pushing to {repo_id} failed: {type(e).__name__}: {str(e).strip()[:200]}",
                         "try again, or push later with adaptool push OUT ORG/NAME")


def _additions(root: Path, entries: list[dict]):
    from huggingface_hub import CommitOperationAdd

    ops = []
    for e in entries:
        op = CommitOperationAdd(path_in_repo=e["path"], path_or_fileobj=str(root / e["path"]))
        if e.get("sha256"):
            op.upload_info.sha256 = bytes.fromhex(e["sha256"])  # verified just now: the client need not hash again
        ops.append(op)
    return ops


def upload(root: Path, entries: list[dict], repo_id: str, *, private: bool = False, revision: str | None = None,
           message: str, description: str = "") -> dict:
    """Commit ``entries`` (``{"path": relative path, "sha256": hex or None}``, files under ``root``) to ``repo_id``
    in one commit, creating the repo (``private`` when asked) and the branch ``revision`` where missing.

    Returns:
        dict: ``repo_id``, ``revision``, ``commit`` (its id), ``url``, ``files``.

    Raises:
        AdaptoolError: one line for each way the hub or the network can refuse.
    """
    check_repo_id(repo_id)
    check_revision(revision)
    try:
        from huggingface_hub import HfApi

        bound_requests()
        api = HfApi(endpoint=_endpoint())
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=_additions(Path(root), entries), commit_message=message,
                                 commit_description=description, revision=revision)
    except AdaptoolError:
        raise
    except Exception as e:  # the hub client's errors (HTTP, network, validation) are not one type
        raise _failure(e, repo_id) from None
    return {"repo_id": repo_id, "revision": revision or "main", "commit": getattr(info, "oid", None),
            "url": getattr(info, "commit_url", None), "files": len(entries)}
