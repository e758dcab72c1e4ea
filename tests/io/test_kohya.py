"""kohya / LyCORIS single-file adapters: converted from PEFT adapters here, folded, compared with PEFT's merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_same_model, load_output, make_adapter, peft_merged, run_cli

from adaptool.errors import AdaptoolError
from adaptool.commands.unload import split_sources, unload

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


def peft_ranks_alphas(base, adapter) -> dict[str, tuple[int, float]]:
    """{module path: (r, alpha)} as PEFT itself resolves them (patterns included): the oracle for the conversion."""
    from peft import PeftModel
    from peft.tuners.lycoris_utils import LycorisLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, BaseTunerLayer) and "default" in getattr(module, "r", {}):
            alpha = module.alpha["default"] if isinstance(module, LycorisLayer) else module.lora_alpha["default"]
            out[name] = (module.r["default"], alpha)
    return out


def to_kohya(base, adapter, dest: Path, prefix: str = "lora_", drop_model: bool = False, alpha_of=None) -> Path:
    """Rewrite a PEFT adapter as one kohya/LyCORIS file: ``prefix`` + path with '_' for '.', lora_A/B as
    lora_down/lora_up, one ``.alpha`` per module. ``alpha_of(path, r, alpha)`` returns the alpha tensor to store,
    or None to leave it out."""
    from safetensors.torch import load_file, save_file

    ranks_alphas = peft_ranks_alphas(base, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, t in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        path, _, suffix = key.partition(".lora_") if ".lora_" in key else key.rpartition(".")
        suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(suffix, suffix)
        flat = (path.removeprefix("model.") if drop_model else path).replace(".", "_")
        out[f"{prefix}{flat}.{suffix}"] = t
        r, alpha = ranks_alphas[path]
        value = torch.tensor(float(alpha)) if alpha_of is None else alpha_of(path, r, alpha)
        if value is not None:
            out[f"{prefix}{flat}.alpha"] = value
    save_file(out, str(dest), metadata={"ss_network_module": "networks.lora"})
    return dest


def base_tensors(base):
    return load_output(base)


@pytest.mark.parametrize("prefix,drop_model", [("lora_", False), ("lora_transformer_", True), ("lora_unet_", False)])
def test_kohya_lora_bit_identical(llama_base, tmp_path, prefix, drop_model):
    """Per-module ranks and alphas (also alpha missing, and alpha 0, both meaning alpha = r)."""
    adapter = make_adapter(llama_base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=LLAMA_LINEAR,
                           rank_pattern={"q_proj": 2, "down_proj": 3},
                           alpha_pattern={"v_proj": 32, "layers.1.mlp.down_proj": 1.5, "k_proj": 4})

    def alpha_of(path, r, alpha):
        if path == "model.layers.0.self_attn.k_proj":
            assert alpha == r
            return None  # kohya: no alpha -> alpha = r
        if path == "model.layers.1.self_attn.k_proj":
            assert alpha == r
            return torch.tensor(0.0, dtype=torch.bfloat16)  # alpha 0 -> alpha = r as well
        return torch.tensor(float(alpha), dtype=torch.bfloat16 if "mlp" in path else torch.float32)

    kfile = to_kohya(llama_base, adapter, tmp_path / "kohya.safetensors", prefix, drop_model, alpha_of)
    from safetensors import safe_open

    with safe_open(str(kfile), "pt") as f:
        keys = set(f.keys())
        flat = "layers_1_mlp_down_proj" if drop_model else "model_layers_1_mlp_down_proj"
        assert float(f.get_tensor(f"{prefix}{flat}.alpha")) == 1.5
        assert f"{prefix}{'layers_0_self_attn_k_proj' if drop_model else 'model_layers_0_self_attn_k_proj'}.alpha" not in keys
    assert not any("lora_A" in k for k in keys)

    out = tmp_path / "out"
    summary = unload(str(llama_base), [str(kfile)], out)
    ours = load_output(out)
    assert_same_model(ours, peft_merged(llama_base, [adapter]), max_ulp=0)
    assert summary["tensors_changed"] == 14
    base = base_tensors(llama_base)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        assert not torch.equal(base[name], ours[name]), name
    assert torch.equal(base["lm_head.weight"], ours["lm_head.weight"])


def test_kohya_alpha_changes_the_result(llama_base, tmp_path):
    """The .alpha tensor is read: the same factors with alpha doubled fold a delta twice as large."""
    adapter = make_adapter(llama_base, tmp_path / "peft", dtype=torch.float32, r=4, lora_alpha=8, target_modules=["q_proj"])
    one = to_kohya(llama_base, adapter, tmp_path / "one.safetensors")
    two = to_kohya(llama_base, adapter, tmp_path / "two.safetensors", alpha_of=lambda p, r, a: torch.tensor(2.0 * a))
    unload(str(llama_base), [str(one)], tmp_path / "o1", dtype="float32")
    unload(str(llama_base), [str(two)], tmp_path / "o2", dtype="float32")
    key = "model.layers.0.self_attn.q_proj.weight"
    w = base_tensors(llama_base)[key].float()
    d1, d2 = load_output(tmp_path / "o1")[key] - w, load_output(tmp_path / "o2")[key] - w
    assert d1.abs().max() > 1e-3
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-5, atol=1e-6)


def test_kohya_loha_bit_identical(llama_base, tmp_path):
    from peft import LoHaConfig
    from conftest import make_peft_adapter

    config = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3, "layers.1.self_attn.q_proj": 20})
    adapter = make_peft_adapter(llama_base, tmp_path / "peft", config)
    kfile = to_kohya(llama_base, adapter, tmp_path / "loha.safetensors", prefix="lycoris_")
    out = tmp_path / "out"
    unload(str(llama_base), [str(kfile)], out)
    ours = load_output(out)
    assert_same_model(ours, peft_merged(llama_base, [adapter]), max_ulp=0)
    key = "model.layers.1.self_attn.q_proj.weight"
    assert (ours[key].float() - base_tensors(llama_base)[key].float()).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs", [dict(r=2, alpha=6, decompose_both=True), dict(r=3, alpha=5)])
def test_kohya_lokr_factored_bit_identical(llama_base, tmp_path, kwargs):
    from peft import LoKrConfig
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(llama_base, tmp_path / "peft",
                                LoKrConfig(target_modules=["q_proj", "down_proj"], init_weights=False, **kwargs))
    kfile = to_kohya(llama_base, adapter, tmp_path / "lokr.safetensors")
    with_w2_a = [k for k in _keys(kfile) if k.endswith(".lokr_w2_a")]
    assert with_w2_a  # factored: alpha / r applies
    out = tmp_path / "out"
    unload(str(llama_base), [str(kfile)], out)
    assert_same_model(load_output(out), peft_merged(llama_base, [adapter]), max_ulp=0)


def test_kohya_lokr_whole_factors_scale_one(llama_base, tmp_path):
    """LyCORIS: both LoKr factors whole means scale 1, whatever .alpha says (PEFT: alpha / r, so r == alpha here)."""
    from peft import LoKrConfig
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(llama_base, tmp_path / "peft",
                                LoKrConfig(r=8, alpha=8, target_modules=["q_proj", "o_proj"], init_weights=False))
    kfile = to_kohya(llama_base, adapter, tmp_path / "lokr.safetensors", alpha_of=lambda p, r, a: torch.tensor(3.0))
    assert {k.rsplit(".", 1)[1] for k in _keys(kfile)} == {"lokr_w1", "lokr_w2", "alpha"}
    out = tmp_path / "out"
    unload(str(llama_base), [str(kfile)], out)
    assert_same_model(load_output(out), peft_merged(llama_base, [adapter]), max_ulp=0)


def test_kohya_folder_and_cli(llama_base, tmp_path):
    """A folder holding just the kohya file works too, through the CLI; the model card names the file's type."""
    adapter = make_adapter(llama_base, tmp_path / "peft", r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"])
    folder = tmp_path / "kohya"
    folder.mkdir()
    to_kohya(llama_base, adapter, folder / "my_lora.safetensors")
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{folder}", "-o", str(out))
    assert rc == 0, stderr
    assert_same_model(load_output(out), peft_merged(llama_base, [adapter]), max_ulp=0)
    assert "| LORA |" in (out / "README.md").read_text()


def _keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# --------------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def kohya_lora(llama_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("kohya")
    adapter = make_adapter(llama_base, d / "peft", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return to_kohya(llama_base, adapter, d / "k.safetensors")


def _rewrite(src, dest, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dest))
    return dest


def test_unmatched_module_is_named(llama_base, kohya_lora, tmp_path):
    def rename(t):
        for k in [k for k in t if "layers_1_self_attn_q_proj" in k]:
            t[k.replace("layers_1_self_attn_q_proj", "layers_7_self_attn_q_proj")] = t.pop(k)

    bad = _rewrite(kohya_lora, tmp_path / "bad.safetensors", rename)
    with pytest.raises(AdaptoolError, match="lora_model_layers_7_self_attn_q_proj matches no module of the base"):
        unload(str(llama_base), [str(bad)], tmp_path / "out")
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{bad}", "-o", str(tmp_path / "out"))
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "lora_model_layers_7_self_attn_q_proj" in lines[0], stderr
    assert not (tmp_path / "out").exists()


def test_no_recognisable_keys(llama_base, tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    save_file({"foo.bar": torch.zeros(2, 2), "emb_params": torch.zeros(3)}, str(junk))
    with pytest.raises(AdaptoolError, match="no kohya/LyCORIS adapter keys"):
        unload(str(llama_base), [str(junk)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refusals(llama_base, kohya_lora, tmp_path):
    def cases():
        yield "lora_mid", lambda t: t.__setitem__("lora_model_layers_0_self_attn_q_proj.lora_mid.weight", torch.zeros(4, 4, 3, 3))
        yield "dora_scale", lambda t: t.__setitem__("lora_model_layers_0_self_attn_q_proj.dora_scale", torch.ones(64, 1))
        yield "not a kohya/LyCORIS tensor", lambda t: t.__setitem__("lora_model_layers_0_self_attn_q_proj.extra", torch.ones(1))
        yield "has no lora_model_layers_0_self_attn_q_proj.lora_up.weight", \
            lambda t: t.pop("lora_model_layers_0_self_attn_q_proj.lora_up.weight")
        yield "mixes LOHA and LORA", lambda t: t.__setitem__("lora_model_layers_0_mlp_up_proj.hada_w1_a", torch.ones(128, 2))

    for needle, edit in cases():
        bad = _rewrite(kohya_lora, tmp_path / "bad.safetensors", edit)
        with pytest.raises(AdaptoolError, match=needle.replace("(", r"\(")):
            unload(str(llama_base), [str(bad)], tmp_path / "out")
    # a PEFT weights file given on its own is pointed back at its folder
    peft = make_adapter(llama_base, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(AdaptoolError, match="PEFT adapter's folder"):
        unload(str(llama_base), [str(peft / "adapter_model.safetensors")], tmp_path / "out")


def test_kohya_needs_a_base(llama_base, kohya_lora, tmp_path):
    base, adapters = split_sources(str(kohya_lora))
    assert base is None and adapters == [str(kohya_lora)]
    assert split_sources(f"{llama_base}+{kohya_lora}") == (str(llama_base), [str(kohya_lora)])
    with pytest.raises(AdaptoolError, match="needs the base model"):
        unload(None, [str(kohya_lora)], tmp_path / "out")


def test_ambiguous_flattening(tmp_path):
    """Two base modules that flatten to the same name: refused, naming both."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    save_file({"a.b_c.weight": torch.zeros(4, 4), "a_b.c.weight": torch.zeros(4, 4)}, str(base / "model.safetensors"))
    k = tmp_path / "k.safetensors"
    save_file({"lora_a_b_c.lora_down.weight": torch.ones(1, 4), "lora_a_b_c.lora_up.weight": torch.ones(4, 1)}, str(k))
    with pytest.raises(AdaptoolError, match=r"could be any of a\.b_c, a_b\.c"):
        unload(str(base), [str(k)], tmp_path / "out")


def test_kohya_locon_conv2d(tmp_path):
    """A diffusers-like net: lora_unet_ keys onto Conv2d 3x3 (lora_up 1x1), Conv2d 1x1 and Linear, module names
    with '_' inside (down_blocks.0.conv_in). conv2d's float32 sums depend on threads, so float32-close."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(3, 8, 3)
            self.proj_out = torch.nn.Conv2d(8, 6, 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_blocks = torch.nn.ModuleList([Block()])
            self.time_head = torch.nn.Linear(6, 4)

    torch.manual_seed(0)
    net = Net()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base / "diffusion_pytorch_model.safetensors"))
    config = LoraConfig(r=2, lora_alpha=4, alpha_pattern={"time_head": 3}, target_modules=["conv_in", "proj_out", "time_head"],
                        init_lora_weights=False)
    pm = get_peft_model(Net().requires_grad_(False), config)
    pm.base_model.model.load_state_dict(net.state_dict(), strict=False)
    pm.save_pretrained(tmp_path / "peft")
    kohya = {}
    for key, t in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items():
        path, _, suffix = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        flat = "lora_unet_" + path.replace(".", "_")
        kohya[f"{flat}.lora_{'down' if suffix == 'A.weight' else 'up'}.weight"] = t
        kohya[f"{flat}.alpha"] = torch.tensor(3.0 if path == "time_head" else 4.0, dtype=torch.float16)
    assert kohya["lora_unet_down_blocks_0_conv_in.lora_up.weight"].shape == (8, 2, 1, 1)
    kfile = tmp_path / "locon.safetensors"
    save_file(kohya, str(kfile))
    fresh = Net()
    fresh.load_state_dict(net.state_dict())
    reference = PeftModel.from_pretrained(fresh, tmp_path / "peft").merge_and_unload().state_dict()
    out = tmp_path / "out"
    unload(str(base), [str(kfile)], out)
    ours = load_output(out)
    assert set(ours) == set(reference)
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], rtol=0, atol=1e-6)
    assert torch.equal(ours["down_blocks.0.proj_out.weight"], reference["down_blocks.0.proj_out.weight"])
    assert torch.equal(ours["time_head.weight"], reference["time_head.weight"])
    assert (ours["down_blocks.0.conv_in.weight"] - net.state_dict()["down_blocks.0.conv_in.weight"]).abs().max() > 1e-3


def test_kohya_file_read_once_hashed_and_checked(llama_base, kohya_lora, tmp_path, monkeypatch):
    """A kohya file is an Adapter like a PEFT folder: one read serves alphas, digest, finite check and tensors."""
    import hashlib

    from safetensors.torch import load_file

    import adaptool.io.weights_buffer as wb
    from adaptool.adapters.source import Adapter
    from adaptool.io.checkpoint import Checkpoint
    from adaptool.io.kohya import open_kohya

    opened, real = [], wb.open_regular
    monkeypatch.setattr(wb, "open_regular", lambda p, *a: opened.append(p) or real(p, *a))
    k = open_kohya(kohya_lora, Checkpoint.open(llama_base))
    assert isinstance(k, Adapter) and k.settings.peft_type == "LORA" and k.settings.rank_for(
        "model.layers.0.self_attn.q_proj") == 4
    k.check_finite()
    assert k.sha256() == hashlib.sha256(kohya_lora.read_bytes()).hexdigest()
    stored = load_file(str(kohya_lora))
    assert torch.equal(k.load("model.layers.0.self_attn.q_proj.lora_A.weight"),
                       stored["lora_model_layers_0_self_attn_q_proj.lora_down.weight"])
    assert len(opened) == 1

    bad = _rewrite(kohya_lora, tmp_path / "nan.safetensors",
                   lambda t: t["lora_model_layers_1_self_attn_v_proj.lora_up.weight"].fill_(float("nan")))
    with pytest.raises(AdaptoolError, match=r"nan.safetensors: tensor model.layers.1.self_attn.v_proj.lora_B.weight "
                                            "contains NaN or Inf"):
        open_kohya(bad, Checkpoint.open(llama_base)).check_finite()
