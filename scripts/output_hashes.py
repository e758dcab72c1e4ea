"""Hash every output of a fixed set of runs, to show that a refactor changed no byte.

    python scripts/output_hashes.py build /tmp/fx                    # tiny models + one adapter per type
    python scripts/output_hashes.py run /tmp/fx --code .  > new.json # every case, with the code in .
    git worktree add /tmp/old <commit>
    python scripts/output_hashes.py run /tmp/fx --code /tmp/old > old.json
    diff old.json new.json && echo identical

``run`` calls ``python -m adaptool`` with ``PYTHONPATH=<code>``, so any version of the CLI can be measured
against the same fixtures. The cases: ``unload`` of every adapter type PEFT can merge (Llama and GPT-2),
several adapters at once, a dtype change, and every recipe under ``recipes/`` (as tests/test_recipes_run.py runs them).
Needs the test extra (transformers, peft) for ``build``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(root: Path) -> None:
    import torch
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_adapter, save_model, tiny_llama_config
    from conftest import make_peft_adapter
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    llama = root / "llama"
    save_model(AutoModelForCausalLM.from_config(tiny_llama_config()).to(torch.bfloat16), llama)
    torch.manual_seed(0)
    gpt2 = save_model(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)),
                      root / "gpt2", shard=None)
    qv = ["q_proj", "v_proj"]
    make_adapter(llama, root / "lora", r=4, lora_alpha=8, target_modules=[*qv, "down_proj"])
    make_adapter(llama, root / "rslora", seed=1, r=8, lora_alpha=4, use_rslora=True, target_modules=qv)
    make_adapter(llama, root / "dora", seed=2, r=4, lora_alpha=8, use_dora=True, target_modules=qv)
    make_adapter(llama, root / "lora_emb", seed=3, r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"],
                 modules_to_save=["lm_head"])
    make_adapter(gpt2, root / "gpt2_lora", seed=4, dtype=torch.float32, r=4, lora_alpha=8,
                 target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    peft_types = {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=[*qv, "down_proj"], init_weights=False),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"], init_weights=False),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, lora_alpha=16, total_step=10, init_lora_weights=False,
                                 target_modules=qv),
        "oft": OFTConfig(oft_block_size=16, target_modules=qv, init_weights=False),
    }
    for name, config in peft_types.items():
        make_peft_adapter(llama, root / name, config)
    recipes = root / "recipes"
    # only the recipes: the demo's inputs and outputs (git-ignored) may lie beside them
    shutil.copytree(REPO / "recipes", recipes, ignore=shutil.ignore_patterns("base", "adapters", "out", ".demo-build-*"))
    shutil.copytree(llama, recipes / "base")
    for i, name in enumerate(["math", "code", "chat"]):
        make_adapter(recipes / "base", recipes / "adapters" / name, seed=10 + i, r=4, lora_alpha=8, target_modules=qv)
    make_peft_adapter(recipes / "base", recipes / "adapters" / "style-loha",
                      LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], init_weights=False))
    make_peft_adapter(recipes / "base", recipes / "adapters" / "tone-ia3",
                      IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                init_ia3_weights=False))


def cases(root: Path) -> dict[str, list[str]]:
    out = root / "out"
    found = {}
    for name in ["lora", "rslora", "dora", "lora_emb", "loha", "lokr", "ia3", "adalora", "oft"]:
        found[f"unload-{name}"] = ["unload", f"{root / 'llama'}+{root / name}", "-o", str(out / f"unload-{name}")]
    found["unload-gpt2"] = ["unload", f"{root / 'gpt2'}+{root / 'gpt2_lora'}", "-o", str(out / "unload-gpt2")]
    found["unload-three"] = ["unload", f"{root / 'llama'}+{root / 'lora'}+{root / 'loha'}+{root / 'ia3'}",
                             "-o", str(out / "unload-three")]
    found["unload-fp16"] = ["unload", f"{root / 'llama'}+{root / 'lora'}", "-o", str(out / "unload-fp16"),
                            "--dtype", "float16"]
    for recipe in sorted((root / "recipes").glob("*.yaml")):
        found[f"merge-{recipe.stem}"] = ["merge", str(recipe), "-o", str(out / f"merge-{recipe.stem}"), "--device", "cpu"]
    return found


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(root: Path, code: Path) -> dict:
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code.resolve()), "HF_HUB_OFFLINE": "1"}
    results = {}
    for name, args in cases(root).items():
        proc = subprocess.run([sys.executable, "-m", "adaptool", *args], capture_output=True, text=True, env=env,
                              cwd=root)
        target = Path(args[args.index("-o") + 1])
        results[name] = file_hashes(target) if proc.returncode == 0 else {"error": proc.stderr.strip()[-300:]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("fixtures", type=Path)
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose adaptool runs (default: this one)")
    args = parser.parse_args()
    if args.action == "build":
        build(args.fixtures)
    else:
        print(json.dumps(run(args.fixtures, args.code), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
