"""Benchmark ``adaptool extract`` on the 1.6 GiB benchmark pair (base vs base + r16 LoRA unloaded) at rank 16,
against ``adaptool unload`` of the same base (the target: extract ≤ 2x its wall time, peak RSS ≤ 1 GiB) and
against mergekit's ``mergekit-extract-lora`` when it is installed.

Usage:
    python benchmarks/extract.py                        # CPU, median of 3 runs each
    python benchmarks/extract.py --check-best 4         # + the error of 4 modules against their float64 best rank-16
    python benchmarks/extract.py --mergekit /path/to/mergekit-extract-lora   # default: found on PATH
    python benchmarks/extract.py --rule="--sv-fro 0.9 --max-rank 64"          # another rank rule

mergekit is not a dependency of adaptool; to compare, install it beside it, e.g. in a venv of its own that sees
this one's packages (``python -m venv mk && echo $(python -c 'import site; print(site.getsitepackages()[0])') >
mk/lib/python3.11/site-packages/up.pth && mk/bin/pip install mergekit``).

The base and adapter are synthetic (random bf16, Llama shapes: hidden 2048, intermediate 5632, vocab 32000, 16
layers); TUNED is ``adaptool unload base+lora`` (bf16), so each ΔW is rank 16 plus bf16 rounding noise. Each tool
runs in its own process; peak RSS is that process's. Everything is cached in benchmarks/.cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, adaptool_cmd, drop_output, ensure_inputs, gib, measure, median_run, print_table  # noqa: E402

# Run in a child (this process never imports torch, so that its RSS does not leak into the children's figures):
# for each module, the float64 best rank-k error of the true ΔW, adaptool's measured error, and mergekit's.
CHECK_BEST = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from adaptool.io.checkpoint import Checkpoint
from adaptool.io.safetensors_file import load_tensor
base, tuned = Checkpoint.open(sys.argv[2]), Checkpoint.open(sys.argv[3])
ours, mergekit, modules = sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
def factors(folder, module):
    from safetensors import safe_open
    with safe_open(folder + "/adapter_model.safetensors", "pt") as f:
        key = "base_model.model." + module
        return f.get_tensor(key + ".lora_B.weight").double() @ f.get_tensor(key + ".lora_A.weight").double()
rows = []
for module, k in modules:
    name = module + ".weight"
    D = load_tensor(tuned.tensors[name]).double() - load_tensor(base.tensors[name]).double()
    S = torch.linalg.svdvals(D)
    best = float((S[k:] ** 2).sum().sqrt() / D.norm())
    row = {"module": module, "rank": k, "best": best, "ours": float((D - factors(ours, module)).norm() / D.norm())}
    if mergekit:
        row["mergekit"] = float((D - factors(mergekit, module)).norm() / D.norm())
    rows.append(row)
print(json.dumps(rows))
"""


def tuned_model(base: Path, lora: Path) -> Path:
    tuned = CACHE / "llama-16L-tuned-r16"
    if not (tuned / "config.json").exists():
        drop_output(tuned)
        subprocess.run(adaptool_cmd("unload", f"{base}+{lora}", "-o", str(tuned), "--quiet"), check=True)
    return tuned


def run_adaptool(args: list[str], repeat: int) -> dict:
    """Median of ``repeat`` runs of ``adaptool ARGS --json`` followed by ``sync`` (as for unload's benchmark)."""
    runs = []
    for _ in range(repeat):
        drop_output(Path(args[args.index("-o") + 1]))
        runs.append(measure(["bash", "-c", " ".join(adaptool_cmd(*args, "--json")) + " && sync"]))
    best = median_run(runs)
    best["summary"] = json.loads(best["stdout"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3, help="runs per adaptool command; the median is shown")
    ap.add_argument("--rule", default="--rank 16", help="the rank rule, as extract takes it (write --rule=...)")
    ap.add_argument("--check-best", type=int, default=0, help="modules to check against a float64 SVD")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-extract-lora"), help="mergekit-extract-lora to time")
    args = ap.parse_args()
    rule = args.rule.split()
    base, (lora,) = ensure_inputs(16, [{"name": "r16", "r": 16, "alpha": 32}])
    tuned = tuned_model(base, lora)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    out, ext_out, mk_out = CACHE / "out", CACHE / "extract-out", CACHE / "mergekit-out"

    unload = run_adaptool(["unload", f"{base}+{lora}", "-o", str(out), "--device", args.device], args.repeat)
    drop_output(out)
    ours = run_adaptool(["extract", str(base), str(tuned), "-o", str(ext_out), "--device", args.device, *rule],
                        args.repeat)
    s = ours["summary"]
    rows = [("adaptool unload (same base)", f"{unload['seconds']:.2f}", gib(unload["peak_rss"]), "1.00x", ""),
            (f"adaptool extract {' '.join(rule)}", f"{ours['seconds']:.2f}", gib(ours["peak_rss"]),
             f"{ours['seconds'] / unload['seconds']:.2f}x", f"{s['bytes_written'] / 2**20:.1f} MiB")]
    mergekit = None
    if args.mergekit:
        drop_output(mk_out)
        cmd = [args.mergekit, "--model", str(tuned), "--base-model", str(base), "--out-path", str(mk_out),
               "--max-rank", rule[-1] if rule[0] == "--rank" else "16", "--quiet"]
        mergekit = measure(["bash", "-c", " ".join(cmd) + " && sync"])
        mk_bytes = sum(f.stat().st_size for f in mk_out.glob("*.safetensors"))
        rows.append(("mergekit-extract-lora --max-rank", f"{mergekit['seconds']:.2f}", gib(mergekit["peak_rss"]),
                     f"{mergekit['seconds'] / unload['seconds']:.2f}x", f"{mk_bytes / 2**20:.1f} MiB"))
    print(f"base {gib(size)}, {len(s['modules'])} modules, ranks {s['rank_out']}, engine {s['seconds']:.2f} s; "
          f"error mean {s['error']['mean']:.4f}, max {s['error']['max']:.4f}; methods "
          f"{sorted({m['method'] for m in s['modules']})}")
    print_table(rows, ("route", "seconds", "peak RSS", "vs unload", "output"))
    if not args.mergekit:
        print("mergekit-extract-lora: not found (pip install mergekit, in a venv of its own; see --help)")
    if args.check_best:
        check_best(base, tuned, ext_out, mk_out if mergekit else None, s, args.check_best)
    drop_output(ext_out)


def check_best(base: Path, tuned: Path, ours: Path, mergekit: Path | None, summary: dict, n: int) -> None:
    """The float64 best rank-k error of ``n`` modules (spread over the model) against adaptool's and mergekit's."""
    records = summary["modules"]
    picks = [records[round(i * (len(records) - 1) / max(1, n - 1))] for i in range(n)]
    proc = subprocess.run([sys.executable, "-c", CHECK_BEST, str(Path(__file__).parent.parent), str(base), str(tuned),
                           str(ours), str(mergekit or ""), json.dumps([[r["module"], r["rank"]] for r in picks])],
                          check=True, capture_output=True, text=True)
    rows = []
    for row, rec in zip(json.loads(proc.stdout), picks):
        mk = f"{row['mergekit']:.6f} ({row['mergekit'] / row['best'] - 1:+.1e})" if "mergekit" in row else "-"
        rows.append((row["module"], str(row["rank"]), f"{row['best']:.6f}",
                     f"{rec['error']:.6f} ({rec['error'] / row['best'] - 1:+.1e})",
                     f"{row['ours']:.6f} ({rec['error_written']:.6f} reported)", mk))
    print_table(rows, ("module", "rank", "best rank-k error", "adaptool truncation (/ best - 1)",
                       "adaptool as written", "mergekit as written (/ best - 1)"))

if __name__ == "__main__":
    main()
