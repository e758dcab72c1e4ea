"""adaptool verify: an output folder against its manifest, a single file against its own header digests.

Intact outputs pass; every way an output can differ from what adaptool wrote (a flipped byte, a file deleted,
added, resized or replaced by a symlink, a manifest missing, corrupt or naming paths outside the folder, a
changed header or data section of a kohya file) fails with exit 2 and one line naming the first problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import make_adapter, run_cli
from safetensors import safe_open
from safetensors.torch import load_file

import adaptool
from adaptool.output.manifest import MANIFEST_NAME, VerifyError, write_manifest

MANIFEST = MANIFEST_NAME


@pytest.fixture(scope="module")
def outputs(llama_base, tmp_path_factory):
    """An adapter folder (edit) and a kohya file (convert), both written by adaptool."""
    root = tmp_path_factory.mktemp("verify")
    lora = make_adapter(llama_base, root / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adaptool.edit(str(lora), root / "edited", scale=["0.5"])
    adaptool.convert(str(lora), root / "lora.safetensors", "kohya")
    return root / "edited", root / "lora.safetensors"


@pytest.fixture
def folder(outputs, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(outputs[0], out)
    return out


@pytest.fixture
def kohya(outputs, tmp_path) -> Path:
    out = tmp_path / "k.safetensors"
    shutil.copyfile(outputs[1], out)
    return out


def _refused(path: Path, *needles: str) -> dict:
    """verify fails through the CLI (exit 2, one line naming the problem) and through the API (VerifyError);
    the JSON form says what the problem is."""
    rc, out, err = run_cli("verify", str(path))
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    rc, out, _ = run_cli("verify", str(path), "--json")
    assert rc == 2
    reported = json.loads(out)
    assert reported["intact"] is False
    with pytest.raises(VerifyError) as e:
        adaptool.verify(path)
    assert e.value.problem == reported["problem"]
    return reported["problem"]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_intact_folder_and_file(folder, kohya):
    manifest = _manifest(folder)
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert [e["path"] for e in manifest["files"]] == on_disk == ["README.md", "adapter_config.json",
                                                                  "adapter_model.safetensors"]
    for e in manifest["files"]:  # the manifest's own numbers, checked independently
        data = (folder / e["path"]).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert manifest["command"] == "edit" and manifest["recipe_sha256"] == meta["adaptool.recipe_sha256"]
    summary = adaptool.verify(folder)
    assert summary["intact"] and summary["files"] == 3 and summary["made_by"]["command"] == "edit"
    rc, out, err = run_cli("verify", str(folder))
    assert rc == 0 and "intact, 3 files" in out and "adaptool edit" in out, err
    rc, out, err = run_cli("verify", str(kohya), "--json")
    assert rc == 0, err
    assert json.loads(out)["kind"] == "file" and json.loads(out)["made_by"]["command"] == "convert"
    # the kohya file's own digests, recomputed independently; the sealed file still loads as safetensors
    raw = kohya.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert meta["adaptool.sha256_tensors"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert (8 + n) % 8 == 0 and len(load_file(str(kohya))) == 12  # 4 modules: down, up, alpha


def test_byte_flipped(folder):
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert _refused(folder, "adapter_model.safetensors changed", "sha256")["kind"] == "sha256"


def test_deleted_added_resized(folder):
    original = (folder / "README.md").read_bytes()
    (folder / "README.md").unlink()
    assert _refused(folder, "README.md is missing")["path"] == "README.md"
    (folder / "README.md").write_bytes(original + b"\n")
    assert _refused(folder, "README.md changed:", "bytes")["kind"] == "size"
    (folder / "README.md").unlink()
    (folder / "zz-extra.txt").write_text("added")
    assert _refused(folder, "README.md is missing")["path"] == "README.md"  # the first problem in path order
    (folder / "README.md").write_bytes(original)
    assert _refused(folder, "zz-extra.txt is an unexpected extra file")["kind"] == "extra"


def test_extra_files(folder):
    (folder / "notes.txt").write_text("added after the run")
    assert _refused(folder, "notes.txt is an unexpected extra file")["kind"] == "extra"
    (folder / "notes.txt").unlink()
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"\0")
    assert _refused(folder, "sub/x.bin is an unexpected extra file")["path"] == "sub/x.bin"


def test_manifest_missing_or_corrupt(folder):
    manifest = (folder / MANIFEST).read_text()
    (folder / MANIFEST).unlink()
    assert _refused(folder, f"has no {MANIFEST}")["kind"] == "manifest"
    (folder / MANIFEST).write_text(manifest[:-20])
    _refused(folder, "not valid JSON")
    (folder / MANIFEST).write_text(json.dumps({"format": "something", "files": []}))
    _refused(folder, "not an adaptool manifest")
    data = json.loads(manifest)
    data["version"] = 99
    (folder / MANIFEST).write_text(json.dumps(data))
    _refused(folder, "version 99")
    data["version"] = 1
    data["files"][0]["sha256"] = "nope"
    (folder / MANIFEST).write_text(json.dumps(data))
    _refused(folder, "no valid size and sha256")


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", "a/../../b", "./README.md", "a//b", "sub\\..\\x",
                                 MANIFEST])
def test_manifest_entries_outside_the_folder_are_refused(folder, tmp_path, bad):
    (tmp_path / "outside.txt").write_text("secret")
    data = _manifest(folder)
    data["files"].append({"path": bad, "size": 6, "sha256": hashlib.sha256(b"secret").hexdigest()})
    (folder / MANIFEST).write_text(json.dumps(data))
    assert _refused(folder, "not a file path inside the folder")["kind"] == "manifest"


def test_symlink_tricks(folder, tmp_path):
    """A listed file replaced by a link to identical bytes elsewhere, a linked subfolder, a linked manifest: all
    refused (adaptool writes regular files only; verify never follows a link)."""
    readme = folder / "README.md"
    outside = tmp_path / "copy-of-readme"
    shutil.copyfile(readme, outside)
    readme.unlink()
    readme.symlink_to(outside)
    assert _refused(folder, "README.md is a symlink")["kind"] == "symlink"
    readme.unlink()
    shutil.copyfile(outside, readme)
    (tmp_path / "elsewhere").mkdir()
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _refused(folder, "linked is a symlink")
    (folder / "linked").unlink()
    manifest = folder / MANIFEST
    shutil.move(manifest, tmp_path / "m.json")
    manifest.symlink_to(tmp_path / "m.json")
    _refused(folder, f"{MANIFEST} is not a regular file")
    manifest.unlink()
    shutil.move(tmp_path / "m.json", manifest)
    os.mkfifo(folder / "fifo")
    _refused(folder, "fifo is not a regular file")
    (folder / "fifo").unlink()
    assert adaptool.verify(folder)["intact"]


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_kohya_file_changes(kohya, tmp_path, llama_base):
    data = bytearray(kohya.read_bytes())
    data[-1] ^= 0x40
    kohya.write_bytes(bytes(data))
    assert _refused(kohya, "tensor data changed")["kind"] == "tensors"
    data[-1] ^= 0x40
    kohya.write_bytes(bytes(data))
    assert adaptool.verify(kohya)["intact"]
    _rewrite_header(kohya, lambda h: h["__metadata__"].update({"ss_network_alpha": "999"}))
    assert _refused(kohya, "the header changed")["kind"] == "header"
    _rewrite_header(kohya, lambda h: h["__metadata__"].update({"adaptool.sha256_tensors": "0" * 64}))
    _refused(kohya)  # a forged digest fails too (the header digest covers the metadata, not itself)
    plain = llama_base / "model-00001-of-00003.safetensors"
    if not plain.exists():
        plain = sorted(llama_base.glob("*.safetensors"))[0]
    assert _refused(plain, "carries no adaptool digests")["kind"] == "manifest"
    rc, _, err = run_cli("verify", str(tmp_path / "nothing-here"))
    assert rc == 2 and "not found" in err and err.count("\n") == 1


def test_manifest_takes_the_engines_digests_when_the_size_agrees(tmp_path):
    """write_manifest uses EngineStats.file_digests (filled while the engine writes tensor files) where it has a
    digest for a file of that size, and hashes every other file itself; with none it hashes everything."""
    (tmp_path / "a.safetensors").write_bytes(b"12345678")
    (tmp_path / "b.safetensors").write_bytes(b"abc")
    (tmp_path / "c.json").write_text("{}")

    class Plan:
        files = []

    class Stats:
        file_digests = {str(tmp_path / "a.safetensors"): (8, "f" * 64), "b.safetensors": (99, "e" * 64)}

    write_manifest(tmp_path, Plan, Stats)
    by_path = {e["path"]: e["sha256"] for e in _manifest(tmp_path)["files"]}
    assert by_path["a.safetensors"] == "f" * 64  # trusted: the engine hashed the bytes it wrote
    assert by_path["b.safetensors"] == hashlib.sha256(b"abc").hexdigest()  # size disagrees: hashed here
    assert by_path["c.json"] == hashlib.sha256(b"{}").hexdigest()
    Stats.file_digests = {}
    write_manifest(tmp_path, Plan, Stats)
    assert adaptool.verify(tmp_path)["files"] == 3
