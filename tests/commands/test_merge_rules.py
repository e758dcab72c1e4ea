"""Per-module ``weight`` and ``density`` rules, and ``parameters.convention: mergekit``, end to end.

Oracles: PEFT's own ΔWᵢ (``merge_and_unload`` on a float32 base) with the rule-resolved weights written out by
hand; merges with constant values (a rules recipe must give, module by module, exactly what the constant recipe
with that module's values gives); PEFT ``add_weighted_adapter`` and ``merge_utils``; mergekit 0.1.5 itself on the
dense deltas.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, load_output, make_adapter, make_peft_adapter, peft_merged, run_cli, snapshot

from adaptool.commands.merge import merge

LAYER1 = r"'layers\.1\.'"


@pytest.fixture(scope="module")
def adapters(llama_base, tmp_path_factory):
    """Two r=4 LoRAs with different alphas and partly different targets, and an IA3 adapter."""
    from peft import IA3Config

    root = tmp_path_factory.mktemp("rules")
    return {
        "a": make_adapter(llama_base, root / "a", seed=1, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": make_adapter(llama_base, root / "b", seed=2, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]),
        "ia3": make_peft_adapter(llama_base, root / "ia3", IA3Config(
            target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False), seed=4),
    }


@pytest.fixture(scope="module")
def deltas(llama_base, adapters):
    """ΔW of each LoRA on a float32 base, by PEFT."""
    base = {k: v.float() for k, v in load_output(llama_base).items()}
    out = {}
    for name in ("a", "b"):
        merged = peft_merged(llama_base, [adapters[name]], dtype=torch.float32)
        out[name] = {k: merged[k] - base[k] for k in base}
    return out


def write(tmp_path: Path, name: str, body: str, **fmt) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(body.format(**fmt))
    return path


def model_delta(llama_base: Path, out: Path) -> dict[str, torch.Tensor]:
    base = load_output(llama_base)
    ours = load_output(out)
    return {k: ours[k].float() - base[k].float() for k in base}


def rel_err(x, y) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- weights, exact


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_per_module_weights_are_exact(llama_base, adapters, deltas, tmp_path, kind):
    """Σ wᵢ(module)·ΔWᵢ with the first matching rule's weight, as PEFT's deltas say, to float32 rounding."""
    path = write(tmp_path, "r", """
base: {base}
adapters:
  - path: {a}
    weight:
      - {{match: 'layers\\.0\\.', value: 0.25}}
      - {{match: mlp, value: -0.5}}
      - {{value: 1.0}}
  - path: {b}
    weight: [{{match: 'v_proj$', value: 2.0}}, {{value: 0.5}}]
strategy: linear
output: {{path: {out}, kind: {kind}, dtype: float32}}
device: cpu
""", base=llama_base, out=tmp_path / "out", kind=kind, **adapters)
    merge(path)

    def weight_a(key):  # the rules above, written out by hand
        return 0.25 if ".layers.0." in key else -0.5 if "mlp" in key else 1.0

    def weight_b(key):
        return 2.0 if key.endswith("v_proj.weight") else 0.5

    if kind == "model":
        got = model_delta(llama_base, tmp_path / "out")
    else:
        merged = peft_merged(llama_base, [tmp_path / "out"], dtype=torch.float32)  # also: PEFT loads it
        base = load_output(llama_base)
        got = {k: merged[k] - base[k].float() for k in base}
    changed = 0
    for key in got:
        expected = weight_a(key) * deltas["a"][key] + weight_b(key) * deltas["b"][key]
        if expected.abs().max() == 0:
            assert got[key].abs().max() == 0, key
            continue
        assert rel_err(got[key], expected) < 1e-6, key
        changed += 1
    assert changed == 8  # q, v (both), down (a), up (b) in two layers


# ---------------------------------------------------------------------------------------------- = constant merges

CONSTANT = """
base: {base}
adapters:
  - {{path: {a}, weight: {wa}}}
  - {{path: {b}, weight: {wb}}}
strategy: {strategy}
parameters: {{density: {d}, seed: 3, convention: {convention}}}
output: {{path: {out}, kind: {kind}, dtype: float32}}
device: cpu
"""
RULES = """
base: {base}
adapters:
  - path: {a}
    weight: [{{match: {layer1}, value: 0.3}}, {{value: 0.9}}]
  - path: {b}
    weight: [{{match: {layer1}, value: -0.7}}, {{value: 0.6}}]
strategy: {strategy}
parameters:
  density: [{{match: {layer1}, value: 0.3}}, {{value: 0.6}}]
  seed: 3
  convention: {convention}
output: {{path: {out}, kind: {kind}, dtype: float32}}
device: cpu
"""


@pytest.mark.parametrize("strategy, convention, kind", [
    ("ties", "peft", "model"), ("dare_ties", "peft", "model"), ("magnitude_prune", "peft", "model"),
    ("ties", "mergekit", "model"), ("dare_linear", "mergekit", "model"), ("ties_svd", "peft", "adapter"),
])
def test_rules_equal_constant_merges_module_by_module(llama_base, adapters, tmp_path, strategy, convention, kind):
    """Modules of layer 1 come out exactly as the constant recipe (0.3, -0.7, density 0.3) gives them, the rest
    exactly as (0.9, 0.6, density 0.6) gives them: per-module values change nothing else (DARE masks included)."""
    common = dict(base=llama_base, strategy=strategy, convention=convention, kind=kind, **adapters)
    merge(write(tmp_path, "rules", RULES, out=tmp_path / "rules", layer1=LAYER1, **common))
    merge(write(tmp_path, "x", CONSTANT, out=tmp_path / "x", wa=0.9, wb=0.6, d=0.6, **common))
    merge(write(tmp_path, "y", CONSTANT, out=tmp_path / "y", wa=0.3, wb=-0.7, d=0.3, **common))
    rules, x, y = (load_output(tmp_path / n) for n in ("rules", "x", "y"))
    assert set(rules) == set(x) == set(y)
    differ = 0
    for key in rules:
        expected = y[key] if ".layers.1." in key else x[key]
        assert torch.equal(rules[key], expected), key
        differ += not torch.equal(x[key], y[key])
    assert differ >= (6 if kind == "model" else 12)  # the test can tell the two apart


def test_per_module_ties_matches_peft_merge_utils(llama_base, adapters, deltas, tmp_path):
    """One module of each rule, against PEFT's ties on its ΔWᵢ with that module's weights and density."""
    from peft.utils.merge_utils import ties

    merge(write(tmp_path, "rules", RULES, base=llama_base, strategy="ties", convention="peft", kind="model",
                out=tmp_path / "out", layer1=LAYER1, **adapters))
    got = model_delta(llama_base, tmp_path / "out")
    for key, w, d in [("model.layers.1.self_attn.v_proj.weight", [0.3, -0.7], 0.3),
                      ("model.layers.0.self_attn.q_proj.weight", [0.9, 0.6], 0.6)]:
        expected = ties([deltas["a"][key], deltas["b"][key]], torch.tensor(w), d, "total")
        assert rel_err(got[key], expected) < 1e-6, key


def test_factor_space_rules_equal_add_weighted_adapter(llama_base, adapters, tmp_path):
    """space: factors applies each module's weights (and density) as PEFT's add_weighted_adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    body = RULES.replace("strategy: {strategy}", "strategy: {strategy}\nspace: factors").replace("  seed: 3\n", "")
    merge(write(tmp_path, "rules", body.replace("  convention: {convention}\n", ""), base=llama_base,
                strategy="ties", kind="adapter", out=tmp_path / "out", layer1=LAYER1, **adapters))
    ours = load_output(tmp_path / "out")
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32),
                                   adapters["a"], adapter_name="a")
    pm.load_adapter(adapters["b"], adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.9, 0.6], "x", combination_type="ties", density=0.6)
    pm.add_weighted_adapter(["a", "b"], [0.3, -0.7], "y", combination_type="ties", density=0.3)
    compared = 0
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "x" in module.lora_A:
            which = "y" if ".layers.1." in name else "x"
            for part in ("lora_A", "lora_B"):
                ref = getattr(module, part)[which].weight.detach()
                assert torch.equal(ours[f"base_model.model.{name}.{part}.weight"], ref), (name, part)
            compared += 1
    assert compared == 8


def test_mixed_types_take_per_module_weights(llama_base, adapters, tmp_path):
    """A LoRA + IA3 mix into the base: each tensor is what the constant mix with its module's weights gives."""
    lines = "base: {base}\nadapters:\n  - {{path: {a}, weight: {wa}}}\n  - {{path: {ia3}, weight: {wi}}}\n" \
            "output: {{path: {out}, kind: model, dtype: float32}}\ndevice: cpu\n"
    rule_a = r"[{match: 'layers\.0\.', value: 0.5}, {value: 1.5}]"  # values, not templates: single braces
    rule_i = r"[{match: 'layers\.0\.', value: 0.25}, {match: down_proj, value: 0.0}, {value: 1.0}]"
    common = dict(base=llama_base, a=adapters["a"], ia3=adapters["ia3"])
    merge(write(tmp_path, "rules", lines, out=tmp_path / "rules", wa=rule_a, wi=rule_i, **common))
    for name, wa, wi in [("l0", 0.5, 0.25), ("down", 1.5, 0.0), ("rest", 1.5, 1.0)]:
        merge(write(tmp_path, name, lines, out=tmp_path / name, wa=wa, wi=wi, **common))
    rules = load_output(tmp_path / "rules")
    refs = {n: load_output(tmp_path / n) for n in ("l0", "down", "rest")}
    base = load_output(llama_base)
    changed = 0
    for key in rules:
        which = "l0" if ".layers.0." in key else "down" if "down_proj" in key else "rest"
        assert torch.equal(rules[key], refs[which][key]), key
        changed += not torch.equal(rules[key], base[key].float())
    assert changed == 6  # q, v, down (a) in two layers; IA3's q and down are among them


# ---------------------------------------------------------------------------------------------- mergekit, end to end


@pytest.mark.parametrize("strategy, density", [("ties", 0.5), ("dare_ties", 1.0), ("ties", 1.0)])
def test_mergekit_convention_into_model_equals_mergekit(llama_base, adapters, deltas, tmp_path, strategy, density):
    """Each merged module = mergekit 0.1.5's merge of the PEFT deltas, with the module's rule-resolved weights."""
    api = pytest.importorskip("mergekit.merge_methods.api")
    merge(write(tmp_path, "r", """
base: {base}
adapters:
  - {{path: {a}, weight: [{{match: {layer1}, value: 0.8}}, {{value: 0.4}}]}}
  - {{path: {b}, weight: -0.6}}
strategy: {strategy}
parameters: {{density: {density}, convention: mergekit}}
output: {{path: {out}, kind: model, dtype: float32}}
device: cpu
""", base=llama_base, strategy=strategy, density=density, layer1=LAYER1, out=tmp_path / "out", **adapters))
    got = model_delta(llama_base, tmp_path / "out")
    compared = 0
    for key, d_a in deltas["a"].items():
        d_b = deltas["b"][key]
        inputs = [(d, w) for d, w in ((d_a, 0.8 if ".layers.1." in key else 0.4), (d_b, -0.6)) if d.abs().max() > 0]
        if not inputs:
            continue
        reference = api.merge_tensors([torch.zeros_like(d_a).double(), *[d.double() for d, _ in inputs]], strategy,
                                      parameters={"weight": {i + 1: w for i, (_, w) in enumerate(inputs)},
                                                  "density": density}, ids=list(range(len(inputs) + 1)), base_index=0)
        assert rel_err(got[key].double(), reference) < 1e-5, key
        compared += 1
    assert compared == 8


# ---------------------------------------------------------------------------------------------- dry run, errors


def test_dry_run_shows_resolved_values(llama_base, adapters, tmp_path):
    path = write(tmp_path, "r", """
adapters:
  - path: {a}
    weight: [{{match: {layer1}, value: 0.3}}, {{match: 'layers\\.7\\.', value: 5}}, {{value: 0.9}}]
  - {{path: {b}, weight: 0.6}}
strategy: ties
parameters:
  density: [{{match: mlp, value: 0.2}}, {{value: 0.5}}]
output: {{path: {out}}}
""", layer1=LAYER1, out=tmp_path / "out", **adapters)
    rc, out, err = run_cli("merge", str(path), "--dry-run")
    assert rc == 0, err
    assert "weight per module (3 rules)" in out and "per-module values" in out
    assert "weights 0.3, 0.6  density 0.5  2 modules: model.layers.1.self_attn.q_proj, model.layers.1.self_attn.v_proj" in out
    assert "weights 0.9, -  density 0.2  1 module: model.layers.0.mlp.down_proj" in out
    assert "weights -, 0.6  density 0.2  2 modules: model.layers.{0-1}.mlp.up_proj" in out
    assert "adapters[0].weight[1] (match 'layers\\.7\\.') decides no module" in out
    rc, out, err = run_cli("merge", str(path), "--dry-run", "--json")
    plan = json.loads(out)
    groups = {tuple(m): (g["weights"], g.get("density")) for g in plan["per_module"] for m in [g["modules"]]}
    assert groups[("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj")] == ([None, 0.6], 0.2)
    assert groups[("model.layers.1.mlp.down_proj",)] == ([0.3, None], 0.2)
    assert sum(len(g["modules"]) for g in plan["per_module"]) == plan["modules"] == 8
    assert plan["adapters"][0]["weight"][0] == {"match": r"layers\.1\.", "value": 0.3}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needles", [
    ("weight: [{{match: '(layers', value: 1}}, {{value: 1}}]", ["recipe.yaml:3:", "is not a valid regex"]),
    ("weight: [{{match: a, value: 1}}]", ["recipe.yaml:3:", "has no default rule"]),
    ("weight: [{{match: a, valu: 1}}, {{value: 1}}]", ["recipe.yaml:3:", "unknown key 'valu'", "did you mean 'value'"]),
    ("weight: [{{match: a, value: x}}, {{value: 1}}]", ["recipe.yaml:3:", "weight[0].value must be a number"]),
])
def test_bad_rules_are_one_line_errors(adapters, tmp_path, text, needles):
    path = write(tmp_path, "recipe", "adapters:\n  - path: {a}\n    " + text + "\noutput: {{path: {out}}}\n",
                 out=tmp_path / "out", **adapters)
    before = snapshot(adapters["a"])
    rc, out, err = run_cli("merge", str(path))
    assert_refused(rc, out, err, tmp_path / "out", before, 2, *needles)
    assert err.count("\n") == 1


def test_unknown_convention_did_you_mean(adapters, tmp_path):
    path = write(tmp_path, "recipe", "adapters: [{{path: {a}}}]\nstrategy: ties\nparameters:\n  density: 0.5\n"
                 "  convention: merge-kit\noutput: {{path: {out}}}\n", out=tmp_path / "out", **adapters)
    rc, out, err = run_cli("merge", str(path))
    assert_refused(rc, out, err, tmp_path / "out", None, 2, "recipe.yaml:5:", "unknown parameters.convention",
                   "did you mean 'mergekit'?")
