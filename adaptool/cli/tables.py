"""``adaptool inspect`` without ``--json``: a header line and a rich table, one row per module (a few lines for a
model). On a pipe rich prints plain text, as wide as the table needs, so module names are never cut."""

from __future__ import annotations

import sys

MIB = 1024 * 1024
ENERGY_RANKS = ("1", "4", "16")


def inspect_tables(summary: dict) -> None:
    """Print ``summary`` (what :func:`adaptool.commands.inspect.inspect` returns) to stdout."""
    from rich.console import Console

    # Off a terminal rich would wrap at 80 columns; let the table take the width it needs instead.
    console = Console(highlight=False) if sys.stdout.isatty() else Console(width=100_000, highlight=False)
    if summary.get("kind") == "model":
        _model_lines(console, summary)
        return
    for line in _adapter_header(summary):
        console.print(line, markup=False)
    if summary.get("modules"):
        table = _module_table(summary)
        # Numbers are never cut: a terminal narrower than that (module names folded to 24 columns) wraps lines.
        needed = Console(width=100_000).measure(table).minimum
        if console.width < needed:
            console = Console(width=needed, highlight=False, force_terminal=console.is_terminal)
        console.print(table)
    for line in _adapter_footer(summary):
        console.print(line, markup=False)


def _model_lines(console, s: dict) -> None:
    dtypes = ", ".join(f"{k} {v}" for k, v in s.get("dtypes", {}).items())
    kind = f" ({s['model_type']})" if s.get("model_type") else ""
    console.print(f"model {s.get('source')}{kind}", markup=False)
    console.print(f"  tensors     {s['tensors']:,}  ({dtypes})", markup=False)
    console.print(f"  parameters  {s['parameters']:,}  ({_count(s['parameters'])}), mostly {s.get('dtype')}",
                  markup=False)
    console.print(f"  size        {s.get('bytes', 0) / MIB:,.1f} MiB in {s.get('shards', 0)} shard(s)", markup=False)


def _adapter_header(s: dict) -> list[str]:
    flags = [name for name, on in (("rsLoRA", s.get("rslora")), ("DoRA", s.get("dora"))) if on]
    kind = s["peft_type"] + (f" ({', '.join(flags)})" if flags else "")
    n_params = s.get("parameters", 0)
    lines = [f"{kind} adapter {s.get('source')} [{s.get('format')}]",
             f"  {len(s.get('modules', []))} modules, {s.get('tensors', 0)} tensors, {n_params:,} parameters "
             f"({_count(n_params)}), {s.get('bytes', 0) / MIB:,.2f} MiB, mostly {s.get('dtype')}"]
    if s.get("base_model_name_or_path"):
        lines.append(f"  trained on {s['base_model_name_or_path']}")
    if "fits_base" in s:
        verdict = "every module fits" if s["fits_base"] else f"does NOT fit: {s.get('fit_error')}"
        lines.append(f"  base {s.get('base')}: {verdict}")
    return lines


def _adapter_footer(s: dict) -> list[str]:
    lines = []
    if s.get("saved"):
        shown = ", ".join(s["saved"][:5]) + (f" … (+{len(s['saved']) - 5})" if len(s["saved"]) > 5 else "")
        lines.append(f"saved whole: {shown}")
    if s.get("non_finite"):
        shown = ", ".join(s["non_finite"][:5]) + (" …" if len(s["non_finite"]) > 5 else "")
        lines.append(f"NaN/Inf in: {shown}")
    lines += [f"note: {n}" for n in s.get("notes", [])]
    return lines


def _module_table(s: dict):
    """One row per module. On a narrow terminal the module (and detail) column folds; numbers are never cut."""
    from rich.table import Table
    from rich.text import Text

    with_fit = "fits_base" in s
    rows = [_row(m, with_fit) for m in s["modules"]]
    with_detail = any(r[-1] for r in rows)
    columns = ["module", "rank", "alpha", "scale", "shape", "‖ΔW‖_F", "stable rank",
               *(f"energy@{k}" for k in ENERGY_RANKS), *(["fits"] if with_fit else []), "detail"]
    if not with_detail:
        columns, rows = columns[:-1], [r[:-1] for r in rows]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, name in enumerate(columns):
        folds = name in ("module", "detail")
        width = max([len(name)] + [len(r[i]) for r in rows])
        table.add_column(name, justify="left" if folds or name == "shape" else "right", overflow="fold",
                         no_wrap=not folds, min_width=min(width, 24) if folds else width)
    for r in rows:
        table.add_row(*(Text(cell) for cell in r))  # Text: a "[" in a module name is no markup
    return table


def _row(m: dict, with_fit: bool) -> list[str]:
    energy = m.get("energy") or {}
    row = [m["module"], _num(m.get("rank"), "d"), _num(m.get("alpha"), "g"), _num(m.get("scale"), ".4g"),
           "×".join(str(d) for d in m["shape"]) if m.get("shape") else "—",
           _num(m.get("delta_norm"), ".4g"), _num(m.get("stable_rank"), ".2f"),
           *(_num(energy.get(k), ".3f") for k in ENERGY_RANKS)]
    if with_fit:
        row.append("yes" if m.get("fits_base") else "NO")
    return row + [_detail(m)]


def _detail(m: dict) -> str:
    """What a family without a rank shows instead: IA3's scaled features, OFT's rotation blocks."""
    if "features" in m:
        side = {True: "input", False: "output", None: "?"}[m.get("feedforward")]
        return f"scales {m['features']} {side} features"
    if "blocks" in m:
        return f"{m['blocks']} rotation blocks of {m['block_size']}" + (" (shared)" if m.get("block_share") else "")
    return "NaN/Inf" if m.get("non_finite") else ""


def _num(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
