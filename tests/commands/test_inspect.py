"""``adaptool inspect``: every number against an independent oracle — scales as PEFT itself resolves them, ‖ΔW‖_F and
the spectrum from the dense ΔW in float64 (LoRA: B @ A from the file; other families: PEFT's get_delta_weight),
model totals from safetensors' own reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (assert_refused, lay_out_cache, make_adapter, make_peft_adapter, run_cli, save_model,
                      tiny_llama_config)

from adaptool.commands.inspect import inspect
from adaptool.errors import AdaptoolError

PEFT_PREFIX = "base_model.model."
CONTRACT = ("module", "rank", "alpha", "scale", "shape", "delta_norm")


def peft_modules(base: Path, adapter: Path, dtype=torch.float32) -> dict:
    """{module path: PEFT's tuner layer} of the adapter loaded on ``base`` by PEFT."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    return {name: m for name, m in model.base_model.model.named_modules()
            if isinstance(m, BaseTunerLayer) and "default" in getattr(m, "r", getattr(m, "ia3_l", {}))}


def file_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}


def assert_spectrum(record: dict, dense: torch.Tensor, rel: float = 1e-9) -> None:
    """delta_norm, stable rank, σ₁ and energy@1/4/16 of ``record`` against the float64 SVD of ``dense``."""
    s = torch.linalg.svdvals(dense.double().reshape(dense.shape[0], -1))
    total = float((s ** 2).sum())
    assert record["delta_norm"] == pytest.approx(float(torch.linalg.norm(dense.double())), rel=rel)
    assert record["sigma_1"] == pytest.approx(float(s[0]), rel=rel)
    assert record["stable_rank"] == pytest.approx(total / float(s[0]) ** 2, rel=max(rel, 1e-9) * 10)
    for k in (1, 4, 16):
        assert record["energy"][str(k)] == pytest.approx(float((s[:k] ** 2).sum()) / total, rel=rel * 10, abs=1e-12)


def lora_dense(tensors: dict, path: str, scale: float) -> torch.Tensor:
    """ΔW = B @ A · scale in float64, straight from the file (Linear terms; embeddings (dim, num))."""
    if f"{path}.lora_A.weight" in tensors:
        a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
    else:
        a, b = tensors[f"{path}.lora_embedding_A"], tensors[f"{path}.lora_embedding_B"]
    return (b.double().reshape(b.shape[0], -1) @ a.double().reshape(a.shape[0], -1)) * scale


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scales_norms_spectrum(llama_base, tmp_path, rslora):
    """Patterns (first match as PEFT reads them from disk), rsLoRA, an embedding module; every value checked."""
    adapter = make_adapter(llama_base, tmp_path / "lora", r=8, lora_alpha=16, use_rslora=rslora,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                           rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 2, "q_proj": 6},
                           alpha_pattern={"v_proj": 5, "layers.0.mlp.down_proj": 3})
    summary = inspect(str(adapter))
    assert summary["kind"] == "adapter" and summary["peft_type"] == "LORA" and summary["rslora"] is rslora
    oracle = peft_modules(llama_base, adapter)
    tensors = file_tensors(adapter)
    by_path = {m["module"]: m for m in summary["modules"]}
    assert set(by_path) == set(oracle)
    for path, layer in oracle.items():
        rec = by_path[path]
        assert all(k in rec for k in CONTRACT)
        r, alpha, scale = layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"]
        assert (rec["rank"], rec["alpha"]) == (r, float(alpha))
        assert rec["scale"] == pytest.approx(scale, rel=1e-15)
        assert rec["scale"] == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r, rel=1e-15)
        dense = lora_dense(tensors, path, scale)
        weight = layer.get_base_layer().weight
        assert rec["shape"] == ([weight.shape[1], weight.shape[0]] if "embed" in path else list(weight.shape))
        assert_spectrum(rec, dense)
    # totals from the file itself
    assert summary["tensors"] == len(tensors)
    assert summary["parameters"] == sum(t.numel() for t in tensors.values())
    assert summary["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    by_dtype = {}
    for t in tensors.values():
        by_dtype[str(t.dtype).removeprefix("torch.")] = by_dtype.get(str(t.dtype).removeprefix("torch."), 0) + t.numel()
    assert summary["dtype"] == max(by_dtype, key=by_dtype.get)
    # PEFT saves the embedding whole beside its LoRA (save_embedding_layers): a saved tensor, listed as such
    assert summary["saved"] == [k for k in tensors if ".lora_" not in k] != []
    assert summary["non_finite"] == [] and "fits_base" not in summary


def test_gpt2_conv1d_shape_is_out_in(gpt2_base, tmp_path):
    """GPT-2 stores Conv1D weights (in, out); shape is still [out, in], and the module fits the base."""
    adapter = make_adapter(gpt2_base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"],
                           fan_in_fan_out=True, dtype=torch.float32)
    summary = inspect(str(adapter), base=str(gpt2_base))
    tensors = file_tensors(adapter)
    from safetensors import safe_open

    with safe_open(str(gpt2_base / "model.safetensors"), "pt") as f:
        for rec in summary["modules"]:
            names = (rec["module"], rec["module"].removeprefix("transformer."))
            name = next(n for n in names if n + ".weight" in f.keys())
            stored = f.get_slice(name + ".weight").get_shape()
            assert rec["shape"] == [stored[1], stored[0]] and stored[0] != stored[1]
            assert rec["fits_base"] is True
            assert_spectrum(rec, lora_dense(tensors, rec["module"], 2.0))
    assert summary["fits_base"] is True and summary["fit_error"] is None
    assert {m["module"] for m in summary["modules"]} == {f"transformer.h.{i}.{n}" for i in (0, 1)
                                                         for n in ("attn.c_attn", "mlp.c_proj")}


def test_dora_reports_the_lora_part(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    summary = inspect(str(adapter))
    tensors = file_tensors(adapter)
    assert summary["dora"] is True and any("DoRA" in n for n in summary["notes"])
    for rec in summary["modules"]:
        assert rec["dora"] is True
        assert_spectrum(rec, lora_dense(tensors, rec["module"], 2.0))


def test_model_json_against_safetensors(llama_base):
    from safetensors import safe_open

    rc, out, err = run_cli("inspect", str(llama_base), "--json")
    assert rc == 0, err
    summary = json.loads(out)
    shards = sorted(llama_base.glob("*.safetensors"))
    numels, names = 0, []
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                names.append(k)
                numels += math.prod(f.get_slice(k).get_shape())
    assert summary["kind"] == "model"
    assert (summary["tensors"], summary["parameters"], summary["dtype"]) == (len(names), numels, "bfloat16")
    assert summary["shards"] == len(shards) > 1 and summary["dtypes"] == {"bfloat16": len(names)}
    assert summary["bytes"] == 2 * numels


def to_kohya(adapter: Path, dest: Path, alphas: dict[str, float]) -> Path:
    """A kohya file of a plain PEFT LoRA: ``lora_<path with _>.lora_down/up.weight`` and one ``.alpha`` each."""
    from safetensors.torch import save_file

    out = {}
    for key, t in file_tensors(adapter).items():
        path, _, suffix = key.partition(".lora_")
        flat = "lora_" + path.replace(".", "_")
        out[f"{flat}.{ {'A.weight': 'lora_down.weight', 'B.weight': 'lora_up.weight'}[suffix] }"] = t
        out[f"{flat}.alpha"] = torch.tensor(alphas.get(path, 8.0))
    save_file(out, str(dest))
    return dest


def test_kohya_needs_base_and_maps_modules(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    kfile = to_kohya(adapter, tmp_path / "k.safetensors", {"model.layers.1.mlp.down_proj": 2.0})
    assert_refused(*run_cli("inspect", str(kfile), "--json"), None, None, 2, "--base")
    summary = inspect(str(kfile), base=str(llama_base))
    assert summary["format"] == "kohya" and summary["fits_base"] is True
    tensors = file_tensors(adapter)
    assert {m["module"] for m in summary["modules"]} == {p.rsplit(".lora_", 1)[0] for p in tensors}
    for rec in summary["modules"]:
        alpha = 2.0 if rec["module"] == "model.layers.1.mlp.down_proj" else 8.0
        assert (rec["rank"], rec["alpha"], rec["scale"]) == (4, alpha, alpha / 4)
        assert_spectrum(rec, lora_dense(tensors, rec["module"], alpha / 4))


def test_base_that_does_not_fit_is_reported(llama_base, gpt2_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    other = tmp_path / "narrow"
    from transformers import AutoModelForCausalLM

    save_model(AutoModelForCausalLM.from_config(tiny_llama_config(intermediate_size=96)), other, shard=None)
    summary = inspect(str(adapter), base=str(other))  # q_proj fits, down_proj (64, 128) does not
    assert summary["fits_base"] is False and "down_proj" in summary["fit_error"]
    fits = {m["module"].split(".")[-1]: m["fits_base"] for m in summary["modules"]}
    assert fits == {"q_proj": True, "down_proj": False}
    assert all(m["delta_norm"] > 0 for m in summary["modules"])  # still measured
    rc, out, err = run_cli("inspect", str(adapter), "--base", str(gpt2_base))  # no module of it exists there
    assert rc == 0, err
    assert "does NOT fit" in out and "model.layers.0.self_attn.q_proj" in out and "NO" in out


def test_loha_lokr_adalora_against_peft_delta(llama_base, tmp_path):
    """Non-LoRA additive families: ‖ΔW‖ and the spectrum against PEFT's own dense get_delta_weight."""
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig

    configs = {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
        "lokr": LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=["q_proj", "down_proj"],
                           init_weights=False),
        "adalora": AdaLoraConfig(init_r=6, target_r=2, lora_alpha=16, total_step=10, init_lora_weights=False,
                                 target_modules=["q_proj", "v_proj"]),
    }
    for name, config in configs.items():
        adapter = make_peft_adapter(llama_base, tmp_path / name, config)
        summary = inspect(str(adapter), base=str(llama_base))
        assert summary["peft_type"] == name.upper() and summary["fits_base"] is True, summary.get("fit_error")
        oracle = peft_modules(llama_base, adapter)
        assert {m["module"] for m in summary["modules"]} == set(oracle)
        for rec in summary["modules"]:
            layer = oracle[rec["module"]]
            with torch.no_grad():
                dense = layer.get_delta_weight("default")
            assert rec["shape"] == list(dense.shape)
            assert_spectrum(rec, dense, rel=2e-5)  # PEFT's ΔW is float32
            if name != "adalora":
                assert rec["scale"] == pytest.approx(layer.scaling["default"], rel=1e-12)
            else:
                assert rec["rank"] == layer.lora_A["default"].shape[0]


def test_ia3_and_oft_run_with_nulls(llama_base, tmp_path):
    from peft import IA3Config, OFTConfig

    ia3 = make_peft_adapter(llama_base, tmp_path / "ia3", IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False))
    rc, out, err = run_cli("inspect", str(ia3), "--json", "--base", str(llama_base))
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["peft_type"] == "IA3" and summary["fits_base"] is True and len(summary["modules"]) == 4
    for rec in summary["modules"]:
        assert all(rec[k] is None for k in ("rank", "alpha", "scale", "delta_norm", "stable_rank", "energy"))
        assert rec["feedforward"] is rec["module"].endswith("down_proj")
        assert rec["features"] == (128 if rec["feedforward"] else 32)
    oft = inspect(str(make_peft_adapter(llama_base, tmp_path / "oft", OFTConfig(
        oft_block_size=16, target_modules=["q_proj"], init_weights=False))))
    assert [(m["blocks"], m["block_size"], m["delta_norm"]) for m in oft["modules"]] == [(4, 16, None)] * 2


def test_non_finite_is_reported_not_refused(llama_base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(llama_base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    bad = next(k for k in sorted(tensors) if "layers.1" in k and "lora_B" in k)
    tensors[bad][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rc, out, err = run_cli("inspect", str(adapter), "--json")
    assert rc == 0, err
    summary = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert summary["non_finite"] == [bad.removeprefix(PEFT_PREFIX)]
    by_layer = {m["module"]: m for m in summary["modules"]}
    assert by_layer["model.layers.1.self_attn.q_proj"]["delta_norm"] is None
    assert by_layer["model.layers.1.self_attn.q_proj"]["non_finite"] is True
    assert by_layer["model.layers.0.self_attn.q_proj"]["delta_norm"] > 0


def test_table_run_prints_module_names(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    rc, out, err = run_cli("inspect", str(adapter))
    assert rc == 0, err
    for i in (0, 1):
        for m in ("self_attn.q_proj", "mlp.down_proj"):
            assert f"model.layers.{i}.{m}" in out
    assert "stable rank" in out and "energy@4" in out and "LORA" in out


def test_neither_adapter_nor_model_is_one_line(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "README.txt").write_text("hello")
    assert_refused(*run_cli("inspect", str(tmp_path / "junk")), None, None, 2, "neither an adapter nor")
    with pytest.raises(AdaptoolError, match="not found"):
        inspect(str(tmp_path / "missing"))


def test_peft_weights_file_and_base_for_a_model_refused(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "lora", r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(AdaptoolError, match="adapter's folder"):
        inspect(str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdaptoolError, match="--base only applies to adapters"):
        inspect(str(llama_base), base=str(llama_base))


def test_hub_ids_for_adapter_and_model(llama_base, tmp_path):
    """Hub ids go through the same openers (offline, against a laid-out hub cache)."""
    adapter = make_adapter(llama_base, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    cache = tmp_path / "cache"
    lay_out_cache(cache, "tiny-org/tiny-llama", llama_base)
    lay_out_cache(cache, "someone/tiny-lora", adapter)
    env = {"HF_HUB_CACHE": str(cache)}
    rc, out, err = run_cli("inspect", "someone/tiny-lora", "--base", "tiny-org/tiny-llama", "--json", env=env)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["kind"] == "adapter" and summary["fits_base"] is True
    assert summary["modules"] == inspect(str(adapter), base=str(llama_base))["modules"]
    rc, out, err = run_cli("inspect", "tiny-org/tiny-llama", "--json", env=env)
    assert rc == 0, err
    assert json.loads(out)["tensors"] == inspect(str(llama_base))["tensors"]


def test_conv_lora_full_shape_and_flattened_spectrum(tmp_path):
    """A Conv2d LoRA: shape is the kernel's [out, in, kh, kw]; the spectrum is that of ΔW flattened to (out, in·k·k)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.point = torch.nn.Conv2d(8, 6, 1)

    torch.manual_seed(0)
    net, base = Net(), tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base / "model.safetensors"))
    get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "point"],
                                     init_lora_weights=False)).save_pretrained(tmp_path / "a")
    summary = inspect(str(tmp_path / "a"), base=str(base))
    peft = PeftModel.from_pretrained(Net(), tmp_path / "a").base_model.model
    assert summary["fits_base"] is True
    for rec in summary["modules"]:
        with torch.no_grad():
            dense = getattr(peft, rec["module"]).get_delta_weight("default")
        assert rec["shape"] == list(dense.shape) and rec["layer"] == "conv"
        assert_spectrum(rec, dense, rel=1e-5)
