"""The typed Plan: for each output file, which tensors it holds and how each is produced.

A tensor is produced in one of three ways:

* :class:`FromBase` without edits: a base tensor copied byte for byte (file to file, by the kernel), or
  converted to the output dtype;
* :class:`FromBase` with edits: a base tensor read in row blocks, edited in float32, rounded once (or, replaced
  whole by a tensor of another shape, written from the replacement alone);
* :class:`Computed`: tensors computed from the inputs (one module's merged factors, a carried
  ``modules_to_save`` tensor), whose shapes may only be known once computed.

A file holds either base tensors (streamed: its header is written first, since every shape is known) or
computed tensors (computed, then written sorted by name). The plan's :class:`Sink` writes what is not a
tensor (index, configs, side files, model card) once every file is written. Commands build plans; only the
engine (:mod:`adaptool.engine`) runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from adaptool.io.safetensors_file import TensorInfo
from adaptool.io.writer import OutputTensor


@dataclass(frozen=True)
class FromBase:
    """Output tensor ``source.name``: the base tensor ``source`` in dtype ``dtype`` (a safetensors code), after
    ``edits`` (:mod:`adaptool.ops.edits`, applied in order; none: a copy).

    ``shape``: the output's shape where it is not the base tensor's, None where it is. Only a whole-tensor
    replacement of another shape (a resized vocabulary) makes one, and it is then the tensor's only edit: the
    header is sized from it and nothing of the base tensor is read.
    """

    source: TensorInfo
    dtype: str
    edits: tuple = ()
    shape: tuple[int, ...] | None = None

    @property
    def out(self) -> OutputTensor:
        return OutputTensor(self.source.name, self.dtype, self.source.shape if self.shape is None else self.shape)

    @property
    def resized(self) -> bool:
        return self.shape is not None and tuple(self.shape) != tuple(self.source.shape)

    @property
    def is_copy(self) -> bool:
        return not self.edits and self.dtype == self.source.dtype and not self.resized


@dataclass(frozen=True)
class Computed:
    """Tensors computed from the inputs on the compute device.

    ``produce(device)`` returns ``(tensors, energy)``: output name -> tensor (any device), and the share of
    energy a rank cut kept (None: no cut). The engine converts each tensor to ``dtype`` (None: as produced),
    checks it is finite and moves it to the CPU. ``concurrent``: ``produce`` shares no scratch state with the
    file's other computed items, so on a CPU the engine may run several at once, one core each.
    """

    label: str
    produce: Callable
    dtype: object = None  # torch.dtype | None
    nbytes_estimate: int = 0
    concurrent: bool = False


@dataclass
class PlannedFile:
    """One safetensors file of the output: ``name`` is its path inside the output folder.

    ``metadata``: the header's ``__metadata__``, or a function giving it, called when the header is written (a
    file of computed tensors writes it last, so the inputs' digests may be computed meanwhile).
    """

    name: str
    metadata: dict[str, str] | Callable[[], dict[str, str]]
    tensors: list[FromBase] = field(default_factory=list)
    computed: list[Computed] = field(default_factory=list)

    def header_metadata(self) -> dict[str, str]:
        if callable(self.metadata):
            self.metadata = self.metadata()
        return self.metadata

    @property
    def nbytes_estimate(self) -> int:
        return sum(t.out.nbytes for t in self.tensors) + sum(c.nbytes_estimate for c in self.computed)


class Sink(Protocol):
    """Writes an output's non-tensor files into the finished folder, and says what the run did."""

    def finish(self, folder: Path, plan: "Plan", stats) -> None: ...

    def summary(self, stats) -> dict: ...


@dataclass
class Plan:
    """Everything a run writes. ``inputs``: the paths the output may not touch (see :mod:`adaptool.output.target`)."""

    files: list[PlannedFile]
    sink: Sink
    inputs: list[Path] = field(default_factory=list)

    @property
    def items(self) -> int:
        return sum(len(f.tensors) + len(f.computed) for f in self.files)

    @property
    def nbytes_estimate(self) -> int:
        return sum(f.nbytes_estimate for f in self.files)
