"""LoHa, LoKr, IA3, AdaLoRA and OFT folded by adaptool against PEFT's merge_and_unload, tensor by tensor.

Every adapter is built by PEFT with random (non-identity) weights, saved, unloaded by adaptool, and compared
with PEFT's merged state dict; the output is then reloaded with transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_model, load_output, make_peft_adapter, peft_merged, save_model, tiny_llama_config

from adaptool.errors import AdaptoolError
from adaptool.commands.unload import unload

ATTN = ["q_proj", "k_proj", "v_proj"]


def unload_and_compare(base, adapter, out, exact: bool = True, dtype=torch.bfloat16) -> None:
    """adaptool's output must equal PEFT's merge bit for bit (``exact``) or up to float32 summation order
    (:func:`assert_close_to_scale`), also after a transformers reload."""
    from transformers import AutoModelForCausalLM

    unload(str(base), [str(adapter)], out)
    ours, reference = load_output(out), peft_merged(base, [adapter], dtype=dtype)
    reloaded = dict(AutoModelForCausalLM.from_pretrained(out).state_dict())
    for got in (ours, reloaded):
        if exact:
            assert_same_model(got, reference, max_ulp=0)
        else:
            assert_close_to_scale(got, reference)


def assert_close_to_scale(ours: dict, reference: dict, min_equal: float = 0.999) -> None:
    """Equal but for the order of float32 sums: each element within one ulp of its tensor's largest magnitude
    (an element that cancels to near zero can be many ulps of itself apart), nearly all of them bit-equal.

    Where adaptool multiplies by a block-diagonal rotation block by block and PEFT by the dense matrix, the
    BLAS may order the sums differently; which elements differ depends on the CPU.
    """
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    equal = total = 0
    for k, ref in reference.items():
        assert ours[k].dtype == ref.dtype and ours[k].shape == ref.shape, k
        scale = float(ref.float().abs().max())
        ulp = scale * torch.finfo(ref.dtype).eps if scale else 0.0  # eps = ulp of 1, so this bounds the top ulp
        diff = float((ours[k].double() - ref.double()).abs().max())
        assert diff <= ulp, f"{k}: {diff} apart, more than {ulp}"
        equal += int((ours[k] == ref).sum())
        total += ref.numel()
    assert equal >= min_equal * total, f"only {equal} of {total} elements bit-equal"


def changed(base, out, name: str) -> float:
    """Largest change adaptool made to tensor ``name`` (the merge must not be a no-op for the test to mean anything)."""
    return float((load_output(out)[name].float() - load_output(base)[name].float()).abs().max())


def saved_keys(adapter) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.") for k in f.keys()}


# ---------------------------------------------------------------------------------------------------------- LoHa


def test_loha_linear_with_patterns(llama_base, tmp_path):
    from peft import LoHaConfig

    config = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3, "layers.1.self_attn.q_proj": 20},
                        modules_to_save=["lm_head"])
    adapter = make_peft_adapter(llama_base, tmp_path / "a", config)
    assert tuple(_shape(adapter, "model.layers.0.mlp.down_proj.hada_w1_a")) == (64, 2)
    out = tmp_path / "out"
    unload_and_compare(llama_base, adapter, out)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        assert changed(llama_base, out, name) > 1e-2


# ---------------------------------------------------------------------------------------------------------- LoKr


@pytest.mark.parametrize(
    "name,kwargs,expected_keys",
    [
        # r large enough that PEFT saves both factors whole (scale is still alpha / r)
        ("full", dict(r=8, alpha=4), {".lokr_w1", ".lokr_w2"}),
        # decompose_both with a small r factors both sides everywhere
        ("decompose_both", dict(r=2, alpha=6, decompose_both=True), {".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b"}),
        # decompose_factor=4 gives unsorted factors (64 -> (4, 16)); the rank pattern makes q_proj's w2 whole
        ("factor", dict(r=3, alpha=5, decompose_factor=4, rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 1}),
         {".lokr_w1", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b"}),
    ],
)
def test_lokr(llama_base, tmp_path, name, kwargs, expected_keys):
    from peft import LoKrConfig

    config = LoKrConfig(target_modules=["q_proj", "o_proj", "down_proj"], init_weights=False, **kwargs)
    adapter = make_peft_adapter(llama_base, tmp_path / name, config)
    suffixes = {"." + k.rsplit(".", 1)[1] for k in saved_keys(adapter)}
    assert suffixes == expected_keys
    out = tmp_path / "out"
    unload_and_compare(llama_base, adapter, out)
    assert changed(llama_base, out, "model.layers.1.mlp.down_proj.weight") > 1e-3


# ----------------------------------------------------------------------------------------------------------- IA3


@pytest.mark.parametrize("feedforward", [["down_proj"], r".*\.mlp\.down_proj"])
def test_ia3_scales_rows_columns_and_bias(llama_base, tmp_path, feedforward):
    """q/k/v are not feedforward: their output rows and their biases scale; down_proj scales input columns."""
    from peft import IA3Config

    config = IA3Config(target_modules=[*ATTN, "down_proj"], feedforward_modules=feedforward, init_ia3_weights=False)
    adapter = make_peft_adapter(llama_base, tmp_path / "a", config)
    out = tmp_path / "out"
    unload_and_compare(llama_base, adapter, out)
    ours, base = load_output(out), load_output(llama_base)
    l_q = _load(adapter, "model.layers.0.self_attn.q_proj.ia3_l")  # (64, 1)
    l_down = _load(adapter, "model.layers.0.mlp.down_proj.ia3_l")  # (1, 128)
    assert l_q.shape == (64, 1) and l_down.shape == (1, 128)
    q = "model.layers.0.self_attn.q_proj."
    assert torch.equal(ours[q + "weight"], (base[q + "weight"].float() * l_q).bfloat16())
    assert torch.equal(ours[q + "bias"], (base[q + "bias"].float() * l_q.view(-1)).bfloat16())
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(ours[down], (base[down].float() * l_down).bfloat16())
    assert torch.equal(ours["model.layers.0.self_attn.o_proj.bias"], base["model.layers.0.self_attn.o_proj.bias"])


# ------------------------------------------------------------------------------------------------------- AdaLoRA


def _adalora_config(init_r: int = 6, **kwargs):
    from peft import AdaLoraConfig

    kwargs.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    return AdaLoraConfig(init_r=init_r, target_r=2, lora_alpha=16, total_step=10, init_lora_weights=False, **kwargs)


def test_adalora(llama_base, tmp_path):
    adapter = make_peft_adapter(llama_base, tmp_path / "a", _adalora_config())
    out = tmp_path / "out"
    unload_and_compare(llama_base, adapter, out)
    assert changed(llama_base, out, "model.layers.0.self_attn.v_proj.weight") > 1e-2


def test_adalora_ranknum_rounds_through_base_dtype(llama_base, tmp_path):
    """PEFT casts ranknum to the base weight's dtype before upcasting it: init_r=257 on bf16 divides by 256."""
    adapter = make_peft_adapter(llama_base, tmp_path / "a", _adalora_config(init_r=257, target_modules=["q_proj"]))
    unload_and_compare(llama_base, adapter, tmp_path / "out")


def test_adalora_pruned_rank_pattern(llama_base, tmp_path):
    """What AdaLoRA saves after rank allocation: per-module boolean masks, the kept triplets only, and a divisor
    that stays init_r (not the kept rank). One module keeps 2 of 6, one keeps nothing."""
    from safetensors.torch import load_file, save_file

    adapter = make_peft_adapter(llama_base, tmp_path / "a", _adalora_config())
    masks = {"model.layers.0.self_attn.q_proj": [True, False, False, True, False, False],
             "model.layers.1.mlp.down_proj": [False] * 6,
             "model.layers.1.self_attn.v_proj": [True] * 6}
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for path, mask in masks.items():
        keep = torch.tensor(mask)
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A"] = tensors[f"{prefix}.lora_A"][keep].contiguous()
        tensors[f"{prefix}.lora_E"] = tensors[f"{prefix}.lora_E"][keep].contiguous()
        tensors[f"{prefix}.lora_B"] = tensors[f"{prefix}.lora_B"][:, keep].contiguous()
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {f"{p}.lora_E": m for p, m in masks.items()}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))

    out = tmp_path / "out"
    unload_and_compare(llama_base, adapter, out)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert changed(llama_base, out, q) > 1e-2
    assert changed(llama_base, out, "model.layers.1.mlp.down_proj.weight") == 0
    # the divisor is init_r: a divisor of the kept rank (2) would triple the delta
    a, e, b = (_load_raw(tensors, f"base_model.model.model.layers.0.self_attn.q_proj.lora_{s}") for s in "AEB")
    delta = (b @ (a * e)) * 16 / (torch.full((1,), 6.0) + 1e-5)
    base_q = load_output(llama_base)[q].float()
    assert torch.equal(load_output(out)[q], (base_q + delta).bfloat16())


# ----------------------------------------------------------------------------------------------------------- OFT


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("default", dict(oft_block_size=16)),  # Cayley-Neumann, 5 terms: PEFT's default
        ("r_and_embedding", dict(r=4, oft_block_size=0, target_modules=["q_proj", "down_proj", "embed_tokens"])),
        ("exact_cayley", dict(oft_block_size=8, use_cayley_neumann=False)),
        ("neumann_3_terms", dict(oft_block_size=8, num_cayley_neumann_terms=3)),
        ("block_share", dict(oft_block_size=16, block_share=True)),
        ("coft", dict(oft_block_size=16, coft=True, eps=0.3)),
    ],
)
def test_oft(llama_base, tmp_path, name, kwargs):
    from peft import OFTConfig

    kwargs.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    adapter = make_peft_adapter(llama_base, tmp_path / name, OFTConfig(init_weights=False, **kwargs))
    out = tmp_path / "out"
    # bit-identical on the CPUs we measured (blocks of up to 64); see assert_close_to_scale for why not always
    unload_and_compare(llama_base, adapter, out, exact=False)
    assert changed(llama_base, out, "model.layers.0.self_attn.q_proj.weight") > 1e-3
    if "embed_tokens" in kwargs["target_modules"]:
        assert changed(llama_base, out, "model.embed_tokens.weight") > 1e-3


# ------------------------------------------------------------------------------------------ GPT-2 Conv1D (in, out)


@pytest.fixture(scope="module")
def gpt2_biased(gpt2_base, tmp_path_factory):
    """The GPT-2 fixture with non-zero biases (GPT-2 initialises them to zero, which would hide IA3's bias rule)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_base)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return save_model(model, tmp_path_factory.mktemp("gpt2_biased") / "base", shard=None)


@pytest.mark.parametrize("kind", ["ia3", "adalora"])
def test_gpt2_conv1d(gpt2_biased, tmp_path, kind):
    """Conv1D keeps (in, out) weights: IA3 scales the other axis, AdaLoRA's delta is transposed."""
    from peft import IA3Config

    if kind == "ia3":
        config = IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj", "c_fc"],
                           feedforward_modules=["mlp.c_proj"], init_ia3_weights=False)
    else:
        config = _adalora_config(target_modules=["c_attn", "c_proj", "c_fc"])
    adapter = make_peft_adapter(gpt2_biased, tmp_path / kind, config, dtype=torch.float32)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    out = tmp_path / "out"
    unload_and_compare(gpt2_biased, adapter, out, dtype=torch.float32)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert changed(gpt2_biased, out, name) > 1e-4
    if kind == "ia3":  # attn.c_proj is not feedforward: its bias scales; mlp.c_proj's does not
        assert changed(gpt2_biased, out, "transformer.h.0.attn.c_proj.bias") > 1e-3
        assert changed(gpt2_biased, out, "transformer.h.0.mlp.c_proj.bias") == 0
        # feedforward on a (in, out) weight scales its rows (the input features)
        l_ff = _load(adapter, "transformer.h.0.mlp.c_proj.ia3_l")  # (1, in)
        w = load_output(gpt2_biased)["transformer.h.0.mlp.c_proj.weight"]
        assert torch.equal(load_output(out)["transformer.h.0.mlp.c_proj.weight"], w * l_ff.T)


# ---------------------------------------------------------------------------------------------------- convs


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.point = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6, 4)


class OtherConvNet(torch.nn.Module):
    """Conv1d (3 and 1 wide), a Conv3d and a grouped Conv2d."""

    def __init__(self):
        super().__init__()
        self.seq = torch.nn.Conv1d(4, 8, 3)
        self.seq_point = torch.nn.Conv1d(8, 8, 1)
        self.vol = torch.nn.Conv3d(2, 4, 2)
        self.grouped = torch.nn.Conv2d(4, 8, 3, groups=2)


def save_conv_model(tmp_path, net_cls, config):
    """A custom model saved as safetensors only (no transformers config) and a PEFT adapter for it."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = net_cls()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base / "model.safetensors"))
    torch.manual_seed(1)
    pm = get_peft_model(net_cls().requires_grad_(False), config)
    pm.base_model.model.load_state_dict(net.state_dict(), strict=False)
    pm.save_pretrained(tmp_path / "a")
    return net, base, tmp_path / "a"


def conv_parity(tmp_path, net_cls, config, exact: bool = True):
    """Fold ``config``'s adapter into a custom conv model; compare with PEFT's merge of it.

    Returns (our tensors, the adapter's keys, the weights PEFT's merge changed).
    """
    from peft import PeftModel

    net, base, adapter = save_conv_model(tmp_path, net_cls, config)
    fresh = net_cls()
    fresh.load_state_dict(net.state_dict())
    reference = PeftModel.from_pretrained(fresh, adapter).merge_and_unload().state_dict()
    unload(str(base), [str(adapter)], tmp_path / "out")
    ours = load_output(tmp_path / "out")
    if exact:
        assert_same_model(ours, reference, max_ulp=0)
    else:  # a float32 base shows the summation-order noise that bf16 rounding mostly hides
        assert_close_to_scale(ours, reference, min_equal=0.5)
    targets = [k for k in reference if k.endswith(".weight") and not torch.equal(reference[k], net.state_dict()[k])]
    return ours, saved_keys(adapter), targets


def _conv_configs():
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    targets = ["conv", "point", "head"]
    return {
        "loha": LoHaConfig(r=2, alpha=4, target_modules=targets, init_weights=False),
        "loha_effective": LoHaConfig(r=2, alpha=4, target_modules=targets, init_weights=False, use_effective_conv2d=True),
        "lokr": LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False, decompose_both=True),
        "lokr_effective": LoKrConfig(r=1, alpha=3, target_modules=targets, init_weights=False, use_effective_conv2d=True),
        "ia3": IA3Config(target_modules=targets, feedforward_modules=["point"], init_ia3_weights=False),
        "adalora": AdaLoraConfig(init_r=3, target_r=1, lora_alpha=4, total_step=10, target_modules=targets,
                                 init_lora_weights=False),
        "oft": OFTConfig(oft_block_size=6, target_modules=["conv", "head"], init_weights=False),
    }


@pytest.mark.parametrize("kind", ["loha", "loha_effective", "lokr", "lokr_effective", "ia3", "adalora", "oft"])
def test_conv2d(tmp_path, kind):
    """A custom model with a 3x3 and a 1x1 Conv2d (safetensors base, no transformers config)."""
    _, keys, targets = conv_parity(tmp_path, ConvNet, _conv_configs()[kind], exact=kind != "oft")
    if kind.endswith("_effective"):
        assert any(k.endswith((".lokr_t2", ".hada_t1")) for k in keys)
    assert "conv.weight" in targets


def _other_conv_configs():
    from peft import IA3Config, LoHaConfig, LoKrConfig

    seq = ["seq", "seq_point"]
    return {
        "loha": LoHaConfig(r=2, alpha=4, target_modules=seq, init_weights=False),
        "loha_effective": LoHaConfig(r=2, alpha=4, target_modules=seq, init_weights=False, use_effective_conv2d=True),
        # r=8 keeps w2 whole: (out_k, in_n, k), which PEFT's torch.kron pairs with a 2-D w1 in its own way
        "lokr_whole": LoKrConfig(r=8, alpha=4, target_modules=seq, init_weights=False),
        "lokr_factored": LoKrConfig(r=1, alpha=4, target_modules=seq, init_weights=False, decompose_both=True),
        "ia3_conv3d_grouped": IA3Config(target_modules=["vol", "grouped"], feedforward_modules=["grouped"],
                                        init_ia3_weights=False),
        "ia3_conv3d_ff": IA3Config(target_modules=["vol"], feedforward_modules=["vol"], init_ia3_weights=False),
    }


@pytest.mark.parametrize("kind", ["loha", "loha_effective", "lokr_whole", "lokr_factored", "ia3_conv3d_grouped",
                                  "ia3_conv3d_ff"])
def test_conv1d_conv3d_grouped(tmp_path, kind):
    _, keys, changed_weights = conv_parity(tmp_path, OtherConvNet, _other_conv_configs()[kind])
    expected = {"ia3_conv3d_grouped": {"vol.weight", "grouped.weight"}, "ia3_conv3d_ff": {"vol.weight"}}
    assert set(changed_weights) == expected.get(kind, {"seq.weight", "seq_point.weight"})
    if kind == "lokr_whole":
        assert "seq.lokr_w2" in keys
    if kind.endswith("_effective"):
        assert any(k.endswith(".hada_t1") for k in keys)


# ------------------------------------------------------------------------------------------ streaming row blocks


@pytest.mark.parametrize("kind", ["lokr", "ia3", "loha", "adalora", "oft"])
def test_small_row_blocks_change_nothing(llama_base, tmp_path, monkeypatch, kind):
    """Big tensors stream in row blocks; blocks that cut a Kronecker factor or a scale vector mid-way give the
    same bits as one block (the tiny test weights otherwise always fit one block)."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    from adaptool import engine

    config = {
        "lokr": LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "down_proj"], init_weights=False),
        "ia3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
        "adalora": _adalora_config(),
        "oft": OFTConfig(oft_block_size=16, target_modules=["q_proj", "down_proj"], init_weights=False),
    }[kind]
    adapter = make_peft_adapter(llama_base, tmp_path / "a", config)
    unload(str(llama_base), [str(adapter)], tmp_path / "whole")
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 5 * 128)  # 5 rows of down_proj, 10 of q_proj: never aligned to 8
    unload(str(llama_base), [str(adapter)], tmp_path / "blocks")
    whole, blocks = load_output(tmp_path / "whole"), load_output(tmp_path / "blocks")
    if kind in ("lokr", "ia3"):  # Kronecker rows and scale vectors are exact per element
        assert all(torch.equal(whole[k], blocks[k]) for k in whole)
    else:  # a GEMM of another shape may sum in another order (float32 noise, seen after bf16 rounding)
        assert_close_to_scale(blocks, whole)


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_type_on_cuda_matches_cpu(llama_base, tmp_path):
    from peft import IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    configs = {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
        "lokr": LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "down_proj"], init_weights=False),
        "ia3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
        "adalora": _adalora_config(),
        "oft": OFTConfig(oft_block_size=16, coft=True, eps=0.3, target_modules=["q_proj", "embed_tokens"],
                         init_weights=False),
    }
    for kind, config in configs.items():
        adapter = make_peft_adapter(llama_base, tmp_path / kind, config)
        unload(str(llama_base), [str(adapter)], tmp_path / f"{kind}_cpu", device="cpu")
        unload(str(llama_base), [str(adapter)], tmp_path / f"{kind}_gpu", device="cuda")
        cpu, gpu = load_output(tmp_path / f"{kind}_cpu"), load_output(tmp_path / f"{kind}_gpu")
        for k in cpu:  # GEMM order differs between CPU and GPU: equal up to one rounding of the output dtype
            torch.testing.assert_close(gpu[k].float(), cpu[k].float(), rtol=1e-2, atol=1e-3, msg=f"{kind}: {k}")


# -------------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=32, intermediate_size=64))
    return save_model(model, tmp_path_factory.mktemp("other") / "base", shard=None)


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3", "adalora", "oft"])
def test_adapter_for_another_model_is_refused(llama_base, other_base, tmp_path, kind):
    from peft import IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    config = {
        "loha": LoHaConfig(r=2, alpha=4, target_modules=["q_proj"], init_weights=False),
        "lokr": LoKrConfig(r=2, alpha=4, target_modules=["q_proj"], init_weights=False),
        "ia3": IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False),
        "adalora": _adalora_config(target_modules=["q_proj"]),
        "oft": OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False),
    }[kind]
    adapter = make_peft_adapter(other_base, tmp_path / "a", config)
    out = tmp_path / "out"
    with pytest.raises(AdaptoolError) as err:
        unload(str(llama_base), [str(adapter)], out)
    assert "does not fit the base" in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)
    assert not out.exists()


def test_config_and_files_that_disagree_are_refused(llama_base, tmp_path):
    from peft import IA3Config, LoHaConfig, OFTConfig

    loha = make_peft_adapter(llama_base, tmp_path / "loha", LoHaConfig(r=4, alpha=8, target_modules=["q_proj"],
                                                                       init_weights=False))
    _edit_config(loha, r=8)
    with pytest.raises(AdaptoolError, match="rank 4 on disk but its config says r=8"):
        unload(str(llama_base), [str(loha)], tmp_path / "o1")

    ia3 = make_peft_adapter(llama_base, tmp_path / "ia3", IA3Config(target_modules=["q_proj", "down_proj"],
                                                                    feedforward_modules=["down_proj"]))
    _edit_config(ia3, feedforward_modules=["q_proj"])
    with pytest.raises(AdaptoolError, match="feedforward_modules"):
        unload(str(llama_base), [str(ia3)], tmp_path / "o2")

    oft = make_peft_adapter(llama_base, tmp_path / "oft", OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    _edit_config(oft, drop="oft_block_size")
    with pytest.raises(AdaptoolError, match="before PEFT 0.14"):
        unload(str(llama_base), [str(oft)], tmp_path / "o3")

    _edit_config(oft, peft_type="BOFT")
    with pytest.raises(AdaptoolError, match="BOFT is not supported"):
        unload(str(llama_base), [str(oft)], tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_lokr_effective_conv1d_is_refused(tmp_path):
    """PEFT 0.21.2 saves these adapters but fails in their forward and merge (torch.kron view error)."""
    from peft import LoKrConfig

    config = LoKrConfig(r=1, alpha=4, target_modules=["seq"], init_weights=False, use_effective_conv2d=True)
    _, base, adapter = save_conv_model(tmp_path, OtherConvNet, config)
    with pytest.raises(AdaptoolError, match="LoKr with use_effective_conv2d on seq, a Conv1d, cannot be folded"):
        unload(str(base), [str(adapter)], tmp_path / "out")


def test_oft_on_a_non_square_kernel_is_refused(tmp_path):
    """PEFT trains OFT on a (3, 1) kernel (it sizes R as in·k[0]·k[0]) but cannot merge it: refuse clearly."""
    from peft import OFTConfig

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, (3, 1))

    _, base, adapter = save_conv_model(tmp_path, Net, OFTConfig(oft_block_size=6, target_modules=["conv"]))
    with pytest.raises(AdaptoolError, match="OFT on conv, a Conv2d with a non-square kernel"):
        unload(str(base), [str(adapter)], tmp_path / "out")


# --------------------------------------------------------------------------------------------------- helpers


def _edit_config(adapter, drop: str | None = None, **changes):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    if drop:
        cfg.pop(drop)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def _shape(adapter, key: str):
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return f.get_slice("base_model.model." + key).get_shape()


def _load(adapter, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))["base_model.model." + key].float()


def _load_raw(tensors: dict, key: str) -> torch.Tensor:
    return tensors[key].float()


# --------------------------------------------------------------------------------------------------
# The adapter source: the registry, one protocol, the weights read once.


def test_registry_finds_each_family_and_refuses_others():
    from adaptool.adapters import adalora, family, ia3, loha, lokr, lora, oft
    from adaptool.adapters.source import Adapter  # noqa: F401 (the protocol imports)

    expected = {"LORA": (lora.lora_edits, True), "LOHA": (loha.loha_edits, True), "LOKR": (lokr.lokr_edits, True),
                "IA3": (ia3.ia3_edits, False), "ADALORA": (adalora.adalora_edits, True), "OFT": (oft.oft_edits, False)}
    for peft_type, (edits, additive) in expected.items():
        f = family(peft_type)
        assert (f.peft_type, f.edits, f.additive) == (peft_type, edits, additive)
    assert family("LOHA").own == loha.OWN and family("LORA").own == ()
    assert family("LOHA").is_own("m.q_proj.hada_w1_a") and not family("LOHA").is_own("lm_head.weight")
    assert family("LORA").is_own("m.q_proj.lora_A.weight") and not family("LORA").is_own("m.q_proj.base_layer.bias")
    assert not family("LORA").is_own("m.embed_tokens.token_adapter.trainable_tokens_delta")
    with pytest.raises(AdaptoolError, match=r"^x: adapter type VERA is not supported yet; supported: LORA"):
        family("VERA", "x")


def _count_opens(monkeypatch, path) -> list:
    """Every open of ``path`` through adaptool's regular-file opener, from now on."""
    import adaptool.io.safetensors_file as st
    import adaptool.io.weights_buffer as wb

    opened, real = [], st.open_regular

    def counting(p, *args):
        if str(p) == str(path):
            opened.append(p)
        return real(p, *args)

    monkeypatch.setattr(wb, "open_regular", counting)
    monkeypatch.setattr(st, "open_regular", counting)
    return opened


def test_adapter_bytes_are_read_once(llama_base, tmp_path, monkeypatch):
    """Finite check, digest and every tensor come from one read of the weights file; loads are bit-exact copies."""
    import hashlib

    from conftest import make_adapter
    from safetensors.torch import load_file

    from adaptool.adapters import edits_for
    from adaptool.adapters.source import Adapter
    from adaptool.io.adapter_folder import AdapterFolder
    from adaptool.io.checkpoint import Checkpoint

    adapter = make_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["lm_head"], dtype=torch.float32)
    weights = adapter / "adapter_model.safetensors"
    folder = AdapterFolder.open(adapter)
    assert isinstance(folder, Adapter)
    opened = _count_opens(monkeypatch, weights)
    folder.check_finite()
    digest = folder.sha256()
    edits_for(folder, Checkpoint.open(llama_base))
    stored = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    for name in folder.names:
        t = folder.load(name)
        assert t.dtype == stored[name].dtype and torch.equal(t, stored[name])
        t.zero_()  # the caller owns what load returns
        assert torch.equal(folder.load(name), stored[name])
    assert len(opened) == 1
    assert digest == hashlib.sha256((adapter / "adapter_config.json").read_bytes() + weights.read_bytes()).hexdigest()


def test_non_finite_adapter_is_named_once_checked(llama_base, tmp_path, monkeypatch):
    from conftest import make_adapter
    from safetensors.torch import load_file, save_file

    from adaptool.io.adapter_folder import AdapterFolder

    adapter = make_adapter(llama_base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    bad = sorted(tensors)[1]
    tensors[bad][0, 0] = float("inf")
    save_file(tensors, str(weights))
    folder = AdapterFolder.open(adapter)
    opened = _count_opens(monkeypatch, weights)
    message = rf"^{adapter}: tensor {bad.removeprefix('base_model.model.')} contains NaN or Inf; the adapter is broken"
    for _ in range(2):
        with pytest.raises(AdaptoolError, match=message):
            folder.check_finite()
    assert len(opened) == 1


def test_unaligned_tensor_offsets_load_exactly(tmp_path):
    """A header whose length leaves the data section unaligned (valid safetensors) still loads bit-exact values;
    empty and 0-dim tensors pass the finite check."""
    import struct

    from adaptool.io.adapter_folder import AdapterFolder

    a, b, s = torch.randn(2, 8), torch.randn(8, 2).to(torch.bfloat16), torch.tensor(1.5)
    header = {"base_model.model.m.q_proj.lora_A.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
              "base_model.model.m.q_proj.lora_B.weight": {"dtype": "BF16", "shape": [8, 2], "data_offsets": [64, 96]},
              "empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [96, 96]},
              "scalar": {"dtype": "F32", "shape": [], "data_offsets": [96, 100]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8 + 3)  # 8 + len(raw) is 3 mod 8: every tensor is misaligned
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (d / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes()
        + s.numpy().tobytes())
    folder = AdapterFolder.open(d)
    folder.check_finite()
    assert torch.equal(folder.load("m.q_proj.lora_A.weight"), a)
    assert torch.equal(folder.load("m.q_proj.lora_B.weight"), b)
    assert folder.load("empty").shape == (0, 4) and torch.equal(folder.load("scalar"), s)
