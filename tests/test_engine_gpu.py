"""The --device cuda paths (skipped on machines without a CUDA device)."""

import pytest
import torch
from conftest import load_output, make_adapter

from adaptool.commands.unload import unload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_unload_on_cuda_matches_cpu(llama_base, tmp_path):
    adapter = make_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "down_proj", "embed_tokens"])
    unload(str(llama_base), [str(adapter)], tmp_path / "cpu", device="cpu")
    summary = unload(str(llama_base), [str(adapter)], tmp_path / "gpu", device="cuda")
    assert summary["device"].startswith("cuda") and summary["peak_gpu_bytes"] > 0
    cpu, gpu = load_output(tmp_path / "cpu"), load_output(tmp_path / "gpu")
    for k in cpu:  # GEMM order differs between CPU and GPU: equal up to one rounding of the output dtype
        torch.testing.assert_close(gpu[k].float(), cpu[k].float(), rtol=1e-2, atol=1e-3)


def test_merge_on_cuda(llama_base, tmp_path):
    from adaptool.commands.merge import merge

    a = make_adapter(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_adapter(llama_base, tmp_path / "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    for strategy, params in [("svd", "{rank: 4}"), ("dare_ties", "{density: 0.5, seed: 1}")]:
        recipe = tmp_path / f"{strategy}.yaml"
        recipe.write_text(f"base: {llama_base}\nadapters: [{{path: {a}}}, {{path: {b}}}]\nstrategy: {strategy}\n"
                          f"parameters: {params}\noutput: {{path: {tmp_path / strategy}, kind: model}}\ndevice: cuda\n")
        summary = merge(recipe)
        assert summary["device"].startswith("cuda") and summary["tensors_changed"] == 4
