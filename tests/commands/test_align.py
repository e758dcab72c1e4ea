"""``adaptool align`` against independent oracles: PEFT's own ΔW of each input (``get_delta_weight``), float64
products of the input factors, a float64 SVD for rank cuts, and a real transformers hotswap (``load_adapter(…,
hotswap=True)``) compared with a fresh PeftModel holding the ORIGINAL adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, load_output, make_adapter, make_peft_adapter, run_cli, snapshot

from adaptool.commands.align import align
from adaptool.errors import AdaptoolError

PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------------- oracles


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{module path: ΔW} as PEFT computes it for ``adapter`` on a float32 ``base`` (float64 copy, 2-D)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    out = {}
    with torch.no_grad():
        for name, m in pm.base_model.model.named_modules():
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "r", {}):
                d = m.get_delta_weight("default").double()
                out[name] = d.reshape(d.shape[0], -1)
    return out


def factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (B, A)} as stored (linear and embedding LoRA names)."""
    t = {k.removeprefix(PEFT_PREFIX): v for k, v in load_output(folder).items()}
    out = {}
    for k in t:
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if k.endswith(a_suffix):
                path = k[: -len(a_suffix)]
                out[path] = (t[path + b_suffix], t[k])
    return out


def scales(folder: Path) -> dict[str, float]:
    """Each module's scaling from the input's config, PEFT's first-match rule written out again."""
    import math
    import re

    c = json.loads((folder / "adapter_config.json").read_text())
    out = {}
    for path in factors(folder):
        pick = lambda pat, default: next((v for k, v in (pat or {}).items()  # noqa: E731
                                          if re.match(rf"(.*\.)?({k})$", path)), default)
        r, alpha = pick(c.get("rank_pattern"), c["r"]), pick(c.get("alpha_pattern"), c["lora_alpha"])
        out[path] = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
    return out


def dense64(B: torch.Tensor, A: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    return s * (B.double().reshape(B.shape[0], -1) @ A.double().reshape(A.shape[0], -1))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def original_logits(base: Path, adapter: Path, ids) -> torch.Tensor:
    """A fresh model holding the ORIGINAL adapter through PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter),
                  ids)


# ---------------------------------------------------------------------------------------------------- fixtures


def stored_as(folder: Path, dtype=torch.bfloat16) -> Path:
    """Rewrite an adapter's LoRA factors in ``dtype`` (PEFT saves them float32 whatever the model's dtype)."""
    from safetensors.torch import save_file

    t = {k: (v.to(dtype) if ".lora_" in k else v) for k, v in load_output(folder).items()}
    save_file(t, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def pow2_set(llama_base, tmp_path_factory) -> list[Path]:
    """bf16 LoRAs with different ranks, targets and power-of-two scales: plain (r 4, s 2), plain (r 8, s 0.5),
    rsLoRA with rank/alpha patterns and an embedding (s 2 and 4)."""
    root = tmp_path_factory.mktemp("pow2")
    return [stored_as(p) for p in (
        make_adapter(llama_base, root / "style-a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        make_adapter(llama_base, root / "style-b", seed=2, r=8, lora_alpha=4,
                     target_modules=["q_proj", "k_proj", "down_proj"]),
        make_adapter(llama_base, root / "style-c", seed=3, r=4, lora_alpha=4, use_rslora=True,
                     rank_pattern={"o_proj": 1}, alpha_pattern={"o_proj": 4},
                     target_modules=["q_proj", "o_proj", "embed_tokens"]),
    )]


@pytest.fixture(scope="module")
def odd_set(llama_base, tmp_path_factory) -> list[Path]:
    """Scales that are no power of two: float32 plain (5/3), float32 rsLoRA (7/√3), bf16 plain (1.5)."""
    root = tmp_path_factory.mktemp("odd")
    return [
        make_adapter(llama_base, root / "odd-a", seed=4, dtype=torch.float32, r=6, lora_alpha=10,
                     target_modules=["q_proj", "gate_proj"]),
        make_adapter(llama_base, root / "odd-b", seed=5, dtype=torch.float32, r=3, lora_alpha=7, use_rslora=True,
                     target_modules=["q_proj", "up_proj"]),
        stored_as(make_adapter(llama_base, root / "odd-c", seed=6, r=4, lora_alpha=6, target_modules=["v_proj"])),
    ]


@pytest.fixture(scope="module")
def aligned_pow2(pow2_set, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("aligned") / "pow2"
    return out, align([str(p) for p in pow2_set], out)


# -------------------------------------------------------------------------------------------------- (1) ΔW


def test_power_of_two_scales_fold_bit_exactly(llama_base, pow2_set, aligned_pow2):
    """Each aligned adapter's ΔW is its input's, bit for bit, as PEFT computes it (float32 model) and as float64
    products of the factors; A is copied bit for bit, B is s·B exactly, padding and absent modules are zeros."""
    out, summary = aligned_pow2
    assert summary["rank"] == 8 and summary["fold_exact"] is True
    configs = {(out / p.name / "adapter_config.json").read_bytes() for p in pow2_set}
    assert len(configs) == 1  # one config for all
    config = json.loads(configs.pop())
    union = sorted({m for p in pow2_set for m in factors(p)})
    assert config["r"] == config["lora_alpha"] == 8 and config["target_modules"] == union
    assert not config["rank_pattern"] and not config["alpha_pattern"] and config["use_rslora"] is False
    for inp in pow2_set:
        mine, theirs, s = factors(out / inp.name), factors(inp), scales(inp)
        assert sorted(mine) == union
        for path, (B, A) in mine.items():
            assert B.shape[1] == A.shape[0] == 8 and B.dtype == A.dtype == torch.bfloat16
            if path not in theirs:
                assert not B.any() and not A.any()  # an explicit zero module
                continue
            b, a = theirs[path]
            r = a.shape[0]
            assert torch.equal(A[:r], a) and not A[r:].any() and not B[:, r:].any()
            assert torch.equal(B[:, :r].double(), b.double() * s[path])  # power of two: exact
            assert torch.equal(dense64(B, A), dense64(b, a, s[path]))
        before, after = peft_deltas(llama_base, inp), peft_deltas(llama_base, out / inp.name)
        for path, d in after.items():
            assert torch.equal(d, before[path]) if path in before else not d.any(), path
    by_name = {a["name"]: a for a in summary["adapters"]}
    assert by_name["style-a"]["modules_zero"] == len(union) - 4 and by_name["style-c"]["scales"] == [2.0, 4.0]


def test_other_scales_fold_within_one_rounding(llama_base, odd_set, tmp_path):
    """s·B rounded once to the stored dtype: the ΔW error is what that rounding gives (≤ one unit in the last
    place per element), the summary states it (matching a dense float64 oracle) and says the fold is not exact."""
    out = tmp_path / "aligned"
    summary = align([str(p) for p in odd_set], out)
    assert summary["rank"] == 6 and summary["fold_exact"] is False
    reported = {a["name"]: a for a in summary["adapters"]}
    for inp in odd_set:
        mine, theirs, s = factors(out / inp.name), factors(inp), scales(inp)
        worst = 0.0
        for path, (b, a) in theirs.items():
            B, A = mine[path]
            r = a.shape[0]
            assert torch.equal(A[:r], a)  # A untouched
            eps = torch.finfo(b.dtype).eps
            exact = b.double() * s[path]
            assert ((B[:, :r].double() - exact).abs() <= exact.abs() * eps / 2).all()  # rounded once, to nearest
            want = dense64(b, a, s[path])
            err = float((dense64(B, A) - want).norm() / want.norm())
            assert err <= eps, (inp.name, path, err)
            worst = max(worst, err)
        assert reported[inp.name]["fold_exact"] is False
        assert reported[inp.name]["fold_error"] == pytest.approx(worst, rel=1e-6)
        before, after = peft_deltas(llama_base, inp), peft_deltas(llama_base, out / inp.name)
        for path, d in before.items():
            assert float((after[path] - d).norm() / d.norm()) <= 2 * torch.finfo(torch.float32).eps + worst


# ------------------------------------------------------------------------------------------------ (2) hotswap


def test_transformers_hotswaps_the_aligned_set(llama_base, pow2_set, aligned_pow2):
    """load_adapter(aligned 1) then load_adapter(aligned k, hotswap=True), k = 2, 3 and back to 1: the logits are
    those of a fresh model holding the ORIGINAL adapter k (within float32 rounding: a matmul over a zero-padded
    rank may sum in another order; measured ≤ 2e-7 relative), and bit for bit those of a fresh load of aligned k."""
    from transformers import AutoModelForCausalLM

    out, _ = aligned_pow2
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    model.load_adapter(str(out / pow2_set[0].name), adapter_name="default")
    first = logits(model, ids)
    for i, inp in enumerate([pow2_set[0], *pow2_set[1:], pow2_set[0]]):
        if i:  # the first was loaded plainly
            model.load_adapter(str(out / inp.name), adapter_name="default", hotswap=True)
        got, want = logits(model, ids), original_logits(llama_base, inp, ids)
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), inp.name
        assert torch.equal(got, original_logits(llama_base, out / inp.name, ids)), inp.name
    assert not torch.equal(original_logits(llama_base, pow2_set[1], ids), first)  # the swaps changed something


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_peft_hotswap_adapter_takes_the_aligned_set(llama_base, odd_set, tmp_path, dtype):
    """PEFT's own hotswap (peft.utils.hotswap.hotswap_adapter) swaps the aligned adapters: bit for bit a fresh load
    of each, and the ORIGINAL's logits within float32 rounding where the fold was exact to float32 (the bf16 input
    with scale 1.5 is not, by default: s·B rounds to bf16; with dtype float32 it folds exactly)."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter
    from transformers import AutoModelForCausalLM

    out = tmp_path / "aligned"
    summary = align([str(p) for p in odd_set], out, dtype=dtype)
    report = {a["name"]: a for a in summary["adapters"]}
    assert report["odd-c"]["fold_exact"] is (dtype == "float32")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32),
                                   out / odd_set[0].name)
    for inp in [*odd_set[1:], odd_set[0]]:
        hotswap_adapter(pm, str(out / inp.name), adapter_name="default")
        got, want = logits(pm, ids), original_logits(llama_base, inp, ids)
        assert torch.equal(got, original_logits(llama_base, out / inp.name, ids)), inp.name
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel <= (1e-5 if report[inp.name]["fold_error"] < 1e-6 else 1e-2), (inp.name, rel)


def test_the_original_set_does_not_hotswap(llama_base, odd_set):
    """The inputs as they were (ranks 6, 3, 4; other targets; other scales): transformers' load_adapter(…,
    hotswap=True) and PEFT's hotswap_adapter both raise."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    model.load_adapter(str(odd_set[0]), adapter_name="default")
    with pytest.raises((RuntimeError, ValueError)):
        model.load_adapter(str(odd_set[1]), adapter_name="default", hotswap=True)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32), odd_set[0])
    with pytest.raises((RuntimeError, ValueError)):
        hotswap_adapter(pm, str(odd_set[1]), adapter_name="default")


# --------------------------------------------------------------------------------------------------- (3) --rank


def test_rank_cut_is_the_best_rank_k_and_reports_its_energy(llama_base, tmp_path):
    """--rank below an input's rank: its modules become the float64 SVD's best rank-R (float32 rounding), the
    energy reported is Σσ²_{≤R}/Σσ², and the error left is 1 − that; a smaller input is padded exactly."""
    big = make_adapter(llama_base, tmp_path / "big", seed=7, dtype=torch.float32, r=8, lora_alpha=12,
                       target_modules=["q_proj", "v_proj"])
    small = make_adapter(llama_base, tmp_path / "small", seed=8, dtype=torch.float32, r=2, lora_alpha=4,
                         target_modules=["q_proj"])
    out = tmp_path / "aligned"
    summary = align([str(big), str(small)], out, rank=3)
    assert summary["rank"] == 3
    mine, s = factors(out / "big"), scales(big)
    energies = []
    for path, (b, a) in factors(big).items():
        D = dense64(b, a, s[path])
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        got = dense64(*mine[path])
        assert float((got - best).norm() / best.norm()) <= 1e-5, path
        energy = float((S[:3] ** 2).sum() / (S ** 2).sum())
        assert float((D - got).norm() ** 2 / D.norm() ** 2) == pytest.approx(1 - energy, rel=1e-4)
        energies.append(energy)
    report = {a["name"]: a for a in summary["adapters"]}
    assert report["big"]["truncated"] == 4 and report["small"]["truncated"] == 0
    assert report["big"]["energy_kept"]["min"] == pytest.approx(min(energies), rel=1e-9)
    assert report["big"]["energy_kept"]["mean"] == pytest.approx(sum(energies) / 4, rel=1e-9)
    q = "model.layers.0.self_attn.q_proj"
    (b, a), (B, A) = factors(small)[q], factors(out / "small")[q]
    assert torch.equal(dense64(B, A), dense64(b, a, 2.0))
    peft_deltas(llama_base, out / "big")  # PEFT loads the cut adapter


def test_carries_identical_modules_to_save(llama_base, tmp_path):
    """Inputs saving the same modules_to_save keep their own copies (bit for bit); PEFT's logits unchanged."""
    ins = [make_adapter(llama_base, tmp_path / f"m{i}", seed=10 + i, r=2 + 2 * i, lora_alpha=4,
                        target_modules=["q_proj"], modules_to_save=["lm_head"]) for i in range(2)]
    out = tmp_path / "aligned"
    align([str(p) for p in ins], out)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    for inp in ins:
        key = PEFT_PREFIX + "lm_head.weight"
        assert torch.equal(load_output(out / inp.name)[key], load_output(inp)[key])
        assert json.loads((out / inp.name / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
        want = original_logits(llama_base, inp, ids)
        assert torch.allclose(original_logits(llama_base, out / inp.name, ids), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ (4) CLI


def test_cli_main_path(pow2_set, tmp_path):
    out = tmp_path / "cli"
    rc, stdout, err = run_cli("align", *(str(p) for p in pow2_set), "-o", str(out), "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["rank"] == 8 and summary["fold_exact"] is True and summary["folders"] == [p.name for p in pow2_set]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in pow2_set), "adaptool-manifest.json"])
    rc, stdout, err = run_cli("align", *(str(p) for p in pow2_set[:2]), "-o", str(out), "--rank", "2", "--force")
    assert rc == 0, err
    assert "bit-exact" in stdout and "cut to rank 2" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["adaptool-manifest.json", "style-a", "style-b"]  # all replaced


def _edited_copy(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    if tensors:
        from safetensors.torch import save_file

        t = load_output(dst)
        tensors(t)
        save_file(t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def _narrow_q(t: dict) -> None:
    key = PEFT_PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = t[key][:, :32].contiguous()


HOSTILE = {
    "one input": (lambda a, b, tmp: [a], {}, "at least two"),
    "same name": (lambda a, b, tmp: [a, _edited_copy(a, tmp / "other" / a.name)], {}, "subfolder"),
    "other base": (lambda a, b, tmp: [a, _edited_copy(b, tmp / "b2", {"base_model_name_or_path": "org/Other-7B"})],
                   {}, "trained on"),
    "shape differs": (lambda a, b, tmp: [a, _edited_copy(b, tmp / "b3", tensors=_narrow_q)], {}, "q_proj"),
    "rank 0": (lambda a, b, tmp: [a, b], {"rank": 0}, "--rank"),
    "rank not an int": (lambda a, b, tmp: [a, b], {"rank": 2.5}, "--rank"),
    "no such input": (lambda a, b, tmp: [a, tmp / "missing"], {}, "missing"),
    "output inside an input": (lambda a, b, tmp: [a, b], {"output": "inside"}, "inside"),
}


def assert_api_refused(inputs: list[Path], target: Path, needle: str, **kw) -> None:
    """The API raises AdaptoolError with one line naming the problem; nothing written; inputs unchanged."""
    before = snapshot(*[p for p in inputs if p.exists()])
    with pytest.raises(AdaptoolError) as e:
        align([str(p) for p in inputs], target, **kw)
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
    assert not target.exists() and not [p for p in target.parent.iterdir() if ".adaptool-" in p.name]
    assert before.retake() == before


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile(pow2_set, tmp_path, case):
    make, kw, needle = HOSTILE[case]
    inputs = make(pow2_set[0], pow2_set[1], tmp_path)
    kw = dict(kw)
    target = inputs[0] / "inside" if kw.pop("output", None) else tmp_path / "out"
    assert_api_refused(inputs, target, needle, **kw)


def test_refuses_what_cannot_be_aligned(llama_base, pow2_set, tmp_path):
    """DoRA, lora_bias, another type, differing modules_to_save: one line, nothing written, inputs untouched."""
    from peft import LoHaConfig

    a = pow2_set[0]
    dora = make_adapter(llama_base, tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    bias = make_adapter(llama_base, tmp_path / "bias", r=2, target_modules=["q_proj"], lora_bias=True)
    loha = make_peft_adapter(llama_base, tmp_path / "loha", LoHaConfig(r=2, target_modules=["q_proj"],
                                                                        init_weights=False))
    saved = make_adapter(llama_base, tmp_path / "saved", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    for other, needle in ((dora, "DoRA"), (bias, "lora_bias"), (loha, "LOHA"), (saved, "modules_to_save")):
        assert_api_refused([a, other], tmp_path / "out", needle)


def test_cli_hostile(pow2_set, tmp_path):
    """Refusals through the real CLI: exit 2, one line, no traceback, nothing left behind; a non-empty target
    without --force is refused and kept."""
    a, b = pow2_set[:2]
    before = snapshot(a, b)
    target = tmp_path / "out"
    rc, out, err = run_cli("align", str(a), "-o", str(target))
    assert_refused(rc, out, err, target, before, 2, "at least two")
    target.mkdir()
    (target / "keep.txt").write_text("x")
    rc, out, err = run_cli("align", str(a), str(b), "-o", str(target))
    assert rc == 2 and (target / "keep.txt").exists(), err  # a non-empty target needs --force
