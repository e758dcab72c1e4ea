"""The engine's streaming I/O: blocks read ahead on a thread of their own, written through the writer's buffers
(O_DIRECT or the page cache). However the reads and writes are arranged, the shards are the same bytes, and a
read that fails on the reader thread fails the run with its own one-line error, leaving nothing behind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_merged, load_output

from adaptool import engine
from adaptool.commands.unload import unload
from adaptool.errors import AdaptoolError
from adaptool.io import writer


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("engine_io") / "a", r=4, lora_alpha=8,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _no_io_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name in ("adaptool-read", "adaptool-digest", "adaptool-disk")]


def test_every_arrangement_writes_the_same_bytes(llama_base, lora, tmp_path, monkeypatch):
    """Read-ahead or not, tiny row blocks (many per tensor, several read ahead), O_DIRECT or the page cache, buffers
    smaller than a block: the same shards, and PEFT's merged model bit for bit."""
    unload(str(llama_base), [str(lora)], tmp_path / "default")
    reference = _shards(tmp_path / "default")
    assert len(reference) > 2
    arrangements = [
        {"READ_AHEAD_MAX": 0},  # every block read when asked for
        {"BLOCK_ELEMS": 1000, "READ_AHEAD": 1},  # many blocks per tensor, one ahead
        {"BLOCK_ELEMS": 3000, "DIRECT": False, "STAGE": 2 * writer.ALIGN, "STAGES": 2, "WINDOW": 3 * writer.ALIGN},
    ]
    for i, patch in enumerate(arrangements):
        with monkeypatch.context() as m:
            for name, value in patch.items():
                m.setattr(writer if hasattr(writer, name) else engine, name, value)
            unload(str(llama_base), [str(lora)], tmp_path / f"out{i}")
        assert _shards(tmp_path / f"out{i}") == reference, patch
    ours, theirs = load_output(tmp_path / "default"), peft_merged(llama_base, [lora])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert _no_io_threads()


def test_read_error_on_the_reader_thread_fails_the_run(llama_base, lora, tmp_path, monkeypatch):
    real = engine.read_block
    calls = {"n": 0}

    def failing(handle, info, start, stop, buf=None):
        calls["n"] += 1
        if calls["n"] == 5 and threading.current_thread().name == "adaptool-read":
            raise AdaptoolError(f"{info.file}: tensor {info.name!r} is truncated", "re-download the checkpoint")
        return real(handle, info, start, stop, buf)

    monkeypatch.setattr(engine, "read_block", failing)
    out = tmp_path / "out"
    with pytest.raises(AdaptoolError, match="is truncated"):
        unload(str(llama_base), [str(lora)], out)
    assert calls["n"] >= 5
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _no_io_threads()


def test_error_in_the_math_stops_the_reader(llama_base, lora, tmp_path, monkeypatch):
    """An error on the computing thread mid-tensor (here: an edit that fails) stops the read-ahead and the digest
    threads and leaves nothing behind."""
    real = engine._rounding_loss
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(engine, "_rounding_loss", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        unload(str(llama_base), [str(lora)], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _no_io_threads()
