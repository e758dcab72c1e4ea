"""An adapter's weights file read once: one buffer that the digest, the finiteness check and every tensor come from.

An adapter is small next to its base, and a run needs every byte of it three ways (its sha256 for provenance,
a NaN/Inf check before anything is written, the tensors for the edits): the whole file is read into one
``torch.uint8`` buffer on first use, and each of those is computed from that buffer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import TensorInfo, open_regular, torch_dtype

CHUNK = 1 << 24


class WeightsBuffer:
    """The bytes of one weights file, read whole on first use.

    Args:
        path (Path): the file.
        prefix (bytes): bytes hashed before the file's (a PEFT folder: its ``adapter_config.json``).
    """

    def __init__(self, path: Path, prefix: bytes = b""):
        self.path = Path(path)
        self.prefix = prefix
        self._data: torch.Tensor | None = None
        self._sha256: str | None = None

    def data(self) -> torch.Tensor:
        """The whole file, (file size,) ``torch.uint8``; read on the first call."""
        if self._data is None:
            with open_regular(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                buf = torch.empty(size, dtype=torch.uint8)
                view, got = memoryview(buf.numpy()), 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
            self._data = buf[:got]
        return self._data

    def sha256(self) -> str:
        """Hex digest of ``prefix`` + the file's bytes."""
        if self._sha256 is None:
            h = hashlib.sha256(self.prefix)
            h.update(memoryview(self.data().numpy()))
            self._sha256 = h.hexdigest()
        return self._sha256

    def view(self, info: TensorInfo) -> torch.Tensor:
        """Tensor ``info`` (``info.shape``, its dtype) viewing the buffer: read it, never change it.

        Raises:
            AdaptoolError: the file ends before the tensor does (it shrank since its header was read).
        """
        data = self.data()
        if info.end > data.numel():
            raise AdaptoolError(f"{info.file}: tensor {info.name!r} is truncated", "re-download the checkpoint")
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        raw = data[info.start:info.end]
        if info.start % dtype.itemsize:
            raw = raw.clone()  # a view across dtypes needs an offset aligned to the element size
        return raw.view(dtype).reshape(info.shape)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """Tensor ``info`` as a fresh CPU tensor (a copy out of the buffer: the caller may change it)."""
        return self.view(info).clone()


def stream_sha256(path: Path, prefix: bytes = b"") -> str:
    """Hex digest of ``prefix`` + the bytes of ``path``, read in chunks (for files whose tensors are loaded
    otherwise, e.g. a pickled ``.bin``)."""
    h = hashlib.sha256(prefix)
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf, or None when all are finite."""
    for name, t in tensors:
        if t.is_floating_point() and t.numel():
            # One float32 (float64) sum first: NaN/Inf whenever an element is, ~20x faster than isfinite().all()
            # on bf16; the full check only when the sum is not finite (it may overflow on its own).
            total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(t).all()):
                return name
    return None


def non_finite_error(source: str, name: str) -> AdaptoolError:
    """The error for an adapter tensor holding NaN or Inf (raise it)."""
    return AdaptoolError(f"{source}: tensor {name} contains NaN or Inf", "the adapter is broken; retrain or re-export it")
