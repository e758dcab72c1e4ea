"""adaptool in one minute: make a tiny base model and a LoRA adapter, unload, and check the result; then lay
out the inputs the example recipes name, so that every `adaptool merge recipes/<name>.yaml` runs as written.

    python examples/demo.py [WORKDIR] [--recipes DIR]

Everything is made here with torch + safetensors (no download, no transformers or peft needed): a 2-layer
Llama-shaped bf16 checkpoint in two shards, and a PEFT-format LoRA adapter (r=8, alpha=16) on
q_proj/v_proj/down_proj. Then the real CLI runs `adaptool unload base+lora -o merged`, and the demo checks every
merged weight against W + (alpha/r)·B·A computed independently. WORKDIR (default: a new temporary folder)
holds these.

Then it builds, in DIR (default: the repository's recipes/ folder; the paths are git-ignored), what the
recipes there refer to: `base/` (the same tiny checkpoint) and `adapters/{math,code,chat,style-loha,tone-ia3}`
(three LoRAs of different ranks and targets, one of them rsLoRA, a LoHa and an IA3 adapter), written by hand
with the key names and config fields PEFT 0.21.2 saves. Folders that are already there and complete are kept;
each new one is built under a temporary name and renamed into place. As a check, `recipes/ties.yaml` is run
with `-o` into WORKDIR, so nothing is left in DIR/out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS, VOCAB = 64, 128, 2, 256
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# (out_features, in_features) of every Linear a layer has, by its path inside the layer
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
BUILD_PREFIX = ".demo-build-"  # <DIR>/.demo-build-<pid>-<name>: a folder being built (git-ignored)


def make_base(root: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                   p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, INTER)}
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    root.mkdir(parents=True)
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(root / fname), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, indent=2))
    return tensors


def _module_keys(targets: list[str]) -> list[tuple[str, tuple[int, int]]]:
    """(PEFT key prefix, (out, in)) of every targeted Linear, in layer order."""
    found = [(f"base_model.model.model.layers.{i}.{mod}", shape)
             for i in range(LAYERS) for mod, shape in MODULES.items() if mod.rsplit(".", 1)[1] in targets]
    assert found, f"no module matches {targets}"
    return found


def _save_adapter(root: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    root.mkdir(parents=True)
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def make_lora(root: Path, base_path: Path, r: int = 8, alpha: int = 16,
              targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), seed: int = 1,
              use_rslora: bool = False) -> dict[str, torch.Tensor]:
    """A PEFT LoRA folder: `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r), float32."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_f, in_f) in _module_keys(list(targets)):
        tensors[key + ".lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
        tensors[key + ".lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    _save_adapter(root, tensors, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
        "base_model_name_or_path": str(base_path), "use_rslora": use_rslora, "fan_in_fan_out": False,
        "bias": "none", "lora_dropout": 0.0, "use_dora": False, "lora_bias": False, "rank_pattern": {},
        "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "init_lora_weights": True, "inference_mode": True, "peft_version": "0.21.2"})
    return tensors


def make_loha(root: Path, base_path: Path, r: int = 4, alpha: int = 8,
              targets: tuple[str, ...] = ("q_proj", "v_proj", "gate_proj"), seed: int = 5) -> dict[str, torch.Tensor]:
    """A PEFT LoHa folder: `<module>.hada_w1_a` (out, r), `hada_w1_b` (r, in), `hada_w2_a`, `hada_w2_b` likewise;
    ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_f, in_f) in _module_keys(list(targets)):
        for w in ("hada_w1", "hada_w2"):
            tensors[f"{key}.{w}_a"] = torch.randn(out_f, r, generator=g) * 0.2
            tensors[f"{key}.{w}_b"] = torch.randn(r, in_f, generator=g) * 0.2
    _save_adapter(root, tensors, {
        "peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": r, "alpha": alpha, "target_modules": list(targets),
        "base_model_name_or_path": str(base_path), "rank_dropout": 0.0, "module_dropout": 0.0,
        "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {},
        "exclude_modules": None, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True, "peft_version": "0.21.2"})
    return tensors


def make_ia3(root: Path, base_path: Path, targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj"),
             feedforward: tuple[str, ...] = ("down_proj",), seed: int = 6) -> dict[str, torch.Tensor]:
    """A PEFT IA3 folder: `<module>.ia3_l`, (out, 1) for attention modules (scales output rows) and (1, in) for
    `feedforward_modules` (scales input columns); values near 1."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_f, in_f) in _module_keys(list(targets)):
        shape = (1, in_f) if key.rsplit(".", 1)[1] in feedforward else (out_f, 1)
        tensors[key + ".ia3_l"] = 1 + torch.randn(shape, generator=g) * 0.1
    _save_adapter(root, tensors, {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": list(targets),
        "feedforward_modules": list(feedforward), "base_model_name_or_path": str(base_path), "fan_in_fan_out": False,
        "init_ia3_weights": True, "exclude_modules": None, "modules_to_save": None, "inference_mode": True,
        "peft_version": "0.21.2"})
    return tensors


def recipe_inputs(recipes: Path) -> dict[str, Callable[[Path], object]]:
    """What the recipes in ``recipes`` name, relative to it, and how to build each (into the path it is given).

    math and code share rank 8 (recipes/factors.yaml reproduces PEFT, which needs equal ranks) but differ in
    alpha and targets (they overlap on q_proj); chat is an rsLoRA of rank 16.
    """
    base = recipes / "base"
    return {
        "base": make_base,
        "adapters/math": lambda p: make_lora(p, base, r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=11),
        "adapters/code": lambda p: make_lora(p, base, r=8, alpha=32,
                                             targets=("q_proj", "k_proj", "o_proj", "up_proj"), seed=12),
        "adapters/chat": lambda p: make_lora(p, base, r=16, alpha=16, targets=("q_proj", "v_proj", "gate_proj"),
                                             seed=13, use_rslora=True),
        "adapters/style-loha": lambda p: make_loha(p, base, r=4, alpha=8, seed=14),
        "adapters/tone-ia3": lambda p: make_ia3(p, base, seed=15),
    }


def is_complete(folder: Path) -> bool:
    """A model folder whose index names only shards that are there, or an adapter folder with both files."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file():
        try:
            shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return False
        return bool(shards) and all((folder / s).is_file() for s in shards)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "peft_type" in config and (folder / "adapter_model.safetensors").is_file()


def _sweep_dead_builds(recipes: Path) -> None:
    """Remove the temporary folders of demo runs that died mid-build (their process is gone)."""
    for p in recipes.glob(BUILD_PREFIX + "*"):
        pid = p.name[len(BUILD_PREFIX):].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
            continue  # still building
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def build_recipe_inputs(recipes: Path = RECIPES) -> list[tuple[str, str]]:
    """Lay out every recipe input under ``recipes``; returns (relative path, 'built' | 'kept') for each.

    Idempotent: a folder that is there and complete is kept as it is; one that is there but incomplete is an
    error (it may be yours: the demo never deletes it). A new folder is built under a temporary name beside
    ``recipes`` and renamed into place, so an interrupted run leaves no half folder where a recipe looks.
    """
    recipes.mkdir(parents=True, exist_ok=True)
    _sweep_dead_builds(recipes)
    done = []
    for rel, build in recipe_inputs(recipes).items():
        dest = recipes / rel
        if dest.exists():
            if not is_complete(dest):
                raise SystemExit(f"{dest} exists but is not a complete model or adapter folder; "
                                 "remove it and run the demo again")
            done.append((rel, "kept"))
            continue
        tmp = recipes / f"{BUILD_PREFIX}{os.getpid()}-{rel.replace('/', '-')}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):  # anything but another run having put it there first
                raise
            done.append((rel, "kept"))
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        done.append((rel, "built"))
    return done


def unload_demo(work: Path) -> bool:
    base_dir, lora_dir, out_dir = work / "base", work / "lora", work / "merged"
    print(f"demo folder: {work}")
    base = make_base(base_dir)
    lora = make_lora(lora_dir, base_dir)
    print(f"made a {len(base)}-tensor bf16 base (2 shards) and a {len(lora) // 2}-module LoRA adapter (r=8, alpha=16)")

    cmd = [sys.executable, "-m", "adaptool", "unload", f"{base_dir}+{lora_dir}", "-o", str(out_dir), "--json"]
    print("$ adaptool unload", f"{base_dir}+{lora_dir}", "-o", out_dir, "--json")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return False
    summary = json.loads(proc.stdout)

    merged = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        merged |= load_file(str(f))
    exact = changed = 0
    for name, w in base.items():
        key = "base_model.model." + name[: -len(".weight")]
        expected = w
        if key + ".lora_A.weight" in lora:
            b, a = lora[key + ".lora_B.weight"], lora[key + ".lora_A.weight"]
            expected = (w.float() + (b @ a) * (16 / 8)).to(torch.bfloat16)
            changed += 1
        exact += torch.equal(merged[name], expected)
    print(f"\nreport\n  output:            {summary['output']} ({sorted(p.name for p in out_dir.iterdir())})")
    print(f"  tensors changed:   {summary['tensors_changed']} of {summary['tensors_total']} (expected {changed})")
    print(f"  exact tensors:     {exact} of {len(base)} equal bf16(W + alpha/r * B @ A)")
    print(f"  delta retention:   {summary['delta_retention']:.4f} (share of the change that survived bf16 rounding)")
    print(f"  time, peak RSS:    {summary['seconds']:.3f} s, {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
    return exact == len(base) and summary["tensors_changed"] == changed


def recipes_demo(recipes: Path, work: Path) -> bool:
    """Build the recipes' inputs, then run the headline recipe once with -o into ``work`` (never into DIR/out)."""
    print(f"\nrecipe inputs in {recipes}:")
    for rel, what in build_recipe_inputs(recipes):
        print(f"  {what:6} {rel}")
    headline = recipes / "ties.yaml"
    if headline.is_file():
        out = work / "recipe-ties"
        print(f"$ adaptool merge {headline} -o {out}")
        proc = subprocess.run([sys.executable, "-m", "adaptool", "merge", str(headline), "-o", str(out), "--json"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return False
        print(f"  wrote {sorted(p.name for p in out.iterdir())}")
    shown = recipes if recipes != RECIPES else Path("recipes")
    see = f"   (see {shown / 'README.md'})" if (recipes / "README.md").is_file() else ""
    print(f"\nnow run any recipe, e.g.  adaptool merge {shown / 'ties.yaml'}{see}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?", type=Path, help="where the unload demo writes (default: a new temp folder)")
    parser.add_argument("--recipes", type=Path, default=RECIPES, help="where the recipes' inputs go (default: %(default)s)")
    args = parser.parse_args(argv)
    work = args.workdir if args.workdir is not None else Path(tempfile.mkdtemp(prefix="adaptool-demo-"))
    ok = unload_demo(work) and recipes_demo(args.recipes.resolve(), work)
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
