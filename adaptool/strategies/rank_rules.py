"""How many singular values to keep: the rank rules of ``resize`` and ``extract`` (kohya's names, DESIGN's
formulas — no +1).

Given the singular values ``σ₁ ≥ σ₂ ≥ …`` of a module's ΔW:

* ``rank R``: ``min(R, rank of ΔW)`` (singular values below float32 noise do not count);
* ``sv_fro F``: the smallest k with ``‖ΔW_k‖_F ≥ F·‖ΔW‖_F``, i.e. ``sqrt(Σ_{i≤k} σᵢ²) ≥ F·sqrt(Σ σᵢ²)``;
* ``sv_cumulative C``: the smallest k with ``Σ_{i≤k} σᵢ ≥ C·Σ σᵢ``;
* ``sv_ratio X``: ``k = #{σᵢ ≥ σ₁ / X}``;

then capped by ``max_rank``, and at least 1 (a PEFT LoRA module has rank ≥ 1; a zero ΔW keeps one zero pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptool.errors import AdaptoolError

RULES = ("rank", "sv_fro", "sv_cumulative", "sv_ratio")
FLAGS = {"rank": "--rank", "sv_fro": "--sv-fro", "sv_cumulative": "--sv-cumulative", "sv_ratio": "--sv-ratio"}


@dataclass(frozen=True)
class RankRule:
    """One rule and its value, with an optional cap."""

    kind: str
    value: float
    max_rank: int | None = None

    @classmethod
    def from_options(cls, rank=None, sv_fro=None, sv_cumulative=None, sv_ratio=None, max_rank=None) -> "RankRule":
        """Exactly one of the four options, validated (one-line errors naming the flag)."""
        given = {k: v for k, v in (("rank", rank), ("sv_fro", sv_fro), ("sv_cumulative", sv_cumulative),
                                    ("sv_ratio", sv_ratio)) if v is not None}
        if len(given) != 1:
            named = ", ".join(FLAGS[k] for k in given) or "none"
            raise AdaptoolError(f"give exactly one of --rank, --sv-fro, --sv-cumulative, --sv-ratio (got {named})",
                                "e.g. --rank 16, or --sv-fro 0.9")
        kind, value = next(iter(given.items()))
        _check(kind, value)
        if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
            raise AdaptoolError(f"--max-rank must be a positive integer, got {max_rank}", "e.g. --max-rank 64")
        return cls(kind, float(value), None if max_rank is None else int(max_rank))

    def describe(self) -> str:
        text = f"{FLAGS[self.kind]} {self.value:g}"
        return text + (f" (at most rank {self.max_rank})" if self.max_rank else "")


def _check(kind: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise AdaptoolError(f"{FLAGS[kind]} must be a number, got {value!r}", "e.g. --rank 16")
    if kind == "rank" and (int(value) != value or value < 1):
        raise AdaptoolError(f"--rank must be a positive integer, got {value:g}", "e.g. --rank 16")
    if kind in ("sv_fro", "sv_cumulative") and not 0 < value <= 1:
        raise AdaptoolError(f"{FLAGS[kind]} must be in (0, 1], got {value:g}", f"e.g. {FLAGS[kind]} 0.9")
    if kind == "sv_ratio" and not value >= 1:
        raise AdaptoolError(f"--sv-ratio must be >= 1, got {value:g}", "e.g. --sv-ratio 20")


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values stand above float32 rounding noise of the largest (numpy's matrix_rank rule)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = float(S[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((S > tol).sum())


def choose_rank(S: torch.Tensor, rule: RankRule, shape: tuple[int, int]) -> int:
    """The rank to keep for singular values ``S`` (descending, any float dtype) of an ``(out, in)`` ΔW."""
    S = S.double()
    n = numerical_rank(S, shape)
    if n == 0:
        return 1
    if rule.kind == "rank":
        k = min(int(rule.value), n)
    elif rule.kind == "sv_fro":
        energy = torch.cumsum(S**2, 0)
        k = int((energy < (rule.value**2) * energy[-1] * (1 - 1e-12)).sum()) + 1
    elif rule.kind == "sv_cumulative":
        total = torch.cumsum(S, 0)
        k = int((total < rule.value * total[-1] * (1 - 1e-12)).sum()) + 1
    else:
        k = int((S >= S[0] / rule.value).sum())
    k = min(k, n)
    if rule.max_rank is not None:
        k = min(k, rule.max_rank)
    return max(1, k)
