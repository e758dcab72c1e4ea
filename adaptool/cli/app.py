"""The commands: parse arguments, call the Python API, render the summary. No math here."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptool.version import __version__
from adaptool.cli.options import (AsJson, Base, Device, Dtype, Force, MaxRank, OptionalDevice, OptionalOutput, Output,
                                  Quiet, Rank, SvCumulative, SvFro, SvRatio)
from adaptool.cli.render import report, report_inspect, run_with_progress

app = typer.Typer(
    name="adaptool",
    help="Merge LoRA-family adapters and fold them into base checkpoints: streaming, exact, PEFT-compatible.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"adaptool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """``--debug`` is read by :func:`adaptool.cli.main.main` before the command runs."""


@app.command(
    epilog="Examples:\n\n"
    "  adaptool unload ./Llama-3.2-1B+./my-lora -o merged/\n\n"
    "  adaptool unload meta-llama/Llama-3.2-1B+me/lora-a+me/lora-b -o merged/ --dtype bfloat16\n\n"
    "  adaptool unload ./my-lora -o merged/      # base from the adapter's base_model_name_or_path"
)
def unload(
    sources: str = typer.Argument(..., metavar="BASE+ADAPTER[+ADAPTER…]",
                                  help="Base model and adapters (folders or hub ids org/name[@rev]) joined by '+'."),
    output: Output = ...,
    dtype: Dtype = None,
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
):
    """Fold adapters into a base checkpoint and write a plain model (streamed, one tensor at a time)."""
    from adaptool.commands.unload import split_sources
    from adaptool.commands.unload import unload as run_unload

    def work(on_start, on_progress):
        base, adapters = split_sources(sources)
        return run_unload(base, adapters, output, dtype=dtype, device=device, force=force,
                          on_start=on_start, on_progress=on_progress)

    report(run_with_progress(work, "Writing", quiet), as_json, quiet)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool merge recipes/ties.yaml\n\n"
    "  adaptool merge recipe.yaml -o out/merged --device cuda --json\n\n"
    "  adaptool merge recipe.yaml --dry-run"
)
def merge(
    recipe: Path = typer.Argument(..., help="YAML recipe (see docs/recipes.md)."),
    output: OptionalOutput = None,
    device: OptionalDevice = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything a real run checks, print the plan, write nothing."),
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
):
    """Combine adapters with a strategy from a YAML recipe, into one adapter or into the base."""
    from adaptool.commands.merge import merge as run_merge
    from adaptool.recipe import load_recipe

    parsed = load_recipe(recipe, output)  # -o is applied here, once; --device by merge, once

    def work(on_start, on_progress):
        return run_merge(parsed, device=device, dry_run=dry_run, force=force,
                         on_start=on_start, on_progress=on_progress)

    report(run_with_progress(work, "Merging", quiet), as_json, quiet)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool inspect ./my-lora\n\n"
    "  adaptool inspect ./my_lora.safetensors --base ./Llama-3.2-1B --json\n\n"
    "  adaptool inspect ./Llama-3.2-1B"
)
def inspect(
    path: str = typer.Argument(..., help="An adapter (PEFT folder, kohya/LyCORIS file) or a model folder; or a hub id."),
    base: Base = None,
    as_json: AsJson = False,
):
    """Look inside an adapter (type, per-module rank, alpha, scale, shape, ‖ΔW‖, spectrum) or a model."""
    from adaptool.commands.inspect import inspect as run_inspect

    report_inspect(run_inspect(path, base=base), as_json)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool resize ./my-lora -o lora-r8/ --rank 8\n\n"
    "  adaptool resize ./my-lora -o lora-90/ --sv-fro 0.9 --max-rank 32 --dtype bfloat16"
)
def resize(
    adapter: str = typer.Argument(..., help="The adapter to resize (PEFT folder, kohya/LyCORIS file, hub id)."),
    output: Output = ...,
    rank: Rank = None,
    sv_fro: SvFro = None,
    sv_cumulative: SvCumulative = None,
    sv_ratio: SvRatio = None,
    max_rank: MaxRank = None,
    base: Base = None,
    dtype: Dtype = None,
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
):
    """A PEFT LoRA whose ΔW per module is the best approximation of the input's at a rank chosen by the rule."""
    from adaptool.commands.resize import resize as run_resize
    from adaptool.strategies.rank_rules import RankRule

    rule = RankRule.from_options(rank, sv_fro, sv_cumulative, sv_ratio, max_rank)

    def work(on_start, on_progress):
        return run_resize(adapter, output, rule, base=base, dtype=dtype, device=device, force=force,
                          on_start=on_start, on_progress=on_progress)

    report(run_with_progress(work, "Resizing", quiet), as_json, quiet)


@app.command(
    epilog="Examples:\n\n"
    "  adaptool extract ./Llama-3.2-1B ./my-finetune -o lora/ --rank 16\n\n"
    "  adaptool extract meta-llama/Llama-3.2-1B me/finetune -o lora/ --sv-fro 0.95 --max-rank 64 --modules 'mlp'"
)
def extract(
    base: str = typer.Argument(..., help="The base model (folder or hub id)."),
    tuned: str = typer.Argument(..., help="The fine-tuned model (folder or hub id)."),
    output: Output = ...,
    rank: Rank = None,
    sv_fro: SvFro = None,
    sv_cumulative: SvCumulative = None,
    sv_ratio: SvRatio = None,
    max_rank: MaxRank = None,
    modules: str = typer.Option(None, "--modules", help="Only modules whose name matches this regex (re.search)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Skip (and list) tensors found on one side only."),
    dtype: Dtype = None,
    device: Device = "auto",
    force: Force = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
):
    """A PEFT LoRA carrying a full fine-tune: ΔW = W_tuned − W_base per Linear weight, truncated by the rule."""
    from adaptool.commands.extract import extract as run_extract
    from adaptool.strategies.rank_rules import RankRule

    rule = RankRule.from_options(rank, sv_fro, sv_cumulative, sv_ratio, max_rank)

    def work(on_start, on_progress):
        return run_extract(base, tuned, output, rule, modules=modules, skip_missing=skip_missing, dtype=dtype,
                           device=device, force=force, on_start=on_start, on_progress=on_progress)

    report(run_with_progress(work, "Extracting", quiet), as_json, quiet)
