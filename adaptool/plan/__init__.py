"""The Plan every command builds and the engine runs: output files, their tensors, how each is produced."""

from adaptool.plan.plan import Computed, FromBase, Plan, PlannedFile, Sink
from adaptool.plan.resolve import TensorResolver, group_edits

__all__ = ["Computed", "FromBase", "Plan", "PlannedFile", "Sink", "TensorResolver", "group_edits"]
