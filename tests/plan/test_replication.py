"""LoRA ``layer_replication``: unload materialises the expanded layer stack, one un-shared copy per replica.

The oracle is the PeftModel itself (its forward pass), not PEFT's merge_and_unload, which adds every replica's
delta into the one shared weight (shown below).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_output, make_adapter

from adaptool.errors import AdaptoolError
from adaptool.commands.unload import unload

RANGES = [[0, 2], [1, 2]]  # 2 base layers -> [0, 1, 1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
L = "model.layers"


@pytest.fixture(scope="module")
def replicated(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("repl") / "a", r=4, lora_alpha=8,
                        target_modules=TARGETS, layer_replication=RANGES)


@pytest.fixture(scope="module")
def unloaded(llama_base, replicated, tmp_path_factory):
    out = tmp_path_factory.mktemp("repl_out") / "out"
    summary = unload(str(llama_base), [str(replicated)], out, dtype="float32", device="cpu")
    return out, summary


def _peft_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 33, 200]])
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_adapter_keys_use_expanded_indices(replicated):
    from safetensors import safe_open

    with safe_open(str(replicated / "adapter_model.safetensors"), "pt") as f:
        layers = {int(k.split(".layers.")[1].split(".")[0]) for k in f.keys()}
    assert layers == {0, 1, 2}
    assert json.loads((replicated / "adapter_config.json").read_text())["layer_replication"] == RANGES


def test_logits_match_peft_model(llama_base, replicated, unloaded):
    from transformers import AutoModelForCausalLM

    out, summary = unloaded
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert len(merged.model.layers) == 3
    pm = _peft_model(llama_base, replicated)
    assert len(pm.base_model.model.model.layers) == 3
    ours, theirs = _logits(merged), _logits(pm)
    diff = float((ours - theirs).abs().max())
    assert diff < 1e-4, diff
    # the adapter matters (otherwise the comparison above proves nothing)
    plain = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).eval()
    assert float((_logits(plain) - theirs).abs().max()) > 1e-2
    assert summary["tensors_changed"] == 3 * len(TARGETS)


def test_config_and_index_list_the_expanded_stack(llama_base, unloaded):
    out, _ = unloaded
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert json.loads((llama_base / "config.json").read_text())["num_hidden_layers"] == 2
    tensors = load_output(out)
    base = load_output(llama_base)
    per_layer = {k.split(".", 3)[3] for k in base if k.startswith(L + ".0.")}
    expected = {k for k in base if not k.startswith(L + ".")} | {f"{L}.{j}.{p}" for j in range(3) for p in per_layer}
    assert set(tensors) == expected
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, shard in index["weight_map"].items():
        from safetensors import safe_open

        with safe_open(str(out / shard), "pt") as f:
            assert name in f.keys()


def test_each_replica_gets_its_own_delta(llama_base, replicated, unloaded):
    out, _ = unloaded
    tensors = load_output(out)
    base = {k: v.float() for k, v in load_output(llama_base).items()}
    pm = _peft_model(llama_base, replicated)
    layers = pm.base_model.model.model.layers
    mapping = [0, 1, 1]
    for j, src in enumerate(mapping):
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            module = layers[j].get_submodule(proj)
            expected = base[f"{L}.{src}.{proj}.weight"] + module.get_delta_weight("default").float()
            torch.testing.assert_close(tensors[f"{L}.{j}.{proj}.weight"], expected, rtol=0, atol=1e-6)
        # untouched tensors of a replica are exact copies of the source layer
        assert torch.equal(tensors[f"{L}.{j}.input_layernorm.weight"], base[f"{L}.{src}.input_layernorm.weight"])
        assert torch.equal(tensors[f"{L}.{j}.self_attn.q_proj.bias"], base[f"{L}.{src}.self_attn.q_proj.bias"])
    # the two copies of base layer 1 differ by their own deltas
    q1, q2 = tensors[f"{L}.1.self_attn.q_proj.weight"], tensors[f"{L}.2.self_attn.q_proj.weight"]
    assert float((q1 - q2).abs().max()) > 1e-3


def test_peft_merge_and_unload_is_wrong(llama_base, replicated, unloaded):
    """Why adaptool does not copy PEFT here: its merge adds both replicas' deltas into the shared weight."""
    out, _ = unloaded
    pm = _peft_model(llama_base, replicated)
    reference = _logits(pm)
    merged = pm.merge_and_unload()
    layers = merged.model.layers
    w1, w2 = layers[1].self_attn.q_proj.weight, layers[2].self_attn.q_proj.weight
    assert w1.data_ptr() == w2.data_ptr()  # still one shared tensor
    ours = load_output(out)
    base = load_output(llama_base)[f"{L}.1.self_attn.q_proj.weight"].float()
    both = ours[f"{L}.1.self_attn.q_proj.weight"] + ours[f"{L}.2.self_attn.q_proj.weight"] - base
    torch.testing.assert_close(w1.detach(), both, rtol=0, atol=1e-5)  # W + Δ1 + Δ2
    assert float((_logits(merged) - reference).abs().max()) > 1e-3


def test_bf16_output_rounds_once(llama_base, replicated, tmp_path):
    """Default dtype (the base's bf16): each replica is fp32(W) + Δ rounded once, like PEFT's unsafe merge."""
    out = tmp_path / "out"
    unload(str(llama_base), [str(replicated)], out, device="cpu")
    tensors = load_output(out)
    base = load_output(llama_base)
    pm = _peft_model(llama_base, replicated)
    layers = pm.base_model.model.model.layers
    for j, src in enumerate([0, 1, 1]):
        w = base[f"{L}.{src}.self_attn.v_proj.weight"]
        delta = layers[j].self_attn.v_proj.get_delta_weight("default").float()
        got = tensors[f"{L}.{j}.self_attn.v_proj.weight"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, (w.float() + delta).to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_refused_with_another_adapter(llama_base, replicated, tmp_path):
    other = make_adapter(llama_base, tmp_path / "plain", r=4, target_modules=["q_proj"])
    with pytest.raises(AdaptoolError, match="layer_replication"):
        unload(str(llama_base), [str(replicated), str(other)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refused_when_ranges_do_not_fit_the_base(llama_base, replicated, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(replicated, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 2], [1, 3]]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaptoolError, match=r"range \[1, 3\) is outside the base's 2 layers"):
        unload(str(llama_base), [str(bad)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_paths_still_refuse_it(replicated):
    """Outside ``unload`` the expanded indices mean nothing: merging such an adapter is refused."""
    from adaptool.adapters.lora import lora_modules
    from adaptool.io.adapter_folder import AdapterFolder

    with pytest.raises(AdaptoolError, match="layer_replication"):
        lora_modules(AdapterFolder.open(replicated))
