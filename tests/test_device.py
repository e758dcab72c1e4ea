"""``--device``: what ``auto`` picks, per kind of work."""

import pytest
import torch

from adaptool.device import resolve_device
from adaptool.errors import AdaptoolError


def test_auto_takes_the_gpu_only_where_it_pays(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("auto", gpu_pays=False) == torch.device("cpu")  # resize, align: r×r maths
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_without_a_gpu_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(AdaptoolError, match="torch sees no CUDA device"):
        resolve_device("cuda", gpu_pays=False)  # asked for by name: never silently the CPU


def test_resize_auto_runs_on_the_cpu_where_a_gpu_is_present(monkeypatch, llama_base, tmp_path):
    from conftest import make_adapter

    from adaptool.commands.resize import resize
    from adaptool.strategies.rank_rules import RankRule

    adapter = make_adapter(llama_base, tmp_path / "a", r=4, target_modules=["q_proj"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU "is there": auto must not pick it
    summary = resize(str(adapter), tmp_path / "out", RankRule.from_options(rank=2), device="auto")
    assert summary["device"] == "cpu"
