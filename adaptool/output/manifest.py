"""What an output holds, written by adaptool and checked by ``adaptool verify``.

An output folder gets ``adaptool-manifest.json`` as the last file written before the atomic swap: every other
file's path (relative, ``/``-separated), size and sha256, sorted by path, with the command and the recipe hash
of the run (:mod:`adaptool.output.provenance`)::

    {"format": "adaptool-manifest", "version": 1, "command": "merge", "recipe_sha256": "…",
     "files": [{"path": "README.md", "size": 812, "sha256": "…"}, …]}

The tensor files' digests come from the engine, which hashes each file as it writes it
(``EngineStats.file_digests``); any file it did not hash (configs, card, index) is hashed here.

A single-file output (a kohya/LyCORIS ``.safetensors``) has no folder to hold a manifest, and a file beside it
would not travel with it, so the file carries its own digests in its header metadata: ``adaptool.sha256_tensors``
(sha256 of the data section, every byte after the header) and ``adaptool.sha256_header`` (sha256 of the header
itself, canonical JSON with these two entries left out). :func:`seal_file` adds them once the engine has written
the file (rewriting it: an adapter-sized file), :func:`check_file` checks them.

:func:`check_folder` refuses, in one line, the first problem it finds: a manifest missing, unreadable or not
adaptool's; an entry that is not a plain relative path inside the folder (``../x``, ``/etc/passwd``, ``a//b``);
then, before any file is hashed, the first path (in sorted order) that is missing, extra (on disk but not
listed), a symlink or other non-regular file, or of another size; then the first file (in sorted order) whose
sha256 differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from pathlib import Path

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import open_regular, read_header

MANIFEST_NAME = "adaptool-manifest.json"
FORMAT = "adaptool-manifest"
VERSION = 1
TENSORS_KEY = "adaptool.sha256_tensors"
HEADER_KEY = "adaptool.sha256_header"
CHUNK = 1 << 24
MAX_MANIFEST_BYTES = 64 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REBUILD = "the output was changed after adaptool wrote it: restore the file or rebuild the output"


class VerifyError(AdaptoolError):
    """An output that is not what adaptool wrote. ``problem``: ``{"kind": …, "path": …}``, kind one of
    ``manifest``, ``missing``, ``extra``, ``symlink``, ``special``, ``size``, ``sha256``, ``header``, ``tensors``."""

    def __init__(self, message: str, hint: str | None, kind: str, path: str | None = None):
        super().__init__(message, hint)
        self.problem = {"kind": kind, "path": path, "message": message}


def file_sha256(path: Path) -> str:
    """sha256 of a regular file (never followed through a symlink)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise VerifyError(f"{path}: cannot read ({e.strerror or e})", REBUILD, "special", str(path)) from None
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise AdaptoolError(f"{path}: not a regular file", "replace it with the real file")
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tree(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(regular files -> size, other entries -> "symlink" | "special") under ``folder``, by relative path, never
    following a link; the manifest itself left out."""
    files, odd = {}, {}
    pending = [(Path(folder), "")]
    while pending:
        here, prefix = pending.pop()
        with os.scandir(here) as entries:
            for e in entries:
                rel = prefix + e.name
                if e.is_symlink():
                    odd[rel] = "symlink"
                elif e.is_dir(follow_symlinks=False):
                    pending.append((Path(e.path), rel + "/"))
                elif e.is_file(follow_symlinks=False):
                    if rel != MANIFEST_NAME:
                        files[rel] = e.stat(follow_symlinks=False).st_size
                else:
                    odd[rel] = "special"
    return files, odd


def _known_digests(folder: Path, digests: dict | None) -> dict[str, tuple[int, str]]:
    """The engine's ``file_digests`` (keys: paths in the output, absolute or relative) by relative path."""
    known = {}
    for key, value in (digests or {}).items():
        p = Path(key)
        if p.is_absolute():
            try:
                p = p.relative_to(folder)
            except ValueError:
                continue
        if isinstance(value, (tuple, list)) and len(value) == 2:
            known[p.as_posix()] = (int(value[0]), str(value[1]))
    return known


def _made_by(plan) -> dict:
    """The command and recipe hash the plan's files record (one hash over all of them when they differ: align)."""
    metas = [f.header_metadata() for f in plan.files]
    hashes = sorted({m.get("adaptool.recipe_sha256", "") for m in metas} - {""})
    recipe = hashes[0] if len(hashes) == 1 else (
        hashlib.sha256(json.dumps(hashes).encode()).hexdigest() if hashes else None)
    command = next((m["adaptool.command"] for m in metas if m.get("adaptool.command")), None)
    return {"command": command, "recipe_sha256": recipe}


def write_manifest(folder: Path, plan, stats) -> None:
    """Write :data:`MANIFEST_NAME` into the finished ``folder``: every other file's path, size and sha256 (the
    engine's digest where it computed one for a file of that size, else hashed here)."""
    folder = Path(folder)
    files, odd = _tree(folder)
    if odd:
        raise AdaptoolError(f"the output holds {min(odd)}, which is not a regular file", "this is a bug; please report it")
    known = _known_digests(folder, getattr(stats, "file_digests", None))
    entries = []
    for rel in sorted(files):
        size, digest = known.get(rel, (None, None))
        if size != files[rel] or not isinstance(digest, str) or not SHA256.match(digest):
            digest = file_sha256(folder / rel)
        entries.append({"path": rel, "size": files[rel], "sha256": digest})
    head = json.dumps({"format": FORMAT, "version": VERSION, **_made_by(plan)})[:-1]
    lines = ",\n".join("  " + json.dumps(e) for e in entries)  # one line a file: readable, diffable
    files_json = f"[\n{lines}\n]" if entries else "[]"
    (folder / MANIFEST_NAME).write_text(f'{head}, "files": {files_json}}}\n')


def _safe_entry_path(path) -> bool:
    """A plain relative path inside the folder: ``/``-separated names, none empty, ``.`` or ``..``."""
    if not isinstance(path, str) or not path or len(path) > 4096 or "\\" in path or "\0" in path:
        return False
    parts = path.split("/")
    return not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) and path != MANIFEST_NAME


def read_manifest(folder: Path) -> dict:
    """The manifest of ``folder``, checked: adaptool's format, a version this adaptool reads, every entry a safe
    relative path (no duplicates) with an integer size and a sha256.

    Raises:
        VerifyError: no manifest, or one that is not a regular file, not JSON, or not adaptool's.
    """
    path = Path(folder) / MANIFEST_NAME
    shown = str(folder)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise VerifyError(f"{shown} has no {MANIFEST_NAME}", "only outputs written by adaptool (this version or later) "
                          "carry one; rebuild the output", "manifest", MANIFEST_NAME) from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:
        raise VerifyError(f"{shown}: {MANIFEST_NAME} is not a regular file of adaptool's", REBUILD, "manifest",
                          MANIFEST_NAME)
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise VerifyError(f"{shown}: {MANIFEST_NAME} is not valid JSON ({str(e)[:120]})", REBUILD, "manifest",
                          MANIFEST_NAME) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), list):
        raise VerifyError(f"{shown}: {MANIFEST_NAME} is not an adaptool manifest", REBUILD, "manifest", MANIFEST_NAME)
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise VerifyError(f"{shown}: {MANIFEST_NAME} has version {version!r}, this adaptool reads {VERSION}",
                          "verify it with the adaptool version that wrote it", "manifest", MANIFEST_NAME)
    seen = set()
    for e in data["files"]:
        p = e.get("path") if isinstance(e, dict) else None
        if not _safe_entry_path(p) or p in seen:
            raise VerifyError(f"{shown}: {MANIFEST_NAME} lists {str(p)[:200]!r}, which is not a file path inside the "
                              "folder" + (" (twice)" if p in seen else ""), REBUILD, "manifest", MANIFEST_NAME)
        size, digest = e.get("size"), e.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str) \
                or not SHA256.match(digest):
            raise VerifyError(f"{shown}: {MANIFEST_NAME} entry {p!r} has no valid size and sha256", REBUILD,
                              "manifest", MANIFEST_NAME)
        seen.add(p)
    return data


def _first_difference(shown: str, expected: dict, files: dict, odd: dict) -> VerifyError | None:
    """The first path, in sorted order, that is missing, extra, not a regular file, or of another size."""
    for path in sorted(set(expected) | set(files) | set(odd)):
        if path in odd:
            what = "a symlink" if odd[path] == "symlink" else "not a regular file"
            return VerifyError(f"{shown}: {path} is {what} (adaptool writes only regular files)", REBUILD, odd[path],
                               path)
        if path not in files:
            return VerifyError(f"{shown}: {path} is missing (listed in {MANIFEST_NAME})", REBUILD, "missing", path)
        if path not in expected:
            return VerifyError(f"{shown}: {path} is an unexpected extra file (not in {MANIFEST_NAME})", REBUILD,
                               "extra", path)
        if files[path] != expected[path]["size"]:
            return VerifyError(f"{shown}: {path} changed: {files[path]} bytes, the manifest says "
                               f"{expected[path]['size']}", REBUILD, "size", path)
    return None


def check_folder(folder: Path) -> dict:
    """Check an output folder against its manifest (see the module docstring for the order of the checks).

    Returns:
        dict: ``files``, ``bytes``, ``command``, ``recipe_sha256`` and ``entries`` (the manifest's file list).

    Raises:
        VerifyError: the first problem found, in one line.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    expected = {e["path"]: e for e in manifest["files"]}
    files, odd = _tree(folder)
    problem = _first_difference(str(folder), expected, files, odd)
    if problem is not None:
        raise problem
    for path in sorted(expected):
        if file_sha256(folder / path) != expected[path]["sha256"]:
            raise VerifyError(f"{folder}: {path} changed: its sha256 differs from the manifest's", REBUILD, "sha256",
                              path)
    return {"files": len(expected), "bytes": sum(e["size"] for e in expected.values()),
            "command": manifest.get("command"), "recipe_sha256": manifest.get("recipe_sha256"),
            "entries": [expected[p] for p in sorted(expected)]}


# ------------------------------------------------------------------------------------------ single files


def _read_raw_header(f) -> tuple[dict, int]:
    """(header as parsed, in file order; where the data section starts) of an open safetensors file."""
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n).decode("utf-8")), 8 + n


def _data_sha256(f, start: int) -> str:
    f.seek(start)
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def header_sha256(header: dict) -> str:
    """sha256 of a safetensors header without the two digest entries: canonical JSON (sorted keys, no spaces)."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k not in (TENSORS_KEY, HEADER_KEY)}
    body = {**{k: v for k, v in header.items() if k != "__metadata__"}, "__metadata__": meta}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_file(path: Path) -> None:
    """Add :data:`TENSORS_KEY` and :data:`HEADER_KEY` to the header metadata of the safetensors file ``path``
    (the header is rewritten, 8-byte aligned as safetensors writes it; the data section is copied unchanged)."""
    path = Path(path)
    sealed = path.with_name(path.name + ".sealed")
    with open(path, "rb") as f:
        header, start = _read_raw_header(f)
        data_digest = _data_sha256(f, start)
        meta = header.get("__metadata__") or {}
        meta.pop(TENSORS_KEY, None)
        meta.pop(HEADER_KEY, None)
        header = {"__metadata__": meta, **{k: v for k, v in header.items() if k != "__metadata__"}}
        meta[TENSORS_KEY] = data_digest
        meta[HEADER_KEY] = header_sha256(header)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(sealed, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            f.seek(start)
            while chunk := f.read(CHUNK):
                out.write(chunk)
    os.replace(sealed, path)


def check_file(path: Path) -> dict:
    """Check a single-file output against the digests in its own header.

    Raises:
        VerifyError: no digests in the header, or the header or the tensor data changed.
    """
    path = Path(path)
    _, meta = read_header(path)  # as strict as the safetensors library: a mangled header fails here
    if TENSORS_KEY not in meta or HEADER_KEY not in meta:
        raise VerifyError(f"{path} carries no adaptool digests ({TENSORS_KEY})",
                          "only adaptool's single-file outputs (convert --to kohya) carry them; verify an output "
                          "folder by naming the folder", "manifest", path.name)
    with open_regular(path) as f:
        header, start = _read_raw_header(f)
        if header_sha256(header) != meta[HEADER_KEY]:
            raise VerifyError(f"{path}: the header changed (tensor names, shapes or metadata differ from what adaptool "
                              "wrote)", REBUILD, "header", path.name)
        if _data_sha256(f, start) != meta[TENSORS_KEY]:
            raise VerifyError(f"{path}: the tensor data changed (its sha256 differs from {TENSORS_KEY})", REBUILD,
                              "tensors", path.name)
    size = path.stat().st_size
    return {"files": 1, "bytes": size, "command": meta.get("adaptool.command"),
            "recipe_sha256": meta.get("adaptool.recipe_sha256"),
            "entries": [{"path": path.name, "size": size, "sha256": None}]}
