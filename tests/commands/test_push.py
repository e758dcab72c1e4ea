"""adaptool push / --push-to-hub against a local stand-in for the hub (``HF_ENDPOINT``): what huggingface_hub
sends (repo creation with its visibility, the branch, one commit with the manifest's files, their bytes, the
message naming the command and the recipe hash, the token), and one-line refusals (a folder that fails verify,
a bad repo id, 401, a closed port, a hub that never answers)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import make_adapter, run_cli

import adaptool
from adaptool.output.manifest import MANIFEST_NAME

TOKEN = "hf_adaptool_test_token"


class FakeHub(BaseHTTPRequestHandler):
    """Answers what huggingface_hub's create_repo, create_branch, create_commit (validate-yaml, preupload, NDJSON
    commit) need, and records every request. ``server.status`` forces an HTTP error on every request."""

    def log_message(self, *args):
        pass

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.requests.append(("GET", unquote(self.path), dict(self.headers), b""))
        self._answer(self.server.status or 404, {"error": "not here"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = unquote(self.path.split("?")[0])
        self.server.requests.append(("POST", path, dict(self.headers), body))
        if self.server.status:
            return self._answer(self.server.status, {"error": "Invalid credentials in Authorization header"})
        root = f"http://127.0.0.1:{self.server.server_port}"
        if path == "/api/repos/create":
            req = json.loads(body)
            return self._answer(200, {"url": f"{root}/{req['organization']}/{req['name']}"})
        if path == "/api/validate-yaml":
            return self._answer(200, {"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                for f in files]})
        if "/commit/" in path:
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            return self._answer(200, {"commitUrl": f"{root}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40})
        if "/branch/" in path:
            return self._answer(200, {})
        self._answer(404, {"error": f"unknown route {path}"})


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests, server.status = [], None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _env(server) -> dict:
    return {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def lora(llama_base, tmp_path_factory) -> Path:
    return make_adapter(llama_base, tmp_path_factory.mktemp("push") / "lora", r=2, lora_alpha=4,
                        target_modules=["q_proj"])


@pytest.fixture
def output(lora, tmp_path) -> Path:
    out = tmp_path / "edited"
    adaptool.edit(str(lora), out, scale=["2"])
    return out


def _commit(server) -> tuple[dict, dict[str, bytes]]:
    """The commit's header and files (path -> bytes) from the NDJSON body huggingface_hub sent."""
    body = next(b for m, p, _, b in server.requests if "/commit/" in p)
    items = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    header = next(i["value"] for i in items if i["key"] == "header")
    files = {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in items if i["key"] == "file"}
    return header, files


def test_push_sends_the_verified_files_in_one_commit(hub, output):
    rc, out, err = run_cli("push", str(output), "my-org/tiny-lora", "--private", "--revision", "exp/v1", "--json",
                           env=_env(hub))
    assert rc == 0, err
    summary = json.loads(out)
    paths = [p for _, p, _, _ in hub.requests]
    assert paths == ["/api/repos/create", "/api/models/my-org/tiny-lora/branch/exp/v1", "/api/validate-yaml",
                     "/api/models/my-org/tiny-lora/preupload/exp/v1", "/api/models/my-org/tiny-lora/commit/exp/v1"]
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h, _ in hub.requests)
    assert json.loads(hub.requests[0][3]) == {"name": "tiny-lora", "organization": "my-org", "visibility": "private"}
    header, files = _commit(hub)
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert sorted(files) == sorted([e["path"] for e in manifest["files"]] + [MANIFEST_NAME])
    for path, data in files.items():
        assert data == (output / path).read_bytes(), path
    recipe = manifest["recipe_sha256"]
    assert header["summary"] == f"adaptool edit, recipe {recipe[:16]}" and recipe in header["description"]
    assert summary["commit"] == "c" * 40 and summary["revision"] == "exp/v1" and summary["files"] == 4


def test_push_to_hub_after_a_writing_command(hub, lora, tmp_path):
    out = tmp_path / "k" / "lora.safetensors"
    rc, stdout, err = run_cli("convert", str(lora), "-o", str(out), "--to", "kohya", "--push-to-hub", "me/kohya-lora",
                              env=_env(hub))
    assert rc == 0, err
    assert "pushed 1 files to me/kohya-lora (main)" in stdout
    assert json.loads(hub.requests[0][3]) == {"name": "kohya-lora", "organization": "me"}  # public unless --private
    header, files = _commit(hub)
    assert files == {"lora.safetensors": out.read_bytes()}
    assert [p for _, p, _, _ in hub.requests][-1] == "/api/models/me/kohya-lora/commit/main"
    assert header["summary"].startswith("adaptool convert, recipe ")


def test_a_folder_that_fails_verify_is_not_pushed(hub, output):
    (output / "extra.txt").write_text("slipped in")
    rc, _, err = run_cli("push", str(output), "my-org/x", env=_env(hub))
    assert rc == 2 and err.count("\n") == 1 and "extra.txt is an unexpected extra file" in err, err
    assert hub.requests == []


@pytest.mark.parametrize("repo", ["not a repo", "org/na--me", "org/../x", "-org/x", "a/b/c", "org/x.git"])
def test_bad_repo_id_is_refused_before_any_work(hub, lora, tmp_path, repo):
    out = tmp_path / "never"
    rc, _, err = run_cli("edit", str(lora), "-o", str(out), "--push-to-hub", repo, env=_env(hub))
    assert rc == 2 and err.count("\n") == 1 and "is not a hub repo id" in err, err
    assert not out.exists() and hub.requests == []


def test_companion_options_need_push_to_hub(lora, tmp_path):
    rc, _, err = run_cli("edit", str(lora), "-o", str(tmp_path / "o"), "--private")
    assert rc == 2 and "--private needs --push-to-hub" in err and not (tmp_path / "o").exists()


def test_auth_failure_is_one_line_and_keeps_the_output(hub, lora, tmp_path):
    hub.status = 401
    out = tmp_path / "kept"
    rc, _, err = run_cli("edit", str(lora), "-o", str(out), "--push-to-hub", "my-org/x", env=_env(hub))
    assert rc == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in err.splitlines()) == 1  # above it: the progress line only
    assert "HTTP 401" in err and "hf auth login" in err and "is written, but" in err
    assert f"adaptool push {out} my-org/x" in err
    assert adaptool.verify(out)["intact"]  # the output stays, complete: push it later


def test_unreachable_and_silent_hubs(output):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run_cli("push", str(output), "my-org/x", env={**_env_port(port)})
    assert rc == 2 and err.count("\n") == 1 and "could not reach the hub" in err, err

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        start = time.perf_counter()
        rc, _, err = run_cli("push", str(output), "my-org/x",
                             env={**_env_port(silent.getsockname()[1]), "ADAPTOOL_HUB_TIMEOUT": "1"})
        assert rc == 2 and err.count("\n") == 1 and "timed out" in err, err
        assert time.perf_counter() - start < 30
    finally:
        silent.close()


def _env_port(port: int) -> dict:
    return {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_offline_mode_is_named(output):
    rc, _, err = run_cli("push", str(output), "my-org/x", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN})
    assert rc == 2 and "HF_HUB_OFFLINE" in err and err.count("\n") == 1, err


def test_python_api(hub, output, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from adaptool import push

    result = push(output, "my-org/api")
    assert result["repo_id"] == "my-org/api" and result["files"] == 4
    _, files = _commit(hub)
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME}
    shutil.rmtree(output)
    with pytest.raises(adaptool.AdaptoolError):
        push(output, "my-org/api")
