"""adaptool unload against PEFT's merge_and_unload, tensor by tensor, then reloaded with transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_model, load_output, make_adapter, peft_merged

from adaptool.commands.unload import unload

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _reload(out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("lora", dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)),
        ("rslora", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])),
        ("patterns", dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR,
                          rank_pattern={"layers.0.self_attn.q_proj": 6, "q_proj": 2, "down_proj": 3},
                          alpha_pattern={"v_proj": 32, "layers.1.mlp.down_proj": 1})),
        ("lora_bias", dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], lora_bias=True)),
        ("modules_to_save", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
        ("trainable_tokens", dict(r=4, lora_alpha=8, target_modules=["v_proj"], trainable_token_indices=[3, 17, 200])),
        ("fp32_adapter", dict(r=4, lora_alpha=8, target_modules=["up_proj"])),
    ],
)
def test_llama_bit_identical(llama_base, tmp_path, name, kwargs):
    adapter = make_adapter(llama_base, tmp_path / name, dtype=torch.float32 if name == "fp32_adapter" else torch.bfloat16,
                           **kwargs)
    out = tmp_path / "out"
    summary = unload(str(llama_base), [str(adapter)], out)
    ours = load_output(out)
    reference = peft_merged(llama_base, [adapter])
    assert_same_model(ours, reference, max_ulp=0)
    assert summary["tensors_changed"] > 0
    # the merge really changed something, so equality above is not vacuous
    base = load_output(llama_base)
    assert any(not torch.equal(base[k], ours[k]) for k in ours)
    assert_same_model(_reload(out), reference, max_ulp=0)


def test_pattern_first_match_wins(llama_base, tmp_path):
    """Both patterns match layer 0's q_proj; the first in the file wins, not the most specific.

    PEFT saves adapter_config.json with sorted keys, so "x|layers.0…" (a regex alternation) stays second.
    """
    adapter = make_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
                           rank_pattern={"q_proj": 2, "x|layers.0.self_attn.q_proj": 6},
                           alpha_pattern={"q_proj": 3, "x|layers.0.self_attn.q_proj": 60})
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").get_shape()[0] == 2
    unload(str(llama_base), [str(adapter)], tmp_path / "out")
    assert_same_model(load_output(tmp_path / "out"), peft_merged(llama_base, [adapter]))


def test_gpt2_conv1d_fan_in_fan_out(gpt2_base, tmp_path):
    adapter = make_adapter(gpt2_base, tmp_path / "a", dtype=torch.float32, r=4, lora_alpha=8,
                           target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    out = tmp_path / "out"
    unload(str(gpt2_base), [str(adapter)], out)
    reference = peft_merged(gpt2_base, [adapter], dtype=torch.float32)
    assert_same_model(load_output(out), reference, max_ulp=0)
    assert_same_model(_reload(out), reference, max_ulp=0)


def test_dora_within_one_ulp(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    unload(str(llama_base), [str(adapter)], out)
    reference = peft_merged(llama_base, [adapter])
    assert_same_model(load_output(out), reference, max_ulp=1)
    base = load_output(llama_base)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], load_output(out)[key])


def test_embedding_lora_bit_identical(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    out = tmp_path / "out"
    unload(str(llama_base), [str(adapter)], out)
    ours, reference = load_output(out), peft_merged(llama_base, [adapter])
    assert_same_model(ours, reference, max_ulp=0)
    assert not torch.equal(ours["model.embed_tokens.weight"], load_output(llama_base)["model.embed_tokens.weight"])


def test_two_adapters_round_once(llama_base, tmp_path):
    """Several adapters: PEFT rounds to bf16 after each one, adaptool once at the end (DESIGN: numerics).

    So the result is compared with PEFT's float32 merge: adaptool must be the correctly rounded value of it
    and at least as close to it as PEFT's bf16 merge.
    """
    a = make_adapter(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_adapter(llama_base, tmp_path / "b", seed=2, r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"])
    out = tmp_path / "out"
    unload(str(llama_base), [str(a), str(b)], out)
    ours = load_output(out)
    exact = peft_merged(llama_base, [a, b], dtype=torch.float32)
    peft_bf16 = peft_merged(llama_base, [a, b])
    assert set(ours) == set(exact)
    changed = 0
    for k, v in exact.items():
        assert torch.equal(ours[k], v.to(torch.bfloat16)), k
        changed += not torch.equal(ours[k], peft_bf16[k])
        assert (ours[k].float() - v).norm() <= (peft_bf16[k].float() - v).norm(), k
    assert changed > 0  # the single rounding is observable


def test_base_taken_from_adapter_config(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(llama_base)
    from adaptool.commands.unload import split_sources

    base, adapters = split_sources(str(adapter))
    assert base is None and adapters == [str(adapter)]
    summary = unload(None, adapters, tmp_path / "out")
    assert summary["base"] == str(llama_base)
    assert_same_model(load_output(tmp_path / "out"), peft_merged(llama_base, [adapter]))


def test_tied_embeddings_stay_tied(llama_tied_base, tmp_path):
    adapter = make_adapter(llama_tied_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
                           trainable_token_indices=[5, 9])
    out = tmp_path / "out"
    unload(str(llama_tied_base), [str(adapter)], out)
    ours = load_output(out)
    assert "lm_head.weight" not in ours and set(ours) == set(load_output(llama_tied_base))
    reference = peft_merged(llama_tied_base, [adapter])
    assert_same_model(ours, reference, max_ulp=0)
    model_sd = _reload(out)
    assert torch.equal(model_sd["lm_head.weight"], model_sd["model.embed_tokens.weight"])


def test_dtype_option_rounds_once(gpt2_base, tmp_path):
    """A float32 base written as bfloat16: the float32 merge rounded once, config updated."""
    adapter = make_adapter(gpt2_base, tmp_path / "a", dtype=torch.float32, r=4, lora_alpha=8, target_modules=["c_attn"],
                           fan_in_fan_out=True)
    out = tmp_path / "out"
    unload(str(gpt2_base), [str(adapter)], out, dtype="bf16")
    ours = load_output(out)
    reference = peft_merged(gpt2_base, [adapter], dtype=torch.float32)
    for k, v in reference.items():
        if k in ours:
            assert ours[k].dtype == torch.bfloat16
            assert torch.equal(ours[k], v.to(torch.bfloat16)), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_conv2d_lora(tmp_path):
    """A custom Conv2d model: PEFT's conv delta (3x3 via conv2d, 1x1 shortcut).

    conv2d's float32 summation order depends on the thread count (the engine leaves cores to its I/O
    threads), so this is float32-close rather than bit-equal; the 1x1 path is a matmul and stays exact.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.point = torch.nn.Conv2d(8, 6, 1)
            self.head = torch.nn.Linear(6, 4)

    torch.manual_seed(0)
    net = Net()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base / "model.safetensors"))
    pm = get_peft_model(Net().requires_grad_(False), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "point"],
                                                                  init_lora_weights=False))
    pm.base_model.model.load_state_dict(net.state_dict(), strict=False)
    pm.save_pretrained(tmp_path / "a")
    fresh = Net()
    fresh.load_state_dict(net.state_dict())
    reference = PeftModel.from_pretrained(fresh, tmp_path / "a").merge_and_unload().state_dict()
    unload(str(base), [str(tmp_path / "a")], tmp_path / "out")
    ours = load_output(tmp_path / "out")
    assert set(ours) == set(reference)
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], rtol=0, atol=1e-6)
    assert torch.equal(ours["point.weight"], reference["point.weight"])
    assert (ours["conv.weight"] - net.state_dict()["conv.weight"]).abs().max() > 1e-3


def test_provenance_and_card(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out"
    unload(str(llama_base), [str(adapter)], out)
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / sorted(set(index["weight_map"].values()))[0]
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    adapters = json.loads(meta["adaptool.adapters"])
    import hashlib

    h = hashlib.sha256((adapter / "adapter_config.json").read_bytes() + (adapter / "adapter_model.safetensors").read_bytes())
    assert adapters[0]["sha256"] == h.hexdigest() and adapters[0]["name"] == "a" and "source" not in adapters[0]
    assert json.loads(meta["adaptool.base"])["name"] == "base"  # portable: a name, never the path
    assert len(json.loads(meta["adaptool.base"])["headers_sha256"]) == 64 and len(meta["adaptool.recipe_sha256"]) == 64
    card = (out / "README.md").read_text()
    assert "base_model:" not in card  # a local base is no hub id
    assert "adaptool unload base+a" in card and str(tmp_path) not in card and str(llama_base) not in card
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_output(out).values())


def test_side_files_travel(llama_base, tmp_path):
    """config, generation config and tokenizer files are copied; other files (and the base's card) are not."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    side = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
            "chat_template.jinja": "{{ messages }}", "tokenizer.model": "spm"}
    for name, text in side.items():
        (base / name).write_text(text)
    (base / "README.md").write_text("the base's own card")
    (base / "training_args.bin").write_bytes(b"\x00")
    adapter = make_adapter(llama_base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    out = tmp_path / "out"
    unload(str(base), [str(adapter)], out)
    for name, text in side.items():
        assert (out / name).read_text() == text
    assert not (out / "training_args.bin").exists() and not (out / "adapter_config.json").exists()
    assert "the base's own card" not in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
