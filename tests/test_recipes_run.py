"""Every recipe under recipes/ runs as written once the demo has laid out its inputs.

The recipes are copied into a temporary folder (found by glob when the tests run, so recipes added later are
covered), their inputs are built there by examples/demo.py's own builder, and each is run as
`adaptool merge <copy>.yaml` with no -o, so its relative adapter, base and output paths are the ones a user gets
from the repository root. The adapters the demo writes by hand are checked against PEFT (key names, shapes and
config fields of a folder PEFT itself saves; values read back by PEFT), and two merges are checked by value
against float64 maths on the demo's factors.
"""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptool.cli.main import main as cli_main
from adaptool.recipe import load_recipe
from conftest import assert_refused, run_cli, snapshot

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DEMO = runpy.run_path(str(REPO / "examples" / "demo.py"), run_name="adaptool_demo")
ADAPTERS = ["math", "code", "chat", "style-loha", "tone-ia3"]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    """A copy of recipes/*.yaml with the demo's inputs built beside it, as `python examples/demo.py` does."""
    root = tmp_path_factory.mktemp("checkout") / "recipes"
    root.mkdir()
    for f in RECIPES:
        shutil.copy(f, root / f.name)
    built = DEMO["build_recipe_inputs"](root)
    assert sorted(rel for rel, _ in built) == sorted(["base"] + [f"adapters/{a}" for a in ADAPTERS])
    return root


def merge(*args: str, capsys) -> tuple[int, dict | None, str]:
    """`adaptool merge ARGS --json` through the CLI's entry point, in this process (a fresh interpreter per
    recipe would cost seconds of torch import each); returns the exit code, the summary and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(["merge", *args, "--json"])
    out, err = capsys.readouterr()
    code = exc.value.code or 0
    return code, (json.loads(out) if code == 0 else None), err


def peft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def lora_delta64(folder: Path) -> dict[str, torch.Tensor]:
    """Module path -> float64 scaling·B·A of a LoRA folder the demo wrote (one r and alpha for all modules)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r ** 0.5 if config["use_rslora"] else alpha / r
    t = peft_tensors(folder)
    return {k[len("base_model.model."): -len(".lora_A.weight")]: scale * t[k.replace("lora_A", "lora_B")].double()
            @ t[k].double() for k in t if k.endswith(".lora_A.weight")}


def assert_output_loads(out: Path, kind: str, base: Path) -> None:
    if kind == "model":
        from transformers import AutoModelForCausalLM

        assert (out / "config.json").is_file() and list(out.glob("*.safetensors")), sorted(out.iterdir())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert model.config.num_hidden_layers == DEMO["LAYERS"]
        return
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(out)
    tensors = peft_tensors(out)
    assert tensors and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors), sorted(tensors)[:4]
    assert config.peft_type.value == "LORA"
    for k, a in tensors.items():
        if k.endswith(".lora_A.weight"):
            b = tensors[k.replace("lora_A", "lora_B")]
            assert a.shape[0] == b.shape[1] and torch.isfinite(a).all() and torch.isfinite(b).all(), k


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_as_written(recipes, path, capsys):
    recipe = recipes / path.name
    code, summary, err = merge(str(recipe), capsys=capsys)
    assert code == 0, f"adaptool merge recipes/{path.name}: exit {code}: {err.strip()}"
    spec = load_recipe(recipe)
    out = Path(spec.output.path)
    assert Path(summary["output"]) == out and out.parent == recipes / "out", out
    assert_output_loads(out, spec.output.kind, recipes / "base")


def test_headline_through_console_script_and_refused_again(recipes, tmp_path, capsys):
    """README's `adaptool merge recipes/ties.yaml` in a real process; a second run without --force is refused
    (one line, exit 2, the first output and the inputs untouched)."""
    recipe = tmp_path / "ties.yaml"
    recipe.write_text((recipes / "ties.yaml").read_text().replace("./adapters/", f"{recipes}/adapters/"))
    rc, out, err = run_cli("merge", str(recipe))
    assert rc == 0, err
    written = tmp_path / "out" / "ties"
    assert (written / "adapter_config.json").is_file() and (written / "adapter_model.safetensors").is_file()
    before = snapshot(written, recipes / "adapters")
    code, _, err = merge(str(recipe), capsys=capsys)
    assert_refused(code, "", err, None, before, 2, "--force")


def test_linear_recipe_values(recipes, tmp_path, capsys):
    """linear.yaml (0.6·math + 0.4·code, rank 32 ≥ 8 + 8, so nothing is cut): the merged adapter, read back by
    PEFT, has ΔW = 0.6·ΔW_math + 0.4·ΔW_code in float64 from the demo's factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, summary, err = merge(str(recipes / "linear.yaml"), "-o", str(tmp_path / "linear"), capsys=capsys)
    assert code == 0, err
    math, code_ = lora_delta64(recipes / "adapters/math"), lora_delta64(recipes / "adapters/code")
    expected = {m: 0.6 * math.get(m, 0) + 0.4 * code_.get(m, 0) for m in math.keys() | code_.keys()}
    model = AutoModelForCausalLM.from_pretrained(recipes / "base", dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, tmp_path / "linear")
    worst = 0.0
    for m, delta in expected.items():
        got = pm.base_model.model.get_submodule(m).get_delta_weight("default").double()
        worst = max(worst, float((got - delta).abs().max() / delta.abs().max()))
    assert len(expected) == 12 and worst < 1e-5, worst  # float32 arithmetic on ΔW of scale ~0.1


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (8 significant bits)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -126)))
    return torch.exp2(e - 7)


def test_mixed_recipe_values(recipes, tmp_path, capsys):
    """mixed.yaml folds LoRA math (w 1), LoHa style (w 0.5) and IA3 tone (w 1) into the bf16 base, in order:
    W' = (W + ΔW_math + 0.5·ΔW_loha) ⊙ l. Every element within one bf16 ulp of the float64 value, or, where
    W and ΔW nearly cancel, within float32 rounding of the tensor's scale (the merge is float32, rounded once)."""
    code, summary, err = merge(str(recipes / "mixed.yaml"), "-o", str(tmp_path / "mixed"), capsys=capsys)
    assert code == 0, err
    base = {}
    for f in sorted((recipes / "base").glob("*.safetensors")):
        base |= load_file(str(f))
    ours = {}
    for f in sorted((tmp_path / "mixed").glob("*.safetensors")):
        ours |= load_file(str(f))
    math = lora_delta64(recipes / "adapters/math")
    loha, ia3 = peft_tensors(recipes / "adapters/style-loha"), peft_tensors(recipes / "adapters/tone-ia3")
    loha_cfg = json.loads((recipes / "adapters/style-loha/adapter_config.json").read_text())
    changed, worst, rounded, total = 0, 0.0, 0, 0
    assert set(ours) == set(base)
    for name, w in base.items():
        m = name[: -len(".weight")]
        p = "base_model.model." + m
        expected = w.double() + math.get(m, 0)
        if p + ".hada_w1_a" in loha:
            t = {s: loha[f"{p}.{s}"].double() for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
            expected = expected + 0.5 * (loha_cfg["alpha"] / loha_cfg["r"]) * (
                (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]))
        if p + ".ia3_l" in ia3:
            expected = expected * ia3[p + ".ia3_l"].double()  # (out, 1) or, feed-forward, (1, in)
        changed += not torch.equal(ours[name], w)
        assert ours[name].dtype == torch.bfloat16
        err = (ours[name].double() - expected).abs()
        assert (err <= torch.maximum(_bf16_ulp(expected), 2.0 ** -22 * expected.abs().max())).all(), name
        worst = max(worst, float((err / _bf16_ulp(expected)).max()))
        rounded += int((ours[name] == expected.to(torch.bfloat16)).sum())
        total += w.numel()
    # math q/v/down, loha q/v/gate, ia3 k/v/down: q, k, v, gate, down of each layer
    assert changed == 10 and rounded / total > 0.999, (changed, rounded, total, worst)


@pytest.mark.parametrize("name", ADAPTERS)
def test_hand_written_adapters_are_what_peft_saves(recipes, tmp_path, name):
    """The demo writes adapters without peft; PEFT, given the same config, saves the same keys, shapes and dtypes,
    and reads the demo's folder back with every value in place."""
    from peft import PeftConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = recipes / "adapters" / name
    config = PeftConfig.from_pretrained(folder)
    ours_cfg = json.loads((folder / "adapter_config.json").read_text())
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(recipes / "base", dtype=torch.float32), config)
    ref.save_pretrained(tmp_path / "ref")
    ref_cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    assert set(ours_cfg) <= set(ref_cfg), set(ours_cfg) - set(ref_cfg)
    assert {k: ours_cfg[k] for k in ours_cfg if k not in ("target_modules", "feedforward_modules")} == \
        {k: ref_cfg[k] for k in ours_cfg if k not in ("target_modules", "feedforward_modules")}
    ours, theirs = peft_tensors(folder), peft_tensors(tmp_path / "ref")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}

    model = AutoModelForCausalLM.from_pretrained(recipes / "base", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(model, folder)
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if ".default" in k}
    assert set(state) == set(ours) and all(torch.equal(state[k], v) for k, v in ours.items())


def test_base_loads_with_transformers(recipes):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(recipes / "base")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == DEMO["LAYERS"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, DEMO["VOCAB"]) and torch.isfinite(logits).all()
