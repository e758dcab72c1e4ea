"""Benchmark ``adaptool resize`` on a 70B-shaped all-linear LoRA's factors (no base needed).

Usage:
    python benchmarks/resize.py                         # 80 layers, r64 -> rank 32, CPU (auto device)
    python benchmarks/resize.py --layers 8 --device cpu # a smaller slice of the same shapes
    python benchmarks/resize.py --rule --sv-fro 0.9     # another rule

Input (synthetic, cached in benchmarks/.cache): a PEFT adapter folder with random bf16 factors for every linear
layer of a Llama-3-70B-shaped model (hidden 8192, intermediate 28672, 8 KV heads of 128: q/o 8192x8192, k/v
1024x8192, gate/up 28672x8192, down 8192x28672), ``r`` 64, alpha 128: 80 layers x 7 modules, 1.55 GiB. The
command runs in its own process after a ``sync``; wall time and peak RSS are that process's. A child process
then checks a few modules against the exact best rank-k (float64 QR of each factor + SVD of the core, which is
the same answer as a dense SVD of ΔW).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, adaptool_cmd, drop_output, gib, print_table  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 8192, 28672, 1024
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
          "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
          "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE)}

BUILD = """
import json, math, sys, torch
from pathlib import Path
from safetensors.torch import save_file
path, layers, r, shapes = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
g = torch.Generator().manual_seed(0)
tensors = {}
for i in range(layers):
    for name, (out_f, in_f) in shapes.items():
        key = f"base_model.model.model.layers.{i}.{name}"
        tensors[key + ".lora_A.weight"] = (torch.randn(r, in_f, generator=g) / math.sqrt(in_f)).to(torch.bfloat16)
        tensors[key + ".lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.01).to(torch.bfloat16)
tmp = path.with_name(path.name + ".partial")
tmp.mkdir(parents=True, exist_ok=True)
save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
(tmp / "adapter_config.json").write_text(json.dumps({
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "llama-70b-shaped", "r": r,
    "lora_alpha": 2 * r, "target_modules": sorted({n.split(".")[-1] for n in shapes}), "lora_dropout": 0.0,
    "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True}, indent=2))
tmp.rename(path)
"""

CHECK = """
import json, sys, torch
from safetensors import safe_open
inp, out, r_in = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = json.load(open(out + "/adapter_config.json"))
res = {}
fi = safe_open(inp + "/adapter_model.safetensors", "pt")
fo = safe_open(out + "/adapter_model.safetensors", "pt")
names = sorted({k.rsplit(".lora_", 1)[0] for k in fo.keys()})
for m in [names[0], names[len(names) // 2], names[-1]]:
    b, a = fi.get_tensor(m + ".lora_B.weight").double() * 2.0, fi.get_tensor(m + ".lora_A.weight").double()
    qb, rb = torch.linalg.qr(b); qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    bo, ao = fo.get_tensor(m + ".lora_B.weight").double(), fo.get_tensor(m + ".lora_A.weight").double()
    k = ao.shape[0]
    # ‖B_o A_o − U_k S_k V_kᵀ‖ through the factors: both sides live in span(qb) x span(qa)
    core_best = (u[:, :k] * s[:k]) @ vh[:k]
    core_out = (qb.T @ bo) @ (ao @ qa)
    outside = float(((bo.T @ bo) * (ao @ ao.T)).sum() - core_out.norm() ** 2)  # ‖B_o A_o‖² = tr(BᵀB AAᵀ)
    err = float(((core_out - core_best).norm() ** 2 + max(outside, 0.0)) ** 0.5 / core_best.norm())
    res[m.removeprefix("base_model.model.")] = {"rank": k, "rel_err": err}
print(json.dumps(res))
"""


def measure_json(cmd: list[str], json_path: Path) -> dict:
    """Run ``cmd`` after a ``sync``, its stdout (``--json``: 100+ KB for 560 modules, more than a pipe holds)
    into ``json_path``; wall seconds, the child's peak RSS and the parsed summary."""
    subprocess.run(["sync"], check=True)
    with open(json_path, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "summary": json.loads(json_path.read_text())}


def build(layers: int, r: int) -> Path:
    path = CACHE / f"lora-70b-shaped-{layers}L-r{r}"
    if not (path / "adapter_config.json").exists():
        subprocess.run([sys.executable, "-c", BUILD, str(path), str(layers), str(r), json.dumps(SHAPES)], check=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--r", type=int, default=64, help="the input adapter's rank")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rule", nargs=argparse.REMAINDER, default=["--rank", "32"],
                   help="the rank rule, last on the line (default: --rank 32)")
    args = p.parse_args()
    adapter = build(args.layers, args.r)
    size = (adapter / "adapter_model.safetensors").stat().st_size
    modules = args.layers * len(SHAPES)
    print(f"input: {adapter.name}: {modules} modules, r {args.r}, {gib(size)}; rule {' '.join(args.rule)}; "
          f"device {args.device}")
    rows, last = [], None
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / "out"
        for i in range(args.runs):
            drop_output(out)
            run = measure_json(adaptool_cmd("resize", str(adapter), "-o", str(out), *args.rule, "--device",
                                            args.device, "--json", "--quiet"), Path(tmp) / "summary.json")
            last = run["summary"]
            rows.append((i + 1, f"{run['seconds']:.2f}", f"{last['seconds']:.2f}", gib(run["peak_rss"]),
                         gib(last["bytes_written"]), f"{last['rank_out']}", f"{last['energy_kept']['mean']:.4f}",
                         last["device"]))
        check = subprocess.run([sys.executable, "-c", CHECK, str(adapter), str(out), str(args.r)], check=True,
                               capture_output=True, text=True)
    print_table(rows, ("run", "wall s", "in-process s", "peak RSS", "output", "ranks out", "energy kept", "device"))
    walls = sorted(float(r[1]) for r in rows)
    print(f"median wall {walls[len(walls) // 2]:.2f} s")
    print("exactness against the float64 best rank-k (QR of each factor + SVD of the core):")
    for module, rec in json.loads(check.stdout).items():
        print(f"  {module}: rank {rec['rank']}, relative error {rec['rel_err']:.2e}")


if __name__ == "__main__":
    main()
