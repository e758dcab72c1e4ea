"""Hostile adapter configs and tensors: every user-caused failure is one line and exit 2, nothing hangs, an
adapter that changes nothing is refused, and ``fan_in_fan_out`` on a Linear model means what PEFT makes of it.

Each hostile class is run once through the CLI (``assert_refused``); its variants go through the Python API,
which raises the same :class:`AdaptoolError` much faster.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings

import pytest
import torch
from conftest import assert_refused, assert_same_model, load_output, make_adapter, peft_merged, run_cli, snapshot

from adaptool.commands.unload import unload
from adaptool.errors import AdaptoolError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("lora") / "a", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def dora(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("dora") / "a", r=2, lora_alpha=4, use_dora=True,
                        target_modules=["q_proj"])


@pytest.fixture(scope="module")
def tokens(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("tokens") / "a", r=2, target_modules=["q_proj"],
                        trainable_token_indices=[1, 5, 7])


@pytest.fixture(scope="module")
def oft(llama_base, tmp_path_factory):
    from peft import OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    torch.manual_seed(0)
    pm = get_peft_model(model, OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False))
    out = tmp_path_factory.mktemp("oft") / "a"
    pm.save_pretrained(out)
    return out


def hostile(tmp_path, good, config=None, tensors=None, name="bad"):
    """A copy of adapter folder ``good`` with ``config(dict)`` / ``tensors(dict)`` applied (each edits in place)."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / name
    shutil.copytree(good, bad)
    if config is not None:
        cfg = json.loads((bad / CONFIG).read_text())
        config(cfg)
        (bad / CONFIG).write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(bad / WEIGHTS))
        tensors(t)
        save_file(t, str(bad / WEIGHTS))
    return bad


def cli_refused(base, adapter, tmp_path, *needles):
    out = tmp_path / "out"
    before = snapshot(base, adapter)
    rc, stdout, stderr = run_cli("unload", f"{base}+{adapter}", "-o", str(out))
    assert_refused(rc, stdout, stderr, out, before, 2, *needles)
    return stderr


def api_refused(base, adapter, tmp_path, match):
    with pytest.raises(AdaptoolError, match=match) as e:
        unload(str(base), [str(adapter)], tmp_path / "out")
    assert "\n" not in e.value.line()
    assert not (tmp_path / "out").exists()


def setter(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


def lora_key(t, suffix, module="layers.0.self_attn.q_proj"):
    return next(k for k in t if module in k and k.endswith(suffix))


# ------------------------------------------------------------------------------ 1. types in adapter_config.json


def test_string_rank_is_one_line_naming_key_and_file(llama_base, lora, tmp_path):
    bad = hostile(tmp_path, lora, setter("r", "4"))
    err = cli_refused(llama_base, bad, tmp_path, "r must be", "'4' (a string)", CONFIG)
    assert str(bad) in err


@pytest.mark.parametrize("key, value, needle", [
    ("lora_alpha", "8", "lora_alpha must be a finite number"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("r", True, "r must be an integer from 1 to"),
    ("r", 4.0, "r must be an integer from 1 to"),
    ("r", 0, "r must be an integer from 1 to"),
    ("r", 10 ** 12, "r must be an integer from 1 to"),
    ("lora_alpha", 10 ** 400, "lora_alpha must be a finite number, not an integer of 401 digits"),
    ("rank_pattern", [["q_proj", 4]], "rank_pattern must be an object"),
    ("rank_pattern", {"q_proj": "4"}, "rank_pattern['q_proj'] must be a positive integer"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be a positive integer"),
    ("alpha_pattern", {"q_proj": float("inf")}, "alpha_pattern['q_proj'] must be a finite number"),
    ("alpha_pattern", ["q_proj"], "alpha_pattern must be an object"),
    ("use_dora", "false", "use_dora must be true or false"),
    ("fan_in_fan_out", 1, "fan_in_fan_out must be true or false"),
    ("trainable_token_indices", [1, -2], "trainable_token_indices must be"),
    ("trainable_token_indices", {"embed_tokens": ["1"]}, "trainable_token_indices must be"),
    ("trainable_token_indices", "1,2", "trainable_token_indices must be"),
    ("modules_to_save", "lm_head", "modules_to_save must be a list"),
    ("layers_to_transform", [0, "1"], "layers_to_transform must be"),
    ("layer_replication", [[0, 1, 2]], "layer_replication must be"),
    ("peft_type", 7, "peft_type must be a string"),
    ("bias", "everything", "bias must be one of"),
    ("base_model_name_or_path", ["x"], "base_model_name_or_path must be a string"),
])
def test_wrong_types_refused(llama_base, lora, tmp_path, key, value, needle):
    bad = hostile(tmp_path, lora, setter(key, value))
    api_refused(llama_base, bad, tmp_path, __import__("re").escape(needle))


def test_other_families_keys_checked(tmp_path):
    from adaptool.adapters.config import parse_config

    with pytest.raises(AdaptoolError, match="alpha must be a finite number"):
        parse_config({"peft_type": "LOHA", "alpha": "4"}, "x.json")
    with pytest.raises(AdaptoolError, match="init_r must be an integer from 1 to"):
        parse_config({"peft_type": "ADALORA", "init_r": "12"}, "x.json")
    with pytest.raises(AdaptoolError, match=r"rank_pattern\['m.lora_E'\] must be a list of booleans"):
        parse_config({"peft_type": "ADALORA", "rank_pattern": {"m.lora_E": 3}}, "x.json")
    with pytest.raises(AdaptoolError, match="eps must be a finite number"):
        parse_config({"peft_type": "OFT", "oft_block_size": 8, "eps": None}, "x.json")
    with pytest.raises(AdaptoolError, match="feedforward_modules must be"):
        parse_config({"peft_type": "IA3", "feedforward_modules": 3}, "x.json")
    # PEFT's defaults, in one place; null switches read as off (PEFT tests their truth)
    cfg = parse_config({"use_dora": None}, "x.json")
    assert (cfg.peft_type, cfg.r, cfg.lora_alpha, cfg.use_dora, cfg.fan_in_fan_out) == ("LORA", 8, 8, False, False)
    oft = parse_config({"peft_type": "OFT", "oft_block_size": 8}, "x.json")
    assert (oft.use_cayley_neumann, oft.num_cayley_neumann_terms, oft.eps, oft.coft, oft.block_share) == (True, 5, 6e-5, False, False)
    # an unsupported family is refused by name later, not by its keys here
    assert parse_config({"peft_type": "VERA", "r": "x"}, "x.json").peft_type == "VERA"


# ---------------------------------------------------------------------------------- 2. bounded config inputs


def test_huge_neumann_term_count_refused_fast(llama_base, oft, tmp_path):
    bad = hostile(tmp_path, oft, setter("num_cayley_neumann_terms", 1_000_000_000))
    start = time.monotonic()
    cli_refused(llama_base, bad, tmp_path, "num_cayley_neumann_terms must be an integer from 0 to 1000")
    assert time.monotonic() - start < 30


def test_neumann_terms_within_bound_still_fold(llama_base, oft, tmp_path):
    """A large but bounded count runs (PEFT's own loop, same numbers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    good = hostile(tmp_path, oft, setter("num_cayley_neumann_terms", 40), name="forty")
    unload(str(llama_base), [str(good)], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(model, good).merge_and_unload().state_dict()
    ours = load_output(tmp_path / "out")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (ours[key].float() - ref[key].float()).abs().max() <= 2 ** -6 * ref[key].float().abs().max()


def test_bad_regex_refused(llama_base, lora, tmp_path):
    bad = hostile(tmp_path, lora, setter("rank_pattern", {"q_proj(": 4}))
    cli_refused(llama_base, bad, tmp_path, "rank_pattern key", "no valid regex")


@pytest.mark.parametrize("key, value, needle", [
    ("target_modules", ".*(q|v_proj", "target_modules holds"),
    ("layers_pattern", "layers[", "layers_pattern holds"),
    ("alpha_pattern", {"*q": 4}, "alpha_pattern key holds"),
    ("rank_pattern", {"q" * 5000: 4}, "5000 characters"),
    ("target_modules", "q" * 1001, "1001 characters"),
])
def test_bad_or_long_regex_refused(llama_base, lora, tmp_path, key, value, needle):
    bad = hostile(tmp_path, lora, setter(key, value))
    api_refused(llama_base, bad, tmp_path, needle)


def test_long_module_name_not_matched(tmp_path):
    from adaptool.adapters.config import parse_config

    cfg = parse_config({"rank_pattern": {"(a+)+b": 4}}, "x.json")
    with pytest.raises(AdaptoolError, match="characters long"):
        cfg.rank_for("a" * 5000)
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8


# ----------------------------------------------------------------------------------- 3. adapters doing nothing


def test_adapter_without_tensors_refused(llama_base, lora, tmp_path):
    bad = hostile(tmp_path, lora, tensors=lambda t: t.clear())
    cli_refused(llama_base, bad, tmp_path, "changes nothing", "holds no tensors")


def test_only_lora_b_refused(llama_base, lora, tmp_path):
    def drop_a(t):
        for k in [k for k in t if ".lora_A." in k]:
            del t[k]

    bad = hostile(tmp_path, lora, tensors=drop_a)
    cli_refused(llama_base, bad, tmp_path, "lora_B.weight has no matching", "incomplete")


def test_stray_lora_tensors_refused(llama_base, lora, dora, tmp_path):
    def rename(t):  # an adapter name left in the keys: PEFT would not load these
        for k in [k for k in t if ".lora_A." in k or ".lora_B." in k]:
            t[k.replace(".weight", ".default.weight")] = t.pop(k)

    api_refused(llama_base, hostile(tmp_path, lora, tensors=rename, name="renamed"), tmp_path,
                "no tensor of a LoRA module")

    def orphan_magnitude(t):
        t[lora_key(t, ".lora_magnitude_vector").replace("q_proj", "k_proj")] = torch.ones(32)

    api_refused(llama_base, hostile(tmp_path, dora, tensors=orphan_magnitude, name="mag"), tmp_path,
                "k_proj.lora_magnitude_vector.* has no matching .*k_proj.lora_A.weight")


def test_tensors_for_no_base_module_refused(llama_base, lora, tmp_path):
    def rename(t):
        for k in list(t):
            t[k.replace("self_attn", "cross_attn")] = t.pop(k)

    api_refused(llama_base, hostile(tmp_path, lora, tensors=rename), tmp_path, "which the base model does not have")


def test_zero_b_is_a_valid_no_op(llama_base, lora, tmp_path):
    """A module whose B is all zeros changes nothing numerically but is a complete adapter: not refused."""
    def zero_b(t):
        for k in t:
            if ".lora_B." in k:
                t[k] = torch.zeros_like(t[k])

    good = hostile(tmp_path, lora, tensors=zero_b, name="zero")
    unload(str(llama_base), [str(good)], tmp_path / "out")
    assert_same_model(load_output(tmp_path / "out"), peft_merged(llama_base, [good]))


# ------------------------------------------------------------------- 4. fan_in_fan_out on a model without Conv1D


@pytest.fixture(scope="module")
def square_lora_fifo(llama_base, tmp_path_factory):
    """A LoRA on the square q_proj/o_proj (64x64) whose config claims fan_in_fan_out (PEFT ignores it there)."""
    a = make_adapter(llama_base, tmp_path_factory.mktemp("fifo") / "a", r=4, lora_alpha=8,
                     target_modules=["q_proj", "o_proj"])
    cfg = json.loads((a / CONFIG).read_text())
    cfg["fan_in_fan_out"] = True
    (a / CONFIG).write_text(json.dumps(cfg))
    return a


def test_fan_in_fan_out_on_linear_follows_peft(llama_base, square_lora_fifo, tmp_path):
    summary = unload(str(llama_base), [str(square_lora_fifo)], tmp_path / "out")
    assert any("fan_in_fan_out is true but the base" in n for n in summary["notes"]), summary["notes"]
    ours = load_output(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_merged(llama_base, [square_lora_fifo])
    assert_same_model(ours, reference)
    base = load_output(llama_base)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_fan_in_fan_out_on_linear_cli_says_so(llama_base, square_lora_fifo, tmp_path):
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{square_lora_fifo}", "-o", str(tmp_path / "out"))
    assert rc == 0, stderr
    assert "note:" in stdout and "fan_in_fan_out is true" in stdout and "Traceback" not in stderr


def test_ia3_fan_in_fan_out_on_linear_follows_peft(llama_base, tmp_path):
    from peft import IA3Config, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
    torch.manual_seed(0)
    pm = get_peft_model(model, IA3Config(target_modules=["q_proj", "o_proj"], feedforward_modules=["o_proj"],
                                         init_ia3_weights=False))
    pm.save_pretrained(tmp_path / "ia3")
    cfg = json.loads((tmp_path / "ia3" / CONFIG).read_text())
    cfg["fan_in_fan_out"] = True
    (tmp_path / "ia3" / CONFIG).write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unload(str(llama_base), [str(tmp_path / "ia3")], tmp_path / "out")
        model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16)
        reference = PeftModel.from_pretrained(model, tmp_path / "ia3").merge_and_unload().state_dict()
    assert_same_model(load_output(tmp_path / "out"), reference)


# ------------------------------------------------------------------------------------ 5. tensors of wrong shape


def test_zero_dim_lora_a_refused(llama_base, lora, tmp_path):
    def scalar_a(t):
        t[lora_key(t, ".lora_A.weight")] = torch.tensor(1.0, dtype=torch.bfloat16)

    cli_refused(llama_base, hostile(tmp_path, lora, tensors=scalar_a), tmp_path, "lora_A.weight ()", "do not fit")


def test_one_dim_lora_b_refused(llama_base, lora, tmp_path):
    def flat_b(t):
        k = lora_key(t, ".lora_B.weight")
        t[k] = t[k].reshape(-1)

    api_refused(llama_base, hostile(tmp_path, lora, tensors=flat_b), tmp_path, r"lora_B.weight \(256,\)")


def test_zero_sized_lora_a_refused(llama_base, lora, tmp_path):
    def empty_a(t):
        k = lora_key(t, ".lora_A.weight")
        t[k] = t[k][:0]

    api_refused(llama_base, hostile(tmp_path, lora, tensors=empty_a), tmp_path, "do not fit together|rank 0")


def test_dora_magnitude_of_wrong_length_refused(llama_base, dora, tmp_path):
    def short(t):
        k = lora_key(t, ".lora_magnitude_vector")
        t[k] = t[k][:-1].clone()

    api_refused(llama_base, hostile(tmp_path, dora, tensors=short), tmp_path,
                r"lora_magnitude_vector.* has shape \(63,\), but .*q_proj has 64 output features")


def test_trainable_tokens_of_wrong_shape_refused(llama_base, tokens, tmp_path):
    for name, reshape in [("flat", lambda d: d.reshape(-1)), ("scalar", lambda d: d.reshape(-1)[0].clone()),
                          ("narrow", lambda d: d[:, :-1].clone()), ("rows", lambda d: d[:-1].clone())]:
        def edit(t, reshape=reshape):
            k = lora_key(t, ".trainable_tokens_delta", module="embed_tokens")
            t[k] = reshape(t[k])

        api_refused(llama_base, hostile(tmp_path, tokens, tensors=edit, name=name), tmp_path,
                    "trainable tokens of .*embed_tokens .*trainable_tokens_delta")


def test_fan_in_fan_out_on_linear_merge_follows_peft(llama_base, square_lora_fifo, tmp_path):
    """A LoRA-only merge into the base treats fan_in_fan_out as PEFT does, like unload."""
    from adaptool.commands.merge import merge

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {llama_base}\nadapters:\n  - path: {square_lora_fifo}\nstrategy: linear\n"
                      f"output:\n  path: {tmp_path / 'merged'}\n  kind: model\n")
    summary = merge(recipe)
    assert any("fan_in_fan_out is true" in n for n in summary["notes"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_merged(llama_base, [square_lora_fifo])
    assert_same_model(load_output(tmp_path / "merged"), reference)
