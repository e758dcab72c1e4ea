"""The README's demo runs and checks itself, and lays out the recipes' inputs (never into the checkout here)."""

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import snapshot

REPO = Path(__file__).parent.parent
DEMO = REPO / "examples" / "demo.py"
INPUTS = ["adapters/chat", "adapters/code", "adapters/math", "adapters/style-loha", "adapters/tone-ia3", "base"]


def test_demo(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for f in (REPO / "recipes").glob("*.yaml"):
        shutil.copy(f, recipes / f.name)
    proc = subprocess.run([sys.executable, str(DEMO), str(tmp_path / "work"), "--recipes", str(recipes)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo OK" in proc.stdout and "exact tensors:     21 of 21" in proc.stdout
    for rel in INPUTS:
        assert f"built  {rel}" in proc.stdout
    assert (tmp_path / "work" / "recipe-ties" / "adapter_model.safetensors").is_file()
    # nothing in recipes/out (users run the recipes themselves; an existing output would be refused)
    assert sorted(p.name for p in recipes.iterdir() if p.suffix != ".yaml") == ["adapters", "base"]


def test_recipe_inputs_are_idempotent(tmp_path):
    build = runpy.run_path(str(DEMO), run_name="adaptool_demo")["build_recipe_inputs"]
    assert sorted(build(tmp_path)) == [(rel, "built") for rel in INPUTS]
    before = snapshot(tmp_path)
    assert sorted(build(tmp_path)) == [(rel, "kept") for rel in INPUTS]
    assert snapshot(tmp_path) == before  # kept as they were, no temporary folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "base"]


def test_recipe_inputs_refuse_an_incomplete_folder(tmp_path):
    """A folder that is there but incomplete may be the user's: the demo names it and deletes nothing."""
    build = runpy.run_path(str(DEMO), run_name="adaptool_demo")["build_recipe_inputs"]
    (tmp_path / "adapters" / "code").mkdir(parents=True)
    (tmp_path / "adapters" / "code" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="adapters/code exists but is not a complete"):
        build(tmp_path)
    assert (tmp_path / "adapters" / "code" / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".demo-build-*"))


def test_recipe_inputs_sweep_a_dead_build(tmp_path):
    """A temporary folder left by a demo run that died (its process is gone) is removed; a live one is kept."""
    demo = runpy.run_path(str(DEMO), run_name="adaptool_demo")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{demo['BUILD_PREFIX']}{int(dead.stdout)}-base"
    live = tmp_path / f"{demo['BUILD_PREFIX']}{1}-base"  # pid 1 is always running
    for p in (stale, live):
        p.mkdir()
    demo["build_recipe_inputs"](tmp_path)
    assert not stale.exists() and live.exists()
