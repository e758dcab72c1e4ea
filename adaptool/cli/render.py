"""Summaries into lines (or one JSON object), and progress on stderr: a bar on a terminal, plain lines in logs."""

from __future__ import annotations

import json
import warnings

import typer

from adaptool.cli.progress_lines import ProgressLines, interval_from_env, wants_plain_lines

MIB = 1024 * 1024


def run_with_progress(work, label: str, quiet: bool):
    """Run ``work(on_start, on_progress)`` and show its progress on stderr: a rich bar on a terminal, plain
    lines (no ANSI) on a pipe or with ``NO_COLOR`` / ``TERM=dumb``, nothing with --quiet (warnings too)."""
    if quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return work(None, None)
    if wants_plain_lines():
        lines = ProgressLines(label, interval=interval_from_env())
        result = work(lines.start, lines.advance)
        lines.finish()
        return result
    return _run_with_bar(work, label)


def _run_with_bar(work, label: str):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = {}

    def on_start(n_items: int, n_bytes: int):
        task["id"] = progress.add_task(f"{label} {n_items} tensors", total=n_bytes)

    def on_progress(n: int):
        progress.advance(task["id"], n)

    with progress:
        return work(on_start, on_progress)


def report(summary: dict, as_json: bool, quiet: bool = False) -> None:
    """The summary as one JSON object (``--json``, even with ``quiet``: the one thing asked for), the plan (dry
    run), or a few lines; nothing with ``quiet`` alone."""
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "plan_text"}, indent=2, default=str))
        return
    if quiet:
        return
    if summary.get("dry_run"):
        typer.echo(summary.get("plan_text", ""))
        return
    if summary.get("command") in ("resize", "extract"):
        _report_lowrank(summary)
    elif "strategy" in summary:
        _report_merge(summary)
    else:
        _report_unload(summary)
    for note in summary.get("notes", []):
        typer.echo(f"note: {note}")


def _report_unload(summary: dict) -> None:
    typer.echo(f"wrote {summary['output']}: {summary.get('tensors_changed', 0)} of {summary.get('tensors_total', 0)} "
               f"tensors changed, {summary.get('bytes_written', 0) / MIB:,.1f} MiB in {summary.get('seconds', 0):.2f} s, "
               f"peak RSS {summary.get('peak_rss_bytes', 0) / MIB:,.0f} MiB")
    if summary.get("delta_retention") is not None:
        worst = summary.get("worst_retention") or {}
        typer.echo(f"delta retention after rounding: mean {summary['delta_retention']:.4f}"
                   + (f", worst {worst['retention']:.4f} ({worst['tensor']})" if worst else ""))


def _report_merge(summary: dict) -> None:
    what = (f"{summary['modules']} modules, rank {summary.get('rank')}" if summary["kind"] == "adapter"
            else f"{summary['modules']} modules folded, {summary.get('tensors_changed', 0)} of "
                 f"{summary.get('tensors_total', 0)} tensors changed")
    typer.echo(f"wrote {summary['output']} ({summary['strategy']}, space {summary['space']}, {summary['kind']}): {what}, "
               f"{summary.get('bytes_written', 0) / MIB:,.1f} MiB in {summary['seconds']:.2f} s, "
               f"peak RSS {summary.get('peak_rss_bytes', 0) / MIB:,.0f} MiB")
    energy = summary.get("energy_kept")
    if energy:
        typer.echo(f"energy kept by the rank cut: mean {energy['mean']:.4f}, min {energy['min']:.4f} "
                   f"({energy['worst_module']})")


def _report_lowrank(summary: dict) -> None:
    """resize / extract: modules written, ranks out, size, time; the energy kept by the rank cuts."""
    ranks = summary.get("rank_out") or [0, 0]
    rank = f"rank {ranks[0]}" if ranks[0] == ranks[1] else f"ranks {ranks[0]}–{ranks[1]}"
    before = summary.get("bytes_before")
    size = f"{summary.get('bytes_written', 0) / MIB:,.1f} MiB" + (f" (was {before / MIB:,.1f} MiB)" if before else "")
    typer.echo(f"wrote {summary['output']}: {len(summary.get('modules', []))} modules, {rank}, {size} in "
               f"{summary.get('seconds', 0):.2f} s, peak RSS {summary.get('peak_rss_bytes', 0) / MIB:,.0f} MiB")
    energy = summary.get("energy_kept")
    if energy:
        typer.echo(f"energy kept: mean {energy['mean']:.4f}, min {energy['min']:.4f} ({energy['worst_module']})")


def report_inspect(summary: dict, as_json: bool) -> None:
    """``inspect``: one JSON object, or a table per adapter (modules) or a few lines for a model."""
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from adaptool.cli.tables import inspect_tables

    inspect_tables(summary)
