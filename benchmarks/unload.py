"""Benchmark ``adaptool unload`` against PEFT's route and against ``cp -r`` + ``sync`` of the base.

Usage:
    python benchmarks/unload.py                 # 16-layer (~1.6 GiB) and 2-layer bases, CPU
    python benchmarks/unload.py --device cuda   # the math on a GPU
    python benchmarks/unload.py --skip-peft     # without the (slow, memory-hungry) PEFT route

Bases and adapters are synthetic (random bf16, Llama shapes: hidden 2048, intermediate 5632, vocab 32000,
4 shards) and cached in benchmarks/.cache. Each tool runs in its own process; peak RSS is that process's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, adaptool_cmd, cp_sync, drop_output, ensure_inputs, gib, measure, median_run, print_table  # noqa: E402

PEFT_ROUTE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="500MB")
"""


def bench(layers: int, device: str, skip_peft: bool, repeat: int) -> list[tuple]:
    base, (lora,) = ensure_inputs(layers, [{"name": "r16", "r": 16, "alpha": 32}])
    out = CACHE / "out"
    rows = []
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))

    cp = median_run([cp_sync(base, out) for _ in range(repeat)])
    rows.append((f"{layers}L", gib(size), "cp -r + sync", f"{cp['seconds']:.2f}", gib(cp["peak_rss"]), "1.00x"))

    runs = []
    for _ in range(repeat):
        drop_output(out)
        # sync included, as for cp: both figures are "until the bytes are on disk"
        cmd = " ".join(adaptool_cmd("unload", f"{base}+{lora}", "-o", str(out), "--device", device, "--json"))
        runs.append(measure(["bash", "-c", f"{cmd} && sync"]))
    ours = median_run(runs)
    summary = json.loads(ours["stdout"])
    rows.append((f"{layers}L", gib(size), f"adaptool unload ({device}) + sync", f"{ours['seconds']:.2f}", gib(ours["peak_rss"]),
                 f"{ours['seconds'] / cp['seconds']:.2f}x"))
    if not skip_peft:
        drop_output(out)
        peft = measure(["bash", "-c", f"{sys.executable} -c '{PEFT_ROUTE}' {base} {lora} {out} && sync"])
        rows.append((f"{layers}L", gib(size), "PEFT merge_and_unload + sync", f"{peft['seconds']:.2f}", gib(peft["peak_rss"]),
                     f"{peft['seconds'] / cp['seconds']:.2f}x"))
        rows.append((f"{layers}L", "", "-> adaptool vs PEFT", f"{peft['seconds'] / ours['seconds']:.1f}x faster",
                     f"{ours['peak_rss'] / peft['peak_rss']:.2f} of RSS", ""))
    rows.append((f"{layers}L", "", "  (engine only)", f"{summary['seconds']:.2f}", "", f"changed {summary['tensors_changed']}"))
    drop_output(out)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool; the median is shown")
    args = ap.parse_args()
    rows = []
    for layers in args.layers:
        rows += bench(layers, args.device, args.skip_peft, args.repeat)
    print_table(rows, ("model", "size", "route", "seconds", "peak RSS", "vs cp"))


if __name__ == "__main__":
    main()
