"""Benchmark ``adaptool unload`` at scale: a Llama-3.2-3B-shaped base with an untied head (hidden 3072, 28 layers,
intermediate 8192, 24 heads / 8 KV heads, vocab 128256, bf16, 7.2 GB in 2 shards) and an r=16 all-linear LoRA,
against ``cp -r`` + ``sync`` of the base, back to back (``benchmarks/unload.py --shape 3b --layers 28``).

Usage:
    python benchmarks/unload_3b.py              # adaptool vs cp -r + sync, 3 pairs
    python benchmarks/unload_3b.py --peft       # also PEFT's route (about 7.3 GB of RAM and a minute)

The base is built once without any model (header-first raw safetensors shards, index, config.json) into
benchmarks/.cache/llama-3b-28L (7.2 GB; the runs need as much again free for the output).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from unload import main  # noqa: E402

if __name__ == "__main__":
    main({"shape": "3b", "layers": [28]})
