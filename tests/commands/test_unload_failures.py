"""Every failure a user can cause: one line, exit code != 0, nothing at the output path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import load_output, make_adapter, run_cli

from adaptool.errors import AdaptoolError
from adaptool.commands.unload import unload


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("lora") / "a", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, (rc, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_success_json_and_quiet_pipe(llama_base, lora, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{lora}", "-o", str(out), "--json")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["output"] == str(out) and summary["tensors_changed"] == 4
    assert summary["bytes_written"] == sum(t.numel() * t.element_size() for t in load_output(out).values())
    assert summary["peak_rss_bytes"] > 0 and summary["seconds"] > 0
    # on a pipe: plain progress lines only (no bar, no escape codes), ending at 100%
    lines = stderr.strip().splitlines()
    assert lines and all(l.startswith("Writing: ") for l in lines) and "\x1b" not in stderr
    assert "100%" in lines[-1]


def test_existing_output_refused_then_forced(llama_base, lora, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{lora}", "-o", str(out))
    assert_one_line_error(rc, stdout, stderr, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    rc, _, stderr = run_cli("unload", f"{llama_base}+{lora}", "-o", str(out), "--force")
    assert rc == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


def test_adapter_for_another_model(llama_base, tmp_path):
    from transformers import AutoModelForCausalLM
    from conftest import save_model, tiny_llama_config

    other = save_model(AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=32, intermediate_size=64)),
                       tmp_path / "other", shard=None)
    adapter = make_adapter(other, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{adapter}", "-o", str(out))
    assert_one_line_error(rc, stdout, stderr, "does not fit the base", "q_proj")
    assert not out.exists()


def test_module_missing_in_base(llama_base, lora, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora / "adapter_model.safetensors"))
    tensors = {k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()}
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{bad}", "-o", str(tmp_path / "out"))
    assert_one_line_error(rc, stdout, stderr, "qq_proj", "does not have")
    assert not (tmp_path / "out").exists()


def test_nan_in_adapter_named(llama_base, lora, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{bad}", "-o", str(tmp_path / "out"))
    assert_one_line_error(rc, stdout, stderr, "model.layers.1.self_attn.v_proj.lora_B.weight", "NaN")
    assert not (tmp_path / "out").exists()


def test_inf_in_base_named(llama_base, lora, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = base / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key][1, 1] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{base}+{lora}", "-o", str(out))
    assert_one_line_error(rc, stdout, stderr, key, "NaN or Inf")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["base"]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("{tmp}/nope+{lora}", "not found"),
        ("{base}", "not an adapter"),
        ("{base}+{base}", "no adapter_config.json"),
        ("{base}++{lora}", "BASE+ADAPTER"),
    ],
)
def test_bad_sources(llama_base, lora, tmp_path, spec, needle):
    spec = spec.format(tmp=tmp_path, base=llama_base, lora=lora)
    rc, stdout, stderr = run_cli("unload", spec, "-o", str(tmp_path / "out"))
    assert_one_line_error(rc, stdout, stderr, needle)
    assert not (tmp_path / "out").exists()


def test_truncated_shard(llama_base, lora, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    shard = sorted(base.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    rc, stdout, stderr = run_cli("unload", f"{base}+{lora}", "-o", str(tmp_path / "out"))
    assert_one_line_error(rc, stdout, stderr, shard.name, "re-download")


def test_bad_dtype_and_device(llama_base, lora, tmp_path):
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{lora}", "-o", str(tmp_path / "o"), "--dtype", "int3")
    assert_one_line_error(rc, stdout, stderr, "int3", "bfloat16")
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{lora}", "-o", str(tmp_path / "o"), "--device", "tpu")
    assert_one_line_error(rc, stdout, stderr, "tpu", "cuda:N")
    if not torch.cuda.is_available():
        rc, stdout, stderr = run_cli("unload", f"{llama_base}+{lora}", "-o", str(tmp_path / "o"), "--device", "cuda")
        assert_one_line_error(rc, stdout, stderr, "no CUDA device", "--device cpu")
    assert not (tmp_path / "o").exists()


def test_pickle_adapter_with_code_refused(llama_base, lora, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, bad / "adapter_model.bin")
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{bad}", "-o", str(tmp_path / "out"))
    assert_one_line_error(rc, stdout, stderr, "refused to load")
    assert "pwned" not in stdout


def test_bin_adapter_accepted(llama_base, lora, tmp_path):
    from safetensors.torch import load_file

    binned = tmp_path / "binned"
    binned.mkdir()
    (binned / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    torch.save(load_file(str(lora / "adapter_model.safetensors")), binned / "adapter_model.bin")
    unload(str(llama_base), [str(lora)], tmp_path / "a")
    unload(str(llama_base), [str(binned)], tmp_path / "b")
    a, b = load_output(tmp_path / "a"), load_output(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_error_midway_leaves_nothing(llama_base, lora, tmp_path, monkeypatch):
    from adaptool.io import writer

    calls = {"n": 0}
    real = writer.ShardWriter.write_part

    def failing(self, tensor):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, tensor)

    monkeypatch.setattr(writer.ShardWriter, "write_part", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        unload(str(llama_base), [str(lora)], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_sigkill_leaves_nothing_at_target(llama_base, lora, tmp_path):
    """A run killed with SIGKILL mid-write leaves no output folder (only a hidden temp, swept next time)."""
    out = tmp_path / "out"
    slow = (
        "import sys, time\n"
        "from adaptool.io import writer\n"
        "real = writer.ShardWriter.copy_part\n"
        "def slow(self, *a):\n"
        "    time.sleep(0.2); return real(self, *a)\n"
        "writer.ShardWriter.copy_part = slow\n"
        "from adaptool.cli import main\n"
        f"main(['unload', {str(llama_base) + '+' + str(lora)!r}, '-o', {str(out)!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".adaptool-tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # the next run sweeps the dead run's temporary folder and succeeds
    unload(str(llama_base), [str(lora)], out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_python_api_raises_adaptool_error(llama_base, tmp_path):
    with pytest.raises(AdaptoolError, match="not found"):
        unload(str(llama_base), [str(tmp_path / "missing")], tmp_path / "out")


def test_cli_import_is_light():
    """`adaptool --help` must not import torch (it answers in well under half a second)."""
    code = "import sys, adaptool.cli; print(any(m in sys.modules for m in ('torch', 'safetensors', 'huggingface_hub')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr
    rc, stdout, _ = run_cli("--help")
    assert rc == 0 and "unload" in stdout and "merge" in stdout


def test_unwritable_output_is_one_line(llama_base, lora, tmp_path):
    import stat

    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(parent, os.W_OK):  # root ignores permission bits
            pytest.skip("running as a user that can write anywhere")
        rc, stdout, stderr = run_cli("unload", f"{llama_base}+{lora}", "-o", str(parent / "out"))
        assert_one_line_error(rc, stdout, stderr, "choose")
    finally:
        parent.chmod(stat.S_IRWXU)


def test_disk_full_midway_is_one_line(llama_base, lora, tmp_path):
    out = tmp_path / "out"
    code = (
        "import errno\n"
        "from adaptool.io import writer\n"
        "def full(self, *a):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "writer.ShardWriter.write_part = full\n"
        "from adaptool.cli import main\n"
        f"main(['unload', {str(llama_base) + '+' + str(lora)!r}, '-o', {str(out)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "No space left on device", "nothing was written")
    assert not out.exists() and list(tmp_path.iterdir()) == []
