"""Hub ids resolved offline against a hub cache laid out by the test (HF_HUB_CACHE + HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json

import torch
from conftest import lay_out_cache, load_output, make_adapter, peft_merged, run_cli


def test_hub_ids_offline(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-org/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    cache = tmp_path / "hub"
    lay_out_cache(cache, "tiny-org/tiny-llama", llama_base)
    lay_out_cache(cache, "someone/tiny-lora", adapter, refs={"v1": ""})
    env = {"HF_HUB_CACHE": str(cache)}
    reference = peft_merged(llama_base, [adapter])

    rc, out, err = run_cli("unload", "tiny-org/tiny-llama+someone/tiny-lora@v1", "-o", str(tmp_path / "a"), env=env)
    assert rc == 0, err
    ours = load_output(tmp_path / "a")
    assert all(torch.equal(ours[k], reference[k]) for k in ours)

    # adapter alone: the base comes from base_model_name_or_path, itself a hub id
    rc, out, err = run_cli("unload", "someone/tiny-lora", "-o", str(tmp_path / "b"), "--json", env=env)
    assert rc == 0, err
    assert json.loads(out)["base"] == "tiny-org/tiny-llama"
    b = load_output(tmp_path / "b")
    assert all(torch.equal(b[k], ours[k]) for k in ours)


def test_hub_id_missing_offline(llama_base, tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    rc, out, err = run_cli("unload", f"{llama_base}+nobody/absent-lora", "-o", str(tmp_path / "o"),
                           env={"HF_HUB_CACHE": str(cache)})
    assert rc == 2 and err.count("\n") == 1 and "nobody/absent-lora" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "o").exists()
