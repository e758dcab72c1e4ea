"""convert: PEFT ⇄ kohya/LyCORIS (factors bit for bit, ΔW as PEFT means it), and PiSSA/OLoRA residual adapters
into plain LoRAs, checked against PEFT itself and against LyCORIS's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (assert_refused, assert_same_model, lay_out_cache, load_output, make_adapter, make_peft_adapter,
                      peft_merged, run_cli, snapshot)

from adaptool.commands.convert import convert, factorization
from adaptool.commands.unload import unload
from adaptool.errors import AdaptoolError

PEFT_PREFIX = "base_model.model."
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / "adapter_model.safetensors" if path.is_dir() else path
    return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(file)).items()}


def header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    """Same names, dtypes, shapes and bits."""
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k], theirs[k]), k


def peft_scales(base, adapter) -> dict[str, float]:
    """{module path: scaling} as PEFT itself resolves it (rsLoRA, patterns): the oracle for the alphas."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {name: module.scaling["default"] for name, module in model.base_model.model.named_modules()
            if isinstance(module, BaseTunerLayer) and "default" in getattr(module, "scaling", {})}


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# ------------------------------------------------------------------------------------------ PEFT -> kohya


LORA_CASES = {
    "plain-bf16": dict(dtype=torch.bfloat16, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora-patterns": dict(dtype=torch.float32, r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LINEAR,
                            rank_pattern={"q_proj": 2, "down_proj": 3},
                            alpha_pattern={"v_proj": 32, "layers.1.mlp.down_proj": 1.5, "o_proj": 0.3}),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_lora_to_kohya_and_back(llama_base, tmp_path, case):
    """kohya names and one alpha per module whose alpha / r is PEFT's scale in float32 (rsLoRA and patterns folded
    in): folding the kohya file gives PEFT's merged model bit for bit; back to PEFT the factors are the same bits
    and PEFT merges the same model; back to kohya again the same tensors."""
    kwargs = dict(LORA_CASES[case])
    adapter = make_adapter(llama_base, tmp_path / "peft", **kwargs)
    kfile = tmp_path / "lora.safetensors"
    summary = convert(str(adapter), kfile, "kohya")
    assert summary["to"] == "kohya" and summary["peft_type"] == "LORA"
    k = tensors_of(kfile)
    scales = peft_scales(llama_base, adapter)
    assert len(k) == 3 * len(scales) == summary["tensors_written"]
    for path, scale in scales.items():
        name = "lora_" + path.replace(".", "_")
        r = k[f"{name}.lora_down.weight"].shape[0]
        assert k[f"{name}.alpha"].dtype == torch.float32 and k[f"{name}.alpha"].dim() == 0
        assert f32(float(k[f"{name}.alpha"]) / r) == f32(scale), path
    peft_tensors = tensors_of(adapter)
    for key, t in peft_tensors.items():
        kname = "lora_" + key.split(".lora_")[0].replace(".", "_")
        assert torch.equal(k[f"{kname}.lora_{'down' if '.lora_A.' in key else 'up'}.weight"], t)
    meta = header(kfile)
    assert meta["ss_network_module"] == "networks.lora" and meta["adaptool.command"] == "convert"
    assert meta["ss_network_dim"] == ("4" if case == "plain-bf16" else "Dynamic")
    reference = peft_merged(llama_base, [adapter])
    unload(str(llama_base), [str(kfile)], tmp_path / "merged")
    assert_same_model(load_output(tmp_path / "merged"), reference)

    back = tmp_path / "back"
    convert(str(kfile), back, "peft", base=str(llama_base))
    assert_same_tensors(tensors_of(back), peft_tensors)
    assert_same_model(peft_merged(llama_base, [back]), reference)
    assert (back / "README.md").exists()
    again = tmp_path / "again.safetensors"
    convert(str(back), again, "kohya")
    assert_same_tensors(tensors_of(again), k)


def kohya_file(path: Path, modules: dict, prefix: str = "lora_", dtype=torch.float16, seed: int = 0) -> Path:
    """A hand-built kohya LoRA file: ``modules`` maps a flattened path to (out, in, r, alpha tensor or None)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for flat, (n_out, n_in, r, alpha) in modules.items():
        tensors[f"{prefix}{flat}.lora_down.weight"] = torch.randn(r, n_in, generator=g).to(dtype)
        tensors[f"{prefix}{flat}.lora_up.weight"] = (torch.randn(n_out, r, generator=g) * 0.1).to(dtype)
        if alpha is not None:
            tensors[f"{prefix}{flat}.alpha"] = alpha
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.mark.parametrize("prefix,flat_prefix", [("lora_", "model_"), ("lora_transformer_", ""), ("lora_unet_", "model_")])
def test_kohya_to_peft_to_kohya_same_tensors(llama_base, tmp_path, prefix, flat_prefix):
    """Per-module ranks, alphas in bf16/fp16/fp32, a module without alpha and one with alpha 0 (both mean
    alpha = r): PEFT reads the converted folder with kohya's scales (its merge is adaptool's fold of the kohya
    file, bit for bit), and converting back gives the same keys and tensors."""
    p = flat_prefix
    kfile = kohya_file(tmp_path / "k.safetensors", {
        f"{p}layers_0_self_attn_q_proj": (64, 64, 4, torch.tensor(8.0, dtype=torch.bfloat16)),
        f"{p}layers_0_self_attn_v_proj": (32, 64, 2, torch.tensor([3.0])),
        f"{p}layers_1_self_attn_q_proj": (64, 64, 4, None),
        f"{p}layers_1_mlp_down_proj": (64, 128, 8, torch.tensor(0.0, dtype=torch.float16)),
        f"{p}layers_1_mlp_up_proj": (128, 64, 4, torch.tensor(1.25)),
    }, prefix=prefix)
    out = tmp_path / "peft"
    summary = convert(str(kfile), out, "peft", base=str(llama_base))
    assert summary["modules"] == 5 and summary["ranks"] == [2, 8]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["init_lora_weights"] is True
    scales = peft_scales(llama_base, out)
    assert scales == {"model.layers.0.self_attn.q_proj": 2.0, "model.layers.0.self_attn.v_proj": 1.5,
                      "model.layers.1.self_attn.q_proj": 1.0, "model.layers.1.mlp.down_proj": 1.0,
                      "model.layers.1.mlp.up_proj": 1.25 / 4}
    unload(str(llama_base), [str(kfile)], tmp_path / "merged")
    assert_same_model(load_output(tmp_path / "merged"), peft_merged(llama_base, [out]))
    back = tmp_path / "back.safetensors"
    convert(str(out), back, "kohya")
    assert_same_tensors(tensors_of(back), tensors_of(kfile))


@pytest.mark.parametrize("kind", ["loha", "lokr-factored", "lokr-both", "lokr-whole"])
def test_peft_loha_lokr_round_trip(llama_base, tmp_path, kind):
    """LoHa and LoKr (w2 factored; both factored; both whole): kohya keys keep the LyCORIS names, folding the
    kohya file gives PEFT's merge bit for bit, and back to PEFT the factors are the same bits."""
    from peft import LoHaConfig, LoKrConfig

    configs = {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                           rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
        "lokr-factored": LoKrConfig(r=3, alpha=5, target_modules=["q_proj", "down_proj"], init_weights=False),
        "lokr-both": LoKrConfig(r=2, alpha=6, decompose_both=True, target_modules=["q_proj", "down_proj"],
                                init_weights=False),
        "lokr-whole": LoKrConfig(r=8, alpha=8, target_modules=["q_proj", "o_proj"], init_weights=False),
    }
    adapter = make_peft_adapter(llama_base, tmp_path / "peft", configs[kind])
    kfile = tmp_path / "k.safetensors"
    convert(str(adapter), kfile, "kohya", prefix="lycoris_")
    k = tensors_of(kfile)
    assert all(n.startswith("lycoris_model_layers_") for n in k)
    assert json.loads(header(kfile)["ss_network_args"]) == {"algo": kind[:4]}
    reference = peft_merged(llama_base, [adapter])
    unload(str(llama_base), [str(kfile)], tmp_path / "merged")
    assert_same_model(load_output(tmp_path / "merged"), reference)
    back = tmp_path / "back"
    convert(str(kfile), back, "peft", base=str(llama_base))
    assert_same_tensors(tensors_of(back), tensors_of(adapter))
    assert_same_model(peft_merged(llama_base, [back]), reference)
    convert(str(back), tmp_path / "again.safetensors", "kohya")
    assert_same_tensors(tensors_of(tmp_path / "again.safetensors"), k)


def test_lokr_whole_scale_folded_or_refused(llama_base, tmp_path):
    """LyCORIS applies a LoKr module with both factors whole at scale 1: a PEFT scale of 2 is folded into
    lokr_w1 exactly (same merged model), a scale of 1.5 cannot be and is refused."""
    from peft import LoKrConfig

    two = make_peft_adapter(llama_base, tmp_path / "two", LoKrConfig(r=8, alpha=16, target_modules=["q_proj"],
                                                                     init_weights=False))
    summary = convert(str(two), tmp_path / "two.safetensors", "kohya")
    assert any("folded into lokr_w1" in n for n in summary["notes"])
    unload(str(llama_base), [str(tmp_path / "two.safetensors")], tmp_path / "merged")
    assert_same_model(load_output(tmp_path / "merged"), peft_merged(llama_base, [two]))
    odd = make_peft_adapter(llama_base, tmp_path / "odd", LoKrConfig(r=8, alpha=12, target_modules=["q_proj"],
                                                                     init_weights=False))
    with pytest.raises(AdaptoolError, match="both factors whole.*scale 1, but its scale is 1.5"):
        convert(str(odd), tmp_path / "odd.safetensors", "kohya")
    assert not (tmp_path / "odd.safetensors").exists()


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in (1, 2, 7, 12, 48, 64, 127, 128, 250, 360, 768, 1000):
        for factor in (-1, 2, 4, 8, 16, 5):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


# ------------------------------------------------------------------------------------ LyCORIS's own files


class Tiny(torch.nn.Module):
    """Linear and Conv2d layers, names with '_' inside (what kohya flattening makes ambiguous)."""

    def __init__(self):
        super().__init__()
        self.in_proj = torch.nn.Linear(64, 48)
        self.conv_in = torch.nn.Conv2d(8, 16, 3)
        self.pointwise = torch.nn.Conv2d(16, 32, 1)
        self.block = torch.nn.Module()
        self.block.fc_out = torch.nn.Linear(48, 64)


LYCORIS_CASES = {
    "locon": dict(algo="locon"),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", linear_dim=2, conv_dim=2),
    "lokr-factor2": dict(algo="lokr", factor=2),
    "lokr-both": dict(algo="lokr", decompose_both=True, linear_dim=2, conv_dim=2),
    "lokr-full": dict(algo="lokr", full_matrix=True),
}


@pytest.mark.parametrize("case", sorted(LYCORIS_CASES))
def test_lycoris_files(tmp_path, case):
    """Files saved by LyCORIS itself (``lycoris-lora``): converted to PEFT (factors bit for bit, PEFT loads them
    and its ΔW per module is LyCORIS's), and back to the same kohya tensors as LyCORIS saved."""
    pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork, create_lycoris
    from peft import PeftModel
    from safetensors.torch import save_file

    kwargs = {**dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3), **LYCORIS_CASES[case]}
    torch.manual_seed(0)
    model = Tiny()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"]})
    network = create_lycoris(model, 1.0, **kwargs)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    kfile = tmp_path / "lycoris.safetensors"
    network.save_weights(str(kfile), torch.float32, None)
    network.eval()
    inputs = {"in_proj": torch.randn(5, 64), "conv_in": torch.randn(2, 8, 7, 7), "pointwise": torch.randn(2, 16, 5, 5),
              "block.fc_out": torch.randn(5, 48)}
    with torch.no_grad():  # LyCORIS's own forward, the network applied: the oracle
        expected = {name: model.get_submodule(name)(x) for name, x in inputs.items()}

    out = tmp_path / "peft"
    convert(str(kfile), out, "peft", base=str(base))
    ours = tensors_of(out)
    theirs = tensors_of(kfile)
    for name, t in ours.items():
        path, _, suffix = name.partition(".lora_") if ".lora_" in name else name.rpartition(".")
        kname = "lycoris_" + path.replace(".", "_")
        suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(suffix, suffix)
        assert torch.equal(t, theirs[f"{kname}.{suffix}"]), name
    fresh = Tiny()
    fresh.load_state_dict(model.state_dict())
    peft_model = PeftModel.from_pretrained(fresh, out).eval()
    with torch.no_grad():
        for name, x in inputs.items():
            layer = peft_model.base_model.model.get_submodule(name)
            plain = layer.get_base_layer()(x)
            assert (expected[name] - plain).abs().max() > 1e-4, name  # the adapter does something
            torch.testing.assert_close(layer(x), expected[name], rtol=1e-5, atol=1e-5)
    back = tmp_path / "back.safetensors"
    convert(str(out), back, "kohya")
    assert_same_tensors(tensors_of(back), theirs)


def test_lycoris_layout_peft_cannot_build(tmp_path):
    """LyCORIS swaps a factorisation whose factor is the larger part (8 = 4·2 -> (2, 4)); PEFT keeps (4, 2), so
    no PEFT LoKrConfig builds that file's conv_in: refused in one line naming the module and both layouts."""
    pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import save_file

    model = Tiny()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"]})
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3, algo="lokr", factor=4)
    network.apply_to()
    network.save_weights(str(tmp_path / "k.safetensors"), torch.float32, None)
    with pytest.raises(AdaptoolError, match=r"LoKr module conv_in has factors lokr_w1 \(4, 2\).*PEFT's LoKr .* would "
                                            r"build lokr_w1 \(4, 4\)"):
        convert(str(tmp_path / "k.safetensors"), tmp_path / "out", "peft", base=str(base))
    assert not (tmp_path / "out").exists()


def test_gpt2_conv1d(gpt2_base, tmp_path):
    """GPT-2 stores its Conv1D weights (in, out), c_proj square: the kohya file keeps PEFT's (out, in) factors, and
    reading it back on this base says fan_in_fan_out, so both folds are PEFT's merge."""
    adapter = make_adapter(gpt2_base, tmp_path / "peft", dtype=torch.float32, r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj"])
    kfile = tmp_path / "k.safetensors"
    convert(str(adapter), kfile, "kohya")
    reference = peft_merged(gpt2_base, [adapter], dtype=torch.float32)
    unload(str(gpt2_base), [str(kfile)], tmp_path / "merged")
    assert_same_model(load_output(tmp_path / "merged"), reference)
    back = tmp_path / "back"
    convert(str(kfile), back, "peft", base=str(gpt2_base))
    assert json.loads((back / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert_same_tensors(tensors_of(back), tensors_of(adapter))
    assert_same_model(peft_merged(gpt2_base, [back], dtype=torch.float32), reference)


# ---------------------------------------------------------------------------------------- PiSSA / OLoRA


def residual_adapters(base: Path, tmp: Path, init: str, **lora_kwargs) -> tuple[Path, Path, Path, dict]:
    """PEFT's own workflow: (initial, trained residual adapter, PEFT's conversion, the trained model's weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=init, **lora_kwargs))
    pm.peft_config["default"].init_lora_weights = True  # as PEFT's PiSSA example saves the initial state
    pm.save_pretrained(tmp / "initial")
    pm.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)  # "training"
    pm.save_pretrained(tmp / "trained")
    pm.save_pretrained(tmp / "peft_converted", path_initial_model_for_weight_conversion=str(tmp / "initial"))
    trained = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return tmp / "initial", tmp / "trained", tmp / "peft_converted", trained


@pytest.fixture(scope="module")
def float_base(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from conftest import save_model, tiny_llama_config

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    return save_model(model, tmp_path_factory.mktemp("float_llama") / "base", shard=None)


@pytest.mark.parametrize("init,extra", [("pissa", dict(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 12})),
                                        ("olora", dict(use_rslora=True)), ("pissa_niter_2", {}),
                                        ("pissa", dict(modules_to_save=["lm_head"]))])
def test_initial_matches_peft(float_base, tmp_path, init, extra):
    """convert --initial gives what PEFT's save_pretrained(path_initial_model_for_weight_conversion=…) gives:
    the same tensors bit for bit, the same r/alpha/patterns, init_lora_weights true; on the ORIGINAL base it
    makes the trained model."""
    initial, trained, reference, trained_model = residual_adapters(
        float_base, tmp_path, init, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], **extra)
    out = tmp_path / "ours"
    summary = convert(str(trained), out, "peft", initial=str(initial))
    assert summary["ranks"][1] == 8
    ours_t, theirs_t = tensors_of(out), tensors_of(reference)
    carried = {k for k in ours_t if ".lora_" not in k}
    assert bool(carried) == ("modules_to_save" in extra)  # PEFT's conversion drops them; adaptool carries them
    assert_same_tensors({k: v for k, v in ours_t.items() if k not in carried}, theirs_t)
    ours, theirs = (json.loads((p / "adapter_config.json").read_text()) for p in (out, reference))
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora",
                "target_modules", "peft_type"):
        if key == "target_modules":  # PEFT saves a set as a list: its order follows the process's hash seed
            assert sorted(ours[key]) == sorted(theirs[key]), key
        else:
            assert ours[key] == theirs[key], key
    assert ours["init_lora_weights"] is True
    merged = peft_merged(float_base, [out], dtype=torch.float32)
    if not carried:
        assert_same_model(merged, peft_merged(float_base, [reference], dtype=torch.float32))
    worst = max(float((merged[k] - trained_model[k]).abs().max()) for k in trained_model)
    assert worst < 1e-5, worst  # the original base + the plain LoRA is the trained residual model

    if carried:
        return  # a kohya file cannot carry modules_to_save
    kfile = tmp_path / "plain.safetensors"
    convert(str(trained), kfile, "kohya", initial=str(initial))
    unload(str(float_base), [str(kfile)], tmp_path / "from_kohya", dtype="float32")
    assert_same_model(load_output(tmp_path / "from_kohya"), merged)


def test_initial_refusals(float_base, tmp_path):
    initial, trained, _, _ = residual_adapters(float_base, tmp_path, "pissa", r=4, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj"])
    other = make_adapter(float_base, tmp_path / "other", dtype=torch.float32, r=4, lora_alpha=8,
                         target_modules=["q_proj"])
    with pytest.raises(AdaptoolError, match="does not match.*module model.layers.0.self_attn.v_proj is only in"):
        convert(str(trained), tmp_path / "o1", "peft", initial=str(other))
    wider = make_adapter(float_base, tmp_path / "wider", dtype=torch.float32, r=6, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdaptoolError, match=r"does not match.*\(4, 64\) torch.float32 in the adapter, \(6, 64\)"):
        convert(str(trained), tmp_path / "o2", "peft", initial=str(wider))
    plain = make_adapter(float_base, tmp_path / "plain", dtype=torch.float32, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    with pytest.raises(AdaptoolError, match="plain LoRA init, not a residual"):
        convert(str(trained), tmp_path / "o3", "peft", initial=str(plain))
    for name in ("o1", "o2", "o3"):
        assert not (tmp_path / name).exists()


# ------------------------------------------------------------------------------------------------ refusals


def test_what_kohya_cannot_carry(llama_base, tmp_path):
    from peft import IA3Config

    cases = {
        "DoRA magnitude vectors": dict(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True),
        "lora_bias": dict(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True),
        "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "embedding LoRA": dict(r=2, lora_alpha=4, target_modules=["embed_tokens"]),
        "trainable tokens": dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
    }
    for needle, kwargs in cases.items():
        adapter = make_adapter(llama_base, tmp_path / needle.replace(" ", "_"), **kwargs)
        with pytest.raises(AdaptoolError, match=f"cannot carry (an )?{needle}"):
            convert(str(adapter), tmp_path / "out.safetensors", "kohya")
        assert not (tmp_path / "out.safetensors").exists()
    ia3 = make_peft_adapter(llama_base, tmp_path / "ia3", IA3Config(target_modules=["q_proj", "down_proj"],
                                                                   feedforward_modules=["down_proj"], init_ia3_weights=False))
    with pytest.raises(AdaptoolError, match="cannot convert IA3 adapters"):
        convert(str(ia3), tmp_path / "out.safetensors", "kohya")


def test_usage_refusals(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj"])
    kfile = tmp_path / "k.safetensors"
    convert(str(adapter), kfile, "kohya")
    with pytest.raises(AdaptoolError, match="already a PEFT adapter"):
        convert(str(adapter), tmp_path / "o", "peft")
    with pytest.raises(AdaptoolError, match="already a kohya/LyCORIS file"):
        convert(str(kfile), tmp_path / "o.safetensors", "kohya", base=str(llama_base))
    with pytest.raises(AdaptoolError, match="give the base model it was trained on with --base"):
        convert(str(kfile), tmp_path / "o", "peft")
    with pytest.raises(AdaptoolError, match=r"unknown format --to 'kohja' \(did you mean kohya\?\)"):
        convert(str(adapter), tmp_path / "o", "kohja")
    with pytest.raises(AdaptoolError, match="unknown kohya prefix 'lora_llm_'"):
        convert(str(adapter), tmp_path / "o.safetensors", "kohya", prefix="lora_llm_")
    with pytest.raises(AdaptoolError, match="output file .* already exists"):
        convert(str(adapter), kfile, "kohya")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(AdaptoolError, match="is a folder, and this output is one file"):
        convert(str(adapter), tmp_path / "dir.safetensors", "kohya", force=True)
    with pytest.raises(AdaptoolError, match="does not end in .safetensors"):
        convert(str(adapter), tmp_path / "lora", "kohya")
    with pytest.raises(AdaptoolError, match="lies inside the input"):
        convert(str(adapter), adapter / "k.safetensors", "kohya")
    before = kfile.read_bytes()
    convert(str(adapter), kfile, "kohya", force=True, prefix="lora_te_")
    assert kfile.read_bytes() != before and all(k.startswith("lora_te_") for k in tensors_of(kfile))
    assert not [p.name for p in tmp_path.iterdir() if ".adaptool-" in p.name]


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli(llama_base, tmp_path):
    """The main paths through the real console entry point (--json, the summary line), and refusals: one line,
    exit 2, nothing written, inputs untouched."""
    adapter = make_adapter(llama_base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cache = tmp_path / "hub"
    lay_out_cache(cache, "tiny-org/tiny-llama", llama_base)
    lay_out_cache(cache, "someone/tiny-lora", adapter)
    hub = {"HF_HUB_CACHE": str(cache)}
    kfile = tmp_path / "out" / "lora.safetensors"
    rc, out, err = run_cli("convert", "someone/tiny-lora", "-o", str(kfile), "--to", "kohya", "--json", env=hub)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["command"] == "convert" and summary["modules"] == 4 and Path(summary["output"]) == kfile
    k = tensors_of(kfile)
    for key, t in tensors_of(adapter).items():
        flat = "lora_" + key.split(".lora_")[0].replace(".", "_")
        assert torch.equal(k[f"{flat}.lora_{'down' if '.lora_A.' in key else 'up'}.weight"], t)
        assert float(k[f"{flat}.alpha"]) == 8.0
    back = tmp_path / "back"
    rc, out, err = run_cli("convert", str(kfile), "-o", str(back), "--to", "peft", "--base", "tiny-org/tiny-llama",
                           env=hub)
    assert rc == 0, err
    assert "wrote" in out and "4 modules, rank 4" in out
    assert_same_tensors(tensors_of(back), tensors_of(adapter))
    assert json.loads((back / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-llama"
    hub_entry = json.loads(header(kfile)["adaptool.adapters"])[0]
    assert hub_entry["hub"] == "someone/tiny-lora" and len(hub_entry["revision"]) == 40  # the commit it resolved to

    before = snapshot(adapter, kfile)
    for args, target, needle in [((str(adapter), "-o", str(kfile), "--to", "kohya"), None, "already exists"),
                                 ((str(kfile), "-o", str(tmp_path / "x"), "--to", "peft"), tmp_path / "x", "--base")]:
        rc, out, err = run_cli("convert", *args)
        assert_refused(rc, out, err, target, before, 2, needle)
