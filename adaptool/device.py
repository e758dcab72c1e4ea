"""``--device auto|cpu|cuda[:N]`` to a torch device, with a clear error when the GPU is not there."""

from __future__ import annotations

import re

from adaptool.errors import AdaptoolError

DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str | None, gpu_pays: bool = True):
    """``spec`` as a torch device. ``auto`` is the first GPU when there is one and ``gpu_pays``, else the CPU: a
    command whose math is many small matrices (resize, align: r×r cores) runs faster on the CPU than through the
    transfers and kernel launches of a GPU (resize of a 70B-shaped r64 adapter on an H200 machine: 2.2-2.5 s on
    its CPU, 5.4 s on the GPU)."""
    import torch

    spec = (spec or "auto").strip().lower()
    if not DEVICE_SPEC.match(spec):
        raise AdaptoolError(f"unknown device {spec!r}", "use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if gpu_pays and torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise AdaptoolError(f"--device {spec} asked for a GPU, but torch sees no CUDA device",
                            "use --device cpu (or auto), or install a CUDA build of torch")
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AdaptoolError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present",
                            "pick an index below that")
    return dev


DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def resolve_dtype(name: str | None):
    """``--dtype`` to a torch dtype (None keeps each tensor's own dtype)."""
    if name is None:
        return None
    import torch

    key = DTYPE_NAMES.get(name.strip().lower())
    if key is None:
        raise AdaptoolError(f"unknown dtype {name!r}", "use float32, float16 or bfloat16")
    return getattr(torch, key)
