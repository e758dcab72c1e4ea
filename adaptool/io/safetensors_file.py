"""Lazy, copy-friendly access to one ``.safetensors`` file.

We parse the header ourselves instead of memory-mapping the file: a tensor (or a block of its rows) is read
with one ``pread`` into a buffer, so resident memory holds only the tensors in flight (an mmap would keep
every touched page of a 5 GB shard resident), and a truncated file is a clean error, never a SIGBUS.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from adaptool.errors import AdaptoolError

# safetensors dtype codes and their element sizes.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER = 100_000_000  # the safetensors library's bound


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` bytes ``[start, end)`` hold ``shape`` elements of ``dtype``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def open_regular(path: Path, what: str = "file"):
    """Open ``path`` for binary reading, refusing anything but a regular file (a FIFO, a device or a folder
    in place of a weights file must fail at once, not block or read forever).

    Raises:
        AdaptoolError: the file is missing, unreadable or not a regular file.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise AdaptoolError(f"{path}: not a regular file", f"replace it with the real {what}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdaptoolError(f"{path}: file not found", "check the path") from None
    except OSError as e:
        raise AdaptoolError(f"{path}: cannot read ({e.strerror or e})", "check the file and its permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the two checks
        os.close(fd)
        raise AdaptoolError(f"{path}: not a regular file", f"replace it with the real {what}")
    return os.fdopen(fd, "rb")


class _HeaderError(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _HeaderError(f"key {k[:200]!r} appears twice")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header, as strictly as the ``safetensors`` library does.

    Checked before any read is sized from it: a regular file; a header length that fits the file and
    ``MAX_HEADER``; a UTF-8 JSON object without duplicate keys; ``__metadata__`` (when present) a str->str
    object; every entry a known ``dtype``, a ``shape`` of non-negative ints and ``data_offsets`` of two
    ints with ``begin <= end`` and ``end - begin == numel * itemsize``; sorted by offset, the tensors cover
    the data section exactly (contiguous from 0, no gap or overlap, the last one ending at the file end).

    Returns:
        (tensors, metadata): tensor infos in file order (absolute byte offsets) and ``__metadata__``.

    Raises:
        AdaptoolError: the file is missing, truncated, not a regular file, or not valid safetensors.
    """
    path = Path(path)
    hint = "re-download or re-save the checkpoint"
    with open_regular(path, "safetensors file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _HeaderError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or n + 8 > size:
                raise _HeaderError(f"header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
            if len(raw) != n:
                raise _HeaderError("header is truncated")
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except OSError as e:
            raise AdaptoolError(f"{path}: cannot read ({e.strerror or e})", "check the file") from None
        except RecursionError:
            raise AdaptoolError(f"{path}: not a valid safetensors file (header nested too deeply)", hint) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise AdaptoolError(f"{path}: not a valid safetensors file ({str(e)[:200]})", hint) from None
    if not isinstance(header, dict):
        raise AdaptoolError(f"{path}: not a valid safetensors file (header is not a JSON object)", hint)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdaptoolError(f"{path}: __metadata__ is not an object of strings", hint)
    data_start, data_size = 8 + n, size - 8 - n
    tensors = []
    for name, entry in header.items():
        shown = name if len(name) <= 200 else name[:200] + "…"
        bad = f"{path}: malformed header entry for tensor {shown!r}"
        if not isinstance(entry, dict):
            raise AdaptoolError(bad, hint)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise AdaptoolError(f"{bad}: unknown dtype", "only standard safetensors dtypes are supported")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise AdaptoolError(f"{bad}: shape is not a list of non-negative integers", hint)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise AdaptoolError(f"{bad}: data_offsets is not [begin, end]", hint)
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offsets
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise AdaptoolError(f"{path}: tensor {shown!r} has inconsistent dtype/shape/offsets", hint)
        tensors.append(TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    expected = data_start
    for t in tensors:
        if t.start != expected:
            what = "overlap another tensor" if t.start < expected else "leave a gap before it"
            raise AdaptoolError(f"{path}: the data offsets of tensor {t.name[:200]!r} {what} (corrupt file)", hint)
        expected = t.end
    if expected - data_start != data_size:
        raise AdaptoolError(f"{path}: tensors cover {expected - data_start} bytes of a {data_size}-byte data "
                            "section (truncated or corrupt file)", hint)
    return {t.name: t for t in tensors}, metadata


def torch_dtype(code: str):
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }[code]


def dtype_code(dtype) -> str:
    import torch

    codes = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }
    return codes[dtype]


def load_tensor(info: TensorInfo, handle=None):
    """Read one tensor into a fresh CPU tensor (the only copy; nothing stays mapped).

    Args:
        info (TensorInfo): the tensor to read.
        handle: an open binary file for ``info.file`` to reuse. Default: open and close one.
    """
    import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    own = handle is None
    f = open_regular(info.file) if own else handle
    try:
        f.seek(info.start)
        got = f.readinto(memoryview(buf.numpy()))
    finally:
        if own:
            f.close()
    if got != info.nbytes:
        raise AdaptoolError(f"{info.file}: tensor {info.name!r} is truncated", "re-download the checkpoint")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return buf.view(torch_dtype(info.dtype)).reshape(info.shape)


def read_block(handle, info: TensorInfo, start_row: int, stop_row: int, buf=None):
    """Rows ``[start_row, stop_row)`` of a tensor (dim 0), read with one ``pread`` into ``buf`` if given.

    Returns a CPU tensor of shape ``(stop_row - start_row, *info.shape[1:])`` viewing the buffer.
    """
    import torch

    row_bytes = info.nbytes // max(1, info.shape[0]) if info.shape else info.nbytes
    n = (stop_row - start_row) * row_bytes if info.shape else info.nbytes
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=torch.uint8)
    view = buf[:n]
    got = os.preadv(handle.fileno(), [memoryview(view.numpy())], info.start + start_row * row_bytes) if n else 0
    if got != n:
        raise AdaptoolError(f"{info.file}: tensor {info.name!r} is truncated", "re-download the checkpoint")
    shape = (stop_row - start_row, *info.shape[1:]) if info.shape else ()
    return view.view(torch_dtype(info.dtype)).reshape(shape)


def prefetch(handle, info: TensorInfo) -> None:
    """Ask the kernel to start reading a tensor's bytes (cold caches: the read overlaps our math)."""
    try:
        os.posix_fadvise(handle.fileno(), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass
