"""All-or-nothing output folders.

Everything is written into a hidden folder beside the target and renamed into place at the very end, so
Ctrl-C, SIGKILL, a full disk or an error leave nothing at the target path. A lock file beside the target
makes a second run to the same target fail at once instead of at the end, and the folders of runs that
were killed are swept away by the next run in the same place.

The names beside the target are short (a hash of the target's name), so a legal 255-byte target name
still leaves room for them:

    .adaptool-lock-<key>            held (flock) by the run writing <target>; holds its PID and name
    .adaptool-tmp-<key>-<pid>       the folder being written
    .adaptool-old-<key>-<pid>       the replaced folder (with --force), removed after the swap
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from adaptool.errors import AdaptoolError

TMP_MARK = ".adaptool-tmp-"
OLD_MARK = ".adaptool-old-"
LOCK_MARK = ".adaptool-lock-"
_OURS = re.compile(r"^\.adaptool-(tmp|old)-[0-9a-f]{12}-(\d+)$")


def _key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output_path(target: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output path whose replacement could destroy something that is not ours to destroy.

    The target may not be empty, ``/``, the home or working folder or a folder holding either, nor an
    input, inside one, or a folder holding one; paths are compared after resolving symlinks (both where
    the link points and where the link itself lies).

    Returns:
        Path: the target as an absolute path (symlinks in it kept).
    """
    raw = str(target)
    if not raw.strip():
        raise AdaptoolError("the output path is empty", "pass a new folder with -o (is a shell variable unset?)")
    absolute = Path(os.path.abspath(os.path.expanduser(raw)))
    places = {_real(absolute), _real(absolute.parent) / absolute.name}
    for name, protected in (("the root folder", Path("/")), ("your home folder", Path.home()),
                            ("the working folder", Path.cwd())):
        if any(_contains(p, _real(protected)) for p in places):
            raise AdaptoolError(f"refusing to write to {raw!r}: it is or holds {name}",
                                "pass a new folder with -o, e.g. -o out/merged")
    for source in inputs:
        real_input = _real(Path(source).expanduser())
        if any(_contains(p, real_input) or _contains(real_input, p) for p in places):
            raise AdaptoolError(f"refusing to write to {raw!r}: it is, holds or lies inside the input {source}",
                                "write the output to a new folder outside every input")
    return absolute


def _replaceable_link(target: Path, force: bool) -> bool:
    """Whether ``target`` is a symlink (only the link is ever replaced); without ``force`` that is refused."""
    if not target.is_symlink():
        return False
    if not force:
        raise AdaptoolError(f"output path {target} is a symlink",
                            "pass --force to replace the link (what it points to is left alone), or choose another -o")
    return True


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing target unless ``force``: a non-empty folder, or a symlink (only the link is ever
    replaced). A file is refused even with ``force``."""
    target = Path(target)
    if _replaceable_link(target, force):
        return
    if target.exists() and not target.is_dir():
        raise AdaptoolError(f"output path {target} exists and is not a folder", "choose another path with -o")
    if target.is_dir() and not force and any(target.iterdir()):
        raise AdaptoolError(f"output folder {target} already exists and is not empty",
                            "pass --force to replace it, or choose another path with -o")


def preflight(target: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Everything a real run checks about its target before any work: :func:`check_output_path` and
    :func:`check_target` (``--dry-run`` calls this too). Returns the absolute target."""
    absolute = check_output_path(target, inputs)
    check_target(absolute, force)
    return absolute


def check_file_target(target: Path, force: bool) -> None:
    """The rule for an output that is one file (a kohya/LyCORIS ``.safetensors``): an existing file, or a
    symlink (only the link is ever replaced), is refused unless ``force``; a folder or anything that is not a
    regular file is refused even with ``force``."""
    target = Path(target)
    if _replaceable_link(target, force):
        return
    if target.is_dir():
        raise AdaptoolError(f"output path {target} is a folder, and this output is one file",
                            "give a file path with -o, e.g. -o out/adapter.safetensors")
    if target.exists() and not target.is_file():
        raise AdaptoolError(f"output path {target} exists and is not a regular file", "choose another path with -o")
    if target.exists() and not force:
        raise AdaptoolError(f"output file {target} already exists", "pass --force to replace it, or choose another path with -o")


def preflight_file(target: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """:func:`preflight` for a single-file output (:func:`check_file_target`). Returns the absolute target."""
    absolute = check_output_path(target, inputs)
    check_file_target(absolute, force)
    return absolute


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path) -> None:
    """Remove what killed runs left in ``parent``: our temp and replaced folders whose PID is gone, and
    lock files nobody holds."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _OURS.match(entry.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            _remove(Path(entry.path))
        elif entry.name.startswith(LOCK_MARK) and entry.is_file(follow_symlinks=False):
            lock = _try_lock(Path(entry.path))
            if lock is not None:
                _unlock(Path(entry.path), lock)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def flush_to_disk(path: Path) -> None:
    """fsync ``path`` — a file, or a folder with every file and folder in it (deepest first) — so that a rename
    that publishes it never exposes names whose bytes a crash could still lose. Files already synced (the engine's
    tensor files) cost nothing here; what is left is the sink's small files and the folder entries."""
    if path.is_dir() and not path.is_symlink():
        for dirpath, _, filenames in os.walk(path, topdown=False):
            for name in filenames:
                _fsync(os.path.join(dirpath, name))
            _fsync(dirpath)
    else:
        _fsync(str(path))


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink the sink wrote: its target is not ours to sync
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):  # a filesystem without fsync
            raise
    finally:
        os.close(fd)


def _sync_entry(folder: Path) -> None:
    """fsync ``folder`` so that a rename in it survives a crash, where that can be done: the output is already in
    place, so a folder this process may not open (write and search permission only) or sync is no error."""
    try:
        _fsync(str(folder))
    except OSError:
        pass


def _remove_surely(path: Path) -> None:
    """``_remove`` that a signal cannot cut short: interrupted, it finishes first, then lets the signal through."""
    pending = None
    while True:
        try:
            _remove(path)
            break
        except Exception:
            raise
        except BaseException as e:  # KeyboardInterrupt, the CLI's signal exceptions
            pending = e
    if pending is not None:
        raise pending


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if missing), or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:  # the holder before us may have unlinked the file between our open and our flock: start again
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip().split("\n", 1)[0] or "unknown"
    except OSError:
        return "unknown"


class AtomicDir:
    """Context manager yielding a temporary folder that becomes ``target`` only on success.

    On entry the target is checked (:func:`check_output_path`, :func:`check_target`), locked against other
    runs, and dead runs' leftovers beside it are swept. On success the old target (with ``force``) is
    swapped out only after the new folder is complete; a symlink target is replaced as a link.

    Example:
        >>> with AtomicDir(Path("out"), force=False, inputs=[base_dir]) as tmp:
        ...     (tmp / "model.safetensors").write_bytes(b"...")
    """

    def __init__(self, target: Path, force: bool = False, inputs: Iterable[str | Path] = ()):
        self.target = Path(os.path.abspath(os.path.expanduser(str(target)))) if str(target).strip() else Path("")
        self.raw = target
        self.force = force
        self.inputs = list(inputs)
        key = _key(self.target.name)
        self.tmp = self.target.parent / f"{TMP_MARK}{key}-{os.getpid()}"
        self.lock_path = self.target.parent / f"{LOCK_MARK}{key}"
        self._lock: int | None = None

    def __enter__(self) -> Path:
        check_output_path(self.raw, self.inputs)
        self._check_target()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _try_lock(self.lock_path)
        except OSError as e:
            raise AdaptoolError(f"cannot write in {self.target.parent}: {e.strerror}",
                                "choose a writable output path") from None
        if self._lock is None:
            raise AdaptoolError(f"another adaptool run (PID {_holder(self.lock_path)}) is writing {self.target}",
                                "wait for it to finish, or choose another -o")
        try:
            os.write(self._lock, f"{os.getpid()}\n{self.target.name}\n".encode("utf-8", "surrogateescape"))
            sweep_stale(self.target.parent)
            _remove_surely(self.tmp)
            self.tmp.mkdir()
        except BaseException:
            self._release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                _remove_surely(self.tmp)
                return False
            self._swap()
        finally:
            self._release()
        return False

    def _swap(self) -> None:
        """Old target out, new folder in, old removed; a symlink target is moved and removed as a link.
        Interrupted half-way, the old target is put back and the new folder removed."""
        old = self.target.parent / f"{OLD_MARK}{_key(self.target.name)}-{os.getpid()}"
        try:
            flush_to_disk(self.tmp)
            self._check_target()
            if os.path.lexists(self.target):
                os.rename(self.target, old)
            os.rename(self.tmp, self.target)
            _sync_entry(self.target.parent)
        except BaseException:
            if os.path.lexists(self.tmp):  # not swapped: restore the old target, drop the new one
                if os.path.lexists(old) and not os.path.lexists(self.target):
                    os.rename(old, self.target)
                _remove_surely(self.tmp)
            else:
                _remove_surely(old)
            raise
        _remove_surely(old)

    def _check_target(self) -> None:
        check_target(self.target, self.force)

    def _release(self) -> None:
        if self._lock is not None:
            _unlock(self.lock_path, self._lock)
            self._lock = None


class AtomicFile(AtomicDir):
    """:class:`AtomicDir` for an output that is one file: the caller writes the file ``inner`` in the temporary
    folder it yields; on success that file is renamed onto ``target`` (an atomic replace: an old file, or with
    ``force`` a symlink, is swapped out in one step, never followed) and the temporary folder removed. The rules
    for the target are :func:`check_file_target`'s; the lock, the sweep and the cleanup are :class:`AtomicDir`'s.

    Example:
        >>> with AtomicFile(Path("out/lora.safetensors"), inner="lora.safetensors") as tmp:
        ...     (tmp / "lora.safetensors").write_bytes(b"...")
    """

    def __init__(self, target: Path, force: bool = False, inputs: Iterable[str | Path] = (), inner: str = "out"):
        super().__init__(target, force, inputs)
        self.inner = inner

    def _check_target(self) -> None:
        check_file_target(self.target, self.force)

    def _swap(self) -> None:
        written = self.tmp / self.inner
        try:
            if not written.is_file() or written.is_symlink():
                raise AdaptoolError(f"nothing was written for {self.target}", "this is a bug; please report it")
            flush_to_disk(written)
            self._check_target()
            os.rename(written, self.target)
            _sync_entry(self.target.parent)
        finally:
            _remove_surely(self.tmp)
