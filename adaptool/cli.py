"""The ``adaptool`` command line: parse, call the Python API, render. No math here.

Heavy imports (torch, safetensors, huggingface_hub) happen inside the commands, so ``adaptool --help``
answers at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from adaptool import __version__

app = typer.Typer(
    name="adaptool",
    help="Merge LoRA-family adapters and fold them into base checkpoints: streaming, exact, PEFT-compatible.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version(value: bool):
    if value:
        typer.echo(f"adaptool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    _state["debug"] = debug


@app.command(
    epilog="Examples:\n\n"
    "  adaptool unload ./Llama-3.2-1B+./my-lora -o merged/\n\n"
    "  adaptool unload meta-llama/Llama-3.2-1B+me/lora-a+me/lora-b -o merged/ --dtype bfloat16\n\n"
    "  adaptool unload ./my-lora -o merged/      # base from the adapter's base_model_name_or_path"
)
def unload(
    sources: str = typer.Argument(..., metavar="BASE+ADAPTER[+ADAPTER…]",
                                  help="Base model and adapters (folders or hub ids org/name[@rev]) joined by '+'."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (written atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype: float32, float16, bfloat16. Default: the base's."),
    device: str = typer.Option("auto", "--device", help="Where the math runs: auto, cpu, cuda, cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace an existing non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Fold adapters into a base checkpoint and write a plain model (streamed, one tensor at a time)."""
    from adaptool.unload import split_sources
    from adaptool.unload import unload as run_unload

    def work(on_start, on_progress):
        base, adapters = split_sources(sources)
        return run_unload(base, adapters, output, dtype=dtype, device=device, force=force,
                          on_start=on_start, on_progress=on_progress)

    summary = _run_with_progress(work, "Writing", "tensors")
    _report(summary, as_json)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool merge recipes/ties.yaml\n\n"
    "  adaptool merge recipe.yaml -o out/merged --device cuda --json\n\n"
    "  adaptool merge recipe.yaml --dry-run"
)
def merge(
    recipe: Path = typer.Argument(..., help="YAML recipe (see docs/recipes.md)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Override output.path of the recipe."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the recipe's device: auto, cpu, cuda, cuda:N."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Combine adapters with a strategy from a YAML recipe, into one adapter or into the base."""
    from adaptool.merge import merge as run_merge

    def work(on_start, on_progress):
        return run_merge(recipe, output=output, device=device, dry_run=dry_run, force=force,
                         on_start=on_start, on_progress=on_progress)

    summary = _run_with_progress(work, "Merging", "items")
    _report(summary, as_json)


def _run_with_progress(work, label: str, unit: str):
    """Run ``work`` with a rich progress bar on a terminal (nothing on a pipe)."""
    if not sys.stderr.isatty():
        return work(None, None)
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = {}

    def on_start(n_items: int, n_bytes: int):
        task["id"] = progress.add_task(f"{label} {n_items} {unit}", total=n_bytes)

    def on_progress(n: int):
        progress.advance(task["id"], n)

    with progress:
        return work(on_start, on_progress)


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "plan_text"}, indent=2, default=str))
        return
    if summary.get("dry_run"):
        typer.echo(summary.get("plan_text", ""))
        return
    mb = 1024 * 1024
    if "strategy" in summary:
        _report_merge(summary)
        return
    line = (f"wrote {summary['output']}: {summary.get('tensors_changed', 0)} of {summary.get('tensors_total', 0)} tensors "
            f"changed, {summary.get('bytes_written', 0) / mb:,.1f} MiB in {summary.get('seconds', 0):.2f} s, "
            f"peak RSS {summary.get('peak_rss_bytes', 0) / mb:,.0f} MiB")
    typer.echo(line)
    if summary.get("delta_retention") is not None:
        worst = summary.get("worst_retention") or {}
        typer.echo(f"delta retention after rounding: mean {summary['delta_retention']:.4f}"
                   + (f", worst {worst['retention']:.4f} ({worst['tensor']})" if worst else ""))
    for note in summary.get("notes", []):
        typer.echo(f"note: {note}")


def _report_merge(summary: dict) -> None:
    mb = 1024 * 1024
    what = (f"{summary['modules']} modules, rank {summary.get('rank')}" if summary["kind"] == "adapter"
            else f"{summary['modules']} modules folded, {summary.get('tensors_changed', 0)} of "
                 f"{summary.get('tensors_total', 0)} tensors changed")
    typer.echo(f"wrote {summary['output']} ({summary['strategy']}, space {summary['space']}, {summary['kind']}): {what}, "
               f"{summary.get('bytes_written', 0) / mb:,.1f} MiB in {summary['seconds']:.2f} s, "
               f"peak RSS {summary.get('peak_rss_bytes', 0) / mb:,.0f} MiB")
    energy = summary.get("energy_kept")
    if energy:
        typer.echo(f"energy kept by the rank cut: mean {energy['mean']:.4f}, min {energy['min']:.4f} "
                   f"({energy['worst_module']})")
    for note in summary.get("notes", []):
        typer.echo(f"note: {note}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C exits 130."""
    from adaptool.errors import AdaptoolError

    try:
        app(args=argv, standalone_mode=False)
    except AdaptoolError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e.line()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written to the output path", err=True)
        sys.exit(130)
    except _click_exceptions() as e:
        _handle_click(e)
    except OSError as e:  # disk full, permissions, a file vanishing mid-run: the user's to fix, not a bug
        if _state["debug"]:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        typer.echo(f"error: {e.strerror or e}{where}; nothing was written to the output path "
                   "(free disk space, check permissions, or choose another -o)", err=True)
        sys.exit(2)
    except Exception as e:  # a bug: say so in one line, keep the traceback behind --debug
        if _state["debug"]:
            raise
        typer.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback, "
                   "and please report it)", err=True)
        sys.exit(1)
    sys.exit(0)


def _click_exceptions():
    import click

    return (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)


def _handle_click(e) -> None:
    import click

    if isinstance(e, click.exceptions.Exit):
        sys.exit(e.exit_code)
    if isinstance(e, click.exceptions.Abort):
        typer.echo("interrupted: nothing was written to the output path", err=True)
        sys.exit(130)
    e.show()
    sys.exit(e.exit_code)
