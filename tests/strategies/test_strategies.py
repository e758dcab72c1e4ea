"""Strategies against their oracle: PEFT 0.21.2's own merge_utils and add_weighted_adapter."""

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils as mu
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from adaptool.errors import AdaptoolError
from adaptool.strategies import (
    COMBINATION_TYPES,
    METHODS,
    SVD_TYPES,
    base_method,
    check_density,
    clamp_factors,
    combine,
    combine_factors,
    concat_lowrank,
    disjoint_merge,
    generator_for,
    majority_sign_mask,
    peft_effective_type,
    peft_new_rank,
    prune_magnitude,
    prune_random,
    svd_dense,
    truncate_lowrank,
)

WEIGHTS = [0.7, -0.3, 1.2]


def _task_tensors(shape=(16, 24), n=3, dtype=torch.float32, seed=0):
    """Random tensors with exact zeros, repeated magnitudes and opposite signs, so ties and zeros occur."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g) for _ in range(n)]
    ts[0].view(-1)[:10] = 0.0
    ts[1].view(-1)[:20] = 0.5
    ts[1].view(-1)[20:30] = -0.5
    ts[-1].view(-1)[30:40] = -ts[0].view(-1)[30:40]
    return [t.to(dtype) for t in ts]


def _peft_merge(method, ts, weights, density, msm):
    w = torch.tensor(weights)
    if method == "linear":
        return mu.task_arithmetic(ts, w)
    if method == "magnitude_prune":
        return mu.magnitude_prune(ts, w, density)
    if method == "ties":
        return mu.ties(ts, w, density, msm)
    if method == "dare_linear":
        return mu.dare_linear(ts, w, density)
    return mu.dare_ties(ts, w, density, msm)


# --------------------------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7,), (16, 24), (4, 6, 5)])
def test_prune_magnitude_matches_peft(density, shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t.view(-1)[::3] = 0.25  # many exact ties
    expected = mu.magnitude_based_pruning(t, density)
    got = prune_magnitude(t, density)
    assert torch.equal(got, expected)
    assert int((got != 0).sum()) <= int(density * t.numel())


def test_prune_magnitude_breaks_ties_like_peft():
    t = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 2.0])
    got = prune_magnitude(t, 0.5)
    assert torch.equal(got, mu.magnitude_based_pruning(t, 0.5))
    assert int((got != 0).sum()) == 3 and got[5] == 2.0


def test_prune_magnitude_keeps_the_largest():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    got = prune_magnitude(t, 0.25)
    kept = got != 0
    assert int(kept.sum()) == 250
    assert t[kept].abs().min() > t[~kept].abs().max()
    assert torch.equal(got[kept], t[kept])


def test_prune_density_one_is_identity():
    t = torch.randn(5, 5)
    assert prune_magnitude(t, 1.0) is t
    assert prune_random(t, 1.0, None) is t


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_random_matches_peft_with_same_draws(rescale, dtype):
    t = torch.randn(32, 16).to(dtype)
    torch.manual_seed(11)
    expected = mu.random_pruning(t, 0.3, rescale=rescale)
    got = prune_random(t, 0.3, torch.Generator().manual_seed(11), rescale=rescale)
    assert torch.equal(got, expected)
    kept = got != 0
    scale = 1 / 0.3 if rescale else 1.0
    assert torch.allclose(got[kept].float(), (t[kept].float() * scale), rtol=1e-2)
    assert 0.15 < kept.float().mean() < 0.45


def test_prune_random_global_rng_when_no_generator():
    t = torch.randn(64)
    torch.manual_seed(3)
    expected = mu.random_pruning(t, 0.5, rescale=True)
    torch.manual_seed(3)
    assert torch.equal(prune_random(t, 0.5, None), expected)


def test_generator_for_is_deterministic_and_name_dependent():
    t = torch.ones(4096)

    def mask(seed, name):
        return prune_random(t, 0.5, generator_for(seed, name, "cpu")) != 0

    a1, b1 = mask(0, "layers.0.q_proj"), mask(0, "layers.1.q_proj")
    # Order of generation must not matter: draw b first this time.
    b2, a2 = mask(0, "layers.1.q_proj"), mask(0, "layers.0.q_proj")
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)
    assert not torch.equal(a1, mask(1, "layers.0.q_proj"))
    # A stable hash, not Python's salted hash(): the value is pinned across processes.
    assert generator_for(0, "x").initial_seed() == generator_for(0, "x").initial_seed()
    assert generator_for(0, "x").initial_seed() != generator_for(0, "y").initial_seed()


def test_generator_for_seed_is_stable_across_processes():
    import subprocess
    import sys

    code = "from adaptool.strategies import generator_for; print(generator_for(42, 'model.w').initial_seed())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert outs == {f"{generator_for(42, 'model.w').initial_seed()}\n"}


@pytest.mark.parametrize("bad", [None, 0, -0.1, 1.5])
def test_check_density_refuses(bad):
    with pytest.raises(AdaptoolError, match="density"):
        check_density(bad, "ties")


# -------------------------------------------------------------------------------------------- consensus


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_majority_sign_mask_matches_peft(method):
    stacked = torch.stack([mu.magnitude_based_pruning(t, 0.6) for t in _task_tensors()])
    assert torch.equal(majority_sign_mask(stacked, method), mu.calculate_majority_sign_mask(stacked, method))


def test_majority_sign_by_hand():
    stacked = torch.tensor([[1.0, -3.0, 0.0, 2.0, 0.0], [-1.0, 1.0, 0.0, -1.0, -0.5], [0.0, 1.0, 0.0, -0.5, 0.0]])
    # total: sums 0 (tie -> +), -1 (-), 0 (+, but zeros never agree), 0.5 (+), -0.5 (-)
    total = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(majority_sign_mask(stacked, "total"), total)
    # frequency: votes 0 (+), +1 (+), 0 (+), -1 (-), -1 (-)
    frequency = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(majority_sign_mask(stacked, "frequency"), frequency)


def test_disjoint_merge_is_mean_of_agreeing():
    weighted = torch.tensor([[2.0, 1.0, 0.0], [4.0, -1.0, 0.0], [-9.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(disjoint_merge(weighted, mask), torch.tensor([3.0, 3.0, 0.0]))
    assert torch.equal(disjoint_merge(weighted, mask), mu.disjoint_merge(weighted, mask))


def test_unknown_sign_method_refused():
    with pytest.raises(AdaptoolError, match="majority_sign_method"):
        majority_sign_mask(torch.ones(2, 3), "median")


# ------------------------------------------------------------------------------------- task arithmetic


@pytest.mark.parametrize("msm", ["total", "frequency"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_matches_peft_merge_utils(method, msm, dtype):
    ts = _task_tensors(dtype=dtype)
    density = 0.4
    torch.manual_seed(5)
    expected = _peft_merge(method, ts, WEIGHTS, density, msm)
    got = combine(ts, WEIGHTS, method, density, msm, generators=torch.Generator().manual_seed(5))
    assert got.dtype == torch.float32
    assert torch.equal(got, expected.float())
    if method != "linear":
        # Not the plain weighted sum: the method did something.
        assert not torch.allclose(got, mu.task_arithmetic([t.float() for t in ts], torch.tensor(WEIGHTS)))


def test_combine_linear_by_hand():
    ts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0])]
    assert torch.equal(combine(ts, [0.5, 2.0], "linear"), torch.tensor([6.5, -7.0]))


def test_combine_ties_by_hand():
    ts = [torch.tensor([4.0, -1.0, 3.0, 0.1]), torch.tensor([-2.0, 5.0, 1.0, 0.2])]
    # density 0.5 keeps [4, _, 3, _] and [-2, 5, _, _]; elected signs by total: +, +, +, + (0 is a tie).
    # -2 disagrees, so column 0 is 4/1; column 1 is 0.5*5/1; column 3 has only pruned zeros.
    got = combine(ts, [1.0, 0.5], "ties", density=0.5)
    assert torch.equal(got, torch.tensor([4.0, 2.5, 3.0, 0.0]))
    got = combine(ts, [1.0, 0.5], "ties", density=1.0)
    # Nothing pruned: column 0 elects + (4-2); columns 2 and 3 average both weighted entries.
    assert torch.allclose(got, torch.tensor([4.0, 2.5, 1.75, 0.1]))


def test_combine_per_tensor_generators():
    ts = _task_tensors()
    gens = [generator_for(7, f"t{i}") for i in range(3)]
    got = combine(ts, WEIGHTS, "dare_linear", 0.5, generators=gens)
    pruned = [prune_random(t, 0.5, generator_for(7, f"t{i}")) for i, t in enumerate(ts)]
    assert torch.equal(got, sum(w * p for w, p in zip(WEIGHTS, pruned)))
    # Reordering the inputs with their generators gives the same result up to summation order.
    got_rev = combine(ts[::-1], WEIGHTS[::-1], "dare_linear", 0.5,
                      generators=[generator_for(7, f"t{i}") for i in (2, 1, 0)])
    assert torch.allclose(got, got_rev, atol=1e-6)


def test_combine_refusals():
    ts = _task_tensors(n=2)
    with pytest.raises(AdaptoolError, match="needs parameters.density"):
        combine(ts, [1, 1], "ties")
    with pytest.raises(AdaptoolError, match="density"):
        combine(ts, [1, 1], "dare_ties", density=0)
    with pytest.raises(AdaptoolError, match="did you mean 'ties'"):
        combine(ts, [1, 1], "tie", density=0.5)
    with pytest.raises(AdaptoolError, match="different shapes"):
        combine([torch.ones(2, 3), torch.ones(3, 2)], [1, 1], "linear")
    with pytest.raises(AdaptoolError, match="weights"):
        combine(ts, [1.0], "linear")
    with pytest.raises(AdaptoolError, match="majority_sign_method"):
        combine(ts, [1, 1], "ties", density=0.5, majority_sign_method="sum")


def test_base_method():
    assert base_method("svd") == "linear"
    assert base_method("ties_svd") == "ties"
    assert base_method("dare_linear_svd") == "dare_linear"
    assert base_method("magnitude_prune") == "magnitude_prune"
    with pytest.raises(AdaptoolError):
        base_method("cat_svd")


# -------------------------------------------------------------------------------------------- low rank


def _factors(out, ins, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, ins, generator=g)


def test_concat_lowrank_is_exact():
    (B1, A1), (B2, A2) = _factors(40, 30, 4, 0), _factors(40, 30, 6, 1)
    B, A = concat_lowrank([B1, B2], [A1, A2], [0.7, -1.3])
    assert B.shape == (40, 10) and A.shape == (10, 30)
    expected = 0.7 * (B1 @ A1) - 1.3 * (B2 @ A2)
    torch.testing.assert_close(B @ A, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("out,ins,R,k", [(64, 48, 12, 5), (20, 100, 16, 3), (6, 50, 10, 4), (50, 5, 10, 2)])
def test_truncate_lowrank_is_eckart_young(out, ins, R, k):
    B, A = _factors(out, ins, R, 3)
    B_k, A_k, energy = truncate_lowrank(B, A, k)
    assert B_k.shape == (out, k) and A_k.shape == (k, ins)
    D = (B.double() @ A.double())
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    torch.testing.assert_close((B_k @ A_k).double(), best, rtol=1e-4, atol=1e-4 * float(S[0]))
    assert energy == pytest.approx(float((S[:k] ** 2).sum() / (S**2).sum()), rel=1e-5)
    # The residual is the discarded spectrum, which is what "best" means.
    residual = torch.linalg.matrix_norm(D - (B_k @ A_k).double())
    assert float(residual) == pytest.approx(float((S[k:] ** 2).sum().sqrt()), rel=1e-4)
    # Singular values go on B, as PEFT puts U @ diag(S) on lora_B: A_k has orthonormal rows.
    torch.testing.assert_close(A_k @ A_k.T, torch.eye(k), atol=1e-5, rtol=0)


def test_truncate_lowrank_at_or_above_rank_is_unchanged():
    B, A = _factors(30, 20, 4, 4)
    B_k, A_k, energy = truncate_lowrank(B, A, 4)
    assert torch.equal(B_k, B) and torch.equal(A_k, A) and energy == 1.0
    with pytest.raises(AdaptoolError, match="rank"):
        truncate_lowrank(B, A, 0)


def test_truncate_lowrank_of_zero_keeps_full_energy():
    B_k, A_k, energy = truncate_lowrank(torch.zeros(10, 6), torch.zeros(6, 8), 2)
    assert energy == 1.0 and torch.count_nonzero(B_k @ A_k) == 0


def test_svd_dense_matches_peft_formula():
    D = torch.randn(40, 30, generator=torch.Generator().manual_seed(5))
    B_k, A_k, energy = svd_dense(D, 6)
    U, S, Vh = torch.linalg.svd(D, full_matrices=True)
    torch.testing.assert_close(B_k, U[:, :6] @ torch.diag(S[:6]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(A_k, Vh[:6], atol=1e-6, rtol=1e-6)
    assert energy == pytest.approx(float((S[:6] ** 2).sum() / (S**2).sum()), rel=1e-6)
    assert svd_dense(torch.zeros(5, 4), 2)[2] == 1.0
    assert svd_dense(D, 100)[0].shape == (40, 30)


@pytest.mark.parametrize("q", [0.0, 0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0])
def test_clamp_factors_equals_torch_quantile(q):
    B, A = _factors(33, 17, 5, 6)
    hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), q)
    got_B, got_A = clamp_factors(B, A, q)
    assert torch.equal(got_B, B.clamp(-hi, hi)) and torch.equal(got_A, A.clamp(-hi, hi))
    if q == 0.9:
        assert got_B.abs().max() == hi < B.abs().max()


def test_clamp_factors_beyond_torch_quantile_limit():
    n_b = 2**23
    g = torch.Generator().manual_seed(8)
    B = torch.randn(2**13, n_b // 2**13, generator=g)
    A = torch.randn(2**10, 2**13 + 2, generator=g)  # together 2**24 + 2048 elements
    dist = torch.cat([B.flatten(), A.flatten()])
    assert dist.numel() > 2**24
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(dist, 0.99)
    got_B, got_A = clamp_factors(B, A, 0.99)
    # Oracle: linear interpolation between order statistics of a full sort (fine in a test).
    s = dist.double().sort().values
    pos = 0.99 * (dist.numel() - 1)
    lo = int(pos)
    hi = s[lo] + (s[lo + 1] - s[lo]) * (pos - lo)
    assert float(got_B.max()) == pytest.approx(float(hi), rel=1e-6)
    assert torch.equal(got_A, A.clamp(-got_B.max(), got_B.max()))


def test_clamp_refuses_out_of_range_quantile():
    with pytest.raises(AdaptoolError, match="quantile"):
        clamp_factors(torch.ones(2, 2), torch.ones(2, 2), 5)


# ------------------------------------------------------------------------------ PEFT add_weighted_adapter

SEED = 1234


def _lora(r, alpha, targets, **kw):
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(cfg), _lora(4, 8, ["q_proj", "v_proj", "embed_tokens"]),
                           adapter_name="one")
    model.add_adapter("two", _lora(4, 12, ["q_proj", "v_proj", "embed_tokens"]))
    model.add_adapter("three", _lora(6, 6, ["q_proj", "embed_tokens"]))
    return model


@pytest.fixture(scope="module")
def llama_bf16():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    # autocast_adapter_dtype=False keeps the adapters in bf16, so PEFT merges them in bf16.
    model = get_peft_model(base, _lora(4, 8, ["q_proj", "embed_tokens"]), adapter_name="one",
                           autocast_adapter_dtype=False)
    model.add_adapter("two", _lora(4, 12, ["q_proj", "embed_tokens"]), autocast_adapter_dtype=False)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["two"].weight.dtype == torch.bfloat16
    return model


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    model = get_peft_model(GPT2LMHeadModel(cfg), _lora(4, 8, ["c_attn", "wte"], fan_in_fan_out=True),
                           adapter_name="one")
    model.add_adapter("two", _lora(4, 4, ["c_attn", "wte"], fan_in_fan_out=True))
    return model


@pytest.fixture
def reseed_before_merge_loop(monkeypatch):
    """Reseed torch's RNG after PEFT initialises the new adapter, right before its module loop draws."""
    original = peft_lora_model._freeze_adapter

    def freeze_then_seed(*args, **kwargs):
        original(*args, **kwargs)
        torch.manual_seed(SEED)

    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze_then_seed)


def _lora_modules(model):
    # PEFT's loop order: named_modules of the base model, skipping the lora_ submodules.
    for name, module in model.base_model.model.named_modules():
        if "lora_" not in name and isinstance(module, LoraLayer):
            yield name, module


def _factors_of(module, adapter):
    if adapter in module.lora_A:
        return module.lora_A[adapter].weight.data, module.lora_B[adapter].weight.data, False
    return module.lora_embedding_A[adapter].data, module.lora_embedding_B[adapter].data, True


def _replay(model, adapters, weights, combination_type, svd_rank=None, **kw):
    """adaptool's combine_factors over every module, in PEFT's order, drawing from the global RNG."""
    ranks = [model.peft_config[a].r for a in adapters]
    new_rank = peft_new_rank(ranks, combination_type, svd_rank)
    ctype = peft_effective_type(len(adapters), combination_type)
    torch.manual_seed(SEED)
    out = {}
    for name, module in _lora_modules(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in module.lora_A or a in module.lora_embedding_A]
        if not present:
            continue
        factors = [_factors_of(module, a) for a, _ in present]
        out[name] = combine_factors(
            [f[0] for f in factors], [f[1] for f in factors], [module.scaling[a] for a, _ in present],
            [w for _, w in present], ctype, new_rank=new_rank, is_embedding=factors[0][2],
            fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)), **kw)
    return out


def _compare(model, merged_name, ours, exact):
    assert ours, "no module was merged"
    for name, module in _lora_modules(model):
        if name not in ours:
            continue
        A_peft, B_peft, _ = _factors_of(module, merged_name)
        # PEFT rounds A/B-path results to the adapters' dtype; ours are float32 for the caller to round.
        A, B = (t.to(A_peft.dtype) for t in ours[name])
        assert A.shape == A_peft.shape and B.shape == B_peft.shape, name
        if exact:
            assert torch.equal(A, A_peft), name
            assert torch.equal(B, B_peft), name
        else:
            # SVD factors are unique only up to sign/rotation within near-equal singular values, and LAPACK's
            # choice depends on the thread count: compare the merged delta B @ A instead.
            torch.testing.assert_close(B.float() @ A.float(), B_peft.float() @ A_peft.float(), atol=1e-6, rtol=1e-5,
                                       msg=name)
        assert torch.count_nonzero(A) > 0 and torch.count_nonzero(B) > 0


def _merge_and_compare(model, adapters, weights, ctype, name, **kw):
    model.add_weighted_adapter(adapters, weights, name, combination_type=ctype, **kw)
    kw.pop("svd_full_matrices", None)
    ours = _replay(model, adapters, weights, ctype, **kw)
    _compare(model, name, ours, exact=ctype not in SVD_TYPES)
    return ours


@pytest.mark.parametrize("ctype", ["linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"])
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_factors_elementwise_match_peft(llama, reseed_before_merge_loop, ctype, msm):
    _merge_and_compare(llama, ["one", "two"], [0.7, -0.3], ctype, f"ew_{ctype}_{msm}",
                       density=0.5, majority_sign_method=msm)


@pytest.mark.parametrize("ctype", ["cat"] + list(SVD_TYPES))
def test_factors_cat_and_svd_match_peft(llama, reseed_before_merge_loop, ctype):
    # Adapters of ranks 4, 4, 6; three is not on v_proj, so v_proj merges only a and b.
    ours = _merge_and_compare(llama, ["one", "two", "three"], [0.7, -0.3, 0.5], ctype, f"lr_{ctype}",
                              svd_rank=4, density=0.5)
    if ctype == "cat":
        A, _ = ours["model.layers.0.self_attn.v_proj"]
        assert A.shape[0] == 14 and torch.count_nonzero(A[8:]) == 0  # padded to the config's rank


def test_factors_cat_and_svd_are_the_weighted_delta(llama):
    module = dict(_lora_modules(llama))["model.layers.0.self_attn.q_proj"]
    adapters, weights = ["one", "two", "three"], [0.7, -0.3, 0.5]
    As, Bs, _ = zip(*[_factors_of(module, a) for a in adapters])
    scalings = [module.scaling[a] for a in adapters]
    target = sum(w * s * (B @ A) for A, B, s, w in zip(As, Bs, scalings, weights))
    A, B = combine_factors(list(As), list(Bs), scalings, weights, "cat", new_rank=14)
    torch.testing.assert_close(B @ A, target, atol=1e-5, rtol=1e-5)
    A, B = combine_factors(list(As), list(Bs), scalings, weights, "svd", new_rank=14)
    torch.testing.assert_close(B @ A, target, atol=1e-4, rtol=1e-4)
    # While PEFT's "linear" is not: cross terms B_i A_j (the reason space: delta exists).
    A, B = combine_factors(list(As[:2]), list(Bs[:2]), scalings[:2], weights[:2], "linear", new_rank=4)
    target2 = sum(w * s * (B @ A) for A, B, s, w in zip(As[:2], Bs[:2], scalings[:2], weights[:2]))
    assert (B @ A - target2).norm() > 0.1 * target2.norm()


def test_factors_svd_clamp_and_default_rank_match_peft(llama):
    _merge_and_compare(llama, ["one", "two"], [1.0, 0.6], "svd", "svd_clamped", svd_clamp=0.9)


def test_factors_single_adapter_is_linear_like_peft(llama):
    _merge_and_compare(llama, ["three"], [0.6], "svd", "single_three", svd_rank=2)
    assert peft_effective_type(1, "ties_svd") == "linear"


@pytest.mark.parametrize("ctype", ["linear", "cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd"])
def test_factors_fan_in_fan_out_and_embedding_match_peft(gpt2, reseed_before_merge_loop, ctype):
    _merge_and_compare(gpt2, ["one", "two"], [0.8, -0.5], ctype, f"g_{ctype}", density=0.5)


@pytest.mark.parametrize("ctype", ["linear", "ties", "dare_ties", "cat", "svd", "ties_svd", "dare_linear_svd"])
def test_factors_bf16_adapters_match_peft(llama_bf16, reseed_before_merge_loop, ctype):
    # density 0.3 is not a bf16 number: PEFT's DARE keeps with p = bf16(0.3); svd types see bf16-rounded deltas.
    _merge_and_compare(llama_bf16, ["one", "two"], [0.7, -0.4], ctype, f"bf_{ctype}", density=0.3)


def test_factors_embedding_flag_matters_for_dare(llama):
    # PEFT builds an embedding's delta transposed, so DARE draws land elsewhere: the flag is not cosmetic.
    module = llama.base_model.model.model.embed_tokens
    As, Bs, _ = zip(*[_factors_of(module, a) for a in ("one", "two")])
    args = (list(As), list(Bs), [2.0, 3.0], [0.7, 0.3], "dare_linear_svd")
    with_flag = combine_factors(*args, new_rank=4, density=0.5, generator=torch.Generator().manual_seed(0),
                                is_embedding=True)
    without = combine_factors(*args, new_rank=4, density=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(with_flag[1] @ with_flag[0], without[1] @ without[0])


def test_peft_new_rank_rules():
    assert peft_new_rank([4, 4], "ties") == 4
    assert peft_new_rank([4, 6], "cat") == 10
    assert peft_new_rank([4, 6], "svd") == 6
    assert peft_new_rank([4, 6], "dare_ties_svd", svd_rank=3) == 3
    assert peft_new_rank([8], "svd", svd_rank=2) == 8  # one adapter: linear, svd_rank ignored


@pytest.mark.parametrize("ctype", ["linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_peft_new_rank_refuses_unequal_ranks_like_peft(llama, ctype):
    with pytest.raises(AdaptoolError, match="space: delta"):
        peft_new_rank([4, 6], ctype)
    with pytest.raises(ValueError, match="same r value"):
        llama.add_weighted_adapter(["one", "three"], [1.0, 1.0], f"refused_{ctype}", combination_type=ctype,
                                   density=0.5)


def test_factors_refusals():
    A, B = torch.randn(4, 8), torch.randn(8, 4)
    with pytest.raises(AdaptoolError, match="did you mean 'ties_svd'"):
        peft_new_rank([4, 4], "ties_svdd")
    with pytest.raises(AdaptoolError, match="unknown strategy"):
        combine_factors([A], [B], [1.0], [1.0], "average", new_rank=4)
    with pytest.raises(AdaptoolError, match="density"):
        combine_factors([A, A], [B, B], [1.0, 1.0], [1.0, 1.0], "ties", new_rank=4)
    with pytest.raises(AdaptoolError, match="equal shape"):
        combine_factors([A, torch.randn(6, 8)], [B, torch.randn(8, 6)], [1.0, 1.0], [1.0, 1.0], "linear",
                        new_rank=6)
    with pytest.raises(AdaptoolError, match="no adapters"):
        peft_new_rank([], "cat")
    assert set(COMBINATION_TYPES) == {
        "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
        "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"}


# ---------------------------------------------------------------------------------------------- blockwise


def test_kth_largest_abs_is_exact():
    from adaptool.strategies.blockwise import kth_largest_abs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.logspace(-6, 3, 200_000)
    for k in (1, 7, 100_000, 199_999, 200_000):
        assert kth_largest_abs(x, k) == torch.topk(x.abs(), k).values.min()


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_blockwise_merge_equals_dense_combine(method, msm):
    from adaptool.strategies.blockwise import BlockwiseMerge

    g = torch.Generator().manual_seed(1)
    Bs = [torch.randn(60, r, generator=g) for r in (3, 5)]
    As = [torch.randn(r, 45, generator=g) for r in (3, 5)]
    coeffs, weights = [0.5, 2.0], [0.7, -0.4]
    density = None if method == "linear" else 0.4
    gens = [torch.Generator().manual_seed(i) for i in (5, 6)]
    merged = BlockwiseMerge(Bs, As, coeffs, weights, method, density, msm, gens)
    deltas = [b @ a * c for b, a, c in zip(Bs, As, coeffs)]
    if method.startswith("dare"):
        # the same masks, applied by hand: keep where rand < density, rescale by 1/density
        masks = [torch.rand((60, 45), generator=torch.Generator().manual_seed(i)) < 0.4 for i in (5, 6)]
        deltas = [d * m / 0.4 for d, m in zip(deltas, masks)]
        method_ref, density_ref = ("linear" if method == "dare_linear" else "ties"), 1.0
    else:
        method_ref, density_ref = method, density
    ref = combine(deltas, weights, method_ref, density_ref, msm)
    torch.testing.assert_close(merged.full(), ref, atol=1e-5, rtol=1e-5)
    rows = torch.cat([merged.block(rows=slice(i, i + 7)) for i in range(0, 60, 7)])
    cols = torch.cat([merged.block(cols=slice(i, i + 9)) for i in range(0, 45, 9)], dim=1)
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cols, ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().sum() > 0


def test_refactor_randomized_is_near_best_and_reproducible():
    from adaptool.strategies import refactor

    g = torch.Generator().manual_seed(2)
    # a slowly decaying spectrum, like a ties result
    U = torch.linalg.qr(torch.randn(1100, 200, generator=g)).Q
    V = torch.linalg.qr(torch.randn(1300, 200, generator=g)).Q
    D = (U * torch.linspace(1, 0.05, 200)) @ V.T
    B, A, energy = refactor(D, 16)
    _, _, best = svd_dense(D, 16)
    assert B.shape == (1100, 16) and A.shape == (16, 1300)
    assert 0.99 * best <= energy <= best + 1e-6  # a flat spectrum: the hard case for a randomized method
    B2, A2, _ = refactor(D, 16)
    assert torch.equal(B, B2) and torch.equal(A, A2)
