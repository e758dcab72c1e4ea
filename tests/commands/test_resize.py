"""``adaptool resize`` against independent oracles: PEFT's own ΔW of the input (``get_delta_weight``), its float64
dense SVD, the rules' formulas written out again here, and hand-checked ranks on a module whose ΔW has a designed
spectrum; every output loaded back by PEFT (and folded by ``adaptool unload``)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import (assert_refused, assert_same_model, load_output, make_adapter, make_peft_adapter, peft_merged,
                      run_cli, snapshot, ulp_diff)

from adaptool.commands.resize import best_from_factors, gram_svd, resize
from adaptool.commands.unload import unload
from adaptool.errors import AdaptoolError
from adaptool.strategies.rank_rules import RankRule

PEFT_PREFIX = "base_model.model."
DESIGNED = "model.layers.0.self_attn.q_proj"
# ΔW of DESIGNED has exactly these singular values (r = 8, scale alpha/r = 2).
SIGMAS = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def rule(**kw) -> RankRule:
    return RankRule.from_options(**kw)


# ----------------------------------------------------------------------------------------------------- oracles


def peft_deltas(base: Path, adapter: Path, model=None) -> dict[str, torch.Tensor]:
    """{module path: ΔW} as PEFT computes it for ``adapter`` on ``base`` (float32 model), in float64, flattened to
    2-D in the base weight's layout."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    model = model if model is not None else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter)
    out = {}
    with torch.no_grad():
        for name, m in pm.base_model.model.named_modules():
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "r", {}):
                d = m.get_delta_weight("default").double()
                out[name] = d.reshape(d.shape[0], -1)
    return out


def oracle_rank(S: torch.Tensor, shape, kind: str, value: float, max_rank=None) -> int:
    """The rules as DESIGN states them, written out independently (loops, float64)."""
    S = [float(s) for s in S]
    tol = S[0] * max(shape) * torch.finfo(torch.float32).eps
    n = sum(1 for s in S if s > tol)
    if kind == "rank":
        k = min(int(value), n)
    elif kind == "sv_fro":
        total, run, k = sum(s * s for s in S), 0.0, 0
        while (run / total) ** 0.5 < value * (1 - 1e-12):
            run, k = run + S[k] ** 2, k + 1
    elif kind == "sv_cumulative":
        total, run, k = sum(S), 0.0, 0
        while run / total < value * (1 - 1e-12):
            run, k = run + S[k], k + 1
    else:
        k = sum(1 for s in S if s >= S[0] / value)
    k = min(k, n)
    return max(1, min(k, max_rank) if max_rank else k)


def best_rank(D: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def assert_best(ours: dict, theirs: dict, kind: str, value: float, max_rank=None, rel=1e-5,
                expect: dict | None = None) -> dict[str, int]:
    """Every output ΔW is the float64 best rank-k of the input's, k by the oracle (or ``expect``); returns k's."""
    assert set(ours) == set(theirs)
    ks = {}
    for path, D in theirs.items():
        S = torch.linalg.svdvals(D)
        k = oracle_rank(S, D.shape, kind, value, max_rank)
        if expect and path in expect:
            assert k == expect[path], (path, k)  # the oracle agrees with the hand-checked rank
        best = best_rank(D, k)
        err = float((ours[path] - best).norm() / best.norm())
        assert err <= rel, (path, k, err)
        ks[path] = k
    return ks


def output_ranks(out: Path) -> dict[str, int]:
    """Rank per module as the output's files hold it (lora_A's rows), and check the config states the same."""
    from safetensors.torch import load_file

    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {}
    for key, t in load_file(str(out / "adapter_model.safetensors")).items():
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if key.endswith(suffix):
                ranks[key.removeprefix(PEFT_PREFIX).removesuffix(suffix)] = t.shape[0]
    for path, r in ranks.items():
        assert config["rank_pattern"].get(path, config["r"]) == r
    return ranks


# ---------------------------------------------------------------------------------------------------- fixtures


def write_designed(adapter: Path, path: str, sigmas: list[float], scale: float, seed: int = 5) -> None:
    """Overwrite module ``path``'s factors so that ``scale·B·A = U diag(sigmas) Vᵀ`` (random orthonormal U, V)."""
    from safetensors.torch import load_file, save_file

    file = adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    a_key, b_key = f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    U = torch.linalg.qr(torch.randn(tensors[b_key].shape[0], r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(tensors[a_key].shape[1], r, generator=g, dtype=torch.float64))[0]
    root = (torch.tensor(sigmas, dtype=torch.float64) / scale).sqrt()
    tensors[b_key] = (U * root).to(tensors[b_key].dtype).contiguous()
    tensors[a_key] = (V * root).T.to(tensors[a_key].dtype).contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def designed(llama_base, tmp_path_factory) -> Path:
    """A float32 LoRA (r 8, alpha 16) on q/v/down; q_proj of layer 0 has the designed spectrum SIGMAS."""
    adapter = make_adapter(llama_base, tmp_path_factory.mktemp("designed") / "lora", dtype=torch.float32,
                           r=8, lora_alpha=16, target_modules=TARGETS)
    write_designed(adapter, DESIGNED, SIGMAS, scale=2.0)
    return adapter


@pytest.fixture(scope="module")
def designed_deltas(llama_base, designed) -> dict:
    deltas = peft_deltas(llama_base, designed)
    S = torch.linalg.svdvals(deltas[DESIGNED])
    assert torch.allclose(S[:8], torch.tensor(SIGMAS, dtype=torch.float64), rtol=1e-6)  # the design holds
    return deltas


# ------------------------------------------------------------------------------------------------------- rules


# (options, the rank hand-checked for the designed module)
#   σ² = 64, 16, 4, 1, …  Σσ² = 85.332…: ‖ΔW_k‖/‖ΔW‖ = 0.866, 0.968, 0.992 for k = 1, 2, 3
#   Σσ = 15.9375: cumulative 0.502, 0.753, 0.878, 0.941 for k = 1 … 4
CASES = [
    (dict(rank=3), 3),
    (dict(sv_fro=0.9), 2),
    (dict(sv_fro=0.99), 3),
    (dict(sv_cumulative=0.9), 4),
    (dict(sv_cumulative=0.75), 2),
    (dict(sv_ratio=5.0), 3),  # σ ≥ 1.6
    (dict(sv_ratio=10.0), 4),  # σ ≥ 0.8
    (dict(sv_fro=0.999, max_rank=2), 2),
]


@pytest.mark.parametrize("options,expected", CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_rules_give_the_best_rank_k(llama_base, designed, designed_deltas, tmp_path, options, expected):
    out = tmp_path / "out"
    summary = resize(str(designed), out, rule(**options))
    ranks = output_ranks(out)
    assert ranks[DESIGNED] == expected
    kind, value = next((k, v) for k, v in options.items() if k != "max_rank")
    ks = assert_best(peft_deltas(llama_base, out), designed_deltas, kind, value, options.get("max_rank"),
                     expect={DESIGNED: expected})
    assert ranks == ks
    # the report: rank in -> out, energy of the input ΔW kept
    report = {m["module"]: m for m in summary["modules"]}
    S = torch.tensor(SIGMAS, dtype=torch.float64)
    assert report[DESIGNED]["rank_in"] == 8 and report[DESIGNED]["rank"] == expected
    assert report[DESIGNED]["energy_kept"] == pytest.approx(float((S[:expected] ** 2).sum() / (S ** 2).sum()), rel=1e-6)
    assert summary["rank_out"] == [min(ranks.values()), max(ranks.values())]
    assert summary["energy_kept"]["min"] == min(m["energy_kept"] for m in summary["modules"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["peft_type"] == "LORA"
    for p, r in ranks.items():  # scaling 1 where cut; a module kept whole keeps its scale (2) and its factors
        assert config["alpha_pattern"].get(p, config["lora_alpha"]) / r == (2.0 if r == 8 else 1.0), p


def test_rank_at_or_above_the_input_keeps_it_exactly(llama_base, tmp_path):
    """Nothing to cut: the factors are written as they were (bit for bit) and the scale kept (alpha_pattern),
    for plain and rsLoRA modules; PEFT computes exactly the input's ΔW from the output."""
    adapter = make_adapter(llama_base, tmp_path / "lora", r=4, lora_alpha=6, use_rslora=True,
                           rank_pattern={"v_proj": 2}, target_modules=TARGETS)
    out = tmp_path / "out"
    summary = resize(str(adapter), out, rule(rank=64))
    ours, theirs = load_output(out), load_output(adapter)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)
    before, after = peft_deltas(llama_base, adapter), peft_deltas(llama_base, out)
    assert all(torch.equal(before[p], after[p]) for p in before)
    assert all(m["energy_kept"] == 1.0 and m["rank"] == m["rank_in"] for m in summary["modules"])
    assert summary["energy_kept"]["mean"] == 1.0


def test_rslora_and_patterns_then_peft_and_unload(llama_base, tmp_path):
    """rsLoRA with rank/alpha patterns (PEFT's first-match rule): the best rank-k of what PEFT computes; the
    output loads in PEFT, and `adaptool unload BASE+OUT` folds it exactly as PEFT merges it."""
    adapter = make_adapter(llama_base, tmp_path / "lora", dtype=torch.float32, r=8, lora_alpha=8, use_rslora=True,
                           rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 32},
                           target_modules=TARGETS + ["embed_tokens"])
    out = tmp_path / "out"
    resize(str(adapter), out, rule(sv_fro=0.95))
    ours = peft_deltas(llama_base, out)
    assert_best(ours, peft_deltas(llama_base, adapter), "sv_fro", 0.95)
    assert any(p.endswith("embed_tokens") for p in ours)
    rc, _, err = run_cli("unload", f"{llama_base}+{out}", "-o", str(tmp_path / "model"))
    assert rc == 0, err
    assert_same_model(load_output(tmp_path / "model"), peft_merged(llama_base, [out]), max_ulp=0)


def test_cli_dtype_and_json(llama_base, designed, tmp_path):
    """--dtype bfloat16 from a float32 input (and the input's dtype without it); --json's contract keys."""
    rc, out, err = run_cli("resize", str(designed), "-o", str(tmp_path / "bf16"), "--rank", "3", "--dtype", "bf16",
                           "--json")
    assert rc == 0, err
    summary = json.loads(out)
    for key in ("output", "modules", "rank_out", "bytes_before", "bytes_written", "seconds", "peak_rss_bytes",
                "energy_kept", "notes"):
        assert key in summary, key
    assert summary["command"] == "resize" and summary["rank_out"] == [3, 3]
    assert {m["module"] for m in summary["modules"]} == set(output_ranks(tmp_path / "bf16"))
    assert all(t.dtype == torch.bfloat16 for t in load_output(tmp_path / "bf16").values())
    resize(str(designed), tmp_path / "f32", rule(rank=3))
    f32 = load_output(tmp_path / "f32")
    assert all(t.dtype == torch.float32 for t in f32.values())
    # the bf16 output is the float32 one rounded (within an ulp: it takes the float32-Gram route)
    assert all(ulp_diff(t, f32[k].bfloat16()) <= 1 for k, t in load_output(tmp_path / "bf16").items())
    rc, out, err = run_cli("resize", str(designed), "-o", str(tmp_path / "text"), "--sv-ratio", "5", "--max-rank", "2")
    assert rc == 0 and out.startswith(f"wrote {tmp_path / 'text'}: 6 modules, "), (out, err)
    assert set(output_ranks(tmp_path / "text").values()) <= {1, 2}


def test_bf16_input_keeps_its_dtype(llama_base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(llama_base, tmp_path / "lora", r=8, lora_alpha=16, target_modules=["q_proj"])
    file = str(adapter / "adapter_model.safetensors")  # PEFT saves float32 factors: store them as bf16
    save_file({k: v.bfloat16() for k, v in load_file(file).items()}, file)
    resize(str(adapter), tmp_path / "out", rule(rank=2))
    tensors = load_output(tmp_path / "out")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    theirs = peft_deltas(llama_base, adapter)
    assert_best(peft_deltas(llama_base, tmp_path / "out"), theirs, "rank", 2, rel=1e-2)  # bf16 rounding of factors


# ------------------------------------------------------------------------------------------- other inputs


def test_gpt2_conv1d_bias_and_saved_modules(gpt2_base, tmp_path):
    """GPT-2 Conv1D (fan_in_fan_out), lora_bias (carried scaled) and modules_to_save (carried whole)."""
    adapter = make_adapter(gpt2_base, tmp_path / "lora", dtype=torch.float32, r=6, lora_alpha=12, lora_bias=True,
                           target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, modules_to_save=["ln_f"],
                           trainable_token_indices={"wte": [3, 7]})
    out = tmp_path / "out"
    resize(str(adapter), out, rule(rank=2))
    assert_best(peft_deltas(gpt2_base, out), peft_deltas(gpt2_base, adapter), "rank", 2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is True and config["modules_to_save"] == ["ln_f"]
    assert config["trainable_token_indices"] == {"wte": [3, 7]}
    ours, theirs = load_output(out), load_output(adapter)
    bias = [k for k in theirs if k.endswith("lora_B.bias")]
    assert bias and all(torch.equal(ours[k], theirs[k] * 2.0) for k in bias)  # scaling 12/6 moved into the bias
    saved = [k for k in theirs if ".lora_" not in k]  # ln_f and the token rows as PEFT saves them
    assert any("trainable_tokens" in k for k in saved)
    assert saved and all(torch.equal(ours[k], theirs[k]) for k in saved)
    assert_same_model(load_output(_unload(gpt2_base, out, tmp_path)), peft_merged(gpt2_base, [out], torch.float32),
                      max_ulp=0)


def _unload(base, adapter, tmp_path) -> Path:
    unload(str(base), [str(adapter)], tmp_path / "model")
    return tmp_path / "model"


def test_conv_modules(tmp_path):
    """Conv2d 3x3 and 1x1 LoRA: the kernel flattened to (out, in·k·k), factors shaped back like the input's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(6, 8, 3)
            self.point = torch.nn.Conv2d(8, 6, 1)
            self.head = torch.nn.Linear(6, 4)

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "point", "head"], init_lora_weights=False)
    get_peft_model(Net(), config).save_pretrained(tmp_path / "a")
    resize(str(tmp_path / "a"), tmp_path / "out", rule(rank=2))
    tensors = load_output(tmp_path / "out")
    assert tensors[f"{PEFT_PREFIX}conv.lora_A.weight"].shape == (2, 6, 3, 3)
    assert tensors[f"{PEFT_PREFIX}conv.lora_B.weight"].shape == (8, 2, 1, 1)

    def deltas(adapter):
        from peft.tuners.tuners_utils import BaseTunerLayer

        pm = PeftModel.from_pretrained(Net(), adapter)
        with torch.no_grad():
            return {n: m.get_delta_weight("default").double().flatten(1) for n, m in pm.base_model.model.named_modules()
                    if isinstance(m, BaseTunerLayer)}

    assert_best(deltas(tmp_path / "out"), deltas(tmp_path / "a"), "rank", 2)


@pytest.mark.parametrize("kind", ["loha", "lokr", "adalora"])
def test_dense_families_with_base(llama_base, tmp_path, kind):
    """LoHa, LoKr, AdaLoRA: the best rank-k of PEFT's dense ΔW (needs --base); without it, one line."""
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig

    config = {
        "loha": LoHaConfig(r=3, alpha=6, target_modules=["q_proj", "down_proj"], init_weights=False),
        "lokr": LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=["q_proj", "down_proj"],
                           init_weights=False),
        "adalora": AdaLoraConfig(init_r=6, target_r=2, lora_alpha=16, total_step=10, init_lora_weights=False,
                                 target_modules=["q_proj", "v_proj"]),
    }[kind]
    adapter = make_peft_adapter(llama_base, tmp_path / kind, config, dtype=torch.float32)
    summary = resize(str(adapter), tmp_path / "out", rule(sv_fro=0.9), base=str(llama_base))
    theirs = peft_deltas(llama_base, adapter)
    ks = assert_best(peft_deltas(llama_base, tmp_path / "out"), theirs, "sv_fro", 0.9, rel=2e-5)
    for m in summary["modules"]:
        assert m["rank"] == ks[m["module"]]
        assert m["rank_in"] == int(torch.linalg.matrix_rank(theirs[m["module"]].float()))
    with pytest.raises(AdaptoolError, match="needs the base model"):
        resize(str(adapter), tmp_path / "nobase", rule(rank=2))
    assert not (tmp_path / "nobase").exists()


def _to_kohya(adapter: Path, dest: Path, alpha: float) -> Path:
    from safetensors.torch import load_file, save_file

    out = {}
    for key, t in load_file(str(adapter / "adapter_model.safetensors")).items():
        path, _, suffix = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        flat = "lora_" + path.replace(".", "_")
        out[f"{flat}.lora_{'down' if suffix == 'A.weight' else 'up'}.weight"] = t
        out[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(out, str(dest))
    return dest


def test_kohya_file_with_base(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "lora", dtype=torch.float32, r=8, lora_alpha=4,
                           target_modules=TARGETS)
    kohya = _to_kohya(adapter, tmp_path / "k.safetensors", alpha=4.0)
    out = tmp_path / "out"
    resize(str(kohya), out, rule(sv_cumulative=0.8), base=str(llama_base))
    assert_best(peft_deltas(llama_base, out), peft_deltas(llama_base, adapter), "sv_cumulative", 0.8)
    rc, o, err = run_cli("resize", str(kohya), "-o", str(tmp_path / "nobase"), "--rank", "2")
    assert_refused(rc, o, err, tmp_path / "nobase", None, 2, "--base")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(llama_base, designed, designed_deltas, tmp_path):
    summary = resize(str(designed), tmp_path / "gpu", rule(sv_fro=0.9), device="cuda")
    assert summary["device"].startswith("cuda")
    resize(str(designed), tmp_path / "cpu", rule(sv_fro=0.9), device="cpu")
    assert output_ranks(tmp_path / "gpu") == output_ranks(tmp_path / "cpu")
    assert_best(peft_deltas(llama_base, tmp_path / "gpu"), designed_deltas, "sv_fro", 0.9)
    cpu = load_output(tmp_path / "cpu")
    for k, t in load_output(tmp_path / "gpu").items():  # same signs, same factors up to rounding
        torch.testing.assert_close(t, cpu[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- maths


@pytest.mark.parametrize("half", [False, True], ids=["float32-out", "bf16-out"])
@pytest.mark.parametrize("case", ["balanced", "ill_conditioned", "rank_deficient", "zero", "negative_scale"])
def test_factor_routes_against_dense_svd(case, half):
    """best_from_factors against a float64 dense SVD, on each Gram route and where it must hand over to QR."""
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(300, 12, generator=g), torch.randn(12, 200, generator=g)
    scale = -0.7 if case == "negative_scale" else 1.5
    if case == "ill_conditioned":  # B's columns 1 … 1e-6, A's rows the inverse: ΔW is well scaled, B is not
        d = torch.logspace(0, -6, 12)
        B, A = B * d, A / d[:, None]
    elif case == "rank_deficient":
        B[:, 5:] = B[:, :5] @ torch.randn(5, 7, generator=g)  # B of rank 5 (in float32 rounding)
    elif case == "zero":
        B = torch.zeros_like(B)
    D = (B.double() @ A.double()) * scale
    well = case in ("balanced", "negative_scale")
    assert (gram_svd(B, A, scale) is not None) == well
    assert (gram_svd(B, A, scale, torch.float32) is not None) == well
    B_k, A_k, S, k = best_from_factors(B, A, scale, rule(rank=4), (300, 200), torch.float32, fast=half)
    tight = not (half and well)  # the float32 Gram route: ~1e-6 instead of float32 rounding
    assert torch.allclose(S[:4], torch.linalg.svdvals(D)[:4], rtol=1e-9 if tight else 1e-6, atol=1e-12)
    if case == "zero":
        assert k == 1 and not B_k.any()
        return
    best = best_rank(D, 4)
    assert k == 4 and float((B_k.double() @ A_k.double() - best).norm() / best.norm()) < (1e-6 if tight else 1e-5)


# ------------------------------------------------------------------------------------------------- refusals


def test_refusals_one_line_nothing_written(llama_base, designed, tmp_path):
    from peft import IA3Config

    dora = make_adapter(llama_base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    ia3 = make_peft_adapter(llama_base, tmp_path / "ia3", IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False))
    before = snapshot(designed, dora, ia3)
    cases = {
        "two": ([str(designed), "--rank", "2", "--sv-fro", "0.9"], "exactly one"),
        "none": ([str(designed)], "exactly one"),
        "fro": ([str(designed), "--sv-fro", "1.5"], "--sv-fro"),
        "dora": ([str(dora), "--rank", "2"], "DoRA"),
        "ia3": ([str(ia3), "--rank", "2", "--base", str(llama_base)], "IA3"),
        "missing": ([str(tmp_path / "nothere"), "--rank", "2"], "not found"),
    }

    def run(name):
        args, _ = cases[name]
        return run_cli("resize", *args, "-o", str(tmp_path / f"out-{name}"))

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    for name, (rc, out, err) in results.items():
        assert_refused(rc, out, err, tmp_path / f"out-{name}", before, 2, cases[name][1])


@pytest.mark.parametrize("options,needle", [(dict(sv_ratio=0.5), "--sv-ratio"), (dict(rank=0), "--rank"),
                                            (dict(sv_cumulative=0.0), "--sv-cumulative"),
                                            (dict(rank=4, max_rank=0), "--max-rank")])
def test_rule_values_refused(options, needle):
    with pytest.raises(AdaptoolError, match=needle):
        rule(**options)


def test_existing_target_needs_force(designed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(AdaptoolError, match="--force"):
        resize(str(designed), out, rule(rank=2))
    assert (out / "keep.txt").read_text() == "x"
    resize(str(designed), out, rule(rank=2), force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()


# ------------------------------------------------------------------------------------- non-finite and overflow


def _rewrite_factor(adapter: Path, out: Path, key_part: str, change) -> Path:
    """A copy of ``adapter`` whose first tensor with ``key_part`` in its name is changed by ``change``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    name = sorted(n for n in tensors if key_part in n)[0]
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("key_part, bad", [("lora_A", float("nan")), ("lora_B", float("inf")),
                                           ("lora_B", -float("inf"))])
def test_non_finite_factor_is_named(llama_base, tmp_path, dtype, key_part, bad):
    """The factors' finiteness is read off their Gram matrices: a NaN/Inf anywhere still ends in one line naming
    the tensor, exit 2, nothing written."""
    adapter = make_adapter(llama_base, tmp_path / "a", dtype=dtype, r=8, target_modules=TARGETS)

    def poison(t):
        t.view(-1)[t.numel() // 2 + 3] = bad
        return t

    broken = _rewrite_factor(adapter, tmp_path / "broken", key_part, poison)
    target = tmp_path / "out"
    before = snapshot(broken)
    rc, out, err = run_cli("resize", str(broken), "-o", str(target), "--rank", "4")
    assert_refused(rc, out, err, target, before, 2, "contains NaN or Inf", key_part)


def test_float32_gram_overflow_takes_float64(llama_base, tmp_path):
    """Finite float32 factors whose squares overflow a float32 Gram matrix (|x| ~ 1e20) are resized exactly
    through the float64 route (and --dtype bfloat16 asks for the float32 route first)."""
    adapter = make_adapter(llama_base, tmp_path / "a", dtype=torch.float32, r=8, target_modules=["q_proj"])
    huge = _rewrite_factor(adapter, tmp_path / "huge", "lora_B", lambda t: t * 1e20)
    from safetensors.torch import load_file

    from adaptool.strategies.best_rank import NON_FINITE

    factors = load_file(huge / "adapter_model.safetensors")
    b = next(t for n, t in factors.items() if "lora_B" in n)
    a = next(t for n, t in factors.items() if "lora_A" in n)
    assert gram_svd(b, a, 2.0, torch.float32) is NON_FINITE  # the float32 route really overflows
    deltas = peft_deltas(llama_base, huge)
    for dtype, tol in (("bfloat16", 1e-2), ("float32", 1e-5)):
        summary = resize(str(huge), tmp_path / dtype, rule(rank=4), dtype=dtype)
        assert summary["rank_out"] == [4, 4]
        out = peft_deltas(llama_base, tmp_path / dtype)
        for path, D in deltas.items():
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            best = (U[:, :4] * S[:4]) @ Vh[:4]
            assert float((out[path] - best).norm() / best.norm()) < tol, (dtype, path)
