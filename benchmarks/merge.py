"""Benchmark ``adaptool merge`` against PEFT's ``add_weighted_adapter`` (svd, linear, ties).

Usage:
    python benchmarks/merge.py                     # everything (PEFT's svd alone takes ~15 min on 2 cores)
    python benchmarks/merge.py --peft linear ties  # PEFT only for the fast types
    python benchmarks/merge.py --peft              # no PEFT runs at all

Inputs (synthetic, cached in benchmarks/.cache): the ~1.6 GiB Llama-shaped bf16 base of benchmarks/unload.py,
adapter A r=16 all-linear, adapter B r=8 rsLoRA all-linear (for svd), adapter C r=16 all-linear (PEFT's
linear/ties need equal ranks). Each run is its own process; peak RSS is that process's. For svd the script
also checks, on a few modules, the distance of each result to the best rank-16 approximation of the exact
weighted sum.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, adaptool_cmd, drop_output, ensure_inputs, gib, measure, print_table  # noqa: E402

PEFT_MERGE = """
import sys, json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, a, b, ctype, wa, wb, out = sys.argv[1:8]
kw = json.loads(sys.argv[8])
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, a, adapter_name="a")
model.load_adapter(b, adapter_name="b")
model.add_weighted_adapter(["a", "b"], [float(wa), float(wb)], "merged", combination_type=ctype, **kw)
model.save_pretrained(out, selected_adapters=["merged"])
"""

CHECK = """
import sys, json, torch
from safetensors.torch import load_file
a_dir, b_dir, ours_dir, peft_dir, wa, wb, rank = sys.argv[1:8]
wa, wb, rank = float(wa), float(wb), int(rank)
def load(d):
    t = load_file(d + "/adapter_model.safetensors"); c = json.load(open(d + "/adapter_config.json"))
    return {k.replace("base_model.model.", ""): v.float() for k, v in t.items()}, c
def scale(c, r):
    return c["lora_alpha"] / (r ** 0.5 if c.get("use_rslora") else r)
A, ca = load(a_dir); B, cb = load(b_dir); O, co = load(ours_dir)
P = load(peft_dir + "/merged")[0] if peft_dir != "-" else None
out = {}
for m in ["model.layers.0.self_attn.q_proj", "model.layers.7.mlp.down_proj", "model.layers.15.mlp.up_proj"]:
    d = lambda T, c: T[m + ".lora_B.weight"] @ T[m + ".lora_A.weight"] * scale(c, T[m + ".lora_A.weight"].shape[0])
    exact = (wa * d(A, ca) + wb * d(B, cb)).double()
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    err = lambda T: float((T[m + ".lora_B.weight"].double() @ T[m + ".lora_A.weight"].double() - best).norm() / best.norm())
    out[m] = {"adaptool": err(O), "peft": err(P) if P else None}
print(json.dumps(out))
"""


def adaptool_merge(recipe_text: str, out: Path) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(recipe_text)
    drop_output(out)
    r = measure(adaptool_cmd("merge", f.name, "--json", "--force"))
    r["summary"] = json.loads(r["stdout"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peft", nargs="*", default=["svd", "linear", "ties"], help="PEFT types to run (none: skip)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    base, (lora_a, lora_b, lora_c) = ensure_inputs(16, [
        {"name": "r16", "r": 16, "alpha": 32},
        {"name": "r8-rslora", "r": 8, "alpha": 16, "use_rslora": True, "seed": 2},
        {"name": "r16-c", "r": 16, "alpha": 16, "seed": 3},
    ])
    out = CACHE / "merge-out"
    rows = []
    cases = [
        ("svd", lora_a, lora_b, "parameters: {rank: 16}", {"svd_rank": 16}),
        ("linear", lora_a, lora_c, "", {}),
        ("ties", lora_a, lora_c, "parameters: {density: 0.5, rank: 16}", {"density": 0.5}),
    ]
    svd_check = None
    for strategy, a, b, params, peft_kw in cases:
        recipe = (f"adapters:\n  - {{path: {a}, weight: 0.6}}\n  - {{path: {b}, weight: 0.4}}\n"
                  f"strategy: {strategy}\n{params}\noutput: {{path: {out}/{strategy}, dtype: float32}}\n"
                  f"device: {args.device}\n")
        ours = adaptool_merge(recipe, out / strategy)
        s = ours["summary"]
        rows.append((strategy, "adaptool (adapter)", f"{ours['seconds']:.2f}", gib(ours["peak_rss"]),
                     f"rank {s.get('rank')}", f"energy {s['energy_kept']['mean']:.3f}" if s.get("energy_kept") else "exact"))
        if strategy in args.peft:
            peft_out = out / f"peft-{strategy}"
            drop_output(peft_out)
            peft = measure([sys.executable, "-c", PEFT_MERGE, str(base), str(a), str(b), strategy, "0.6", "0.4",
                            str(peft_out), json.dumps(peft_kw)])
            rows.append((strategy, "PEFT add_weighted_adapter", f"{peft['seconds']:.2f}", gib(peft["peak_rss"]),
                         f"-> adaptool {peft['seconds'] / ours['seconds']:.0f}x faster", ""))
        if strategy == "svd":
            peft_dir = str(out / "peft-svd") if "svd" in args.peft else "-"
            svd_check = measure([sys.executable, "-c", CHECK, str(a), str(b), str(out / "svd"), peft_dir, "0.6", "0.4", "16"])
    # ties folded into the base vs a one-adapter unload of the same base
    recipe = (f"base: {base}\nadapters:\n  - {{path: {lora_a}, weight: 0.6}}\n  - {{path: {lora_c}, weight: 0.4}}\n"
              f"strategy: ties\nparameters: {{density: 0.5}}\noutput: {{path: {out}/ties-model, kind: model}}\n"
              f"device: {args.device}\n")
    ties_model = adaptool_merge(recipe, out / "ties-model")
    drop_output(out / "unload")
    unload = measure(adaptool_cmd("unload", f"{base}+{lora_a}", "-o", str(out / "unload"), "--device", args.device))
    rows.append(("ties", "adaptool (into base)", f"{ties_model['seconds']:.2f}", gib(ties_model["peak_rss"]),
                 f"{ties_model['seconds'] / unload['seconds']:.2f}x of unload", ""))
    rows.append(("-", "adaptool unload (1 adapter)", f"{unload['seconds']:.2f}", gib(unload["peak_rss"]), "", ""))
    print_table(rows, ("strategy", "route", "seconds", "peak RSS", "", ""))
    if svd_check:
        print("\nsvd: relative distance to the best rank-16 approximation of 0.6·ΔA + 0.4·ΔB (float64 reference)")
        for m, e in json.loads(svd_check["stdout"]).items():
            peft = f"{e['peft']:.2e}" if e["peft"] is not None else "not run"
            print(f"  {m}: adaptool {e['adaptool']:.2e}, PEFT {peft}")
    drop_output(out)


if __name__ == "__main__":
    main()
