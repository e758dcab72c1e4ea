"""``adaptool unload`` of an adapter whose ``modules_to_save`` embedding/lm_head has another vocabulary size than the
base. The oracle is PEFT: it loads such an adapter only after ``resize_token_embeddings(n)``, and its merged model
has the new shape. Our output must equal that model tensor by tensor (bit for bit), say ``vocab_size: n`` in
config.json, and load in transformers with the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, assert_same_model, load_output, make_adapter, run_cli, snapshot
from safetensors.torch import load_file, save_file

from adaptool.commands.unload import unload
from adaptool.errors import AdaptoolError
from adaptool.output.model_folder import update_vocab_size

N = 260  # the base has 256 rows
PREFIX = "base_model.model."
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def resized_adapter(base: Path, out: Path, modules: list[str], seed: int = 0, tie: bool = False,
                    save_embedding_layers="auto") -> Path:
    """A PEFT LoRA (q/v_proj) trained on ``base`` resized to N tokens, with trained ``modules_to_save`` copies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    model.resize_token_embeddings(N)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=modules,
                        init_lora_weights=False, ensure_weight_tying=tie)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    return out


def peft_resized_merge(base: Path, adapter: Path):
    """PEFT's answer: the base resized to N tokens, the adapter loaded and merged (the merged model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.resize_token_embeddings(N)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, N, (2, 16), generator=torch.Generator().manual_seed(seed))
    x[:, :4] = torch.arange(N - 4, N)  # the new tokens, in and out
    with torch.no_grad():
        return model(x).logits


def edited_adapter(adapter: Path, out: Path, edit) -> Path:
    """A copy of ``adapter`` whose tensors went through ``edit(dict)``."""
    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def untied(llama_base, tmp_path_factory) -> Path:
    """PEFT's default save: the copies and, since the vocabulary changed, its wrapper's insides."""
    return resized_adapter(llama_base, tmp_path_factory.mktemp("vocab") / "a", ["embed_tokens", "lm_head"])


# ------------------------------------------------------------------------------------------------ the oracle


@pytest.mark.parametrize("save_embedding_layers", ["auto", False])
def test_untied_bit_identical_to_peft(llama_base, untied, tmp_path, save_embedding_layers):
    from transformers import AutoModelForCausalLM

    adapter = untied if save_embedding_layers == "auto" else resized_adapter(
        llama_base, tmp_path / "a", ["embed_tokens", "lm_head"], seed=1, save_embedding_layers=False)
    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert (PREFIX + "model.embed_tokens.original_module.weight" in keys) == (save_embedding_layers == "auto")
    out = tmp_path / "out"
    summary = unload(str(llama_base), [str(adapter)], out)
    ours = load_output(out)
    merged = peft_resized_merge(llama_base, adapter)
    reference = state(merged)
    assert ours[EMBED].shape == ours[HEAD].shape == (N, 64)
    assert_same_model(ours, reference, max_ulp=0, tied_ok=False)
    base = load_output(llama_base)
    assert not torch.equal(ours[EMBED][:256], base[EMBED])  # the trained copy, not the base
    assert summary["tensors_changed"] == 6  # 2 q_proj, 2 v_proj, the embedding and the head
    assert any("resized from 256 to 260 rows" in n for n in summary["notes"])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == merged.config.vocab_size == N
    index = json.loads((out / "model.safetensors.index.json").read_text())  # the base is sharded
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    assert set(index["weight_map"]) == set(ours)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert_same_model(state(model), reference, max_ulp=0, tied_ok=False)
    assert torch.equal(logits(model), logits(merged))


def test_tied_embeddings_stay_tied(llama_tied_base, tmp_path):
    """A tied base stores only the embedding: PEFT's ensure_weight_tying saves the one tied copy as both
    embed_tokens and lm_head; the output stores the resized embedding, the head follows it on load."""
    from transformers import AutoModelForCausalLM

    adapter = resized_adapter(llama_tied_base, tmp_path / "a", ["embed_tokens"], tie=True)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert torch.equal(saved[PREFIX + HEAD], saved[PREFIX + EMBED])
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_tied_base}+{adapter}", "-o", str(out), "--json")
    assert rc == 0, stderr
    ours = load_output(out)
    merged = peft_resized_merge(llama_tied_base, adapter)
    reference = state(merged)
    assert torch.equal(reference[HEAD], reference[EMBED])  # PEFT's merged model is tied too
    assert HEAD not in ours and ours[EMBED].shape == (N, 64)
    assert_same_model(ours, reference, max_ulp=0)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == N and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(model.state_dict()[HEAD], reference[EMBED])
    assert torch.equal(logits(model, 1), logits(merged, 1))
    assert json.loads(stdout)["tensors_changed"] == 5


def test_with_another_adapter_and_dtype(llama_base, untied, tmp_path):
    """Several adapters (the resized copy replaces whatever came before it) and --dtype float32."""
    other = make_adapter(llama_base, tmp_path / "b", r=2, lora_alpha=4, target_modules=["lm_head", "o_proj"])
    out = tmp_path / "out"
    unload(str(llama_base), [str(other), str(untied)], out, dtype="float32")
    unload(str(llama_base), [str(untied)], tmp_path / "alone", dtype="float32")
    ours, alone = load_output(out), load_output(tmp_path / "alone")
    reference = state(peft_resized_merge(llama_base, untied))
    for name in (EMBED, HEAD):
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], reference[name].float())
    for name, t in ours.items():
        if "o_proj" not in name:
            assert torch.equal(t, alone[name]), name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == N


# ----------------------------------------------------------------------------------------------- refusals


def test_refusals_one_line_nothing_written(llama_base, untied, tmp_path):
    def resize(name, rows, cols=64):
        def edit(t):
            t[PREFIX + name] = torch.randn(rows, cols).to(torch.bfloat16)
            for inside in ("original_module", "modules_to_save"):
                t.pop(PREFIX + name.replace(".weight", f".{inside}.weight"), None)
        return edit

    def norm(t):
        t[PREFIX + "model.norm.weight"] = torch.ones(65, dtype=torch.bfloat16)

    embed_only = resized_adapter(llama_base, tmp_path / "embed_only", ["embed_tokens"], save_embedding_layers=False)
    cases = [
        (embed_only, ["is resized from 256 to 260 rows, but lm_head.weight keeps 256", "modules_to_save"]),
        (edited_adapter(untied, tmp_path / "disagree", resize(HEAD, 270)),
         ["the vocabulary is resized to 260 rows in model.embed_tokens.weight but to 270 in lm_head.weight"]),
        (edited_adapter(untied, tmp_path / "hidden", resize(EMBED, N, 32)),
         ["has shape (260, 32), base model.embed_tokens.weight has (256, 64)", "not the hidden size"]),
        (edited_adapter(untied, tmp_path / "norm", norm),
         ["model.norm.weight has shape (65,), base model.norm.weight has (64,)", "only an embedding or lm_head"]),
        (edited_adapter(untied, tmp_path / "inside", resize(EMBED.replace(".weight", ".modules_to_save.weight"), N)),
         ["model.embed_tokens.modules_to_save.weight differs from", "re-save"]),
    ]
    out = tmp_path / "out"
    for adapter, needles in cases[:2]:  # through the CLI: exit 2, one line, nothing written, inputs untouched
        before = snapshot(llama_base, adapter)
        rc, stdout, stderr = run_cli("unload", f"{llama_base}+{adapter}", "-o", str(out))
        assert_refused(rc, stdout, stderr, out, before, 2, *needles)
    for adapter, needles in cases[2:]:
        with pytest.raises(AdaptoolError) as caught:
            unload(str(llama_base), [str(adapter)], out)
        assert all(n in caught.value.line() for n in needles), caught.value.line()
        assert "\n" not in caught.value.line() and not out.exists()


def test_edit_after_a_resize_refused(llama_base, untied, tmp_path):
    """A LoRA on lm_head made for the base's 256 rows cannot be added to the resized head; an adapter that saves
    the base's own head (PEFT saves a targeted embedding layer's base_layer) leaves the embedding alone resized."""
    other = make_adapter(llama_base, tmp_path / "b", r=2, lora_alpha=4, target_modules=["lm_head"])
    bare = edited_adapter(other, tmp_path / "bare", lambda t: t.pop(PREFIX + "lm_head.base_layer.weight"))
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{untied}+{bare}", "-o", str(out))
    assert_refused(rc, stdout, stderr, out, None, 2, "lm_head.weight: ", "replaces it with shape (260, 64)",
                   "as a tensor of shape (256, 64)")
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{untied}+{other}", "-o", str(out))
    assert_refused(rc, stdout, stderr, out, None, 2, "resized from 256 to 260 rows, but lm_head.weight keeps 256")


def test_tied_head_that_differs_is_refused(llama_tied_base, tmp_path):
    adapter = resized_adapter(llama_tied_base, tmp_path / "a", ["embed_tokens"], tie=True, save_embedding_layers=False)

    def untie(t):
        t[PREFIX + HEAD] = t[PREFIX + HEAD] + 1

    bad = edited_adapter(adapter, tmp_path / "bad", untie)
    with pytest.raises(AdaptoolError, match="ties to the input embeddings"):
        unload(str(llama_tied_base), [str(bad)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ config.json


def test_vocab_size_in_nested_and_padded_configs(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", "text_config": {"vocab_size": 256, "hidden_size": 64},
                                "vision_config": {"vocab_size": 8}, "image_token_index": 256}))
    update_vocab_size(path, 256, N)
    data = json.loads(path.read_text())
    assert data["text_config"]["vocab_size"] == N and data["vision_config"]["vocab_size"] == 8
    assert data["image_token_index"] == 256 and "vocab_size" not in data
    path.write_text(json.dumps({"vocab_size": 250, "text_config": {"hidden_size": 64}}))  # rows padded past it
    update_vocab_size(path, 256, N)
    assert json.loads(path.read_text()) == {"vocab_size": N, "text_config": {"hidden_size": 64}}
