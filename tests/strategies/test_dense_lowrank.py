"""``truncate_dense``: the randomized path against the float64 best rank-k, and its rank decisions against the rules
applied to the true spectrum."""

from __future__ import annotations

import math

import pytest
import torch

from adaptool.strategies.dense_lowrank import padded_spectrum, squared_norm, truncate_dense
from adaptool.strategies.rank_rules import RankRule, choose_rank

M, N = 1100, 1300  # above EXACT_MAX_DIM: the sketch runs


def with_spectrum(S: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(M, S.numel(), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(N, S.numel(), generator=g, dtype=torch.float64)).Q
    return (U * S) @ V.T


SPECTRA = {
    "geometric": 0.97 ** torch.arange(M, dtype=torch.float64),
    "slow": (torch.arange(M, dtype=torch.float64) + 1) ** -0.5,
    "low rank + noise": torch.cat([torch.linspace(10, 5, 16, dtype=torch.float64), torch.full((M - 16,), 0.01,
                                                                                              dtype=torch.float64)]),
}


@pytest.fixture(scope="module", params=list(SPECTRA))
def case(request):
    S = SPECTRA[request.param]
    return with_spectrum(S), S


def best_error(S: torch.Tensor, k: int) -> float:
    return math.sqrt(float((S[k:] ** 2).sum() / (S ** 2).sum()))


@pytest.mark.parametrize("rule", [RankRule("rank", 16), RankRule("sv_fro", 0.6), RankRule("sv_ratio", 3.5),
                                  RankRule("sv_fro", 0.99, max_rank=40)], ids=str)
def test_sketch_within_1e3_of_best_and_same_rank_as_exact(case, rule):
    D64, S = case
    cut = truncate_dense(D64.float(), rule)
    k = choose_rank(S, rule, (M, N))
    assert cut.rank == k
    assert cut.method == ("randomized" if k + 32 < M // 2 else "exact")
    best = best_error(S, k)
    measured = float((D64 - cut.B.double() @ cut.A.double()).norm() / D64.norm())
    assert measured <= best * (1 + 1e-3) + 1e-6
    assert cut.error == pytest.approx(measured, rel=1e-4, abs=1e-6)
    assert cut.energy == pytest.approx(1 - best ** 2, rel=1e-3)


def test_deterministic_and_seeded(case):
    D = case[0].float()
    a, b = truncate_dense(D, RankRule("rank", 8), seed=3), truncate_dense(D, RankRule("rank", 8), seed=3)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    c = truncate_dense(D, RankRule("rank", 8), seed=4)
    assert not torch.equal(a.A, c.A) and c.error == pytest.approx(a.error, rel=1e-3)


def test_cumulative_and_small_take_the_exact_svd():
    D = SPECTRA["geometric"][:200]
    cut = truncate_dense(with_spectrum(SPECTRA["geometric"]).float(), RankRule("sv_cumulative", 0.5))
    assert cut.method == "exact" and cut.best_error is not None
    assert cut.rank == choose_rank(SPECTRA["geometric"], RankRule("sv_cumulative", 0.5), (M, N))
    small = torch.randn(64, 300, dtype=torch.float64) * D[:64, None]
    cut = truncate_dense(small.float(), RankRule("rank", 10))
    assert cut.method == "exact" and cut.error == pytest.approx(cut.best_error, rel=1e-5)


def test_zero_delta_is_one_zero_pair():
    cut = truncate_dense(torch.zeros(300, 2000), RankRule("sv_fro", 0.9))
    assert cut.rank == 1 and not cut.A.any() and not cut.B.any() and cut.error == 0.0 and cut.energy == 1.0


def test_padded_spectrum_keeps_the_energy_and_bounds_the_tail():
    S = torch.tensor([5.0, 3.0, 1.0])
    padded = padded_spectrum(S, total2=40.0, length=8)
    assert padded.numel() == 8 and float((padded ** 2).sum()) == pytest.approx(40.0)
    assert torch.all(padded[3:] == padded[3]) and padded[3] <= S[-1]


def test_squared_norm_is_accurate_for_big_matrices():
    D = torch.randn(4096, 3000, dtype=torch.float64) * torch.rand(4096, 1, dtype=torch.float64)
    exact = float((D * D).sum())
    assert squared_norm(D.float()) == pytest.approx(exact, rel=1e-8)
    assert squared_norm(D.float().T) == pytest.approx(exact, rel=1e-6)
    B, A = torch.randn(4096, 3), torch.randn(3, 3000)
    assert squared_norm(D.float(), B, A) == pytest.approx(float(((D - B.double() @ A.double()) ** 2).sum()), rel=1e-6)
