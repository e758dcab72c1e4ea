"""``adaptool extract``: a LoRA pulled out of a full fine-tune, checked against independent oracles — the float64
best rank-k of the true ΔW, ``adaptool unload`` of the result, and PEFT loading and merging it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, load_output, make_adapter, run_cli, snapshot
from safetensors import safe_open
from safetensors.torch import save_file

import adaptool
from adaptool.errors import AdaptoolError
from adaptool.strategies.rank_rules import RankRule

PREFIX = "base_model.model."
# Singular values of the designed ΔW per module kind (times SCALE): --rank 4 keeps all of them, --sv-fro 0.9
# keeps 2 / 4 / 1 of them (energy 1.25 of 1.3225 ≥ 0.81 · 1.3225; 4 equal values; 1 of 1.03).
SPECTRA = {"q_proj": [1.0, 0.5, 0.25, 0.1], "v_proj": [1.0, 1.0, 1.0, 1.0], "down_proj": [1.0, 0.1, 0.1, 0.1]}
SV_FRO_RANKS = {"q_proj": 2, "v_proj": 4, "down_proj": 1}
SCALE = 0.05
NORM = "model.layers.0.input_layernorm.weight"


def designed_delta(out_f: int, in_f: int, spectrum: list[float], seed: int) -> torch.Tensor:
    """``U diag(s) Vᵀ`` in float64 with random orthonormal U, V: a ΔW whose spectrum is known."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, len(spectrum), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_f, len(spectrum), generator=g, dtype=torch.float64)).Q
    return (U * (SCALE * torch.tensor(spectrum, dtype=torch.float64))) @ V.T


def save_checkpoint(tensors: dict, like: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(like / "config.json", out / "config.json")
    return out


def lora_modules(names) -> list[str]:
    return sorted(n[: -len(".weight")] for n in names if n.rsplit(".", 2)[-2] in SPECTRA and n.endswith(".weight"))


@pytest.fixture(scope="module")
def tuned_llama(llama_base, tmp_path_factory) -> Path:
    """The bf16 base, in float32, plus a designed ΔW on every q/v/down_proj, a changed norm and a changed lm_head."""
    tensors = {k: v.float() for k, v in load_output(llama_base).items()}
    for i, module in enumerate(lora_modules(tensors)):
        w = tensors[module + ".weight"]
        tensors[module + ".weight"] = (w.double() + designed_delta(*w.shape, SPECTRA[module.rsplit(".", 1)[1]], i)).float()
    tensors[NORM] = tensors[NORM] * 1.1
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 0.01 * torch.randn(tensors["lm_head.weight"].shape,
                                                                                generator=torch.Generator().manual_seed(9))
    return save_checkpoint(tensors, llama_base, tmp_path_factory.mktemp("tuned") / "tuned")


@pytest.fixture(scope="module")
def extracted(llama_base, tuned_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract") / "lora"
    summary = adaptool.extract(str(llama_base), str(tuned_llama), out, RankRule.from_options(rank=4))
    return out, summary


def true_delta(base: Path, tuned: Path, name: str, transpose: bool = False) -> torch.Tensor:
    d = load_output(tuned)[name].double() - load_output(base)[name].double()
    return d.T if transpose else d


def best_rank_k(D: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def factor_delta(tensors: dict, module: str) -> torch.Tensor:
    key = PREFIX + module
    return tensors[key + ".lora_B.weight"].double() @ tensors[key + ".lora_A.weight"].double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def unload_to(base: Path, adapter: Path, out: Path, *extra: str) -> dict:
    rc, stdout, stderr = run_cli("unload", f"{base}+{adapter}", "-o", str(out), "--dtype", "float32", *extra)
    assert rc == 0, stderr
    return load_output(out)


# ------------------------------------------------------------------------------------------------ the oracle


def test_rank4_is_the_best_rank_k_and_unload_gives_tuned_back(llama_base, tuned_llama, extracted, tmp_path):
    out, summary = extracted
    tensors = load_output(out)
    modules = lora_modules(load_output(tuned_llama))
    carried = [PREFIX + NORM, PREFIX + "lm_head.weight"]
    assert sorted(tensors) == sorted([PREFIX + m + s for m in modules for s in (".lora_A.weight", ".lora_B.weight")]
                                     + carried)  # equal tensors are left out
    assert all(t.dtype == torch.float32 for t in tensors.values())  # TUNED's dtype
    for m in modules:
        D = true_delta(llama_base, tuned_llama, m + ".weight")
        assert rel(factor_delta(tensors, m), best_rank_k(D, 4)) < 1e-5, m
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == modules and config["r"] == config["lora_alpha"] == 4
    assert config["modules_to_save"] == ["lm_head", "model.layers.0.input_layernorm"]
    assert config["fan_in_fan_out"] is False and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == llama_base.name  # a local base by its folder name, never the path
    assert torch.equal(tensors[PREFIX + NORM], load_output(tuned_llama)[NORM])

    assert summary["command"] == "extract" and summary["rank_out"] == [4, 4]
    assert [r["module"] for r in summary["modules"]] == modules
    for r in summary["modules"]:
        assert r["rank"] == 4 and r["method"] == "exact" and r["error"] < 1e-5 and r["best_error"] < 1e-5
        assert r["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    assert summary["carried"] == sorted([NORM, "lm_head.weight"]) and summary["skipped"] == []
    assert summary["bytes_written"] == sum(t.numel() * t.element_size() for t in tensors.values())

    merged, tuned = unload_to(llama_base, out, tmp_path / "model"), load_output(tuned_llama)
    assert set(merged) == set(tuned)
    for name, t in tuned.items():
        if name.rsplit(".", 2)[-2] in SPECTRA:
            torch.testing.assert_close(merged[name], t, rtol=0, atol=2e-7)  # float32 rounding of W + B A
        else:
            assert torch.equal(merged[name], t), name  # copied (bf16 -> float32 is exact) or carried


def test_output_loads_in_peft_and_computes_tuned(llama_base, tuned_llama, extracted):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = extracted
    base = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    tuned = AutoModelForCausalLM.from_pretrained(tuned_llama, dtype=torch.float32)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tuned(x).logits, rtol=0, atol=1e-5)
    merged = model.merge_and_unload().state_dict()
    for name, t in tuned.state_dict().items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=2e-7)


def test_sv_fro_picks_each_modules_rank(llama_base, tuned_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    rc, stdout, stderr = run_cli("extract", str(llama_base), str(tuned_llama), "-o", str(out), "--sv-fro", "0.9",
                                 "--json")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    tensors = load_output(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == config["alpha_pattern"]
    for r in summary["modules"]:
        kind = r["module"].rsplit(".", 1)[1]
        k = SV_FRO_RANKS[kind]
        assert r["rank"] == k and config["rank_pattern"].get(r["module"], 4) == k
        D = true_delta(llama_base, tuned_llama, r["module"] + ".weight")
        best = best_rank_k(D, k)
        assert rel(factor_delta(tensors, r["module"]), best) < 1e-5
        assert r["error"] == pytest.approx(float((D - best).norm() / D.norm()), rel=1e-5, abs=1e-6)
        assert r["best_error"] == pytest.approx(r["error"], rel=1e-5, abs=1e-6)
    assert summary["rank_out"] == [1, 4]
    assert summary["energy_kept"]["worst_module"].endswith("q_proj")  # 1.25 / 1.3225
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32), out)
    layer = model.base_model.model.model.layers[1]
    for module, path in ((layer.self_attn.q_proj, "model.layers.1.self_attn.q_proj"),
                         (layer.mlp.down_proj, "model.layers.1.mlp.down_proj")):
        torch.testing.assert_close(module.get_delta_weight("default").double(), factor_delta(tensors, path))


def test_modules_filter(llama_base, tuned_llama, tmp_path):
    summary = adaptool.extract(str(llama_base), str(tuned_llama), tmp_path / "mlp", RankRule.from_options(rank=2),
                               modules=r"mlp\.")
    assert [r["module"] for r in summary["modules"]] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert summary["carried"] == [] and all(r["rank"] == 2 for r in summary["modules"])
    assert sorted(load_output(tmp_path / "mlp")) == sorted(
        f"{PREFIX}model.layers.{i}.mlp.down_proj.lora_{x}.weight" for i in (0, 1) for x in "AB")
    summary = adaptool.extract(str(llama_base), str(tuned_llama), tmp_path / "norm", RankRule.from_options(rank=2),
                               modules="layernorm")
    assert summary["modules"] == [] and summary["carried"] == [NORM]
    assert any("only carries modules_to_save" in n for n in summary["notes"])
    with pytest.raises(AdaptoolError, match="nothing differs .*--modules 'embed'"):
        adaptool.extract(str(llama_base), str(tuned_llama), tmp_path / "none", RankRule.from_options(rank=2),
                         modules="embed")
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------- other shapes


def test_gpt2_conv1d(gpt2_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tensors = load_output(gpt2_base)
    changed = {"transformer.h.0.attn.c_attn": [1.0, 0.5, 0.2], "transformer.h.1.mlp.c_fc": [1.0, 1.0]}
    for i, (module, spectrum) in enumerate(changed.items()):
        w = tensors[module + ".weight"]  # Conv1D: (in, out)
        tensors[module + ".weight"] = (w.double() + designed_delta(w.shape[1], w.shape[0], spectrum, i).T).float()
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"] + 0.1
    tuned = save_checkpoint(tensors, gpt2_base, tmp_path / "tuned")
    out = tmp_path / "lora"
    summary = adaptool.extract(str(gpt2_base), str(tuned), out, RankRule.from_options(rank=8))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == sorted(changed)
    assert config["modules_to_save"] == ["transformer.ln_f"]
    assert summary["carried"] == ["transformer.ln_f.bias", "transformer.ln_f.weight"]  # the whole module
    lora = load_output(out)
    for module, spectrum in changed.items():
        w = tensors[module + ".weight"]
        assert lora[PREFIX + module + ".lora_A.weight"].shape == (len(spectrum), w.shape[0])  # (r, in)
        assert lora[PREFIX + module + ".lora_B.weight"].shape == (w.shape[1], len(spectrum))  # (out, r)
        D = true_delta(gpt2_base, tuned, module + ".weight", transpose=True)
        assert rel(factor_delta(lora, module), D) < 1e-5
    merged = unload_to(gpt2_base, out, tmp_path / "model")
    for name, t in load_output(tuned).items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=2e-7)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), out).merge_and_unload()
    for name, t in load_output(tuned).items():
        torch.testing.assert_close(model.state_dict()[name], t, rtol=0, atol=2e-7)


def test_changed_biases_go_in_lora_bias(llama_base, tuned_llama, tmp_path):
    """A target's changed bias rides in lora_B.bias; a bias-only change is a zero rank-1 pair plus the bias."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tensors = load_output(tuned_llama)
    q_bias, k_bias = "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias"
    tensors[q_bias] = tensors[q_bias] + 0.05
    tensors[k_bias] = tensors[k_bias] - 0.05
    tuned = save_checkpoint(tensors, llama_base, tmp_path / "tuned")
    out = tmp_path / "lora"
    summary = adaptool.extract(str(llama_base), str(tuned), out, RankRule.from_options(rank=4))
    lora, base = load_output(out), load_output(llama_base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["rank_pattern"] == {"model.layers.1.self_attn.k_proj": 1}
    for name in (q_bias, k_bias):
        key = PREFIX + name[: -len(".bias")] + ".lora_B.bias"
        torch.testing.assert_close(lora[key], tensors[name] - base[name].float(), rtol=0, atol=0)
    assert not lora[PREFIX + "model.layers.1.self_attn.k_proj.lora_B.weight"].any()
    assert not lora[PREFIX + "model.layers.1.self_attn.v_proj.lora_B.bias"].any()  # zeros: PEFT expects the key
    assert PREFIX + "model.layers.0.mlp.down_proj.lora_B.bias" not in lora  # no bias in the base
    assert any("merge_and_unload refuses" in n for n in summary["notes"])
    merged = unload_to(llama_base, out, tmp_path / "model")
    for name, t in tensors.items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=2e-7)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32), out)
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)(x).logits,
                                   rtol=0, atol=1e-5)


def test_bf16_tuned_and_dtype(llama_base, tmp_path):
    """TUNED = a bf16 unload of a rank-4 PEFT LoRA: ΔW is rank 4 plus bf16 rounding; the output is bf16 unless
    --dtype, and each module's error is the best rank-4 error."""
    adapter = make_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"])
    rc, _, stderr = run_cli("unload", f"{llama_base}+{adapter}", "-o", str(tmp_path / "tuned"))
    assert rc == 0, stderr
    out = tmp_path / "lora"
    summary = adaptool.extract(str(llama_base), str(tmp_path / "tuned"), out, RankRule.from_options(rank=4))
    assert {t.dtype for t in load_output(out).values()} == {torch.bfloat16}
    assert len(summary["modules"]) == 4 and summary["carried"] == []
    for r in summary["modules"]:
        D = true_delta(llama_base, tmp_path / "tuned", r["module"] + ".weight")
        best = float((D - best_rank_k(D, 4)).norm() / D.norm())
        assert r["error"] == pytest.approx(best, rel=1e-3) and r["best_error"] == pytest.approx(best, rel=1e-3)
        written = float((D - factor_delta(load_output(out), r["module"])).norm() / D.norm())  # bf16 factors
        assert r["error_written"] == pytest.approx(written, rel=1e-4) and written > r["error"]
        assert 1e-4 < best < 0.05  # the rounding noise is there, and small
    summary = adaptool.extract(str(llama_base), str(tmp_path / "tuned"), tmp_path / "f32", RankRule.from_options(rank=4),
                               dtype="float32")
    assert {t.dtype for t in load_output(tmp_path / "f32").values()} == {torch.float32}
    with safe_open(str(tmp_path / "f32" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["adaptool.command"] == "extract" and meta["adaptool.rule"] == "--rank 4"
    assert json.loads(meta["adaptool.tuned"])["name"] == "tuned" and json.loads(meta["adaptool.base"])["name"] == "base"
    assert str(tmp_path) not in json.dumps(meta) and str(llama_base) not in json.dumps(meta)
    assert "extract" in (tmp_path / "f32" / "README.md").read_text()


def test_resized_vocabulary_is_carried(llama_base, tmp_path):
    tensors = {k: v.clone() for k, v in load_output(llama_base).items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.zeros(4, tensors[name].shape[1], dtype=torch.bfloat16)])
    tuned = save_checkpoint(tensors, llama_base, tmp_path / "tuned")
    summary = adaptool.extract(str(llama_base), str(tuned), tmp_path / "lora", RankRule.from_options(rank=4))
    assert summary["carried"] == ["lm_head.weight", "model.embed_tokens.weight"] and summary["modules"] == []
    lora = load_output(tmp_path / "lora")
    assert lora[PREFIX + "lm_head.weight"].shape == (260, 64)
    assert sum("has shape [256, 64] in BASE and [260, 64] in TUNED" in n for n in summary["notes"]) == 2


def resized(tensors: dict, names, like: Path, out: Path, rows: int = 4) -> Path:
    """A checkpoint of ``tensors`` with ``rows`` new tokens appended to each of ``names`` and ``vocab_size`` following."""
    g = torch.Generator().manual_seed(3)
    tensors = dict(tensors)
    for name in names:
        t = tensors[name]
        tensors[name] = torch.cat([t, (0.02 * torch.randn(rows, t.shape[1], generator=g)).to(t.dtype)])
    save_checkpoint(tensors, like, out)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] += rows
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_resized_vocabulary_round_trip(llama_base, tuned_llama, tmp_path):
    """TUNED = low-rank changes, a changed norm and 4 new tokens (embedding and head resized, vocab_size 260):
    ``unload BASE+extracted`` gives TUNED back, config included, and PEFT (on the base resized first) computes it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = resized(load_output(tuned_llama), ("model.embed_tokens.weight", "lm_head.weight"), llama_base,
                    tmp_path / "tuned")
    tensors = load_output(tuned)
    lora = tmp_path / "lora"
    rc, stdout, stderr = run_cli("extract", str(llama_base), str(tuned), "-o", str(lora), "--rank", "4", "--json")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["carried"] == sorted([NORM, "lm_head.weight", "model.embed_tokens.weight"])
    assert summary["rank_out"] == [4, 4] and sum("adaptool unload applies it" in n for n in summary["notes"]) == 2
    merged = unload_to(llama_base, lora, tmp_path / "model")
    assert set(merged) == set(tensors) and merged["lm_head.weight"].shape == (260, 64)
    for name, t in tensors.items():
        if name.rsplit(".", 2)[-2] in SPECTRA:
            torch.testing.assert_close(merged[name], t, rtol=0, atol=2e-7)  # float32 rounding of W + B A
        else:
            assert torch.equal(merged[name], t), name
    assert json.loads((tmp_path / "model" / "config.json").read_text())["vocab_size"] == 260
    x = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    x[:, :4] = torch.arange(256, 260)
    expected = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)(x).logits.detach()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)(x).logits.detach()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    base.resize_token_embeddings(260)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base, lora)(x).logits, expected, rtol=0, atol=1e-5)


def test_resized_tied_vocabulary_round_trip(llama_tied_base, tmp_path):
    """A tied model stores only its embedding: resized, it is carried, unloaded, and the head follows it."""
    from transformers import AutoModelForCausalLM

    tuned = resized(load_output(llama_tied_base), ("model.embed_tokens.weight",), llama_tied_base, tmp_path / "tuned")
    summary = adaptool.extract(str(llama_tied_base), str(tuned), tmp_path / "lora", RankRule.from_options(rank=2))
    assert summary["carried"] == ["model.embed_tokens.weight"] and summary["modules"] == []
    merged = unload_to(llama_tied_base, tmp_path / "lora", tmp_path / "model")  # float32: bf16 values exactly
    assert set(merged) == set(load_output(tuned)) and "lm_head.weight" not in merged
    for name, t in load_output(tuned).items():
        assert merged[name].dtype == torch.float32 and torch.equal(merged[name], t.float()), name
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["vocab_size"] == 260 and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, load_output(tuned)["model.embed_tokens.weight"].float())


# ----------------------------------------------------------------------------------------------- refusals


def test_tensor_on_one_side_only(llama_base, tuned_llama, tmp_path):
    tensors = load_output(tuned_llama)
    tensors["model.layers.0.mlp.extra.weight"] = torch.ones(4, 4)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    tuned = save_checkpoint(tensors, llama_base, tmp_path / "tuned")
    before = snapshot(llama_base, tuned)
    rc, stdout, stderr = run_cli("extract", str(llama_base), str(tuned), "-o", str(tmp_path / "out"), "--rank", "4")
    assert_refused(rc, stdout, stderr, tmp_path / "out", before, 2, "model.layers.0.mlp.extra.weight (only in TUNED)",
                   "(and 1 more)", "--skip-missing")
    rc, stdout, stderr = run_cli("extract", str(llama_base), str(tuned), "-o", str(tmp_path / "out"), "--rank", "4",
                                 "--skip-missing", "--json")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["skipped"] == ["model.layers.0.mlp.extra.weight (only in TUNED)",
                                  "model.layers.1.post_attention_layernorm.weight (only in BASE)"]
    assert len(summary["modules"]) == 6 and "skipped" in summary["notes"][0]


def test_bad_inputs_one_line_nothing_written(llama_base, tuned_llama, tmp_path):
    out = tmp_path / "out"
    before = snapshot(llama_base, tuned_llama)
    adapter = make_adapter(llama_base, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    same = tmp_path / "copy"
    shutil.copytree(llama_base, same)
    cli_cases = [  # through the CLI: exit 2, one line, nothing at the target, inputs untouched
        ((str(llama_base), str(same), "--rank", "4"), "nothing differs between BASE and TUNED"),
        ((str(llama_base), str(adapter), "--rank", "4"), "is an adapter, not a model"),
        ((str(llama_base), str(tuned_llama)), "give exactly one of --rank"),
    ]
    for args, needle in cli_cases:
        rc, stdout, stderr = run_cli("extract", *args, "-o", str(out))
        assert_refused(rc, stdout, stderr, out, before, 2, needle)
    rc, stdout, stderr = run_cli("extract", str(llama_base), str(tuned_llama), "-o", str(tuned_llama / "lora"),
                                 "--rank", "4")
    assert_refused(rc, stdout, stderr, tuned_llama / "lora", before, 2)
    rank4 = RankRule.from_options(rank=4)
    api_cases = [
        ((str(llama_base), str(tmp_path / "missing"), out, rank4), {}, "TUNED model .* not found"),
        ((str(llama_base), str(llama_base), out, rank4), {}, "same checkpoint"),
        ((str(llama_base), str(tuned_llama), out, rank4), {"modules": "(["}, "not a valid regular expression"),
        ((str(llama_base), str(tuned_llama), out, rank4), {"modules": "nomatch"}, "matches no module"),
        ((str(llama_base), str(tuned_llama), out, rank4), {"device": "tpu"}, "unknown device"),
        ((str(llama_base), str(tuned_llama), out, rank4), {"dtype": "int3"}, "unknown dtype"),
    ]
    for args, kwargs, needle in api_cases:
        with pytest.raises(AdaptoolError, match=needle):
            adaptool.extract(*args, **kwargs)
        assert not out.exists()
    assert before.retake() == before


def test_nan_in_tuned_is_named(llama_base, tuned_llama, tmp_path):
    tensors = load_output(tuned_llama)
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors[name][3, 5] = float("nan")
    tuned = save_checkpoint(tensors, llama_base, tmp_path / "tuned")
    rc, stdout, stderr = run_cli("extract", str(llama_base), str(tuned), "-o", str(tmp_path / "out"), "--rank", "4")
    assert_refused(rc, stdout, stderr, tmp_path / "out", None, 2, f"tensor {name} of TUNED contains NaN or Inf")
