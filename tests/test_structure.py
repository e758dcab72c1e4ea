"""The shape of the code (DESIGN.md), held by a test: no import cycles (function-level imports count), no
module importing another's private names, no function over 80 lines, no module found by a string, a command
never importing another command, and the CLI importing no heavy library at start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adaptool"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported module, imported names) for every import statement, at any depth."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            yield base, [a.name for a in node.names]


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for base, names in _imports(name, path):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES] or [base]
            graph[name] |= {t for t in targets if t in MODULES and t != name}
    return graph


def test_no_import_cycles():
    graph, state, cycles, stack = _graph(), {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = []
    for name, path in MODULES.items():
        for base, names in _imports(name, path):
            if base.startswith("adaptool") and base != name:
                bad += [f"{name} imports {base}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_functions_are_short():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def test_no_module_found_by_a_string():
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if called in ("import_module", "__import__"):
                    found.append(f"{name}:{node.lineno}")
    assert not found, found


def test_a_command_never_imports_another():
    graph = _graph()
    commands = {m for m in MODULES if m.startswith("adaptool.commands.")}
    planners = {"adaptool.commands.merge_mixed": "adaptool.commands.merge"}  # one command's two planners
    bad = [f"{m} -> {t}" for m in commands for t in graph[m] & commands if planners.get(t) != m]
    assert not bad, bad


def test_cli_start_imports_nothing_heavy():
    code = ("import sys, adaptool.cli\n"
            "print(sorted(m for m in ('torch', 'safetensors', 'huggingface_hub', 'numpy', 'yaml') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
