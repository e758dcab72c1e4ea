"""Benchmark ``adaptool merge``: against PEFT's ``add_weighted_adapter`` (svd, linear, ties into an adapter), and
ties / dare_ties / dare_linear / magnitude_prune folded into a base against a one-adapter ``unload`` of it.

Usage:
    python benchmarks/merge.py                         # everything (PEFT's svd alone takes ~5 min on 2 cores)
    python benchmarks/merge.py --peft linear ties      # PEFT only for the fast types
    python benchmarks/merge.py --sections base         # only the merges into the base, 3 rounds
    python benchmarks/merge.py --sections base --into-base ties --repeat 5 --convention mergekit

Inputs (synthetic, cached in benchmarks/.cache): the ~1.6 GiB Llama-shaped bf16 base of benchmarks/unload.py,
adapter A r=16 all-linear, adapter B r=8 rsLoRA all-linear (for svd), adapter C r=16 all-linear (PEFT's
linear/ties need equal ranks). Each run is its own process; peak RSS is that process's.

Two figures per adaptool run: end to end (the command, start-up included: Python, ``import torch``) and
in-process (the ``seconds`` of ``--json``: the merge call itself). PEFT's script reports the same split (loading
the model and adapters vs the ``add_weighted_adapter`` call vs saving), and each ratio compares like with like.
For svd the script also checks, on a few modules, the distance of each result to the best rank-16 approximation
of the exact weighted sum.

Merges into the base: every round runs the one-adapter unload and then each strategy, back to back, with the
1-minute load average before each run (other jobs on a shared machine skew every timing; only ratios measured
in one round mean something); the table ends with the median ratio per strategy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (CACHE, adaptool_cmd, drop_output, ensure_inputs, gib, load_average, measure,  # noqa: E402
                    print_table, warm)

PEFT_MERGE = """
import sys, json, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, a, b, ctype, wa, wb, out = sys.argv[1:8]
kw = json.loads(sys.argv[8])
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, a, adapter_name="a")
model.load_adapter(b, adapter_name="b")
t1 = time.perf_counter()
model.add_weighted_adapter(["a", "b"], [float(wa), float(wb)], "merged", combination_type=ctype, **kw)
t2 = time.perf_counter()
model.save_pretrained(out, selected_adapters=["merged"])
print(json.dumps({"load": t1 - t0, "merge": t2 - t1, "save": time.perf_counter() - t2}))
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

INTO_BASE = ("ties", "dare_ties", "dare_linear", "magnitude_prune")


def adaptool_merge(recipe_text: str, out: Path) -> dict:
    """One ``adaptool merge`` process: wall seconds, peak RSS, and its ``--json`` summary (``seconds``: in-process)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(recipe_text)
    drop_output(out)
    r = measure(adaptool_cmd("merge", f.name, "--json", "--force"))
    Path(f.name).unlink()
    r["summary"] = json.loads(r["stdout"])
    return r


def adapter_section(base: Path, loras: tuple[Path, Path, Path], out: Path, device: str, peft_types: list[str]):
    """Merges into an adapter, each against PEFT's ``add_weighted_adapter``: table rows and the svd check."""
    lora_a, lora_b, lora_c = loras
    rows, svd_check = [], None
    cases = [
        ("svd", lora_a, lora_b, "parameters: {rank: 16}", {"svd_rank": 16}),
        ("linear", lora_a, lora_c, "", {}),
        ("ties", lora_a, lora_c, "parameters: {density: 0.5, rank: 16}", {"density": 0.5}),
    ]
    for strategy, a, b, params, peft_kw in cases:
        recipe = (f"adapters:\n  - {{path: {a}, weight: 0.6}}\n  - {{path: {b}, weight: 0.4}}\n"
                  f"strategy: {strategy}\n{params}\noutput: {{path: {out}/{strategy}, dtype: float32}}\n"
                  f"device: {device}\n")
        load = load_average()
        ours = adaptool_merge(recipe, out / strategy)
        s = ours["summary"]
        note = f"energy {s['energy_kept']['mean']:.3f}" if s.get("energy_kept") else "exact"
        rows.append((strategy, "adaptool (adapter)", f"{ours['seconds']:.2f}", f"{s['seconds']:.2f}",
                     gib(ours["peak_rss"]), f"rank {s.get('rank')}, {note}", load))
        if strategy in peft_types:
            peft_out = out / f"peft-{strategy}"
            drop_output(peft_out)
            load = load_average()
            peft = measure([sys.executable, "-c", PEFT_MERGE, str(base), str(a), str(b), strategy, "0.6", "0.4",
                            str(peft_out), json.dumps(peft_kw)])
            phases = json.loads(peft["stdout"].strip().splitlines()[-1])
            rows.append((strategy, "PEFT add_weighted_adapter", f"{peft['seconds']:.2f}", f"{phases['merge']:.2f}",
                         gib(peft["peak_rss"]),
                         f"adaptool {peft['seconds'] / ours['seconds']:.0f}x faster end to end, "
                         f"{phases['merge'] / s['seconds']:.0f}x in-process", load))
        if strategy == "svd":
            peft_dir = str(out / "peft-svd") if "svd" in peft_types else "-"
            svd_check = measure([sys.executable, "-c", CHECK, str(a), str(b), str(out / "svd"), peft_dir,
                                 "0.6", "0.4", "16"])
    return rows, svd_check


def base_section(base: Path, loras: tuple[Path, Path], out: Path, device: str, strategies: list[str], repeat: int,
                 convention: str) -> list[tuple]:
    """``repeat`` rounds of a one-adapter unload then each strategy into the base, back to back: table rows."""
    lora_a, lora_c = loras
    warm(base)
    rows, ratios = [], {s: [] for s in strategies}
    unload_cmd = adaptool_cmd("unload", f"{base}+{lora_a}", "-o", str(out / "unload"), "--device", device, "--json",
                              "--force")
    for i in range(repeat):
        load = load_average()
        drop_output(out / "unload")
        unload = measure(unload_cmd)
        drop_output(out / "unload")
        engine = json.loads(unload["stdout"])["seconds"]
        rows.append((f"#{i + 1}", "unload (1 adapter)", f"{unload['seconds']:.2f}", f"{engine:.2f}",
                     gib(unload["peak_rss"]), "1.00x", load))
        for strategy in strategies:
            recipe = (f"base: {base}\nadapters:\n  - {{path: {lora_a}, weight: 0.6}}\n"
                      f"  - {{path: {lora_c}, weight: 0.4}}\n"
                      f"strategy: {strategy}\nparameters: {{density: 0.5, seed: 1, convention: {convention}}}\n"
                      f"output: {{path: {out}/{strategy}-model, kind: model}}\ndevice: {device}\n")
            load = load_average()
            merged = adaptool_merge(recipe, out / f"{strategy}-model")
            drop_output(out / f"{strategy}-model")
            ratio = merged["seconds"] / unload["seconds"]
            ratios[strategy].append(ratio)
            rows.append((f"#{i + 1}", f"{strategy} (2 adapters, {convention})", f"{merged['seconds']:.2f}",
                         f"{merged['summary']['seconds']:.2f}", gib(merged["peak_rss"]), f"{ratio:.2f}x", load))
    for strategy, rs in ratios.items():
        rows.append(("median", f"{strategy} / unload", "", "", "", f"{sorted(rs)[len(rs) // 2]:.2f}x", ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peft", nargs="*", default=["svd", "linear", "ties"], help="PEFT types to run (none: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sections", nargs="+", default=["adapter", "base"], choices=["adapter", "base"])
    ap.add_argument("--into-base", nargs="*", default=list(INTO_BASE), choices=INTO_BASE,
                    help="strategies merged into the base (none: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the merges into the base")
    ap.add_argument("--convention", default="peft", choices=["peft", "mergekit"])
    args = ap.parse_args()
    base, (lora_a, lora_b, lora_c) = ensure_inputs(16, [
        {"name": "r16", "r": 16, "alpha": 32},
        {"name": "r8-rslora", "r": 8, "alpha": 16, "use_rslora": True, "seed": 2},
        {"name": "r16-c", "r": 16, "alpha": 16, "seed": 3},
    ])
    out = CACHE / "merge-out"
    header = ("", "route", "seconds", "in-process", "peak RSS", "", "load")
    if "adapter" in args.sections:
        rows, svd_check = adapter_section(base, (lora_a, lora_b, lora_c), out, args.device, args.peft)
        print_table(rows, header)
        if svd_check:
            print("\nsvd: relative distance to the best rank-16 approximation of 0.6·ΔA + 0.4·ΔB (float64 reference)")
            for m, e in json.loads(svd_check["stdout"]).items():
                peft = f"{e['peft']:.2e}" if e["peft"] is not None else "not run"
                print(f"  {m}: adaptool {e['adaptool']:.2e}, PEFT {peft}")
        print()
    if "base" in args.sections and args.into_base:
        rows = base_section(base, (lora_a, lora_c), out, args.device, args.into_base, args.repeat, args.convention)
        print_table(rows, ("round", "into the base", "seconds", "in-process", "peak RSS", "vs unload", "load"))
    drop_output(out)


if __name__ == "__main__":
    main()
