"""adaptool merge against PEFT: factor space = add_weighted_adapter, delta space = Σ wᵢ·ΔWᵢ, svd = best rank-k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_output, make_adapter, run_cli

from adaptool.commands.merge import merge


@pytest.fixture(scope="module")
def adapters(llama_base, tmp_path_factory):
    """Three bf16 adapters: a, b share r=4 (different alphas, different targets); c is r=2 with rsLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(llama_base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_adapter(llama_base, root / "b", seed=2, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    c = make_adapter(llama_base, root / "c", seed=3, r=2, lora_alpha=4, use_rslora=True,
                     target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 3})
    return {"a": a, "b": b, "c": c}


def recipe(tmp_path, body: str, **fmt) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(body.format(**fmt))
    return path


def delta_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW of one adapter on a float32 base, through PEFT's merge_and_unload."""
    from conftest import peft_merged

    merged = peft_merged(base, [adapter], dtype=torch.float32)
    base_sd = {k: v.float() for k, v in load_output(base).items()}
    return {k: merged[k] - base_sd[k] for k in base_sd}


def rel_err(x, y) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def peft_model_with(base: Path, paths: list[Path], names: list[str]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
    for p, n in zip(paths[1:], names[1:]):
        pm.load_adapter(p, adapter_name=n)
    return pm


def merged_adapter_delta(base: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Reload a merged adapter with PEFT and return its ΔW per weight (also proves it loads)."""
    return delta_weights(base, adapter_dir)


# ---------------------------------------------------------------------------------------------- delta space


@pytest.mark.parametrize("kind", ["adapter", "model"])
def test_linear_is_exact_weighted_sum(llama_base, adapters, tmp_path, kind):
    """Σ wᵢ·ΔWᵢ, negative weights, different ranks/alphas/rsLoRA/targets: exact to 1e-6 (float32)."""
    weights = {"a": 0.7, "b": -0.3, "c": 1.5}
    path = recipe(tmp_path, """
base: {base}
adapters:
  - {{path: {a}, weight: 0.7}}
  - {{path: {b}, weight: -0.3}}
  - {{path: {c}, weight: 1.5}}
strategy: linear
output: {{path: {out}, kind: {kind}, dtype: float32}}
device: cpu
""", base=llama_base, out=tmp_path / "out", kind=kind, **adapters)
    summary = merge(path)
    expected = {k: sum(w * delta_weights(llama_base, adapters[n])[k] for n, w in weights.items())
                for k in load_output(llama_base)}
    if kind == "model":
        ours = load_output(tmp_path / "out")
        base_sd = load_output(llama_base)
        got = {k: ours[k] - base_sd[k].float() for k in base_sd}
    else:
        cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert cfg["r"] == 10 and cfg["rank_pattern"]  # a+b+c on q_proj; smaller elsewhere
        got = merged_adapter_delta(llama_base, tmp_path / "out")
    changed = [k for k in expected if expected[k].abs().max() > 0]
    assert len(changed) == 10  # q, v, down (a), up (b), o (c) in both layers
    for k in changed:
        assert rel_err(got[k], expected[k]) < 1e-6, k
    assert summary["modules"] == 10


def test_svd_is_best_rank_k_and_beats_peft(llama_base, adapters, tmp_path):
    path = recipe(tmp_path, """
adapters:
  - {{path: {a}, weight: 1.0}}
  - {{path: {b}, weight: 1.0}}
strategy: svd
parameters: {{rank: 3}}
output: {{path: {out}, dtype: float32}}
""", out=tmp_path / "out", **adapters)
    summary = merge(path)
    assert summary["rank_out"] == [3, 3] and 0 < summary["energy_kept"]["min"] < 1
    got = merged_adapter_delta(llama_base, tmp_path / "out")
    da, db = delta_weights(llama_base, adapters["a"]), delta_weights(llama_base, adapters["b"])
    pm = peft_model_with(llama_base, [adapters["a"], adapters["b"]], ["a", "b"])
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "svd", combination_type="svd", svd_rank=3)
    key = "model.layers.0.self_attn.q_proj"
    layer = pm.base_model.model.get_submodule(key)
    peft_delta = layer.get_delta_weight("svd")
    exact = da[key + ".weight"] + db[key + ".weight"]
    U, S, Vh = torch.linalg.svd(exact.double())
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    assert rel_err(got[key + ".weight"].double(), best) < 1e-5  # Eckart-Young
    assert (got[key + ".weight"] - exact).norm() <= (peft_delta - exact).norm() * (1 + 1e-5)


def test_ties_into_base_matches_peft_merge_utils(llama_base, adapters, tmp_path):
    from peft.utils.merge_utils import ties

    path = recipe(tmp_path, """
base: {base}
adapters:
  - {{path: {a}, weight: 0.8}}
  - {{path: {b}, weight: 0.6}}
strategy: ties
parameters: {{density: 0.4, majority_sign_method: frequency}}
output: {{path: {out}, kind: model, dtype: float32}}
""", base=llama_base, out=tmp_path / "out", **adapters)
    merge(path)
    ours = load_output(tmp_path / "out")
    base_sd = load_output(llama_base)
    da, db = delta_weights(llama_base, adapters["a"]), delta_weights(llama_base, adapters["b"])
    key = "model.layers.1.self_attn.v_proj.weight"
    expected = ties([da[key], db[key]], torch.tensor([0.8, 0.6]), 0.4, "frequency")
    assert rel_err(ours[key] - base_sd[key].float(), expected) < 1e-6
    only_a = "model.layers.1.mlp.down_proj.weight"  # a missing module counts as zero: ties of one delta
    expected = ties([da[only_a]], torch.tensor([0.8]), 0.4, "frequency")
    assert rel_err(ours[only_a] - base_sd[only_a].float(), expected) < 1e-6


def test_dare_is_deterministic_whatever_the_threads(llama_base, adapters, tmp_path):
    body = """
adapters:
  - {{path: {a}, weight: 1.0}}
  - {{path: {b}, weight: 1.0}}
strategy: dare_ties
parameters: {{density: 0.5, seed: {seed}}}
output: {{path: {out}, dtype: float32}}
"""
    outs = []
    threads = torch.get_num_threads()
    try:
        for i, (seed, n_threads) in enumerate([(7, 1), (7, 2), (8, 1)]):
            torch.set_num_threads(n_threads)
            merge(recipe(tmp_path, body, seed=seed, out=tmp_path / f"o{i}", **adapters))
            outs.append(load_output(tmp_path / f"o{i}"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_dora_refused_for_adapter_output(llama_base, tmp_path):
    dora = make_adapter(llama_base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    path = recipe(tmp_path, "adapters: [{{path: {d}}}]\noutput: {{path: {out}}}\n", d=dora, out=tmp_path / "out")
    rc, out, err = run_cli("merge", str(path))
    assert rc == 2 and "DoRA" in err and "kind: model" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # into a base, a single DoRA adapter at weight 1 is exactly an unload
    from adaptool.commands.unload import unload

    model_recipe = recipe(tmp_path, "base: {base}\nadapters: [{{path: {d}}}]\noutput: {{path: {out}, kind: model}}\n",
                          base=llama_base, d=dora, out=tmp_path / "merged")
    merge(model_recipe)
    unload(str(llama_base), [str(dora)], tmp_path / "unloaded")
    a, b = load_output(tmp_path / "merged"), load_output(tmp_path / "unloaded")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- factor space


@pytest.mark.parametrize("ctype", ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"])
def test_factor_space_equals_add_weighted_adapter(llama_base, adapters, tmp_path, ctype):
    params = {"ties": "{density: 0.5}", "ties_svd": "{density: 0.5, rank: 3}", "magnitude_prune": "{density: 0.3}",
              "magnitude_prune_svd": "{density: 0.3}", "svd": "{rank: 3}"}.get(ctype, "{}")
    path = recipe(tmp_path, """
adapters:
  - {{path: {a}, weight: 0.6}}
  - {{path: {b}, weight: -0.4}}
strategy: {ctype}
space: factors
parameters: {params}
output: {{path: {out}, dtype: float32}}
""", ctype=ctype, params=params, out=tmp_path / "out", **adapters)
    merge(path)
    ours = load_output(tmp_path / "out")
    pm = peft_model_with(llama_base, [adapters["a"], adapters["b"]], ["a", "b"])
    kw = {"density": 0.5 if "ties" in ctype else 0.3} if ("ties" in ctype or "prune" in ctype) else {}
    if ctype in ("svd", "ties_svd"):
        kw["svd_rank"] = 3
    pm.add_weighted_adapter(["a", "b"], [0.6, -0.4], "m", combination_type=ctype, **kw)
    compared = 0
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            A_ref, B_ref = module.lora_A["m"].weight.detach(), module.lora_B["m"].weight.detach()
            A, B = ours[f"base_model.model.{name}.lora_A.weight"], ours[f"base_model.model.{name}.lora_B.weight"]
            assert A.shape == A_ref.shape and B.shape == B_ref.shape, name
            if ctype.endswith("svd"):  # SVD factors are unique only up to sign: compare the product
                torch.testing.assert_close(B @ A, B_ref @ A_ref, rtol=1e-5, atol=1e-6, msg=f"{ctype} {name}")
            else:
                assert torch.equal(A, A_ref) and torch.equal(B, B_ref), f"{ctype} {name}"
            compared += 1
    assert compared >= 4


def test_factor_space_refuses_unequal_ranks(adapters, tmp_path):
    path = recipe(tmp_path, """
adapters: [{{path: {a}}}, {{path: {c}}}]
strategy: ties
space: factors
parameters: {{density: 0.5}}
output: {{path: {out}}}
""", out=tmp_path / "out", **adapters)
    rc, out, err = run_cli("merge", str(path))
    assert rc == 2 and "equal rank" in err and "[4, 3]" in err and "space: delta" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- CLI, outputs


def test_dry_run_writes_nothing_and_json(llama_base, adapters, tmp_path):
    path = recipe(tmp_path, """
base: {base}
adapters: [{{path: {a}}}, {{path: {b}, weight: 0.5}}]
strategy: ties
parameters: {{density: 0.5, seed: 3}}
output: {{path: {out}, kind: model}}
""", base=llama_base, out=tmp_path / "out", **adapters)
    rc, out, err = run_cli("merge", str(path), "--dry-run")
    assert rc == 0, err
    assert "plan: ties" in out and "dry run: nothing written" in out and "seed" in out  # the note
    rc, out, err = run_cli("merge", str(path), "--dry-run", "--json")
    plan = json.loads(out)
    assert plan["dry_run"] and plan["modules"] == 8 and plan["rank_in"] == [4, 4]
    assert not (tmp_path / "out").exists()


def test_merged_adapter_loads_and_carries_provenance(llama_base, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = recipe(tmp_path, """
adapters: [{{path: {a}, weight: 0.5}}, {{path: {c}, weight: 0.5}}]
strategy: cat
output: {{path: {out}}}
""", out=tmp_path / "out", **adapters)
    rc, out, err = run_cli("merge", str(path), "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["kind"] == "adapter" and summary["rank"] == 6  # q_proj: 4 (a) + 2 (c)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    with safe_open(str(adapters["a"] / "adapter_model.safetensors"), "pt") as f:
        assert dtypes == {f.get_tensor(k).dtype for k in f.keys()}  # the inputs' dtype
    assert json.loads(meta["adaptool.recipe"])["strategy"] == "cat"
    assert len(json.loads(meta["adaptool.adapters"])) == 2
    assert "strategy: cat" in (tmp_path / "out" / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(llama_base)
    PeftModel.from_pretrained(model, tmp_path / "out")  # loads with PEFT
    model2 = AutoModelForCausalLM.from_pretrained(llama_base)
    model2.load_adapter(str(tmp_path / "out"))  # and with transformers
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert not torch.equal(model2(x).logits, AutoModelForCausalLM.from_pretrained(llama_base)(x).logits)


def test_bad_recipe_one_line(tmp_path):
    path = recipe(tmp_path, "adapters: [{{path: x}}]\nstrategy: tie\noutput: {{path: o}}\n")
    rc, out, err = run_cli("merge", str(path))
    assert rc == 2 and err.count("\n") == 1 and "recipe.yaml:2" in err and "did you mean 'ties'" in err
    rc, out, err = run_cli("merge", str(tmp_path / "missing.yaml"))
    assert rc == 2 and err.count("\n") == 1 and "missing.yaml" in err
