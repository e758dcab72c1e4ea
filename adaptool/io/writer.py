"""Header-first safetensors writer.

safetensors has no streaming writer, but every output tensor's name, dtype and shape is known from the
plan before any math runs, so the header (with all offsets) is written first and the tensor bytes are
streamed after it in header order, one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from adaptool.io.safetensors_file import DTYPE_SIZES, copy_range, dtype_code


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def header_bytes(tensors: list[OutputTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file whose tensors arrive in the order given to the constructor.

    Args:
        path (Path): file to create.
        tensors (list[OutputTensor]): every tensor of the file, in write order.
        metadata (dict[str, str] | None): the ``__metadata__`` block.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._expected = list(tensors)
        self._next = 0
        self._file = open(self.path, "wb")
        self._file.write(header_bytes(self._expected, metadata))

    def _take(self, name: str, nbytes: int) -> None:
        if self._next >= len(self._expected) or self._expected[self._next].name != name:
            want = self._expected[self._next].name if self._next < len(self._expected) else "nothing"
            raise RuntimeError(f"writer for {self.path.name} expected {want}, got {name}")
        if self._expected[self._next].nbytes != nbytes:
            raise RuntimeError(f"{name}: {nbytes} bytes, header promised {self._expected[self._next].nbytes}")
        self._next += 1

    def write_tensor(self, name: str, tensor) -> None:
        """Append a whole CPU tensor (it must have the dtype and shape promised in the header)."""
        spec = self._expected[self._next] if self._next < len(self._expected) else None
        if spec is not None and spec.name == name and (dtype_code(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape):
            raise RuntimeError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, header promised {spec.dtype} {spec.shape}")
        self._take(name, tensor.numel() * tensor.element_size())
        self.write_part(tensor)

    def begin_tensor(self, name: str) -> int:
        """Start a tensor that arrives in parts (``write_part``); returns its byte size."""
        spec = self._expected[self._next] if self._next < len(self._expected) else None
        nbytes = spec.nbytes if spec is not None else -1
        self._take(name, nbytes)
        return nbytes

    def write_part(self, tensor) -> None:
        """Append the raw bytes of a contiguous CPU tensor block."""
        if tensor.numel():
            import torch

            self._file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def copy_part(self, src_handle, start: int, length: int) -> None:
        """Append ``length`` bytes of another file at ``start`` (an unchanged tensor), copied by the kernel,
        after ``begin_tensor``."""
        copy_range(src_handle, self._file, start, length)

    def close(self) -> None:
        if self._next != len(self._expected):
            missing = self._expected[self._next].name
            self._file.close()
            raise RuntimeError(f"{self.path.name}: closed before {missing} was written")
        self._file.flush()
        self._file.close()

    def abort(self) -> None:
        self._file.close()
