"""Logs and quiet: what a pipe, a CI log or a script sees (issue 12).

Progress on a pipe is plain lines on stderr (no ANSI, no carriage return), ``--quiet`` prints nothing on
success, ``--json`` prints exactly one JSON object on stdout for every command that has it, help strings print
literally (``[@rev]``) with flags shown bare, and ``--debug`` works after the subcommand too. The subprocess
tests run the real entry point with stdout and stderr as pipes; the line emitter is tested with a fake clock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import make_adapter, run_cli

from adaptool.cli.main import split_debug
from adaptool.cli.progress_lines import (INTERVAL_ENV, ProgressLines, human_bytes, human_duration,
                                         interval_from_env, wants_plain_lines)
from adaptool.errors import AdaptoolError

LINE = re.compile(r"^(?P<label>[A-Z][a-z]+): (?P<pct>\d{1,3})% [\d.]+ (B|KiB|MiB|GiB) of [\d.]+ (B|KiB|MiB|GiB), "
                  r"([\d.]+ (B|KiB|MiB|GiB)|-)/s, ETA ([\d.hms]+|-)(, done in [\d.hms]+)?$")
EVERY_UPDATE = {INTERVAL_ENV: "0"}


@pytest.fixture(scope="module")
def loras(llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    a = make_adapter(llama_base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = make_adapter(llama_base, root / "b", seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return a, b


def assert_clean(*streams: str) -> None:
    for s in streams:
        assert "\x1b" not in s and "\r" not in s, repr(s[:300])


def one_json_object(stdout: str) -> dict:
    """stdout holds exactly one JSON object and nothing else."""
    text = stdout.strip()
    obj, end = json.JSONDecoder().raw_decode(text)
    assert text[end:].strip() == "", f"more than one JSON value on stdout: {text[end:end + 200]!r}"
    assert isinstance(obj, dict)
    return obj


# ------------------------------------------------------------------------------------------------------
# Real runs, stderr a pipe


def test_pipe_gets_plain_progress_lines_and_json_gets_one_object(llama_base, loras, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{loras[0]}", "-o", str(out), "--json", env=EVERY_UPDATE)
    assert rc == 0, stderr
    assert_clean(stdout, stderr)
    assert one_json_object(stdout)["output"] == str(out)
    lines = stderr.strip().splitlines()
    assert len(lines) >= 5, stderr  # a line per tensor with the interval at 0
    assert all(LINE.match(line) and line.startswith("Writing: ") for line in lines), stderr
    pcts = [int(LINE.match(line)["pct"]) for line in lines]
    assert pcts == sorted(pcts) and pcts[-1] == 100 and pcts.count(100) == 1, pcts
    assert "done in" in lines[-1] and "ETA 0.0s" in lines[-1]


def test_default_interval_on_a_quick_run_is_the_final_line_only(llama_base, loras, tmp_path):
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{loras[0]}", "-o", str(tmp_path / "out"))
    assert rc == 0, stderr
    assert_clean(stdout, stderr)
    lines = stderr.strip().splitlines()
    assert lines and all(LINE.match(line) for line in lines) and " 100% " in lines[-1], stderr
    assert stdout.startswith("wrote ")


def test_quiet_prints_nothing_on_success(llama_base, loras, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{loras[0]}", "-o", str(out), "--quiet", env=EVERY_UPDATE)
    assert (rc, stdout, stderr) == (0, "", "")
    assert out.is_dir() and any(out.iterdir())


def test_quiet_error_is_still_one_line(llama_base, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{tmp_path / 'missing'}", "-o", str(out), "-q")
    assert rc == 2 and stdout == "", (rc, stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def tuned(llama_base, loras, tmp_path_factory):
    """A 'fine-tuned' model for extract: the base with the first LoRA folded in."""
    from adaptool.commands.unload import unload

    out = tmp_path_factory.mktemp("tuned") / "tuned"
    unload(str(llama_base), [str(loras[0])], out)
    return out


def _json_runs(llama_base, loras, tuned, tmp_path) -> dict[str, list[str]]:
    """One ``--json`` run of every command that has the option (each to its own output); edit once more with
    ``--quiet`` (merge --dry-run --json: tests/commands/test_merge.py)."""
    a, b = (str(x) for x in loras)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"adapters: [{{path: {a}}}, {{path: {b}}}]\nstrategy: linear\n"
                      f"output: {{path: {tmp_path / 'merged'}}}\n")
    runs = {
        "merge": ["merge", str(recipe)],
        "inspect": ["inspect", a],
        "resize": ["resize", a, "-o", str(tmp_path / "resized"), "--rank", "2"],
        "extract": ["extract", str(llama_base), str(tuned), "-o", str(tmp_path / "extracted"), "--rank", "4"],
        "align": ["align", a, b, "-o", str(tmp_path / "aligned")],
        "edit": ["edit", a, "-o", str(tmp_path / "edited"), "--drop", "v_proj"],
        "edit --quiet": ["edit", a, "-o", str(tmp_path / "edited-quiet"), "--drop", "v_proj", "-q"],
        "convert": ["convert", a, "-o", str(tmp_path / "a.safetensors"), "--to", "kohya"],
    }
    return {name: [*args, "--json"] for name, args in runs.items()}


def test_every_json_command_prints_one_object(llama_base, loras, tuned, tmp_path):
    """Run side by side (each starts torch: a few seconds apiece), then checked one by one."""
    runs = _json_runs(llama_base, loras, tuned, tmp_path)
    procs = {name: subprocess.Popen([sys.executable, "-m", "adaptool", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
             for name, args in runs.items()}
    results = {name: (*p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    for name, (stdout, stderr, rc) in results.items():
        assert rc == 0, (name, stderr)
        assert_clean(stdout, stderr)
        try:
            one_json_object(stdout)
        except (ValueError, AssertionError) as e:
            raise AssertionError(f"adaptool {name} --json: {e}\n{stdout[:500]}") from None
        if "--quiet" in name:
            assert stderr == "", (name, stderr)  # --quiet with --json: the JSON object and nothing else
        else:
            assert all(LINE.match(line) for line in stderr.strip().splitlines()), (name, stderr)  # progress only


def _run_on_a_terminal(args: list[str], env: dict) -> tuple[int, str]:
    """Run adaptool with stderr a pseudo-terminal (stdout a pipe); return the exit code and what stderr got."""
    import pty

    master, slave = pty.openpty()
    ambient = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR")}
    proc = subprocess.Popen([sys.executable, "-m", "adaptool", *args], stdout=subprocess.PIPE, stderr=slave,
                            env={**ambient, "HF_HUB_OFFLINE": "1", **env})
    os.close(slave)
    got = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        got += chunk
    proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, got.decode(errors="replace")


@pytest.mark.parametrize("env, plain", [({"TERM": "xterm-256color", "NO_COLOR": "1"}, True),
                                        ({"TERM": "xterm-256color", "NO_COLOR": ""}, False)])
def test_a_terminal_gets_the_bar_unless_no_color_or_dumb(llama_base, loras, tmp_path, env, plain):
    rc, err = _run_on_a_terminal(["unload", f"{llama_base}+{loras[0]}", "-o", str(tmp_path / "out")],
                                 {**EVERY_UPDATE, **env})
    assert rc == 0, err
    lines = err.replace("\r\n", "\n").strip().splitlines()  # the terminal turns \n into \r\n
    if plain:
        assert "\x1b" not in err and lines and all(LINE.match(line) for line in lines), err
    else:
        assert "\x1b" in err and not any(LINE.match(line) for line in lines), err  # rich's bar, not lines


# ------------------------------------------------------------------------------------------------------
# Help and --debug


def _commands() -> list[str]:
    from adaptool.cli.app import app

    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


def test_help_prints_brackets_literally_and_flags_bare():
    import typer

    from adaptool.cli.app import app

    group = typer.main.get_command(app)
    ctx = group.make_context("adaptool", ["unload"], resilient_parsing=True)
    for name in ["", *_commands()]:
        rc, stdout, stderr = run_cli(*([name] if name else []), "--help", env={"COLUMNS": "200"})
        assert rc == 0 and stderr == "", (name, stderr)
        assert "<bool>" not in stdout and "\x1b" not in stdout, (name, stdout)
        if not name:
            continue
        cmd = group.get_command(ctx, name)
        texts = [cmd.help or "", cmd.epilog or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        flat = " ".join(stdout.split())
        for token in re.findall(r"\[[^\]\s]*\]", " ".join(texts)):
            assert token in flat, f"adaptool {name} --help lost {token!r}"
        for flag in ("--force", "--json", "--quiet", "--dry-run", "--skip-missing"):
            assert not re.search(re.escape(flag) + r" <", stdout), (name, flag)
    for name in ("unload", "inspect", "resize"):
        rc, stdout, _ = run_cli(name, "--help")
        assert "[@rev]" in stdout, (name, stdout)


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    for args in (["merge", missing, "--debug"], ["--debug", "merge", missing]):
        rc, stdout, stderr = run_cli(*args)
        assert rc == 2, (args, rc, stderr)
        assert "Traceback (most recent call last)" in stderr, (args, stderr)
        assert stderr.strip().splitlines()[-1].startswith("error: recipe file"), stderr  # the exit code stays 2


def test_split_debug():
    assert split_debug(["merge", "r.yaml", "--debug"]) == (["merge", "r.yaml"], True)
    assert split_debug(["--debug", "merge", "r.yaml"]) == (["merge", "r.yaml"], True)
    assert split_debug(["merge", "r.yaml"]) == (["merge", "r.yaml"], False)
    assert split_debug(["x", "--", "--debug"]) == (["x", "--", "--debug"], False)


# ------------------------------------------------------------------------------------------------------
# The line emitter, with a fake clock


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _emitter(**kw):
    clock, lines = FakeClock(), []
    stamped = []

    def write(line):
        lines.append(line)
        stamped.append((clock.now, line))

    return ProgressLines("Merging", write=write, clock=clock, **kw), clock, lines, stamped


def test_time_drives_lines_when_no_step_is_crossed():
    p, clock, lines, stamped = _emitter()
    p.start(3, 10_000)
    for _ in range(23):  # 1 byte a second: no tenth is crossed, so the 5 s interval decides
        clock.now += 1
        p.advance(1)
    assert [t - 100 for t, _ in stamped] == [5, 10, 15, 20]
    clock.now += 1
    p.finish()
    assert len(lines) == 5 and lines[-1].startswith("Merging: 100% 23 B of 23 B")
    assert all(LINE.match(line) for line in lines), lines


def test_each_tenth_gives_a_line_but_at_most_one_a_second():
    p, clock, lines, stamped = _emitter()
    p.start(1, 1000)
    for _ in range(99):  # 10 bytes every 0.125 s: a tenth every 1.25 s, before the 5 s interval
        clock.now += 0.125
        p.advance(10)
    times = [t - 100 for t, _ in stamped]
    assert times == [1.25 * k for k in range(1, 10)], times  # 10%..90%; 100% is finish()'s
    assert [int(LINE.match(line)["pct"]) for line in lines] == [10, 20, 30, 40, 50, 60, 70, 80, 90]

    p, clock, lines, _ = _emitter()
    p.start(1, 1000)
    for _ in range(9):  # 10% every 0.01 s: the crossings come too fast, so no line before 1 s has passed
        clock.now += 0.01
        p.advance(100)
    assert lines == []
    clock.now += 1
    p.finish()
    assert len(lines) == 1 and " 100% " in lines[0]


def test_line_content():
    p, clock, lines, _ = _emitter(interval=0)
    p.start(10, 4 * 1024**3)
    clock.now += 10
    p.advance(1024**3)
    assert lines == ["Merging: 25% 1.0 GiB of 4.0 GiB, 102.4 MiB/s, ETA 30s"]
    clock.now += 20
    p.advance(3 * 1024**3)
    assert len(lines) == 1  # the 100% line is finish()'s
    p.finish()
    assert lines[-1] == "Merging: 100% 4.0 GiB of 4.0 GiB, 136.5 MiB/s, ETA 0.0s, done in 30s"
    assert_clean(*lines)


def test_finish_without_work_prints_nothing_and_unknown_totals_print_bytes():
    p, clock, lines, _ = _emitter()
    p.finish()  # a dry run never starts the work
    assert lines == []
    p, clock, lines, _ = _emitter(interval=0)
    clock.now += 2
    p.advance(2048)  # progress before (or without) a start: no total, so no percent
    clock.now += 2
    p.advance(2048)
    assert lines == ["Merging: 2.0 KiB, -/s, ETA -", "Merging: 4.0 KiB, 2.0 KiB/s, ETA -"]
    p.finish()
    assert lines[-1].startswith("Merging: 100% 4.0 KiB of 4.0 KiB")


def test_an_estimate_below_the_bytes_done_ends_at_100_percent_once():
    p, clock, lines, _ = _emitter(interval=0)
    p.start(2, 100)
    clock.now += 1
    p.advance(80)
    clock.now += 1
    p.advance(80)  # past the estimate: no line over 100%
    p.finish()
    assert [int(LINE.match(line)["pct"]) for line in lines] == [80, 100]
    assert "160 B of 160 B" in lines[-1]


def test_percent_is_floored_so_only_the_last_line_says_100():
    p, clock, lines, _ = _emitter(interval=0)
    p.start(1, 1000)
    clock.now += 1
    p.advance(996)
    assert lines[-1].startswith("Merging: 99% 996 B of 1000 B")


def test_human_units():
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B" and human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 1024**3) == "5.0 GiB"
    assert human_duration(7.25) == "7.2s" and human_duration(42) == "42s" and human_duration(95) == "1m35s"
    assert human_duration(3725) == "1h02m" and human_duration(-1) == "0.0s"


class Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_plain_lines_are_chosen_on_stderr_isatty_no_color_and_dumb():
    assert wants_plain_lines(Stream(False), {"TERM": "xterm"})
    assert not wants_plain_lines(Stream(True), {"TERM": "xterm"})
    assert wants_plain_lines(Stream(True), {"TERM": "xterm", "NO_COLOR": "1"})
    assert not wants_plain_lines(Stream(True), {"TERM": "xterm", "NO_COLOR": ""})  # no-color.org: empty = unset
    assert wants_plain_lines(Stream(True), {"TERM": "dumb"})
    assert wants_plain_lines(object(), {})  # no isatty at all: not a terminal


def test_interval_from_env():
    assert interval_from_env({}) == 5.0 and interval_from_env({INTERVAL_ENV: "0"}) == 0.0
    assert interval_from_env({INTERVAL_ENV: " 2.5 "}) == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(AdaptoolError, match=INTERVAL_ENV):
            interval_from_env({INTERVAL_ENV: bad})


def test_bad_interval_is_a_one_line_error(llama_base, loras, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("unload", f"{llama_base}+{loras[0]}", "-o", str(out), env={INTERVAL_ENV: "soon"})
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and INTERVAL_ENV in stderr, stderr
    assert not out.exists()
