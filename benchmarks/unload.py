"""Benchmark ``adaptool unload`` against ``cp -r`` + ``sync`` of the base, and against PEFT's route.

Usage:
    python benchmarks/unload.py                 # 16-layer (~1.6 GiB) and 2-layer bases, CPU
    python benchmarks/unload.py --device cuda   # the math on a GPU
    python benchmarks/unload.py --skip-peft     # without the (slow, memory-hungry) PEFT route
    python benchmarks/unload_3b.py              # the 3B-shaped 7.2 GB base (this script with --shape 3b)

Bases and adapters are synthetic (random bf16; ``llama``: hidden 2048, intermediate 5632, vocab 32000, 4 shards;
``3b``: see ``common.SHAPES``) with an r=16 all-linear LoRA, cached in benchmarks/.cache. Each tool runs in its own
process after a ``sync``, and each figure includes a ``sync`` of what it wrote ("until the bytes are on disk"); peak
RSS is that process's. On a shared machine only ratios measured back to back mean something: every repeat runs
``cp -r`` + ``sync`` and adaptool + ``sync`` one after the other (alternating which goes first), with the 1-minute
load average before the pair; the median pair ratio is the result. The base is read once beforehand so both find
it in the page cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (CACHE, adaptool_cmd, cp_sync, drop_output, ensure_inputs, gib, load_average, measure,  # noqa: E402
                    print_table, warm)

PEFT_ROUTE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="500MB")
"""
HEADER = ("model", "size", "route", "seconds", "peak RSS", "vs cp", "load")


def pairs(base: Path, lora: Path, out: Path, device: str, repeat: int) -> list[dict]:
    """``repeat`` back-to-back pairs of ``cp -r`` + ``sync`` and adaptool unload + ``sync``."""
    cmd = " ".join(adaptool_cmd("unload", f"{base}+{lora}", "-o", str(out), "--device", device, "--json"))
    found = []
    for i in range(repeat):
        load = load_average()
        order = ["cp", "ours"] if i % 2 == 0 else ["ours", "cp"]
        run = {}
        for which in order:
            drop_output(out)
            run[which] = cp_sync(base, out) if which == "cp" else measure(["bash", "-c", f"{cmd} && sync"])
        drop_output(out)
        run["ratio"] = run["ours"]["seconds"] / run["cp"]["seconds"]
        run["load"] = f"{load}-{load_average()}"
        run["engine"] = json.loads(run["ours"]["stdout"])["seconds"]
        found.append(run)
    return found


def bench(layers: int, device: str, peft: bool, repeat: int, shape: str = "llama") -> list[tuple]:
    base, (lora,) = ensure_inputs(layers, [{"name": "r16", "r": 16, "alpha": 32}], shape)
    out = CACHE / "out"
    size = gib(sum(f.stat().st_size for f in base.glob("*.safetensors")))
    name = f"{layers}L" if shape == "llama" else f"{shape} {layers}L"
    warm(base)
    runs = pairs(base, lora, out, device, repeat)
    rows = []
    for i, r in enumerate(runs):
        rows.append((name, size, f"#{i + 1} cp -r + sync", f"{r['cp']['seconds']:.2f}", gib(r["cp"]["peak_rss"]),
                     "1.00x", r["load"]))
        rows.append((name, size, f"#{i + 1} adaptool unload ({device}) + sync", f"{r['ours']['seconds']:.2f}",
                     gib(r["ours"]["peak_rss"]), f"{r['ratio']:.2f}x", f"engine {r['engine']:.2f} s"))
    mid = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    rows.append((name, size, "median pair: adaptool / cp", f"{mid['ours']['seconds']:.2f} / {mid['cp']['seconds']:.2f}",
                 gib(max(r["ours"]["peak_rss"] for r in runs)), f"{mid['ratio']:.2f}x", mid["load"]))
    if peft:
        drop_output(out)
        load = load_average()
        p = measure(["bash", "-c", f"{sys.executable} -c '{PEFT_ROUTE}' {base} {lora} {out} && sync"])
        drop_output(out)
        rows.append((name, size, "PEFT merge_and_unload + sync", f"{p['seconds']:.2f}", gib(p["peak_rss"]),
                     f"{p['seconds'] / mid['cp']['seconds']:.2f}x", load))
        rows.append((name, "", "-> adaptool vs PEFT", f"{p['seconds'] / mid['ours']['seconds']:.1f}x faster",
                     f"{mid['ours']['peak_rss'] / p['peak_rss']:.2f} of RSS", "", ""))
    return rows


def main(defaults: dict | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="llama", choices=["llama", "3b"])
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--skip-peft", action="store_true", help="leave PEFT's route out")
    ap.add_argument("--peft", action="store_true", help="run PEFT's route (the default except for --shape 3b)")
    ap.add_argument("--repeat", type=int, default=3, help="back-to-back pairs per model; the median ratio is shown")
    ap.set_defaults(**(defaults or {}))
    args = ap.parse_args()
    peft = args.peft or (args.shape == "llama" and not args.skip_peft)
    rows = []
    for layers in args.layers:
        rows += bench(layers, args.device, peft, args.repeat, args.shape)
    print_table(rows, HEADER)


if __name__ == "__main__":
    main()
