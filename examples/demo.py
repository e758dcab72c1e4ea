"""adaptool in one minute: make a tiny base model and a LoRA adapter, unload, and check the result.

    python examples/demo.py [WORKDIR]

Everything is made here with torch + safetensors (no download): a 2-layer Llama-shaped bf16 checkpoint in
two shards, and a PEFT-format LoRA adapter (r=8, alpha=16) on q_proj/v_proj/down_proj. Then the real CLI
runs `adaptool unload base+lora -o merged`, and the demo checks every merged weight against W + (alpha/r)·B·A
computed independently.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS, VOCAB = 64, 128, 2, 256


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


def make_lora(root: Path, base_path: Path, r: int = 8, alpha: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(LAYERS):
        for mod, (out_f, in_f) in {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
                                   "mlp.down_proj": (HIDDEN, INTER)}.items():
            key = f"base_model.model.model.layers.{i}.{mod}"
            tensors[key + ".lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
            tensors[key + ".lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    root.mkdir(parents=True)
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "base_model_name_or_path": str(base_path), "use_rslora": False, "fan_in_fan_out": False}, indent=2))
    return tensors


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="adaptool-demo-"))
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
        return proc.returncode
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
    ok = exact == len(base) and summary["tensors_changed"] == changed
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
