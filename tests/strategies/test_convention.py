"""``convention: mergekit`` against mergekit 0.1.5 itself, and ``convention: peft`` against PEFT, on dense deltas.

:class:`~adaptool.strategies.blockwise.BlockwiseMerge` is fed low-rank factors; the oracles get the same deltas
as dense float64 tensors. mergekit's in-memory API (``merge_tensors`` with a zero base, so its result is the
merged delta) is the oracle where it is installed (the ``test`` extra has it); a short float64 restatement of
its documented rules is the oracle where it is not. DARE masks: mergekit draws them with ``torch.bernoulli`` on
the global RNG, so the tests hand it adaptool's masks (drawn from the same per-adapter generators).
"""

import pytest
import torch
from peft.utils import merge_utils as mu

from adaptool.errors import AdaptoolError
from adaptool.strategies.blockwise import BlockwiseMerge

# mergekit method (with its default normalize/rescale) for each strategy under convention: mergekit
MERGEKIT_METHOD = {"linear": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties", "dare_linear": "dare_linear",
                   "magnitude_prune": "breadcrumbs"}
SHAPE = (40, 36)


def _factors(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(SHAPE[0], r, generator=g) for r in (3, 5, 2)[:n]]
    As = [torch.randn(r, SHAPE[1], generator=g) for r in (3, 5, 2)[:n]]
    return Bs, As, [0.5, 2.0, 1.25][:n]


def _deltas(Bs, As, coeffs):
    return [(b.double() @ a.double()) * c for b, a, c in zip(Bs, As, coeffs)]


def _masks(seeds, density):
    return [torch.rand(SHAPE, generator=torch.Generator().manual_seed(s)) < density for s in seeds]


def _ours(method, weights, density, msm, convention, seeds=(5, 6, 7), n=3):
    Bs, As, coeffs = _factors(n)
    gens = [torch.Generator().manual_seed(s) for s in seeds[:n]]
    return BlockwiseMerge(Bs, As, coeffs, weights, method, density, msm, gens, convention).full()


def _mergekit(method, deltas, weights, density, masks, monkeypatch):
    """mergekit 0.1.5's own arithmetic on the dense deltas (zero base), with our DARE masks."""
    mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
    feed = [m.double() for m in masks]
    real = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: feed.pop(0).to(p.dtype) if feed else real(p, *a, **k))
    n = len(deltas)
    params = {"weight": {i + 1: w for i, w in enumerate(weights)}, "density": density}
    if method == "magnitude_prune":
        params["gamma"] = 0.0
    return mergekit_api.merge_tensors([torch.zeros(SHAPE, dtype=torch.float64), *deltas], MERGEKIT_METHOD[method],
                                      parameters=params, ids=list(range(n + 1)), base_index=0)


def _restated(method, deltas, weights, density, msm, masks):
    """mergekit's documented rules (reference/mergekit.md, "GTA core"), restated in float64 without mergekit."""
    pruned = []
    for i, d in enumerate(deltas):
        if density < 1 and method in ("ties", "magnitude_prune"):
            k = max(1, int(density * d.numel())) if method == "ties" else int(density * d.numel())
            keep = torch.zeros(d.numel(), dtype=torch.bool)
            keep[d.abs().reshape(-1).topk(k).indices] = True
            d = d * keep.reshape(d.shape)
        elif density < 1 and method.startswith("dare"):
            kept = d * masks[i]
            before, after = d.abs().sum(), kept.abs().sum()
            d = kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
        pruned.append(d * weights[i])
    stacked = torch.stack(pruned)
    if method not in ("ties", "dare_ties"):
        return stacked.sum(0)
    votes = stacked.sum(0) if msm == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0).double()
    mixed = (stacked * agree).sum(0)
    if method == "dare_ties":
        return mixed
    divisor = (torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1) * agree).sum(0)
    return mixed / torch.where(divisor == 0, 1.0, divisor.double())


CASES = [("ties", 0.4), ("ties", 1.0), ("dare_ties", 0.5), ("dare_ties", 1.0), ("dare_linear", 0.3),
         ("magnitude_prune", 0.35), ("linear", None)]


@pytest.mark.parametrize("method, density", CASES)
@pytest.mark.parametrize("weights", [[0.7, 0.5, 1.2], [1.0, -0.6, 0.3]])
def test_mergekit_convention_equals_mergekit(method, density, weights, monkeypatch):
    """Weights before the election, ties over the agreeing weights, DARE's L1 rescale: as mergekit 0.1.5 computes."""
    ours = _ours(method, weights, density, "total", "mergekit")
    deltas = _deltas(*_factors())
    masks = _masks((5, 6, 7), density or 1.0)
    restated = _restated(method, deltas, weights, density or 1.0, "total", masks)
    torch.testing.assert_close(ours.double(), restated, rtol=1e-5, atol=1e-5)
    reference = _mergekit(method, deltas, weights, density if density is not None else 1.0, masks, monkeypatch)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    assert reference.abs().sum() > 0


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_mergekit_frequency_is_a_count_of_weighted_signs(method):
    """``majority_sign_method: frequency`` is mergekit's 'count' consensus, over the signs of wᵢ·δᵢ."""
    weights = [1.0, -0.6, 0.3]
    ours = _ours(method, weights, 0.5, "frequency", "mergekit")
    expected = _restated(method, _deltas(*_factors()), weights, 0.5, "frequency", _masks((5, 6, 7), 0.5))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, density", CASES)
def test_peft_convention_is_unchanged_and_equals_peft(method, density):
    """The default convention is still PEFT's merge_utils (same masks, applied by hand for DARE)."""
    weights = [0.7, -0.5, 1.2]
    ours = _ours(method, weights, density, "total", "peft")
    assert torch.equal(ours, _ours(method, weights, density, "total", "peft"))
    deltas = [d.float() for d in _deltas(*_factors())]
    if method.startswith("dare") and density < 1:
        deltas = [d * m / density for d, m in zip(deltas, _masks((5, 6, 7), density))]
    w = torch.tensor(weights)
    peft_fn = {"linear": lambda: mu.task_arithmetic(deltas, w),
               "magnitude_prune": lambda: mu.magnitude_prune(deltas, w, density),
               "ties": lambda: mu.ties(deltas, w, density, "total"),
               "dare_linear": lambda: mu.task_arithmetic(deltas, w),
               "dare_ties": lambda: mu.ties(deltas, w, 1.0, "total")}[method]
    torch.testing.assert_close(ours, peft_fn(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_conventions_differ_where_the_docs_say(method):
    """ties, dare_ties and dare_linear give other numbers in the two conventions; linear and magnitude_prune do not."""
    weights = [0.7, -0.5, 1.2]
    peft = _ours(method, weights, 0.5, "total", "peft")
    mergekit = _ours(method, weights, 0.5, "total", "mergekit")
    # dare_linear: ‖δ‖₁/‖mask·δ‖₁ is 1/density in expectation, so only a few percent apart
    assert float((peft - mergekit).norm() / peft.norm()) > (0.01 if method == "dare_linear" else 0.1)
    for same in ("linear", "magnitude_prune"):
        density = None if same == "linear" else 0.5
        torch.testing.assert_close(_ours(same, weights, density, "total", "peft"),
                                   _ours(same, weights, density, "total", "mergekit"), rtol=0, atol=0)


def test_mergekit_ties_keeps_one_entry_and_breadcrumbs_none():
    """A density below 1/numel keeps nothing in PEFT and breadcrumbs, but one entry per delta in mergekit's ties."""
    tiny = 0.5 / (SHAPE[0] * SHAPE[1])
    assert _ours("ties", [1.0, 1.0, 1.0], tiny, "total", "peft").count_nonzero() == 0
    assert _ours("magnitude_prune", [1.0, 1.0, 1.0], tiny, "total", "mergekit").count_nonzero() == 0
    kept = _ours("ties", [1.0, 1.0, 1.0], tiny, "total", "mergekit")
    assert 1 <= kept.count_nonzero() <= 3
    expected = _restated("ties", _deltas(*_factors()), [1.0, 1.0, 1.0], tiny, "total", None)
    torch.testing.assert_close(kept.double(), expected, rtol=1e-5, atol=1e-6)


def test_mergekit_dare_leaves_a_vanishing_delta_unscaled():
    """‖δ‖₁ below 1e-7: mergekit returns the masked delta without its L1 rescale (no division by ~0)."""
    Bs, As, coeffs = _factors(2)
    coeffs = [1e-12, 1.0]
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    merged = BlockwiseMerge(Bs, As, coeffs, [1.0, 1.0], "dare_linear", 0.5, "total", gens, "mergekit")
    assert merged.l1_scales[0] == 1.0 and merged.l1_scales[1] > 1.0
    alone = BlockwiseMerge(Bs[:1], As[:1], coeffs[:1], [1.0], "dare_linear", 0.5, "total",
                           [torch.Generator().manual_seed(5)], "mergekit").full()
    masked = _deltas(Bs[:1], As[:1], coeffs[:1])[0] * _masks((5,), 0.5)[0]
    torch.testing.assert_close(alone.double(), masked, rtol=1e-5, atol=0)


def test_blockwise_blocks_agree_with_the_full_result_in_mergekit_convention():
    Bs, As, coeffs = _factors()
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    merged = BlockwiseMerge(Bs, As, coeffs, [0.7, -0.5, 1.2], "dare_ties", 0.5, "total", gens, "mergekit")
    full = merged.full()
    rows = torch.cat([merged.block(rows=slice(i, i + 7)) for i in range(0, SHAPE[0], 7)])
    cols = torch.cat([merged.block(cols=slice(i, i + 9)) for i in range(0, SHAPE[1], 9)], dim=1)
    torch.testing.assert_close(rows, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cols, full, rtol=1e-6, atol=1e-6)


def test_unknown_convention_is_refused():
    Bs, As, coeffs = _factors()
    with pytest.raises(AdaptoolError, match="unknown convention 'mergkit'"):
        BlockwiseMerge(Bs, As, coeffs, [1.0] * 3, "ties", 0.5, convention="mergkit")
