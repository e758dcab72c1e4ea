"""Turn a user's "path or hub id" into a local folder.

A local path always wins. Otherwise ``org/name[@revision]`` is fetched (or found in the cache) with
huggingface_hub, which honours ``HF_HUB_CACHE``, ``HF_HOME`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from adaptool.errors import AdaptoolError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w.-]+(?:/[\w.-]+)*))?$", re.ASCII)


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` or ``org/name@revision`` in shape (whether or not such a repo exists)."""
    return bool(HUB_ID.match(value)) and ".." not in value

#: seconds a hub request may wait for a connection or for its next bytes (``ADAPTOOL_HUB_TIMEOUT`` overrides)
HUB_TIMEOUT_S = 60.0

BASE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja",
                 "*.tiktoken"]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json"]


def is_hub_id(spec: str) -> bool:
    return looks_like_hub_id(spec) and not Path(spec).exists()


def resolve(spec: str, what: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder (or file) for ``spec``.

    Args:
        spec (str): a local path, or a hub id ``org/name`` with an optional ``@revision``.
        what (str): "base model" or "adapter", for messages.
        allow_patterns (list[str] | None): files to fetch from the hub. Default: everything.

    Raises:
        AdaptoolError: the path does not exist, or the hub id cannot be resolved.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    m = HUB_ID.match(spec)
    if not m:
        raise AdaptoolError(f"{what} {spec!r} not found", "give an existing folder or a hub id like org/name")
    from huggingface_hub import snapshot_download

    bound_requests()
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    repo, rev = m.group("repo"), m.group("rev")
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:
        raise AdaptoolError(
            f"{what} {spec!r} is neither a local folder nor in the hub cache (offline or unreachable)",
            "download it first (hf download), or unset HF_HUB_OFFLINE",
        ) from None
    except RevisionNotFoundError:
        raise AdaptoolError(f"{what} {spec!r}: revision {rev!r} not found", "check the @revision") from None
    except GatedRepoError:
        raise AdaptoolError(f"{what} {spec!r} is gated", "accept its licence on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise AdaptoolError(f"{what} {spec!r} not found locally or on the hub", "check the spelling, or log in for a private repo") from None
    except OSError as e:
        raise AdaptoolError(f"{what} {spec!r} could not be fetched: {e}", "check your network or HF_HUB_OFFLINE") from None


def _timeout_s() -> float:
    raw = os.environ.get("ADAPTOOL_HUB_TIMEOUT", "")
    try:
        value = float(raw) if raw else HUB_TIMEOUT_S
    except ValueError:
        raise AdaptoolError(f"ADAPTOOL_HUB_TIMEOUT={raw!r} is not a number", "give seconds, e.g. 60") from None
    return value if value > 0 else HUB_TIMEOUT_S


def bound_requests() -> None:
    """huggingface_hub's HTTP client waits forever by default (``timeout=None``, also passed per request): an
    endpoint that accepts and never answers would hang the run. Its transport gets a connect and per-read
    timeout for every request that sets none, unless the user installed a client factory of their own."""
    from huggingface_hub.utils import _http

    default = getattr(_http, "default_client_factory", None)
    if default is None or getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not default:
        return
    seconds = _timeout_s()

    def bounded_client():
        client = default()
        client._transport = _BoundedTransport(client._transport, seconds)
        return client

    _http.set_client_factory(bounded_client)


class _BoundedTransport:
    """An httpx transport that fills in a timeout where a request carries none."""

    def __init__(self, inner, seconds: float):
        self._inner = inner
        self._seconds = seconds

    def handle_request(self, request):
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: given.get(k) if given.get(k) is not None else self._seconds
                                         for k in ("connect", "read", "write", "pool")}
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._inner.__exit__(*exc)
