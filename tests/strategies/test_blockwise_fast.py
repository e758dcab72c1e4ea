"""The fast block-wise merge against its oracles.

* :mod:`adaptool.strategies.radix_select` (exact k-th largest ``|x|``) against ``torch.topk``/``kthvalue``.
* :class:`~adaptool.strategies.blockwise.BlockwiseMerge` against
  :class:`~adaptool.strategies.blockwise_reference.ReferenceBlockwiseMerge` (the plain evaluation it replaced),
  bit for bit — zeros' signs included, compared as int32 patterns — for every method, both conventions, both
  sign methods, ties at the threshold, zero and negative weights, blocks of rows (as the engine asks for them)
  and of columns (transposed layouts), with and without a shared :class:`Workspace` (buffers, cached ΔW,
  helper thread).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from adaptool.strategies.blockwise import BlockwiseMerge, position_free
from adaptool.strategies.blockwise_reference import ReferenceBlockwiseMerge
from adaptool.strategies.radix_select import kth_largest_abs, kth_largest_abs_blocks, select_where
from adaptool.strategies.workspace import Workspace


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.fixture(autouse=True)
def one_thread():
    """The engine's setting on a 2-core machine (one torch thread): the helper thread may run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ radix select

@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "wide", "tiny"])
def test_kth_largest_abs_matches_topk(kind):
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    for n in (1, 7, 1000, 65537, 300_001):
        x = torch.randn(n, generator=g)
        if kind == "ties":
            x = (x * 3).round() / 4  # a handful of distinct magnitudes
        elif kind == "zeros":
            x[torch.rand(n, generator=g) < 0.7] = 0.0
            x[torch.rand(n, generator=g) < 0.1] = -0.0
        elif kind == "wide":
            x = x * torch.exp(torch.randn(n, generator=g) * 20)  # subnormals to 1e38 in one tensor
        elif kind == "tiny":
            x = x * 1e-42  # all subnormal
        for k in {1, n, max(1, n // 2), max(1, n // 3), max(1, n - 1)}:
            oracle = torch.topk(x.abs(), k).values.min()
            assert _same(kth_largest_abs(x, k).reshape(1), oracle.reshape(1)), (n, k)
            sorted_desc = x.abs().sort(descending=True).values
            assert kth_largest_abs(x, k) == sorted_desc[k - 1] == torch.kthvalue(x.abs(), n - k + 1).values


def test_kth_largest_abs_blocks_of_any_shape_and_infinities():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 37, generator=g)
    x[3, 4], x[500, 0], x[999, 36] = float("inf"), float("-inf"), 3e38
    blocks = lambda: [x[:1], x[1:400], x[400:401], x[401:]]  # noqa: E731
    for k in (1, 2, 3, 4, 5, 18_500, 36_999, 37_000):
        oracle = torch.topk(x.abs().reshape(-1), k).values.min()
        assert _same(kth_largest_abs_blocks(blocks, k).reshape(1), oracle.reshape(1)), k


def test_kth_largest_abs_blocks_reuses_a_workspace():
    ws = Workspace()
    g = torch.Generator().manual_seed(4)
    for n_rows in (900, 300, 1200):  # the kept buffers shrink and grow between calls
        x = torch.randn(n_rows, 513, generator=g)
        blocks = lambda x=x: list(x.split(200))  # noqa: E731
        k = x.numel() // 3
        assert kth_largest_abs_blocks(blocks, k, ws) == torch.kthvalue(x.abs().reshape(-1), x.numel() - k + 1).values


@pytest.mark.parametrize("n", [0, 1, 8, 13, 64, 1001])
@pytest.mark.parametrize("share", [0.0, 0.01, 0.5, 1.0])
def test_select_where_matches_masked_select(n, share):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    mask = (torch.rand(n, generator=g) < share).to(torch.uint8)
    assert _same(select_where(x, mask), x[mask.bool()])
    if n > 3:  # a mask that does not start on an 8-byte boundary
        assert _same(select_where(x[3:], mask[3:]), x[3:][mask[3:].bool()])


# ------------------------------------------------------------------------------------------ the merge

METHODS = ["ties", "dare_ties", "dare_linear", "magnitude_prune", "ties_svd"]


def _case(seed: int, shape, n: int, quantised: bool = False):
    g = torch.Generator().manual_seed(seed)
    ranks = [int(r) for r in torch.randint(1, 9, (n,), generator=g)]
    Bs = [torch.randn(shape[0], r, generator=g) * 0.05 for r in ranks]
    As = [torch.randn(r, shape[1], generator=g) * 0.05 for r in ranks]
    if quantised:  # many equal |ΔW| values, some exactly at the threshold
        Bs, As = [(b * 40).round() / 40 for b in Bs], [(a * 40).round() / 40 for a in As]
    coeffs = [float(c) for c in torch.randn(n, generator=g) * 2]
    weights = [float(w) for w in torch.randn(n, generator=g)]
    return Bs, As, coeffs, weights


def _both(Bs, As, coeffs, weights, method, density, msm, convention, workspace, seed=7):
    gens = lambda: [torch.Generator().manual_seed(seed + i) for i in range(len(Bs))]  # noqa: E731
    ref = ReferenceBlockwiseMerge(Bs, As, coeffs, weights, method, density, msm, gens(), convention)
    fast = BlockwiseMerge(Bs, As, coeffs, weights, method, density, msm, gens(), convention, workspace=workspace)
    return ref, fast


def _assert_identical(ref, fast, shape):
    assert _same(fast.full(), ref.full())
    rows = max(1, (1 << 21) // shape[1])  # the engine's row blocks (the cached ones)
    for s in range(0, shape[0], rows):
        block = slice(s, min(shape[0], s + rows))
        assert _same(fast.block(rows=block), ref.block(rows=block))
    step = shape[1] // 3 + 1  # column blocks: embeddings and GPT-2 Conv1D weights are streamed transposed
    for s in range(0, shape[1], step):
        assert _same(fast.block(cols=slice(s, s + step)), ref.block(cols=slice(s, s + step)))
    if ref.thresholds is not None:
        assert all((a is None and b is None) or _same(a.reshape(1), b.reshape(1))
                   for a, b in zip(ref.thresholds, fast.thresholds))
    assert ref.l1_scales == fast.l1_scales


@pytest.mark.parametrize("method,convention,msm", [
    (m, c, s) for m, c, s in itertools.product(METHODS, ["peft", "mergekit"], ["total", "frequency"])
    if not (s == "frequency" and m in ("dare_linear", "magnitude_prune"))])
def test_fast_merge_is_bit_identical_to_the_reference(method, convention, msm):
    ws = Workspace()
    for seed, (shape, n, quantised, density) in enumerate([((40, 36), 2, False, 0.5), ((7, 5), 3, True, 0.3),
                                                           ((301, 257), 3, True, 0.5), ((130, 100), 1, False, 0.9),
                                                           ((64, 48), 2, False, 1.0), ((50, 20), 2, False, 0.0001),
                                                           ((40, 36), 3, False, 0.35)]):  # k = int(0.35·1440) = 503
        Bs, As, coeffs, weights = _case(seed, shape, n, quantised)
        if seed == 2:
            weights[1] = 0.0  # a zero weight: its values never agree (mergekit) / add nothing
        for workspace in (None, ws):
            ref, fast = _both(Bs, As, coeffs, weights, method, density, msm, convention, workspace)
            assert fast._reference is None
            _assert_identical(ref, fast, shape)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties"])
def test_fast_merge_over_several_cached_row_blocks(method):
    """A module of more than one engine block (2^21 elements), with odd sizes: the cache and the tiles."""
    shape = (2113, 1003)
    Bs, As, coeffs, weights = _case(11, shape, 2)
    for convention in ("peft", "mergekit"):
        ref, fast = _both(Bs, As, coeffs, weights, method, 0.4, "total", convention, Workspace())
        assert fast._cache is not None if method != "dare_ties" or convention == "mergekit" else fast._cache is None
        _assert_identical(ref, fast, shape)


def test_zero_signs_survive_where_no_sign_is_elected():
    """magnitude_prune: a pruned negative value is -0 (d·0), and a sum of -0s stays -0; so in ours."""
    Bs, As = [torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [-1.0]])], [torch.tensor([[-1e-3, 2.0]])] * 2
    ref, fast = _both(Bs, As, [1.0, 1.0], [1.0, 2.0], "magnitude_prune", 0.5, "total", "peft", Workspace())
    out = fast.full()
    assert _same(out, ref.full())
    assert str(out[0, 0].item()) == "-0.0" and torch.signbit(out[0, 0])


def test_two_modules_sharing_a_workspace_stay_exact():
    """A second module taking the shared buffers (cached ΔW, DARE masks) while the first is still being read:
    the first computes its blocks again / draws its masks again, with the same results."""
    ws = Workspace()
    shape = (300, 200)
    for method, convention in (("ties", "peft"), ("dare_ties", "mergekit"), ("dare_linear", "peft")):
        Bs, As, coeffs, weights = _case(5, shape, 2)
        ref, first = _both(Bs, As, coeffs, weights, method, 0.5, "total", convention, ws)
        _, second = _both([b * 2 for b in Bs], As, coeffs, weights, method, 0.5, "total", convention, ws, seed=30)
        assert _same(first.block(rows=slice(0, 300)).clone(), ref.block(rows=slice(0, 300)))
        assert _same(first.full(), ref.full())
        assert not _same(second.full(), ref.full())


def test_factors_that_could_overflow_go_to_the_reference():
    Bs, As, coeffs, weights = _case(8, (30, 20), 2)
    for scale in (1e39, 1e42):  # ΔW near float32's limit (3.4e38); and beyond it (inf)
        Bs[0] = Bs[0] * scale ** 0.5
        As[0] = As[0] * scale ** 0.5
        for method in ("ties", "magnitude_prune", "dare_linear"):
            ref, fast = _both(Bs, As, coeffs, weights, method, 0.5, "total", "peft", Workspace())
            assert fast._reference is not None
            assert _same(fast.full(), ref.full())
    _, fine = _both(*_case(8, (30, 20), 2), "ties", 0.5, "total", "peft", None)
    assert fine._reference is None


@pytest.mark.parametrize("workspace", [None, Workspace()])
def test_every_block_is_a_tensor_of_its_own(workspace):
    """The engine may still be writing a float32 block (as is, by its writer thread) when it asks for the next."""
    Bs, As, coeffs, weights = _case(9, (60, 45), 2)
    for method in ("ties", "magnitude_prune", "dare_linear"):
        ref, fast = _both(Bs, As, coeffs, weights, method, 0.5, "total", "peft", workspace)
        blocks = [fast.block(rows=slice(0, 30)), fast.block(rows=slice(30, 60)), fast.full()]
        assert len({b.data_ptr() for b in blocks}) == 3
        assert _same(torch.cat(blocks[:2]), ref.full()) and _same(blocks[2], ref.full())


def test_position_free_is_a_fact_about_this_build():
    assert isinstance(position_free(), bool)


# ------------------------------------------------------------------------------------------ workspace

def test_workspace_buffers_owners_and_threads():
    ws = Workspace(limit_bytes=1 << 20)
    a = ws.take("a", (10, 10), torch.float32, "cpu")
    assert ws.take("a", (5, 4), torch.float32, "cpu").data_ptr() == a.data_ptr()  # reused
    big = ws.take("big", (1 << 20,), torch.float32, "cpu")  # 4 MB > limit: fresh every time
    assert ws.take("big", (1 << 20,), torch.float32, "cpu").data_ptr() != big.data_ptr()
    owner, other = object(), object()
    ws.take("x", (3,), torch.float32, "cpu", owner=owner)
    assert ws.held_by("x", owner)
    ws.take("x", (3,), torch.float32, "cpu", owner=other)
    assert not ws.held_by("x", owner) and ws.held_by("x", other)
    assert ws.map(lambda i: i * i, range(7), "cpu") == [i * i for i in range(7)]
    seen = set(ws.map(lambda i: torch.get_num_threads(), range(4), "cpu"))
    assert seen == {1}
    with pytest.raises(ZeroDivisionError):
        ws.map(lambda i: 1 // (i - 3), range(5), "cpu")
    ws.close()


def test_workspace_takes_from_several_threads_at_once():
    """The helper and the calling thread take their first buffers at the same moment: making views (and dropping
    a grown buffer's old ones) from both at once must not break (it raised 'dictionary changed size during
    iteration' before the views were made under a lock)."""
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    ws, errors = Workspace(), []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            for i in range(3000):
                n = int(torch.randint(1, 64, (1,), generator=g))
                view = ws.take(f"b{i % 50}", (n, 3), torch.float32, "cpu", owner=None if i % 3 else object())
                assert view.shape == (n, 3)
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's seed
            errors.append((seed, repr(e)))

    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


# ------------------------------------------------------------------------------------------ through the engine

def test_merge_into_a_float32_base_is_the_reference_bit_for_bit(tmp_path):
    """``adaptool merge`` (a real subprocess: engine, writer thread, shared workspace, helper thread) into a
    float32 base whose MLP weights span two engine blocks: every weight is the base plus the reference's block,
    bit for bit (a float32 block goes to the writer as is, so this also holds blocks to be tensors of their own)."""
    import json

    from conftest import load_output, make_adapter, run_cli, save_model, tiny_llama_config
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from adaptool.engine import BLOCK_ELEMS
    from adaptool.strategies.sparsify import generator_for

    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=1024, intermediate_size=2500, num_hidden_layers=1, num_attention_heads=8,
                               num_key_value_heads=4)
    base = save_model(AutoModelForCausalLM.from_config(config), tmp_path / "base", shard=None)
    adapters = [make_adapter(base, tmp_path / "a", seed=1, dtype=torch.float32, r=8, lora_alpha=16,
                             target_modules=["q_proj", "down_proj", "up_proj"]),
                make_adapter(base, tmp_path / "b", seed=2, dtype=torch.float32, r=4, lora_alpha=8,
                             target_modules=["v_proj", "down_proj", "up_proj"])]
    weights = [1.0, -0.6]
    factors = []
    for a in adapters:
        t = load_file(str(a / "adapter_model.safetensors"))
        c = json.loads((a / "adapter_config.json").read_text())
        factors.append({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
                        (t[k.replace("lora_A", "lora_B")], t[k], c["lora_alpha"] / c["r"]) for k in t if "lora_A" in k})
    W = load_file(str(base / "model.safetensors"))
    for strategy, convention in (("ties", "peft"), ("dare_linear", "mergekit")):
        out = tmp_path / f"out-{strategy}"
        recipe = tmp_path / f"{strategy}.yaml"
        recipe.write_text(f"base: {base}\nadapters:\n  - {{path: {adapters[0]}, weight: {weights[0]}}}\n"
                          f"  - {{path: {adapters[1]}, weight: {weights[1]}}}\nstrategy: {strategy}\n"
                          f"parameters: {{density: 0.4, seed: 3, convention: {convention}}}\n"
                          f"output: {{path: {out}, kind: model}}\ndevice: cpu\n")
        rc, _, err = run_cli("merge", str(recipe), "--quiet")
        assert rc == 0, err
        got = load_output(out)
        merged = set()
        for path in sorted({p for f in factors for p in f}):
            entries = [(f[path], w) for f, w in zip(factors, weights) if path in f]
            gens = [generator_for(3, f"{path}#{i}") for i in range(len(entries))]
            ref = ReferenceBlockwiseMerge([B for (B, _, _), _ in entries], [A for (_, A, _), _ in entries],
                                          [s for (_, _, s), _ in entries], [w for _, w in entries], strategy, 0.4,
                                          "total", gens, convention)
            name = path + ".weight"
            rows = max(1, BLOCK_ELEMS // W[name].shape[1])
            expected = torch.cat([ref.block(rows=slice(s, s + rows)).add_(W[name][s:s + rows])
                                  for s in range(0, W[name].shape[0], rows)])
            assert _same(got[name], expected), name
            merged.add(name)
        assert {"model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"} <= merged
        assert all(_same(got[k], W[k]) for k in W if k not in merged and k in got)
