"""adaptool merge with mixed adapter types (LoRA, LoHa, LoKr, AdaLoRA, IA3, OFT) against PEFT.

``kind: model`` is compared with ``PeftMixedModel.merge_and_unload`` where PEFT can mix the types, and with
PEFT's single-type merges applied one after the other where it cannot (IA3). ``kind: adapter`` is reloaded
with PEFT and compared with the best rank-k approximation of the exact weighted sum.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_model, load_output, make_adapter, make_peft_adapter, run_cli

from adaptool.commands.merge import merge

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def mixed(llama_base, tmp_path_factory):
    """LoRA, LoHa, LoKr, IA3, OFT and AdaLoRA adapters that all touch q_proj (and some other modules)."""
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig

    root = tmp_path_factory.mktemp("mixed")
    return {
        "lora": make_adapter(llama_base, root / "lora", seed=1, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"]),
        "loha": make_peft_adapter(llama_base, root / "loha", LoHaConfig(
            r=4, alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], init_weights=False), seed=2),
        "lokr": make_peft_adapter(llama_base, root / "lokr", LoKrConfig(
            r=2, alpha=6, decompose_both=True, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False), seed=3),
        "ia3": make_peft_adapter(llama_base, root / "ia3", IA3Config(
            target_modules=["q_proj", "k_proj", "down_proj"], feedforward_modules=["down_proj"],
            init_ia3_weights=False), seed=4),
        "oft": make_peft_adapter(llama_base, root / "oft", OFTConfig(
            oft_block_size=8, r=0, target_modules=["q_proj", "o_proj"], init_weights=False), seed=5),
        "adalora": make_peft_adapter(llama_base, root / "adalora", AdaLoraConfig(
            init_r=6, target_r=2, lora_alpha=16, total_step=10, init_lora_weights=False,
            target_modules=["q_proj", "k_proj"]), seed=6),
    }


def write_recipe(tmp_path: Path, adapters: list[tuple[Path, float]], kind: str, dtype: str | None,
                 strategy: str = "linear", base: Path | None = None, extra: str = "") -> Path:
    lines = [f"base: {base}"] if base else []
    lines.append("adapters:")
    lines += [f"  - {{path: {p}, weight: {w}}}" for p, w in adapters]
    lines.append(f"strategy: {strategy}")
    out = f"{{path: {tmp_path / 'out'}, kind: {kind}" + (f", dtype: {dtype}}}" if dtype else "}")
    lines.append(f"output: {out}")
    lines.append("device: cpu")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def peft_mixed_merged(base: Path, adapters: list[Path], dtype) -> dict[str, torch.Tensor]:
    """PeftMixedModel: load every adapter, activate them all, merge_and_unload."""
    from peft import PeftMixedModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    pm = PeftMixedModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
    pm.set_adapter([f"a{i}" for i in range(len(adapters))])
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def peft_sequential(base: Path, adapters: list[Path], dtype) -> dict[str, torch.Tensor]:
    """Each adapter merged by PEFT (PeftModel.merge_and_unload) onto the model the previous one left."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    for a in adapters:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_delta(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW of one adapter (any type) on a float32 base."""
    merged = peft_sequential(base, [adapter], torch.float32)
    return {k: merged[k] - v.float() for k, v in load_output(base).items()}


def changed_keys(ours: dict, base: dict) -> set[str]:
    return {k for k in base if not torch.equal(ours[k].float(), base[k].float())}


# ---------------------------------------------------------------------------------------------- kind: model


def test_lora_loha_lokr_into_model_match_peft_mixed(llama_base, mixed, tmp_path):
    order = [mixed["lora"], mixed["loha"], mixed["lokr"]]
    base_sd = load_output(llama_base)
    # float32: the same float32 steps, but PEFT 0.21.2 merges three layers nested on one module in the order
    # a1, a0, a2 (merge_recursively's pairwise walk), adaptool in recipe order: sums in another order
    summary = merge(write_recipe(tmp_path / "f32", [(p, 1.0) for p in order], "model", "float32", base=llama_base))
    ours = load_output(tmp_path / "f32" / "out")
    reference = peft_mixed_merged(llama_base, order, torch.float32)
    assert set(ours) == set(reference)
    for k, ref in reference.items():
        ulp = float(ref.abs().max()) * torch.finfo(torch.float32).eps
        assert float((ours[k] - ref).abs().max()) <= ulp, k
    # two adapters: PEFT merges them in load order, so float32 is bit for bit
    merge(write_recipe(tmp_path / "two", [(p, 1.0) for p in order[:2]], "model", "float32", base=llama_base))
    assert_same_model(load_output(tmp_path / "two" / "out"), peft_mixed_merged(llama_base, order[:2], torch.float32))
    # q_proj (all three), v_proj (LoRA, LoKr), o_proj (LoHa), up_proj (LoHa, LoKr), down_proj (LoRA), both layers
    assert {k for k in changed_keys(ours, base_sd) if k.endswith("weight")} == {
        f"model.layers.{i}.{m}.weight" for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    assert summary["modules"] == 10 and [a["type"] for a in summary["adapters"]] == ["LORA", "LOHA", "LOKR"]
    # every adapter contributes to q_proj: the merge is their sum
    deltas = [peft_delta(llama_base, p)[Q] for p in order]
    assert all(float(d.abs().max()) > 1e-3 for d in deltas)
    torch.testing.assert_close(ours[Q] - base_sd[Q].float(), sum(deltas), rtol=0, atol=1e-6)
    # bf16: PEFT rounds after every adapter, adaptool once at the end. An element whose sum cancels towards 0
    # can be many of its own ulps apart, so the bound is one bf16 ulp of the tensor's largest magnitude.
    merge(write_recipe(tmp_path / "bf16", [(p, 1.0) for p in order], "model", None, base=llama_base))
    ours = load_output(tmp_path / "bf16" / "out")
    reference = peft_mixed_merged(llama_base, order, torch.bfloat16)
    assert ours[Q].dtype == torch.bfloat16
    exact = load_output(tmp_path / "f32" / "out")
    for k, ref in reference.items():
        ulp = float(ref.float().abs().max()) * torch.finfo(torch.bfloat16).eps
        assert float((ours[k].float() - ref.float()).abs().max()) <= ulp, k
        # one rounding of the float32 result, which is closer to it than PEFT's repeated roundings
        assert torch.equal(ours[k], exact[k].bfloat16()), k
        assert (ours[k].float() - exact[k]).norm() <= (ref.float() - exact[k]).norm(), k


@pytest.mark.parametrize("names", [("lora", "adalora"), ("lokr", "loha"), ("adalora", "lokr")])
def test_pairs_bit_exact_with_peft_mixed(llama_base, mixed, tmp_path, names):
    """Two additive types on a module: PEFT merges them in load order, the same float32 steps as adaptool."""
    order = [mixed[n] for n in names]
    merge(write_recipe(tmp_path, [(p, 1.0) for p in order], "model", "float32", base=llama_base))
    ours = load_output(tmp_path / "out")
    assert_same_model(ours, peft_mixed_merged(llama_base, order, torch.float32))
    assert Q in changed_keys(ours, load_output(llama_base))


def test_weights_multiply_each_delta(llama_base, mixed, tmp_path):
    weights = {"lora": 0.5, "loha": -1.5, "lokr": 2.0, "adalora": 0.7}
    merge(write_recipe(tmp_path, [(mixed[n], w) for n, w in weights.items()], "model", "float32", base=llama_base))
    ours, base_sd = load_output(tmp_path / "out"), load_output(llama_base)
    deltas = {n: peft_delta(llama_base, mixed[n]) for n in weights}
    for k in (Q, "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        expected = sum(w * deltas[n][k] for n, w in weights.items())
        assert float(expected.abs().max()) > 1e-3
        torch.testing.assert_close(ours[k] - base_sd[k].float(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("names", [("lora", "oft"), ("adalora", "oft"), ("oft", "loha")])
def test_oft_in_recipe_order_matches_peft(llama_base, mixed, tmp_path, names):
    """OFT rotates what the adapters before it left; PEFT merges two adapters of a module in load order.

    PEFT 0.21.2's PeftMixedModel takes OFT only as a later adapter (from_pretrained refuses it as the first):
    there the reference is the mixed model, otherwise PEFT's merges one after the other (the same steps).
    """
    order = [mixed[n] for n in names]
    merge(write_recipe(tmp_path, [(p, 1.0) for p in order], "model", "float32", base=llama_base))
    ours = load_output(tmp_path / "out")
    if names[0] == "oft":
        reference = peft_sequential(llama_base, order, torch.float32)
    else:
        reference = peft_mixed_merged(llama_base, order, torch.float32)
    assert set(ours) == set(reference)
    for k, ref in reference.items():  # block-by-block rotation vs PEFT's dense product: summation order
        ulp = float(ref.abs().max()) * torch.finfo(torch.float32).eps
        assert float((ours[k] - ref).abs().max()) <= ulp, k
    # the order matters: the additive delta before OFT is rotated with the weight, after it is not
    base_sd = load_output(llama_base)
    other = names[0] if names[1] == "oft" else names[1]
    w0, d = base_sd[Q].float(), peft_delta(llama_base, mixed[other])[Q]
    rotated = peft_sequential(llama_base, [mixed["oft"]], torch.float32)[Q]  # W0 Rᵀ
    swapped = peft_sequential(llama_base, order[::-1], torch.float32)[Q]
    assert float((ours[Q] - swapped).abs().max()) > 1e-3
    if names[1] == "oft":
        assert float((ours[Q] - rotated - d).abs().max()) > 1e-3
    else:
        torch.testing.assert_close(ours[Q], rotated + d, rtol=0, atol=1e-6)
    assert float((rotated - w0).abs().max()) > 1e-3


@pytest.mark.parametrize("first", ["lora", "ia3"])
def test_ia3_and_lora_match_peft_sequential_merges(llama_base, mixed, tmp_path, first):
    """PEFT cannot mix IA3; adaptool applies it in recipe order: [LoRA, IA3] = (W + ΔW)·l, [IA3, LoRA] = W·l + ΔW."""
    order = [mixed["lora"], mixed["ia3"]] if first == "lora" else [mixed["ia3"], mixed["lora"]]
    merge(write_recipe(tmp_path, [(p, 1.0) for p in order], "model", "float32", base=llama_base))
    ours = load_output(tmp_path / "out")
    reference = peft_sequential(llama_base, order, torch.float32)
    assert_same_model(ours, reference)
    base_sd = load_output(llama_base)
    changed = changed_keys(ours, base_sd)
    assert {Q, "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= changed
    l_q = load_output(mixed["ia3"])["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"].float()
    d_lora = peft_delta(llama_base, mixed["lora"])[Q]
    w0 = base_sd[Q].float()
    expected = (w0 + d_lora) * l_q if first == "lora" else w0 * l_q + d_lora
    torch.testing.assert_close(ours[Q], expected, rtol=1e-6, atol=1e-7)


def test_ia3_weight_scales_its_change(llama_base, mixed, tmp_path):
    """IA3 at weight w: W·(1 + w·(l − 1)); at 0 the adapter changes nothing."""
    merge(write_recipe(tmp_path, [(mixed["ia3"], 0.5), (mixed["loha"], 1.0)], "model", "float32", base=llama_base))
    ours, base_sd = load_output(tmp_path / "out"), load_output(llama_base)
    l_q = load_output(mixed["ia3"])["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"].float()
    d_loha = peft_delta(llama_base, mixed["loha"])[Q]
    torch.testing.assert_close(ours[Q], base_sd[Q].float() * (1 + 0.5 * (l_q - 1)) + d_loha, rtol=1e-6, atol=1e-7)
    k = "model.layers.1.self_attn.k_proj.weight"  # only IA3 touches k_proj
    torch.testing.assert_close(ours[k], base_sd[k].float() * (1 + 0.5 * (load_output(mixed["ia3"])[
        "base_model.model.model.layers.1.self_attn.k_proj.ia3_l"].float() - 1)), rtol=1e-6, atol=0)
    merge(write_recipe(tmp_path / "zero", [(mixed["ia3"], 0.0), (mixed["loha"], 1.0)], "model", "float32",
                       base=llama_base))
    ours = load_output(tmp_path / "zero" / "out")
    assert torch.equal(ours[k], base_sd[k].float())


def test_three_types_on_one_module_match_peft_mixed_forward(llama_base, mixed, tmp_path):
    """[LoRA, OFT, LoHa] on q_proj: (W + ΔW_lora)·Rᵀ + ΔW_loha, what PeftMixedModel computes unmerged (each
    adapter wraps the layers loaded before it). PEFT 0.21.2's merge_and_unload merges three nested layers in the
    order a1, a0, a2 instead (merge_recursively's pairwise walk), so there its merged weights disagree with its
    own forward; adaptool follows the forward."""
    from peft import PeftMixedModel
    from transformers import AutoModelForCausalLM

    order = [mixed["lora"], mixed["oft"], mixed["loha"]]
    merge(write_recipe(tmp_path, [(p, 1.0) for p in order], "model", "float32", base=llama_base))
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    pm = PeftMixedModel.from_pretrained(model, order[0], adapter_name="a0")
    for i, a in enumerate(order[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
    pm.set_adapter(["a0", "a1", "a2"])
    plain = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected, before = ours(x).logits, pm(x).logits, plain(x).logits
    assert float((expected - before).abs().max()) > 1e-2  # the adapters change the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_weight_one_is_unload_of_the_same_adapters(llama_base, mixed, tmp_path):
    """At weight 1, a mixed merge into the base is `adaptool unload` of the adapters in recipe order, bit for bit."""
    from adaptool.commands.unload import unload

    dora = make_adapter(llama_base, tmp_path / "dora", seed=9, r=4, lora_alpha=8, use_dora=True,
                        target_modules=["q_proj", "o_proj"])
    order = [mixed["lora"], mixed["ia3"], dora, mixed["oft"], mixed["loha"], mixed["adalora"]]
    merge(write_recipe(tmp_path / "m", [(p, 1.0) for p in order], "model", None, base=llama_base))
    unload(str(llama_base), [str(p) for p in order], tmp_path / "u")
    ours, unloaded = load_output(tmp_path / "m" / "out"), load_output(tmp_path / "u")
    assert_same_model(ours, unloaded)
    assert Q in changed_keys(ours, load_output(llama_base))
    # DoRA cannot become a LoRA either
    path = write_recipe(tmp_path / "a", [(dora, 1.0), (mixed["loha"], 1.0)], "adapter", None, base=llama_base,
                        extra="parameters: {rank: 4}\n")
    rc, out, err = run_cli("merge", str(path))
    assert rc == 2 and err.count("\n") == 1 and "DoRA" in err and "kind: model" in err, err


# -------------------------------------------------------------------------------------------- kind: adapter


def test_lora_loha_into_one_lora(llama_base, mixed, tmp_path):
    weights = {"lora": 0.8, "loha": -0.6}
    summary = merge(write_recipe(tmp_path, [(mixed[n], w) for n, w in weights.items()], "adapter", "float32",
                                 base=llama_base, extra="parameters: {rank: 6}\n"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 6
    keys = set(load_output(tmp_path / "out"))
    assert not any("hada_" in k for k in keys)
    got = peft_delta(llama_base, tmp_path / "out")  # reloads with PEFT
    deltas = {n: peft_delta(llama_base, mixed[n]) for n in weights}
    energies = []
    for k in got:
        exact = sum(w * deltas[n][k] for n, w in weights.items())
        if float(exact.abs().max()) == 0:
            assert float(got[k].abs().max()) == 0, k
            continue
        U, S, Vh = torch.linalg.svd(exact.double(), full_matrices=False)
        best = (U[:, :6] * S[:6]) @ Vh[:6]
        assert float((got[k].double() - best).norm() / best.norm()) < 1e-4, k  # Eckart-Young, float32
        energies.append(float((S[:6] ** 2).sum() / (S**2).sum()))
    assert len(energies) == 10  # q, v, down (LoRA) + q, o, up (LoHa) -> q, v, o, up, down in 2 layers
    # q_proj mixes rank 4 (LoRA) with a LoHa delta of rank up to 16: rank 6 loses something there
    assert summary["energy_kept"]["min"] < 0.999
    assert summary["energy_kept"]["min"] == pytest.approx(min(energies), abs=1e-4)
    assert summary["modules"] == 10 and summary["rank_out"] == [4, 6]


def test_lokr_adalora_lora_into_one_lora_with_svd_strategy(llama_base, mixed, tmp_path):
    """strategy svd is the same dense sum and truncation; AdaLoRA's singular values and divisor come along."""
    weights = {"lokr": 1.0, "adalora": 0.5, "lora": -1.0}
    summary = merge(write_recipe(tmp_path, [(mixed[n], w) for n, w in weights.items()], "adapter", "float32",
                                 strategy="svd", base=llama_base, extra="parameters: {rank: 3}\n"))
    got = peft_delta(llama_base, tmp_path / "out")
    deltas = {n: peft_delta(llama_base, mixed[n]) for n in weights}
    checked = 0
    for k in got:
        exact = sum(w * deltas[n][k] for n, w in weights.items())
        if float(exact.abs().max()) == 0:
            continue
        U, S, Vh = torch.linalg.svd(exact.double(), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert float((got[k].double() - best).norm() / best.norm()) < 1e-4, k
        checked += 1
    assert checked == summary["modules"] == 10  # q, k, v, up, down in both layers
    assert 0 < summary["energy_kept"]["min"] < 1 and summary["rank_out"] == [3, 3]


def test_adapter_output_refuses_multiplicative_types(llama_base, mixed, tmp_path):
    for name, word in (("ia3", "IA3"), ("oft", "OFT")):
        path = write_recipe(tmp_path / name, [(mixed["lora"], 1.0), (mixed[name], 1.0)], "adapter", None,
                            base=llama_base, extra="parameters: {rank: 4}\n")
        rc, out, err = run_cli("merge", str(path))
        assert rc == 2 and err.count("\n") == 1, err
        assert word in err and "kind: model" in err and "cannot be merged into a LoRA adapter" in err
        assert not (tmp_path / name / "out").exists()


def test_refusals(llama_base, mixed, tmp_path):
    cases = [
        # strategies other than linear cannot mix types into a model
        (dict(kind="model", strategy="ties", extra="parameters: {density: 0.5}\n"), "strategy ties", "strategy: linear"),
        # OFT's weight must be 1 (or 0)
        (dict(kind="model", names=("lora", "oft"), weights=(1.0, 0.5)), "OFT adapter's weight must be 1", "weight to 1"),
        # factor space is PEFT's add_weighted_adapter, LoRA only
        (dict(kind="model", extra="space: factors\n"), "space: factors", "space: delta"),
        # the SVD needs a rank
        (dict(kind="adapter"), "needs a rank", "rank: 16"),
        (dict(kind="adapter", strategy="cat"), "strategy cat", "kind: model"),
    ]
    for i, (case, message, hint) in enumerate(cases):
        folder = tmp_path / str(i)
        names = case.get("names", ("lora", "loha"))
        weights = case.get("weights", (1.0, 1.0))
        path = write_recipe(folder, [(mixed[n], w) for n, w in zip(names, weights)], case["kind"], None,
                            strategy=case.get("strategy", "linear"), base=llama_base, extra=case.get("extra", ""))
        rc, out, err = run_cli("merge", str(path))
        assert rc == 2 and err.count("\n") == 1, (case, err)
        assert message in err and hint in err, (case, err)
        assert not (folder / "out").exists()


def test_dry_run_lists_types(llama_base, mixed, tmp_path):
    path = write_recipe(tmp_path, [(mixed["lora"], 1.0), (mixed["ia3"], 1.0), (mixed["oft"], 1.0)], "model", None,
                        base=llama_base)
    rc, out, err = run_cli("merge", str(path), "--dry-run", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert [a["type"] for a in plan["adapters"]] == ["LORA", "IA3", "OFT"]
    assert [a["modules"] for a in plan["adapters"]] == [6, 6, 4]
    assert plan["modules"] == 10  # q, k, v, o, down in both layers
    assert not (tmp_path / "out").exists()
