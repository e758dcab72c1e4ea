"""Shared pieces of the benchmarks: synthetic Llama-shaped checkpoints and adapters, and measuring a child.

Checkpoints are written straight with safetensors (no transformers model is built), so a 1.6 GB base takes
seconds to make and is reused from ``benchmarks/.cache`` on later runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).parent / ".cache"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Model shapes the benchmarks build: ``llama`` the 1.6 GiB (16 layers) development model; ``3b`` a Llama-3.2-3B-shaped
# model with an untied head (hidden 3072, intermediate 8192, 24 heads, 8 KV heads, vocab 128256; 28 layers: 7.2 GB).
SHAPES = {
    "llama": {"hidden": 2048, "intermediate": 5632, "vocab": 32000, "heads": 16, "kv_heads": 4},
    "3b": {"hidden": 3072, "intermediate": 8192, "vocab": 128256, "heads": 24, "kv_heads": 8},
}


def llama_shapes(hidden=2048, intermediate=5632, layers=16, vocab=32000, heads=16, kv_heads=4):
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    }
    return shapes, config


def make_base(path: Path, layers: int, shards: int = 4, seed: int = 0) -> Path:
    """A random bf16 Llama-shaped checkpoint in ``shards`` files with an index (reused if present)."""
    import torch
    from safetensors.torch import save_file

    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes, config = llama_shapes(layers=layers)
    names = list(shapes)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    per_shard = total / shards
    g = torch.Generator().manual_seed(seed)
    groups, cur, size = [], [], 0
    for n in names:
        cur.append(n)
        size += math.prod(shapes[n]) * 2
        if size >= per_shard and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            t = torch.randn(shapes[n], generator=g, dtype=torch.float32) * 0.02
            tensors[n] = t.to(torch.bfloat16)
            weight_map[n] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.rename(tmp, path)
    return path


def make_base_streamed(path: Path, layers: int, shape: str, shard_bytes: int = 5 * 10**9, seed: int = 0) -> Path:
    """A random bf16 Llama-shaped checkpoint of ``SHAPES[shape]`` (reused if present), written without building a
    model or holding a shard in memory: each shard's header first, then every tensor generated and appended a few
    rows at a time (N(0, 0.02), as ``make_base``), then the index and config.json; the folder appears complete
    or not at all."""
    import torch

    if (path / "config.json").exists():
        return path
    dims = SHAPES[shape]
    shapes, config = llama_shapes(dims["hidden"], dims["intermediate"], layers, dims["vocab"], dims["heads"],
                                  dims["kv_heads"])
    config["max_position_embeddings"] = 8192
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups, cur, size = [], [], 0
    for name, shp in shapes.items():
        nbytes = math.prod(shp) * 2
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    groups.append(cur)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_random_shard(tmp / fname, {n: shapes[n] for n in group}, g)
        weight_map.update({n: fname for n in group})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.rename(tmp, path)
    return path


def _write_random_shard(path: Path, shapes: dict, g) -> None:
    """One safetensors file of random bf16 tensors, in ``shapes`` order, streamed in blocks of ~64 MB."""
    import struct

    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in shapes.items():
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + math.prod(shp) * 2]}
        offset += math.prod(shp) * 2
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shp in shapes.values():
            row = math.prod(shp[1:])
            step = max(1, (32 << 20) // row)
            for start in range(0, shp[0], step):
                rows = min(step, shp[0] - start)
                block = (torch.randn((rows, *shp[1:]), generator=g) * 0.02).to(torch.bfloat16)
                f.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))


def make_lora(path: Path, base: Path, r: int = 16, alpha: int = 32, seed: int = 1, use_rslora: bool = False,
              targets=LINEAR) -> Path:
    """A PEFT-format LoRA adapter for every targeted linear layer of ``base`` (reused if present)."""
    import torch
    from safetensors.torch import save_file

    if (path / "adapter_config.json").exists():
        return path
    config = json.loads((base / "config.json").read_text())
    shapes, _ = llama_shapes(hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                             layers=config["num_hidden_layers"], vocab=config["vocab_size"],
                             heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"])
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = shape
        key = "base_model.model." + module
        tensors[key + ".lora_A.weight"] = (torch.randn(r, in_f, generator=g) / math.sqrt(in_f)).to(torch.bfloat16)
        tensors[key + ".lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.01).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
        "lora_alpha": alpha, "use_rslora": use_rslora, "target_modules": sorted(targets), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
        "inference_mode": True,
    }, indent=2))
    return path


def ensure_inputs(layers: int, adapters: list[dict], shape: str = "llama") -> tuple[Path, list[Path]]:
    """Build (once) the base and adapters in a child process, so that this process never imports torch:
    a forked child starts with its parent's RSS, which would inflate every peak-RSS figure measured here.

    ``shape``: a key of :data:`SHAPES`; ``llama`` keeps its cache names (``llama-16L``, ``lora-16L-r16``), others
    are ``llama-<shape>-<layers>L`` and ``lora-<shape>-<layers>L-<name>``, built streamed (:func:`make_base_streamed`)."""
    tag = f"{layers}L" if shape == "llama" else f"{shape}-{layers}L"
    base = CACHE / f"llama-{tag}"
    paths = [CACHE / f"lora-{tag}-{a['name']}" for a in adapters]
    if not (base / "config.json").exists() or not all((p / "adapter_config.json").exists() for p in paths):
        spec = json.dumps({"layers": layers, "adapters": adapters, "shape": shape})
        subprocess.run([sys.executable, __file__, spec], check=True)
    return base, paths


def _build(spec: dict) -> None:
    shape = spec.get("shape", "llama")
    tag = f"{spec['layers']}L" if shape == "llama" else f"{shape}-{spec['layers']}L"
    if shape == "llama":
        base = make_base(CACHE / f"llama-{tag}", spec["layers"])
    else:
        base = make_base_streamed(CACHE / f"llama-{tag}", spec["layers"], shape)
    for a in spec["adapters"]:
        kw = {k: v for k, v in a.items() if k != "name"}
        make_lora(CACHE / f"lora-{tag}-{a['name']}", base, **kw)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` after flushing earlier writes (so they are not billed to it); return wall seconds and the
    child's peak RSS (bytes)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "stdout": out}


def drop_output(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cp_sync(src: Path, dst: Path) -> dict:
    drop_output(dst)
    return measure(["bash", "-c", f"cp -r '{src}' '{dst}' && sync"])


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def adaptool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "adaptool", *args]


def load_average() -> str:
    """The 1-minute load average now (other jobs on the machine skew every timing: quote it with each figure)."""
    return f"{os.getloadavg()[0]:.2f}"


def warm(folder: Path) -> None:
    """Read every file of ``folder`` once, so that each tool measured after it finds its input in the page cache."""
    subprocess.run(["bash", "-c", f"cat '{folder}'/* > /dev/null"], check=True)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


if __name__ == "__main__":
    _build(json.loads(sys.argv[1]))
