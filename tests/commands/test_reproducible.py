"""Same inputs, same settings -> the same bytes, wherever the inputs lie and wherever the output goes; and no path
of the machine in any output file (DESIGN.md, "Streaming and safety").

Every writing command runs twice on copies of the same inputs in two different folders, writing to two different
output paths (other names too); every output file must be byte-identical between the runs, hold none of the
folders' paths (nor the session base's, which the adapters' configs name, nor home or the working folder), and
pass ``adaptool verify``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import lay_out_cache, load_output, make_adapter, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

import adaptool
from adaptool.strategies.rank_rules import RankRule

RECIPE = """base: base
adapters:
  - path: lora-a
    weight: 0.7
  - path: lora-b
    weight: 0.4
strategy: {strategy}
parameters: {{density: 0.5, rank: 4}}
output: {{path: ignored/by/-o, kind: {kind}, dtype: bfloat16}}
"""


@pytest.fixture(scope="module")
def sources(llama_base, tmp_path_factory) -> Path:
    """One folder of inputs: a base, two LoRAs, a kohya file, a fine-tune, two recipes (relative paths)."""
    src = tmp_path_factory.mktemp("sources") / "inputs"
    src.mkdir()
    shutil.copytree(llama_base, src / "base")
    # the adapters' configs name the session's base by its absolute path, as PEFT writes it
    make_adapter(llama_base, src / "lora-a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_adapter(llama_base, src / "lora-b", seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    adaptool.convert(str(src / "lora-a"), src / "lora-a.safetensors", "kohya")
    tensors = load_output(llama_base)
    g = torch.Generator().manual_seed(3)
    for name in [n for n in tensors if n.endswith(("q_proj.weight", "down_proj.weight"))]:
        tensors[name] = (tensors[name].float() + 0.01 * torch.randn(tensors[name].shape, generator=g)).to(torch.bfloat16)
    (src / "tuned").mkdir()
    save_file(tensors, str(src / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(llama_base / "config.json", src / "tuned" / "config.json")
    (src / "model.yaml").write_text(RECIPE.format(strategy="ties", kind="model"))
    (src / "adapter.yaml").write_text(RECIPE.format(strategy="dare_ties", kind="adapter"))
    return src


def _run_all(inp: Path, out: Path) -> dict[str, Path]:
    """Every writing command on the inputs in ``inp``, outputs under ``out``; returns name -> output path."""
    rank2 = RankRule.from_options(rank=2)
    outputs = {
        "unload": lambda o: adaptool.unload(str(inp / "base"), [str(inp / "lora-a"), str(inp / "lora-b")], o),
        "merge-model": lambda o: adaptool.merge(inp / "model.yaml", output=o),
        "merge-adapter": lambda o: adaptool.merge(inp / "adapter.yaml", output=o),
        "resize": lambda o: adaptool.resize(str(inp / "lora-a"), o, rank2),
        "extract": lambda o: adaptool.extract(str(inp / "base"), str(inp / "tuned"), o, rank2),
        "to-kohya": lambda o: adaptool.convert(str(inp / "lora-a"), o, "kohya"),
        "to-peft": lambda o: adaptool.convert(str(inp / "lora-a.safetensors"), o, "peft", base=str(inp / "base")),
        "align": lambda o: adaptool.align([str(inp / "lora-a"), str(inp / "lora-b")], o),
        "edit": lambda o: adaptool.edit(str(inp / "lora-a"), o, keep=["q_proj"], scale=["v_proj=0.5"]),
    }
    written = {}
    for name, run in outputs.items():
        target = out / (f"{out.name}-{name}" + (".safetensors" if name == "to-kohya" else ""))
        run(target)
        written[name] = target
    return written


def _files(output: Path) -> dict[str, bytes]:
    if output.is_file():
        return {"": output.read_bytes()}
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_same_bytes_wherever_inputs_and_output_lie(sources, llama_base, tmp_path):
    one, two = tmp_path / "first", tmp_path / "second" / "deeper" / "place"
    shutil.copytree(sources, one / "in")
    shutil.copytree(sources, two / "in")
    runs = [_run_all(one / "in", one / "out"), _run_all(two / "in", two / "elsewhere")]
    forbidden = {str(p).encode() for p in (tmp_path, sources, llama_base.parent, Path.home(), Path.cwd())}
    for name in runs[0]:
        a, b = _files(runs[0][name]), _files(runs[1][name])
        assert sorted(a) == sorted(b), name
        assert len(a) >= 1 and (name == "to-kohya" or "adaptool-manifest.json" in a), name
        for rel in a:
            assert a[rel] == b[rel], f"{name}: {rel} differs between the two runs"
            leaked = [f for f in forbidden if f in a[rel]]
            assert not leaked, f"{name}: {rel} holds {leaked}"
        for output in (runs[0][name], runs[1][name]):
            assert adaptool.verify(output)["intact"] is True
    _check_portable_provenance(runs[0])


def _check_portable_provenance(outputs: dict[str, Path]) -> None:
    """What the outputs say about their inputs: names and digests, a recipe without paths, configs by name."""
    with safe_open(str(outputs["merge-adapter"] / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["adaptool.recipe"])
    assert recipe["base"] == "base" and [a["path"] for a in recipe["adapters"]] == ["lora-a", "lora-b"]
    assert "path" not in recipe["output"] and recipe["output"]["kind"] == "adapter"
    assert [a["name"] for a in json.loads(meta["adaptool.adapters"])] == ["lora-a", "lora-b"]
    assert len(json.loads(meta["adaptool.base"])["headers_sha256"]) == 64
    card = (outputs["merge-adapter"] / "README.md").read_text()
    assert "adaptool merge adapter.yaml" in card and "path: lora-a" in card and "base_model:" not in card
    for name in ("resize", "edit", "merge-adapter", "to-peft", "extract"):
        config = json.loads((outputs[name] / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "base", name  # the folder's name, never its path
    with safe_open(str(outputs["extract"] / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["adaptool.tuned"])["name"] == "tuned"
    with safe_open(str(outputs["to-kohya"]), "pt") as f:
        kohya = f.metadata()
    assert len(kohya["adaptool.sha256_tensors"]) == 64 and kohya["adaptool.command"] == "convert"


def test_hub_inputs_are_named_by_repo_and_commit(llama_base, tmp_path):
    """Hub inputs (two caches in two places) are recorded as repo id + the commit they resolved to; the card's
    base_model is the repo id; the bytes do not depend on where the cache lies."""
    adapter = make_adapter(llama_base, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-org/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    outs = []
    for i, cache in enumerate([tmp_path / "cache-a", tmp_path / "x" / "cache-b"]):
        commit = lay_out_cache(cache, "tiny-org/tiny-llama", llama_base)
        lay_out_cache(cache, "someone/tiny-lora", adapter)
        out = tmp_path / f"out{i}" / f"merged-{i}"
        rc, _, err = run_cli("unload", "tiny-org/tiny-llama+someone/tiny-lora", "-o", str(out),
                             env={"HF_HUB_CACHE": str(cache)})
        assert rc == 0, err
        outs.append(out)
    a, b = _files(outs[0]), _files(outs[1])
    assert a == b
    card = a["README.md"].decode()
    assert "base_model: tiny-org/tiny-llama\n" in card
    assert f"adaptool unload tiny-org/tiny-llama@{commit}+someone/tiny-lora@" in card
    with safe_open(str(outs[0] / sorted(p for p in a if p.endswith(".safetensors"))[0]), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["adaptool.base"])["hub"] == "tiny-org/tiny-llama"
    assert json.loads(meta["adaptool.base"])["revision"] == commit
    assert json.loads(meta["adaptool.adapters"])[0]["hub"] == "someone/tiny-lora"
    assert not any(str(tmp_path).encode() in data for data in a.values())


@pytest.mark.parametrize("name_or_path,written,card", [("/home/someone/models/llama-7b", "llama-7b", None),
                                                       ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf",
                                                        "meta-llama/Llama-2-7b-hf")])
def test_base_config_name_or_path(llama_base, tmp_path, name_or_path, written, card):
    """A base config's ``_name_or_path`` (older transformers wrote the trainer's local path there) is copied as its
    folder name, a hub id as it is; a hub id there becomes the card's base_model."""
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}, indent=2))
    adapter = make_adapter(llama_base, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    adaptool.unload(str(base), [str(adapter)], tmp_path / "out")
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["_name_or_path"] == written and {**out_config, "_name_or_path": None} == {**config, "_name_or_path": None}
    readme = (tmp_path / "out" / "README.md").read_text()
    assert (f"base_model: {card}\n" in readme) if card else ("base_model:" not in readme)
    assert "/home/someone" not in readme and adaptool.verify(tmp_path / "out")["intact"]
