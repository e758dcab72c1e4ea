"""Never lose data, never report a success that did not happen: output paths, exit codes, signals, locks.

Everything here runs the real console entry point in a subprocess, as a shell or CI job would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_refused, make_adapter, run_cli, snapshot

SLOW_RUN = (
    "import sys, time\n"
    "from adaptool.io import writer\n"
    "real = writer.ShardWriter.copy_part\n"
    "def slow(self, *a):\n"
    "    time.sleep(0.3); return real(self, *a)\n"
    "writer.ShardWriter.copy_part = slow\n"
    "from adaptool.cli import main\n"
    "main(sys.argv[1:])\n"
)


@pytest.fixture(scope="module")
def inputs(llama_base, tmp_path_factory):
    """A private copy of the base and one LoRA, in one folder (so a test can aim -o at that folder)."""
    root = tmp_path_factory.mktemp("trust")
    base = Path(shutil.copytree(llama_base, root / "base"))
    lora = make_adapter(base, root / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return root, base, lora


def _spec(inputs) -> str:
    _, base, lora = inputs
    return f"{base}+{lora}"


def _slow(*args: str, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for_temp(parent: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith(".adaptool-tmp-") for p in parent.iterdir()):
            time.sleep(0.3)
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never started writing: {proc.communicate()}")


# ------------------------------------------------------------------------------------------------------
# Exit codes


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["unload"], ["unload", "x+y"], ["unload", "x+y", "-o", "o", "--bogus"],
                                  ["merge"], ["merge", "r.yaml", "--dtype", "f16"], ["--nope"]])
def test_usage_mistakes_exit_2(args):
    rc, out, err = run_cli(*args)
    assert rc == 2, (rc, out, err)
    assert "internal error" not in err and "Traceback" not in err
    assert "Usage" in out + err


def test_help_and_version_exit_0():
    for args in (["--help"], ["unload", "--help"], ["merge", "-h"], ["--version"]):
        rc, out, err = run_cli(*args)
        assert rc == 0 and out and not err, (args, rc, err)


def test_python_api_is_the_functions():
    code = ("import adaptool\nfrom adaptool import unload, merge\n"
            "import adaptool.commands.unload, adaptool.commands.merge\n"
            "from adaptool import unload as u2, merge as m2\n"
            "assert callable(unload) and callable(merge) and unload is u2 and merge is m2\n"
            "assert unload.__module__ == 'adaptool.commands.unload' and merge.__module__ == 'adaptool.commands.merge'\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_mid_run_cleans_up(inputs, tmp_path, sig, code):
    before = snapshot(inputs[1], inputs[2])
    out = tmp_path / "out"
    proc = _slow("unload", _spec(inputs), "-o", str(out))
    _wait_for_temp(tmp_path, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert_refused(proc.returncode, stdout, stderr, out, before, code, "interrupted", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_double_ctrl_c_still_cleans_up(inputs, tmp_path):
    out = tmp_path / "out"
    proc = _slow("unload", _spec(inputs), "-o", str(out))
    _wait_for_temp(tmp_path, proc)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert list(tmp_path.iterdir()) == []


def test_sigint_with_force_keeps_the_old_output(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    proc = _slow("unload", _spec(inputs), "-o", str(out), "--force")
    _wait_for_temp(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "mine.txt").read_text() == "old"


def test_closed_stdout_pipe_is_refused_at_start(inputs, tmp_path):
    out = tmp_path / "out"
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "adaptool", "unload", _spec(inputs), "-o", str(out), "--json"],
                              stdout=w, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(w)
    assert_refused(proc.returncode, "", proc.stderr, out, None, 2, "stdout")


# ------------------------------------------------------------------------------------------------------
# Output paths that would destroy something


@pytest.mark.parametrize("which", ["base", "lora", "inside_base", "parent_of_inputs", "symlink_to_base"])
def test_output_onto_an_input_is_refused_even_with_force(inputs, which):
    root, base, lora = inputs
    target = {"base": base, "lora": lora, "inside_base": base / "sub", "parent_of_inputs": root,
              "symlink_to_base": root / "link"}[which]
    if which == "symlink_to_base":
        target.symlink_to(base)
    try:
        before = snapshot(base, lora)
        rc, out, err = run_cli("unload", f"{base}+{lora}", "-o", str(target), "--force")
        assert rc == 2 and "input" in err and "Traceback" not in err, err
        assert snapshot(base, lora) == before
        assert not any(".adaptool-" in p.name for p in root.iterdir())
    finally:
        if which == "symlink_to_base":
            target.unlink()


@pytest.mark.parametrize("target", ["", ".", "/", "~"])
def test_protected_output_paths_are_refused(inputs, tmp_path, target):
    (tmp_path / "precious.txt").write_text("keep")
    proc = subprocess.run([sys.executable, "-m", "adaptool", "unload", _spec(inputs), "-o", target, "--force"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_refused(proc.returncode, proc.stdout, proc.stderr, None, None, 2, "-o")
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_ancestor_of_working_folder_is_refused(inputs, tmp_path):
    work = tmp_path / "checkout" / "sub"
    work.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "adaptool", "unload", _spec(inputs), "-o", str(tmp_path / "checkout"),
                           "--force"], capture_output=True, text=True, cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_refused(proc.returncode, proc.stdout, proc.stderr, None, None, 2, "working folder")
    assert work.is_dir()


def test_merge_into_the_adapters_folder_is_refused(inputs, tmp_path):
    root, base, lora = inputs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {base}\nadapters:\n  - path: {lora}\nstrategy: linear\n"
                      f"output:\n  path: {root}\n  kind: adapter\n")
    before = snapshot(base, lora)
    for extra in ([], ["--dry-run"]):
        rc, out, err = run_cli("merge", str(recipe), "--force", *extra)
        assert rc == 2 and "input" in err, err
    rc, out, err = run_cli("merge", str(recipe), "-o", str(tmp_path), "--force")
    assert rc == 2 and "input" in err, err  # the folder holding the recipe
    assert snapshot(base, lora) == before and recipe.exists()


def test_symlink_output_with_force_replaces_only_the_link(inputs, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)
    rc, out, err = run_cli("unload", _spec(inputs), "-o", str(link))
    assert rc == 2 and "symlink" in err, err
    rc, out, err = run_cli("unload", _spec(inputs), "-o", str(link), "--force")
    assert rc == 0, err
    assert not link.is_symlink() and (link / "config.json").exists()
    assert (real / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_force_replaces_a_folder_only_when_the_new_one_is_complete(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rc, _, err = run_cli("unload", _spec(inputs), "-o", str(out), "--force", "--dtype", "float8")
    assert rc == 2 and (out / "old.txt").read_text() == "old", err
    rc, _, err = run_cli("unload", _spec(inputs), "-o", str(out), "--force")
    assert rc == 0 and not (out / "old.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["out"], err


def test_longest_legal_output_name(inputs, tmp_path):
    out = tmp_path / ("m" * 250)
    rc, _, err = run_cli("unload", _spec(inputs), "-o", str(out))
    assert rc == 0, err
    assert (out / "config.json").exists() and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_dry_run_checks_the_target_like_a_real_run(inputs, tmp_path):
    _, base, lora = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {base}\nadapters:\n  - path: {lora}\nstrategy: linear\n"
                      f"output:\n  path: {out}\n  kind: adapter\n")
    rc, _, err = run_cli("merge", str(recipe), "--dry-run")
    assert rc == 2 and "already exists" in err, err
    rc, stdout, err = run_cli("merge", str(recipe), "--dry-run", "--force")
    assert rc == 0 and (out / "x").exists(), err


# ------------------------------------------------------------------------------------------------------
# Two runs, dead runs


def test_second_run_to_the_same_target_fails_at_start(inputs, tmp_path):
    out = tmp_path / "out"
    first = _slow("unload", _spec(inputs), "-o", str(out))
    _wait_for_temp(tmp_path, first)
    started = time.time()
    rc, stdout, stderr = run_cli("unload", _spec(inputs), "-o", str(out))
    assert rc == 2 and "another adaptool run" in stderr and str(first.pid) in stderr, stderr
    assert time.time() - started < 30
    first.communicate(timeout=120)
    assert first.returncode == 0 and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_dead_runs_leftovers_are_swept(inputs, tmp_path):
    out = tmp_path / "out"
    proc = _slow("unload", _spec(inputs), "-o", str(out))
    _wait_for_temp(tmp_path, proc)
    proc.kill()
    proc.wait()
    assert not out.exists() and any(p.name.startswith(".adaptool-tmp-") for p in tmp_path.iterdir())
    (tmp_path / ".adaptool-tmp-0123456789ab-999999999").mkdir()  # not a live PID: swept
    (tmp_path / ".other-tool-tmp").mkdir()  # not ours: left alone
    rc, _, err = run_cli("unload", _spec(inputs), "-o", str(out))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other-tool-tmp", "out"]


# ------------------------------------------------------------------------------------------------------
# Network


def test_hub_that_never_answers_does_not_hang(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}",
               "HF_HUB_CACHE": str(tmp_path / "cache"), "ADAPTOOL_HUB_TIMEOUT": "1"}
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "adaptool", "unload", "org/base+org/lora", "-o", str(tmp_path / "o")],
                              capture_output=True, text=True, env=env, timeout=120)
        assert_refused(proc.returncode, proc.stdout, proc.stderr, tmp_path / "o", None, 2, "org/")
        assert time.time() - started < 60
    finally:
        server.close()


def test_json_summary_is_one_object(inputs, tmp_path):
    rc, stdout, err = run_cli("unload", _spec(inputs), "-o", str(tmp_path / "out"), "--json", "--quiet")
    assert rc == 0, err
    assert json.loads(stdout)["tensors_changed"] == 4


# ------------------------------------------------------------------------------------------------------
# Recipes that are not recipes


def test_recipe_that_is_a_fifo_or_huge_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "adaptool", "merge", str(fifo)], capture_output=True, text=True,
                          timeout=60)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, None, None, 2, "not a regular file")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a" * (2 << 20))
    rc, out, err = run_cli("merge", str(big))
    assert_refused(rc, out, err, None, None, 2, "short YAML")


def test_merge_to_adapter_checks_shapes_against_the_named_base(inputs, tmp_path):
    from transformers import AutoModelForCausalLM
    from conftest import save_model, tiny_llama_config

    other = save_model(AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=32, intermediate_size=64)),
                       tmp_path / "other", shard=None)
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "merged"
    recipe.write_text(f"base: {other}\nadapters:\n  - path: {inputs[2]}\nstrategy: linear\n"
                      f"output:\n  path: {out}\n  kind: adapter\n")
    for extra in ([], ["--dry-run"]):
        rc, stdout, err = run_cli("merge", str(recipe), *extra)
        assert_refused(rc, stdout, err, out, None, 2, "does not fit the base")


SLOW_COMPUTED_RUN = (
    "import sys, time\n"
    "from adaptool import engine\n"
    "real = engine._checked\n"
    "def slow(*a):\n"
    "    time.sleep(0.3); return real(*a)\n"
    "engine._checked = slow\n"
    "from adaptool.cli import main\n"
    "main(sys.argv[1:])\n"
)


@pytest.mark.parametrize("command", ["edit", "align", "convert"])
def test_ctrl_c_mid_run_of_the_surgery_commands(inputs, tmp_path, tmp_path_factory, command):
    """Ctrl-C while edit, align or convert computes: exit 130, one line, nothing at or beside the target, the
    inputs untouched (convert's target is a single file, swapped in by AtomicFile)."""
    _, _, lora = inputs
    other = Path(shutil.copytree(lora, tmp_path_factory.mktemp("other") / "other-lora"))
    before = snapshot(lora, other)
    out = tmp_path / ("lora.safetensors" if command == "convert" else "out")
    args = {"edit": ["edit", str(lora), "-o", str(out), "--drop", "v_proj"],
            "align": ["align", str(lora), str(other), "-o", str(out)],
            "convert": ["convert", str(lora), "-o", str(out), "--to", "kohya"]}[command]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMPUTED_RUN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _wait_for_temp(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert_refused(proc.returncode, stdout, stderr, out, before, 130, "interrupted", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_every_output_file_and_folder_is_on_disk_before_the_swap(inputs, tmp_path, monkeypatch):
    """A crash right after the rename must not expose empty side files: the sink's files (config, index, card,
    manifest), the folder itself and, after the rename, its parent are fsynced."""
    from adaptool.commands.unload import unload
    from adaptool.output import target as target_module

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(target_module.os, "fsync", record)
    out = tmp_path / "out"
    _, base, lora = inputs
    unload(str(base), [str(lora)], out)
    tmp = next(Path(p) for p in synced if ".adaptool-tmp-" in p and Path(p).name.startswith(".adaptool-tmp-"))
    names = {Path(p).relative_to(tmp).as_posix() for p in synced if p.startswith(str(tmp) + "/")}
    assert {"config.json", "model.safetensors.index.json", "README.md", "adaptool-manifest.json"} <= names
    assert str(tmp) in synced and synced[-1] == str(tmp_path)  # the folder, then the rename in its parent
    assert all(not p.startswith(str(out)) for p in synced)  # nothing walked after the swap


def test_single_file_output_is_on_disk_before_the_swap(tmp_path, monkeypatch):
    """convert --to kohya's AtomicFile: the file, then the rename in its folder."""
    from adaptool.output import target as target_module

    synced = []
    real = os.fsync
    monkeypatch.setattr(target_module.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                                real(fd))[1])
    with target_module.AtomicFile(tmp_path / "f.bin", inner="f.bin") as tmp:
        (tmp / "f.bin").write_bytes(b"x")
    assert synced[-1] == str(tmp_path) and any(p.endswith("/f.bin") for p in synced[:-1])


def test_a_folder_that_cannot_be_synced_after_the_rename_is_no_error(inputs, tmp_path, monkeypatch):
    """The output's parent may refuse to be opened (write and search permission only) or synced once the output is
    in place: the run still succeeds, with the output there and nothing beside it."""
    from adaptool.commands.unload import unload
    from adaptool.output import target as target_module

    real = target_module._fsync

    def refuse_parent(path):
        if path == str(tmp_path):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(target_module, "_fsync", refuse_parent)
    _, base, lora = inputs
    unload(str(base), [str(lora)], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "config.json").is_file()
    with target_module.AtomicFile(tmp_path / "f.bin", inner="f.bin") as tmp:
        (tmp / "f.bin").write_bytes(b"x")
    assert (tmp_path / "f.bin").read_bytes() == b"x"
