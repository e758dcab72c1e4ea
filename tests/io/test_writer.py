"""The shard writer: the sha256 it computes while writing (from its aligned buffers: computed blocks, unchanged
tensors read from their input) equals hashlib's over the file on disk, with O_DIRECT or through the page cache,
with buffers far smaller than the file or not; the engine records one per tensor file it writes, for streamed
(multi-shard unload) and computed (adapter) outputs; errors reach the caller and leave no thread behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import load_output, make_adapter, run_cli
from safetensors.torch import load_file, save_file

from adaptool.io import writer
from adaptool.io.safetensors_file import open_regular, read_header
from adaptool.io.writer import OutputTensor, ShardWriter


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def tiny_windows(monkeypatch):
    """Buffers and write-back windows far smaller than the files, so that every path (a block or a copy spread over
    several buffers, the ring running dry and waiting for the hasher, write-behind kicks and waits) runs."""
    monkeypatch.setattr(writer, "STAGE", 2 * writer.ALIGN)
    monkeypatch.setattr(writer, "STAGES", 2)
    monkeypatch.setattr(writer, "WINDOW", 3 * writer.ALIGN)


@pytest.fixture(params=["direct", "buffered", "direct-tiny", "buffered-tiny"])
def mode(request, monkeypatch):
    """O_DIRECT where the filesystem takes it, or the page-cache path; default or tiny buffers."""
    if request.param.startswith("buffered"):
        monkeypatch.setattr(writer, "DIRECT", False)
    if request.param.endswith("tiny"):
        request.getfixturevalue("tiny_windows")
    return request.param


@pytest.fixture
def source(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(300, 40, generator=g).to(torch.bfloat16), "b": torch.randn(1000, generator=g),
               "c": torch.arange(77, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "src.safetensors"))
    return tmp_path / "src.safetensors"


def _write_mixed(path: Path, source: Path) -> tuple[dict[str, torch.Tensor], ShardWriter]:
    """A file of four tensors: one in blocks, two copied by the kernel from ``source``, one whole; returns them and
    the (closed) writer."""
    infos, _ = read_header(source)
    g = torch.Generator().manual_seed(1)
    blocked = torch.randn(257, 33, generator=g).to(torch.float16)
    whole = torch.randn(5, 7, generator=g)
    order = [OutputTensor("blocked", "F16", (257, 33)), OutputTensor("a", "BF16", (300, 40)),
             OutputTensor("c", "I64", (77,)), OutputTensor("whole", "F32", (5, 7))]
    w = ShardWriter(path, order, {"format": "pt"})
    try:  # as the engine does: any error aborts the writer
        with open_regular(source) as src:
            w.begin_tensor("blocked")
            for start in range(0, 257, 50):
                w.write_part(blocked[start:start + 50])
            for name in ("a", "c"):
                w.begin_tensor(name)
                w.copy_part(src, infos[name].start, infos[name].nbytes)
            w.write_tensor("whole", whole)
            w.close()
    except BaseException:
        w.abort()
        raise
    expected = load_file(str(source))
    return {"blocked": blocked, "a": expected["a"], "c": expected["c"], "whole": whole}, w


def test_digest_equals_the_file_on_disk(tmp_path, source, mode):
    out = tmp_path / "out.safetensors"
    expected, w = _write_mixed(out, source)
    assert (w.size, w.sha256) == (out.stat().st_size, sha256_of(out))
    got = load_file(str(out))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    infos, meta = read_header(out)
    assert [i.name for i in sorted(infos.values(), key=lambda i: i.start)] == ["blocked", "a", "c", "whole"]
    assert meta == {"format": "pt"}
    assert not [t for t in threading.enumerate() if t.name in ("adaptool-digest", "adaptool-disk")]


def test_every_mode_writes_the_same_bytes(tmp_path, source, monkeypatch):
    reference = _write_mixed(tmp_path / "ref.safetensors", source)[1].path
    for i, (direct, stage) in enumerate([(False, writer.STAGE), (True, 2 * writer.ALIGN), (False, 3 * writer.ALIGN)]):
        monkeypatch.setattr(writer, "DIRECT", direct)
        monkeypatch.setattr(writer, "STAGE", stage)
        _, w = _write_mixed(tmp_path / f"{i}.safetensors", source)
        assert w.path.read_bytes() == reference.read_bytes() and w.sha256 == sha256_of(reference)


def test_writer_reports_size_and_sha256(tmp_path, source, tiny_windows):
    infos, _ = read_header(source)
    out = tmp_path / "one.safetensors"
    w = ShardWriter(out, [OutputTensor("a", "BF16", (300, 40))])
    with open_regular(source) as src:
        w.begin_tensor("a")
        w.copy_part(src, infos["a"].start, infos["a"].nbytes)
    w.close()
    assert (w.size, w.sha256) == (out.stat().st_size, sha256_of(out))
    assert not [t for t in threading.enumerate() if t.name in ("adaptool-digest", "adaptool-disk")]


def test_direct_write_refused_midway_goes_through_the_cache(tmp_path, source, monkeypatch, tiny_windows):
    """A filesystem that accepts O_DIRECT at open but refuses a write (EINVAL), or writes short: the rest goes
    through the page cache; the file and its digest are the same."""
    _, ref = _write_mixed(tmp_path / "ref.safetensors", source)
    real = os.pwrite
    calls = {"n": 0}

    def flaky(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        if calls["n"] == 4:  # a short write
            return real(fd, data[: len(data) // 2], offset)
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", flaky)
    out = tmp_path / "flaky.safetensors"
    _, w = _write_mixed(out, source)
    assert calls["n"] > 4
    assert out.read_bytes() == ref.path.read_bytes() and w.sha256 == ref.sha256 == sha256_of(out)


def test_truncated_source_is_one_line_error(tmp_path, source):
    infos, _ = read_header(source)
    short = tmp_path / "short.safetensors"
    short.write_bytes(source.read_bytes()[: infos["a"].start + 100])
    w = ShardWriter(tmp_path / "out.safetensors", [OutputTensor("a", "BF16", (300, 40))])
    with open_regular(short) as src:
        w.begin_tensor("a")
        with pytest.raises(Exception, match="truncated"):
            w.copy_part(src, infos["a"].start, infos["a"].nbytes)
    w.abort()
    assert not [t for t in threading.enumerate() if t.name in ("adaptool-digest", "adaptool-disk")]


def test_close_before_every_tensor_raises_and_stops_the_hasher(tmp_path):
    w = ShardWriter(tmp_path / "x.safetensors", [OutputTensor("t", "F32", (4,)), OutputTensor("u", "F32", (2,))])
    w.write_tensor("t", torch.ones(4))
    with pytest.raises(RuntimeError, match="closed before u"):
        w.close()
    assert not [t for t in threading.enumerate() if t.name in ("adaptool-digest", "adaptool-disk")]


def test_hash_error_reaches_the_writer(tmp_path, source, monkeypatch, tiny_windows):
    """A digest that fails fails the file, at the next buffer or at close, not silently."""
    class Broken:
        def update(self, data):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer, "hashlib", type("hashlib", (), {"sha256": staticmethod(Broken)}))
    with pytest.raises(OSError, match="Input/output error"):
        _write_mixed(tmp_path / "x.safetensors", source)
    assert not [t for t in threading.enumerate() if t.name in ("adaptool-digest", "adaptool-disk")]


# ------------------------------------------------------------------------------ through the engine


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("writer_lora") / "a", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "down_proj"])


def _digests_match_disk(folder: Path, digests: dict) -> None:
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert sorted(digests) == on_disk and on_disk
    for rel, (size, digest) in digests.items():
        assert size == (folder / rel).stat().st_size
        assert digest == sha256_of(folder / rel), rel


def test_multi_shard_unload_records_every_shard_digest(llama_base, lora, tmp_path, mode):
    from adaptool.commands.unload import plan_unload
    from adaptool.engine import run

    _, plan = plan_unload(str(llama_base), [str(lora)], tmp_path / "unused", False, None)
    assert len(plan.files) > 2  # the tiny base is saved in 100 KB shards
    out = tmp_path / "out"
    out.mkdir()
    stats = run(plan, out, torch.device("cpu"))
    _digests_match_disk(out, stats.file_digests)
    assert stats.tensors_changed > 0


def test_computed_adapter_output_records_its_digest(lora, tmp_path):
    from adaptool.commands.resize import plan_resize
    from adaptool.engine import run
    from adaptool.strategies.rank_rules import RankRule

    plan, _, _ = plan_resize(str(lora), tmp_path / "unused", RankRule.from_options(rank=2), None, None, False)
    out = tmp_path / "out"
    out.mkdir()
    stats = run(plan, out, torch.device("cpu"))
    assert all(f.computed for f in plan.files)
    _digests_match_disk(out, stats.file_digests)


def test_cli_unload_manifest_lists_the_digests_of_the_shards(llama_base, lora, tmp_path):
    """End to end: the manifest's sha256 of every shard (from the engine's digests) is the file's."""
    out = tmp_path / "out"
    rc, _, err = run_cli("unload", f"{llama_base}+{lora}", "-o", str(out), "--quiet")
    assert rc == 0, err
    manifest = json.loads((out / "adaptool-manifest.json").read_text())
    shards = {e["path"]: e for e in manifest["files"] if e["path"].endswith(".safetensors")}
    assert len(shards) > 2
    for rel, entry in shards.items():
        assert entry["sha256"] == sha256_of(out / rel) and entry["size"] == os.path.getsize(out / rel)
    assert load_output(out)  # the shards load


def test_disk_full_on_the_disk_thread_fails_the_file(tmp_path, source, monkeypatch, tiny_windows):
    """ENOSPC from the thread writing the buffers reaches the writer (at the next buffer or at close)."""
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left on device"):
        _write_mixed(tmp_path / "x.safetensors", source)
    assert not [t for t in threading.enumerate() if t.name in ("adaptool-digest", "adaptool-disk")]


def test_cli_disk_full_on_the_disk_thread_is_one_line(llama_base, lora, tmp_path):
    out = tmp_path / "out"
    code = (
        "import errno, os\n"
        "real = os.pwrite\n"
        "def full(fd, data, offset):\n"
        "    if len(data) > 4096:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(fd, data, offset)\n"
        "os.pwrite = full\n"
        "from adaptool.cli import main\n"
        f"main(['unload', {str(llama_base) + '+' + str(lora)!r}, '-o', {str(out)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
