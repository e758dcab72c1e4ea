"""All-or-nothing output folders.

Everything is written into a hidden folder beside the target and renamed into place at the very end, so
Ctrl-C, SIGKILL, a full disk or an error leave nothing at the target path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from adaptool.errors import AdaptoolError

TMP_MARK = ".adaptool-tmp-"


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing non-empty target unless ``force`` (called before any work starts)."""
    if target.exists() and not target.is_dir():
        raise AdaptoolError(f"output path {target} exists and is a file", "choose another path with -o")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise AdaptoolError(f"output folder {target} already exists and is not empty",
                            "pass --force to replace it, or choose another path with -o")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(parent: Path, name: str) -> None:
    """Remove temporary folders left beside the target by runs that were killed."""
    for p in parent.glob(f".{name}{TMP_MARK}*"):
        try:
            pid = int(p.name.rsplit("-", 1)[-1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


class AtomicDir:
    """Context manager yielding a temporary folder that becomes ``target`` only on success.

    Example:
        >>> with AtomicDir(Path("out"), force=False) as tmp:
        ...     (tmp / "model.safetensors").write_bytes(b"...")
    """

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target).absolute()
        self.force = force
        self.tmp = self.target.parent / f".{self.target.name}{TMP_MARK}{os.getpid()}"

    def __enter__(self) -> Path:
        check_target(self.target, self.force)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AdaptoolError(f"cannot create {self.target.parent}: {e.strerror}",
                                "choose a writable output path") from None
        _sweep_stale(self.target.parent, self.target.name)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        trash = None
        if self.target.exists():
            check_target(self.target, self.force)
            trash = self.target.parent / f".{self.target.name}.adaptool-old-{os.getpid()}"
            os.rename(self.target, trash)
        os.rename(self.tmp, self.target)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return False
