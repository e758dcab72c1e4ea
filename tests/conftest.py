"""Tiny models and adapters built at test time with transformers + PEFT (the oracle)."""

from __future__ import annotations

import glob
import hashlib
import shutil
import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, attention_bias=True, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_model(model, path: Path, shard: str | None = "100KB") -> Path:
    if shard:
        model.save_pretrained(path, max_shard_size=shard)
    else:
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A 2-layer Llama with attention biases, bf16, in 3+ safetensors shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).to(torch.bfloat16)
    return save_model(model, tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def llama_tied_base(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True)).to(torch.bfloat16)
    return save_model(model, tmp_path_factory.mktemp("llama_tied") / "base", shard=None)


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (Conv1D weights stored (in, out)), float32, single file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    return save_model(model, tmp_path_factory.mktemp("gpt2") / "base", shard=None)


def make_adapter(base: Path, out: Path, seed: int = 0, dtype=torch.bfloat16, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    lora_kwargs.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))  # a trained magnitude, not the init norm
            elif "trainable_tokens_delta" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapters: list[Path], dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """PEFT's answer: load, apply every adapter, merge_and_unload, state dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
    if len(adapters) > 1:
        pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_output(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(glob.glob(str(out / "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two bf16/fp16/fp32 tensors of one dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_t = {2: torch.int16, 4: torch.int32}[a.element_size()]
    ia, ib = a.contiguous().view(int_t).to(torch.int64), b.contiguous().view(int_t).to(torch.int64)
    # map sign-magnitude to a monotone integer line
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def assert_same_model(ours: dict, reference: dict, max_ulp: int = 0, tied_ok: bool = True):
    """Every tensor equal (or within ``max_ulp``); no key in ours that the reference lacks."""
    ref = dict(reference)
    if tied_ok and "lm_head.weight" in ref and "lm_head.weight" not in ours:
        ref.pop("lm_head.weight")  # a tied head is saved once, as the embedding
    assert set(ours) == set(ref), (set(ours) ^ set(ref))
    worst = {}
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        if max_ulp == 0:
            assert torch.equal(ours[k], ref[k]), f"{k}: max abs diff {(ours[k].float() - ref[k].float()).abs().max()}"
        else:
            worst[k] = ulp_diff(ours[k], ref[k])
            assert worst[k] <= max_ulp, f"{k}: {worst[k]} ulp apart"
    return worst


def run_cli(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    """Run ``adaptool`` in a subprocess (the real console entry point), offline."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "adaptool", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


class Snapshot(dict):
    """File path -> bytes (a symlink: its target text) under some roots; ``retake()`` reads them again."""

    roots: tuple = ()

    def retake(self) -> "Snapshot":
        return snapshot(*self.roots)


def snapshot(*paths: Path) -> Snapshot:
    """Every file (and symlink target text) under ``paths``, for asserting that inputs stay byte-identical."""
    found = Snapshot()
    found.roots = paths
    for root in paths:
        root = Path(root)
        items = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in items:
            if p.is_symlink():
                found[str(p)] = b"->" + os.readlink(p).encode()
            elif p.is_file():
                found[str(p)] = p.read_bytes()
    return found


def assert_refused(rc: int, out: str, err: str, target: Path | None = None, before: dict | None = None,
                   code: int = 2, *needles: str) -> None:
    """A failure as users must see it: the exit code, at most 3 lines, no traceback, nothing at or beside
    ``target``, every snapshotted input unchanged."""
    assert rc == code, (rc, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err and "internal error" not in err, err
    for n in needles:
        assert n in err, (n, err)
    if target is not None:
        target = Path(target)
        assert not target.exists() or target.is_symlink(), f"{target} was left behind"
        if target.parent.exists():
            stray = [p.name for p in target.parent.iterdir() if ".adaptool-" in p.name]
            assert not stray, stray
    if before is not None:
        after = before.retake()
        changed = sorted(set(after) ^ set(before) | {k for k in before if after.get(k) != before[k]})
        assert not changed, f"inputs changed: {changed[:5]}"


def make_peft_adapter(base, out, config, dtype=torch.bfloat16, seed: int = 0):
    """Save a PEFT adapter of any type for ``base`` (configs ask for random init, so nothing is an identity)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:  # a trained copy, not the base module
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return out


def lay_out_cache(cache: Path, repo_id: str, folder: Path, refs: dict[str, str] | None = None) -> str:
    """Copy ``folder`` into ``cache`` the way huggingface_hub stores a downloaded snapshot."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    for ref in ["main", *(refs or {})]:
        (repo / "refs" / ref).write_text(commit)
    return commit
