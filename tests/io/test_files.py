"""Hostile input files: corrupt safetensors headers, index entries and side files that leave the folder, FIFOs,
quantised bases, overflowing dtype conversions and pickles holding more than tensors. Each is refused with one
line (exit 2) before anything is written; none hangs, crashes or leaks a file into the output."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, load_output, make_adapter, run_cli, snapshot

from adaptool.errors import AdaptoolError
from adaptool.io.safetensors_file import read_header

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory):
    return make_adapter(llama_base, tmp_path_factory.mktemp("hostile_lora") / "a", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])


@pytest.fixture
def base(llama_base, tmp_path):
    """A private copy of the sharded tiny Llama, to corrupt."""
    return Path(shutil.copytree(llama_base, tmp_path / "base"))


def st_bytes(header=None, data: bytes = b"", raw: bytes | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def weight_map(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / weight_map(folder)[tensor]


def first_shard(folder: Path) -> Path:
    return folder / sorted(set(weight_map(folder).values()))[0]


def rewrite_shard(path: Path, change) -> None:
    """Load a shard, let ``change(tensors)`` edit the dict, save it back (same names unless ``change`` adds)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def unload_refused(base, adapter, tmp_path, *needles, dtype=None, cli=False):
    """Unload ``base+adapter`` and assert it is refused as a user sees it (``assert_refused``).

    Most cases run in-process (``unload`` must raise AdaptoolError; its line stands in for stderr) to keep this
    file fast; one case per kind of input goes through the real CLI (``cli=True``).
    """
    from adaptool.commands.unload import unload

    out = tmp_path / "out"
    before = snapshot(base, adapter)
    if cli:
        rc, stdout, stderr = run_cli("unload", f"{base}+{adapter}", "-o", str(out), *(("--dtype", dtype) if dtype else ()))
    else:
        with pytest.raises(AdaptoolError) as e:
            unload(str(base), [str(adapter)], out, dtype=dtype)
        rc, stdout, stderr = e.value.exit_code, "", f"error: {e.value.line()}\n"
    assert_refused(rc, stdout, stderr, out, before, 2, *needles)
    return stderr


# -- safetensors headers -------------------------------------------------------------------------------------

F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}

HOSTILE_HEADERS = {
    "list": (None, b"", b"[1, 2, 3]"),
    "nested_100k": (None, b"", b"[" * 100_000 + b"]" * 100_000),
    "nested_objects": (None, b"", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    "not_utf8": (None, b"", b'{"\xff\xfe": 1}'),
    "duplicate_name": (None, bytes(32), b'{"w": ' + json.dumps(F32_4).encode() + b', "w": '
                       + json.dumps({"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}).encode() + b"}"),
    "metadata_not_str": ({"__metadata__": {"format": 1}, "w": F32_4}, bytes(16), None),
    "metadata_list": ({"__metadata__": ["x"], "w": F32_4}, bytes(16), None),
    "entry_not_object": ({"w": [1, 2]}, bytes(16), None),
    "unknown_dtype": ({"w": {**F32_4, "dtype": "F33"}}, bytes(16), None),
    "dtype_list": ({"w": {**F32_4, "dtype": ["F32"]}}, bytes(16), None),
    "shape_bool": ({"w": {"dtype": "U8", "shape": [True, 16], "data_offsets": [0, 16]}}, bytes(16), None),
    "shape_negative": ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [16, 0]}}, bytes(16), None),
    "shape_float": ({"w": {**F32_4, "shape": [4.0]}}, bytes(16), None),
    "shape_not_list": ({"w": {**F32_4, "shape": 4}}, bytes(16), None),
    "offsets_three": ({"w": {**F32_4, "data_offsets": [0, 16, 32]}}, bytes(16), None),
    "offsets_bool": ({"w": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, bytes(1), None),
    "offsets_reversed": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, bytes(16), None),
    "size_mismatch": ({"w": {**F32_4, "data_offsets": [0, 12]}}, bytes(12), None),
    "gap": ({"a": F32_4, "b": {**F32_4, "data_offsets": [20, 36]}}, bytes(36), None),
    "overlap": ({"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24]}}, bytes(24), None),
    "not_from_zero": ({"w": {**F32_4, "data_offsets": [8, 24]}}, bytes(24), None),
    "trailing_bytes": ({"w": F32_4}, bytes(16 + 1024), None),
    "claims_16GiB": ({"w": {"dtype": "F32", "shape": [1 << 32], "data_offsets": [0, 1 << 34]}}, bytes(64), None),
    "header_longer_than_file": (None, b"", None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_header_validated_like_safetensors(tmp_path, case):
    header, data, raw = HOSTILE_HEADERS[case]
    path = tmp_path / "x.safetensors"
    if case == "header_longer_than_file":
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    else:
        path.write_bytes(st_bytes(header, data, raw))
    with pytest.raises(AdaptoolError) as e:
        read_header(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_safetensors_library_files_accepted(tmp_path):
    """Strict, not stricter: what the library writes (padding, empty and 0-d tensors, metadata) reads back."""
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.0, dtype=torch.bfloat16),
               "i": torch.arange(7, dtype=torch.int64), "z": torch.zeros(0)}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    infos, meta = read_header(tmp_path / "ok.safetensors")
    assert set(infos) == set(tensors) and meta == {"format": "pt"}
    assert infos["scalar"].shape == () and infos["empty"].nbytes == 0


@pytest.mark.parametrize("case", ["list", "nested_100k", "claims_16GiB", "gap", "duplicate_name"])
def test_hostile_shard_refused(base, lora, tmp_path, case):
    header, data, raw = HOSTILE_HEADERS[case]
    first_shard(base).write_bytes(st_bytes(header, data, raw))
    unload_refused(base, lora, tmp_path, first_shard(base).name, cli=case == "nested_100k")


def test_fifo_refused_without_blocking(llama_base, lora, tmp_path):
    """A FIFO in place of a shard, config.json, a tokenizer file or the adapter weights fails at once. The CLI
    runs in subprocesses (in parallel) with a timeout, so a hang fails the test instead of blocking it."""
    runs = []
    for where in ["shard", "config.json", "tokenizer_config.json", "adapter_model.safetensors"]:
        case = tmp_path / where
        base = Path(shutil.copytree(llama_base, case / "base"))
        adapter = Path(shutil.copytree(lora, case / "lora"))
        victim = {"shard": first_shard(base), "adapter_model.safetensors": adapter / "adapter_model.safetensors"}.get(
            where, base / where)
        victim.unlink(missing_ok=True)
        os.mkfifo(victim)
        out = case / "out"
        before = snapshot(base, adapter)
        proc = subprocess.Popen([sys.executable, "-m", "adaptool", "unload", f"{base}+{adapter}", "-o", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        runs.append((where, proc, out, before, victim.name))
    hung = []
    for where, proc, out, before, name in runs:
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            hung.append(where)
            continue
        assert_refused(proc.returncode, stdout, stderr, out, before, 2, name, "not a regular file")
    assert not hung, f"blocked on a FIFO at: {hung}"


# -- the index -------------------------------------------------------------------------------------------------

def set_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def test_index_entry_outside_folder_refused(base, lora, tmp_path):
    shard = first_shard(base)
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    set_index(base, lambda wm: wm.update({k: "../elsewhere.safetensors" for k, v in wm.items() if v == shard.name}))
    unload_refused(base, lora, tmp_path, "elsewhere.safetensors", "outside", cli=True)


def test_index_entry_absolute_refused(base, lora, tmp_path):
    shard = first_shard(base)
    set_index(base, lambda wm: wm.update({k: str(shard) for k, v in wm.items() if v == shard.name}))
    unload_refused(base, lora, tmp_path, "not a relative file name")


def test_index_shard_symlink_outside_refused(base, lora, tmp_path):
    shard = first_shard(base)
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    unload_refused(base, lora, tmp_path, shard.name, "outside")


def test_index_not_a_map_of_names_refused(base, lora, tmp_path):
    set_index(base, lambda wm: wm.update({next(iter(wm)): 3}))
    unload_refused(base, lora, tmp_path, INDEX)


def test_index_lists_tensor_no_shard_holds(base, lora, tmp_path):
    set_index(base, lambda wm: wm.update({"model.layers.9.mlp.up_proj.weight": next(iter(wm.values()))}))
    unload_refused(base, lora, tmp_path, "model.layers.9.mlp.up_proj.weight")


def test_shard_tensor_missing_from_index(base, lora, tmp_path):
    name = "model.norm.weight"
    set_index(base, lambda wm: wm.pop(name))
    unload_refused(base, lora, tmp_path, name, INDEX)


def test_index_names_wrong_shard(base, lora, tmp_path):
    names = sorted(set(weight_map(base).values()))
    name = next(k for k, v in weight_map(base).items() if v == names[0])
    set_index(base, lambda wm: wm.update({name: names[1]}))
    unload_refused(base, lora, tmp_path, name)


def test_shards_in_subfolders_keep_their_layout(llama_base, base, lora, tmp_path):
    """Two shards of one file name in two subfolders: both written where the index says, loadable."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    names = sorted(set(weight_map(base).values()))
    moves = {names[0]: "a/part.safetensors", names[1]: "b/part.safetensors"}
    for old, new in moves.items():
        (base / new).parent.mkdir()
        shutil.move(base / old, base / new)
    set_index(base, lambda wm: wm.update({k: moves.get(v, v) for k, v in wm.items()}))

    from adaptool.commands.unload import unload

    unload(str(base), [str(lora)], tmp_path / "out")
    unload(str(llama_base), [str(lora)], tmp_path / "flat")
    out = tmp_path / "out"
    wm = weight_map(out)
    assert set(wm.values()) == {moves.get(n, n) for n in names}
    ours = {}
    for name, file in wm.items():
        with safe_open(out / file, "pt") as f:
            assert name in f.keys(), (name, file)
            ours[name] = f.get_tensor(name)
    flat = load_output(tmp_path / "flat")
    assert set(ours) == set(flat) and all(torch.equal(ours[k], flat[k]) for k in flat)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = model.state_dict()
    assert all(torch.equal(state[k], flat[k]) for k in flat)


# -- side files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["secret", "/proc/self/environ"])
def test_side_file_link_outside_refused(base, lora, tmp_path, target):
    if target == "secret":
        target = tmp_path / "secret.json"
        target.write_text('{"token": "hunter2"}')
    (base / "tokenizer.json").unlink(missing_ok=True)
    (base / "tokenizer.json").symlink_to(target)
    unload_refused(base, lora, tmp_path, "tokenizer.json", "outside", cli=target == "secret")


def test_hub_snapshot_link_out_of_cache_refused(llama_base, lora, tmp_path):
    """Links into the repo's blobs/ are how the hub cache works; a link anywhere else is still refused."""
    from conftest import lay_out_cache

    cache = tmp_path / "hub"
    commit = lay_out_cache(cache, "tiny-org/tiny-llama", llama_base)
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
    out = tmp_path / "ok"
    from adaptool.commands.unload import unload

    unload(str(snap), [str(lora)], out)
    assert all(not p.is_symlink() for p in out.rglob("*")) and (out / "config.json").is_file()

    (tmp_path / "secret.txt").write_text("hunter2")
    (snap / "merges.txt").symlink_to(tmp_path / "secret.txt")
    unload_refused(snap, lora, tmp_path, "merges.txt")


# -- quantised bases -------------------------------------------------------------------------------------------

def test_quantization_config_refused(base, lora, tmp_path):
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(cfg))
    unload_refused(base, lora, tmp_path, "quantised base", "bf16", cli=True)


def test_quantised_scale_tensors_refused(base, lora, tmp_path):
    q = "model.layers.0.self_attn.q_proj.weight"
    shard = shard_of(base, q)
    rewrite_shard(shard, lambda t: t.update({q + "_scale_inv": torch.ones(1, 1)}))
    set_index(base, lambda wm: wm.update({q + "_scale_inv": shard.name}))
    unload_refused(base, lora, tmp_path, "quantised base", "weight_scale_inv")


def test_float8_weight_under_adapter_refused(base, lora, tmp_path):
    q = "model.layers.0.self_attn.q_proj.weight"
    rewrite_shard(shard_of(base, q), lambda t: t.update({q: t[q].to(torch.float8_e4m3fn)}))
    unload_refused(base, lora, tmp_path, "quantised base", q)


# -- no NaN/Inf written ----------------------------------------------------------------------------------------

def test_float16_overflow_in_copied_tensor_refused(base, lora, tmp_path):
    name = "model.embed_tokens.weight"  # not edited: only converted

    def big(t):
        t[name][3, 5] = 1e6

    rewrite_shard(shard_of(base, name), big)
    unload_refused(base, lora, tmp_path, name, "bfloat16", dtype="float16", cli=True)


def test_float16_overflow_in_edited_tensor_refused(base, lora, tmp_path):
    name = "model.layers.1.self_attn.v_proj.weight"

    def big(t):
        t[name][0, 0] = 7e4  # finite in float32 after the merge, Inf once rounded to float16

    rewrite_shard(shard_of(base, name), big)
    unload_refused(base, lora, tmp_path, name, "bfloat16", dtype="float16")


def test_float16_in_range_still_written(base, lora, tmp_path):
    from adaptool.commands.unload import unload

    unload(str(base), [str(lora)], tmp_path / "out", dtype="float16")
    assert all(bool(torch.isfinite(t).all()) for t in load_output(tmp_path / "out").values())


# -- pickled adapters ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [5, "text", {"nested": torch.zeros(2)}])
def test_bin_adapter_with_non_tensor_refused(llama_base, lora, tmp_path, extra):
    from safetensors.torch import load_file

    adapter = tmp_path / "lora_bin"
    adapter.mkdir()
    shutil.copyfile(lora / "adapter_config.json", adapter / "adapter_config.json")
    state = load_file(lora / "adapter_model.safetensors")
    state["base_model.model.extra"] = extra
    torch.save(state, adapter / "adapter_model.bin")
    unload_refused(llama_base, adapter, tmp_path, "adapter_model.bin", "not a plain tensor", cli=extra == 5)


def test_check_finite_empty_tensor(tmp_path):
    from adaptool.io.weights_buffer import first_non_finite

    assert first_non_finite([("e", torch.empty(0, 4)), ("s", torch.tensor(1.0))]) is None
    assert first_non_finite([("e", torch.empty(0, 4)), ("n", torch.tensor([1.0, float("nan")]))]) == "n"
