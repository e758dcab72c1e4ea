"""Adapter module paths resolve against checkpoints saved without the model class's prefix (hub GPT-2)."""

import json
import shutil

import torch
from conftest import load_output, make_adapter

from adaptool.commands.unload import unload


def test_gpt2_checkpoint_without_transformer_prefix(gpt2_base, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    shutil.copytree(gpt2_base, bare)
    tensors = load_file(str(bare / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(bare / "model.safetensors"),
              metadata={"format": "pt"})
    adapter = make_adapter(gpt2_base, tmp_path / "a", dtype=torch.float32, r=2, lora_alpha=4,
                           target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    unload(str(gpt2_base), [str(adapter)], tmp_path / "ref")
    unload(str(bare), [str(adapter)], tmp_path / "out")
    ref, ours = load_output(tmp_path / "ref"), load_output(tmp_path / "out")
    assert set(ours) == {k.removeprefix("transformer.") for k in ref}  # no key the base did not have
    assert all(torch.equal(ours[k.removeprefix("transformer.")], v) for k, v in ref.items())
    assert not torch.equal(ours["h.0.attn.c_attn.weight"], tensors["transformer.h.0.attn.c_attn.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == 2
