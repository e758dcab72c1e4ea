"""``adaptool edit`` against PEFT: each output is loaded by PEFT (no missing keys), its ΔW per module
(``get_delta_weight``) is the input's times the scale, or gone where dropped, its merged model is the input's with
those changes (``merge_and_unload``), and every tensor it keeps is the input's, bit for bit."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, load_output, make_adapter, make_peft_adapter, peft_merged, run_cli, snapshot

from adaptool.commands.edit import edit, parse_scale
from adaptool.errors import AdaptoolError

L0, L1 = "model.layers.0.", "model.layers.1."


# ----------------------------------------------------------------------------------------------------- oracles


def peft_load(base: Path, adapter: Path):
    """PeftModel on a float32 base, and the warnings PEFT gave while loading."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(model, adapter)
    return pm, [str(w.message) for w in caught]


def deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{module path: ΔW (float64)} as PEFT computes it; asserts PEFT loaded it without missing keys."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pm, said = peft_load(base, adapter)
    assert not [w for w in said if "missing" in w.lower()], said
    out = {}
    with torch.no_grad():
        for name, m in pm.base_model.model.named_modules():
            if isinstance(m, BaseTunerLayer) and "default" in m.active_adapters and hasattr(m, "get_delta_weight"):
                out[name] = m.get_delta_weight("default").double()
    return out


def assert_edited(base: Path, src: Path, out: Path, kept: set, scales: dict[str, float], exact: bool = True):
    """ΔW of the output: the input's times its scale for every kept module (bit for bit when ``exact``), none
    for dropped ones; every tensor the output holds is the input's, bit for bit."""
    before, after = deltas(base, src), deltas(base, out)
    assert set(after) == kept, set(after) ^ kept
    for path, d in after.items():
        want = before[path] * scales.get(path, 1.0)
        if exact:
            assert torch.equal(d, want), path
        else:
            assert float((d - want).norm() / want.norm()) <= 1e-6, path
    mine, theirs = load_output(out), load_output(src)
    assert all(torch.equal(t, theirs[k]) and t.dtype == theirs[k].dtype for k, t in mine.items())
    return mine, theirs


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory) -> Path:
    """LoRA with a rank/alpha pattern (v_proj r 2, alpha 3) and a modules_to_save head."""
    return make_adapter(llama_base, tmp_path_factory.mktemp("edit") / "lora", r=4, lora_alpha=8,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3},
                        target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"])


@pytest.fixture(scope="module")
def rslora(llama_base, tmp_path_factory) -> Path:
    return make_adapter(llama_base, tmp_path_factory.mktemp("edit") / "rslora", r=4, lora_alpha=6, use_rslora=True,
                        target_modules=["q_proj", "o_proj"])


def modules_of(base: Path, adapter: Path) -> set:
    return set(deltas(base, adapter))


# ----------------------------------------------------------------------------------------------------- LoRA


def test_block_weights_kohya_style(llama_base, lora, tmp_path):
    """--scale 'layers\\.0\\.=0.5': layer 0's modules at half strength (bit for bit: 0.5 is a power of two, and
    the first-matching pattern of v_proj is resolved into its exact entry), layer 1 as it was."""
    out = tmp_path / "out"
    summary = edit(str(lora), out, scale=[r"layers\.0\.=0.5"])
    every = modules_of(llama_base, lora)
    halved = {p: 0.5 for p in every if p.startswith(L0)}
    assert summary["scaled"] == halved and summary["dropped"] == []
    assert_edited(llama_base, lora, out, every, halved)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 2}  # ranks as written
    assert config["alpha_pattern"][L0 + "self_attn.v_proj"] == 1.5
    assert config["alpha_pattern"][L1 + "self_attn.v_proj"] == 3
    assert config["target_modules"] == json.loads((lora / "adapter_config.json").read_text())["target_modules"]


def test_negation_and_first_match(llama_base, lora, rslora, tmp_path):
    """--scale -1 negates every ΔW exactly (plain, patterned and rsLoRA modules); with several rules the first
    that matches decides (down_proj 0.3, then every other module 2), within float32 rounding of alpha·x/r."""
    for adapter in (lora, rslora):
        out = tmp_path / f"neg-{adapter.name}"
        edit(str(adapter), out, scale=["-1"])
        every = modules_of(llama_base, adapter)
        assert_edited(llama_base, adapter, out, every, {p: -1.0 for p in every})
    out = tmp_path / "rules"
    edit(str(lora), out, scale=["down_proj=0.3", "2"])
    every = modules_of(llama_base, lora)
    assert_edited(llama_base, lora, out, every, {p: 0.3 if "down_proj" in p else 2.0 for p in every}, exact=False)


def test_keep_drop_and_peft_merge(llama_base, lora, tmp_path):
    """--keep attention, --drop layer 1's q_proj and the saved head: PEFT's merged model of the output is the base
    plus exactly the kept modules' ΔW (scaled), with the base head back; target_modules lists the kept modules,
    so PEFT loads it without missing keys."""
    out = tmp_path / "out"
    summary = edit(str(lora), out, keep=["self_attn"], drop=[r"layers\.1\.self_attn\.q", "lm_head"],
                   scale=["v_proj=0.25"])
    kept = {L0 + "self_attn.q_proj", L0 + "self_attn.v_proj", L1 + "self_attn.v_proj"}
    assert set(summary["kept"]) == kept and summary["saved_dropped"] == ["lm_head"]
    scales = {p: 0.25 for p in kept if "v_proj" in p}
    mine, theirs = assert_edited(llama_base, lora, out, kept, scales)
    assert "base_model.model.lm_head.weight" not in mine and "base_model.model.lm_head.weight" in theirs
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(kept) and config["modules_to_save"] is None
    # the merged model: base + the kept ΔW, scaled; dropped modules and the head as in the base
    from transformers import AutoModelForCausalLM

    base_sd = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).state_dict()
    src_deltas = deltas(llama_base, lora)
    merged = peft_merged(llama_base, [out], dtype=torch.float32)
    for name, w in merged.items():
        path = name.removesuffix(".weight")
        want = base_sd[name].double() + (src_deltas[path] * scales.get(path, 1.0) if path in kept else 0)
        assert float((w.double() - want).abs().max()) <= 1e-6, name


def test_dora_keep_drop_and_refused_scale(llama_base, tmp_path):
    dora = make_adapter(llama_base, tmp_path / "dora", r=2, target_modules=["q_proj", "v_proj"], use_dora=True)
    out = tmp_path / "out"
    edit(str(dora), out, drop=["v_proj"])
    merged, original = peft_merged(llama_base, [out], torch.float32), peft_merged(llama_base, [dora], torch.float32)
    for name, w in merged.items():
        if "q_proj.weight" in name:
            assert torch.equal(w, original[name]), name  # kept DoRA modules merge as before
    from transformers import AutoModelForCausalLM

    base_sd = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).state_dict()
    assert torch.equal(merged[L0 + "self_attn.v_proj.weight"], base_sd[L0 + "self_attn.v_proj.weight"])
    with pytest.raises(AdaptoolError, match="DoRA"):
        edit(str(dora), tmp_path / "scaled", scale=["q_proj=2"])
    assert not (tmp_path / "scaled").exists()


# -------------------------------------------------------------------------------------------------- families


def test_loha_and_lokr_scale_through_alpha_pattern(llama_base, tmp_path):
    from peft import LoHaConfig, LoKrConfig

    for name, config in (("loha", LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False)),
                         ("lokr", LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False))):
        adapter = make_peft_adapter(llama_base, tmp_path / name, config)
        out = tmp_path / f"{name}-out"
        edit(str(adapter), out, scale=[r"layers\.1\..*q_proj=-0.5"], drop=[r"layers\.0\.self_attn\.v"])
        kept = modules_of(llama_base, adapter) - {L0 + "self_attn.v_proj"}
        assert_edited(llama_base, adapter, out, kept, {L1 + "self_attn.q_proj": -0.5})
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == name.upper()


def test_ia3_oft_adalora_keep_drop_only(llama_base, tmp_path):
    """Keep/drop for the other types: PEFT loads the output without missing keys, the kept modules merge as
    before and the dropped ones are the base's; --scale is refused in one line."""
    from peft import AdaLoraConfig, IA3Config, OFTConfig
    from transformers import AutoModelForCausalLM

    base_sd = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).state_dict()
    configs = {
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False),
        "oft": OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"], init_weights=False),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False),
    }
    for name, config in configs.items():
        adapter = make_peft_adapter(llama_base, tmp_path / name, config)
        out = tmp_path / f"{name}-out"
        edit(str(adapter), out, drop=[r"layers\.1\."])
        _, said = peft_load(llama_base, out)
        assert not [w for w in said if "missing" in w.lower()], said
        merged, original = (peft_merged(llama_base, [a], torch.float32) for a in (out, adapter))
        changed = [n for n in original if not torch.equal(original[n], base_sd[n])]
        assert changed, name
        for n in changed:
            assert torch.equal(merged[n], original[n] if n.startswith(L0) else base_sd[n]), (name, n)
        assert all(torch.equal(t, load_output(adapter)[k]) for k, t in load_output(out).items())
        with pytest.raises(AdaptoolError, match="cannot|no per-module|no ΔW|not linear"):
            edit(str(adapter), tmp_path / f"{name}-scaled", scale=["2"])


# -------------------------------------------------------------------------------------------------- hostile


@pytest.mark.parametrize("rule,needle", [
    ("=0.5", "empty regex"),
    ("q_proj=", "not a finite number"),
    ("q_proj", "not a finite number"),
    ("q_proj=abc", "not a finite number"),
    ("x=nan", "not a finite number"),
    ("x=1e400", "not a finite number"),
    ("q_proj=0", "scales by 0"),
    ("0", "scales by 0"),
    ("(?=q=2", "not a valid regex"),
])
def test_scale_rules_refused(rule, needle):
    with pytest.raises(AdaptoolError, match=needle) as e:
        parse_scale(rule)
    assert "\n" not in str(e.value)


def test_scale_rule_splits_at_the_last_equals():
    assert (parse_scale("a=b=2").pattern.pattern, parse_scale("a=b=2").value) == ("a=b", 2.0)
    assert parse_scale("(?=q)=-1").pattern.pattern == "(?=q)" and parse_scale("-1.5").pattern is None


@pytest.mark.parametrize("kw,needle", [
    (dict(keep=["("]), "not a valid regex"),
    (dict(drop=["[z-a]"]), "not a valid regex"),
    (dict(keep=["nothing_matches"]), "no module"),
    (dict(drop=["."]), "no module"),
    (dict(keep=["q_proj"], drop=["q_proj"]), "no module"),
    (dict(scale=["q_proj=0"]), "drop them"),
])
def test_hostile_api(lora, tmp_path, kw, needle):
    before = snapshot(lora)
    with pytest.raises(AdaptoolError, match=needle) as e:
        edit(str(lora), tmp_path / "out", **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and before.retake() == before


def test_cli(llama_base, lora, tmp_path):
    """Main path with --json (negative scale as --scale=-1 and as a separate -1); hostile inputs: exit 2, one line,
    nothing written, the input untouched."""
    out = tmp_path / "cli"
    rc, stdout, err = run_cli("edit", str(lora), "-o", str(out), "--drop", "down_proj", "--scale", "-1", "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    kept = {p for p in modules_of(llama_base, lora) if "down_proj" not in p}
    assert set(summary["kept"]) == kept and set(summary["scaled"].values()) == {-1.0}
    assert_edited(llama_base, lora, out, kept, {p: -1.0 for p in kept})
    before = snapshot(lora)
    for args, needle in ((["--keep", "("], "not a valid regex"), (["--scale", "q_proj=x"], "not a finite number")):
        target = tmp_path / "bad"
        rc, o, err = run_cli("edit", str(lora), "-o", str(target), *args)
        assert_refused(rc, o, err, target, before, 2, needle)


def test_detector_sees_missing_keys(llama_base, lora, tmp_path):
    """The missing-keys check above is real: tensors removed without fixing target_modules make PEFT warn."""
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(lora, broken)
    t = {k: v for k, v in load_output(broken).items() if "layers.1.self_attn.q_proj" not in k}
    save_file(t, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    _, said = peft_load(llama_base, broken)
    assert [w for w in said if "missing" in w.lower()]


def test_keep_union_and_trainable_tokens(llama_base, tmp_path):
    """Several --keep are a union; trainable tokens stay unless a --drop names their embedding, and then PEFT's
    merged embedding is the base's again."""
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(llama_base, tmp_path / "tokens", r=2, target_modules=["q_proj", "v_proj"],
                           trainable_token_indices={"embed_tokens": [1, 2]})
    summary = edit(str(adapter), tmp_path / "union", keep=[r"layers\.0\..*q_proj", r"layers\.1\..*v_proj"])
    assert summary["kept"] == [L0 + "self_attn.q_proj", L1 + "self_attn.v_proj"] and summary["saved_dropped"] == []
    embed = "model.embed_tokens.weight"
    original = peft_merged(llama_base, [adapter], torch.float32)
    assert torch.equal(peft_merged(llama_base, [tmp_path / "union"], torch.float32)[embed], original[embed])
    summary = edit(str(adapter), tmp_path / "no-tokens", drop=["embed_tokens"])
    assert summary["saved_dropped"] == ["model.embed_tokens"]
    assert json.loads((tmp_path / "no-tokens" / "adapter_config.json").read_text())["trainable_token_indices"] is None
    base_sd = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32).state_dict()
    merged = peft_merged(llama_base, [tmp_path / "no-tokens"], torch.float32)
    assert torch.equal(merged[embed], base_sd[embed]) and not torch.equal(original[embed], base_sd[embed])
